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
use crate::release_usage::ReleaseUsage;
use crate::secrets::MasterKeys;
use crate::state::Command;
use crate::state::apply::{index, index_ids, job_status_name, load_id};
use crate::state::command::{ArtifactOrigin, JobEnd, JobMeasurements};
use crate::state::config_history;
use crate::state::events::StateEvent;
use crate::state::records::{Agent, ConfigVersion, Deployment, Job, JobStatus, ResourceUsage, StepRecord, StepState};
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
    /// Attempts the agent reported a result for: job id -> (attempt, when). Until its
    /// `FinishJob` is applied such a job still reads as leased to the agent, and a
    /// reconciliation then must not offer it again (the agent would run it twice).
    finished: HashMap<u64, (u32, Instant)>,
    last_heartbeat: Instant,
}

/// How long a reported result keeps its attempt from being offered again, at least: far longer
/// than a `FinishJob` takes to apply. A finished attempt never becomes leased again (a retry is
/// a new attempt), so forgetting it later is safe.
const FINISHED_REMEMBERED: Duration = Duration::from_secs(60);

/// Release samples read from one `ReleaseStats` message (one per release container).
const MAX_RELEASE_SAMPLES: usize = 1000;

impl SessionState {
    fn new(capacity: u32, draining: bool) -> Self {
        SessionState { capacity, draining, jobs: HashMap::new(), finished: HashMap::new(), last_heartbeat: Instant::now() }
    }

    /// Whether `attempt` of `job_id` is to be offered now; if so it counts as offered.
    fn take_offer(&mut self, job_id: u64, attempt: u32) -> bool {
        let finished = self.finished.get(&job_id).is_some_and(|(reported, _)| *reported == attempt);
        if finished || self.jobs.get(&job_id) == Some(&attempt) {
            return false;
        }
        self.jobs.insert(job_id, attempt);
        true
    }

    /// The agent reported the attempt's result: it no longer holds the job, and is not offered
    /// that attempt again.
    fn report_finished(&mut self, job_id: u64, attempt: u32) {
        if self.jobs.get(&job_id) == Some(&attempt) {
            self.jobs.remove(&job_id);
        }
        self.finished.insert(job_id, (attempt, Instant::now()));
    }

    /// Forget reported results that are old and no longer leased (`leased`: job id -> attempt).
    fn forget_finished(&mut self, leased: &HashMap<u64, u32>) {
        self.finished
            .retain(|job_id, (attempt, reported_at)| reported_at.elapsed() < FINISHED_REMEMBERED || leased.get(job_id) == Some(attempt));
    }
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
    /// Live samples of release containers from this node's sessions.
    release_usage: Arc<ReleaseUsage>,
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
        release_usage: Arc<ReleaseUsage>,
        heartbeat_interval: Duration,
    ) -> Arc<Self> {
        let upload_dir = node.config.data_dir.join("uploads");
        Arc::new(AgentGateway {
            node,
            secrets,
            blobs,
            fleet,
            release_usage,
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

    /// Jobs leased to `agent_id` in this node's applied state.
    fn leased_jobs(&self, agent_id: u64) -> Result<Vec<Job>, Status> {
        Ok(self.leases_by_agent()?.remove(&agent_id).unwrap_or_default())
    }

    /// Every running job in this node's applied state, by the agent holding its lease: one
    /// pass over the running jobs, whatever the number of sessions to reconcile.
    fn leases_by_agent(&self) -> Result<HashMap<u64, Vec<Job>>, Status> {
        let state = self.node.state();
        let mut by_agent: HashMap<u64, Vec<Job>> = HashMap::new();
        for job_id in
            index_ids(&state, index::JOBS_BY_STATUS, job_status_name(JobStatus::Running)).map_err(|e| Status::internal(e.to_string()))?
        {
            if let Some(job) = load_id::<Job>(&state, Table::Jobs, job_id).map_err(|e| Status::internal(e.to_string()))?
                && let Some(agent_id) = job.lease.as_ref().map(|lease| lease.agent_id)
            {
                by_agent.entry(agent_id).or_default().push(job);
            }
        }
        Ok(by_agent)
    }

    /// The offer of a job: its spec and its environment's configuration with secrets opened.
    async fn offer_for(&self, job: &Job) -> Result<pb::JobOffer, Status> {
        let deployment = load_id::<Deployment>(&self.node.state(), Table::Deployments, job.deployment_id)
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("deployment {} of job {} is gone", job.deployment_id, job.job_id)))?;
        let mut env = Vec::new();
        for row in self.configuration_of(&deployment, job).await? {
            let value = if row.is_secret {
                self.secrets.open(&row.value, &secret_context(&row.environment, row.pipeline_id, &row.key)).map_err(|e| {
                    Status::internal(format!("secret {:?} of {} cannot be opened on this node: {e}", row.key, row.environment))
                })?
            } else {
                row.value
            };
            env.push(pb::EnvVar { name: row.key, value, secret: row.is_secret });
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

    /// The configuration (sealed, as stored) a job of `deployment` runs with: the versions the
    /// deployment resolved, read from the history. A deployment from before versions existed
    /// gives its release jobs the copies its rollout recorded, and its build the environment's
    /// configuration as it is now.
    async fn configuration_of(&self, deployment: &Deployment, job: &Job) -> Result<Vec<ConfigVersion>, Status> {
        if let Some(references) = &deployment.configuration {
            let state = self.node.state();
            let mut rows = Vec::with_capacity(references.len());
            for reference in references {
                let version = config_history::load_version(&state, reference.config_id, reference.version)
                    .map_err(|e| Status::internal(e.to_string()))?
                    .ok_or_else(|| {
                        Status::internal(format!(
                            "version {} of configuration {:?} (config id {}) that deployment {} references is missing from the history",
                            reference.version, reference.key, reference.config_id, deployment.deployment_id
                        ))
                    })?;
                rows.push(version);
            }
            return Ok(rows);
        }
        let copies = match deployment.rollout.as_ref().filter(|_| crate::state::rollout::is_release_job(job)) {
            Some(rollout) => rollout.config.clone(),
            None => effective_configuration(&self.node, &deployment.environment, Some(deployment.pipeline_id), true)
                .await
                .map_err(status_of)?
                .into_values()
                .collect(),
        };
        Ok(copies.iter().map(config_history::as_version).collect())
    }

    async fn offer(&self, session: &Session, job: &Job) {
        let Some(lease) = &job.lease else { return };
        if !session.state.lock().expect("session lock").take_offer(job.job_id, lease.attempt) {
            return;
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
        self.reconcile_with(session, leased).await;
    }

    /// [`Self::reconcile`] for many sessions, reading the running jobs once for all of them.
    async fn reconcile_all(&self, sessions: Vec<Arc<Session>>) {
        let Ok(mut by_agent) = self.leases_by_agent() else { return };
        for session in sessions {
            let leased = by_agent.remove(&session.agent_id).unwrap_or_default();
            self.reconcile_with(&session, leased).await;
        }
    }

    /// Reconcile a session with the jobs leased to its agent.
    async fn reconcile_with(&self, session: &Arc<Session>, leased: Vec<Job>) {
        let leased_attempts: HashMap<u64, u32> =
            leased.iter().filter_map(|job| job.lease.as_ref().map(|lease| (job.job_id, lease.attempt))).collect();
        let held: Vec<(u64, u32)> = {
            let mut state = session.state.lock().expect("session lock");
            state.forget_finished(&leased_attempts);
            state.jobs.iter().map(|(job, attempt)| (*job, *attempt)).collect()
        };
        for (job_id, attempt) in held {
            if leased_attempts.get(&job_id) != Some(&attempt) {
                self.cancel(session, job_id, attempt, "the job is no longer leased to this agent (cancelled, or retried elsewhere)");
            }
        }
        for job in &leased {
            let attempt = job.lease.as_ref().map(|lease| lease.attempt);
            if attempt.is_some() && session.state.lock().expect("session lock").jobs.get(&job.job_id).copied() == attempt {
                continue;
            }
            // `leased` may have been read a while ago (a sweep reads it once for every
            // session): a job the agent finished meanwhile must not be offered again.
            let Ok(Some(current)) = load_id::<Job>(&self.node.state(), Table::Jobs, job.job_id) else { continue };
            let still_leased = current.status == JobStatus::Running
                && current.lease.as_ref().is_some_and(|lease| lease.agent_id == session.agent_id && Some(lease.attempt) == attempt);
            if still_leased {
                self.offer(session, &current).await;
            }
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
                    Ok(StateEvent::WorkChanged | StateEvent::RepositoriesChanged | StateEvent::DeploymentProgress { .. }) => continue,
                    Ok(StateEvent::DeploymentChanged { .. }) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        self.sessions.lock().expect("sessions lock").values().cloned().collect()
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = full_sweep.tick() => self.sessions.lock().expect("sessions lock").values().cloned().collect(),
            };
            if !sessions.is_empty() {
                self.reconcile_all(sessions).await;
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
            agent_message::Message::ReleaseStats(stats) => {
                for sample in stats.samples.iter().take(MAX_RELEASE_SAMPLES) {
                    self.release_usage.record(
                        session.agent_id,
                        &sample.service,
                        &sample.release,
                        sample.at,
                        sample.cpu_millicores,
                        sample.memory_bytes,
                    );
                }
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
        session.state.lock().expect("session lock").report_finished(result.job_id, result.attempt);
        if result.output_json.len() > MAX_JOB_OUTPUT_BYTES {
            return Err(Status::invalid_argument(format!("a job's output is limited to {MAX_JOB_OUTPUT_BYTES} bytes")));
        }
        let output = (!result.output_json.is_empty()).then(|| String::from_utf8_lossy(&result.output_json).into_owned());
        let measured = measurements_of(&result);
        let finish = Command::FinishJob { job_id: result.job_id, attempt: result.attempt, end, reason, output, measured };
        let outcome = self.propose(finish).await?;
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

    /// Receive an upload into a file under `upload_dir`, verifying the digest and length of the
    /// decompressed tar while the bytes arrive: a blocking thread decompresses, hashes and writes
    /// each message while the next one is received. The file is fsynced before this returns.
    async fn receive_upload(&self, meta: &ArtifactMeta, inbound: &mut Streaming<ArtifactUpload>) -> Result<(PathBuf, u64), Status> {
        std::fs::create_dir_all(&self.upload_dir).map_err(|e| Status::internal(format!("upload directory: {e}")))?;
        let path = self.upload_dir.join(format!("{}-{}.tar.zst", meta.digest, crate::auth::random_secret(8).to_ascii_lowercase()));
        let (to_writer, mut received_parts) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        let writer = tokio::task::spawn_blocking({
            let path = path.clone();
            move || -> Result<(String, u64, u64), Status> {
                let file = std::fs::File::create(&path).map_err(|e| Status::internal(format!("upload file: {e}")))?;
                // Writeback starts every few MiB, so the final fsync waits only for the tail.
                let mut file = davit_agent::packing::WritebackFile::new(file);
                let mut verifier = davit_agent::packing::Verifier::new();
                let mut received = 0u64;
                while let Some(data) = received_parts.blocking_recv() {
                    received += data.len() as u64;
                    verifier.update(&data).map_err(|e| Status::invalid_argument(format!("artifact stream is not valid zstd: {e}")))?;
                    std::io::Write::write_all(&mut file, &data).map_err(|e| Status::internal(e.to_string()))?;
                }
                let (digest, size) =
                    verifier.finish().map_err(|e| Status::invalid_argument(format!("artifact stream is truncated or corrupt: {e}")))?;
                file.into_file().sync_all().map_err(|e| Status::internal(e.to_string()))?;
                Ok((digest, size, received))
            }
        });
        let receiving: Result<(), Status> = async {
            while let Some(part) = inbound.next().await {
                match part?.part {
                    Some(artifact_upload::Part::Data(data)) => {
                        if to_writer.send(data).await.is_err() {
                            // The writer stopped on an error, which it returns below.
                            break;
                        }
                    }
                    _ => return Err(Status::invalid_argument("only the first upload message may carry metadata")),
                }
            }
            Ok(())
        }
        .await;
        drop(to_writer);
        let written = writer.await.map_err(|e| Status::internal(format!("the upload writer panicked: {e}")))?;
        let result = receiving.and(written).and_then(|(digest, size, received)| {
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
            Ok(received)
        });
        match result {
            Ok(received) => Ok((path, received)),
            Err(status) => {
                let _ = tokio::fs::remove_file(&path).await;
                Err(status)
            }
        }
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

/// What an agent measured of a job, from its result: the proto's zero values mean "not sent"
/// (proto3), so an older agent's result carries no measurements.
pub fn measurements_of(result: &pb::JobResult) -> JobMeasurements {
    JobMeasurements {
        commit_time: (result.commit_time > 0).then_some(result.commit_time),
        resources: result.resources.as_ref().filter(|usage| usage.samples > 0).map(|usage| ResourceUsage {
            samples: usage.samples,
            cpu_millicores_peak: usage.cpu_millicores_peak,
            cpu_millicores_mean: usage.cpu_millicores_mean,
            memory_bytes_peak: usage.memory_bytes_peak,
            memory_bytes_mean: usage.memory_bytes_mean,
        }),
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
            state: Mutex::new(SessionState::new(hello.capacity.max(1), hello.draining)),
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
        let verified = started.elapsed();
        let key = blob_key(&meta.digest);
        gateway.blobs.adopt_file(&key, &path).await.map_err(|e| Status::internal(e.to_string()))?;
        let stored = started.elapsed();
        metrics::counter!("davit_artifact_upload_bytes_total").increment(received);
        metrics::histogram!("davit_artifact_upload_seconds").record(stored.as_secs_f64());
        let recorded = gateway.record_artifact(&meta, true).await?;
        tracing::info!(
            job_id = meta.job_id,
            digest = %meta.digest,
            compressed_bytes = received,
            uncompressed_bytes = meta.uncompressed_bytes,
            received_and_verified_ms = verified.as_millis() as u64,
            stored_ms = (stored - verified).as_millis() as u64,
            recorded_ms = (started.elapsed() - stored).as_millis() as u64,
            "artifact uploaded"
        );
        Ok(Response::new(recorded))
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

/// A job's output travels through Raft with its result: small JSON only.
const MAX_JOB_OUTPUT_BYTES: usize = 64 * 1024;

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
        let attempt = chunk.attempt;
        // The checksum and the encoding take a few milliseconds of CPU per 512 KiB chunk: off
        // the runtime's workers, so that they keep serving sessions and Raft meanwhile.
        let (job_id, chunk_number) = (job.job_id, chunk.sequence);
        let prepared = log_segments::run_cpu_bound(move || {
            if chunk_checksum(chunk.lines.iter().map(|line| line.text.as_str())) != chunk.sha256 {
                return None;
            }
            let lines: Vec<LogLine> = chunk
                .lines
                .into_iter()
                .map(|line| LogLine {
                    timestamp: line.timestamp,
                    level: level_of(line.level),
                    job_id,
                    message: line.text,
                    step: Some(line.step),
                })
                .collect();
            let bytes: usize = lines.iter().map(|line| line.message.len() + 1).sum();
            Some((log_segments::EncodedSegment::new(&lines), bytes))
        })
        .await
        .map_err(status_of)?;
        let Some((segment, bytes)) = prepared else {
            return Err(Status::data_loss(format!("log chunk {chunk_number} of job {job_id} failed its checksum; resend it")));
        };
        let sequence = log_segments::chunk_sequence(attempt, chunk_number);
        if chunk_number > 1 && !log_segments::segment_exists(&self.node, job.deployment_id, job_id, sequence - 1).map_err(status_of)? {
            return Err(Status::failed_precondition(format!(
                "log chunk {chunk_number} of job {job_id} arrived before chunk {}; resend from the last acknowledged chunk",
                chunk_number - 1
            )));
        }
        log_segments::store_chunk(&self.node, self.blobs.as_ref(), job.deployment_id, job_id, sequence, segment)
            .await
            .map_err(status_of)?;
        metrics::counter!("davit_log_ingest_bytes_total").increment(bytes as u64);
        Ok(LogAck { job_id, attempt, sequence: chunk_number, refused: String::new() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (found by `benches/` dispatch): a reconciliation that read the running jobs
    /// before an agent's `FinishJob` was applied offered the finished attempt again, and a real
    /// agent would have run the job twice.
    #[test]
    fn a_finished_attempt_is_not_offered_again() {
        let mut state = SessionState::new(1, false);
        assert!(state.take_offer(7, 1));
        assert!(!state.take_offer(7, 1), "offered once");
        state.report_finished(7, 1);
        assert!(state.jobs.is_empty(), "no cancellation chases a finished job");
        // Still leased to the agent in the state the reconciliation read: not offered again.
        state.forget_finished(&HashMap::from([(7, 1)]));
        assert!(!state.take_offer(7, 1));
        // A retry is a new attempt, offered as usual.
        assert!(state.take_offer(7, 2));
        // Recent reports are kept even once the job reads as no longer leased.
        state.report_finished(7, 2);
        state.forget_finished(&HashMap::new());
        assert!(!state.take_offer(7, 2));
    }
}
