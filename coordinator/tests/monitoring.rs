//! Monitoring end to end with real parts: a real `davit up`, a real `davit-agent` running a build
//! in the real Docker engine that burns a CPU and holds 200 MB, a repository served by `git
//! daemon`. The build's CPU and memory (sampled by the agent from the engine's stats) show
//! through `GET /api/v1/monitoring/metrics` and `/metrics`; the commit's time gives the delivery
//! metrics a lead time; the environment matrix shows what runs. Every metric name documented in
//! `docs/metrics.md` is exposed by a real node's `/metrics`.

#[allow(dead_code)]
mod fleet;
#[allow(dead_code)]
mod git_server;
#[allow(dead_code)]
mod single_node;
#[allow(dead_code)]
mod support;

use std::time::Duration;

use fleet::{AgentProcess, api_for, docker_ready};
use git_server::GitServer;
use serde_json::json;
use single_node::{SingleNode, expect_status};

/// One busy shell loop (a full core, within the step's 1-CPU limit) for 8 s, beside `tail`
/// holding 200 MB of a line without end until the input closes.
const BURN_SCRIPT: &str = "#!/bin/sh\nset -e\n(head -c 200000000 /dev/zero; sleep 8) | tail > /dev/null &\nend=$(( $(date +%s) + 8 ))\nwhile [ \"$(date +%s)\" -lt \"$end\" ]; do :; done\nwait\nmkdir -p out\necho done > out/result\n";

/// The metric names `docs/metrics.md` documents.
fn documented_metrics() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md")).expect("docs/metrics.md");
    doc.lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once('`').map(|(name, _)| name.to_string()))
        .collect()
}

/// The value of the first sample line of `/metrics` that starts with `prefix`.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|line| line.starts_with(prefix))?.rsplit_once(' ')?.1.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_exposed_by_a_real_node() {
    let node = SingleNode::start_with("metrics-names", &["--no-agent"]).await;
    let scrape = reqwest::get(node.url("/metrics")).await.expect("scrape /metrics");
    assert_eq!(scrape.status(), 200);
    let text = scrape.text().await.unwrap();
    let documented = documented_metrics();
    assert!(documented.len() >= 30, "the documentation lists the metrics: {documented:?}");
    for name in &documented {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} is documented but /metrics does not expose it:\n{text}");
    }
    // Families the node has figures for from the start carry samples too.
    for name in ["davit_raft_term", "davit_raft_is_leader", "davit_store_disk_bytes", "davit_job_queue_seconds_count"] {
        assert!(text.lines().any(|line| line.starts_with(name)), "{name} has no sample:\n{text}");
    }
    // And nothing undocumented: every family exposed is in the list.
    for line in text.lines().filter_map(|line| line.strip_prefix("# TYPE ")) {
        let name = line.split_whitespace().next().unwrap();
        assert!(documented.iter().any(|documented| documented == name), "{name} is exposed but not documented in docs/metrics.md");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_build_that_burns_cpu_and_memory_shows_through_the_monitoring_api_and_metrics() {
    let test = "monitoring_docker_usage";
    if !docker_ready(test) {
        return;
    }
    let (git_server, commit) = GitServer::start_with("burn", &[("build.sh", BURN_SCRIPT)]);
    let node = SingleNode::start_with(test, &["--no-agent"]).await;
    let api = api_for(&node);
    let token = api.registration_token().await;
    let mut agent = AgentProcess::register("docker-usage", &[node.grpc_addr()], &token, "docker");
    agent.start();
    api.wait_for_agents(1).await;
    let pipeline_id = api.pipeline(&git_server.url(), "burn", "sh build.sh", json!({"artifacts": ["out"]})).await;
    let deployment_id = api.deploy(pipeline_id, &commit).await;
    let job = api
        .wait_for_job(deployment_id, Duration::from_secs(180), "the build", |job| job["status"] != "queued" && job["status"] != "running")
        .await;
    assert_eq!(job["status"], "succeeded", "{job:#}\n{}\n{}", node.log_tail(40), agent.log());

    // Per deployment: the build container's CPU (about one core) and memory (200 MB held).
    let metrics = api.get(&format!("/api/v1/monitoring/metrics?pipeline_id={pipeline_id}")).await;
    let deployment = &metrics["deployments"][0];
    assert_eq!(deployment["deployment_id"], deployment_id, "{metrics:#}");
    let build = &deployment["build"];
    assert!(build["samples"].as_u64().unwrap_or(0) >= 2, "the build was sampled while it ran: {metrics:#}");
    let cpu_peak = build["cpu_percent_peak"].as_f64().unwrap();
    assert!(cpu_peak > 40.0 && cpu_peak < 150.0, "a busy loop within a 1-CPU limit: {cpu_peak} %: {metrics:#}");
    let memory_peak = build["memory_bytes_peak"].as_u64().unwrap();
    assert!(memory_peak > 150_000_000, "tail held 200 MB: {memory_peak} bytes: {metrics:#}");
    assert!(build["cpu_percent_mean"].as_f64().unwrap() > 0.0 && build["memory_bytes_mean"].as_u64().unwrap() > 0);
    assert!(deployment["duration_seconds"].as_f64().unwrap() >= 8.0, "{metrics:#}");
    assert!(deployment["queue_seconds"].as_f64().is_some(), "{metrics:#}");
    assert_eq!(metrics["queue_time"]["count"], 1, "one job, one attempt: {metrics:#}");
    assert_eq!(metrics["success_rate"], 1.0);
    assert_eq!(metrics["success_rate_by_environment"]["development"]["succeeded"], 1);
    // Filters: another environment has none of it.
    let staging = api.get(&format!("/api/v1/monitoring/metrics?pipeline_id={pipeline_id}&environment=staging")).await;
    assert_eq!(staging["deployments_total"], 0);

    // The same in Prometheus form.
    let text = reqwest::get(node.url("/metrics")).await.unwrap().text().await.unwrap();
    let labels = format!("deployment_id=\"{deployment_id}\",pipeline_id=\"{pipeline_id}\",environment=\"development\"");
    let scraped_cpu = sample(&text, &format!("davit_deployment_build_cpu_percent{{{labels},stat=\"peak\"}}"));
    assert_eq!(scraped_cpu, Some(cpu_peak), "{text}");
    let scraped_memory = sample(&text, &format!("davit_deployment_build_memory_bytes{{{labels},stat=\"peak\"}}"));
    assert_eq!(scraped_memory, Some(memory_peak as f64), "{text}");
    assert_eq!(sample(&text, "davit_deployments{environment=\"development\",status=\"success\"}"), Some(1.0), "{text}");

    // Delivery metrics: one deployment to development, its lead time from the commit's time.
    let delivery = api.get(&format!("/api/v1/monitoring/delivery?environment=development&pipeline_id={pipeline_id}")).await;
    assert_eq!(delivery["summary"]["deployments"], 1, "{delivery:#}");
    let lead_time = delivery["summary"]["lead_time_seconds_p50"].as_f64().expect("a lead time from the commit's time");
    assert!((0.0..600.0).contains(&lead_time), "the commit was made just before the test: {lead_time} s");
    assert_eq!(delivery["summary"]["change_failure_rate"], 0.0);
    assert_eq!(delivery["series"].as_array().unwrap().len(), 31, "the last 30 days touch 31 calendar days: {delivery:#}");
    let weekly = node.get("/api/v1/monitoring/delivery?bucket=week&from=2024-11-04T00:00:00Z&to=1731888000000", &node.admin_token).await;
    expect_status(&weekly, 200, "a weekly range in both time forms");
    assert_eq!(weekly.json["series"].as_array().unwrap().len(), 2);
    let refused = node.get("/api/v1/monitoring/delivery?bucket=month", &node.admin_token).await;
    expect_status(&refused, 400, "an unknown bucket");

    // The environment matrix: the build's commit and artifact run in development.
    let matrix = api.get(&format!("/api/v1/environments/matrix?pipeline_id={pipeline_id}")).await;
    let row = &matrix["items"][0];
    assert_eq!(
        (&row["deployment_id"], &row["commit_hash"], &row["environment"]),
        (&json!(deployment_id), &json!(commit), &json!("development"))
    );
    assert_eq!(row["artifact_digest"].as_str().map(str::len), Some(64), "{matrix:#}");
    assert_eq!(row["pipeline_name"], "burn");
}
