//! Deployment logs: lines are stored in the blob store as zstd-compressed JSON-lines segments
//! (see [`segment_blob_key`]); Raft records only each segment's metadata (`RecordLogSegment`,
//! which holds the blob key, so readers never derive it). Job 0 holds the coordinator's own
//! lines about a deployment. Each segment's blob starts with an index of its text
//! ([`LogTextIndex`], in a zstd skippable frame), built with the encoding, that lets a search
//! skip the segment after reading only that.

use serde::{Deserialize, Serialize};

use crate::api_error::ApiError;
use crate::blob_store::BlobStore;
use crate::log_text_index::{FRAME_HEADER_BYTES, LogTextIndex};
use crate::node::{Node, Requester};
use crate::state::Command;
use crate::state::apply::log_segment_key;
use crate::state::codec::{decode, id_key};
use crate::state::records::{LogSegment, Timestamp};
use crate::store::{Table, prefix_range};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
}

impl std::str::FromStr for LogLevel {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_uppercase().as_str() {
            "DEBUG" => Ok(LogLevel::Debug),
            "INFO" => Ok(LogLevel::Info),
            "WARNING" | "WARN" => Ok(LogLevel::Warning),
            "ERROR" => Ok(LogLevel::Error),
            _ => Err(format!("log level {text:?} must be one of INFO, WARNING, ERROR, DEBUG")),
        }
    }
}

/// One log line as stored and as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LogLine {
    /// Milliseconds since the Unix epoch.
    pub timestamp: Timestamp,
    pub level: LogLevel,
    pub job_id: u64,
    pub message: String,
    /// The step of the job that printed the line (its index in the job's steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
}

/// Deployments whose segments share one directory of the blob store.
const DEPLOYMENTS_PER_DIRECTORY: u64 = 1000;

/// `logs/<deployment / 1000>/<deployment>-<job>-<sequence>.jsonl.zst`. Every deployment gets
/// its first line (the coordinator's "created") at once; a directory per deployment and job
/// cost two directory creations per deployment, which measured as 15% of the coordinator's CPU
/// at 500 deployments/s (`benches/` dispatch). Segments recorded with the earlier layout
/// (`logs/<deployment>/<job>/<sequence>.jsonl.zst`) keep their keys in their metadata.
pub fn segment_blob_key(deployment_id: u64, job_id: u64, sequence: u64) -> String {
    format!("logs/{:06}/{deployment_id}-{job_id}-{sequence:012}.jsonl.zst", deployment_id / DEPLOYMENTS_PER_DIRECTORY)
}

/// zstd level of stored segments. Level 1 compresses build logs (as JSON lines) as well as
/// level 3 does (9.0x against 8.9x on the benchmark corpus) at twice the speed (536 against 243
/// MB/s on one core of the benchmark machine); compression was the largest cost of log ingest.
const SEGMENT_ZSTD_LEVEL: i32 = 1;

thread_local! {
    /// One compression context per thread: creating one per segment (`zstd::encode_all`)
    /// allocates and initializes about a megabyte of tables, which dominated small segments.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
}

/// A segment's blob: the text index of its messages (a zstd skippable frame), then its lines
/// as zstd-compressed JSON lines.
pub fn encode_segment(lines: &[LogLine]) -> Vec<u8> {
    let mut jsonl = Vec::with_capacity(lines.iter().map(|line| line.message.len() + 64).sum());
    for line in lines {
        serde_json::to_writer(&mut jsonl, line).expect("log lines serialize");
        jsonl.push(b'\n');
    }
    let mut blob = LogTextIndex::build(lines.iter().map(|line| line.message.as_str())).to_frame();
    COMPRESSOR.with(|compressor| {
        let mut compressor = compressor.borrow_mut();
        if compressor.is_none() {
            *compressor = Some(zstd::bulk::Compressor::new(SEGMENT_ZSTD_LEVEL).expect("a zstd context can be created"));
        }
        let compressed = compressor.as_mut().expect("just set").compress(&jsonl).expect("zstd compression of memory does not fail");
        blob.extend_from_slice(&compressed);
    });
    blob
}

pub fn decode_segment(bytes: &[u8]) -> Result<Vec<LogLine>, String> {
    let jsonl = zstd::decode_all(bytes).map_err(|e| format!("log segment is not zstd: {e}"))?;
    jsonl
        .split(|byte| *byte == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).map_err(|e| format!("bad log line: {e}")))
        .collect()
}

/// Segments of a deployment (optionally of one job), in order.
pub fn segments_of(node: &Node, deployment_id: u64, job_id: Option<u64>) -> Result<Vec<LogSegment>, ApiError> {
    let mut prefix = id_key(deployment_id).to_vec();
    if let Some(job_id) = job_id {
        prefix.extend_from_slice(&id_key(job_id));
    }
    node.backend
        .scan(Table::Logs, prefix_range(&prefix), usize::MAX, false)?
        .into_iter()
        .map(|(_, bytes)| decode(Table::Logs, &bytes).map_err(ApiError::from))
        .collect()
}

/// The text index at the start of a segment's blob, reading only it; `None` for a segment
/// written before the index existed (or with an index of a format this version does not know).
pub async fn read_text_index(blobs: &dyn BlobStore, segment: &LogSegment) -> Result<Option<LogTextIndex>, ApiError> {
    use tokio::io::AsyncReadExt as _;
    let reader = blobs.open(&segment.blob_key, 0).await.map_err(|e| ApiError::internal(e.to_string()))?;
    let Some(mut blob) = reader else { return Err(missing_segment(segment)) };
    let mut header = [0u8; FRAME_HEADER_BYTES];
    if blob.total_len < FRAME_HEADER_BYTES as u64 {
        return Ok(None);
    }
    blob.reader.read_exact(&mut header).await.map_err(|e| ApiError::internal(format!("reading {}: {e}", segment.blob_key)))?;
    let Some(length) = LogTextIndex::frame_content_length(&header) else { return Ok(None) };
    let mut content = vec![0u8; length];
    blob.reader.read_exact(&mut content).await.map_err(|e| ApiError::internal(format!("reading {}: {e}", segment.blob_key)))?;
    Ok(LogTextIndex::from_frame_content(&content))
}

pub fn missing_segment(segment: &LogSegment) -> ApiError {
    ApiError::internal(format!("log segment {} is recorded but missing from the blob store", segment.blob_key))
}

pub async fn read_segment(blobs: &dyn BlobStore, segment: &LogSegment) -> Result<Vec<LogLine>, ApiError> {
    let bytes =
        blobs.get(&segment.blob_key).await.map_err(|e| ApiError::internal(e.to_string()))?.ok_or_else(|| missing_segment(segment))?;
    decode_segment(&bytes).map_err(ApiError::internal)
}

/// Store `lines` as the next segment of `(deployment_id, job_id)`: bytes to the blob store
/// first, then the metadata through Raft. Retries with the next sequence if another writer took
/// this one.
pub async fn append(node: &Node, blobs: &dyn BlobStore, deployment_id: u64, job_id: u64, lines: Vec<LogLine>) -> Result<(), ApiError> {
    if lines.is_empty() {
        return Ok(());
    }
    let segment = EncodedSegment::new(&lines);
    for _ in 0..5 {
        let last = node.backend.scan(Table::Logs, prefix_range(&[id_key(deployment_id), id_key(job_id)].concat()), 1, true)?;
        let sequence = match last.first() {
            Some((key, _)) => u64::from_be_bytes(key[16..24].try_into().expect("log keys are 24 bytes")) + 1,
            None => 1,
        };
        debug_assert_eq!(log_segment_key(deployment_id, job_id, sequence).len(), 24);
        let blob_key = segment_blob_key(deployment_id, job_id, sequence);
        blobs.put(&blob_key, segment.bytes.clone()).await.map_err(|e| ApiError::internal(e.to_string()))?;
        let command = segment_command(deployment_id, job_id, sequence, blob_key, &segment);
        let (outcome, _) = node.propose(&Requester::system(), command).await?;
        match outcome.result {
            Ok(_) => return Ok(()),
            Err(rejection) if rejection.code == crate::state::RejectionCode::Conflict => continue,
            Err(rejection) => return Err(rejection.into()),
        }
    }
    Err(ApiError::internal(format!("could not append a log segment to deployment {deployment_id} after 5 tries")))
}

/// The segment sequence of an agent's log chunk: the attempt in the high half, so a job's
/// segments read attempt by attempt, chunk by chunk.
pub fn chunk_sequence(attempt: u32, chunk: u64) -> u64 {
    (u64::from(attempt) << 32) | (chunk & 0xffff_ffff)
}

/// Whether the segment is already recorded.
pub fn segment_exists(node: &Node, deployment_id: u64, job_id: u64, sequence: u64) -> Result<bool, ApiError> {
    Ok(node.backend.get(Table::Logs, &log_segment_key(deployment_id, job_id, sequence))?.is_some())
}

/// How many chunks of `attempt` are stored.
pub fn stored_chunks(node: &Node, deployment_id: u64, job_id: u64, attempt: u32) -> Result<u64, ApiError> {
    let mut prefix = [id_key(deployment_id), id_key(job_id)].concat();
    prefix.extend_from_slice(&attempt.to_be_bytes());
    Ok(node.backend.scan(Table::Logs, prefix_range(&prefix), usize::MAX, false)?.len() as u64)
}

/// A segment ready to store: its compressed bytes and what its metadata says of its lines.
/// Encoding is CPU work (a few milliseconds for 512 KiB of text), so callers on the async
/// runtime do it on the blocking pool and store the result.
pub struct EncodedSegment {
    pub bytes: Vec<u8>,
    pub lines: u64,
    pub error_lines: u64,
    pub first_timestamp: Timestamp,
    pub last_timestamp: Timestamp,
}

impl EncodedSegment {
    pub fn new(lines: &[LogLine]) -> Self {
        EncodedSegment {
            bytes: encode_segment(lines),
            lines: lines.len() as u64,
            error_lines: lines.iter().filter(|line| line.level == LogLevel::Error).count() as u64,
            first_timestamp: lines.iter().map(|line| line.timestamp).min().unwrap_or(0),
            last_timestamp: lines.iter().map(|line| line.timestamp).max().unwrap_or(0),
        }
    }
}

/// Run CPU-bound work of log ingest (checksums, encoding) on the blocking pool, at most one job
/// per core at a time. On the runtime's workers it would stall sessions and Raft for
/// milliseconds; unbounded on the blocking pool, a hundred streams' chunks would be a hundred
/// runnable threads sharing the cores evenly with the Raft log writer and state machine: every
/// write of the node, not only the acknowledgements, would wait (measured with 100 streams on 2
/// cores: mean commit 10-30 ms bounded, 370-450 ms unbounded, for about the same MB/s).
pub async fn run_cpu_bound<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    static SLOTS: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
        tokio::sync::Semaphore::new(std::thread::available_parallelism().map(|cores| cores.get()).unwrap_or(1))
    });
    let _slot = SLOTS.acquire().await.map_err(|e| ApiError::internal(e.to_string()))?;
    tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::internal(format!("log encoding failed: {e}")))
}

/// Store an agent's log chunk, already encoded, as the segment `sequence` (see
/// [`chunk_sequence`]): the bytes to the blob store, then the metadata through Raft. Storing
/// the same chunk again (an agent resending after a lost acknowledgement) changes nothing.
pub async fn store_chunk(
    node: &Node,
    blobs: &dyn BlobStore,
    deployment_id: u64,
    job_id: u64,
    sequence: u64,
    segment: EncodedSegment,
) -> Result<(), ApiError> {
    if segment_exists(node, deployment_id, job_id, sequence)? {
        return Ok(());
    }
    let blob_key = segment_blob_key(deployment_id, job_id, sequence);
    let command = segment_command(deployment_id, job_id, sequence, blob_key.clone(), &segment);
    blobs.put(&blob_key, segment.bytes).await.map_err(|e| ApiError::internal(e.to_string()))?;
    let (outcome, _) = node.propose(&Requester::system(), command).await?;
    match outcome.result {
        Ok(_) => Ok(()),
        // Recorded meanwhile by an earlier delivery of the same chunk.
        Err(rejection) if rejection.code == crate::state::RejectionCode::Conflict => Ok(()),
        Err(rejection) => Err(rejection.into()),
    }
}

fn segment_command(deployment_id: u64, job_id: u64, sequence: u64, blob_key: String, segment: &EncodedSegment) -> Command {
    Command::RecordLogSegment {
        deployment_id,
        job_id,
        sequence,
        blob_key,
        bytes: segment.bytes.len() as u64,
        lines: segment.lines,
        error_lines: segment.error_lines,
        first_timestamp: segment.first_timestamp,
        last_timestamp: segment.last_timestamp,
    }
}

/// One line from the coordinator itself about a deployment.
pub async fn system_line(node: &Node, blobs: &dyn BlobStore, deployment_id: u64, level: LogLevel, message: String) {
    let line = LogLine { timestamp: crate::auth::now_millis(), level, job_id: 0, message, step: None };
    if let Err(error) = append(node, blobs, deployment_id, 0, vec![line]).await {
        tracing::warn!(deployment_id, error = %error.message, "could not record a deployment log line");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_round_trip() {
        let lines = vec![
            LogLine { timestamp: 1, level: LogLevel::Info, job_id: 3, message: "building".into(), step: Some(1) },
            LogLine { timestamp: 2, level: LogLevel::Error, job_id: 3, message: "failed: {\"x\"}\nnext".into(), step: None },
        ];
        assert_eq!(decode_segment(&encode_segment(&lines)).unwrap(), lines);
        assert_eq!("warn".parse::<LogLevel>().unwrap(), LogLevel::Warning);
        assert!("loud".parse::<LogLevel>().is_err());
    }

    #[test]
    fn segments_written_before_the_shared_compressor_still_read() {
        let lines = vec![LogLine { timestamp: 7, level: LogLevel::Warning, job_id: 2, message: "slow step".into(), step: Some(0) }];
        let mut jsonl = serde_json::to_vec(&lines[0]).unwrap();
        jsonl.push(b'\n');
        let stored_earlier = zstd::encode_all(jsonl.as_slice(), 3).unwrap();
        assert_eq!(decode_segment(&stored_earlier).unwrap(), lines);
        // Many segments through the one context of this thread stay independent.
        for count in [1, 50, 3] {
            let lines: Vec<LogLine> = (0..count).map(|index| LogLine { timestamp: index, ..lines[0].clone() }).collect();
            assert_eq!(decode_segment(&encode_segment(&lines)).unwrap(), lines);
        }
    }

    /// A segment's blob starts with its text index, which any zstd decoder skips (so a
    /// coordinator that predates the index reads it); a blob written before the index has none.
    #[tokio::test]
    async fn blobs_start_with_a_text_index_that_zstd_skips() {
        let lines = vec![LogLine { timestamp: 7, level: LogLevel::Error, job_id: 2, message: "Disk FULL on runner".into(), step: Some(0) }];
        let blob = encode_segment(&lines);
        let mut jsonl = serde_json::to_vec(&lines[0]).unwrap();
        jsonl.push(b'\n');
        assert_eq!(zstd::decode_all(blob.as_slice()).unwrap(), jsonl, "the index frame is skipped");
        assert_eq!(decode_segment(&blob).unwrap(), lines);

        let directory = tempfile::tempdir().unwrap();
        let blobs = crate::blob_store::DirBlobStore::open(directory.path()).unwrap();
        let segment = |blob_key: &str| LogSegment {
            deployment_id: 1,
            job_id: 2,
            sequence: 1,
            blob_key: blob_key.into(),
            bytes: 0,
            lines: 1,
            error_lines: 1,
            first_timestamp: 7,
            last_timestamp: 7,
        };
        blobs.put("logs/indexed", blob).await.unwrap();
        blobs.put("logs/before-the-index", zstd::encode_all(jsonl.as_slice(), 1).unwrap()).await.unwrap();
        blobs.put("logs/empty", Vec::new()).await.unwrap();
        let index = read_text_index(&blobs, &segment("logs/indexed")).await.unwrap().expect("an index");
        let passes = |text: &str| crate::log_text_index::TextQuery::new(text).is_none_or(|query| index.may_contain(&query));
        assert!(passes("disk full") && !passes("disk empty"));
        assert_eq!(read_text_index(&blobs, &segment("logs/before-the-index")).await.unwrap(), None);
        assert_eq!(read_text_index(&blobs, &segment("logs/empty")).await.unwrap(), None);
        let missing = read_text_index(&blobs, &segment("logs/missing")).await.unwrap_err();
        assert!(missing.message.contains("missing from the blob store"), "{}", missing.message);
    }

    #[test]
    fn blob_keys_group_deployments_in_shared_directories() {
        assert_eq!(segment_blob_key(12_345, 67, chunk_sequence(1, 2)), "logs/000012/12345-67-004294967298.jsonl.zst");
        assert_eq!(segment_blob_key(7, 0, 1), "logs/000000/7-0-000000000001.jsonl.zst");
        let directory = |key: String| key.rsplit_once('/').map(|(directory, _)| directory.to_string()).unwrap();
        assert_eq!(directory(segment_blob_key(1000, 1, 1)), directory(segment_blob_key(1999, 5, 9)));
        assert_ne!(directory(segment_blob_key(999, 1, 1)), directory(segment_blob_key(1000, 1, 1)));
    }
}
