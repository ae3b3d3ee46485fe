//! Sending an artifact to the coordinator, whose digest the agent already knows: ask whether
//! the coordinator has it (then only record it), else stream it over `UploadArtifact`, retrying
//! through coordinator changes.
//!
//! Workspace files are uploaded in two passes: the caller hashes the tar stream first
//! ([`packing::digest`], no compression), so that an artifact the coordinator already stores
//! costs no compression and no upload; only otherwise is the tar packed again, compressed and
//! streamed straight into the upload ([`packing::pack_into`], which does not hash again: the
//! coordinator verifies the digest of what it receives) — no file is written, and the
//! coordinator verifies and stores the bytes while the agent is still compressing. The second
//! pass starts speculatively beside the first ([`Speculation`]), holding its output (in memory, then on disk)
//! until the coordinator's answer, so that no core idles while the digest is computed. An artifact
//! that already is a file (an exported image) is streamed from that file.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use davit_proto::agent::{self as pb, ArtifactMeta, ArtifactUpload, JobOutcome, artifact_upload};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::jobs::{Ended, JobContext};
use crate::packing;

/// What the upload messages carry: 1 MiB of compressed bytes each.
const MESSAGE_BYTES: usize = 1 << 20;
/// Messages queued between the producer and the gRPC call.
const QUEUED_MESSAGES: usize = 8;

/// Where an artifact's compressed bytes come from.
pub enum Source {
    /// A `.tar.zst` file already made.
    File(PathBuf),
    /// Workspace paths, packed again (deterministically) while they are uploaded.
    Workspace { root: PathBuf, paths: Vec<String> },
}

/// The artifact as the coordinator recorded it, and how many compressed bytes were sent
/// (0 when the coordinator already had it).
pub struct Uploaded {
    pub recorded: pb::ArtifactRecorded,
    pub sent_bytes: u64,
}

/// Upload (or just record, when the digest is already stored) the artifact `meta` describes,
/// retrying through coordinator changes.
pub async fn upload(
    context: &JobContext,
    meta: &ArtifactMeta,
    source: &Source,
    mut speculation: Option<Speculation>,
) -> Result<Uploaded, Ended> {
    let mut coordinator = context.coordinator.clone();
    let mut last_error = String::new();
    for attempt in 0..10 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
        }
        let Some(current) = coordinator.borrow_and_update().clone() else {
            let _ = tokio::time::timeout(Duration::from_secs(5), coordinator.changed()).await;
            continue;
        };
        let mut client = current.client();
        let stored = match client.has_artifact(current.authorize(pb::HasArtifactRequest { digest: meta.digest.clone() })).await {
            Ok(response) => response.into_inner().stored,
            Err(status) => {
                last_error = status.message().to_string();
                continue;
            }
        };
        let result = if stored {
            if let Some(speculation) = speculation.take() {
                speculation.abort();
            }
            client.record_artifact(current.authorize(meta.clone())).await.map(|response| (response, 0))
        } else if let Some(speculation) = speculation.take() {
            let (receiver, task) = speculation.go();
            let first = ArtifactUpload { part: Some(artifact_upload::Part::Meta(meta.clone())) };
            let stream = tokio_stream::StreamExt::chain(tokio_stream::once(first), tokio_stream::wrappers::ReceiverStream::new(receiver));
            let (produced, answered) = tokio::join!(task, client.upload_artifact(current.authorize(stream)));
            let produced =
                produced.map_err(|error| ProduceError::Pack(format!("packing panicked: {error}"))).and_then(|packed| checked(meta, packed));
            match (produced, answered) {
                (Ok(sent), answer) => answer.map(|response| (response, sent)),
                (Err(ProduceError::Pack(message)), _) => return Err(Ended::new(JobOutcome::Failed, message)),
                (Err(ProduceError::Stopped), Err(status)) => Err(status),
                (Err(ProduceError::Stopped), Ok(_)) => Err(tonic::Status::aborted("the upload ended before all bytes were sent")),
            }
        } else {
            let (sender, receiver) = mpsc::channel(QUEUED_MESSAGES);
            let producer = produce(meta.clone(), source, sender);
            let call = client.upload_artifact(current.authorize(tokio_stream::wrappers::ReceiverStream::new(receiver)));
            // Both run until the producer has sent everything; a coordinator that answers early
            // (a refusal) ends the call, which makes the producer's next send fail.
            let (produced, answered) = tokio::join!(producer, call);
            match (produced, answered) {
                (Ok(sent), answer) => answer.map(|response| (response, sent)),
                (Err(ProduceError::Pack(message)), _) => return Err(Ended::new(JobOutcome::Failed, message)),
                (Err(ProduceError::Stopped), Err(status)) => Err(status),
                (Err(ProduceError::Stopped), Ok(_)) => Err(tonic::Status::aborted("the upload ended before all bytes were sent")),
            }
        };
        match result {
            Ok((response, sent_bytes)) => return Ok(Uploaded { recorded: response.into_inner(), sent_bytes }),
            Err(status) if matches!(status.code(), tonic::Code::FailedPrecondition) => {
                return Err(Ended::new(JobOutcome::Cancelled, format!("the coordinator refused the artifact: {}", status.message())));
            }
            Err(status) if matches!(status.code(), tonic::Code::InvalidArgument) => {
                return Err(Ended::new(JobOutcome::Failed, format!("the coordinator refused the artifact: {}", status.message())));
            }
            Err(status) => last_error = status.message().to_string(),
        }
    }
    Err(Ended::new(JobOutcome::Infrastructure, format!("could not upload artifact sha256:{}: {last_error}", meta.digest)))
}

enum ProduceError {
    /// The artifact cannot be packed, or packs to other bytes than it hashed to: the job fails.
    Pack(String),
    /// The call ended (the coordinator refused or went away): its status says why.
    Stopped,
}

/// Send the metadata, then the compressed bytes; returns how many compressed bytes were sent.
async fn produce(meta: ArtifactMeta, source: &Source, sender: mpsc::Sender<ArtifactUpload>) -> Result<u64, ProduceError> {
    sender.send(ArtifactUpload { part: Some(artifact_upload::Part::Meta(meta.clone())) }).await.map_err(|_| ProduceError::Stopped)?;
    match source {
        Source::File(path) => {
            let mut file = tokio::fs::File::open(path)
                .await
                .map_err(|error| ProduceError::Pack(format!("cannot open the packed artifact {}: {error}", path.display())))?;
            let mut sent = 0u64;
            loop {
                let mut buffer = vec![0u8; MESSAGE_BYTES];
                let read = file
                    .read(&mut buffer)
                    .await
                    .map_err(|error| ProduceError::Pack(format!("cannot read the packed artifact {}: {error}", path.display())))?;
                if read == 0 {
                    return Ok(sent);
                }
                buffer.truncate(read);
                sent += read as u64;
                sender.send(ArtifactUpload { part: Some(artifact_upload::Part::Data(buffer)) }).await.map_err(|_| ProduceError::Stopped)?;
            }
        }
        Source::Workspace { root, paths } => {
            let (root, paths) = (root.clone(), paths.clone());
            let gate = Arc::new(Gate::open());
            let packed = tokio::task::spawn_blocking(move || pack_through(&root, &paths, UploadWriter::new(sender, gate)))
                .await
                .map_err(|error| ProduceError::Pack(format!("packing panicked: {error}")))?;
            checked(&meta, packed)
        }
    }
}

/// Pack into `writer` and flush it: the tar's length and the compressed bytes sent.
fn pack_through(root: &std::path::Path, paths: &[String], writer: UploadWriter) -> Result<(u64, u64), packing::PackError> {
    let (length, mut writer) = packing::pack_into(root, paths, writer)?;
    writer.flush().map_err(|error| packing::PackError(error.to_string()))?;
    Ok((length, writer.sent))
}

/// What a packing pass's result means for the upload. The coordinator checks the digest of what
/// it received; a changed length is caught here already.
fn checked(meta: &ArtifactMeta, packed: Result<(u64, u64), packing::PackError>) -> Result<u64, ProduceError> {
    match packed {
        Ok((length, sent)) if length == meta.uncompressed_bytes => Ok(sent),
        Ok((length, _)) => Err(ProduceError::Pack(format!(
            "the artifact changed while it was uploaded (its tar was {} bytes when hashed and {length} when packed); \
             make sure nothing in the job writes to its artifact paths in the background",
            meta.uncompressed_bytes
        ))),
        Err(error) if error.0.contains(UPLOAD_STOPPED) => Err(ProduceError::Stopped),
        Err(error) => Err(ProduceError::Pack(format!("packing the artifacts failed: {error}"))),
    }
}

/// Compression of workspace paths started while their digest is still being computed, so that
/// the other cores are not idle during the first pass. Nothing leaves the agent before the
/// coordinator has said it lacks the artifact ([`Speculation::go`]); until then the compressed
/// bytes wait: the first [`SPECULATION_MEMORY`] of them in memory, the rest in an unlinked file
/// in the job's scratch directory (so the compressor never stalls on the answer, which costs a
/// whole core's idle time while the digest pass finishes; if that file cannot be written, the
/// compressor waits instead). If the coordinator has the artifact, [`Speculation::abort`] stops
/// the compression and nothing is sent.
pub struct Speculation {
    gate: GateGuard,
    receiver: mpsc::Receiver<ArtifactUpload>,
    task: PackTask,
}

/// A packing pass on the blocking pool: the tar's length and the compressed bytes sent.
type PackTask = tokio::task::JoinHandle<Result<(u64, u64), packing::PackError>>;

/// Compressed bytes a speculation holds in memory before the answer; more go to a spill file.
const SPECULATION_MEMORY: usize = 32 << 20;

impl Speculation {
    /// Starts compressing `paths` under `root`; held bytes beyond memory spill into `spill_directory`.
    pub fn start(root: PathBuf, paths: Vec<String>, spill_directory: PathBuf) -> Speculation {
        let (sender, receiver) = mpsc::channel(QUEUED_MESSAGES);
        let gate = Arc::new(Gate::closed());
        let writer = UploadWriter::new(sender, gate.clone()).holding(SPECULATION_MEMORY, Some(spill_directory));
        let task = tokio::task::spawn_blocking(move || pack_through(&root, &paths, writer));
        Speculation { gate: GateGuard(gate), receiver, task }
    }

    /// The coordinator lacks the artifact: release what was held and stream the rest.
    fn go(self) -> (mpsc::Receiver<ArtifactUpload>, PackTask) {
        self.gate.0.decide(true);
        (self.receiver, self.task)
    }

    /// The coordinator has the artifact: stop compressing (the pass ends with an error nobody reads).
    fn abort(self) {
        self.gate.0.decide(false);
    }
}

/// Decides "abort" when dropped undecided (the job ended before the answer), so that the
/// compressor never waits forever.
struct GateGuard(Arc<Gate>);

impl Drop for GateGuard {
    fn drop(&mut self) {
        self.0.decide(false);
    }
}

/// Whether bytes may be sent yet: undecided (hold them), go, or abort.
struct Gate {
    decision: std::sync::Mutex<Option<bool>>,
    decided: std::sync::Condvar,
}

impl Gate {
    fn open() -> Gate {
        Gate { decision: std::sync::Mutex::new(Some(true)), decided: std::sync::Condvar::new() }
    }

    fn closed() -> Gate {
        Gate { decision: std::sync::Mutex::new(None), decided: std::sync::Condvar::new() }
    }

    /// The first decision stands.
    fn decide(&self, go: bool) {
        let mut decision = self.decision.lock().expect("gate lock");
        if decision.is_none() {
            *decision = Some(go);
        }
        self.decided.notify_all();
    }

    fn current(&self) -> Option<bool> {
        *self.decision.lock().expect("gate lock")
    }

    fn wait(&self) -> bool {
        let decision = self.decision.lock().expect("gate lock");
        self.decided.wait_while(decision, |decision| decision.is_none()).expect("gate lock").expect("decided")
    }
}

const UPLOAD_STOPPED: &str = "the upload stopped";

/// A blocking writer that turns zstd's output into upload messages of [`MESSAGE_BYTES`]; behind
/// a closed [`Gate`] it holds them until the gate decides: in memory up to `memory_limit`, then
/// in a spill file when it has a directory for one, else by waiting for the decision.
struct UploadWriter {
    sender: mpsc::Sender<ArtifactUpload>,
    gate: Arc<Gate>,
    buffer: Vec<u8>,
    held: Vec<Vec<u8>>,
    held_bytes: usize,
    memory_limit: usize,
    spill: Spill,
    sent: u64,
}

/// Where held bytes beyond the memory limit go.
enum Spill {
    /// No spill file may be made: the writer waits for the decision instead.
    Unavailable,
    /// A directory to make one in, when needed.
    Possible(PathBuf),
    /// An open (already unlinked) file holding `bytes` bytes, to be sent after those in memory.
    Holding { file: std::fs::File, bytes: u64 },
}

impl UploadWriter {
    fn new(sender: mpsc::Sender<ArtifactUpload>, gate: Arc<Gate>) -> Self {
        UploadWriter {
            sender,
            gate,
            buffer: Vec::with_capacity(MESSAGE_BYTES),
            held: Vec::new(),
            held_bytes: 0,
            memory_limit: SPECULATION_MEMORY,
            spill: Spill::Unavailable,
            sent: 0,
        }
    }

    /// Hold at most `memory_limit` bytes in memory before the decision, the rest in a file in
    /// `spill_directory` (none: wait for the decision once memory is full).
    fn holding(mut self, memory_limit: usize, spill_directory: Option<PathBuf>) -> Self {
        self.memory_limit = memory_limit;
        self.spill = spill_directory.map_or(Spill::Unavailable, Spill::Possible);
        self
    }

    fn stopped() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::BrokenPipe, UPLOAD_STOPPED)
    }

    fn send(&mut self, data: Vec<u8>) -> std::io::Result<()> {
        self.sent += data.len() as u64;
        self.sender.blocking_send(ArtifactUpload { part: Some(artifact_upload::Part::Data(data)) }).map_err(|_| Self::stopped())
    }

    /// Pass on (or hold) the current message. With `wait` (the end of the stream) an undecided
    /// gate is waited for; otherwise only once nothing more can be held.
    fn send_buffer(&mut self, wait: bool) -> std::io::Result<()> {
        let mut data = std::mem::replace(&mut self.buffer, Vec::with_capacity(MESSAGE_BYTES));
        if self.gate.current().is_none() {
            data = self.keep(data).err().unwrap_or_default();
            if data.is_empty() && !wait {
                return Ok(());
            }
        }
        if !self.gate.wait() {
            return Err(Self::stopped());
        }
        // What was held is older than `data`, which could not be held.
        self.release()?;
        if !data.is_empty() {
            self.send(data)?;
        }
        Ok(())
    }

    /// Holds `data` until the decision, in memory or else in the spill file; gives it back
    /// when there is no room for it.
    fn keep(&mut self, data: Vec<u8>) -> Result<(), Vec<u8>> {
        if data.is_empty() {
            return Ok(());
        }
        if self.held_bytes + data.len() <= self.memory_limit && !matches!(self.spill, Spill::Holding { .. }) {
            self.held_bytes += data.len();
            self.held.push(data);
            return Ok(());
        }
        self.spill_write(data)
    }

    /// Appends `data` to the spill file (made on first use); gives the data back if it cannot.
    fn spill_write(&mut self, data: Vec<u8>) -> Result<(), Vec<u8>> {
        use std::io::Write as _;
        if let Spill::Possible(directory) = &self.spill {
            match spill_file(directory) {
                Ok(file) => self.spill = Spill::Holding { file, bytes: 0 },
                Err(error) => {
                    tracing::debug!(%error, "cannot make a spill file; the compressor waits for the coordinator's answer instead");
                    self.spill = Spill::Unavailable;
                }
            }
        }
        match &mut self.spill {
            Spill::Holding { file, bytes } => match file.write_all(&data) {
                Ok(()) => {
                    *bytes += data.len() as u64;
                    Ok(())
                }
                Err(error) => {
                    tracing::debug!(%error, "the spill file is full; the compressor waits for the coordinator's answer instead");
                    // A short write may have left part of `data` behind the held bytes; it is
                    // never read (only `bytes` are), and the next write goes where it started.
                    use std::io::Seek as _;
                    let _ = file.seek(std::io::SeekFrom::Start(*bytes));
                    Err(data)
                }
            },
            _ => Err(data),
        }
    }

    /// Sends what was held, in order: memory first, then the spill file.
    fn release(&mut self) -> std::io::Result<()> {
        use std::io::{Read as _, Seek as _};
        for data in std::mem::take(&mut self.held) {
            self.send(data)?;
        }
        self.held_bytes = 0;
        if let Spill::Holding { mut file, bytes } = std::mem::replace(&mut self.spill, Spill::Unavailable) {
            file.rewind()?;
            let mut remaining = bytes;
            while remaining > 0 {
                let mut data = vec![0; MESSAGE_BYTES.min(usize::try_from(remaining).unwrap_or(MESSAGE_BYTES))];
                file.read_exact(&mut data)?;
                remaining -= data.len() as u64;
                self.send(data)?;
            }
        }
        Ok(())
    }
}

/// An anonymous file in `directory`: created, then unlinked at once, so that nothing is left
/// behind whatever happens to the job.
fn spill_file(directory: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::create_dir_all(directory)?;
    let path = directory.join(format!("upload-spill-{}-{}", std::process::id(), rand::random::<u64>()));
    let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

impl Write for UploadWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let taken = data.len().min(MESSAGE_BYTES - self.buffer.len());
        self.buffer.extend_from_slice(&data[..taken]);
        if self.buffer.len() == MESSAGE_BYTES {
            self.send_buffer(false)?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_buffer(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(message: ArtifactUpload) -> Vec<u8> {
        match message.part {
            Some(artifact_upload::Part::Data(data)) => data,
            other => panic!("expected data, got {other:?}"),
        }
    }

    /// Behind a closed gate nothing is sent, however much is written; "go" releases what was
    /// held, in order; "abort" stops the writer without sending anything.
    #[test]
    fn a_speculative_writer_sends_nothing_before_the_answer() {
        let (sender, mut receiver) = mpsc::channel(64);
        let gate = Arc::new(Gate::closed());
        let mut writer = UploadWriter::new(sender, gate.clone());
        writer.write_all(&vec![7u8; 3 * MESSAGE_BYTES + 10]).unwrap();
        assert!(receiver.try_recv().is_err(), "bytes left before the coordinator answered");
        gate.decide(true);
        writer.flush().unwrap();
        let received: Vec<u8> = std::iter::from_fn(|| receiver.try_recv().ok()).flat_map(data).collect();
        assert_eq!(received, vec![7u8; 3 * MESSAGE_BYTES + 10]);
        assert_eq!(writer.sent, received.len() as u64);

        let (sender, mut receiver) = mpsc::channel(64);
        let gate = Arc::new(Gate::closed());
        let mut writer = UploadWriter::new(sender, gate.clone());
        writer.write_all(&vec![1u8; 2 * MESSAGE_BYTES]).unwrap();
        drop(GateGuard(gate));
        assert_eq!(writer.flush().unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);
        assert!(receiver.try_recv().is_err(), "an aborted speculation sent bytes");
    }

    fn patterned(length: usize) -> Vec<u8> {
        (0..length).map(|index| (index / 1000 % 251) as u8).collect()
    }

    /// Beyond its memory limit a speculation keeps writing into a spill file (the compressor does
    /// not wait); on "go" memory and then the file are sent, so the bytes arrive in order.
    #[test]
    fn a_speculation_spills_to_disk_and_sends_everything_in_order() {
        let directory = tempfile::tempdir().unwrap();
        let (sender, mut receiver) = mpsc::channel(64);
        let gate = Arc::new(Gate::closed());
        let mut writer = UploadWriter::new(sender, gate.clone()).holding(MESSAGE_BYTES, Some(directory.path().join("spill")));
        let written = patterned(5 * MESSAGE_BYTES + 123);
        writer.write_all(&written).unwrap();
        assert!(receiver.try_recv().is_err(), "bytes left before the coordinator answered");
        assert!(matches!(writer.spill, Spill::Holding { bytes, .. } if bytes == 4 * MESSAGE_BYTES as u64));
        assert_eq!(std::fs::read_dir(directory.path().join("spill")).unwrap().count(), 0, "the spill file must be unlinked");
        gate.decide(true);
        writer.write_all(&written[..77]).unwrap();
        writer.flush().unwrap();
        let received: Vec<u8> = std::iter::from_fn(|| receiver.try_recv().ok()).flat_map(data).collect();
        assert_eq!(received.len(), written.len() + 77);
        assert!(received[..written.len()] == written[..] && received[written.len()..] == written[..77], "bytes arrived out of order");
        assert_eq!(writer.sent, received.len() as u64);
    }

    /// Without a usable spill directory, a full memory hold makes the writer wait for the answer
    /// (still sending nothing before it), then everything goes out in order.
    #[test]
    fn without_a_spill_file_a_full_speculation_waits_for_the_answer() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let (sender, mut receiver) = mpsc::channel(64);
        let gate = Arc::new(Gate::closed());
        let unusable = file.path().join("not-a-directory");
        let mut writer = UploadWriter::new(sender, gate.clone()).holding(MESSAGE_BYTES, Some(unusable));
        let written = patterned(3 * MESSAGE_BYTES);
        let writing = std::thread::spawn({
            let written = written.clone();
            move || {
                writer.write_all(&written).unwrap();
                writer.flush().unwrap();
                writer.sent
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!writing.is_finished(), "the writer should wait for the answer");
        assert!(receiver.try_recv().is_err(), "bytes left before the coordinator answered");
        gate.decide(true);
        let sent = writing.join().unwrap();
        let received: Vec<u8> = std::iter::from_fn(|| receiver.try_recv().ok()).flat_map(data).collect();
        assert!(received == written, "bytes arrived out of order");
        assert_eq!(sent, written.len() as u64);
    }
}
