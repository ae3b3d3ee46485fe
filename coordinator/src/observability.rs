//! Prometheus metrics (metrics + metrics-exporter-prometheus) and logging set-up.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::node::Node;

/// Install the process-wide metrics recorder once and return its handle.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .expect("valid buckets")
                .build_recorder();
            let handle = recorder.handle();
            // A second install (tests starting several nodes in one process) keeps the first.
            if metrics::set_global_recorder(recorder).is_ok() {
                describe_recorded();
            }
            handle
        })
        .clone()
}

/// Copy openraft's view into gauges just before a scrape.
pub fn record_raft_metrics(node: &Node) {
    let metrics = node.metrics();
    let applied = metrics.last_applied.map(|id| id.index).unwrap_or(0);
    let last_log = metrics.last_log_index.unwrap_or(0);
    metrics::gauge!("davit_raft_term").set(metrics.current_term as f64);
    metrics::gauge!("davit_raft_leader_id").set(metrics.current_leader.unwrap_or(0) as f64);
    metrics::gauge!("davit_raft_is_leader").set(if metrics.current_leader == Some(node.id()) { 1.0 } else { 0.0 });
    metrics::gauge!("davit_raft_last_log_index").set(last_log as f64);
    metrics::gauge!("davit_raft_commit_index").set(node.commit_index() as f64);
    metrics::gauge!("davit_raft_applied_index").set(applied as f64);
    metrics::gauge!("davit_raft_apply_lag").set(last_log.saturating_sub(applied) as f64);
    metrics::gauge!("davit_raft_snapshot_index").set(metrics.snapshot.map(|id| id.index).unwrap_or(0) as f64);
    metrics::gauge!("davit_store_disk_bytes").set(node.backend.disk_bytes() as f64);
    if let Some(replication) = &metrics.replication {
        for (peer, matched) in replication {
            metrics::gauge!("davit_raft_replication_lag", "peer" => peer.to_string())
                .set(last_log.saturating_sub(matched.map(|id| id.index).unwrap_or(0)) as f64);
        }
    }
}

/// How a documented metric is exposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Summary,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::Summary => "summary",
        }
    }
}

/// Every metric `/metrics` exposes: (name, kind, labels, meaning). `docs/metrics.md` lists the
/// same (a unit test compares them) and `tests/metrics.rs` scrapes a real node for each.
pub const DOCUMENTED: &[(&str, Kind, &str, &str)] = &[
    ("davit_raft_term", Kind::Gauge, "", "Current Raft term of this node."),
    ("davit_raft_leader_id", Kind::Gauge, "", "Node id of the leader this node knows (0: none)."),
    ("davit_raft_is_leader", Kind::Gauge, "", "1 on the leader, 0 elsewhere."),
    ("davit_raft_last_log_index", Kind::Gauge, "", "Index of the last entry in this node's Raft log."),
    ("davit_raft_commit_index", Kind::Gauge, "", "Highest log index known committed."),
    ("davit_raft_applied_index", Kind::Gauge, "", "Highest log index applied to the state."),
    ("davit_raft_apply_lag", Kind::Gauge, "", "Log entries written but not yet applied."),
    ("davit_raft_snapshot_index", Kind::Gauge, "", "Log index of the latest snapshot."),
    ("davit_raft_replication_lag", Kind::Gauge, "peer", "On the leader: entries each peer is behind."),
    ("davit_raft_append_batch", Kind::Histogram, "", "Entries per Raft log append."),
    ("davit_raft_log_flush_batch", Kind::Histogram, "", "Entries per fsync of the Raft log (group commit)."),
    ("davit_raft_snapshots_sent_total", Kind::Counter, "", "Snapshots sent to followers."),
    ("davit_snapshots_built_total", Kind::Counter, "", "Snapshots built by this node."),
    ("davit_store_disk_bytes", Kind::Gauge, "", "Bytes of the node's store on disk."),
    ("davit_proposal_seconds", Kind::Histogram, "", "Time from proposing a command to its commit."),
    ("davit_proposal_batch", Kind::Histogram, "", "Proposals per Raft entry (the leader's batching)."),
    ("davit_scheduler_assignments_total", Kind::Counter, "", "Jobs assigned to agents."),
    ("davit_scheduler_dispatch_seconds", Kind::Histogram, "", "Duration of a scheduler round."),
    ("davit_scheduler_queue_depth", Kind::Gauge, "", "Jobs waiting for an agent."),
    ("davit_scheduler_wait_seconds", Kind::Histogram, "", "Time a job waited in the queue before its assignment."),
    ("davit_log_ingest_bytes_total", Kind::Counter, "", "Bytes of job log lines stored."),
    ("davit_artifact_upload_bytes_total", Kind::Counter, "", "Bytes of artifacts uploaded by agents."),
    ("davit_artifact_upload_seconds", Kind::Histogram, "", "Duration of an artifact upload from an agent."),
    ("davit_commit_status_sent_total", Kind::Counter, "provider", "Commit statuses accepted by the provider."),
    ("davit_commit_status_retried_total", Kind::Counter, "provider", "Commit status reports retried."),
    ("davit_commit_status_failed_total", Kind::Counter, "provider, reason", "Commit status reports given up."),
    ("davit_commit_status_queue_length", Kind::Gauge, "", "Commit status reports waiting to be sent."),
    ("davit_deployments", Kind::Gauge, "environment, status", "Deployments in the state, by environment and status."),
    ("davit_deployment_success_ratio", Kind::Gauge, "environment", "Share of ended deployments that succeeded (0 to 1)."),
    ("davit_deployment_duration_seconds", Kind::Summary, "quantile", "Durations of deployments that ended (p50, p95; sum, count)."),
    ("davit_job_queue_seconds", Kind::Summary, "quantile", "Time each job attempt waited between queue and agent (p50, p95; sum, count)."),
    (
        "davit_deployment_build_cpu_percent",
        Kind::Gauge,
        "deployment_id, pipeline_id, environment, stat",
        "CPU of a deployment's build containers in percent of one core (stat: peak or mean); the newest 50 deployments.",
    ),
    (
        "davit_deployment_build_memory_bytes",
        Kind::Gauge,
        "deployment_id, pipeline_id, environment, stat",
        "Memory of a deployment's build containers, page cache excluded (stat: peak or mean); the newest 50 deployments.",
    ),
    (
        "davit_release_cpu_percent",
        Kind::Gauge,
        "deployment_id, pipeline_id, environment, agent_id, stat",
        "CPU of a release container per host (stat: current, peak or mean; current only while its agent reports to this node).",
    ),
    (
        "davit_release_memory_bytes",
        Kind::Gauge,
        "deployment_id, pipeline_id, environment, agent_id, stat",
        "Memory of a release container per host (stat: current, peak or mean).",
    ),
];

/// Deployments whose containers `/metrics` lists one by one (label sets stay bounded).
pub const SCRAPED_DEPLOYMENTS: usize = 50;

/// Describe the recorder's metrics, so that their `# HELP` lines say what they mean.
fn describe_recorded() {
    for (name, kind, _, help) in DOCUMENTED {
        match kind {
            Kind::Counter => metrics::describe_counter!(*name, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *help),
            Kind::Histogram => metrics::describe_histogram!(*name, *help),
            Kind::Summary => {}
        }
    }
}

fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Prometheus text of the figures computed from the state at each scrape (deployments, queue
/// times, containers' CPU and memory), then `# HELP`/`# TYPE` of every documented family that has
/// no series yet, so that the exposition always names all of them.
pub fn render_state_metrics(figures: &crate::api::monitoring::DeploymentFigures, recorded: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let help = |out: &mut String, name: &str| {
        if let Some((_, kind, _, help)) = DOCUMENTED.iter().find(|(documented, ..)| *documented == name) {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {}", kind.name());
        }
    };
    help(&mut out, "davit_deployments");
    for (environment, statuses) in &figures.by_environment_status {
        for (status, count) in statuses {
            let _ = writeln!(out, "davit_deployments{{environment=\"{}\",status=\"{status}\"}} {count}", escape_label(environment));
        }
    }
    help(&mut out, "davit_deployment_success_ratio");
    for (environment, rate) in &figures.success {
        if let Some(ratio) = rate.success_rate {
            let _ = writeln!(out, "davit_deployment_success_ratio{{environment=\"{}\"}} {ratio}", escape_label(environment));
        }
    }
    for (name, values) in [("davit_deployment_duration_seconds", &figures.durations), ("davit_job_queue_seconds", &figures.waits)] {
        help(&mut out, name);
        let summary = crate::api::monitoring::DurationSummary::of(values.clone());
        for (quantile, value) in [("0.5", summary.p50_seconds), ("0.95", summary.p95_seconds)] {
            if let Some(value) = value {
                let _ = writeln!(out, "{name}{{quantile=\"{quantile}\"}} {value}");
            }
        }
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", values.iter().sum::<f64>(), values.len());
    }
    let mut build_cpu = String::new();
    let mut build_memory = String::new();
    let mut release_cpu = String::new();
    let mut release_memory = String::new();
    for deployment in &figures.metrics {
        let labels = format!(
            "deployment_id=\"{}\",pipeline_id=\"{}\",environment=\"{}\"",
            deployment.deployment_id,
            deployment.pipeline_id,
            escape_label(&deployment.environment)
        );
        if let Some(build) = &deployment.build {
            let _ = writeln!(build_cpu, "davit_deployment_build_cpu_percent{{{labels},stat=\"peak\"}} {}", build.cpu_percent_peak);
            let _ = writeln!(build_cpu, "davit_deployment_build_cpu_percent{{{labels},stat=\"mean\"}} {}", build.cpu_percent_mean);
            let _ = writeln!(build_memory, "davit_deployment_build_memory_bytes{{{labels},stat=\"peak\"}} {}", build.memory_bytes_peak);
            let _ = writeln!(build_memory, "davit_deployment_build_memory_bytes{{{labels},stat=\"mean\"}} {}", build.memory_bytes_mean);
        }
        for host in &deployment.release {
            let labels = format!("{labels},agent_id=\"{}\"", host.agent_id);
            if let (Some(cpu), Some(memory)) = (host.cpu_percent, host.memory_bytes) {
                let _ = writeln!(release_cpu, "davit_release_cpu_percent{{{labels},stat=\"current\"}} {cpu}");
                let _ = writeln!(release_memory, "davit_release_memory_bytes{{{labels},stat=\"current\"}} {memory}");
            }
            let usage = &host.usage;
            let _ = writeln!(release_cpu, "davit_release_cpu_percent{{{labels},stat=\"peak\"}} {}", usage.cpu_percent_peak);
            let _ = writeln!(release_cpu, "davit_release_cpu_percent{{{labels},stat=\"mean\"}} {}", usage.cpu_percent_mean);
            let _ = writeln!(release_memory, "davit_release_memory_bytes{{{labels},stat=\"peak\"}} {}", usage.memory_bytes_peak);
            let _ = writeln!(release_memory, "davit_release_memory_bytes{{{labels},stat=\"mean\"}} {}", usage.memory_bytes_mean);
        }
    }
    for (name, lines) in [
        ("davit_deployment_build_cpu_percent", build_cpu),
        ("davit_deployment_build_memory_bytes", build_memory),
        ("davit_release_cpu_percent", release_cpu),
        ("davit_release_memory_bytes", release_memory),
    ] {
        help(&mut out, name);
        out.push_str(&lines);
    }
    for (name, ..) in DOCUMENTED {
        let named = |text: &str| text.contains(&format!("# TYPE {name} "));
        if !named(recorded) && !named(&out) {
            help(&mut out, name);
        }
    }
    out
}

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DAVIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn,h2=warn,tower=warn,hyper=warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/metrics.md` lists exactly the documented metrics, with their kinds and labels.
    #[test]
    fn the_documentation_lists_every_metric() {
        let doc = include_str!("../../docs/metrics.md");
        let rows: Vec<(String, String, String)> = doc
            .lines()
            .filter(|line| line.starts_with("| `davit_"))
            .map(|line| {
                let cells: Vec<String> = line.trim_matches('|').split('|').map(|cell| cell.trim().trim_matches('`').to_string()).collect();
                (cells[0].clone(), cells[1].clone(), cells[2].clone())
            })
            .collect();
        let documented: Vec<(String, String, String)> =
            DOCUMENTED.iter().map(|(name, kind, labels, _)| (name.to_string(), kind.name().to_string(), labels.to_string())).collect();
        assert_eq!(rows, documented);
    }

    #[test]
    fn state_figures_render_as_prometheus_text() {
        let figures = crate::api::monitoring::DeploymentFigures {
            metrics: Vec::new(),
            total: 2,
            by_status: Default::default(),
            by_environment: Default::default(),
            by_environment_status: [("prod\"uction".to_string(), [("success".to_string(), 2)].into_iter().collect())].into_iter().collect(),
            durations: vec![1.0, 3.0],
            waits: Vec::new(),
            success: Default::default(),
        };
        let text = render_state_metrics(&figures, "# TYPE davit_raft_term gauge\n");
        assert!(text.contains("davit_deployments{environment=\"prod\\\"uction\",status=\"success\"} 2\n"), "{text}");
        assert!(text.contains("davit_deployment_duration_seconds{quantile=\"0.5\"} 3\n"), "{text}");
        assert!(text.contains("davit_deployment_duration_seconds_sum 4\ndavit_deployment_duration_seconds_count 2\n"), "{text}");
        assert!(text.contains("davit_job_queue_seconds_count 0\n"));
        // Families without series are still named once; the recorder's own are not repeated.
        assert_eq!(text.matches("# TYPE davit_commit_status_sent_total counter").count(), 1);
        assert!(!text.contains("# TYPE davit_raft_term"));
    }
}
