//! Delivery metrics (the four DORA keys) per pipeline and environment over a time range, and the
//! environment matrix (which version runs where), both derived from the replicated deployment
//! records on request. The computations are pure functions over those records ([`delivery`],
//! [`live_versions`]); the handlers only read the state and parse the query. Nothing here writes.
//!
//! Flow: `GET /api/v1/monitoring/delivery -> read barrier -> every Deployment record -> delivery()`;
//! `GET /api/v1/environments/matrix -> read barrier -> succeeded deployments (+ their rollouts'
//! hosts and artifacts) -> live_versions()`.

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
use super::users::timestamp;
use crate::api_error::ApiError;
use crate::state::apply::{index, index_ids, load_id};
use crate::state::codec::decode;
use crate::state::records::{Artifact, Deployment, DeploymentStatus, Pipeline, Timestamp};
use crate::store::{Table, full_range};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(delivery_metrics)).routes(routes!(environment_matrix))
}

const DAY_MS: i64 = 86_400_000;
const WEEK_MS: i64 = 7 * DAY_MS;
/// 1970-01-01 was a Thursday: weeks start on the Monday four days later (ISO 8601 weeks).
const FIRST_MONDAY_MS: i64 = 4 * DAY_MS;
/// The default range: the last 30 days.
const DEFAULT_RANGE_MS: i64 = 30 * DAY_MS;
/// At most this many buckets in a series (ten years of days). A wider range starts its series at
/// the first bucket that holds a deployment instead of at `from`.
pub const MAX_BUCKETS: i64 = 3660;

/// How a series is cut: calendar days or ISO weeks (Monday to Sunday), in UTC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Bucket {
    #[default]
    Day,
    Week,
}

impl Bucket {
    /// The start of the bucket holding `at`.
    pub fn start_of(self, at: Timestamp) -> Timestamp {
        match self {
            Bucket::Day => at.div_euclid(DAY_MS) * DAY_MS,
            Bucket::Week => (at - FIRST_MONDAY_MS).div_euclid(WEEK_MS) * WEEK_MS + FIRST_MONDAY_MS,
        }
    }

    pub fn length(self) -> i64 {
        match self {
            Bucket::Day => DAY_MS,
            Bucket::Week => WEEK_MS,
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveryQuery {
    /// Only this pipeline's deployments (default: every pipeline).
    #[param(value_type = Option<schema::IdText>)]
    pub pipeline_id: Option<String>,
    /// The environment delivered to (default `production`).
    #[param(value_type = Option<schema::EnvironmentName>)]
    pub environment: Option<String>,
    /// Start of the range, inclusive (default: 30 days before `to`).
    #[param(value_type = Option<schema::TimeOrMillis>)]
    pub from: Option<String>,
    /// End of the range, exclusive (default: now). A range that ends before it starts holds nothing.
    #[param(value_type = Option<schema::TimeOrMillis>)]
    pub to: Option<String>,
    /// `day` (default) or `week` (ISO weeks, from Monday), in UTC.
    #[param(inline)]
    pub bucket: Option<Bucket>,
}

/// One bucket of the series: what finished in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeliveryBucket {
    /// Start of the bucket, Unix ms.
    pub start: Timestamp,
    /// Deployments that succeeded (the deployment frequency's count).
    pub deployments: u64,
    pub failed: u64,
    pub rolled_back: u64,
    /// Median seconds from commit to the end of a successful deployment.
    pub lead_time_seconds_p50: Option<f64>,
    /// Mean seconds from a failure that began in this bucket to the next success.
    pub restore_seconds_mean: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeliverySummary {
    /// Successful deployments in the range.
    pub deployments: u64,
    /// Successful deployments per day over the range.
    pub deployment_frequency_per_day: f64,
    /// Median seconds from a commit to the end of its successful deployment (deployments whose
    /// build reported its commit's time).
    pub lead_time_seconds_p50: Option<f64>,
    /// Failed or rolled-back deployments as a share (0 to 1) of those that finished.
    pub change_failure_rate: Option<f64>,
    /// Mean seconds from a failed or rolled-back deployment to the next successful one of the
    /// same pipeline and environment (consecutive failures count as one outage, from the first).
    pub time_to_restore_seconds_mean: Option<f64>,
}

/// The four delivery metrics over a range, as a series and in total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeliveryMetrics {
    /// The range, Unix ms (`from` inclusive, `to` exclusive).
    pub from: Timestamp,
    pub to: Timestamp,
    pub bucket: Bucket,
    pub environment: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline_id: Option<u64>,
    pub series: Vec<DeliveryBucket>,
    pub summary: DeliverySummary,
}

/// A `from` or `to` parameter: Unix milliseconds (1 to 13 digits) or an RFC 3339 time.
pub fn parse_instant(field: &str, text: &str) -> Result<Timestamp, ApiError> {
    if !text.is_empty() && text.len() <= 13 && text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Ok(text.parse().expect("at most 13 digits"));
    }
    super::logs::parse_rfc3339(text).ok_or_else(|| {
        ApiError::invalid_field(field, format!("{field} must be Unix milliseconds or an RFC 3339 time such as 2024-11-01T00:00:00Z"))
    })
}

/// When a finished deployment ended (its end time, or its last change for records without one).
fn ended_at(deployment: &Deployment) -> Timestamp {
    deployment.end_time.unwrap_or(deployment.updated_at)
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    Some(if values.len() % 2 == 1 { values[middle] } else { (values[middle - 1] + values[middle]) / 2.0 })
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Outages: per pipeline, each run of failed or rolled-back deployments to the environment,
/// from the end of its first one to the end of the next success (`None` while not restored).
/// `deployments` must be one environment's finished deployments.
fn outages(deployments: &[&Deployment]) -> Vec<(Timestamp, Option<Timestamp>)> {
    let mut by_pipeline: BTreeMap<u64, Vec<&Deployment>> = BTreeMap::new();
    for deployment in deployments {
        by_pipeline.entry(deployment.pipeline_id).or_default().push(deployment);
    }
    let mut found = Vec::new();
    for (_, mut runs) in by_pipeline {
        runs.sort_by_key(|deployment| (ended_at(deployment), deployment.deployment_id));
        let mut open: Option<Timestamp> = None;
        for deployment in runs {
            match deployment.status {
                DeploymentStatus::Failed | DeploymentStatus::RolledBack => {
                    open.get_or_insert(ended_at(deployment));
                }
                DeploymentStatus::Success => {
                    if let Some(began) = open.take() {
                        found.push((began, Some(ended_at(deployment))));
                    }
                }
                DeploymentStatus::Pending | DeploymentStatus::InProgress => {}
            }
        }
        if let Some(began) = open {
            found.push((began, None));
        }
    }
    found
}

/// The delivery metrics of `environment` (and `pipeline_id`, when given) over `[from, to)`,
/// from deployment records. Pure: the handler passes every deployment it read.
pub fn delivery(
    deployments: &[Deployment],
    environment: &str,
    pipeline_id: Option<u64>,
    from: Timestamp,
    to: Timestamp,
    bucket: Bucket,
) -> DeliveryMetrics {
    let finished: Vec<&Deployment> = deployments
        .iter()
        .filter(|deployment| {
            deployment.environment == environment
                && pipeline_id.is_none_or(|id| deployment.pipeline_id == id)
                && deployment.status.is_final()
        })
        .collect();
    let in_range = |at: Timestamp| from <= at && at < to;
    let mut series: BTreeMap<Timestamp, (DeliveryBucket, Vec<f64>, Vec<f64>)> = BTreeMap::new();
    if from < to {
        // Dense from the bucket of `from`; a range too wide for that starts at its first deployment.
        let first_deployment =
            finished.iter().map(|deployment| ended_at(deployment)).filter(|&at| in_range(at)).min().map(|at| bucket.start_of(at));
        let mut start = bucket.start_of(from);
        if (to - start) / bucket.length() > MAX_BUCKETS {
            start = first_deployment.unwrap_or(to);
        }
        while start < to && series.len() < MAX_BUCKETS as usize {
            let empty = DeliveryBucket {
                start,
                deployments: 0,
                failed: 0,
                rolled_back: 0,
                lead_time_seconds_p50: None,
                restore_seconds_mean: None,
            };
            series.insert(start, (empty, Vec::new(), Vec::new()));
            start += bucket.length();
        }
    }
    let (mut succeeded, mut failed) = (0u64, 0u64);
    let mut lead_times = Vec::new();
    for deployment in &finished {
        let at = ended_at(deployment);
        if !in_range(at) {
            continue;
        }
        let lead_time = deployment.commit_time.map(|committed| (at - committed).max(0) as f64 / 1000.0);
        let entry = series.get_mut(&bucket.start_of(at));
        match deployment.status {
            DeploymentStatus::Success => {
                succeeded += 1;
                lead_times.extend(lead_time);
                if let Some((row, leads, _)) = entry {
                    row.deployments += 1;
                    leads.extend(lead_time);
                }
            }
            DeploymentStatus::Failed | DeploymentStatus::RolledBack => {
                failed += 1;
                if let Some((row, _, _)) = entry {
                    if deployment.status == DeploymentStatus::Failed {
                        row.failed += 1;
                    } else {
                        row.rolled_back += 1;
                    }
                }
            }
            DeploymentStatus::Pending | DeploymentStatus::InProgress => {}
        }
    }
    let mut restores = Vec::new();
    for (began, restored) in outages(&finished) {
        let Some(restored) = restored else { continue };
        if !in_range(began) {
            continue;
        }
        let seconds = (restored - began).max(0) as f64 / 1000.0;
        restores.push(seconds);
        if let Some((_, _, bucket_restores)) = series.get_mut(&bucket.start_of(began)) {
            bucket_restores.push(seconds);
        }
    }
    let series = series
        .into_values()
        .map(|(mut row, mut leads, restores)| {
            row.lead_time_seconds_p50 = median(&mut leads);
            row.restore_seconds_mean = mean(&restores);
            row
        })
        .collect();
    let days = (to - from).max(0) as f64 / DAY_MS as f64;
    DeliveryMetrics {
        from,
        to,
        bucket,
        environment: environment.to_string(),
        pipeline_id,
        series,
        summary: DeliverySummary {
            deployments: succeeded,
            deployment_frequency_per_day: if days > 0.0 { succeeded as f64 / days } else { 0.0 },
            lead_time_seconds_p50: median(&mut lead_times),
            change_failure_rate: (succeeded + failed > 0).then(|| failed as f64 / (succeeded + failed) as f64),
            time_to_restore_seconds_mean: mean(&restores),
        },
    }
}

/// Every deployment record, in id order.
fn all_deployments(state: &AppState) -> Result<Vec<Deployment>, ApiError> {
    let mut deployments = Vec::new();
    for (_, bytes) in state.node.backend.scan(Table::Deployments, full_range(), usize::MAX, false)? {
        deployments.push(decode::<Deployment>(Table::Deployments, &bytes)?);
    }
    Ok(deployments)
}

/// Delivery (DORA) metrics of an environment: deployment frequency, lead time from commit to
/// deployment, change failure rate and time to restore, per day or week over a range.
#[utoipa::path(get, path = "/api/v1/monitoring/delivery", tag = "monitoring", params(DeliveryQuery), security(("bearer" = [])),
    responses((status = 200, body = DeliveryMetrics), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody)))]
async fn delivery_metrics(
    State(state): State<AppState>,
    _caller: Caller,
    Query(query): Query<DeliveryQuery>,
) -> Result<Json<DeliveryMetrics>, ApiError> {
    let pipeline_id = query.pipeline_id.as_deref().map(|id| parse_id("pipeline_id", id)).transpose()?;
    let environment = match query.environment {
        Some(environment) => {
            super::pipelines::validate_environment("environment", &environment)?;
            environment
        }
        None => "production".to_string(),
    };
    let to = match query.to.as_deref() {
        Some(text) => parse_instant("to", text)?,
        None => crate::auth::now_millis(),
    };
    let from = match query.from.as_deref() {
        Some(text) => parse_instant("from", text)?,
        None => to - DEFAULT_RANGE_MS,
    };
    state.node.read_barrier().await?;
    let deployments = all_deployments(&state)?;
    Ok(Json(delivery(&deployments, &environment, pipeline_id, from, to, query.bucket.unwrap_or_default())))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MatrixQuery {
    #[param(value_type = Option<schema::IdText>)]
    pub pipeline_id: Option<String>,
    #[param(value_type = Option<schema::EnvironmentName>)]
    pub environment: Option<String>,
}

/// What runs for one pipeline in one environment and region: the newest successful deployment
/// that reached it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LiveVersion {
    pub pipeline_id: u64,
    pub pipeline_name: Option<String>,
    pub environment: String,
    /// The hosts' region (`region` label of the deploy agents); null for a pipeline that only
    /// builds, or hosts without a region.
    pub region: Option<String>,
    pub deployment_id: u64,
    pub commit_hash: String,
    /// SHA-256 of the artifact released (or built, for a pipeline that only builds).
    pub artifact_digest: Option<String>,
    pub artifact_kind: Option<String>,
    /// The deploy agents (by name) in this region that the deployment rolled out to.
    pub hosts: Vec<String>,
    /// When the deployment succeeded: Unix ms and RFC 3339.
    pub finished_at_ms: Timestamp,
    pub finished_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EnvironmentMatrix {
    /// One row per pipeline, environment and region, ordered by those.
    pub items: Vec<LiveVersion>,
}

/// The live version per pipeline, environment and region: for each, the successful deployment
/// that ended last. A rollout counts in every region of its hosts; a deployment of a pipeline
/// that only builds counts without a region. `built` gives a deployment's own build artifact
/// (digest, kind) for deployments without a rollout. Pure.
pub fn live_versions(
    deployments: &[Deployment],
    pipeline_names: &BTreeMap<u64, String>,
    built: &dyn Fn(&Deployment) -> Option<(String, String)>,
) -> Vec<LiveVersion> {
    let mut live: BTreeMap<(u64, String, Option<String>), LiveVersion> = BTreeMap::new();
    for deployment in deployments.iter().filter(|deployment| deployment.status == DeploymentStatus::Success) {
        let finished_at_ms = ended_at(deployment);
        let mut regions: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
        let artifact = match &deployment.rollout {
            Some(rollout) => {
                for host in &rollout.hosts {
                    regions.entry(host.region.clone()).or_default().push(host.name.clone());
                }
                Some((rollout.artifact_digest.clone(), rollout.artifact_kind.clone()))
            }
            None => {
                regions.insert(None, Vec::new());
                built(deployment)
            }
        };
        for (region, hosts) in regions {
            let key = (deployment.pipeline_id, deployment.environment.clone(), region.clone());
            let newer = live
                .get(&key)
                .is_none_or(|current| (finished_at_ms, deployment.deployment_id) > (current.finished_at_ms, current.deployment_id));
            if newer {
                live.insert(
                    key,
                    LiveVersion {
                        pipeline_id: deployment.pipeline_id,
                        pipeline_name: pipeline_names.get(&deployment.pipeline_id).cloned(),
                        environment: deployment.environment.clone(),
                        region,
                        deployment_id: deployment.deployment_id,
                        commit_hash: deployment.commit_hash.clone(),
                        artifact_digest: artifact.as_ref().map(|(digest, _)| digest.clone()),
                        artifact_kind: artifact.as_ref().map(|(_, kind)| kind.clone()),
                        hosts,
                        finished_at_ms,
                        finished_at: timestamp(finished_at_ms),
                    },
                );
            }
        }
    }
    live.into_values().collect()
}

/// Which version (deployment, commit, artifact digest) runs in each environment and region, per
/// pipeline, and since when.
#[utoipa::path(get, path = "/api/v1/environments/matrix", tag = "environments", params(MatrixQuery), security(("bearer" = [])),
    responses((status = 200, body = EnvironmentMatrix), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody)))]
async fn environment_matrix(
    State(state): State<AppState>,
    _caller: Caller,
    Query(query): Query<MatrixQuery>,
) -> Result<Json<EnvironmentMatrix>, ApiError> {
    let pipeline_id = query.pipeline_id.as_deref().map(|id| parse_id("pipeline_id", id)).transpose()?;
    if let Some(environment) = &query.environment {
        super::pipelines::validate_environment("environment", environment)?;
    }
    state.node.read_barrier().await?;
    let view = state.node.state();
    let deployments: Vec<Deployment> = all_deployments(&state)?
        .into_iter()
        .filter(|deployment| {
            pipeline_id.is_none_or(|id| deployment.pipeline_id == id)
                && query.environment.as_ref().is_none_or(|environment| &deployment.environment == environment)
        })
        .collect();
    let mut pipeline_names = BTreeMap::new();
    for deployment in &deployments {
        if let std::collections::btree_map::Entry::Vacant(entry) = pipeline_names.entry(deployment.pipeline_id)
            && let Some(pipeline) = load_id::<Pipeline>(&view, Table::Pipelines, deployment.pipeline_id)?
        {
            entry.insert(pipeline.name);
        }
    }
    // A deployment without a rollout shows what its build produced (an image before files).
    let mut artifacts: BTreeMap<u64, (String, String)> = BTreeMap::new();
    let pipelines: std::collections::BTreeSet<u64> = deployments.iter().map(|deployment| deployment.pipeline_id).collect();
    for pipeline in pipelines {
        for artifact_id in index_ids(&view, index::ARTIFACTS_BY_PIPELINE, &pipeline.to_string())? {
            if let Some(artifact) = load_id::<Artifact>(&view, Table::Artifacts, artifact_id)?
                && let Some(deployment_id) = artifact.deployment_id
            {
                let kind = artifact.kind.unwrap_or_else(|| "files".into());
                let replace = artifacts.get(&deployment_id).is_none_or(|(_, known)| known != "image");
                if replace {
                    artifacts.insert(deployment_id, (artifact.digest, kind));
                }
            }
        }
    }
    let built = |deployment: &Deployment| artifacts.get(&deployment.release_of.unwrap_or(deployment.deployment_id)).cloned();
    Ok(Json(EnvironmentMatrix { items: live_versions(&deployments, &pipeline_names, &built) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::records::{Rollout, RolloutHost};

    const HOUR: i64 = 3_600_000;
    /// 2024-11-04T00:00:00Z, a Monday.
    const MONDAY: i64 = 1_730_678_400_000;

    fn deployment(id: u64, pipeline_id: u64, environment: &str, status: DeploymentStatus, ended: Timestamp) -> Deployment {
        Deployment {
            deployment_id: id,
            pipeline_id,
            commit_hash: format!("{id:040x}"),
            status,
            environment: environment.into(),
            start_time: Some(ended - HOUR / 4),
            end_time: Some(ended),
            triggered_by: None,
            rollback_of: None,
            config_overrides: BTreeMap::new(),
            status_reason: None,
            created_at: ended - HOUR / 2,
            updated_at: ended,
            scm: None,
            events: 0,
            rollout: None,
            rolls_out: false,
            branch: None,
            release_of: None,
            required_approvals: None,
            approvals: Vec::new(),
            commit_time: None,
            configuration: None,
        }
    }

    #[test]
    fn buckets_are_utc_days_and_iso_weeks() {
        assert_eq!(Bucket::Day.start_of(MONDAY + 5 * HOUR), MONDAY);
        assert_eq!(Bucket::Week.start_of(MONDAY + 6 * 24 * HOUR + 23 * HOUR), MONDAY, "Sunday night is in Monday's week");
        assert_eq!(Bucket::Week.start_of(MONDAY - 1), MONDAY - 7 * 24 * HOUR);
        assert_eq!(Bucket::Week.start_of(0), -3 * DAY_MS, "1970-01-01 was in the week of Monday 1969-12-29");
        assert_eq!(Bucket::Day.start_of(-1), -DAY_MS);
    }

    #[test]
    fn the_four_keys_over_a_week_of_production_deployments() {
        use DeploymentStatus::*;
        let day = |n: i64| MONDAY + n * DAY_MS;
        let mut records = vec![
            // Monday: a success whose commit was made 2 h before it ended.
            Deployment { commit_time: Some(day(0) + 8 * HOUR), ..deployment(1, 1, "production", Success, day(0) + 10 * HOUR) },
            // Tuesday: a failure, another (the same outage), then the fix 3 h after the first.
            deployment(2, 1, "production", Failed, day(1) + 9 * HOUR),
            deployment(3, 1, "production", RolledBack, day(1) + 10 * HOUR),
            Deployment { commit_time: Some(day(1) + 6 * HOUR), ..deployment(4, 1, "production", Success, day(1) + 12 * HOUR) },
            // Another pipeline on Wednesday: a rollback restored a day later, a commit 4 h old.
            deployment(5, 2, "production", RolledBack, day(2)),
            Deployment { commit_time: Some(day(3) - 4 * HOUR), ..deployment(6, 2, "production", Success, day(3)) },
            // Not counted: another environment, still running, outside the range.
            deployment(7, 1, "staging", Success, day(2)),
            deployment(8, 1, "production", InProgress, day(2)),
            deployment(9, 1, "production", Success, day(9)),
        ];
        records[7].end_time = None;
        let metrics = delivery(&records, "production", None, day(0), day(7), Bucket::Day);
        assert_eq!((metrics.from, metrics.to, metrics.series.len()), (day(0), day(7), 7));
        let summary = &metrics.summary;
        assert_eq!(summary.deployments, 3);
        assert!((summary.deployment_frequency_per_day - 3.0 / 7.0).abs() < 1e-9);
        // Lead times 2 h, 6 h, 4 h: the median is 4 h.
        assert_eq!(summary.lead_time_seconds_p50, Some(4.0 * 3600.0));
        assert_eq!(summary.change_failure_rate, Some(0.5));
        // Outages: pipeline 1 from its first failure to its fix (3 h), pipeline 2 for a day.
        assert_eq!(summary.time_to_restore_seconds_mean, Some((3.0 * 3600.0 + 86_400.0) / 2.0));
        let tuesday = &metrics.series[1];
        assert_eq!((tuesday.start, tuesday.deployments, tuesday.failed, tuesday.rolled_back), (day(1), 1, 1, 1));
        assert_eq!(tuesday.lead_time_seconds_p50, Some(6.0 * 3600.0));
        assert_eq!(tuesday.restore_seconds_mean, Some(3.0 * 3600.0));
        assert_eq!(metrics.series[2].rolled_back, 1);
        assert_eq!(metrics.series[2].restore_seconds_mean, Some(86_400.0), "an outage counts in the bucket it began");
        assert_eq!(metrics.series[3].deployments, 1);
        assert_eq!(metrics.series[4].deployments + metrics.series[5].deployments + metrics.series[6].deployments, 0);

        // One pipeline, by week: the same week holds everything of pipeline 2.
        let weekly = delivery(&records, "production", Some(2), day(0), day(14), Bucket::Week);
        assert_eq!(weekly.series.iter().map(|row| row.start).collect::<Vec<_>>(), vec![day(0), day(7)]);
        assert_eq!((weekly.series[0].deployments, weekly.series[0].rolled_back), (1, 1));
        assert_eq!(weekly.summary.change_failure_rate, Some(0.5));
        assert_eq!(weekly.summary.lead_time_seconds_p50, Some(4.0 * 3600.0));

        // A failure not yet restored has no time to restore; an empty range has nothing at all.
        let open = delivery(&records[..3], "production", None, day(0), day(7), Bucket::Day);
        assert_eq!(open.summary.time_to_restore_seconds_mean, None);
        let empty = delivery(&records, "production", None, day(7), day(0), Bucket::Day);
        assert!(empty.series.is_empty() && empty.summary.deployments == 0 && empty.summary.change_failure_rate.is_none());
    }

    #[test]
    fn a_range_wider_than_the_bucket_limit_starts_at_its_first_deployment() {
        let records = vec![deployment(1, 1, "production", DeploymentStatus::Success, MONDAY)];
        let metrics = delivery(&records, "production", None, 0, MONDAY + 3 * DAY_MS, Bucket::Day);
        assert_eq!(metrics.series.first().map(|row| row.start), Some(MONDAY));
        assert_eq!(metrics.series.len(), 3);
        let metrics = delivery(&[], "production", None, 0, 9_999_999_999_999, Bucket::Day);
        assert!(metrics.series.is_empty());
        let metrics = delivery(&records, "production", None, 0, 9_999_999_999_999, Bucket::Week);
        assert_eq!(metrics.series.len(), MAX_BUCKETS as usize);
    }

    #[test]
    fn instants_are_milliseconds_or_rfc3339() {
        assert_eq!(parse_instant("from", "1730678400000").unwrap(), MONDAY);
        assert_eq!(parse_instant("from", "2024-11-04T00:00:00Z").unwrap(), MONDAY);
        assert_eq!(parse_instant("from", "2024-11-04T01:00:00+01:00").unwrap(), MONDAY);
        for bad in ["", "-1", "12345678901234", "yesterday", "2024-11-04"] {
            assert!(parse_instant("from", bad).is_err(), "{bad:?}");
        }
    }

    fn rolled_out(mut deployment: Deployment, digest: &str, hosts: &[(&str, Option<&str>)]) -> Deployment {
        use crate::deploy::plan::{BatchSize, Facts, RollingSettings, Strategy};
        let facts = Facts {
            strategy: Strategy::Rolling(RollingSettings { batch: BatchSize::Hosts(1), max_unavailable: 1 }),
            hosts: Vec::new(),
            now: 0,
            rolling_back: None,
            canary: Default::default(),
            switched_at: None,
            cleaning_up: false,
        };
        let run = crate::release_spec::RunSettings {
            container_port: 8080,
            public_port: 8080,
            image: None,
            command: None,
            cpu_millis: 1000,
            memory_bytes: 1 << 31,
            keep_images: 3,
        };
        let health = crate::release_spec::HealthCheck {
            http_path: None,
            interval_ms: 1000,
            timeout_ms: 1000,
            healthy_threshold: 1,
            unhealthy_threshold: 1,
            deadline_ms: 1000,
        };
        deployment.rollout = Some(Box::new(Rollout {
            service: format!("{}-{}", deployment.pipeline_id, deployment.environment),
            release: format!("d{}", deployment.deployment_id),
            previous: None,
            artifact_digest: digest.repeat(64),
            artifact_kind: "image".into(),
            hosts: hosts
                .iter()
                .enumerate()
                .map(|(index, (name, region))| RolloutHost {
                    agent_id: index as u64 + 10,
                    name: name.to_string(),
                    region: region.map(str::to_string),
                    job: None,
                    unwind_failures: 0,
                })
                .collect(),
            facts,
            version: 1,
            config: Vec::new(),
            run,
            health,
            analysis: Vec::new(),
            started_at: 0,
        }));
        deployment
    }

    #[test]
    fn the_matrix_shows_the_newest_success_per_pipeline_environment_and_region() {
        use DeploymentStatus::*;
        let both = [("eu-1", Some("eu")), ("us-1", Some("us"))];
        let records = vec![
            rolled_out(deployment(1, 1, "production", Success, MONDAY), "a", &both),
            // Later, only eu got the next release; then a failure changes nothing.
            rolled_out(deployment(2, 1, "production", Success, MONDAY + HOUR), "b", &both[..1]),
            rolled_out(deployment(3, 1, "production", RolledBack, MONDAY + 2 * HOUR), "c", &both),
            // A pipeline that only builds: its build's artifact, no region.
            deployment(4, 2, "staging", Success, MONDAY),
            deployment(5, 2, "staging", Failed, MONDAY + HOUR),
        ];
        let names = BTreeMap::from([(1, "web".to_string())]);
        let built = |deployment: &Deployment| (deployment.deployment_id == 4).then(|| ("f".repeat(64), "files".to_string()));
        let matrix = live_versions(&records, &names, &built);
        type Row<'a> = (u64, &'a str, Option<&'a str>, u64, Option<&'a str>);
        let rows: Vec<Row> = matrix
            .iter()
            .map(|row| {
                (row.pipeline_id, row.environment.as_str(), row.region.as_deref(), row.deployment_id, row.artifact_digest.as_deref())
            })
            .collect();
        let (a, b, f) = ("a".repeat(64), "b".repeat(64), "f".repeat(64));
        assert_eq!(
            rows,
            vec![
                (1, "production", Some("eu"), 2, Some(b.as_str())),
                (1, "production", Some("us"), 1, Some(a.as_str())),
                (2, "staging", None, 4, Some(f.as_str())),
            ]
        );
        assert_eq!(matrix[0].hosts, vec!["eu-1".to_string()]);
        assert_eq!(matrix[0].pipeline_name.as_deref(), Some("web"));
        assert_eq!(matrix[1].finished_at, "2024-11-04T00:00:00.000Z");
        assert_eq!(matrix[2].pipeline_name, None);
    }
}
