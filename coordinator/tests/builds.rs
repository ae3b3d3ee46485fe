//! Builds end to end with real parts: repositories served by `git daemon`, the real `davit`
//! and `davit-agent` binaries as separate processes, the real Docker engine (with the
//! locally built `davit/build-base` image). Faults are real too: SIGKILL and SIGSTOP of agents,
//! SIGKILL of a coordinator while an agent streams its log.

#[allow(dead_code)]
mod fleet;
#[allow(dead_code)]
mod git_server;
#[allow(dead_code)]
mod single_node;
#[allow(dead_code)]
mod support;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use fleet::{AgentProcess, Api, api_for, docker_ready, hex};
use git_server::{GitServer, git};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use single_node::SingleNode;

const BUILD_SCRIPT: &str = "#!/bin/sh\nset -e\necho \"building $GREETING\"\necho \"token is $api_token\"\nmkdir -p out\nprintf 'binary %s\\n' \"$GREETING\" > out/app.bin\necho \"WARNING: tests skipped\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn docker_build_from_git_daemon_stores_the_artifact_the_agent_hashed_and_a_rebuild_uploads_nothing() {
    let test = "docker_build";
    if !docker_ready(test) {
        return;
    }
    let (git_server, commit) = GitServer::start_with("app", &[("build.sh", BUILD_SCRIPT), ("README", "app\n")]);
    let node = SingleNode::start_with(test, &["--no-agent"]).await;
    let api = api_for(&node);
    let token = api.registration_token().await;
    let mut agent = AgentProcess::register("docker-1", &[node.grpc_addr()], &token, "docker");
    agent.start();
    api.wait_for_agents(1).await;
    api.post("/api/v1/configs/development", json!({"GREETING": "hello", "api_token": "s3cr3t-t0ken-value"})).await;
    let pipeline_id = api.pipeline(&git_server.url(), "app", "sh build.sh", json!({"artifacts": ["out"]})).await;

    let first = api.deploy(pipeline_id, &commit).await;
    let job = api
        .wait_for_job(first, Duration::from_secs(120), "the first build", |job| job["status"] != "queued" && job["status"] != "running")
        .await;
    assert_eq!(job["status"], "succeeded", "{job:#}\n{}", node.log_tail(40));
    assert_eq!(api.deployment_status(first).await, "success");
    let steps: Vec<(&str, &str)> =
        job["steps"].as_array().unwrap().iter().map(|step| (step["name"].as_str().unwrap(), step["state"].as_str().unwrap())).collect();
    assert_eq!(steps, vec![("checkout", "succeeded"), ("build", "succeeded"), ("artifacts", "succeeded")]);

    // The log: the build's lines, levels detected, the secret masked before it left the agent.
    let logs = api.get(&format!("/api/v1/logs/{first}?job_id={}", job["job_id"])).await;
    let lines: Vec<(&str, &str)> = logs["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|line| line["step"] == 1)
        .map(|line| (line["level"].as_str().unwrap(), line["message"].as_str().unwrap()))
        .collect();
    assert_eq!(lines, vec![("INFO", "building hello"), ("INFO", "token is ***"), ("WARNING", "WARNING: tests skipped")]);
    let all = logs.to_string();
    assert!(!all.contains("s3cr3t-t0ken-value"), "the secret reached the coordinator");

    // The artifact the API serves hashes to the digest the agent computed and logged.
    let artifacts = api.get(&format!("/api/v1/artifacts?pipeline_id={pipeline_id}")).await;
    let artifact = artifacts["items"].as_array().unwrap().first().cloned().expect("an artifact was recorded");
    let digest = artifact["digest"].as_str().unwrap().to_string();
    let packed_line = logs["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|line| line["message"].as_str().filter(|text| text.starts_with("hashed ")))
        .unwrap();
    assert!(packed_line.contains(&format!("sha256:{digest}")), "{packed_line}");
    let tar = api.bytes(&format!("/api/v1/artifacts/{}", artifact["artifact_id"])).await;
    assert_eq!(hex(&Sha256::digest(&tar)), digest, "the downloaded artifact does not hash to its digest");
    let mut archive = tar::Archive::new(tar.as_slice());
    let mut names = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().display().to_string();
        if name.ends_with("app.bin") {
            let mut content = String::new();
            std::io::Read::read_to_string(&mut entry, &mut content).unwrap();
            assert_eq!(content, "binary hello\n");
        }
        names.push(name);
    }
    assert!(names.iter().any(|name| name.ends_with("out/app.bin")), "{names:?}");

    // The same commit again: same digest, nothing uploaded.
    let second = api.deploy(pipeline_id, &commit).await;
    let job = api
        .wait_for_job(second, Duration::from_secs(120), "the second build", |job| job["status"] != "queued" && job["status"] != "running")
        .await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let logs = api.get(&format!("/api/v1/logs/{second}")).await.to_string();
    assert!(logs.contains(&format!("sha256:{digest} recorded as artifact")) && logs.contains("upload skipped"), "{logs}");
    // No container of these jobs is left behind.
    for deployment in [first, second] {
        let job_id = api.job(deployment).await["job_id"].clone();
        let leftovers = Command::new("docker").args(["ps", "-aq", "--filter", &format!("label=davit.job={job_id}")]).output().unwrap();
        assert!(String::from_utf8_lossy(&leftovers.stdout).trim().is_empty(), "containers of job {job_id} were left behind");
    }
    agent.kill();
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_run_stops_its_container_within_5_seconds() {
    let test = "cancel_build";
    if !docker_ready(test) {
        return;
    }
    let (git_server, commit) = GitServer::start_with("slow", &[("build.sh", "#!/bin/sh\necho started\nsleep 300\necho never\n")]);
    let node = SingleNode::start_with(test, &["--no-agent"]).await;
    let api = api_for(&node);
    let token = api.registration_token().await;
    let mut agent = AgentProcess::register("docker-cancel", &[node.grpc_addr()], &token, "docker");
    agent.start();
    api.wait_for_agents(1).await;
    let pipeline_id = api.pipeline(&git_server.url(), "slow", "sh build.sh", json!({})).await;
    let deployment = api.deploy(pipeline_id, &commit).await;
    let job =
        api.wait_for_job(deployment, Duration::from_secs(60), "the build step to run", |job| job["steps"][1]["state"] == "running").await;
    let label = format!("label=davit.job={}", job["job_id"]);
    let running = || {
        let output = Command::new("docker").args(["ps", "-q", "--filter", &label]).output().expect("docker ps");
        !String::from_utf8_lossy(&output.stdout).trim().is_empty()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !running() {
        assert!(Instant::now() < deadline, "the build container never appeared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cancelled_at = Instant::now();
    api.post(&format!("/api/v1/deployments/{deployment}/cancel"), json!({})).await;
    while running() {
        assert!(cancelled_at.elapsed() < Duration::from_secs(5), "the container still runs 5 s after the cancellation");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("{test}: container gone {} ms after the cancellation", cancelled_at.elapsed().as_millis());
    let job = api.wait_for_job(deployment, Duration::from_secs(10), "the job to end", |job| job["status"] == "cancelled").await;
    assert_eq!(job["status"], "cancelled");
    assert_eq!(api.deployment_status(deployment).await, "failed");
    agent.kill();
}

/// The shell executor here: what is tested is the agent's loss and fencing, not the container.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agents_job_is_retried_on_another_agent_and_a_paused_agents_late_reports_are_refused() {
    let test = "agent_loss";
    let marker = format!("davit-agent-loss-{}", std::process::id());
    let script = format!("#!/bin/sh\necho started {marker}\nsleep 8\necho finished\n");
    let (git_server, commit) = GitServer::start_with("work", &[("build.sh", &script)]);
    let grace = 3;
    let node = SingleNode::start_with(test, &["--no-agent", "--lost-after-seconds", &grace.to_string()]).await;
    let api = api_for(&node);
    let token = api.registration_token().await;
    let mut first = AgentProcess::register("first", &[node.grpc_addr()], &token, "shell");
    let mut second = AgentProcess::register("second", &[node.grpc_addr()], &token, "shell");
    first.start();
    api.wait_for_agents(1).await;
    let pipeline_id = api.pipeline(&git_server.url(), "work", "sh build.sh", json!({"max_retries": 2})).await;

    // 1. kill -9 of the agent mid-build: another agent takes the job within the grace + a few s.
    let deployment = api.deploy(pipeline_id, &commit).await;
    let job =
        api.wait_for_job(deployment, Duration::from_secs(30), "the build to start", |job| job["steps"][1]["state"] == "running").await;
    let first_agent = job["agent_id"].as_u64().unwrap();
    second.start();
    api.wait_for_agents(2).await;
    first.kill();
    let killed_at = Instant::now();
    let job = api
        .wait_for_job(deployment, Duration::from_secs(grace + 15), "a second attempt", |job| {
            job["attempt"] == 2 && job["status"] == "running"
        })
        .await;
    let retried_after = killed_at.elapsed();
    assert_ne!(job["agent_id"].as_u64().unwrap(), first_agent, "{job:#}");
    assert!(retried_after < Duration::from_secs(grace + 5), "retried only after {retried_after:?}");
    eprintln!("{test}: retried on another agent {} ms after kill -9 (grace {grace} s)", retried_after.as_millis());
    assert_eq!(job["attempts"][0]["outcome"], "infrastructure", "{job:#}");
    let job = api.wait_for_job(deployment, Duration::from_secs(60), "the retried build", |job| job["status"] == "succeeded").await;
    assert_eq!(api.deployment_status(deployment).await, "success", "{job:#}");
    let _ = Command::new("pkill").args(["-f", &marker]).status();

    // 2. SIGSTOP of the agent mid-build: declared lost, the job moves; when the agent wakes
    // and reports on its old attempt, the report is refused.
    first.start();
    api.wait_for_agents(2).await;
    second.kill();
    let deployment = api.deploy(pipeline_id, &commit).await;
    let job =
        api.wait_for_job(deployment, Duration::from_secs(30), "the build to start", |job| job["steps"][1]["state"] == "running").await;
    assert_eq!(job["attempt"], 1);
    let paused_agent = job["agent_id"].as_u64().unwrap();
    first.signal("STOP");
    second.start();
    let job = api
        .wait_for_job(deployment, Duration::from_secs(grace + 15), "the job to move", |job| {
            job["attempt"] == 2 && job["status"] == "running"
        })
        .await;
    assert_ne!(job["agent_id"].as_u64().unwrap(), paused_agent);
    first.signal("CONT");
    let job = api.wait_for_job(deployment, Duration::from_secs(60), "the retried build", |job| job["status"] == "succeeded").await;
    // The woken agent's build finished too (its process kept running), but its attempt no longer
    // holds the lease: its result and log were refused, and the job shows attempt 2's success.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !first.log().contains("refused") && !first.log().contains("cancelling job") {
        assert!(Instant::now() < deadline, "the woken agent never had a report refused:\n{}", first.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let attempts = job["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{job:#}");
    assert_eq!(attempts[0]["outcome"], "infrastructure");
    assert_eq!(attempts[1]["outcome"], "succeeded");
    let _ = Command::new("pkill").args(["-f", &marker]).status();
}

/// 50 MB of build output while the coordinator the agent streams to is killed: the stored log is
/// what the build printed, byte for byte, with the secret masked.
#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_killed_during_a_50_mb_log_loses_and_doubles_nothing() {
    let test = "log_failover";
    let lines = 500_000u32;
    // Every 1000th line carries the secret.
    let script = format!(
        "#!/bin/sh\nawk -v secret=\"$DB_PASSWORD\" 'BEGIN {{ for (i = 0; i < {lines}; i++) {{ s = (i % 1000 == 0) ? secret : \"-\"; printf \"line %07d %s %s\\n\", i, s, \"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789ab\" }} }}'\n"
    );
    let (git_server, commit) = GitServer::start_with("loud", &[("build.sh", &script)]);
    // The repository is served on loopback, which `davit serve` refuses unless the config allows it.
    let mut options = support::ClusterOptions::new(davit_coordinator::store::BackendKind::Redb);
    options.outbound_allow_ranges = vec!["127.0.0.0/8".into()];
    let mut cluster = support::TestCluster::start(test, options).await;
    let leader = cluster.wait_for_agreed_leader(&[1, 2, 3], Duration::from_secs(30)).await;
    // The agent talks to a follower first; that follower is killed mid-stream.
    let victim = [1, 2, 3].into_iter().find(|node| *node != leader).unwrap();
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|node| *node != victim).collect();
    let api = Api { client: cluster.client.clone(), base: cluster.node(leader).base_url(), token: cluster.token().to_string() };
    let token = api.registration_token().await;
    let mut coordinators = vec![cluster.node(victim).grpc_addr()];
    coordinators.extend(others.iter().map(|node| cluster.node(*node).grpc_addr()));
    let mut agent = AgentProcess::register("loud", &coordinators, &token, "shell");
    agent.start();
    api.wait_for_agents(1).await;
    api.post("/api/v1/configs/development", json!({"db_password": "hunter2-correct-horse"})).await;
    let pipeline_id = api.pipeline(&git_server.url(), "loud", "sh build.sh", json!({})).await;
    let deployment = api.deploy(pipeline_id, &commit).await;
    let job =
        api.wait_for_job(deployment, Duration::from_secs(30), "the build to start", |job| job["steps"][1]["state"] == "running").await;
    let job_id = job["job_id"].as_u64().unwrap();
    // Kill the victim once part of the log is stored.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let logs = api.get(&format!("/api/v1/logs/{deployment}?job_id={job_id}&limit=10000")).await;
        if logs["lines"].as_array().unwrap().len() >= 5000 {
            break;
        }
        assert!(Instant::now() < deadline, "the log never started arriving");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.kill_node(victim);
    eprintln!("{test}: killed node {victim} while the agent was streaming to it");
    let api = Api { client: cluster.client.clone(), base: cluster.node(others[0]).base_url(), token: api.token.clone() };
    let job = api
        .wait_for_job(deployment, Duration::from_secs(180), "the build to end", |job| {
            job["status"] != "running" && job["status"] != "queued"
        })
        .await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let stored = api.bytes(&format!("/api/v1/logs/{deployment}?job_id={job_id}&step=1&format=raw")).await;
    let mut expected = Vec::with_capacity(50 << 20);
    for i in 0..lines {
        let secret = if i % 1000 == 0 { "***" } else { "-" };
        writeln!(expected, "line {i:07} {secret} 0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz0123456789ab")
            .unwrap();
    }
    assert!(expected.len() > 40 << 20, "the build prints about 50 MB");
    if stored != expected {
        let first_difference = stored.iter().zip(&expected).position(|(a, b)| a != b).unwrap_or(stored.len().min(expected.len()));
        panic!(
            "stored log differs from the build's output: {} bytes stored, {} expected, first difference at byte {first_difference}: {:?}",
            stored.len(),
            expected.len(),
            String::from_utf8_lossy(&stored[first_difference.saturating_sub(100)..(first_difference + 100).min(stored.len())])
        );
    }
    agent.kill();
}

/// `davit up` alone runs a build end to end with its embedded agent.
#[tokio::test(flavor = "multi_thread")]
async fn davit_up_builds_with_its_embedded_agent() {
    let test = "embedded_agent";
    let (git_server, commit) = GitServer::start_with(
        "hello",
        &[("build.sh", "#!/bin/sh\necho hello from the embedded agent\nmkdir -p dist\necho ok > dist/result\n")],
    );
    let docker = docker_ready(test);
    let node = SingleNode::start_with(test, &["--agent-executor", if docker { "docker" } else { "shell" }]).await;
    let api = api_for(&node);
    api.wait_for_agents(1).await;
    let agents = api.get("/api/v1/agents").await;
    assert_eq!(agents["items"][0]["name"], "embedded", "{agents:#}");
    assert_eq!(agents["items"][0]["executors"][0], if docker { "docker" } else { "shell" });
    let log = std::fs::read_to_string(node.log_path()).unwrap_or_default();
    assert!(log.contains("embedded agent:"), "davit up does not say which executor its agent uses:\n{log}");
    // `up` allows loopback repositories (this one is on 127.0.0.1) and says so when it starts.
    assert!(
        log.contains("outbound: developer mode allows loopback, private and link-local addresses"),
        "davit up does not say what it allows:\n{log}"
    );
    let pipeline_id = api.pipeline(&git_server.url(), "hello", "sh build.sh", json!({"artifacts": ["dist"]})).await;
    let deployment = api.deploy(pipeline_id, &commit).await;
    let job = api
        .wait_for_job(deployment, Duration::from_secs(120), "the build", |job| job["status"] != "queued" && job["status"] != "running")
        .await;
    assert_eq!(job["status"], "succeeded", "{job:#}\n{}", node.log_tail(40));
    let logs = api.get(&format!("/api/v1/logs/{deployment}")).await.to_string();
    assert!(logs.contains("hello from the embedded agent"), "{logs}");
    let artifacts = api.get(&format!("/api/v1/artifacts?pipeline_id={pipeline_id}")).await;
    assert_eq!(artifacts["items"].as_array().unwrap().len(), 1, "{artifacts:#}");
}

/// A pull request's webhook starts a build on the provider's merge of the request, not on its
/// head: `git daemon` serves a repository laid out like GitHub's (`refs/pull/7/head` and the
/// trial merge `refs/pull/7/merge`, on no branch), the signed `pull_request` delivery names the
/// head, and the embedded agent fetches the merge ref, logs what it resolved to, and builds it.
#[tokio::test(flavor = "multi_thread")]
async fn a_pull_request_webhook_builds_the_merge_ref() {
    use hmac::{KeyInit, Mac};
    let test = "pull_request_merge";
    let (git_server, _) = GitServer::start_with(
        "app",
        &[("build.sh", "#!/bin/sh\nset -e\necho \"main says $(cat main.txt)\"\ncat feature.txt\n"), ("main.txt", "v1\n")],
    );
    let work = git_server.work();
    git(&work, &["checkout", "-q", "-b", "feature"]);
    std::fs::write(work.join("feature.txt"), "feature file present\n").unwrap();
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "feature"]);
    let head = git(&work, &["rev-parse", "HEAD"]);
    git(&work, &["checkout", "-q", "main"]);
    std::fs::write(work.join("main.txt"), "v2\n").unwrap();
    git(&work, &["commit", "-q", "-am", "main moves on"]);
    git(&work, &["merge", "-q", "--no-ff", "-m", "Merge pull request #7", "feature"]);
    let merge = git(&work, &["rev-parse", "HEAD"]);
    let bare = git_server.bare();
    git(&work, &["push", "-q", bare.to_str().unwrap(), &format!("{head}:refs/pull/7/head"), &format!("{merge}:refs/pull/7/merge")]);

    let node = SingleNode::start_with(test, &["--agent-executor", "shell"]).await;
    let api = api_for(&node);
    api.wait_for_agents(1).await;
    let secret = "merge-ref-secret";
    let repo = api
        .post(
            "/api/v1/repos/connect",
            json!({"repo_url": git_server.url(), "branch": "main", "scm_type": "github", "webhook_secret": secret}),
        )
        .await;
    let repo_id = repo["repo_id"].as_u64().unwrap();
    let pipeline = api
        .post(
            "/api/v1/pipelines",
            json!({"name": "checks", "repo_id": repo_id, "build_command": "sh build.sh", "deploy_strategy": "rolling", "environment": "development"}),
        )
        .await;

    // GitHub's opened payload, pointed at this repository's pull request #7.
    let mut payload: Value = serde_json::from_slice(
        &std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/webhooks/github-pull_request-opened.json")).unwrap(),
    )
    .unwrap();
    payload["number"] = json!(7);
    payload["pull_request"]["number"] = json!(7);
    payload["pull_request"]["head"]["sha"] = json!(head);
    payload["pull_request"]["head"]["ref"] = json!("feature");
    payload["pull_request"]["base"]["ref"] = json!("main");
    let body = serde_json::to_vec(&payload).unwrap();
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&body);
    let signature = format!("sha256={}", hex(&mac.finalize().into_bytes()));
    let reply = node
        .send(
            node.client
                .post(node.url(&format!("/api/v1/repos/{repo_id}/webhook")))
                .header("content-type", "application/json")
                .header("x-github-event", "pull_request")
                .header("x-github-delivery", "merge-ref-1")
                .header("x-hub-signature-256", signature)
                .body(body),
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let deployment_id = reply.json["deployments"][0].as_u64().unwrap_or_else(|| panic!("no run: {}", reply.text()));
    let deployment = api.get(&format!("/api/v1/deployments/{deployment_id}")).await;
    assert_eq!(deployment["pipeline_id"], pipeline["pipeline_id"]);
    assert_eq!(deployment["commit_hash"], head, "the run names the pull request's head");
    assert_eq!(deployment["scm"]["git_ref"], "refs/pull/7/merge");

    let job = api
        .wait_for_job(deployment_id, Duration::from_secs(120), "the pull request's build", |job| {
            job["status"] != "queued" && job["status"] != "running"
        })
        .await;
    assert_eq!(job["status"], "succeeded", "{job:#}\n{}", node.log_tail(40));
    let logs = api.get(&format!("/api/v1/logs/{deployment_id}")).await.to_string();
    assert!(logs.contains(&format!("refs/pull/7/merge resolved to commit {merge} (head commit {head})")), "{logs}");
    assert!(logs.contains("main says v2") && logs.contains("feature file present"), "the build ran on the merge: {logs}");
}
