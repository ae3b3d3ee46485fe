//! Reading deployment logs: one deployment's lines, and search across deployments by
//! pipeline, level, time range and text.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{Caller, Path, Query, parse_id};
use super::schema;
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
    #[param(minimum = 0, maximum = 9_007_199_254_740_991_u64)]
    pub job_id: Option<u64>,
    /// Only lines at this level: INFO, WARNING, ERROR or DEBUG.
    #[param(value_type = Option<schema::LogLevelName>)]
    pub log_level: Option<String>,
    /// At most this many lines (default 1000, at most 10000), oldest first.
    #[param(minimum = 1, maximum = 10_000)]
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeploymentLogs {
    pub deployment_id: u64,
    pub lines: Vec<LogLine>,
    /// True when `limit` cut the lines short.
    pub truncated: bool,
}

/// A `log_level` parameter, spelled exactly as the API writes levels.
fn parse_level(level: Option<&str>) -> Result<Option<LogLevel>, ApiError> {
    level
        .map(|level| match level {
            "INFO" => Ok(LogLevel::Info),
            "WARNING" => Ok(LogLevel::Warning),
            "ERROR" => Ok(LogLevel::Error),
            "DEBUG" => Ok(LogLevel::Debug),
            other => Err(ApiError::invalid_field("log_level", format!("log_level {other:?} must be one of INFO, WARNING, ERROR, DEBUG"))),
        })
        .transpose()
}

fn parse_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(1000),
        Some(limit) if (1..=10_000).contains(&limit) => Ok(limit),
        Some(_) => Err(ApiError::invalid_field("limit", "limit must be between 1 and 10000")),
    }
}

/// Fetch logs for a specific deployment.
#[utoipa::path(get, path = "/api/v1/logs/{deploymentId}", tag = "logs", params(("deploymentId" = schema::IdText, Path, description = "deployment id"), DeploymentLogQuery),
    security(("bearer" = [])),
    responses((status = 200, body = DeploymentLogs), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn deployment_logs(
    State(state): State<AppState>,
    _caller: Caller,
    Path(deployment_id): Path<String>,
    Query(query): Query<DeploymentLogQuery>,
) -> Result<Json<DeploymentLogs>, ApiError> {
    let deployment_id = parse_id("deploymentId", &deployment_id)?;
    if query.job_id.is_some_and(|job_id| job_id > schema::MAX_JSON_ID) {
        return Err(ApiError::invalid_field("job_id", format!("job_id must be at most {}", schema::MAX_JSON_ID)));
    }
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
    #[param(value_type = Option<schema::IdText>, example = "pipeline123")]
    pub pipeline_id: Option<String>,
    /// INFO, WARNING, ERROR or DEBUG.
    #[param(value_type = Option<schema::LogLevelName>, example = "ERROR")]
    pub log_level: Option<String>,
    /// RFC 3339, e.g. 2024-11-01T00:00:00Z.
    #[param(value_type = Option<schema::DateTime>)]
    pub start_time: Option<String>,
    /// RFC 3339, e.g. 2024-11-07T23:59:59Z. A range that ends before it starts matches nothing.
    #[param(value_type = Option<schema::DateTime>)]
    pub end_time: Option<String>,
    /// Text the message must contain (case-insensitive).
    pub q: Option<String>,
    /// At most this many lines (default 1000, at most 10000).
    #[param(minimum = 1, maximum = 10_000)]
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
        parse_rfc3339(text)
            .ok_or_else(|| ApiError::invalid_field(field, format!("{field} must be an RFC 3339 time such as 2024-11-01T00:00:00Z")))
    })
    .transpose()
}

/// Milliseconds since the Unix epoch of an RFC 3339 `date-time` (`2024-11-01T00:00:00Z`,
/// `2024-11-01t01:30:00.250+01:30`), or None when `text` is not one. Any year from 0000 to
/// 9999 and any offset, as the format allows; a leap second counts as the next second.
pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
    let number = |start: usize, end: usize| ascii_number(text.get(start..end)?);
    let separators_ok = text.get(4..5) == Some("-")
        && text.get(7..8) == Some("-")
        && matches!(text.get(10..11), Some("T" | "t"))
        && text.get(13..14) == Some(":")
        && text.get(16..17) == Some(":");
    if !separators_ok {
        return None;
    }
    let (year, month, day) = (number(0, 4)?, number(5, 7)?, number(8, 10)?);
    let (hour, minute, second) = (number(11, 13)?, number(14, 16)?, number(17, 19)?);
    let mut rest = text.get(19..)?;
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let first_three: String = fraction[..digits].chars().chain(std::iter::repeat('0')).take(3).collect();
        millis = first_three.parse::<i64>().ok()?;
        rest = &fraction[digits..];
    }
    let offset_minutes = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.get(0..1)? {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.get(3..4) != Some(":") {
                return None;
            }
            let (offset_hours, offset_minutes) = (ascii_number(rest.get(1..3)?)?, ascii_number(rest.get(4..6)?)?);
            if offset_hours > 23 || offset_minutes > 59 {
                return None;
            }
            sign * (offset_hours * 60 + offset_minutes)
        }
    };
    let leap_year = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap_year => 29,
        2 => 28,
        _ => return None,
    };
    if !(1..=days_in_month).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    Some(seconds * 1000 + millis)
}

/// The value of a string of ASCII digits (no sign, no spaces).
fn ascii_number(digits: &str) -> Option<i64> {
    if !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit()) { digits.parse().ok() } else { None }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
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
    let limit = parse_limit(query.limit)?;
    if let (Some(start), Some(end)) = (start, end)
        && start > end
    {
        // An empty range: nothing can match, which is an answer rather than an error.
        return Ok(Json(LogSearchResult { matches: Vec::new(), truncated: false }));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2024-11-01T00:00:00Z"), Some(1_730_419_200_000));
        assert_eq!(parse_rfc3339("2024-11-07T23:59:59Z"), Some(1_731_023_999_000));
        assert_eq!(parse_rfc3339("2024-11-01t01:30:00.25+01:30"), Some(1_730_419_200_250));
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59.999Z"), Some(-1));
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00-00:00"), Some(951_782_400_000));
        assert_eq!(parse_rfc3339("0000-01-01T00:00:00Z"), Some(-62_167_219_200_000));
        for bad in [
            "",
            "2024-11-01",
            "2024-11-01T00:00:00",
            "2024-11-01 00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-11-01T24:00:00Z",
            "2024-11-01T00:00:00.Z",
            "2024-11-01T00:00:00+0100",
            "2024-11-01T00:00:00+24:00",
            "+024-11-01T00:00:00Z",
            "2024-11-01T00:00:00Zjunk",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
