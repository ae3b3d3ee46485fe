//! `GET /monitoring/metrics`: deployment counts, durations, queue times and success rates from
//! the replicated state; per deployment the CPU and memory of its build containers (the build
//! job's result) and release containers (release jobs' results, and the live samples of the
//! agents connected to this node, `release_usage.rs`); and this coordinator's own CPU and memory.
//! `/metrics` renders the same figures for Prometheus (`observability.rs`).

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
use crate::release_usage::LiveRelease;
use crate::state::apply::status_name;
use crate::state::apply::{index, index_ids, load_id};
use crate::state::codec::decode;
use crate::state::records::{Deployment, DeploymentStatus, Job, ResourceUsage, Timestamp};
use crate::state::rollout::is_release_job;
use crate::store::{Table, full_range};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(metrics))
}

/// Deployments listed one by one in an answer, newest first, unless `limit` says otherwise.
const DEFAULT_DEPLOYMENT_LIMIT: usize = 50;
const MAX_DEPLOYMENT_LIMIT: usize = 1000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    #[param(value_type = Option<schema::IdText>)]
    pub pipeline_id: Option<String>,
    #[param(value_type = Option<schema::EnvironmentName>)]
    pub environment: Option<String>,
    /// How many deployments to list one by one, newest first (default 50, at most 1000); the
    /// totals always cover every deployment that matches.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct DurationSummary {
    pub count: usize,
    pub mean_seconds: Option<f64>,
    pub p50_seconds: Option<f64>,
    pub p95_seconds: Option<f64>,
    pub max_seconds: Option<f64>,
}

impl DurationSummary {
    pub fn of(mut seconds: Vec<f64>) -> DurationSummary {
        seconds.sort_by(f64::total_cmp);
        DurationSummary {
            count: seconds.len(),
            mean_seconds: (!seconds.is_empty()).then(|| seconds.iter().sum::<f64>() / seconds.len() as f64),
            p50_seconds: percentile(&seconds, 0.5),
            p95_seconds: percentile(&seconds, 0.95),
            max_seconds: seconds.last().copied(),
        }
    }
}

/// CPU and memory of containers over the samples taken: CPU in percent of one core (100 = one
/// core busy), memory in bytes without the page cache.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ResourceView {
    pub samples: u64,
    pub cpu_percent_peak: f64,
    pub cpu_percent_mean: f64,
    pub memory_bytes_peak: u64,
    pub memory_bytes_mean: u64,
}

impl From<&ResourceUsage> for ResourceView {
    fn from(usage: &ResourceUsage) -> Self {
        ResourceView {
            samples: usage.samples,
            cpu_percent_peak: usage.cpu_millicores_peak as f64 / 10.0,
            cpu_percent_mean: usage.cpu_millicores_mean as f64 / 10.0,
            memory_bytes_peak: usage.memory_bytes_peak,
            memory_bytes_mean: usage.memory_bytes_mean,
        }
    }
}

/// Several containers' usage as one: the highest peaks, and means weighted by samples.
pub fn combine<'a>(usages: impl IntoIterator<Item = &'a ResourceUsage>) -> Option<ResourceUsage> {
    let mut total = ResourceUsage::default();
    let (mut cpu_sum, mut memory_sum) = (0u128, 0u128);
    for usage in usages {
        total.samples += usage.samples;
        total.cpu_millicores_peak = total.cpu_millicores_peak.max(usage.cpu_millicores_peak);
        total.memory_bytes_peak = total.memory_bytes_peak.max(usage.memory_bytes_peak);
        cpu_sum += u128::from(usage.cpu_millicores_mean) * u128::from(usage.samples);
        memory_sum += u128::from(usage.memory_bytes_mean) * u128::from(usage.samples);
    }
    if total.samples == 0 {
        return None;
    }
    total.cpu_millicores_mean = (cpu_sum / u128::from(total.samples)) as u64;
    total.memory_bytes_mean = (memory_sum / u128::from(total.samples)) as u64;
    Some(total)
}

/// One host's release container of a deployment.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ReleaseResources {
    /// The deploy agent (host).
    pub agent_id: u64,
    pub region: Option<String>,
    /// `live` when this node hears the agent's samples now, `job` when the figures come from
    /// the deployment's last release job on that host (replicated).
    pub source: String,
    /// The latest sample (live only): Unix ms, CPU percent, memory bytes.
    pub sampled_at: Option<Timestamp>,
    pub cpu_percent: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub usage: ResourceView,
}

/// One deployment: how long it took and waited, and what its containers used.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct DeploymentMetrics {
    pub deployment_id: u64,
    pub pipeline_id: u64,
    pub environment: String,
    /// pending, in_progress, success, failed or rolled_back.
    pub status: String,
    pub duration_seconds: Option<f64>,
    /// Seconds its jobs waited in the queue before an agent took them (every attempt).
    pub queue_seconds: Option<f64>,
    /// The build job's step containers (every attempt's last report).
    pub build: Option<ResourceView>,
    /// The release containers, per host.
    pub release: Vec<ReleaseResources>,
}

/// Seconds each attempt of a job waited between entering the queue (its creation, or the end
/// of the attempt before) and its assignment to an agent.
pub fn queue_waits(job: &Job) -> Vec<f64> {
    let mut waits = Vec::new();
    let mut queued_since = job.created_at;
    for attempt in &job.attempts {
        waits.push((attempt.assigned_at - queued_since).max(0) as f64 / 1000.0);
        if let Some(ended) = attempt.ended_at {
            queued_since = ended;
        }
    }
    waits
}

/// The figures of one deployment from its record, its jobs and the live release samples this
/// node has (agent id -> container). Pure.
pub fn deployment_metrics(deployment: &Deployment, jobs: &[Job], live: &BTreeMap<u64, LiveRelease>) -> DeploymentMetrics {
    let (release_jobs, build_jobs): (Vec<&Job>, Vec<&Job>) = jobs.iter().partition(|job| is_release_job(job));
    let build = combine(build_jobs.iter().filter_map(|job| job.resources.as_ref())).map(|usage| ResourceView::from(&usage));
    let waits: Vec<f64> = jobs.iter().flat_map(queue_waits).collect();
    let region_of = |agent_id: u64| {
        deployment.rollout.as_ref().and_then(|rollout| rollout.hosts.iter().find(|host| host.agent_id == agent_id)?.region.clone())
    };
    // The newest release job per host that reported usage.
    let mut by_host: BTreeMap<u64, ReleaseResources> = BTreeMap::new();
    for job in release_jobs {
        let (Some(usage), Some(attempt)) = (job.resources.as_ref(), job.attempts.last()) else { continue };
        by_host.insert(
            attempt.agent_id,
            ReleaseResources {
                agent_id: attempt.agent_id,
                region: region_of(attempt.agent_id),
                source: "job".into(),
                sampled_at: None,
                cpu_percent: None,
                memory_bytes: None,
                usage: usage.into(),
            },
        );
    }
    for (&agent_id, container) in live {
        let recorded = by_host.get(&agent_id).map(|known| known.usage.samples).unwrap_or(0);
        let usage =
            if container.usage.samples >= recorded { ResourceView::from(&container.usage) } else { by_host[&agent_id].usage.clone() };
        by_host.insert(
            agent_id,
            ReleaseResources {
                agent_id,
                region: region_of(agent_id),
                source: "live".into(),
                sampled_at: Some(container.sampled_at),
                cpu_percent: Some(container.cpu_millicores as f64 / 10.0),
                memory_bytes: Some(container.memory_bytes),
                usage,
            },
        );
    }
    DeploymentMetrics {
        deployment_id: deployment.deployment_id,
        pipeline_id: deployment.pipeline_id,
        environment: deployment.environment.clone(),
        status: status_name(deployment.status).to_string(),
        duration_seconds: duration_of(deployment),
        queue_seconds: (!waits.is_empty()).then(|| waits.iter().sum()),
        build,
        release: by_host.into_values().collect(),
    }
}

fn duration_of(deployment: &Deployment) -> Option<f64> {
    Some((deployment.end_time? - deployment.start_time?).max(0) as f64 / 1000.0)
}

/// Success rate (0 to 1) of the deployments that ended, with their counts.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct SuccessRate {
    pub ended: usize,
    pub succeeded: usize,
    pub success_rate: Option<f64>,
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
    /// Seconds jobs waited between entering the queue and an agent taking them (each attempt).
    pub queue_time: DurationSummary,
    /// Share of ended deployments that succeeded, 0 to 1.
    pub success_rate: Option<f64>,
    /// The same per environment.
    pub success_rate_by_environment: BTreeMap<String, SuccessRate>,
    /// The newest deployments (up to `limit`), with their containers' CPU and memory.
    pub deployments: Vec<DeploymentMetrics>,
    pub coordinator: ProcessMetrics,
}

/// Everything `GET /monitoring/metrics` and `/metrics` report about deployments, from the state
/// (deployments and their jobs) and this node's live release samples.
pub struct DeploymentFigures {
    pub metrics: Vec<DeploymentMetrics>,
    pub total: usize,
    pub by_status: BTreeMap<String, usize>,
    pub by_environment: BTreeMap<String, usize>,
    /// environment -> status -> deployments.
    pub by_environment_status: BTreeMap<String, BTreeMap<String, usize>>,
    pub durations: Vec<f64>,
    pub waits: Vec<f64>,
    pub success: BTreeMap<String, SuccessRate>,
}

/// Read the deployments matching the filters (newest first) and their jobs; `detailed` of them
/// get their per-deployment figures.
pub fn deployment_figures(
    state: &AppState,
    pipeline_id: Option<u64>,
    environment: Option<&str>,
    detailed: usize,
) -> Result<DeploymentFigures, ApiError> {
    let view = state.node.state();
    let mut figures = DeploymentFigures {
        metrics: Vec::new(),
        total: 0,
        by_status: BTreeMap::new(),
        by_environment: BTreeMap::new(),
        by_environment_status: BTreeMap::new(),
        durations: Vec::new(),
        waits: Vec::new(),
        success: BTreeMap::new(),
    };
    for (_, bytes) in state.node.backend.scan(Table::Deployments, full_range(), usize::MAX, true)? {
        let deployment: Deployment = decode(Table::Deployments, &bytes)?;
        if pipeline_id.is_some_and(|id| deployment.pipeline_id != id)
            || environment.is_some_and(|environment| deployment.environment != environment)
        {
            continue;
        }
        figures.total += 1;
        *figures.by_status.entry(status_name(deployment.status).to_string()).or_default() += 1;
        *figures.by_environment.entry(deployment.environment.clone()).or_default() += 1;
        *figures
            .by_environment_status
            .entry(deployment.environment.clone())
            .or_default()
            .entry(status_name(deployment.status).to_string())
            .or_default() += 1;
        if deployment.status.is_final() {
            let rate =
                figures.success.entry(deployment.environment.clone()).or_insert(SuccessRate { ended: 0, succeeded: 0, success_rate: None });
            rate.ended += 1;
            if deployment.status == DeploymentStatus::Success {
                rate.succeeded += 1;
            }
        }
        figures.durations.extend(duration_of(&deployment));
        let mut jobs = Vec::new();
        for job_id in index_ids(&view, index::JOBS_BY_DEPLOYMENT, &deployment.deployment_id.to_string())? {
            jobs.extend(load_id::<Job>(&view, Table::Jobs, job_id)?);
        }
        figures.waits.extend(jobs.iter().flat_map(queue_waits));
        if figures.metrics.len() < detailed {
            let live = state.release_usage.of_deployment(deployment.deployment_id);
            figures.metrics.push(deployment_metrics(&deployment, &jobs, &live));
        }
    }
    for rate in figures.success.values_mut() {
        rate.success_rate = (rate.ended > 0).then(|| rate.succeeded as f64 / rate.ended as f64);
    }
    Ok(figures)
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

/// Retrieve metrics for deployments: counts, durations, queue times, success rates, and per
/// deployment the CPU and memory of its build and release containers (sampled by the agents from
/// the Docker engine), and the coordinator's own.
#[utoipa::path(get, path = "/api/v1/monitoring/metrics", tag = "monitoring", params(MetricsQuery), security(("bearer" = [])),
    responses((status = 200, body = MonitoringMetrics), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody)))]
async fn metrics(
    State(state): State<AppState>,
    _caller: Caller,
    Query(query): Query<MetricsQuery>,
) -> Result<Json<MonitoringMetrics>, ApiError> {
    let pipeline_id = query.pipeline_id.as_deref().map(|id| parse_id("pipeline_id", id)).transpose()?;
    if let Some(environment) = &query.environment {
        super::pipelines::validate_environment("environment", environment)?;
    }
    let limit = match query.limit {
        None => DEFAULT_DEPLOYMENT_LIMIT,
        Some(limit) if (1..=MAX_DEPLOYMENT_LIMIT).contains(&limit) => limit,
        Some(_) => return Err(ApiError::invalid_field("limit", "limit must be between 1 and 1000")),
    };
    state.node.read_barrier().await?;
    let figures = deployment_figures(&state, pipeline_id, query.environment.as_deref(), limit)?;
    let (ended, succeeded) =
        figures.success.values().fold((0, 0), |(ended, succeeded), rate| (ended + rate.ended, succeeded + rate.succeeded));
    let (cpu_seconds, memory_rss_bytes) = process_usage();
    Ok(Json(MonitoringMetrics {
        deployments_total: figures.total,
        deployments_by_status: figures.by_status,
        deployments_by_environment: figures.by_environment,
        deployment_duration: DurationSummary::of(figures.durations),
        queue_time: DurationSummary::of(figures.waits),
        success_rate: (ended > 0).then(|| succeeded as f64 / ended as f64),
        success_rate_by_environment: figures.success,
        deployments: figures.metrics,
        coordinator: ProcessMetrics {
            node_id: state.node.id(),
            cpu_seconds,
            memory_rss_bytes,
            store_disk_bytes: state.node.backend.disk_bytes(),
        },
    }))
}
