//! `GET /monitoring/metrics`: deployment counts and durations from the replicated state, and
//! this coordinator's own CPU and memory. Per-deployment resource figures from agents join
//! here when agents report them.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{Caller, Query, parse_id};
use super::schema;
use crate::api_error::ApiError;
use crate::state::apply::status_name;
use crate::state::codec::decode;
use crate::state::records::Deployment;
use crate::store::{Table, full_range};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    #[param(value_type = Option<schema::IdText>)]
    pub pipeline_id: Option<String>,
    pub environment: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DurationSummary {
    pub count: usize,
    pub mean_seconds: Option<f64>,
    pub p50_seconds: Option<f64>,
    pub p95_seconds: Option<f64>,
    pub max_seconds: Option<f64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessMetrics {
    pub node_id: u64,
    pub cpu_seconds: Option<f64>,
    pub memory_rss_bytes: Option<u64>,
    pub store_disk_bytes: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MonitoringMetrics {
    pub deployments_total: usize,
    /// Deployments per status (pending, in_progress, success, failed, rolled_back).
    pub deployments_by_status: BTreeMap<String, usize>,
    pub deployments_by_environment: BTreeMap<String, usize>,
    /// Durations of deployments that started and ended.
    pub deployment_duration: DurationSummary,
    /// Share of ended deployments that succeeded, 0 to 1.
    pub success_rate: Option<f64>,
    pub coordinator: ProcessMetrics,
}

fn percentile(sorted: &[f64], fraction: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    Some(sorted[index])
}

/// CPU seconds and resident memory of this process, from /proc (Linux).
fn process_usage() -> (Option<f64>, Option<u64>) {
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    let cpu = stat.and_then(|stat| {
        let after_name = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0)
    });
    let rss = std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    });
    (cpu, rss)
}

/// Retrieve metrics for deployments (counts, durations, success rate) and the coordinator.
#[utoipa::path(get, path = "/api/v1/monitoring/metrics", tag = "monitoring", params(MetricsQuery), security(("bearer" = [])),
    responses((status = 200, body = MonitoringMetrics), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody)))]
async fn metrics(
    State(state): State<AppState>,
    _caller: Caller,
    Query(query): Query<MetricsQuery>,
) -> Result<Json<MonitoringMetrics>, ApiError> {
    let pipeline_id = query.pipeline_id.as_deref().map(|id| parse_id("pipeline_id", id)).transpose()?;
    state.node.read_barrier().await?;
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_environment: BTreeMap<String, usize> = BTreeMap::new();
    let mut durations = Vec::new();
    let (mut total, mut ended, mut succeeded) = (0, 0, 0);
    for (_, bytes) in state.node.backend.scan(Table::Deployments, full_range(), usize::MAX, false)? {
        let deployment: Deployment = decode(Table::Deployments, &bytes)?;
        if pipeline_id.is_some_and(|id| deployment.pipeline_id != id)
            || query.environment.as_ref().is_some_and(|environment| &deployment.environment != environment)
        {
            continue;
        }
        total += 1;
        *by_status.entry(status_name(deployment.status).to_string()).or_default() += 1;
        *by_environment.entry(deployment.environment.clone()).or_default() += 1;
        if deployment.status.is_final() {
            ended += 1;
            if deployment.status == crate::state::records::DeploymentStatus::Success {
                succeeded += 1;
            }
        }
        if let (Some(start), Some(end)) = (deployment.start_time, deployment.end_time) {
            durations.push((end - start).max(0) as f64 / 1000.0);
        }
    }
    durations.sort_by(|a, b| a.total_cmp(b));
    let (cpu_seconds, memory_rss_bytes) = process_usage();
    Ok(Json(MonitoringMetrics {
        deployments_total: total,
        deployments_by_status: by_status,
        deployments_by_environment: by_environment,
        deployment_duration: DurationSummary {
            count: durations.len(),
            mean_seconds: (!durations.is_empty()).then(|| durations.iter().sum::<f64>() / durations.len() as f64),
            p50_seconds: percentile(&durations, 0.5),
            p95_seconds: percentile(&durations, 0.95),
            max_seconds: durations.last().copied(),
        },
        success_rate: (ended > 0).then(|| succeeded as f64 / ended as f64),
        coordinator: ProcessMetrics {
            node_id: state.node.id(),
            cpu_seconds,
            memory_rss_bytes,
            store_disk_bytes: state.node.backend.disk_bytes(),
        },
    }))
}
