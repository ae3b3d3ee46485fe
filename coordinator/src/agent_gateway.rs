//! The agent-facing gRPC service every coordinator serves (`davit.agent.v1.AgentService`):
//! registration, the one long-lived session per agent (offers and cancellations down,
//! heartbeats, acceptance, step progress and results up), log chunks and artifacts. It never
//! decides who runs what — the leader's scheduler does, through Raft; a gateway turns applied
//! assignments into offers for the agents connected to it, and agents' reports into commands.
//!
//! Flow: `Session` -> `AgentConnected` -> Raft -> leader's `Scheduler` -> `AssignJobs` -> Raft ->
//! applied on this node -> `StateEvent::JobsAssigned` -> offer on the agent's stream.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use davit_proto::agent::agent_service_server::AgentService;
use davit_proto::agent::{
    self as pb, AgentMessage, ArtifactData, ArtifactMeta, ArtifactRecorded, ArtifactUpload, CoordinatorMessage, FetchArtifactRequest,
    HasArtifactRequest, HasArtifactResponse, LogAck, LogChunk, RegisterRequest, RegisterResponse, agent_message, artifact_upload,
    coordinator_message,
};
use futures::Stream;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::api::artifacts::blob_key;
use crate::api::configs::{effective_configuration, secret_context};
use crate::api_error::ApiError;
use crate::blob_store::BlobStore;
use crate::fleet::{AgentPresence, Fleet};
use crate::log_segments::{self, LogLevel, LogLine};
use crate::node::{Node, NodeError, Requester};
use crate::secrets::MasterKeys;
use crate::state::Command;
use crate::state::apply::{index, index_ids, job_status_name, load_id};
use crate::state::command::{ArtifactOrigin, JobEnd};
use crate::state::events::StateEvent;
use crate::state::records::{Agent, Deployment, Job, JobStatus, StepRecord, StepState};
use crate::state::{Outcome, RejectionCode};
use crate::store::Table;

/// Credentials look like `dak_<secret>`; only their SHA-256 is stored (indexed, to find the agent).
pub const CREDENTIAL_PREFIX: &str = "dak_";

pub fn new_credential() -> String {
    format!("{CREDENTIAL_PREFIX}{}", crate::auth::random_secret(48))
}

/// What one connected agent has been offered and says it runs.
struct SessionState {
    capacity: u32,
    draining: bool,
    /// Jobs offered to (or reported by) the agent: job id -> attempt.
    jobs: HashMap<u64, u32>,
    last_heartbeat: Instant,
}

struct Session {
    agent_id: u64,
    /// Distinguishes a replaced session from its successor.
    session_id: u64,
    outbox: mpsc::Sender<Result<CoordinatorMessage, Status>>,
    state: Mutex<SessionState>,
}

impl Session {
    fn send(&self, message: coordinator_message::Message) -> bool {
        self.outbox.try_send(Ok(CoordinatorMessage { message: Some(message) })).is_ok()
    }
}

pub struct AgentGateway {
    node: Arc<Node>,
    secrets: Arc<MasterKeys>,
    blobs: Arc<dyn BlobStore>,
    fleet: Arc<Fleet>,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    next_session_id: std::sync::atomic::AtomicU64,
    heartbeat_interval: Duration,
    upload_dir: PathBuf,
}

fn status_of(error: ApiError) -> Status {
    match error.status.as_u16() {
        400 | 413 | 422 => Status::invalid_argument(error.message),
        401 => Status::unauthenticated(error.message),
        403 => Status::permission_denied(error.message),
        404 => Status::not_found(error.message),
        409 => Status::failed_precondition(error.message),
        503 => Status::unavailable(error.message),
        _ => Status::internal(error.message),
    }
}

fn node_status(error: NodeError) -> Status {
    error.into()
}

fn level_of(level: i32) -> LogLevel {
    match pb::LogLevel::try_from(level).unwrap_or(pb::LogLevel::Info) {
        pb::LogLevel::Debug => LogLevel::Debug,
        pb::LogLevel::Warning => LogLevel::Warning,
        pb::LogLevel::Error => LogLevel::Error,
        pb::LogLevel::Info | pb::LogLevel::Unspecified => LogLevel::Info,
    }
}

/// The checksum an agent puts on a log chunk: SHA-256 over each line's text and a newline.
pub fn chunk_checksum<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut hasher = Sha256::new();
    for line in lines {
        hasher.update(line.as_bytes());
        hasher.update(b"\n");
    }
    hasher.finalize().to_vec()
}

impl AgentGateway {
    pub fn new(
        node: Arc<Node>,
        secrets: Arc<MasterKeys>,
        blobs: Arc<dyn BlobStore>,
        fleet: Arc<Fleet>,
        heartbeat_interval: Duration,
    ) -> Arc<Self> {
        let upload_dir = node.config.data_dir.join("uploads");
        Arc::new(AgentGateway {
            node,
            secrets,
            blobs,
            fleet,
            sessions: Mutex::new(HashMap::new()),
            next_session_id: std::sync::atomic::AtomicU64::new(1),
            heartbeat_interval,
            upload_dir,
        })
    }

    /// Start the background work: offers on applied assignments, cancellations, and the
    /// reports of this node's sessions to the leader.
    pub fn start(self: &Arc<Self>) {
        let gateway = self.clone();
        tokio::spawn(async move { gateway.follow_state().await });
        let gateway = self.clone();
        tokio::spawn(async move { gateway.report_loop().await });
    }

    /// The agent a request's credential belongs to.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<Agent, Status> {
        let header = request.metadata().get("authorization").and_then(|value| value.to_str().ok()).ok_or_else(|| {
            Status::unauthenticated("missing `authorization: Bearer <agent credential>`; run `davit-agent register` first")
        })?;
        let credential = header.strip_prefix("Bearer ").unwrap_or(header).trim();
        if !credential.starts_with(CREDENTIAL_PREFIX) {
            return Err(Status::unauthenticated("malformed agent credential (it starts with dak_); run `davit-agent register` again"));
        }
        // The index is keyed by the credential's SHA-256, so the lookup itself reveals nothing
        // about the credential's bytes.
        let presented = crate::auth::token_hash(credential);
        let state = self.node.state();
        let agent_id =
            index_ids(&state, index::AGENTS_BY_CREDENTIAL, &presented).map_err(|e| Status::internal(e.to_string()))?.first().copied();
        let agent = agent_id
            .map(|agent_id| load_id::<Agent>(&state, Table::Agents, agent_id))
            .transpose()
            .map_err(|e| Status::internal(e.to_string()))?
            .flatten()
            .ok_or_else(|| Status::unauthenticated("the agent credential is not valid; run `davit-agent register` again"))?;
        let agent_id = agent.agent_id;
        if agent.deregistered_at.is_some() {
            return Err(Status::permission_denied(format!("agent {agent_id} was deregistered; register it again")));
        }
        Ok(agent)
    }

    async fn propose(&self, command: Command) -> Result<Outcome, Status> {
        let (outcome, _) = self.node.propose(&Requester::system(), command).await.map_err(node_status)?;
        Ok(outcome)
    }

    fn session(&self, agent_id: u64) -> Option<Arc<Session>> {
        self.sessions.lock().expect("sessions lock").get(&agent_id).cloned()
    }

    /// Jobs leased to `agent_id` in this node's applied state: job id -> (attempt, accepted).
    fn leased_jobs(&self, agent_id: u64) -> Result<Vec<Job>, Status> {
        let state = self.node.state();
        let mut jobs = Vec::new();
        for job_id in
            index_ids(&state, index::JOBS_BY_STATUS, job_status_name(JobStatus::Running)).map_err(|e| Status::internal(e.to_string()))?
        {
            if let Some(job) = load_id::<Job>(&state, Table::Jobs, job_id).map_err(|e| Status::internal(e.to_string()))?
                && job.lease.as_ref().is_some_and(|lease| lease.agent_id == agent_id)
            {
                jobs.push(job);
            }
        }
        Ok(jobs)
    }

    /// The offer of a job: its spec and its environment's configuration with secrets opened.
    async fn offer_for(&self, job: &Job) -> Result<pb::JobOffer, Status> {
        let deployment = load_id::<Deployment>(&self.node.state(), Table::Deployments, job.deployment_id)
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("deployment {} of job {} is gone", job.deployment_id, job.job_id)))?;
        let rows =
            effective_configuration(&self.node, &deployment.environment, Some(deployment.pipeline_id), true).await.map_err(status_of)?;
        let mut env = Vec::new();
        for (key, row) in rows {
            let value = if row.is_secret {
                self.secrets
                    .open(&row.value, &secret_context(&row.environment, row.pipeline_id, &row.key))
                    .map_err(|e| Status::internal(format!("secret {key:?} of {} cannot be opened on this node: {e}", row.environment)))?
            } else {
                row.value
            };
            env.push(pb::EnvVar { name: key, value, secret: row.is_secret });
        }
        for (key, value) in &deployment.config_overrides {
            env.retain(|var| &var.name != key);
            env.push(pb::EnvVar { name: key.clone(), value: value.clone(), secret: crate::api::configs::key_names_a_secret(key) });
        }
        Ok(pb::JobOffer {
            job_id: job.job_id,
            attempt: job.lease.as_ref().map(|lease| lease.attempt).unwrap_or(job.attempt),
            deployment_id: job.deployment_id,
            pipeline_id: job.pipeline_id,
            spec_json: serde_json::to_vec(&job.spec).unwrap_or_default(),
            env,
        })
    }

    async fn offer(&self, session: &Session, job: &Job) {
        let Some(lease) = &job.lease else { return };
        {
            let mut state = session.state.lock().expect("session lock");
            if state.jobs.get(&job.job_id) == Some(&lease.attempt) {
                return;
            }
            state.jobs.insert(job.job_id, lease.attempt);
        }
        match self.offer_for(job).await {
            Ok(offer) => {
                tracing::info!(agent_id = session.agent_id, job_id = job.job_id, attempt = lease.attempt, "offering job");
                session.send(coordinator_message::Message::Offer(offer));
            }
            Err(status) => {
                tracing::warn!(job_id = job.job_id, error = %status.message(), "cannot build the offer");
                session.state.lock().expect("session lock").jobs.remove(&job.job_id);
            }
        }
    }

    /// Bring a session in line with the applied state: offer what is leased to the agent and
    /// not yet offered, cancel what it holds that is no longer leased to it.
    async fn reconcile(&self, session: &Arc<Session>) {
        let Ok(leased) = self.leased_jobs(session.agent_id) else { return };
        let leased_attempts: HashMap<u64, u32> =
            leased.iter().filter_map(|job| job.lease.as_ref().map(|lease| (job.job_id, lease.attempt))).collect();
        let held: Vec<(u64, u32)> =
            session.state.lock().expect("session lock").jobs.iter().map(|(job, attempt)| (*job, *attempt)).collect();
        for (job_id, attempt) in held {
            if leased_attempts.get(&job_id) != Some(&attempt) {
                self.cancel(session, job_id, attempt, "the job is no longer leased to this agent (cancelled, or retried elsewhere)");
            }
        }
        for job in &leased {
            self.offer(session, job).await;
        }
    }

    fn cancel(&self, session: &Session, job_id: u64, attempt: u32, reason: &str) {
        session.state.lock().expect("session lock").jobs.remove(&job_id);
        tracing::info!(agent_id = session.agent_id, job_id, attempt, reason, "cancelling job on agent");
        session.send(coordinator_message::Message::Cancel(pb::CancelJob { job_id, attempt, reason: reason.to_string() }));
    }

    /// React to applied commands: offers for new assignments, cancellations for jobs taken away.
    async fn follow_state(self: Arc<Self>) {
        let mut events = self.node.subscribe();
        let mut full_sweep = tokio::time::interval(Duration::from_secs(5));
        loop {
            let sessions: Vec<Arc<Session>> = tokio::select! {
                event = events.recv() => match event {
                    Ok(StateEvent::JobsAssigned { job_ids }) => {
                        for job_id in job_ids {
                            let Ok(Some(job)) = load_id::<Job>(&self.node.state(), Table::Jobs, job_id) else { continue };
                            if let Some(session) = job.lease.as_ref().and_then(|lease| self.session(lease.agent_id)) {
                                self.offer(&session, &job).await;
                            }
                        }
                        continue;
                    }
                    Ok(StateEvent::JobsChanged { job_ids }) => {
                        let all: Vec<Arc<Session>> = self.sessions.lock().expect("sessions lock").values().cloned().collect();
                        all.into_iter().filter(|session| {
                            let state = session.state.lock().expect("session lock");
                            job_ids.iter().any(|job_id| state.jobs.contains_key(job_id))
                        }).collect()
                    }
                    Ok(StateEvent::AgentChanged { agent_id }) => self.session(agent_id).into_iter().collect(),
                    Ok(StateEvent::WorkChanged) => continue,
                    Ok(StateEvent::DeploymentChanged { .. }) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        self.sessions.lock().expect("sessions lock").values().cloned().collect()
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = full_sweep.tick() => self.sessions.lock().expect("sessions lock").values().cloned().collect(),
            };
            for session in sessions {
                self.reconcile(&session).await;
            }
        }
    }

    fn presence(&self) -> Vec<AgentPresence> {
        let sessions = self.sessions.lock().expect("sessions lock");
        sessions
            .values()
            .map(|session| {
                let state = session.state.lock().expect("session lock");
                AgentPresence {
                    agent_id: session.agent_id,
                    capacity: state.capacity,
                    draining: state.draining,
                    running: state.jobs.iter().map(|(job, attempt)| (*job, *attempt)).collect(),
                    silent_for_ms: state.last_heartbeat.elapsed().as_millis() as u64,
                }
            })
            .collect()
    }

    /// Tell the leader which agents are here: every second, and at once after a change.
    async fn report_loop(self: Arc<Self>) {
        let changed = self.fleet.changed_here();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = changed.notified() => {}
            }
            if let Err(error) = self.report().await {
                tracing::debug!(%error, "could not report agent sessions to the leader");
            }
        }
    }

    async fn report(&self) -> anyhow::Result<()> {
        let presence = self.presence();
        if self.node.is_leader() {
            self.fleet.report(self.node.id(), presence);
            return Ok(());
        }
        self.fleet.clear();
        let (_, leader) = self.node.leader()?;
        let mut client = self.node.cluster_client(&leader)?;
        let request = davit_proto::cluster::AgentReport { node_id: self.node.id(), sessions_json: serde_json::to_vec(&presence)? };
        tokio::time::timeout(Duration::from_secs(2), client.report_agents(request)).await??;
        Ok(())
    }

    fn welcome(&self, agent_id: u64) -> pb::Welcome {
        let metrics = self.node.metrics();
        let coordinators = metrics
            .membership_config
            .membership()
            .nodes()
            .map(|(_, node)| pb::CoordinatorAddress { grpc_addr: node.grpc_addr.clone(), region: node.region.clone() })
            .collect();
        pb::Welcome {
            agent_id,
            coordinator_node_id: self.node.id(),
            coordinator_region: self.node.config.region.clone(),
            heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u32,
            coordinators,
        }
    }

    async fn handle_message(&self, session: &Arc<Session>, message: agent_message::Message) -> Result<(), Status> {
        match message {
            agent_message::Message::Hello(_) => Err(Status::invalid_argument("hello may only be the first message of a session")),
            agent_message::Message::Heartbeat(heartbeat) => {
                let draining_changed = {
                    let mut state = session.state.lock().expect("session lock");
                    state.last_heartbeat = Instant::now();
                    let changed = state.draining != heartbeat.draining;
                    state.draining = heartbeat.draining;
                    changed
                };
                if draining_changed {
                    self.announce(session.agent_id, None).await?;
                }
                Ok(())
            }
            agent_message::Message::Accept(accept) => {
                let outcome =
                    self.propose(Command::AcceptJob { job_id: accept.job_id, agent_id: session.agent_id, attempt: accept.attempt }).await?;
                if let Err(rejection) = outcome.result {
                    self.cancel(session, accept.job_id, accept.attempt, &rejection.message);
                }
                Ok(())
            }
            agent_message::Message::Step(step) => {
                let state = match pb::StepState::try_from(step.state).unwrap_or(pb::StepState::Unspecified) {
                    pb::StepState::Running => StepState::Running,
                    pb::StepState::Succeeded => StepState::Succeeded,
                    pb::StepState::Failed => StepState::Failed,
                    pb::StepState::Skipped => StepState::Skipped,
                    pb::StepState::Cancelled => StepState::Cancelled,
                    pb::StepState::Unspecified => StepState::Pending,
                };
                let record = StepRecord {
                    index: step.index,
                    name: step.name,
                    state,
                    started_at: (step.started_at > 0).then_some(step.started_at),
                    finished_at: (step.finished_at > 0).then_some(step.finished_at),
                    exit_code: matches!(state, StepState::Succeeded | StepState::Failed).then_some(step.exit_code),
                };
                let outcome = self.propose(Command::RecordStep { job_id: step.job_id, attempt: step.attempt, step: record }).await?;
                if let Err(rejection) = outcome.result
                    && rejection.code == RejectionCode::StaleAttempt
                {
                    self.cancel(session, step.job_id, step.attempt, &rejection.message);
                }
                Ok(())
            }
            agent_message::Message::Result(result) => {
                let ack = self.finish(session, result).await?;
                session.send(coordinator_message::Message::ResultAck(ack));
                Ok(())
            }
        }
    }

    /// The agent's final report: accepted only from the attempt holding the lease, and only
    /// once every log chunk it announces is stored.
    async fn finish(&self, session: &Arc<Session>, result: pb::JobResult) -> Result<pb::ResultAck, Status> {
        let refuse = |reason: String| pb::ResultAck { job_id: result.job_id, attempt: result.attempt, accepted: false, reason };
        let job = match load_id::<Job>(&self.node.state(), Table::Jobs, result.job_id).map_err(|e| Status::internal(e.to_string()))? {
            Some(job) => job,
            None => return Ok(refuse(format!("job {} does not exist", result.job_id))),
        };
        let stored = log_segments::stored_chunks(&self.node, job.deployment_id, job.job_id, result.attempt).map_err(status_of)?;
        if stored < result.log_chunks {
            return Ok(refuse(format!("only {stored} of {} log chunks are stored; send the rest first", result.log_chunks)));
        }
        let end = match pb::JobOutcome::try_from(result.outcome).unwrap_or(pb::JobOutcome::Unspecified) {
            pb::JobOutcome::Succeeded => JobEnd::Succeeded,
            pb::JobOutcome::Failed => JobEnd::Failed,
            pb::JobOutcome::Infrastructure => JobEnd::Infrastructure,
            pb::JobOutcome::Cancelled => JobEnd::Cancelled,
            pb::JobOutcome::Unspecified => return Err(Status::invalid_argument("job result without an outcome")),
        };
        let reason = (!result.reason.is_empty()).then_some(result.reason.clone());
        // The agent is done with it: no cancellation should chase the finished job.
        {
            let mut state = session.state.lock().expect("session lock");
            if state.jobs.get(&result.job_id) == Some(&result.attempt) {
                state.jobs.remove(&result.job_id);
            }
        }
        let outcome = self.propose(Command::FinishJob { job_id: result.job_id, attempt: result.attempt, end, reason }).await?;
        Ok(match outcome.result {
            Ok(_) => pb::ResultAck { job_id: result.job_id, attempt: result.attempt, accepted: true, reason: String::new() },
            Err(rejection) => refuse(rejection.message),
        })
    }

    /// Record the agent's session (labels, capacity, draining) in the replicated state.
    async fn announce(&self, agent_id: u64, hello: Option<&pb::Hello>) -> Result<(), Status> {
        let session = self.session(agent_id).ok_or_else(|| Status::aborted("session replaced"))?;
        let (capacity, draining) = {
            let state = session.state.lock().expect("session lock");
            (state.capacity, state.draining)
        };
        let agent = load_id::<Agent>(&self.node.state(), Table::Agents, agent_id).map_err(|e| Status::internal(e.to_string()))?;
        let (labels, executors, version) = match (hello, agent) {
            (Some(hello), _) => {
                (hello.labels.clone().into_iter().collect::<BTreeMap<_, _>>(), hello.executors.clone(), hello.version.clone())
            }
            (None, Some(agent)) => (agent.labels, agent.executors, agent.version),
            (None, None) => return Err(Status::not_found(format!("agent {agent_id} is gone"))),
        };
        let command = Command::AgentConnected { agent_id, node_id: self.node.id(), labels, capacity, executors, draining, version };
        match self.propose(command).await?.result {
            Ok(_) => {
                self.fleet.notify_here();
                Ok(())
            }
            Err(rejection) => Err(Status::permission_denied(rejection.message)),
        }
    }

    async fn run_session(self: Arc<Self>, session: Arc<Session>, hello: pb::Hello, mut inbound: Streaming<AgentMessage>) {
        let agent_id = session.agent_id;
        // Jobs the agent still runs: keep those leased to it, cancel the others. Jobs leased to
        // it that it no longer runs were lost with its previous process: retry them.
        let running: HashMap<u64, u32> = hello.running.iter().map(|job| (job.job_id, job.attempt)).collect();
        if let Ok(leased) = self.leased_jobs(agent_id) {
            for job in leased {
                let lease = job.lease.clone().expect("leased jobs have a lease");
                if running.get(&job.job_id) == Some(&lease.attempt) {
                    session.state.lock().expect("session lock").jobs.insert(job.job_id, lease.attempt);
                } else if lease.accepted_at.is_some() {
                    let reason = format!("agent {agent_id} reconnected without attempt {} (it restarted)", lease.attempt);
                    let _ = self.propose(Command::ExpireLease { job_id: job.job_id, attempt: lease.attempt, reason: Some(reason) }).await;
                }
            }
        }
        for (job_id, attempt) in &running {
            if !session.state.lock().expect("session lock").jobs.contains_key(job_id) {
                self.cancel(&session, *job_id, *attempt, "the job is no longer leased to this agent");
            }
        }
        self.reconcile(&session).await;
        loop {
            let message = match inbound.next().await {
                Some(Ok(AgentMessage { message: Some(message) })) => message,
                Some(Ok(AgentMessage { message: None })) => continue,
                Some(Err(status)) => {
                    tracing::info!(agent_id, error = %status.message(), "agent session ended");
                    break;
                }
                None => break,
            };
            if let Err(status) = self.handle_message(&session, message).await {
                tracing::warn!(agent_id, error = %status.message(), "agent message failed");
                let _ = session.outbox.send(Err(status)).await;
                break;
            }
        }
        let mut sessions = self.sessions.lock().expect("sessions lock");
        if sessions.get(&agent_id).is_some_and(|current| current.session_id == session.session_id) {
            sessions.remove(&agent_id);
        }
        drop(sessions);
        self.fleet.notify_here();
    }

    async fn receive_upload(&self, meta: &ArtifactMeta, inbound: &mut Streaming<ArtifactUpload>) -> Result<(PathBuf, u64), Status> {
        std::fs::create_dir_all(&self.upload_dir).map_err(|e| Status::internal(format!("upload directory: {e}")))?;
        let path = self.upload_dir.join(format!("{}-{}.tar.zst", meta.digest, crate::auth::random_secret(8).to_ascii_lowercase()));
        let mut file = tokio::fs::File::create(&path).await.map_err(|e| Status::internal(format!("upload file: {e}")))?;
        let mut verifier = davit_agent::packing::Verifier::new();
        let mut received = 0u64;
        let result: Result<(), Status> = async {
            while let Some(part) = inbound.next().await {
                match part?.part {
                    Some(artifact_upload::Part::Data(data)) => {
                        received += data.len() as u64;
                        verifier.update(&data).map_err(|e| Status::invalid_argument(format!("artifact stream is not valid zstd: {e}")))?;
                        tokio::io::AsyncWriteExt::write_all(&mut file, &data).await.map_err(|e| Status::internal(e.to_string()))?;
                    }
                    _ => return Err(Status::invalid_argument("only the first upload message may carry metadata")),
                }
            }
            tokio::io::AsyncWriteExt::flush(&mut file).await.map_err(|e| Status::internal(e.to_string()))?;
            let (digest, size) =
                verifier.finish().map_err(|e| Status::invalid_argument(format!("artifact stream is truncated or corrupt: {e}")))?;
            if digest != meta.digest {
                return Err(Status::invalid_argument(format!(
                    "digest mismatch: the agent announced sha256:{} but the bytes received hash to sha256:{digest}",
                    meta.digest
                )));
            }
            if meta.uncompressed_bytes != 0 && size != meta.uncompressed_bytes {
                return Err(Status::invalid_argument(format!(
                    "size mismatch: announced {} bytes, received {size}",
                    meta.uncompressed_bytes
                )));
            }
            Ok(())
        }
        .await;
        if let Err(status) = result {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(status);
        }
        file.sync_all().await.map_err(|e| Status::internal(e.to_string()))?;
        Ok((path, received))
    }

    async fn record_artifact(&self, meta: &ArtifactMeta, uploaded: bool) -> Result<ArtifactRecorded, Status> {
        let job = load_id::<Job>(&self.node.state(), Table::Jobs, meta.job_id)
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("job {} does not exist", meta.job_id)))?;
        let deployment = load_id::<Deployment>(&self.node.state(), Table::Deployments, job.deployment_id)
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("deployment {} does not exist", job.deployment_id)))?;
        let kind = if meta.name == "image" { "image" } else { "files" };
        let command = Command::RecordArtifact {
            pipeline_id: job.pipeline_id,
            version: meta.version.clone(),
            artifact_path: blob_key(&meta.digest),
            digest: meta.digest.clone(),
            size_bytes: meta.uncompressed_bytes,
            produced_by: Some(ArtifactOrigin {
                deployment_id: job.deployment_id,
                job_id: job.job_id,
                attempt: meta.attempt,
                commit_hash: deployment.commit_hash,
                kind: kind.to_string(),
            }),
        };
        match self.propose(command).await?.result {
            Ok(applied) => Ok(ArtifactRecorded { artifact_id: applied.id.unwrap_or(0), uploaded }),
            Err(rejection) if rejection.code == RejectionCode::StaleAttempt => Err(Status::failed_precondition(rejection.message)),
            Err(rejection) => Err(Status::invalid_argument(rejection.message)),
        }
    }

    fn check_lease(&self, job_id: u64, attempt: u32) -> Result<Job, Status> {
        let job = load_id::<Job>(&self.node.state(), Table::Jobs, job_id)
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("job {job_id} does not exist")))?;
        let holds = job.status == JobStatus::Running && job.lease.as_ref().is_some_and(|lease| lease.attempt == attempt);
        if !holds {
            return Err(Status::failed_precondition(format!(
                "attempt {attempt} of job {job_id} no longer holds the lease; its reports are refused"
            )));
        }
        Ok(job)
    }
}

fn valid_digest(digest: &str) -> Result<(), Status> {
    if digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(Status::invalid_argument("digest must be 64 lower-case hex characters (SHA-256)"))
    }
}

pub struct AgentGrpc(pub Arc<AgentGateway>);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AgentService for AgentGrpc {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let gateway = &self.0;
        let request = request.into_inner();
        if request.name.trim().is_empty() {
            return Err(Status::invalid_argument("the agent needs a name (--name, default the host name)"));
        }
        let credential = new_credential();
        let command = Command::RegisterAgent {
            name: request.name.clone(),
            labels: request.labels.into_iter().collect(),
            credential_hash: crate::auth::token_hash(&credential),
            registration_token_hash: crate::auth::token_hash(request.registration_token.trim()),
        };
        let agent_id = match gateway.propose(command).await?.result {
            Ok(applied) => applied.id.expect("register returns the id"),
            Err(rejection) if rejection.code == RejectionCode::Conflict => return Err(Status::already_exists(rejection.message)),
            Err(rejection) => return Err(Status::permission_denied(rejection.message)),
        };
        tracing::info!(agent_id, name = %request.name, "agent registered");
        Ok(Response::new(RegisterResponse { agent_id, credential }))
    }

    type SessionStream = BoxStream<CoordinatorMessage>;

    async fn session(&self, request: Request<Streaming<AgentMessage>>) -> Result<Response<Self::SessionStream>, Status> {
        let gateway = self.0.clone();
        let agent = gateway.authenticate(&request)?;
        let mut inbound = request.into_inner();
        let hello = match inbound.next().await {
            Some(Ok(AgentMessage { message: Some(agent_message::Message::Hello(hello)) })) => hello,
            Some(Err(status)) => return Err(status),
            _ => return Err(Status::invalid_argument("a session starts with a hello")),
        };
        let (outbox, outgoing) = mpsc::channel(256);
        let session = Arc::new(Session {
            agent_id: agent.agent_id,
            session_id: gateway.next_session_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            outbox,
            state: Mutex::new(SessionState {
                capacity: hello.capacity.max(1),
                draining: hello.draining,
                jobs: HashMap::new(),
                last_heartbeat: Instant::now(),
            }),
        });
        gateway.sessions.lock().expect("sessions lock").insert(agent.agent_id, session.clone());
        if let Err(status) = gateway.announce(agent.agent_id, Some(&hello)).await {
            let mut sessions = gateway.sessions.lock().expect("sessions lock");
            if sessions.get(&agent.agent_id).is_some_and(|current| current.session_id == session.session_id) {
                sessions.remove(&agent.agent_id);
            }
            return Err(status);
        }
        session.send(coordinator_message::Message::Welcome(gateway.welcome(agent.agent_id)));
        tracing::info!(agent_id = agent.agent_id, name = %agent.name, "agent session opened");
        tokio::spawn(gateway.clone().run_session(session, hello, inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(outgoing))))
    }

    type ShipLogsStream = BoxStream<LogAck>;

    async fn ship_logs(&self, request: Request<Streaming<LogChunk>>) -> Result<Response<Self::ShipLogsStream>, Status> {
        let gateway = self.0.clone();
        let agent = gateway.authenticate(&request)?;
        let mut inbound = request.into_inner();
        let (acks, outgoing) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(chunk) = inbound.next().await {
                let chunk = match chunk {
                    Ok(chunk) => chunk,
                    Err(_) => break,
                };
                let ack = gateway.store_chunk(agent.agent_id, chunk).await;
                let failed = ack.is_err();
                if acks.send(ack).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outgoing))))
    }

    async fn has_artifact(&self, request: Request<HasArtifactRequest>) -> Result<Response<HasArtifactResponse>, Status> {
        self.0.authenticate(&request)?;
        let digest = request.into_inner().digest;
        valid_digest(&digest)?;
        let stored = self.0.blobs.exists(&blob_key(&digest)).await.map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(HasArtifactResponse { stored }))
    }

    async fn upload_artifact(&self, request: Request<Streaming<ArtifactUpload>>) -> Result<Response<ArtifactRecorded>, Status> {
        let gateway = &self.0;
        gateway.authenticate(&request)?;
        let mut inbound = request.into_inner();
        let meta = match inbound.next().await {
            Some(Ok(ArtifactUpload { part: Some(artifact_upload::Part::Meta(meta)) })) => meta,
            Some(Err(status)) => return Err(status),
            _ => return Err(Status::invalid_argument("an upload starts with the artifact's metadata")),
        };
        valid_digest(&meta.digest)?;
        gateway.check_lease(meta.job_id, meta.attempt)?;
        let started = Instant::now();
        let (path, received) = gateway.receive_upload(&meta, &mut inbound).await?;
        let key = blob_key(&meta.digest);
        let stored = gateway.blobs.put_file(&key, &path).await;
        let _ = tokio::fs::remove_file(&path).await;
        stored.map_err(|e| Status::internal(e.to_string()))?;
        metrics::counter!("davit_artifact_upload_bytes_total").increment(received);
        metrics::histogram!("davit_artifact_upload_seconds").record(started.elapsed().as_secs_f64());
        Ok(Response::new(gateway.record_artifact(&meta, true).await?))
    }

    async fn record_artifact(&self, request: Request<ArtifactMeta>) -> Result<Response<ArtifactRecorded>, Status> {
        let gateway = &self.0;
        gateway.authenticate(&request)?;
        let meta = request.into_inner();
        valid_digest(&meta.digest)?;
        gateway.check_lease(meta.job_id, meta.attempt)?;
        if !gateway.blobs.exists(&blob_key(&meta.digest)).await.map_err(|e| Status::internal(e.to_string()))? {
            return Err(Status::not_found(format!("no stored artifact has digest sha256:{}; upload it", meta.digest)));
        }
        Ok(Response::new(gateway.record_artifact(&meta, false).await?))
    }

    type FetchArtifactStream = BoxStream<ArtifactData>;

    async fn fetch_artifact(&self, request: Request<FetchArtifactRequest>) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let gateway = self.0.clone();
        gateway.authenticate(&request)?;
        let digest = request.into_inner().digest;
        valid_digest(&digest)?;
        let reader = gateway
            .blobs
            .open(&blob_key(&digest), 0)
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("no stored artifact has digest sha256:{digest}")))?;
        let stream = tokio_util::io::ReaderStream::with_capacity(reader.reader, 1 << 20)
            .map(|chunk| chunk.map(|data| ArtifactData { data: data.to_vec() }).map_err(|e| Status::internal(e.to_string())));
        Ok(Response::new(Box::pin(stream)))
    }
}

impl AgentGateway {
    async fn store_chunk(&self, agent_id: u64, chunk: LogChunk) -> Result<LogAck, Status> {
        let refuse = |reason: String| LogAck { job_id: chunk.job_id, attempt: chunk.attempt, sequence: 0, refused: reason };
        let job = match self.check_lease(chunk.job_id, chunk.attempt) {
            Ok(job) => job,
            Err(status) => return Ok(refuse(status.message().to_string())),
        };
        if job.lease.as_ref().is_some_and(|lease| lease.agent_id != agent_id) {
            return Ok(refuse(format!("job {} is leased to another agent", chunk.job_id)));
        }
        if chunk.sequence == 0 || chunk.sequence > u64::from(u32::MAX) {
            return Err(Status::invalid_argument("log chunk sequences start at 1"));
        }
        if chunk_checksum(chunk.lines.iter().map(|line| line.text.as_str())) != chunk.sha256 {
            return Err(Status::data_loss(format!("log chunk {} of job {} failed its checksum; resend it", chunk.sequence, chunk.job_id)));
        }
        let sequence = log_segments::chunk_sequence(chunk.attempt, chunk.sequence);
        if chunk.sequence > 1
            && !log_segments::segment_exists(&self.node, job.deployment_id, job.job_id, sequence - 1).map_err(status_of)?
        {
            return Err(Status::failed_precondition(format!(
                "log chunk {} of job {} arrived before chunk {}; resend from the last acknowledged chunk",
                chunk.sequence,
                chunk.job_id,
                chunk.sequence - 1
            )));
        }
        let lines: Vec<LogLine> = chunk
            .lines
            .into_iter()
            .map(|line| LogLine {
                timestamp: line.timestamp,
                level: level_of(line.level),
                job_id: job.job_id,
                message: line.text,
                step: Some(line.step),
            })
            .collect();
        let bytes: usize = lines.iter().map(|line| line.message.len() + 1).sum();
        log_segments::store_chunk(&self.node, self.blobs.as_ref(), job.deployment_id, job.job_id, sequence, &lines)
            .await
            .map_err(status_of)?;
        metrics::counter!("davit_log_ingest_bytes_total").increment(bytes as u64);
        Ok(LogAck { job_id: job.job_id, attempt: chunk.attempt, sequence: chunk.sequence, refused: String::new() })
    }
}
