//! Reading deployment logs: one deployment's lines, and search across deployments by
//! pipeline, level, time range and text.

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{Caller, parse_id};
use crate::api_error::ApiError;
use crate::log_segments::{LogLevel, LogLine, read_segment, segments_of};
use crate::state::apply::{index, index_ids, load_id};
use crate::state::records::{Deployment, Timestamp};
use crate::store::Table;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(search_logs)).routes(routes!(deployment_logs))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeploymentLogQuery {
    /// Only this job's lines (0 = the coordinator's own lines).
    pub job_id: Option<u64>,
    /// Only lines at this level: INFO, WARNING, ERROR or DEBUG.
    pub log_level: Option<String>,
    /// At most this many lines (default 1000, at most 10000), oldest first.
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeploymentLogs {
    pub deployment_id: u64,
    pub lines: Vec<LogLine>,
    /// True when `limit` cut the lines short.
    pub truncated: bool,
}

fn parse_level(level: Option<&str>) -> Result<Option<LogLevel>, ApiError> {
    level.map(|level| level.parse::<LogLevel>().map_err(|message| ApiError::invalid_field("log_level", message))).transpose()
}

fn parse_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(1000),
        Some(limit) if (1..=10_000).contains(&limit) => Ok(limit),
        Some(_) => Err(ApiError::invalid_field("limit", "limit must be between 1 and 10000")),
    }
}

/// Fetch logs for a specific deployment.
#[utoipa::path(get, path = "/api/v1/logs/{deploymentId}", tag = "logs", params(("deploymentId" = String, Path, description = "deployment id"), DeploymentLogQuery),
    security(("bearer" = [])),
    responses((status = 200, body = DeploymentLogs), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn deployment_logs(
    State(state): State<AppState>,
    _caller: Caller,
    Path(deployment_id): Path<String>,
    Query(query): Query<DeploymentLogQuery>,
) -> Result<Json<DeploymentLogs>, ApiError> {
    let deployment_id = parse_id("deploymentId", &deployment_id)?;
    let level = parse_level(query.log_level.as_deref())?;
    let limit = parse_limit(query.limit)?;
    state.node.read_barrier().await?;
    if load_id::<Deployment>(&state.node.state(), Table::Deployments, deployment_id)?.is_none() {
        return Err(ApiError::not_found(format!("deployment {deployment_id} not found")));
    }
    let mut lines = Vec::new();
    let mut truncated = false;
    'segments: for segment in segments_of(&state.node, deployment_id, query.job_id)? {
        for line in read_segment(state.blobs.as_ref(), &segment).await? {
            if level.is_some_and(|level| line.level != level) {
                continue;
            }
            if lines.len() == limit {
                truncated = true;
                break 'segments;
            }
            lines.push(line);
        }
    }
    lines.sort_by_key(|line| line.timestamp);
    Ok(Json(DeploymentLogs { deployment_id, lines, truncated }))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogSearchQuery {
    #[param(example = "pipeline123")]
    pub pipeline_id: Option<String>,
    /// INFO, WARNING, ERROR or DEBUG.
    #[param(example = "ERROR")]
    pub log_level: Option<String>,
    /// RFC 3339, e.g. 2024-11-01T00:00:00Z.
    pub start_time: Option<String>,
    /// RFC 3339, e.g. 2024-11-07T23:59:59Z.
    pub end_time: Option<String>,
    /// Text the message must contain (case-insensitive).
    pub q: Option<String>,
    /// At most this many lines (default 1000, at most 10000).
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LogMatch {
    pub deployment_id: u64,
    pub pipeline_id: u64,
    #[serde(flatten)]
    pub line: LogLine,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LogSearchResult {
    pub matches: Vec<LogMatch>,
    pub truncated: bool,
}

fn parse_time(field: &str, text: Option<&str>) -> Result<Option<Timestamp>, ApiError> {
    text.map(|text| {
        humantime::parse_rfc3339_weak(text)
            .ok()
            .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|duration| duration.as_millis() as Timestamp)
            .ok_or_else(|| ApiError::invalid_field(field, format!("{field} must be an RFC 3339 time such as 2024-11-01T00:00:00Z")))
    })
    .transpose()
}

/// Search logs with filters (e.g. error logs).
#[utoipa::path(get, path = "/api/v1/logs/search", tag = "logs", params(LogSearchQuery), security(("bearer" = [])),
    responses((status = 200, body = LogSearchResult), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody)))]
async fn search_logs(
    State(state): State<AppState>,
    _caller: Caller,
    Query(query): Query<LogSearchQuery>,
) -> Result<Json<LogSearchResult>, ApiError> {
    let pipeline_id = query.pipeline_id.as_deref().map(|id| parse_id("pipeline_id", id)).transpose()?;
    let level = parse_level(query.log_level.as_deref())?;
    let start = parse_time("start_time", query.start_time.as_deref())?;
    let end = parse_time("end_time", query.end_time.as_deref())?;
    if let (Some(start), Some(end)) = (start, end)
        && start > end
    {
        return Err(ApiError::invalid_field("end_time", "end_time must not be before start_time"));
    }
    let limit = parse_limit(query.limit)?;
    let text = query.q.as_ref().map(|q| q.to_lowercase());
    state.node.read_barrier().await?;
    let view = state.node.state();
    let deployment_ids: Vec<u64> = match pipeline_id {
        Some(pipeline_id) => index_ids(&view, index::DEPLOYMENTS_BY_PIPELINE, &pipeline_id.to_string())?,
        None => state
            .node
            .backend
            .scan(Table::Deployments, crate::store::full_range(), usize::MAX, false)?
            .into_iter()
            .filter_map(|(key, _)| crate::state::codec::key_id(&key))
            .collect(),
    };
    let mut matches = Vec::new();
    let mut truncated = false;
    'deployments: for deployment_id in deployment_ids {
        let Some(deployment) = load_id::<Deployment>(&view, Table::Deployments, deployment_id)? else { continue };
        for segment in segments_of(&state.node, deployment_id, None)? {
            // Skip whole segments by their metadata before fetching any bytes.
            if start.is_some_and(|start| segment.last_timestamp < start) || end.is_some_and(|end| segment.first_timestamp > end) {
                continue;
            }
            if level == Some(LogLevel::Error) && segment.error_lines == 0 {
                continue;
            }
            for line in read_segment(state.blobs.as_ref(), &segment).await? {
                let keep = level.is_none_or(|level| line.level == level)
                    && start.is_none_or(|start| line.timestamp >= start)
                    && end.is_none_or(|end| line.timestamp <= end)
                    && text.as_ref().is_none_or(|text| line.message.to_lowercase().contains(text));
                if !keep {
                    continue;
                }
                if matches.len() == limit {
                    truncated = true;
                    break 'deployments;
                }
                matches.push(LogMatch { deployment_id, pipeline_id: deployment.pipeline_id, line });
            }
        }
    }
    Ok(Json(LogSearchResult { matches, truncated }))
}
