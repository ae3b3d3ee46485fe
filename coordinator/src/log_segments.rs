//! Deployment logs: lines are stored in the blob store as zstd-compressed JSON-lines segments
//! (`logs/<deployment>/<job>/<sequence>.jsonl.zst`); Raft records only each segment's metadata
//! (`RecordLogSegment`). Job 0 holds the coordinator's own lines about a deployment.

use serde::{Deserialize, Serialize};

use crate::api_error::ApiError;
use crate::blob_store::BlobStore;
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

pub fn segment_blob_key(deployment_id: u64, job_id: u64, sequence: u64) -> String {
    format!("logs/{deployment_id}/{job_id}/{sequence:012}.jsonl.zst")
}

pub fn encode_segment(lines: &[LogLine]) -> Vec<u8> {
    let mut jsonl = Vec::new();
    for line in lines {
        serde_json::to_writer(&mut jsonl, line).expect("log lines serialize");
        jsonl.push(b'\n');
    }
    zstd::encode_all(jsonl.as_slice(), 3).expect("zstd compression of memory does not fail")
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

pub async fn read_segment(blobs: &dyn BlobStore, segment: &LogSegment) -> Result<Vec<LogLine>, ApiError> {
    let bytes = blobs
        .get(&segment.blob_key)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| ApiError::internal(format!("log segment {} is recorded but missing from the blob store", segment.blob_key)))?;
    decode_segment(&bytes).map_err(ApiError::internal)
}

/// Store `lines` as the next segment of `(deployment_id, job_id)`: bytes to the blob store
/// first, then the metadata through Raft. Retries with the next sequence if another writer took
/// this one.
pub async fn append(node: &Node, blobs: &dyn BlobStore, deployment_id: u64, job_id: u64, lines: Vec<LogLine>) -> Result<(), ApiError> {
    if lines.is_empty() {
        return Ok(());
    }
    let encoded = encode_segment(&lines);
    for _ in 0..5 {
        let last = node.backend.scan(Table::Logs, prefix_range(&[id_key(deployment_id), id_key(job_id)].concat()), 1, true)?;
        let sequence = match last.first() {
            Some((key, _)) => u64::from_be_bytes(key[16..24].try_into().expect("log keys are 24 bytes")) + 1,
            None => 1,
        };
        debug_assert_eq!(log_segment_key(deployment_id, job_id, sequence).len(), 24);
        let blob_key = segment_blob_key(deployment_id, job_id, sequence);
        blobs.put(&blob_key, encoded.clone()).await.map_err(|e| ApiError::internal(e.to_string()))?;
        let command = segment_command(deployment_id, job_id, sequence, blob_key, encoded.len() as u64, &lines);
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

/// Store an agent's log chunk as the segment `sequence` (see [`chunk_sequence`]): the bytes to
/// the blob store, then the metadata through Raft. Storing the same chunk again (an agent
/// resending after a lost acknowledgement) changes nothing.
pub async fn store_chunk(
    node: &Node,
    blobs: &dyn BlobStore,
    deployment_id: u64,
    job_id: u64,
    sequence: u64,
    lines: &[LogLine],
) -> Result<(), ApiError> {
    if segment_exists(node, deployment_id, job_id, sequence)? {
        return Ok(());
    }
    let encoded = encode_segment(lines);
    let blob_key = segment_blob_key(deployment_id, job_id, sequence);
    blobs.put(&blob_key, encoded.clone()).await.map_err(|e| ApiError::internal(e.to_string()))?;
    let command = segment_command(deployment_id, job_id, sequence, blob_key, encoded.len() as u64, lines);
    let (outcome, _) = node.propose(&Requester::system(), command).await?;
    match outcome.result {
        Ok(_) => Ok(()),
        // Recorded meanwhile by an earlier delivery of the same chunk.
        Err(rejection) if rejection.code == crate::state::RejectionCode::Conflict => Ok(()),
        Err(rejection) => Err(rejection.into()),
    }
}

fn segment_command(deployment_id: u64, job_id: u64, sequence: u64, blob_key: String, bytes: u64, lines: &[LogLine]) -> Command {
    Command::RecordLogSegment {
        deployment_id,
        job_id,
        sequence,
        blob_key,
        bytes,
        lines: lines.len() as u64,
        error_lines: lines.iter().filter(|line| line.level == LogLevel::Error).count() as u64,
        first_timestamp: lines.iter().map(|line| line.timestamp).min().unwrap_or(0),
        last_timestamp: lines.iter().map(|line| line.timestamp).max().unwrap_or(0),
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
}
