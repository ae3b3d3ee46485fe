//! `davit deploy --follow` and `davit deployments events` against a real `davit up` whose
//! embedded agent runs builds with the shell executor, from a repository served by a real `git
//! daemon`: a build that fails makes `deploy --follow` print the events and exit 3; a build that
//! succeeds exits 0, also when it outlasts a response window (the CLI resumes with
//! `Last-Event-ID`); `deployments events --json` prints one JSON object per line.

#[allow(dead_code)]
mod git_server;
#[allow(dead_code)]
mod single_node;

use std::process::{Command, Stdio};

use git_server::GitServer;
use serde_json::{Value, json};
use single_node::{SingleNode, expect_status};

/// `davit <args> --server <node> --token <admin token>`: exit code and stdout, stderr.
fn davit(node: &SingleNode, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_davit"))
        .args(args)
        .arg("--server")
        .arg(node.base_url())
        .arg("--token")
        .arg(&node.admin_token)
        .env_remove("DAVIT_SERVER")
        .env_remove("DAVIT_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run davit");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The kinds of the event lines (`HH:MM:SS  <kind>  ...`) among what `davit deploy --follow` printed.
fn event_kinds(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|line| line.len() > 8 && line.as_bytes()[2] == b':' && line.as_bytes()[5] == b':')
        .filter_map(|line| line.split_whitespace().nth(1))
        .collect()
}

async fn pipeline(node: &SingleNode, repo_id: u64, name: &str, build_command: &str) -> String {
    let created = node
        .post(
            "/api/v1/pipelines",
            &node.admin_token,
            &json!({"name": name, "repo_id": repo_id, "branch": "main", "build_command": build_command, "deploy_strategy": "rolling", "environment": "development"}),
        )
        .await;
    expect_status(&created, 201, "create a pipeline");
    created.json["pipeline_id"].as_u64().expect("pipeline id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_follow_prints_the_events_and_exits_with_how_the_deployment_ended() {
    let (git_server, commit) = GitServer::start("follow");
    let node = SingleNode::start_with("deploy-follow", &["--agent-executor", "shell"]).await;
    let repo = node
        .post(
            "/api/v1/repos/connect",
            &node.admin_token,
            &json!({"repo_url": git_server.url(), "branch": "main", "scm_type": "git", "poll_interval_seconds": 0}),
        )
        .await;
    expect_status(&repo, 201, "connect the repository");
    let repo_id = repo.json["repo_id"].as_u64().expect("repo id");
    let failing = pipeline(&node, repo_id, "breaks", "echo building; exit 3").await;
    let passing = pipeline(&node, repo_id, "builds", "echo building").await;

    let (code, stdout, stderr) = davit(&node, &["deploy", "--pipeline", &failing, "--commit", &commit, "--follow"]);
    let context = format!("exit {code}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}\n--- node ---\n{}", node.log_tail(30));
    assert_eq!(code, 3, "a failed deployment exits 3: {context}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("Deployment ") && lines[0].contains("following its progress"), "{context}");
    assert_eq!(event_kinds(&stdout), ["queued", "failed"], "one line per event, not a terminal redraw: {context}");
    assert!(lines.last().unwrap().ends_with(" failed."), "{context}");
    let deployment_id = lines[0].split_whitespace().nth(1).unwrap().to_string();

    let (code, stdout, stderr) = davit(&node, &["deploy", "--pipeline", &passing, "--commit", &commit, "--follow"]);
    assert_eq!(code, 0, "a successful deployment exits 0: {stdout}\n{stderr}\n{}", node.log_tail(30));
    assert_eq!(event_kinds(&stdout), ["queued", "succeeded"], "{stdout}");
    assert!(stdout.trim_end().ends_with("succeeded."), "{stdout}");

    // A build that outlasts one 30 s response window: the CLI resumes with Last-Event-ID and
    // prints every event exactly once.
    let slow = pipeline(&node, repo_id, "slow", "sleep 34; echo built").await;
    let (code, stdout, stderr) = davit(&node, &["deploy", "--pipeline", &slow, "--commit", &commit, "--follow"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}\n{}", node.log_tail(30));
    assert_eq!(event_kinds(&stdout), ["queued", "succeeded"], "{stdout}");

    // The ended deployment's events again, as JSON lines, followed (ends at once) and not.
    for extra in [&["--follow"][..], &[]] {
        let args: Vec<&str> = ["deployments", "events", deployment_id.as_str(), "--json"].iter().chain(extra).copied().collect();
        let (code, stdout, stderr) = davit(&node, &args);
        assert_eq!(code, if extra.is_empty() { 0 } else { 3 }, "{args:?}: {stdout}\n{stderr}");
        let events: Vec<Value> = stdout.lines().map(|line| serde_json::from_str(line).expect("one JSON object per line")).collect();
        assert_eq!(events.iter().map(|event| event["seq"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2], "{stdout}");
        assert_eq!(events[1]["kind"], "failed");
        assert_eq!(events[1]["deployment_id"].to_string(), deployment_id);
    }

    let (code, _, stderr) = davit(&node, &["deployments", "events", "4242", "--follow"]);
    assert_eq!(code, 1, "an unknown deployment is an API error: {stderr}");
    assert!(stderr.contains("deployment 4242 not found"), "{stderr}");
}
