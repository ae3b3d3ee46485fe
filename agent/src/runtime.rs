//! The agent's main loop: keep one session with a coordinator (its own region's first, others
//! when those fail, reconnecting with backoff), announce labels and capacity, heartbeat, run
//! the jobs offered, stop those cancelled, and report results until each is acknowledged.
//! Draining (`davit-agent drain`, SIGTERM) finishes running jobs and takes no new ones.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use davit_proto::agent::{self as pb, AgentMessage, JobOutcome, agent_message, coordinator_message};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Coordinator};
use crate::config::{AgentConfig, ExecutorChoice, Identity};
use crate::executor::{DockerExecutor, Executor, ShellExecutor};
use crate::jobs::{Ended, JobContext, run_job};
use crate::log_shipping::LogShipper;
use crate::release::ReleaseManager;

struct RunningJob {
    attempt: u32,
    cancel: CancellationToken,
}

struct Shared {
    jobs: Mutex<HashMap<u64, RunningJob>>,
    /// Results not yet acknowledged: (job, attempt) -> result; resent after every reconnect.
    results: Mutex<BTreeMap<(u64, u32), pb::JobResult>>,
    /// The current session's outbox (replaced on reconnect; sends while disconnected are dropped).
    outbox: Mutex<Option<mpsc::UnboundedSender<AgentMessage>>>,
    draining: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn send(&self, message: agent_message::Message) {
        if let Some(outbox) = self.outbox.lock().expect("outbox lock").as_ref() {
            let _ = outbox.send(AgentMessage { message: Some(message) });
        }
    }

    fn running(&self) -> Vec<pb::RunningJob> {
        let jobs = self.jobs.lock().expect("jobs lock");
        jobs.iter().map(|(job_id, job)| pb::RunningJob { job_id: *job_id, attempt: job.attempt }).collect()
    }
}

/// Pick the executor as configured; `auto` says which it took and why.
pub async fn choose_executor(choice: &ExecutorChoice) -> anyhow::Result<Executor> {
    match choice {
        ExecutorChoice::Docker => Ok(Executor::Docker(DockerExecutor::connect().await.map_err(|e| anyhow::anyhow!("{e}"))?)),
        ExecutorChoice::Shell => Ok(Executor::Shell(ShellExecutor::new())),
        ExecutorChoice::Auto => match DockerExecutor::connect().await {
            Ok(docker) => {
                tracing::info!("executor: docker (the Docker engine answered)");
                Ok(Executor::Docker(docker))
            }
            Err(error) => {
                tracing::warn!(
                    "executor: shell, because Docker is not usable here ({error}); builds run as plain processes without limits"
                );
                Ok(Executor::Shell(ShellExecutor::new()))
            }
        },
    }
}

/// Marker files of the jobs this agent runs (`<state_dir>/jobs/<job id>`): what a killed
/// agent left behind is found and removed at its next start.
fn job_marker(config: &AgentConfig, job_id: u64) -> std::path::PathBuf {
    config.state_dir.join("jobs").join(job_id.to_string())
}

async fn clean_up_after_crash(config: &AgentConfig, executor: &Executor) {
    let Ok(entries) = std::fs::read_dir(config.state_dir.join("jobs")) else { return };
    for entry in entries.flatten() {
        let Some(job_id) = entry.file_name().to_str().and_then(|name| name.parse::<u64>().ok()) else { continue };
        tracing::info!(job_id, "removing what the previous run of this agent left of job {job_id}");
        if let Executor::Docker(docker) = executor {
            docker.remove_job_containers(job_id).await;
        }
        if let Ok(workspaces) = std::fs::read_dir(config.state_dir.join("work")) {
            for workspace in workspaces.flatten() {
                let name = workspace.file_name().to_string_lossy().to_string();
                if name.starts_with(&format!("job-{job_id}-")) || name.starts_with(&format!("artifacts-{job_id}-")) {
                    let _ = std::fs::remove_dir_all(workspace.path());
                }
            }
        }
        let _ = std::fs::remove_file(entry.path());
    }
}

/// Order coordinators: this agent's region first, then the rest, each group in the given order.
pub fn preferred_order(coordinators: &[(String, String)], region: Option<&str>) -> Vec<String> {
    let mut ordered: Vec<&(String, String)> = coordinators.iter().collect();
    ordered.sort_by_key(|(_, coordinator_region)| region.is_none_or(|region| region != coordinator_region));
    let mut seen = std::collections::HashSet::new();
    ordered.into_iter().filter(|(address, _)| seen.insert(address.clone())).map(|(address, _)| address.clone()).collect()
}

pub struct AgentRuntime {
    config: AgentConfig,
    identity: Identity,
    executor: Arc<Executor>,
    shared: Arc<Shared>,
    coordinator: watch::Sender<Option<Coordinator>>,
    shipper: LogShipper,
    releases: Arc<ReleaseManager>,
}

impl AgentRuntime {
    pub async fn new(config: AgentConfig, identity: Identity) -> anyhow::Result<AgentRuntime> {
        let executor = Arc::new(choose_executor(&config.executor).await?);
        let (coordinator, watcher) = watch::channel(None);
        let shipper = LogShipper::start(config.state_dir.join("spool"), watcher)?;
        std::fs::create_dir_all(config.state_dir.join("work"))?;
        clean_up_after_crash(&config, &executor).await;
        // Releases always run in Docker, whichever executor builds use.
        let release_docker = match executor.as_ref() {
            Executor::Docker(docker) => Some(docker.clone()),
            Executor::Shell(_) => DockerExecutor::connect().await.ok(),
        };
        let releases = Arc::new(ReleaseManager::restore(&config.state_dir, release_docker, config.service_address).await);
        let shared = Arc::new(Shared {
            jobs: Mutex::new(HashMap::new()),
            results: Mutex::new(BTreeMap::new()),
            outbox: Mutex::new(None),
            draining: std::sync::atomic::AtomicBool::new(false),
        });
        Ok(AgentRuntime { config, identity, executor, shared, coordinator, shipper, releases })
    }

    pub fn executor_name(&self) -> &'static str {
        self.executor.name()
    }

    fn labels(&self) -> HashMap<String, String> {
        let mut labels: HashMap<String, String> = self.identity.labels.clone().into_iter().collect();
        labels.extend(self.config.labels.clone());
        if let Some(region) = &self.config.region {
            labels.insert("region".into(), region.clone());
        }
        labels
    }

    fn draining(&self) -> bool {
        self.shared.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Run until `shutdown` (or, once drained, when `exit_when_drained`).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // Live CPU and memory of the release containers, sent over whichever session is open.
        let sampler = {
            let (releases, shared) = (self.releases.clone(), self.shared.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(RELEASE_SAMPLE_INTERVAL).await;
                    let samples = releases.sample_releases().await;
                    if !samples.is_empty() {
                        shared.send(agent_message::Message::ReleaseStats(pb::ReleaseStats { samples }));
                    }
                }
            })
        };
        let _stop_sampler = AbortOnDrop(sampler);
        let mut known: Vec<(String, String)> = self
            .config
            .coordinators
            .iter()
            .chain(self.identity.coordinators.iter())
            .map(|address| (address.clone(), String::new()))
            .collect();
        let mut backoff = Duration::from_millis(200);
        loop {
            if shutdown.is_cancelled()
                || (self.draining() && self.config.exit_when_drained && self.shared.jobs.lock().expect("jobs").is_empty())
            {
                tracing::info!("agent stopping");
                return Ok(());
            }
            for address in preferred_order(&known, self.config.region.as_deref()) {
                match self.session(&address, &shutdown).await {
                    Ok(Some(coordinators)) => {
                        backoff = Duration::from_millis(200);
                        if !coordinators.is_empty() {
                            let mut merged = coordinators;
                            merged.extend(known.iter().filter(|(address, _)| self.config.coordinators.contains(address)).cloned());
                            known = merged;
                        }
                        break;
                    }
                    Ok(None) => return Ok(()),
                    Err(error) => tracing::warn!(coordinator = %address, "session failed: {error:#}"),
                }
                if shutdown.is_cancelled() {
                    break;
                }
            }
            self.coordinator.send_replace(None);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One session. `Ok(Some(coordinators))` when it ended and another should be tried (with the
    /// cluster's coordinators as learnt from the welcome); `Ok(None)` when the agent should stop.
    async fn session(&self, address: &str, shutdown: &CancellationToken) -> anyhow::Result<Option<Vec<(String, String)>>> {
        let coordinator = client::connect(address, self.config.ca_file.as_deref(), &self.identity.credential).await?;
        let (outbox, outbound) = mpsc::unbounded_channel();
        let hello = pb::Hello {
            labels: self.labels(),
            capacity: self.config.capacity.max(1),
            running: self.shared.running(),
            draining: self.draining(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            executors: vec![self.executor.name().to_string()],
        };
        outbox.send(AgentMessage { message: Some(agent_message::Message::Hello(hello)) }).expect("fresh channel");
        let response = coordinator
            .client()
            .session(coordinator.authorize(tokio_stream::wrappers::UnboundedReceiverStream::new(outbound)))
            .await
            .map_err(|status| anyhow::anyhow!("{}", status.message()))?;
        let mut inbound = response.into_inner();
        *self.shared.outbox.lock().expect("outbox lock") = Some(outbox.clone());
        self.coordinator.send_replace(Some(coordinator.clone()));
        for result in self.shared.results.lock().expect("results lock").values() {
            let _ = outbox.send(AgentMessage { message: Some(agent_message::Message::Result(result.clone())) });
        }
        let mut heartbeat_every = Duration::from_secs(2);
        let mut heartbeat = tokio::time::interval(heartbeat_every);
        let mut coordinators = Vec::new();
        tracing::info!(coordinator = %address, agent_id = self.identity.agent_id, "session open");
        let stop = loop {
            tokio::select! {
                message = inbound.next() => match message {
                    Some(Ok(pb::CoordinatorMessage { message: Some(message) })) => match message {
                        coordinator_message::Message::Welcome(welcome) => {
                            tracing::info!(node = welcome.coordinator_node_id, region = %welcome.coordinator_region, "welcomed");
                            coordinators = welcome.coordinators.into_iter().map(|c| (c.grpc_addr, c.region)).collect();
                            let interval = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms).max(100));
                            if interval != heartbeat_every {
                                heartbeat_every = interval;
                                heartbeat = tokio::time::interval(interval);
                            }
                        }
                        coordinator_message::Message::Offer(offer) => self.start_job(offer),
                        coordinator_message::Message::Cancel(cancel) => {
                            let jobs = self.shared.jobs.lock().expect("jobs lock");
                            if let Some(job) = jobs.get(&cancel.job_id).filter(|job| job.attempt == cancel.attempt) {
                                tracing::info!(job_id = cancel.job_id, reason = %cancel.reason, "cancelling job");
                                job.cancel.cancel();
                            }
                            drop(jobs);
                            self.shipper.abandon(cancel.job_id, cancel.attempt);
                        }
                        coordinator_message::Message::ResultAck(ack) => {
                            let refused_for_logs = !ack.accepted && ack.reason.contains("log chunks");
                            if refused_for_logs {
                                tracing::info!(job_id = ack.job_id, "result waits for log chunks; resending shortly");
                            } else {
                                if !ack.accepted {
                                    tracing::warn!(job_id = ack.job_id, attempt = ack.attempt, reason = %ack.reason, "result refused");
                                }
                                self.shared.results.lock().expect("results lock").remove(&(ack.job_id, ack.attempt));
                            }
                        }
                    },
                    Some(Ok(_)) => {}
                    Some(Err(status)) => {
                        tracing::warn!(coordinator = %address, error = %status.message(), "session broke");
                        break false;
                    }
                    None => {
                        tracing::warn!(coordinator = %address, "the coordinator closed the session");
                        break false;
                    }
                },
                _ = heartbeat.tick() => {
                    if !self.draining() && self.config.drain_path().exists() {
                        tracing::info!("draining: finishing running jobs, taking no new ones");
                        self.shared.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    if self.draining() && self.config.exit_when_drained && self.shared.jobs.lock().expect("jobs").is_empty()
                        && self.shared.results.lock().expect("results").is_empty() {
                        let _ = std::fs::remove_file(self.config.drain_path());
                        break true;
                    }
                    let _ = outbox.send(AgentMessage { message: Some(agent_message::Message::Heartbeat(pb::Heartbeat {
                        running: self.shared.running(),
                        draining: self.draining(),
                    })) });
                    // Results refused for missing log chunks go again.
                    for result in self.shared.results.lock().expect("results lock").values() {
                        let _ = outbox.send(AgentMessage { message: Some(agent_message::Message::Result(result.clone())) });
                    }
                }
                _ = shutdown.cancelled() => {
                    if !self.draining() {
                        tracing::info!("shutting down: draining first");
                        self.shared.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    if self.shared.jobs.lock().expect("jobs").is_empty() {
                        break true;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        *self.shared.outbox.lock().expect("outbox lock") = None;
        Ok(if stop { None } else { Some(coordinators) })
    }

    fn start_job(&self, offer: pb::JobOffer) {
        let (job_id, attempt) = (offer.job_id, offer.attempt);
        {
            let mut jobs = self.shared.jobs.lock().expect("jobs lock");
            if jobs.get(&job_id).is_some_and(|job| job.attempt == attempt) {
                return;
            }
            if let Some(older) = jobs.get(&job_id) {
                older.cancel.cancel();
            }
            jobs.insert(job_id, RunningJob { attempt, cancel: CancellationToken::new() });
        }
        let cancel = self.shared.jobs.lock().expect("jobs lock")[&job_id].cancel.clone();
        let marker = job_marker(&self.config, job_id);
        if let Err(error) =
            std::fs::create_dir_all(self.config.state_dir.join("jobs")).and_then(|()| std::fs::write(&marker, attempt.to_string()))
        {
            tracing::warn!(%error, "cannot record the running job in the state directory");
        }
        self.shared.send(agent_message::Message::Accept(pb::AcceptJob { job_id, attempt }));
        tracing::info!(job_id, attempt, deployment_id = offer.deployment_id, "job started");
        let (messages, mut forward) = mpsc::unbounded_channel();
        let shared = self.shared.clone();
        tokio::spawn(async move {
            while let Some(message) = forward.recv().await {
                shared.send(message);
            }
        });
        let context = JobContext {
            offer,
            executor: self.executor.clone(),
            shipper: self.shipper.clone(),
            work_dir: self.config.state_dir.join("work"),
            git_protocols: self.config.git_protocols.clone(),
            messages,
            coordinator: self.coordinator.subscribe(),
            cancel,
            releases: self.releases.clone(),
        };
        let shared = self.shared.clone();
        let shipper = self.shipper.clone();
        tokio::spawn(async move {
            let Ended { outcome, reason, output, commit_time, resources } = run_job(&context).await;
            let _ = std::fs::remove_file(&marker);
            let log_chunks = match shipper.finish(job_id, attempt).await {
                Ok(chunks) => chunks,
                Err(refused) => {
                    tracing::warn!(job_id, attempt, %refused, "the log of this attempt was refused; dropping its result");
                    shared.jobs.lock().expect("jobs lock").remove(&job_id);
                    return;
                }
            };
            tracing::info!(job_id, attempt, ?outcome, %reason, "job ended");
            let result = pb::JobResult {
                job_id,
                attempt,
                outcome: outcome as i32,
                reason,
                log_chunks,
                output_json: output,
                commit_time: commit_time.unwrap_or(0),
                resources,
            };
            shared.results.lock().expect("results lock").insert((job_id, attempt), result.clone());
            {
                let mut jobs = shared.jobs.lock().expect("jobs lock");
                if jobs.get(&job_id).is_some_and(|job| job.attempt == attempt) {
                    jobs.remove(&job_id);
                }
            }
            shared.send(agent_message::Message::Result(result));
            if outcome == JobOutcome::Cancelled {
                shared.results.lock().expect("results lock").remove(&(job_id, attempt));
            }
        });
    }
}

/// Register with a coordinator: exchange the registration token for a credential.
pub async fn register(config: &AgentConfig, token: &str, name: &str, labels: BTreeMap<String, String>) -> anyhow::Result<Identity> {
    let mut last_error = None;
    for address in &config.coordinators {
        let channel = match client::channel(address, config.ca_file.as_deref()).await {
            Ok(channel) => channel,
            Err(error) => {
                last_error = Some(error);
                continue;
            }
        };
        let request = pb::RegisterRequest {
            registration_token: token.to_string(),
            name: name.to_string(),
            labels: labels.clone().into_iter().collect(),
        };
        let response = davit_proto::agent::agent_service_client::AgentServiceClient::new(channel)
            .register(request)
            .await
            .map_err(|status| anyhow::anyhow!("registration refused by {address}: {}", status.message()))?
            .into_inner();
        let identity = Identity {
            agent_id: response.agent_id,
            name: name.to_string(),
            credential: response.credential,
            labels,
            coordinators: config.coordinators.clone(),
        };
        identity.save(&config.identity_path())?;
        return Ok(identity);
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no coordinator address given (--coordinator host:port)")))
}

/// How often the release containers are sampled and their samples sent.
const RELEASE_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Stops a background task when the runtime's `run` returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_region_first() {
        let coordinators =
            vec![("a:1".to_string(), "eu".to_string()), ("b:1".to_string(), "us".to_string()), ("c:1".to_string(), "us".to_string())];
        assert_eq!(preferred_order(&coordinators, Some("us")), vec!["b:1", "c:1", "a:1"]);
        assert_eq!(preferred_order(&coordinators, None), vec!["a:1", "b:1", "c:1"]);
    }
}
