//! Polling and branch deployments against a real repository served by `git daemon` and a real
//! `davit up` process: a push to a repository without webhooks starts a run within one polling
//! interval (while another repository's server hangs), the same commit delivered afterwards by a
//! signed webhook runs nothing, and a deployment of a branch deploys the branch's head as
//! `git ls-remote` reads it.

#[allow(dead_code)]
mod git_server;
#[allow(dead_code)]
mod single_node;

use std::time::{Duration, Instant};

use hmac::{KeyInit, Mac};

use git_server::GitServer;
use serde_json::{Value, json};
use single_node::{SingleNode, expect_field_error, expect_status};

/// The node's default polling interval in these tests.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Room for a busy two-core machine on top of the interval and its 10 % jitter.
const SLACK: Duration = Duration::from_secs(4);

async fn start_node(name: &str) -> SingleNode {
    SingleNode::start_with(name, &["--no-agent", "--poll-interval-seconds", &POLL_INTERVAL.as_secs().to_string()]).await
}

/// Connect `url` (without a webhook secret unless given) and create an active pipeline on
/// `main`; returns (repository id, pipeline id).
async fn repository_with_pipeline(node: &SingleNode, url: &str, webhook_secret: Option<&str>) -> (u64, u64) {
    let mut body = json!({"repo_url": url, "branch": "main", "scm_type": "github"});
    if let Some(secret) = webhook_secret {
        body["webhook_secret"] = json!(secret);
    }
    let repo = node.post("/api/v1/repos/connect", &node.admin_token, &body).await;
    expect_status(&repo, 201, "connect");
    let repo_id = repo.json["repo_id"].as_u64().unwrap();
    let pipeline = node
        .post(
            "/api/v1/pipelines",
            &node.admin_token,
            &json!({"name": "build", "repo_id": repo_id, "branch": "main", "build_command": "true", "deploy_strategy": "rolling", "environment": "development"}),
        )
        .await;
    expect_status(&pipeline, 201, "pipeline");
    (repo_id, pipeline.json["pipeline_id"].as_u64().unwrap())
}

async fn deployments(node: &SingleNode, pipeline_id: u64) -> Vec<Value> {
    let reply = node.get(&format!("/api/v1/deployments?pipeline_id={pipeline_id}"), &node.admin_token).await;
    expect_status(&reply, 200, "list deployments");
    reply.json["items"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_deploys_its_current_head_and_a_missing_branch_or_repository_says_so() {
    let (server, first) = GitServer::start("app");
    let node = start_node("deploy-branch").await;
    let (_, pipeline_id) = repository_with_pipeline(&node, &server.url(), Some("secret_key")).await;
    let token = &node.admin_token;

    let deployment =
        node.post("/api/v1/deployments", token, &json!({"pipeline_id": pipeline_id, "branch": "main", "environment": "staging"})).await;
    expect_status(&deployment, 201, "deploy main");
    assert_eq!(deployment.json["commit_hash"], first);
    assert_eq!(deployment.json["environment"], "staging");

    let second = server.push_commit("release/1.0", "second");
    let deployment =
        node.post("/api/v1/deployments", token, &json!({"pipeline_id": pipeline_id.to_string(), "branch": "release/1.0"})).await;
    expect_status(&deployment, 201, "deploy release/1.0");
    assert_eq!(deployment.json["commit_hash"], second, "the branch's head now, not the pipeline's branch");
    assert_eq!(deployment.json["environment"], "development", "the pipeline's environment by default");

    // The same from the command line.
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_davit"))
        .args(["deploy", "--pipeline", &pipeline_id.to_string(), "--branch", "release/1.0", "--environment", "qa", "--json"])
        .args(["--server", &node.base_url(), "--token", token])
        .output()
        .expect("run davit deploy");
    assert!(cli.status.success(), "davit deploy: {}", String::from_utf8_lossy(&cli.stderr));
    let printed: Value = serde_json::from_slice(&cli.stdout).expect("davit deploy --json prints the deployment");
    assert_eq!((printed["commit_hash"].as_str(), printed["environment"].as_str()), (Some(second.as_str()), Some("qa")));
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_davit"))
        .args(["deploy", "--pipeline", &pipeline_id.to_string(), "--branch", "nope"])
        .args(["--server", &node.base_url(), "--token", token])
        .output()
        .expect("run davit deploy");
    assert!(!cli.status.success());
    assert!(String::from_utf8_lossy(&cli.stderr).contains("does not exist"), "{}", String::from_utf8_lossy(&cli.stderr));

    // The seed's body still works as written.
    let by_commit = node
        .post(
            "/api/v1/deployments",
            token,
            &json!({"pipeline_id": pipeline_id.to_string(), "commit_hash": "abc123def", "environment": "staging", "config_overrides": {"env": "staging"}}),
        )
        .await;
    expect_status(&by_commit, 201, "deploy a commit");

    let missing = node.post("/api/v1/deployments", token, &json!({"pipeline_id": pipeline_id, "branch": "nope"})).await;
    expect_status(&missing, 404, "a branch that does not exist");
    assert_eq!(missing.error_code(), Some("branch_not_found"));
    assert!(missing.text().contains("nope"), "{}", missing.text());

    let both = node.post("/api/v1/deployments", token, &json!({"pipeline_id": pipeline_id, "branch": "main", "commit_hash": first})).await;
    expect_field_error(&both, "branch", "both commit_hash and branch");
    let neither = node.post("/api/v1/deployments", token, &json!({"pipeline_id": pipeline_id})).await;
    expect_field_error(&neither, "commit_hash", "neither commit_hash nor branch");
    let bad_branch = node.post("/api/v1/deployments", token, &json!({"pipeline_id": pipeline_id, "branch": "a..b"})).await;
    expect_field_error(&bad_branch, "branch", "an invalid branch name");

    // A repository nobody answers for: git's reason, as a 404 on the repository.
    let closed = format!("git://127.0.0.1:{}/gone.git", git_server::free_port());
    let (_, unreachable_pipeline) = repository_with_pipeline(&node, &closed, Some("secret_key")).await;
    let unreachable = node.post("/api/v1/deployments", token, &json!({"pipeline_id": unreachable_pipeline, "branch": "main"})).await;
    expect_status(&unreachable, 404, "an unreachable repository");
    assert_eq!(unreachable.error_code(), Some("repository_unreachable"));
    assert_eq!(deployments(&node, unreachable_pipeline).await.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_intervals_are_validated_and_shown() {
    let node = start_node("poll-settings").await;
    let token = &node.admin_token;
    let connect = |url: &str, extra: Value| {
        let mut body = json!({"repo_url": url, "scm_type": "github"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let plain = node.post("/api/v1/repos/connect", token, &connect("https://git.example.com/org/plain", json!({}))).await;
    expect_status(&plain, 201, "connect without a secret");
    assert_eq!(plain.json["poll_interval_seconds"], Value::Null);
    assert_eq!(plain.json["polled_every_seconds"], 1, "the node's default for a repository without webhooks");
    let hooked = node
        .post("/api/v1/repos/connect", token, &connect("https://git.example.com/org/hooked", json!({"webhook_secret": "s3cret"})))
        .await;
    expect_status(&hooked, 201, "connect with a secret");
    assert_eq!(hooked.json["polled_every_seconds"], Value::Null, "webhooks, no polling");
    let own =
        node.post("/api/v1/repos/connect", token, &connect("https://git.example.com/org/own", json!({"poll_interval_seconds": 300}))).await;
    expect_status(&own, 201, "connect with an interval");
    assert_eq!((own.json["poll_interval_seconds"].as_u64(), own.json["polled_every_seconds"].as_u64()), (Some(300), Some(300)));
    // JSON Schema's integers include `600.0`.
    let whole = node
        .post("/api/v1/repos/connect", token, &connect("https://git.example.com/org/whole", json!({"poll_interval_seconds": 600.0})))
        .await;
    expect_status(&whole, 201, "connect with 600.0 seconds");
    assert_eq!(whole.json["poll_interval_seconds"], 600);
    for bad in [json!(5), json!(86_401), json!(-1), json!("60"), json!(60.5)] {
        let reply = node
            .post("/api/v1/repos/connect", token, &connect("https://git.example.com/org/bad", json!({"poll_interval_seconds": bad})))
            .await;
        expect_field_error(&reply, "poll_interval_seconds", &format!("poll_interval_seconds {bad}"));
    }
    let repo_id = plain.json["repo_id"].as_u64().unwrap();
    let never = node.put(&format!("/api/v1/repos/{repo_id}"), token, &json!({"poll_interval_seconds": 0})).await;
    expect_status(&never, 200, "stop polling");
    assert_eq!((never.json["poll_interval_seconds"].as_u64(), never.json["polled_every_seconds"].as_u64()), (Some(0), None));
    let bad = node.put(&format!("/api/v1/repos/{repo_id}"), token, &json!({"poll_interval_seconds": 3})).await;
    expect_field_error(&bad, "poll_interval_seconds", "PUT with 3 seconds");
}
/// Wait until `pipeline_id` has `count` deployments, or fail after `timeout`.
async fn wait_for_deployments(node: &SingleNode, pipeline_id: u64, count: usize, timeout: Duration, what: &str) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = deployments(node, pipeline_id).await;
        if found.len() >= count {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}: {} deployments after {timeout:?}: {found:#?}", found.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until the node's log shows `text`, or fail after `timeout`.
async fn wait_for_log(node: &SingleNode, text: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !std::fs::read_to_string(node.log_path()).unwrap_or_default().contains(text) {
        assert!(Instant::now() < deadline, "the node never logged {text:?}:\n{}", node.log_tail(40));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GitHub's push fixture, made to describe `before` -> `after` on `main` of the repository at
/// `url`, signed with `secret` as GitHub signs (HMAC-SHA256 of the exact body).
fn signed_github_push(url: &str, before: &str, after: &str, secret: &str) -> (Vec<u8>, String) {
    let fixture = include_str!("fixtures/webhooks/github-push.json");
    let mut payload: Value = serde_json::from_str(fixture).unwrap();
    payload["ref"] = json!("refs/heads/main");
    payload["before"] = json!(before);
    payload["after"] = json!(after);
    payload["head_commit"]["id"] = json!(after);
    for field in ["html_url", "clone_url", "ssh_url", "svn_url", "url"] {
        payload["repository"][field] = json!(format!("https://elsewhere.invalid/{field}"));
    }
    payload["repository"]["git_url"] = json!(url);
    let body = serde_json::to_vec(&payload).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&body);
    let signature = mac.finalize().into_bytes().iter().map(|byte| format!("{byte:02x}")).collect::<String>();
    (body, format!("sha256={signature}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_without_webhooks_runs_within_one_interval_and_the_same_commit_by_webhook_runs_nothing() {
    let (server, first) = GitServer::start("polled");
    let node = start_node("polling").await;
    let (repo_id, pipeline_id) = repository_with_pipeline(&node, &server.url(), None).await;
    let repository = node.get(&format!("/api/v1/repos/{repo_id}"), &node.admin_token).await;
    assert_eq!(repository.json["polled_every_seconds"], 1, "{}", repository.text());

    // A repository whose server accepts connections and never answers: its polls hang until
    // their timeout, and must not hold up the other repository's.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("git://127.0.0.1:{}/silent.git", silent.local_addr().unwrap().port());
    let _silent_server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let silent_repo = node.post("/api/v1/repos/connect", &node.admin_token, &json!({"repo_url": silent_url, "scm_type": "github"})).await;
    expect_status(&silent_repo, 201, "connect the silent repository");

    // The first poll records the heads that were there before Davit looked, and runs nothing.
    wait_for_log(&node, "first poll: recorded the repository's heads", Duration::from_secs(20)).await;
    assert_eq!(deployments(&node, pipeline_id).await.len(), 0, "the commit that was already there does not run");

    let second = server.push_commit("main", "second");
    let pushed_at = Instant::now();
    let found = wait_for_deployments(&node, pipeline_id, 1, POLL_INTERVAL.mul_f64(1.1) + SLACK, "the pushed commit").await;
    let latency = pushed_at.elapsed();
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0]["commit_hash"], second);
    eprintln!("push to run: {latency:?} with a {POLL_INTERVAL:?} polling interval");

    // The same commit, delivered by a signed GitHub webhook: accepted, recognized, not run.
    let secret = "webhook-secret";
    let update = node.put(&format!("/api/v1/repos/{repo_id}"), &node.admin_token, &json!({"webhook_secret": secret})).await;
    expect_status(&update, 200, "set a webhook secret");
    let (body, signature) = signed_github_push(&server.url(), &first, &second, secret);
    let request = node
        .client
        .post(node.url("/api/v1/repos/webhook"))
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958")
        .header("x-hub-signature-256", signature)
        .body(body);
    let delivered = node.send(request).await;
    expect_status(&delivered, 202, "the webhook delivery");
    assert_eq!(delivered.json["repo_id"], repo_id);
    assert_eq!(delivered.json["changes"][0]["commit"], second);
    assert_eq!(delivered.json["deployments"], json!([]), "{}", delivered.text());
    tokio::time::sleep(POLL_INTERVAL * 2).await;
    assert_eq!(deployments(&node, pipeline_id).await.len(), 1, "the commit ran once");
}
