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
            let _ = metrics::set_global_recorder(recorder);
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

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DAVIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn,h2=warn,tower=warn,hyper=warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
