//! Reading deployment logs: one deployment's lines (JSON, raw text, or followed live as
//! Server-Sent Events), and search across deployments by pipeline, level, time range and text.
//! A deployment's lines are read segment by segment from the blob store, never all at once;
//! this module never writes logs.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{Caller, Path, Query, parse_id};
use super::{schema, sse};
use crate::api_error::ApiError;
use crate::blob_store::BlobStore;
use crate::log_segments::{LogLevel, LogLine, read_segment, segments_of};
use crate::node::Node;
use crate::state::apply::{index, index_ids, load_id, log_segment_key};
use crate::state::codec::{decode, id_key};
use crate::state::records::{Deployment, LogSegment, Timestamp};
use crate::store::{Table, prefix_range};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(search_logs)).routes(routes!(deployment_logs))
}

/// How often a follower looks for new segments and for the end of the deployment.
const FOLLOW_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Lines recorded up to this long after a deployment ended are still sent before `end`: the
/// coordinator records "cancelled by ..." just after the status changes.
const FINAL_GRACE_MS: i64 = 2000;
/// The raw text is sent in chunks of about this many bytes.
const RAW_CHUNK_BYTES: usize = 64 * 1024;

/// How a deployment's log is returned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Raw,
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
    /// Only lines printed by this step of a job (its index among the job's steps).
    #[param(value_type = Option<u64>, minimum = 0, maximum = 4_294_967_295_u64)]
    pub step: Option<u32>,
    /// At most this many lines (default 1000, at most 10000), oldest first. JSON form only:
    /// `format=raw` and `follow=true` return every line.
    #[param(minimum = 1, maximum = 10_000)]
    pub limit: Option<usize>,
    /// `json` (default), or `raw`: `text/plain`, each line's message followed by a newline,
    /// every line stored when the request arrives (this is "download the raw log").
    #[param(inline)]
    pub format: Option<LogFormat>,
    /// `true`: Server-Sent Events, starting with the lines already stored and then each line as
    /// it is stored, until the deployment ends (a last `event: end` with its status). Each
    /// line's event has the line as JSON in `data` and a cursor as `id`; reconnecting with
    /// `Last-Event-ID` resumes after it. One response lasts at most 30 s, after which the
    /// client reconnects (EventSource does). Ignored with `format=raw`.
    pub follow: Option<bool>,
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

/// Which lines of a deployment a request wants, besides the job (which selects segments).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct LineFilter {
    level: Option<LogLevel>,
    step: Option<u32>,
}

impl LineFilter {
    fn keeps(&self, line: &LogLine) -> bool {
        self.level.is_none_or(|level| line.level == level) && self.step.is_none_or(|step| line.step == Some(step))
    }

    /// Whether the segment's metadata alone shows that no line of it is wanted.
    fn skips_segment(&self, segment: &LogSegment) -> bool {
        self.level == Some(LogLevel::Error) && segment.error_lines == 0
    }
}

/// How far a reader of a deployment's log has got: for each job, the last line consumed, as
/// (segment sequence, line index in that segment). Written `<job>:<sequence>:<line>` per job,
/// comma-separated: the `id` of every followed line, and what `Last-Event-ID` resumes after.
/// There is one position per job because jobs write concurrently: a single position could not
/// say which lines of the other jobs were already sent. Within a job, segments are recorded in
/// sequence order (an agent's chunk is refused before the previous one is stored, and older
/// attempts are fenced off), so everything up to a position has been seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogCursor {
    positions: BTreeMap<u64, (u64, u64)>,
}

impl LogCursor {
    /// Parse a cursor as [`LogCursor::render`] writes it; `None` if it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        let number = |part: &str| {
            if part.is_empty() || part.len() > 19 || !part.bytes().all(|byte| byte.is_ascii_digit()) {
                return None;
            }
            part.parse::<u64>().ok()
        };
        let mut positions = BTreeMap::new();
        for entry in text.split(',') {
            let parts: Vec<&str> = entry.split(':').collect();
            let [job_id, sequence, line] = parts.as_slice() else { return None };
            positions.insert(number(job_id)?, (number(sequence)?, number(line)?));
        }
        Some(Self { positions })
    }

    pub fn render(&self) -> String {
        let entries: Vec<String> = self.positions.iter().map(|(job_id, (sequence, line))| format!("{job_id}:{sequence}:{line}")).collect();
        entries.join(",")
    }

    fn consumed(&self, job_id: u64, sequence: u64, line: u64) -> bool {
        self.positions.get(&job_id).is_some_and(|&position| (sequence, line) <= position)
    }

    fn segment_consumed(&self, segment: &LogSegment) -> bool {
        self.positions.get(&segment.job_id).is_some_and(|&(sequence, line)| {
            segment.sequence < sequence || (segment.sequence == sequence && line.saturating_add(1) >= segment.lines)
        })
    }

    fn advance(&mut self, job_id: u64, sequence: u64, line: u64) {
        self.positions.insert(job_id, (sequence, line));
    }
}

/// The lines of one job waiting to be read: segments not yet fetched, then the rest of the
/// segment being read.
#[derive(Default)]
struct JobQueue {
    segments: VecDeque<LogSegment>,
    lines: VecDeque<(u64, u64, LogLine)>,
}

/// Reads a deployment's lines after a cursor: each job's segments in sequence order, the jobs
/// merged by timestamp (the lower job first on a tie), with one decoded segment per job in
/// memory. [`LogReader::discover`] queues the segments recorded since its last call, so a
/// follower calls it again and again; the other forms call it once.
struct LogReader {
    node: Arc<Node>,
    blobs: Arc<dyn BlobStore>,
    deployment_id: u64,
    job_filter: Option<u64>,
    filter: LineFilter,
    cursor: LogCursor,
    /// The last sequence queued, per job.
    discovered: BTreeMap<u64, u64>,
    jobs: BTreeMap<u64, JobQueue>,
}

impl LogReader {
    fn new(state: &AppState, deployment_id: u64, job_filter: Option<u64>, filter: LineFilter, cursor: LogCursor) -> Result<Self, ApiError> {
        let mut reader = LogReader {
            node: state.node.clone(),
            blobs: state.blobs.clone(),
            deployment_id,
            job_filter,
            filter,
            cursor,
            discovered: BTreeMap::new(),
            jobs: BTreeMap::new(),
        };
        reader.discover()?;
        Ok(reader)
    }

    /// Queue the segments recorded since the last call (metadata only; bytes are fetched when
    /// their lines are reached). Two small scans per job: where the next job starts, and the
    /// job's segments after the last one queued.
    fn discover(&mut self) -> Result<(), ApiError> {
        let deployment_end = prefix_range(&id_key(self.deployment_id)).1;
        let mut next_job = self.job_filter.unwrap_or(0);
        loop {
            let start = Bound::Included(log_segment_key(self.deployment_id, next_job, 0));
            let Some((key, _)) = self.node.backend.scan(Table::Logs, (start, deployment_end.clone()), 1, false)?.into_iter().next() else {
                break;
            };
            let job_id = u64::from_be_bytes(key[8..16].try_into().expect("log keys are 24 bytes"));
            if self.job_filter.is_some_and(|wanted| wanted != job_id) {
                break;
            }
            let from = match self.discovered.get(&job_id) {
                Some(&sequence) => Bound::Excluded(log_segment_key(self.deployment_id, job_id, sequence)),
                None => Bound::Included(key),
            };
            let job_end = prefix_range(&[id_key(self.deployment_id), id_key(job_id)].concat()).1;
            for (_, bytes) in self.node.backend.scan(Table::Logs, (from, job_end), usize::MAX, false)? {
                let segment: LogSegment = decode(Table::Logs, &bytes)?;
                self.discovered.insert(job_id, segment.sequence);
                if !self.cursor.segment_consumed(&segment) {
                    self.jobs.entry(job_id).or_default().segments.push_back(segment);
                }
            }
            match job_id.checked_add(1) {
                Some(job_id) => next_job = job_id,
                None => break,
            }
        }
        Ok(())
    }

    /// The next wanted line among those queued, or `None` when every queued line is read.
    async fn next(&mut self) -> Result<Option<LogLine>, ApiError> {
        loop {
            for (&job_id, queue) in self.jobs.iter_mut() {
                while queue.lines.is_empty() {
                    let Some(segment) = queue.segments.pop_front() else { break };
                    if self.filter.skips_segment(&segment) {
                        if let Some(last) = segment.lines.checked_sub(1) {
                            self.cursor.advance(job_id, segment.sequence, last);
                        }
                        continue;
                    }
                    for (index, line) in read_segment(self.blobs.as_ref(), &segment).await?.into_iter().enumerate() {
                        if !self.cursor.consumed(job_id, segment.sequence, index as u64) {
                            queue.lines.push_back((segment.sequence, index as u64, line));
                        }
                    }
                }
            }
            let earliest =
                self.jobs.iter().filter_map(|(&job_id, queue)| queue.lines.front().map(|(_, _, line)| (line.timestamp, job_id))).min();
            let Some((_, job_id)) = earliest else { return Ok(None) };
            let (sequence, index, line) = self.jobs.get_mut(&job_id).and_then(|queue| queue.lines.pop_front()).expect("the job has a line");
            self.cursor.advance(job_id, sequence, index);
            if self.filter.keeps(&line) {
                return Ok(Some(line));
            }
        }
    }
}

/// Fetch logs for a specific deployment: JSON (default), the raw text (`format=raw`), or
/// followed live as Server-Sent Events (`follow=true`). Lines come oldest first: each job's in
/// the order it printed them, the jobs merged by timestamp.
#[utoipa::path(get, path = "/api/v1/logs/{deploymentId}", tag = "logs",
    params(("deploymentId" = schema::IdText, Path, description = "deployment id"), DeploymentLogQuery,
        ("Last-Event-ID" = Option<String>, Header,
            description = "With `follow=true`: the `id` of the last event received (`<job>:<sequence>:<line>`, comma-separated); the stream resumes after it. An id this stream did not send is ignored.")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The lines: JSON; `text/plain` with `format=raw`; `text/event-stream` with `follow=true` (one event per line, `data` a line as JSON, then `event: end` with the deployment's final status).",
            content((DeploymentLogs = "application/json"), (String = "text/plain"), (String = "text/event-stream"))),
        (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn deployment_logs(
    State(state): State<AppState>,
    _caller: Caller,
    headers: HeaderMap,
    Path(deployment_id): Path<String>,
    Query(query): Query<DeploymentLogQuery>,
) -> Result<Response, ApiError> {
    let deployment_id = parse_id("deploymentId", &deployment_id)?;
    if query.job_id.is_some_and(|job_id| job_id > schema::MAX_JSON_ID) {
        return Err(ApiError::invalid_field("job_id", format!("job_id must be at most {}", schema::MAX_JSON_ID)));
    }
    let filter = LineFilter { level: parse_level(query.log_level.as_deref())?, step: query.step };
    let limit = parse_limit(query.limit)?;
    // An id this stream never sent (another server's, or garbage) resumes from the beginning,
    // as a fresh EventSource would: the client gets every line rather than an error.
    let resume_after = headers.get("last-event-id").and_then(|value| value.to_str().ok()).and_then(LogCursor::parse).unwrap_or_default();
    let follow = query.follow.unwrap_or(false);
    state.node.read_barrier().await?;
    if load_id::<Deployment>(&state.node.state(), Table::Deployments, deployment_id)?.is_none() {
        return Err(ApiError::not_found(format!("deployment {deployment_id} not found")));
    }
    match query.format.unwrap_or_default() {
        LogFormat::Raw => Ok(raw_text(LogReader::new(&state, deployment_id, query.job_id, filter, LogCursor::default())?)),
        LogFormat::Json if follow => Ok(follow_events(LogReader::new(&state, deployment_id, query.job_id, filter, resume_after)?)),
        LogFormat::Json => {
            let mut reader = LogReader::new(&state, deployment_id, query.job_id, filter, LogCursor::default())?;
            let mut lines = Vec::new();
            let mut truncated = false;
            while let Some(line) = reader.next().await? {
                if lines.len() == limit {
                    truncated = true;
                    break;
                }
                lines.push(line);
            }
            lines.sort_by_key(|line| line.timestamp);
            Ok(Json(DeploymentLogs { deployment_id, lines, truncated }).into_response())
        }
    }
}

/// `format=raw`: each line's message and a newline, sent in chunks as segments are read. A
/// failure after the first byte aborts the response, so a client never takes a cut log for a
/// whole one.
fn raw_text(mut reader: LogReader) -> Response {
    let (sender, receiver) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut buffer = Vec::with_capacity(RAW_CHUNK_BYTES);
        loop {
            match reader.next().await {
                Ok(Some(line)) => {
                    buffer.extend_from_slice(line.message.as_bytes());
                    buffer.push(b'\n');
                    if buffer.len() >= RAW_CHUNK_BYTES && sender.send(Ok(Bytes::from(std::mem::take(&mut buffer)))).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    if !buffer.is_empty() {
                        let _ = sender.send(Ok(Bytes::from(buffer))).await;
                    }
                    return;
                }
                Err(error) => {
                    tracing::warn!(deployment_id = reader.deployment_id, error = %error.message, "raw log download failed");
                    let _ = sender.send(Err(std::io::Error::other(error.message))).await;
                    return;
                }
            }
        }
    });
    let mut response = Body::from_stream(ReceiverStream::new(receiver)).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// `follow=true`: the lines as Server-Sent Events, from a task that polls the local state.
fn follow_events(mut reader: LogReader) -> Response {
    let deployment_id = reader.deployment_id;
    sse::stream_from_task("following a deployment's log failed", deployment_id, Duration::from_secs(10), |sender| async move {
        follow(&mut reader, &sender).await
    })
}

async fn follow(reader: &mut LogReader, sender: &mpsc::Sender<Event>) -> Result<(), ApiError> {
    let window_ends = tokio::time::Instant::now() + sse::FOLLOW_WINDOW;
    let mut end_after: Option<tokio::time::Instant> = None;
    if sender.send(Event::default().retry(Duration::from_secs(1))).await.is_err() {
        return Ok(());
    }
    loop {
        // The status before the lines: every line recorded before the deployment was seen to
        // end is sent before `end`.
        let deployment = load_id::<Deployment>(&reader.node.state(), Table::Deployments, reader.deployment_id)?;
        reader.discover()?;
        while let Some(line) = reader.next().await? {
            let event = Event::default().id(reader.cursor.render()).json_data(&line).map_err(|e| ApiError::internal(e.to_string()))?;
            if sender.send(event).await.is_err() {
                return Ok(());
            }
        }
        let now = tokio::time::Instant::now();
        let end = match &deployment {
            None => Some(
                serde_json::json!({"deployment_id": reader.deployment_id, "status": null, "status_reason": "the deployment was deleted"}),
            ),
            Some(deployment) if deployment.status.is_final() => {
                let end_after = *end_after.get_or_insert_with(|| {
                    let ended_at = deployment.end_time.unwrap_or(deployment.updated_at);
                    let remaining = (ended_at + FINAL_GRACE_MS - crate::auth::now_millis()).clamp(0, FINAL_GRACE_MS);
                    now + Duration::from_millis(remaining as u64)
                });
                (now >= end_after).then(|| {
                    serde_json::json!({"deployment_id": deployment.deployment_id, "status": deployment.status, "status_reason": deployment.status_reason})
                })
            }
            Some(_) => None,
        };
        if let Some(end) = end {
            let _ = sender.send(Event::default().event("end").data(end.to_string())).await;
            return Ok(());
        }
        if now >= window_ends {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_POLL_INTERVAL) => {}
            _ = sender.closed() => return Ok(()),
        }
    }
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
    fn cursors_round_trip_and_refuse_anything_else() {
        let cursor = LogCursor::parse("0:2:0,5:4294967297:12").unwrap();
        assert_eq!(cursor.render(), "0:2:0,5:4294967297:12");
        assert!(cursor.consumed(5, 4_294_967_297, 12) && cursor.consumed(5, 3, 99) && cursor.consumed(0, 1, 7));
        assert!(!cursor.consumed(5, 4_294_967_297, 13) && !cursor.consumed(0, 3, 0) && !cursor.consumed(7, 1, 0));
        let segment = |job_id, sequence, lines| LogSegment {
            deployment_id: 1,
            job_id,
            sequence,
            blob_key: String::new(),
            bytes: 0,
            lines,
            error_lines: 0,
            first_timestamp: 0,
            last_timestamp: 0,
        };
        assert!(cursor.segment_consumed(&segment(0, 2, 1)) && cursor.segment_consumed(&segment(0, 1, 50)));
        assert!(!cursor.segment_consumed(&segment(0, 2, 2)) && !cursor.segment_consumed(&segment(0, 3, 1)));
        assert!(!cursor.segment_consumed(&segment(9, 1, 1)));
        let mut cursor = LogCursor::default();
        cursor.advance(3, 1, 0);
        cursor.advance(3, 1, 1);
        assert_eq!(cursor.render(), "3:1:1");
        for bad in ["", "1:2", "1:2:3:4", "1:2:3,", "a:2:3", "1:-2:3", " 1:2:3", "1:2:3;4:5:6", "12345678901234567890:1:1"] {
            assert_eq!(LogCursor::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn line_filters() {
        let line = LogLine { timestamp: 1, level: LogLevel::Info, job_id: 3, message: "x".into(), step: Some(2) };
        assert!(LineFilter::default().keeps(&line));
        assert!(LineFilter { level: Some(LogLevel::Info), step: Some(2) }.keeps(&line));
        assert!(!LineFilter { level: None, step: Some(1) }.keeps(&line));
        assert!(!LineFilter { level: Some(LogLevel::Error), step: None }.keeps(&line));
        assert!(!LineFilter { level: None, step: Some(0) }.keeps(&LogLine { step: None, ..line }));
    }

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
