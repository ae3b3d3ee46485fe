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
use futures::StreamExt as _;
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
use crate::log_segments::{LogLevel, LogLine, missing_segment, read_segment, read_text_index, segments_of};
use crate::log_text_index::TextQuery;
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
    /// Lines per page (default 100, at most 10000). Pages run newest first, across every run.
    #[param(minimum = 1, maximum = 10_000)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page: the next page starts after it.
    #[param(value_type = Option<schema::SearchCursor>)]
    pub cursor: Option<String>,
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
    /// Newest first: deployments by id descending, and within one its lines from the latest.
    pub matches: Vec<LogMatch>,
    /// True when the page is full: more lines may match (ask again with `next_cursor`).
    pub truncated: bool,
    /// Where the next page starts; absent on the last page.
    pub next_cursor: Option<String>,
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

/// Where a search page ended: the last line returned, as (deployment, job, segment sequence,
/// line index in the segment). Written `<deployment>.<job>.<sequence>.<line>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchCursor {
    pub deployment_id: u64,
    pub job_id: u64,
    pub sequence: u64,
    pub line: u64,
}

impl SearchCursor {
    pub fn parse(text: &str) -> Option<SearchCursor> {
        let parts: Vec<u64> = text
            .split('.')
            .map(
                |part| {
                    if part.is_empty() || part.len() > 19 || !part.bytes().all(|b| b.is_ascii_digit()) { None } else { part.parse().ok() }
                },
            )
            .collect::<Option<_>>()?;
        let [deployment_id, job_id, sequence, line] = parts.as_slice() else { return None };
        Some(SearchCursor { deployment_id: *deployment_id, job_id: *job_id, sequence: *sequence, line: *line })
    }

    pub fn render(&self) -> String {
        format!("{}.{}.{}.{}", self.deployment_id, self.job_id, self.sequence, self.line)
    }
}

/// A deployment's segments in the order a search reads them: the latest lines first.
fn newest_first(segments: &mut [LogSegment]) {
    segments.sort_by(|a, b| {
        (b.last_timestamp, b.first_timestamp, b.job_id, b.sequence).cmp(&(a.last_timestamp, a.first_timestamp, a.job_id, a.sequence))
    });
}

/// What a search wants of a line; `keeps` decides on a parsed line, `prefilter` on its stored
/// JSON bytes (lower-cased), so that most lines are never parsed.
struct SearchFilter {
    level: Option<LogLevel>,
    start: Option<Timestamp>,
    end: Option<Timestamp>,
    /// The text, lower-cased.
    text: Option<String>,
    /// The bytes a stored line must contain (lower-cased JSON): the text when JSON writes it
    /// unchanged (ASCII without quotes, backslashes or control characters), and the level's field.
    needles: Vec<Vec<u8>>,
    /// The text's trigrams, tested against each segment's text index before the segment is
    /// fetched; `None` without a text or with one too short to have a trigram.
    text_query: Option<TextQuery>,
}

impl SearchFilter {
    fn new(level: Option<LogLevel>, start: Option<Timestamp>, end: Option<Timestamp>, text: Option<&str>) -> SearchFilter {
        let text = text.filter(|text| !text.is_empty()).map(str::to_lowercase);
        let mut needles = Vec::new();
        if let Some(text) = &text
            && text.bytes().all(|b| b.is_ascii() && !b.is_ascii_control() && b != b'"' && b != b'\\')
        {
            needles.push(text.as_bytes().to_vec());
        }
        if let Some(level) = level {
            let name = serde_json::to_string(&level).expect("levels serialize").to_lowercase();
            needles.push(format!("\"level\":{name}").into_bytes());
        }
        let text_query = text.as_deref().and_then(TextQuery::new);
        SearchFilter { level, start, end, text, needles, text_query }
    }

    fn skips_segment(&self, segment: &LogSegment) -> bool {
        self.start.is_some_and(|start| segment.last_timestamp < start)
            || self.end.is_some_and(|end| segment.first_timestamp > end)
            || (self.level == Some(LogLevel::Error) && segment.error_lines == 0)
    }

    fn keeps(&self, line: &LogLine) -> bool {
        self.level.is_none_or(|level| line.level == level)
            && self.start.is_none_or(|start| line.timestamp >= start)
            && self.end.is_none_or(|end| line.timestamp <= end)
            && self.text.as_ref().is_none_or(|text| line.message.to_lowercase().contains(text.as_str()))
    }
}

/// The matching lines of one stored segment, as (index in the segment, line), from the last.
/// The segment is decompressed once; with needles, only lines holding all of them are parsed.
fn search_segment(bytes: &[u8], filter: &SearchFilter, before_line: Option<u64>) -> Result<Vec<(u64, LogLine)>, String> {
    let jsonl = zstd::decode_all(bytes).map_err(|e| format!("log segment is not zstd: {e}"))?;
    let lowered = if filter.needles.is_empty() {
        None
    } else {
        let mut lowered = jsonl.clone();
        lowered.make_ascii_lowercase();
        Some(lowered)
    };
    // Line boundaries, then the lines (newest first) that may match.
    let mut starts = vec![0usize];
    starts.extend(memchr::memchr_iter(b'\n', &jsonl).map(|at| at + 1));
    let line_count = starts.len() - 1 + usize::from(starts.last().is_some_and(|&last| last < jsonl.len()));
    let candidates: Vec<usize> = match &lowered {
        None => (0..line_count).collect(),
        Some(lowered) => {
            // Lines holding the first needle (the rarest, the text, comes first), then the others.
            let finder = memchr::memmem::Finder::new(&filter.needles[0]);
            let mut lines: Vec<usize> = Vec::new();
            for at in finder.find_iter(lowered) {
                let line = starts.partition_point(|&start| start <= at) - 1;
                if lines.last() != Some(&line) {
                    lines.push(line);
                }
            }
            let span = |line: usize| &lowered[starts[line]..starts.get(line + 1).copied().unwrap_or(lowered.len())];
            lines.retain(|&line| filter.needles[1..].iter().all(|needle| memchr::memmem::find(span(line), needle).is_some()));
            lines
        }
    };
    let mut found = Vec::new();
    for &index in candidates.iter().rev() {
        if before_line.is_some_and(|before| index as u64 >= before) {
            continue;
        }
        let end = starts.get(index + 1).copied().unwrap_or(jsonl.len());
        let raw = &jsonl[starts[index]..end];
        let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
        if raw.is_empty() {
            continue;
        }
        let line: LogLine = serde_json::from_slice(raw).map_err(|e| format!("bad log line: {e}"))?;
        if filter.keeps(&line) {
            found.push((index as u64, line));
        }
    }
    Ok(found)
}

/// Segments fetched and searched at once (on the blocking pool), ahead of the one being read.
const SEARCH_READ_AHEAD: usize = 4;

/// Search logs with filters (e.g. error logs) and free text, across all runs, newest first, a
/// page at a time: it stops reading as soon as the page is full.
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
    let limit = match query.limit {
        None => 100,
        Some(limit) if (1..=10_000).contains(&limit) => limit,
        Some(_) => return Err(ApiError::invalid_field("limit", "limit must be between 1 and 10000")),
    };
    let cursor = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(text) => Some(SearchCursor::parse(text).ok_or_else(|| {
            ApiError::invalid_field("cursor", "cursor must be the next_cursor of a previous page (<deployment>.<job>.<sequence>.<line>)")
        })?),
    };
    let empty = LogSearchResult { matches: Vec::new(), truncated: false, next_cursor: None };
    if let (Some(start), Some(end)) = (start, end)
        && start > end
    {
        // An empty range: nothing can match, which is an answer rather than an error.
        return Ok(Json(empty));
    }
    let filter = Arc::new(SearchFilter::new(level, start, end, query.q.as_deref()));
    state.node.read_barrier().await?;
    let view = state.node.state();
    // Deployments newest first (ids only grow), from the cursor's on.
    let mut deployment_ids: Vec<u64> = match pipeline_id {
        Some(pipeline_id) => index_ids(&view, index::DEPLOYMENTS_BY_PIPELINE, &pipeline_id.to_string())?,
        None => state
            .node
            .backend
            .scan(Table::Deployments, crate::store::full_range(), usize::MAX, false)?
            .into_iter()
            .filter_map(|(key, _)| crate::state::codec::key_id(&key))
            .collect(),
    };
    deployment_ids.sort_unstable_by(|a, b| b.cmp(a));
    if let Some(cursor) = cursor {
        deployment_ids.retain(|&id| id <= cursor.deployment_id);
    }
    let mut matches = Vec::new();
    for deployment_id in deployment_ids {
        let Some(deployment) = load_id::<Deployment>(&view, Table::Deployments, deployment_id)? else { continue };
        // A deployment that ended before the range, or began after it, has no line in it.
        if start.is_some_and(|start| deployment.status.is_final() && deployment.updated_at < start)
            || end.is_some_and(|end| deployment.created_at > end)
        {
            continue;
        }
        let mut segments = segments_of(&state.node, deployment_id, None)?;
        newest_first(&mut segments);
        let mut from_line = None;
        if let Some(cursor) = cursor.filter(|cursor| cursor.deployment_id == deployment_id) {
            // Resume after the cursor's line: the rest of its segment, then the segments after it.
            match segments.iter().position(|segment| segment.job_id == cursor.job_id && segment.sequence == cursor.sequence) {
                Some(position) => {
                    segments.drain(..position);
                    from_line = Some(cursor.line);
                }
                None => continue,
            }
        }
        segments.retain(|segment| !filter.skips_segment(segment));
        // Fetch and search a few segments ahead, in order; with a text, first the segment's text
        // index alone (segments written before the index have none, and are read).
        let reads = segments.into_iter().enumerate().map(|(position, segment)| {
            let (blobs, filter) = (state.blobs.clone(), filter.clone());
            let before = if position == 0 { from_line } else { None };
            async move {
                if let Some(query) = &filter.text_query
                    && read_text_index(blobs.as_ref(), &segment).await?.is_some_and(|index| !index.may_contain(query))
                {
                    return Ok((segment, Vec::new()));
                }
                let bytes = blobs
                    .get(&segment.blob_key)
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))?
                    .ok_or_else(|| missing_segment(&segment))?;
                let found = tokio::task::spawn_blocking(move || search_segment(&bytes, &filter, before))
                    .await
                    .map_err(|e| ApiError::internal(format!("searching a log segment failed: {e}")))?
                    .map_err(ApiError::internal)?;
                Ok::<_, ApiError>((segment, found))
            }
        });
        let mut reads = futures::stream::iter(reads).buffered(SEARCH_READ_AHEAD);
        while let Some(read) = futures::StreamExt::next(&mut reads).await {
            let (segment, found) = read?;
            for (index, line) in found {
                matches.push(LogMatch { deployment_id, pipeline_id: deployment.pipeline_id, line });
                if matches.len() == limit {
                    // The page is full: stop reading; the next page starts after this line.
                    let next = SearchCursor { deployment_id, job_id: segment.job_id, sequence: segment.sequence, line: index };
                    return Ok(Json(LogSearchResult { matches, truncated: true, next_cursor: Some(next.render()) }));
                }
            }
        }
    }
    Ok(Json(LogSearchResult { matches, truncated: false, next_cursor: None }))
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
    fn search_cursors_round_trip() {
        let cursor = SearchCursor { deployment_id: 12, job_id: 0, sequence: 4_294_967_297, line: 7 };
        assert_eq!(SearchCursor::parse(&cursor.render()), Some(cursor));
        for bad in ["", "1.2.3", "1.2.3.4.5", "a.2.3.4", "1.2.3.-4", "12345678901234567890.1.1.1"] {
            assert_eq!(SearchCursor::parse(bad), None, "{bad:?}");
        }
    }

    /// A stored segment searched from its last line: the text (any case) and the level
    /// prefilter the JSON bytes, only candidates are parsed, and a line in another field or
    /// another case of a non-ASCII text is judged on the parsed message.
    #[test]
    fn segments_are_searched_newest_first_on_their_bytes() {
        let line = |timestamp, level, message: &str| LogLine { timestamp, level, job_id: 3, message: message.into(), step: Some(1) };
        let lines = vec![
            line(1, LogLevel::Info, "compiling Davit"),
            line(2, LogLevel::Error, "ERROR: disk full on DAVIT host"),
            line(3, LogLevel::Info, "level says error but this is info"),
            line(4, LogLevel::Error, "Größe überschritten"),
            line(5, LogLevel::Info, "davit done"),
        ];
        let bytes = crate::log_segments::encode_segment(&lines);
        let search = |level, text: Option<&str>, before| {
            let filter = SearchFilter::new(level, None, None, text);
            search_segment(&bytes, &filter, before).unwrap().into_iter().map(|(index, line)| (index, line.timestamp)).collect::<Vec<_>>()
        };
        assert_eq!(search(None, Some("davit"), None), vec![(4, 5), (1, 2), (0, 1)]);
        assert_eq!(search(Some(LogLevel::Error), Some("davit"), None), vec![(1, 2)]);
        assert_eq!(search(Some(LogLevel::Error), None, None), vec![(3, 4), (1, 2)]);
        assert_eq!(search(None, Some("GRÖSSE"), None), vec![], "to_lowercase does not fold ß into ss");
        assert_eq!(search(None, Some("ÜBER"), None), vec![(3, 4)]);
        assert_eq!(search(None, Some("\"level\""), None), vec![], "field names are not message text");
        assert_eq!(search(None, None, Some(2)), vec![(1, 2), (0, 1)], "a cursor resumes before its line");
    }

    /// The deployments, pipeline and store of a node whose logs a test searches in-process.
    struct SearchedNode {
        state: AppState,
        _dir: tempfile::TempDir,
    }

    impl SearchedNode {
        async fn start() -> SearchedNode {
            let dir = tempfile::tempdir().unwrap();
            let node = crate::node::testing::single_leader(&dir.path().join("data"), "").await;
            let blobs: Arc<dyn BlobStore> = Arc::new(crate::blob_store::DirBlobStore::open(&dir.path().join("blobs")).unwrap());
            let secrets = crate::secrets::MasterKeys::parse(&crate::secrets::MasterKeys::generate_file_text("test")).unwrap();
            let state = AppState {
                node,
                prometheus: crate::observability::prometheus(),
                secrets: Arc::new(secrets),
                blobs,
                outbound: Arc::new(crate::outbound::OutboundPolicy::new(&Default::default()).unwrap()),
                release_usage: Default::default(),
            };
            SearchedNode { state, _dir: dir }
        }

        /// Propose `command`, which must apply; the id it created, if any.
        async fn propose(&self, command: crate::state::Command) -> Option<u64> {
            let (outcome, _) = self.state.node.propose(&crate::node::Requester::system(), command).await.unwrap();
            outcome.result.unwrap().id
        }

        /// Every match of a search, newest first, read page by page through the handler.
        async fn search(&self, query: &str, level: Option<&str>, limit: usize) -> Vec<(u64, LogLine)> {
            let caller = Caller { user_id: 1, username: "viewer".into(), role: crate::state::records::Role::Viewer, source: None };
            let (mut found, mut cursor) = (Vec::new(), None);
            loop {
                let query = LogSearchQuery {
                    pipeline_id: None,
                    log_level: level.map(str::to_string),
                    start_time: None,
                    end_time: None,
                    q: Some(query.to_string()),
                    limit: Some(limit),
                    cursor: cursor.take(),
                };
                let Json(page) = search_logs(State(self.state.clone()), caller.clone(), Query(query)).await.unwrap();
                found.extend(page.matches.into_iter().map(|found| (found.deployment_id, found.line)));
                match page.next_cursor {
                    Some(next) => cursor = Some(next),
                    None => return found,
                }
            }
        }

        /// What reading every segment whole, index or not, answers: the reference.
        async fn scan(&self, query: &str, level: Option<LogLevel>) -> Vec<(u64, LogLine)> {
            let filter = SearchFilter::new(level, None, None, Some(query));
            let mut found = Vec::new();
            for deployment_id in (1..=4).rev() {
                let mut segments = segments_of(&self.state.node, deployment_id, None).unwrap();
                newest_first(&mut segments);
                for segment in segments {
                    let lines = read_segment(self.state.blobs.as_ref(), &segment).await.unwrap();
                    found.extend(lines.into_iter().rev().filter(|line| filter.keeps(line)).map(|line| (deployment_id, line)));
                }
            }
            found
        }
    }

    /// A rare text in the oldest deployment is found through the newer deployments' segments,
    /// which their text indexes skip unread (their blobs are gone by the end, so reading one
    /// would fail the search), and through segments recorded before the index existed, which
    /// are read; every search answers what reading every segment whole answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn text_indexes_skip_segments_without_changing_any_answer() {
        use crate::state::Command;
        let test = SearchedNode::start().await;
        let deployment_ids = crate::node::testing::deployments_of_a_new_pipeline(&test.state.node, 4).await;
        assert_eq!(deployment_ids, vec![1, 2, 3, 4], "the reference scan reads deployments 1 to 4");
        let rare = "checksum mismatch in vendored blob 7f3a9c";
        let line = |timestamp: i64, level, message: String| LogLine { timestamp, level, job_id: 1, message, step: Some(0) };
        let ordinary = |deployment: i64, segment: i64| -> Vec<LogLine> {
            (0..40)
                .map(|index| {
                    let timestamp = deployment * 1_000_000 + segment * 1000 + index;
                    match index % 4 {
                        0 => line(timestamp, LogLevel::Info, format!("   Compiling serde v1.0.{index} (segment {segment})")),
                        1 => line(timestamp, LogLevel::Warning, format!("warning: unused variable `value_{index}`")),
                        2 => line(timestamp, LogLevel::Error, format!("error[E0308]: mismatched types in deployment {deployment}")),
                        _ => line(timestamp, LogLevel::Info, format!("Größe der Datei {index}: ΟΔΟΣ ok")),
                    }
                })
                .collect()
        };
        let (node, blobs) = (test.state.node.clone(), test.state.blobs.clone());
        // Deployment 1, the oldest: indexed segments, the rare text in the second of three.
        for segment in 0..3 {
            let mut lines = ordinary(1, segment);
            if segment == 1 {
                lines.insert(7, line(1_001_006, LogLevel::Error, format!("error: {rare} (attempt 1)")));
            }
            crate::log_segments::append(&node, blobs.as_ref(), 1, 1, lines).await.unwrap();
        }
        // Deployment 2: stored by a version before the index (the blob is only the zstd frame of
        // its JSON lines), the rare text in another case in its first segment.
        for sequence in 1..=2 {
            let mut lines = ordinary(2, sequence as i64);
            if sequence == 1 {
                lines.push(line(2_001_100, LogLevel::Info, format!("note: {} elsewhere", rare.to_uppercase())));
            }
            let jsonl: Vec<u8> = lines.iter().flat_map(|line| [serde_json::to_vec(line).unwrap(), b"\n".to_vec()].concat()).collect();
            let stored_before = zstd::encode_all(jsonl.as_slice(), 1).unwrap();
            let blob_key = crate::log_segments::segment_blob_key(2, 1, sequence);
            let encoded = crate::log_segments::EncodedSegment::new(&lines);
            test.propose(Command::RecordLogSegment {
                deployment_id: 2,
                job_id: 1,
                sequence,
                blob_key: blob_key.clone(),
                bytes: stored_before.len() as u64,
                lines: encoded.lines,
                error_lines: encoded.error_lines,
                first_timestamp: encoded.first_timestamp,
                last_timestamp: encoded.last_timestamp,
            })
            .await;
            blobs.put(&blob_key, stored_before).await.unwrap();
        }
        // Deployments 3 and 4, the newest: indexed segments without the rare text.
        for deployment in 3..=4 {
            for segment in 0..4 {
                crate::log_segments::append(&node, blobs.as_ref(), deployment, 1, ordinary(deployment as i64, segment)).await.unwrap();
            }
        }
        for (deployment_id, indexed) in [(1, true), (2, false), (3, true), (4, true)] {
            for segment in segments_of(&node, deployment_id, None).unwrap() {
                assert_eq!(read_text_index(blobs.as_ref(), &segment).await.unwrap().is_some(), indexed, "{}", segment.blob_key);
            }
        }

        let searches: [(&str, Option<LogLevel>); 9] = [
            (rare, None),
            ("CHECKSUM Mismatch", None),
            ("mismatch", Some(LogLevel::Error)),
            ("größe der", None),
            ("ΟΔΟΣ OK", None),
            ("οδος", Some(LogLevel::Info)),
            ("ok", None),
            ("7", None),
            ("not in any log", None),
        ];
        for (text, level) in searches {
            let expected = test.scan(text, level).await;
            let level_name = level.map(|level| serde_json::to_value(level).unwrap().as_str().unwrap().to_string());
            for limit in [1000, 7] {
                assert_eq!(test.search(text, level_name.as_deref(), limit).await, expected, "{text:?} {level:?}, pages of {limit}");
            }
        }
        let rare_matches = test.scan(rare, None).await;
        assert_eq!(rare_matches.iter().map(|(deployment, _)| *deployment).collect::<Vec<_>>(), vec![2, 1]);

        // With every indexed segment that lacks the rare text cut down to its index (the lines
        // replaced by bytes that are not zstd), the search for it still answers the same: those
        // segments are skipped after reading only their index.
        for deployment_id in [1, 3, 4] {
            for segment in segments_of(&node, deployment_id, None).unwrap() {
                let lines = read_segment(blobs.as_ref(), &segment).await.unwrap();
                if !lines.iter().any(|line| line.message.contains(rare)) {
                    let blob = blobs.get(&segment.blob_key).await.unwrap().unwrap();
                    let index_length =
                        crate::log_text_index::FRAME_HEADER_BYTES + u32::from_le_bytes(blob[4..8].try_into().unwrap()) as usize;
                    blobs.put(&segment.blob_key, [&blob[..index_length], b"not zstd"].concat()).await.unwrap();
                    assert!(read_segment(blobs.as_ref(), &segment).await.is_err());
                }
            }
        }
        assert_eq!(test.search(rare, None, 1).await, rare_matches);
        assert_eq!(test.search("Vendored BLOB", None, 50).await, rare_matches);
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
