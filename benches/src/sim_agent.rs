//! Simulated agents for load: they speak the real agent protocol (`davit.agent.v1.AgentService`)
//! to a real `davit` process — registration with a registration token, one `Session` stream per
//! agent (hello, heartbeats, offers, acceptance, steps, results) and `ShipLogs` streams of
//! numbered, checksummed chunks — but run no job: a benchmark decides what each one does.
//! Many of them share one tonic `Channel` (HTTP/2 streams), so a thousand cost a few sockets.
//!
//! The load generator must not steal the server's CPU, so log chunks are encoded once
//! ([`PreparedChunk`]) and sent as bytes: only the few bytes of job id, attempt and sequence
//! are encoded per send (protobuf lets a message's fields come in any order).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use davit_proto::agent::agent_service_client::AgentServiceClient;
use davit_proto::agent::{self as pb, AgentMessage, CoordinatorMessage, LogAck, LogChunk, agent_message, coordinator_message};
use prost::Message;
use prost::bytes::{BufMut, Bytes};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint};

/// The agent version the simulated agents announce.
pub const SIMULATED_VERSION: &str = "simulated";

/// A channel to a coordinator's gRPC address, set up as the real agent sets up its own
/// (`agent/src/client.rs`): no delay, keep-alive.
pub async fn connect(grpc_addr: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{grpc_addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to the coordinator at {grpc_addr}"))
}

fn client(channel: &Channel) -> AgentServiceClient<Channel> {
    AgentServiceClient::new(channel.clone()).max_decoding_message_size(16 * 1024 * 1024).max_encoding_message_size(16 * 1024 * 1024)
}

/// An agent's identity after `Register`.
#[derive(Debug, Clone)]
pub struct Registered {
    pub agent_id: u64,
    pub name: String,
    /// `dak_...`, sent as `authorization: Bearer <credential>` on every other call.
    pub credential: Arc<str>,
}

impl Registered {
    fn authorize<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {}", self.credential).parse().expect("credentials are ASCII");
        request.metadata_mut().insert("authorization", value);
        request
    }
}

/// Exchange a registration token for an agent credential (what `davit-agent register` does).
pub async fn register(
    channel: &Channel,
    registration_token: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> anyhow::Result<Registered> {
    let request = pb::RegisterRequest {
        registration_token: registration_token.to_string(),
        name: name.to_string(),
        labels: labels.clone().into_iter().collect(),
    };
    let response = client(channel)
        .register(request)
        .await
        .map_err(|status| anyhow::anyhow!("registering agent {name} was refused: {}", status.message()))?
        .into_inner();
    Ok(Registered { agent_id: response.agent_id, name: name.to_string(), credential: Arc::from(response.credential) })
}

// ---------------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------------

/// What a simulated agent announces in its hello.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub capacity: u32,
    pub labels: BTreeMap<String, String>,
    pub executors: Vec<String>,
}

/// What a session does with an offer by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOffer {
    /// Only report it; the benchmark accepts and finishes the job through the handle.
    Report,
    /// Accept at once, report `steps` steps as succeeded, and report the job as succeeded with
    /// no log: a job that takes no time, so what is measured is dispatch.
    FinishAtOnce { steps: u32 },
}

/// Something a session received, stamped when it arrived (before any processing).
#[derive(Debug)]
pub struct AgentEvent {
    /// The benchmark's index of the agent.
    pub agent: usize,
    pub at: Instant,
    pub kind: EventKind,
}

#[derive(Debug)]
pub enum EventKind {
    Welcome(pb::Welcome),
    Offer(pb::JobOffer),
    ResultAck(pb::ResultAck),
    Cancel(pb::CancelJob),
    /// The session ended: the coordinator closed it or it broke.
    Closed(String),
}

/// One open session. Dropping it leaves the session running; [`SessionHandle::close`] ends it.
pub struct SessionHandle {
    pub agent: usize,
    pub registered: Registered,
    outbox: mpsc::UnboundedSender<AgentMessage>,
    running: Arc<Mutex<HashMap<u64, u32>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SessionHandle {
    fn send(&self, message: agent_message::Message) {
        let _ = self.outbox.send(AgentMessage { message: Some(message) });
    }

    pub fn accept(&self, job_id: u64, attempt: u32) {
        self.running.lock().expect("running lock").insert(job_id, attempt);
        self.send(agent_message::Message::Accept(pb::AcceptJob { job_id, attempt }));
    }

    pub fn step(&self, job_id: u64, attempt: u32, index: u32, name: &str, state: pb::StepState) {
        send_step(&self.outbox, job_id, attempt, index, name, state);
    }

    /// Report the job's result; `log_chunks` is how many log chunks the attempt shipped (the
    /// coordinator refuses the result until it holds them all).
    pub fn finish(&self, job_id: u64, attempt: u32, outcome: pb::JobOutcome, log_chunks: u64) {
        self.running.lock().expect("running lock").remove(&job_id);
        self.send(agent_message::Message::Result(pb::JobResult {
            job_id,
            attempt,
            outcome: outcome as i32,
            reason: String::new(),
            log_chunks,
            output_json: Vec::new(),
            ..Default::default()
        }));
    }

    /// End the session: the request stream closes, the coordinator sees the agent leave.
    pub fn close(self) {
        self.task.abort();
    }
}

fn send_step(outbox: &mpsc::UnboundedSender<AgentMessage>, job_id: u64, attempt: u32, index: u32, name: &str, state: pb::StepState) {
    let now = now_millis();
    let finished = !matches!(state, pb::StepState::Running);
    let step = pb::StepUpdate {
        job_id,
        attempt,
        index,
        name: name.to_string(),
        state: state as i32,
        started_at: now,
        finished_at: if finished { now } else { 0 },
        exit_code: 0,
    };
    let _ = outbox.send(AgentMessage { message: Some(agent_message::Message::Step(step)) });
}

pub fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Open the agent's session (hello with its labels, capacity and executors) and keep it in a
/// task: heartbeats at the interval the welcome names, every message received reported to
/// `events`, offers handled as `on_offer` says. Returns once the coordinator answered, which
/// it does after recording the agent's connection through Raft.
pub async fn open_session(
    channel: &Channel,
    registered: Registered,
    agent: usize,
    spec: &AgentSpec,
    on_offer: OnOffer,
    events: mpsc::UnboundedSender<AgentEvent>,
) -> anyhow::Result<SessionHandle> {
    let (outbox, outbound) = mpsc::unbounded_channel();
    let hello = pb::Hello {
        labels: spec.labels.clone().into_iter().collect(),
        capacity: spec.capacity,
        running: Vec::new(),
        draining: false,
        version: SIMULATED_VERSION.to_string(),
        executors: spec.executors.clone(),
    };
    outbox.send(AgentMessage { message: Some(agent_message::Message::Hello(hello)) }).expect("fresh channel");
    let response = client(channel)
        .session(registered.authorize(UnboundedReceiverStream::new(outbound)))
        .await
        .map_err(|status| anyhow::anyhow!("agent {} could not open its session: {}", registered.agent_id, status.message()))?;
    let inbound = response.into_inner();
    let running = Arc::new(Mutex::new(HashMap::new()));
    let task = tokio::spawn(run_session(agent, inbound, outbox.clone(), running.clone(), on_offer, events));
    Ok(SessionHandle { agent, registered, outbox, running, task })
}

async fn run_session(
    agent: usize,
    mut inbound: tonic::Streaming<CoordinatorMessage>,
    outbox: mpsc::UnboundedSender<AgentMessage>,
    running: Arc<Mutex<HashMap<u64, u32>>>,
    on_offer: OnOffer,
    events: mpsc::UnboundedSender<AgentEvent>,
) {
    let mut heartbeat_every = Duration::from_secs(2);
    let mut heartbeat = tokio::time::interval(heartbeat_every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let report = |at: Instant, kind: EventKind| {
        let _ = events.send(AgentEvent { agent, at, kind });
    };
    loop {
        tokio::select! {
            message = inbound.message() => {
                let at = Instant::now();
                let message = match message {
                    Ok(Some(CoordinatorMessage { message: Some(message) })) => message,
                    Ok(Some(_)) => continue,
                    Ok(None) => {
                        report(at, EventKind::Closed("the coordinator closed the session".into()));
                        return;
                    }
                    Err(status) => {
                        report(at, EventKind::Closed(format!("{:?}: {}", status.code(), status.message())));
                        return;
                    }
                };
                match message {
                    coordinator_message::Message::Welcome(welcome) => {
                        let interval = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms).max(100));
                        if interval != heartbeat_every {
                            heartbeat_every = interval;
                            heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                            heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        }
                        report(at, EventKind::Welcome(welcome));
                    }
                    coordinator_message::Message::Offer(offer) => {
                        if let OnOffer::FinishAtOnce { steps } = on_offer {
                            let (job_id, attempt) = (offer.job_id, offer.attempt);
                            let _ = outbox.send(AgentMessage { message: Some(agent_message::Message::Accept(pb::AcceptJob { job_id, attempt })) });
                            for index in 0..steps {
                                send_step(&outbox, job_id, attempt, index, "build", pb::StepState::Succeeded);
                            }
                            let result = pb::JobResult {
                                job_id,
                                attempt,
                                outcome: pb::JobOutcome::Succeeded as i32,
                                reason: String::new(),
                                log_chunks: 0,
                                output_json: Vec::new(),
                                ..Default::default()
                            };
                            let _ = outbox.send(AgentMessage { message: Some(agent_message::Message::Result(result)) });
                        }
                        report(at, EventKind::Offer(offer));
                    }
                    coordinator_message::Message::ResultAck(ack) => {
                        if ack.accepted {
                            running.lock().expect("running lock").remove(&ack.job_id);
                        }
                        report(at, EventKind::ResultAck(ack));
                    }
                    coordinator_message::Message::Cancel(cancel) => {
                        running.lock().expect("running lock").remove(&cancel.job_id);
                        report(at, EventKind::Cancel(cancel));
                    }
                }
            }
            _ = heartbeat.tick() => {
                let running: Vec<pb::RunningJob> = running
                    .lock()
                    .expect("running lock")
                    .iter()
                    .map(|(job_id, attempt)| pb::RunningJob { job_id: *job_id, attempt: *attempt })
                    .collect();
                let heartbeat = pb::Heartbeat { running, draining: false };
                if outbox.send(AgentMessage { message: Some(agent_message::Message::Heartbeat(heartbeat)) }).is_err() {
                    return;
                }
            }
        }
    }
}

/// Wait until the API lists `count` agents as online, then for the leader's fleet view to follow.
pub async fn wait_for_online_agents(node: &crate::harness::DavitNode, count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let agents = node.get("/api/v1/agents").await?;
        let online = agents["items"].as_array().map_or(0, |items| items.iter().filter(|agent| agent["state"] == "online").count());
        if online >= count {
            // The leader's fleet view follows the sessions' reports, at most a second later.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {online} of {count} agents were online after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Log chunks
// ---------------------------------------------------------------------------------------------

/// A chunk's lines, encoded once: fields 4 (lines) and 5 (SHA-256) of `LogChunk`. Sending it
/// prepends fields 1 to 3 (job, attempt, sequence), which makes the same message prost would
/// encode, without re-encoding thousands of lines per send.
#[derive(Debug, Clone)]
pub struct PreparedChunk {
    body: Bytes,
    /// Bytes of line text as stored and acknowledged: each line's text and its newline.
    pub text_bytes: u64,
    pub lines: usize,
    /// The text as `format=raw` returns it (each line and a newline), for verification.
    pub text: Arc<str>,
}

impl PreparedChunk {
    pub fn new(lines: Vec<pb::LogLine>) -> Self {
        let mut text = String::with_capacity(lines.iter().map(|line| line.text.len() + 1).sum());
        let mut hasher = Sha256::new();
        for line in &lines {
            hasher.update(line.text.as_bytes());
            hasher.update(b"\n");
            text.push_str(&line.text);
            text.push('\n');
        }
        let count = lines.len();
        let body = LogChunk { job_id: 0, attempt: 0, sequence: 0, lines, sha256: hasher.finalize().to_vec() }.encode_to_vec();
        PreparedChunk { body: Bytes::from(body), text_bytes: text.len() as u64, lines: count, text: Arc::from(text) }
    }

    /// The encoded message of this chunk as chunk `sequence` of `(job_id, attempt)`.
    pub fn outgoing(&self, job_id: u64, attempt: u32, sequence: u64) -> OutgoingChunk {
        let header = LogChunk { job_id, attempt, sequence, lines: Vec::new(), sha256: Vec::new() }.encode_to_vec();
        OutgoingChunk { header, body: self.body.clone() }
    }

    /// The same chunk encoded the ordinary way, by prost (to measure what pre-encoding saves).
    pub fn decode(&self) -> LogChunk {
        LogChunk::decode(self.body.clone()).expect("a prepared chunk decodes")
    }
}

/// A `LogChunk` already encoded, in two parts.
pub struct OutgoingChunk {
    header: Vec<u8>,
    body: Bytes,
}

/// A gRPC codec that writes pre-encoded chunks and decodes `LogAck`s with prost.
struct PreEncodedCodec;

struct PreEncodedEncoder;

impl Encoder for PreEncodedEncoder {
    type Item = OutgoingChunk;
    type Error = Status;

    fn encode(&mut self, item: OutgoingChunk, destination: &mut EncodeBuf<'_>) -> Result<(), Status> {
        destination.reserve(item.header.len() + item.body.len());
        destination.put_slice(&item.header);
        destination.put_slice(&item.body);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(1 << 20, 1 << 20)
    }
}

impl Codec for PreEncodedCodec {
    type Encode = OutgoingChunk;
    type Decode = LogAck;
    type Encoder = PreEncodedEncoder;
    type Decoder = tonic_prost::ProstDecoder<LogAck>;

    fn encoder(&mut self) -> Self::Encoder {
        PreEncodedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<LogAck, LogAck>::raw_decoder(BufferSettings::default())
    }
}

/// How one attempt's log is shipped.
#[derive(Debug, Clone)]
pub struct ShipPlan {
    pub job_id: u64,
    pub attempt: u32,
    /// Chunk `n` (from 1) is `chunks[(first_chunk + n - 1) % chunks.len()]`.
    pub first_chunk: usize,
    /// Chunks sent and not yet acknowledged, at most.
    pub window: usize,
    /// No chunk is sent after this instant.
    pub stop_sending_at: Instant,
    /// At most this many chunks are sent.
    pub max_chunks: u64,
    /// The longest wait for any acknowledgement; longer fails the log.
    pub ack_timeout: Duration,
}

impl ShipPlan {
    pub fn chunk<'a>(&self, chunks: &'a [PreparedChunk], sequence: u64) -> &'a PreparedChunk {
        &chunks[(self.first_chunk + sequence as usize - 1) % chunks.len()]
    }
}

/// What a shipped log came to.
#[derive(Debug, Clone, Default)]
pub struct Shipped {
    /// Every chunk up to this one is acknowledged as stored.
    pub acknowledged: u64,
    pub text_bytes_acknowledged: u64,
    pub sent: u64,
}

/// Ship one attempt's log on its own `ShipLogs` stream (what the real agent's shipper does,
/// one stream per agent): chunks numbered from 1, at most `plan.window` unacknowledged, until
/// `plan.stop_sending_at`; then wait for the outstanding acknowledgements. `on_ack` is called for
/// each newly acknowledged chunk with its sequence, its bytes of text, when the acknowledgement
/// arrived and how long after the chunk was handed to the stream.
pub async fn ship_log(
    channel: &Channel,
    registered: &Registered,
    chunks: &[PreparedChunk],
    plan: &ShipPlan,
    mut on_ack: impl FnMut(u64, u64, Instant, Duration),
) -> anyhow::Result<Shipped> {
    if chunks.is_empty() || plan.window == 0 {
        bail!("a log needs chunks and a window of at least one");
    }
    let (sender, outbound) = mpsc::channel::<OutgoingChunk>(plan.window);
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|error| anyhow::anyhow!("the channel is not ready: {error}"))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/davit.agent.v1.AgentService/ShipLogs");
    let response = grpc
        .streaming(registered.authorize(ReceiverStream::new(outbound)), path, PreEncodedCodec)
        .await
        .map_err(|status| anyhow::anyhow!("ShipLogs for job {} was refused: {}", plan.job_id, status.message()))?;
    let mut acks = response.into_inner();
    let mut shipped = Shipped::default();
    let mut sent_at = std::collections::VecDeque::with_capacity(plan.window);
    loop {
        while Instant::now() < plan.stop_sending_at
            && shipped.sent < plan.max_chunks
            && shipped.sent - shipped.acknowledged < plan.window as u64
        {
            let sequence = shipped.sent + 1;
            if sender.send(plan.chunk(chunks, sequence).outgoing(plan.job_id, plan.attempt, sequence)).await.is_err() {
                bail!("the ShipLogs stream of job {} closed while sending", plan.job_id);
            }
            shipped.sent = sequence;
            sent_at.push_back(Instant::now());
        }
        if shipped.acknowledged == shipped.sent && (Instant::now() >= plan.stop_sending_at || shipped.sent >= plan.max_chunks) {
            return Ok(shipped);
        }
        let ack = match tokio::time::timeout(plan.ack_timeout, acks.message()).await {
            Ok(Ok(Some(ack))) => ack,
            Ok(Ok(None)) => bail!("the coordinator ended the ShipLogs stream of job {} after {} chunks", plan.job_id, shipped.acknowledged),
            Ok(Err(status)) => bail!("the ShipLogs stream of job {} failed: {:?}: {}", plan.job_id, status.code(), status.message()),
            Err(_) => bail!(
                "job {}: none of the {} unacknowledged chunks was acknowledged within {} s",
                plan.job_id,
                shipped.sent - shipped.acknowledged,
                plan.ack_timeout.as_secs()
            ),
        };
        let at = Instant::now();
        if !ack.refused.is_empty() {
            bail!("the coordinator refused the log of job {}: {}", plan.job_id, ack.refused);
        }
        if ack.job_id != plan.job_id || ack.attempt != plan.attempt || ack.sequence > shipped.sent {
            bail!("unexpected acknowledgement {ack:?} on the stream of job {}", plan.job_id);
        }
        while shipped.acknowledged < ack.sequence {
            shipped.acknowledged += 1;
            let bytes = plan.chunk(chunks, shipped.acknowledged).text_bytes;
            shipped.text_bytes_acknowledged += bytes;
            let latency = sent_at.pop_front().map_or(Duration::ZERO, |sent| at - sent);
            on_ack(shipped.acknowledged, bytes, at, latency);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A corpus of build-log lines
// ---------------------------------------------------------------------------------------------

/// Deterministic, realistic build-log lines (compiler, package manager, tests, Docker), 60 to
/// 200 bytes each, cut into chunks of about `chunk_bytes` bytes of text. The same seed gives the
/// same corpus, so runs compare.
pub fn build_log_corpus(chunk_count: usize, chunk_bytes: usize, seed: u64) -> Vec<PreparedChunk> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let crates = [
        "serde",
        "tokio",
        "hyper",
        "axum",
        "tonic",
        "prost",
        "regex",
        "rand",
        "bytes",
        "futures-util",
        "tracing",
        "openraft",
        "redb",
        "zstd-sys",
        "ring",
        "rustls",
        "h2",
        "tower",
        "clap",
        "anyhow",
    ];
    let modules = ["scheduler", "gateway", "store::redb", "api::deployments", "log_segments", "fleet", "raft::log_store", "auth"];
    let base_time = now_millis();
    let mut chunks = Vec::with_capacity(chunk_count);
    let mut line_number: u64 = 0;
    for _ in 0..chunk_count {
        let mut lines = Vec::new();
        let mut bytes = 0;
        while bytes < chunk_bytes {
            line_number += 1;
            let krate = crates[rng.random_range(0..crates.len())];
            let module = modules[rng.random_range(0..modules.len())];
            let version = format!("{}.{}.{}", rng.random_range(0..3), rng.random_range(0..40), rng.random_range(0..20));
            let hash: String = (0..12).map(|_| char::from(b"0123456789abcdef"[rng.random_range(0..16)])).collect();
            let (level, text) = match rng.random_range(0..100) {
                0..=29 => {
                    (pb::LogLevel::Info, format!("   Compiling {krate} v{version} (registry+https://github.com/rust-lang/crates.io-index)"))
                }
                30..=49 => (
                    pb::LogLevel::Info,
                    format!("test {module}::tests::case_{line_number}_{hash} ... ok ({} ms)", rng.random_range(0..900)),
                ),
                50..=59 => (
                    pb::LogLevel::Warning,
                    format!(
                        "warning: unused variable: `value_{}` --> src/{}.rs:{}:{}",
                        rng.random_range(0..99),
                        module.replace("::", "/"),
                        rng.random_range(1..2000),
                        rng.random_range(1..80)
                    ),
                ),
                60..=64 => (
                    pb::LogLevel::Error,
                    format!(
                        "error[E0{}]: mismatched types in {module} at line {}: expected `u64`, found `Option<u64>` (see {hash})",
                        rng.random_range(300..700),
                        rng.random_range(1..2000)
                    ),
                ),
                65..=79 => (
                    pb::LogLevel::Info,
                    format!(
                        "#{} [build {}/{}] RUN cargo build --release --locked -p {krate} # sha256:{hash}{hash}",
                        rng.random_range(1..30),
                        rng.random_range(1..9),
                        9
                    ),
                ),
                80..=89 => (
                    pb::LogLevel::Info,
                    format!(
                        "npm http fetch GET 200 https://registry.npmjs.org/{krate}/-/{krate}-{version}.tgz {}ms (cache miss)",
                        rng.random_range(3..400)
                    ),
                ),
                _ => (
                    pb::LogLevel::Debug,
                    format!(
                        "{} DEBUG {module}: request_id={hash} took {}.{:03} ms, {} bytes, status=200 path=/api/v1/{krate}/{line_number}",
                        line_number,
                        rng.random_range(0..90),
                        rng.random_range(0..1000),
                        rng.random_range(10..100_000)
                    ),
                ),
            };
            let text = if text.len() < 60 { format!("{text} {}", "-".repeat(60 - text.len())) } else { text };
            let mut text = text;
            text.truncate(200);
            bytes += text.len() + 1;
            lines.push(pb::LogLine { timestamp: base_time + line_number as i64 / 50, level: level as i32, text, step: 0 });
        }
        chunks.push(PreparedChunk::new(lines));
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prepared_chunk_is_the_message_prost_would_send() {
        let chunks = build_log_corpus(2, 4096, 7);
        let chunk = &chunks[1];
        let outgoing = chunk.outgoing(12, 3, 9);
        let mut bytes = outgoing.header.clone();
        bytes.extend_from_slice(&outgoing.body);
        let decoded = LogChunk::decode(bytes.as_slice()).unwrap();
        assert_eq!((decoded.job_id, decoded.attempt, decoded.sequence), (12, 3, 9));
        assert_eq!(decoded.lines, chunk.decode().lines);
        let mut hasher = Sha256::new();
        hasher.update(chunk.text.as_bytes());
        assert_eq!(decoded.sha256, hasher.finalize().to_vec());
        assert!(decoded.lines.iter().all(|line| (60..=200).contains(&line.text.len())));
        assert_eq!(chunk.text_bytes, decoded.lines.iter().map(|line| line.text.len() as u64 + 1).sum::<u64>());
    }
}
