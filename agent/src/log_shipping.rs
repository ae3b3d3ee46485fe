//! Job logs from the executor's raw output to a coordinator's durable store: split into lines,
//! secrets masked and a level detected (before a byte leaves the host), batched into numbered,
//! checksummed chunks, spooled on disk, and shipped over `ShipLogs`. A chunk leaves the spool
//! only when a coordinator acknowledged it as stored; after a reconnect (to any coordinator)
//! everything unacknowledged is sent again, in order, so the stored log has no gap and no
//! duplicate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use davit_proto::agent::{self as pb, LogChunk};
use prost::Message;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::StreamExt;

use crate::client::Coordinator;
use crate::log_levels::{Level, detect_level};
use crate::masking::Masker;

/// A chunk is cut at this many bytes of text, or when output pauses.
pub const CHUNK_BYTES: usize = 512 * 1024;
/// Lines longer than this are split (a line is one stored record).
const MAX_LINE_BYTES: usize = 64 * 1024;
const FLUSH_AFTER: Duration = Duration::from_millis(100);

pub fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn level_of(level: Level) -> i32 {
    match level {
        Level::Debug => pb::LogLevel::Debug as i32,
        Level::Info => pb::LogLevel::Info as i32,
        Level::Warning => pb::LogLevel::Warning as i32,
        Level::Error => pb::LogLevel::Error as i32,
    }
}

/// SHA-256 over each line's text followed by a newline (what the coordinator checks).
pub fn chunk_checksum(lines: &[pb::LogLine]) -> Vec<u8> {
    let mut hasher = Sha256::new();
    for line in lines {
        hasher.update(line.text.as_bytes());
        hasher.update(b"\n");
    }
    hasher.finalize().to_vec()
}

/// Turns raw output into masked, levelled lines.
pub struct LineSplitter {
    partial: Vec<u8>,
    masker: Arc<Masker>,
    step: u32,
}

impl LineSplitter {
    pub fn new(masker: Arc<Masker>, step: u32) -> Self {
        LineSplitter { partial: Vec::new(), masker, step }
    }

    fn line(&self, bytes: &[u8]) -> pb::LogLine {
        let text = String::from_utf8_lossy(bytes);
        let masked = self.masker.mask(&text);
        pb::LogLine { timestamp: now_millis(), level: level_of(detect_level(&masked)), text: masked.into_owned(), step: self.step }
    }

    /// The complete lines in `bytes` (with what was left over before).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<pb::LogLine> {
        self.partial.extend_from_slice(bytes);
        let mut lines = Vec::new();
        let mut start = 0;
        while let Some(position) = self.partial[start..].iter().position(|byte| *byte == b'\n') {
            let end = start + position;
            lines.push(self.line(&self.partial[start..end]));
            start = end + 1;
        }
        self.partial.drain(..start);
        // A line without an end for this long is cut (at a character boundary) so that memory stays bounded.
        while self.partial.len() > MAX_LINE_BYTES {
            let mut cut = MAX_LINE_BYTES;
            while cut > 0 && (self.partial[cut] & 0xC0) == 0x80 {
                cut -= 1;
            }
            let cut = if cut == 0 { MAX_LINE_BYTES } else { cut };
            lines.push(self.line(&self.partial[..cut]));
            self.partial.drain(..cut);
        }
        lines
    }

    /// The last line if the output did not end with a newline.
    pub fn finish(&mut self) -> Option<pb::LogLine> {
        if self.partial.is_empty() {
            return None;
        }
        let line = self.line(&self.partial);
        self.partial.clear();
        Some(line)
    }
}

enum Request {
    Append {
        job_id: u64,
        attempt: u32,
        lines: Vec<pb::LogLine>,
    },
    /// Resolves with the number of chunks once every chunk of the attempt is acknowledged.
    Finish {
        job_id: u64,
        attempt: u32,
        done: oneshot::Sender<Result<u64, String>>,
    },
    /// Forget an attempt (its job was taken away).
    Abandon {
        job_id: u64,
        attempt: u32,
    },
}

#[derive(Clone)]
pub struct LogShipper {
    requests: mpsc::UnboundedSender<Request>,
}

impl LogShipper {
    /// Start the shipper; it follows whichever coordinator the session holds.
    pub fn start(spool_dir: PathBuf, coordinator: watch::Receiver<Option<Coordinator>>) -> std::io::Result<LogShipper> {
        std::fs::create_dir_all(&spool_dir)?;
        let (requests, receiver) = mpsc::unbounded_channel();
        tokio::spawn(ship(spool_dir, coordinator, receiver));
        Ok(LogShipper { requests })
    }

    pub fn append(&self, job_id: u64, attempt: u32, lines: Vec<pb::LogLine>) {
        if !lines.is_empty() {
            let _ = self.requests.send(Request::Append { job_id, attempt, lines });
        }
    }

    /// Wait until every chunk of the attempt is stored; the number of chunks.
    pub async fn finish(&self, job_id: u64, attempt: u32) -> Result<u64, String> {
        let (done, result) = oneshot::channel();
        self.requests.send(Request::Finish { job_id, attempt, done }).map_err(|_| "the log shipper stopped".to_string())?;
        result.await.map_err(|_| "the log shipper stopped".to_string())?
    }

    pub fn abandon(&self, job_id: u64, attempt: u32) {
        let _ = self.requests.send(Request::Abandon { job_id, attempt });
    }

    /// Collect one step's output into chunks until the output channel closes.
    pub async fn collect(&self, job_id: u64, attempt: u32, step: u32, masker: Arc<Masker>, mut output: mpsc::Receiver<Vec<u8>>) {
        let mut splitter = LineSplitter::new(masker, step);
        let mut batch: Vec<pb::LogLine> = Vec::new();
        let mut batch_bytes = 0;
        loop {
            let received = if batch.is_empty() {
                output.recv().await
            } else {
                match tokio::time::timeout(FLUSH_AFTER, output.recv()).await {
                    Ok(received) => received,
                    Err(_) => {
                        self.append(job_id, attempt, std::mem::take(&mut batch));
                        batch_bytes = 0;
                        continue;
                    }
                }
            };
            let Some(bytes) = received else { break };
            for line in splitter.push(&bytes) {
                batch_bytes += line.text.len() + 1;
                batch.push(line);
                if batch_bytes >= CHUNK_BYTES {
                    self.append(job_id, attempt, std::mem::take(&mut batch));
                    batch_bytes = 0;
                }
            }
        }
        batch.extend(splitter.finish());
        self.append(job_id, attempt, batch);
    }
}

/// One attempt's log: chunks numbered from 1, those not yet acknowledged on disk.
struct AttemptLog {
    directory: PathBuf,
    next_sequence: u64,
    acknowledged: u64,
    waiters: Vec<oneshot::Sender<Result<u64, String>>>,
    finishing: bool,
    refused: Option<String>,
}

impl AttemptLog {
    fn chunk_path(&self, sequence: u64) -> PathBuf {
        self.directory.join(format!("{sequence:010}.chunk"))
    }

    fn read_chunk(&self, sequence: u64) -> std::io::Result<LogChunk> {
        let bytes = std::fs::read(self.chunk_path(sequence))?;
        LogChunk::decode(bytes.as_slice()).map_err(std::io::Error::other)
    }

    fn settle(&mut self) {
        let complete = self.acknowledged + 1 == self.next_sequence;
        if let Some(reason) = &self.refused {
            for waiter in self.waiters.drain(..) {
                let _ = waiter.send(Err(reason.clone()));
            }
        } else if self.finishing && complete {
            for waiter in self.waiters.drain(..) {
                let _ = waiter.send(Ok(self.next_sequence - 1));
            }
        }
    }
}

async fn ship(spool_dir: PathBuf, mut coordinator: watch::Receiver<Option<Coordinator>>, mut requests: mpsc::UnboundedReceiver<Request>) {
    let mut logs: BTreeMap<(u64, u32), AttemptLog> = BTreeMap::new();
    loop {
        // Wait for a coordinator, meanwhile spooling what arrives.
        let current = loop {
            if let Some(current) = coordinator.borrow_and_update().clone() {
                break current;
            }
            tokio::select! {
                changed = coordinator.changed() => if changed.is_err() { return },
                request = requests.recv() => match request {
                    Some(request) => handle(&spool_dir, &mut logs, request, None),
                    None => return,
                },
            }
        };
        let (sender, outbound) = mpsc::unbounded_channel::<LogChunk>();
        let stream = current.client().ship_logs(current.authorize(tokio_stream::wrappers::UnboundedReceiverStream::new(outbound))).await;
        let mut acks = match stream {
            Ok(response) => response.into_inner(),
            Err(status) => {
                tracing::warn!(error = %status.message(), "cannot open the log stream; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Everything unacknowledged, in order, from the spool.
        for log in logs.values() {
            for sequence in log.acknowledged + 1..log.next_sequence {
                match log.read_chunk(sequence) {
                    Ok(chunk) => {
                        let _ = sender.send(chunk);
                    }
                    Err(error) => tracing::error!(%error, "a spooled log chunk cannot be read"),
                }
            }
        }
        loop {
            tokio::select! {
                request = requests.recv() => match request {
                    Some(request) => handle(&spool_dir, &mut logs, request, Some(&sender)),
                    None => return,
                },
                ack = acks.next() => match ack {
                    Some(Ok(ack)) => acknowledge(&mut logs, ack),
                    Some(Err(status)) => {
                        tracing::warn!(error = %status.message(), "log stream broke; resending from the last acknowledgement");
                        break;
                    }
                    None => break,
                },
                changed = coordinator.changed() => {
                    if changed.is_err() { return }
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn acknowledge(logs: &mut BTreeMap<(u64, u32), AttemptLog>, ack: pb::LogAck) {
    let Some(log) = logs.get_mut(&(ack.job_id, ack.attempt)) else { return };
    if !ack.refused.is_empty() {
        tracing::warn!(job_id = ack.job_id, attempt = ack.attempt, reason = %ack.refused, "coordinator refused the log; dropping it");
        log.refused = Some(ack.refused);
        let _ = std::fs::remove_dir_all(&log.directory);
        log.settle();
        return;
    }
    while log.acknowledged < ack.sequence {
        log.acknowledged += 1;
        let _ = std::fs::remove_file(log.chunk_path(log.acknowledged));
    }
    log.settle();
}

fn handle(
    spool_dir: &Path,
    logs: &mut BTreeMap<(u64, u32), AttemptLog>,
    request: Request,
    sender: Option<&mpsc::UnboundedSender<LogChunk>>,
) {
    match request {
        Request::Append { job_id, attempt, lines } => {
            let log = logs.entry((job_id, attempt)).or_insert_with(|| {
                let directory = spool_dir.join(format!("{job_id}-{attempt}"));
                let _ = std::fs::remove_dir_all(&directory);
                AttemptLog { directory, next_sequence: 1, acknowledged: 0, waiters: Vec::new(), finishing: false, refused: None }
            });
            if log.refused.is_some() {
                return;
            }
            let chunk = LogChunk { job_id, attempt, sequence: log.next_sequence, sha256: chunk_checksum(&lines), lines };
            if let Err(error) =
                std::fs::create_dir_all(&log.directory).and_then(|()| std::fs::write(log.chunk_path(chunk.sequence), chunk.encode_to_vec()))
            {
                // Without the spool the chunk still goes out now; it is only lost if the
                // coordinator is lost too before acknowledging it.
                tracing::error!(%error, "cannot spool a log chunk");
            }
            log.next_sequence += 1;
            if let Some(sender) = sender {
                let _ = sender.send(chunk);
            }
        }
        Request::Finish { job_id, attempt, done } => {
            let log = logs.entry((job_id, attempt)).or_insert_with(|| AttemptLog {
                directory: spool_dir.join(format!("{job_id}-{attempt}")),
                next_sequence: 1,
                acknowledged: 0,
                waiters: Vec::new(),
                finishing: false,
                refused: None,
            });
            log.finishing = true;
            log.waiters.push(done);
            log.settle();
            if log.waiters.is_empty() {
                let finished = logs.remove(&(job_id, attempt)).expect("just used");
                let _ = std::fs::remove_dir_all(&finished.directory);
            }
        }
        Request::Abandon { job_id, attempt } => {
            if let Some(log) = logs.remove(&(job_id, attempt)) {
                let _ = std::fs::remove_dir_all(&log.directory);
            }
        }
    }
    // Attempts whose waiters were answered after an acknowledgement are cleaned up lazily.
    let settled: Vec<(u64, u32)> = logs
        .iter()
        .filter(|(_, log)| log.finishing && log.waiters.is_empty() && (log.refused.is_some() || log.acknowledged + 1 == log.next_sequence))
        .map(|(key, _)| *key)
        .collect();
    for key in settled {
        if let Some(log) = logs.remove(&key) {
            let _ = std::fs::remove_dir_all(&log.directory);
        }
    }
}

/// The secrets of an offer, for the masker.
pub fn secrets_of(env: &[pb::EnvVar]) -> Vec<String> {
    env.iter().filter(|var| var.secret).map(|var| var.value.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_masks_and_levels() {
        let masker = Arc::new(Masker::new(&["hunter2secret"]));
        let mut splitter = LineSplitter::new(masker, 1);
        let mut lines = splitter.push(b"compiling\nerror: token hunter2secret rejected\npart");
        lines.extend(splitter.push(b"ial line\nWARNING: slow\nno newline"));
        lines.extend(splitter.finish());
        let texts: Vec<&str> = lines.iter().map(|line| line.text.as_str()).collect();
        assert_eq!(texts, vec!["compiling", "error: token *** rejected", "partial line", "WARNING: slow", "no newline"]);
        let levels: Vec<i32> = lines.iter().map(|line| line.level).collect();
        let expected = [pb::LogLevel::Info, pb::LogLevel::Error, pb::LogLevel::Info, pb::LogLevel::Warning, pb::LogLevel::Info];
        assert_eq!(levels, expected.iter().map(|level| *level as i32).collect::<Vec<_>>());
    }

    #[test]
    fn very_long_lines_are_cut_at_character_boundaries() {
        let mut splitter = LineSplitter::new(Arc::new(Masker::new::<&str>(&[])), 0);
        let long = "é".repeat(MAX_LINE_BYTES);
        let lines = splitter.push(long.as_bytes());
        assert!(!lines.is_empty());
        let mut joined: String = lines.iter().map(|line| line.text.as_str()).collect();
        joined.push_str(&splitter.finish().map(|line| line.text).unwrap_or_default());
        assert_eq!(joined, long);
    }
}
