//! Rollouts in the replicated state. The leader's controller (`crate::deploy::controller`) asks
//! the planner what to do and proposes it (`StartRollout`, `RolloutStep`); `apply` turns each
//! host action into a release job for that host's agent and marks the host busy; the job's
//! result (`FinishJob`, with the agent's `ReleaseOutput`) becomes the host's new facts. Every
//! decision and result is therefore replicated before anything acts on it: a new leader plans
//! from the same facts, and a host with a job in flight is never given a second one — which is
//! why no host is switched twice across a leader change.

use std::collections::BTreeMap;

use davit_agent::job_spec::{HealthCheck, JobSpec, ReleaseArtifact, ReleaseOp, ReleaseOutput, ReleaseSpec, RunSettings};

use super::apply::{enqueue_job, index, index_ids, load_id, not_found, set_deployment_status, store};
use super::codec::id_key;
use super::command::{NewDeploymentEvent, Outcome, RejectionCode};
use super::records::*;
use super::txn::Txn;
use crate::deploy::plan::{
    Action, BatchSize, BlueGreenSettings, CanaryProgress, CanarySettings, Facts, Finish, HostFacts, Inconclusive, NewRelease,
    RollingSettings, Strategy, Verdict,
};
use crate::store::{StoreResult, Table};

/// Release jobs are named `release:<op>:<host>`.
const RELEASE_JOB_PREFIX: &str = "release:";

pub fn is_release_job(job: &Job) -> bool {
    job.name.starts_with(RELEASE_JOB_PREFIX)
}

/// The service a pipeline's releases form on each host of an environment.
pub fn service_name(pipeline_id: u64, environment: &str) -> String {
    format!("p{pipeline_id}-{environment}")
}

/// The release a deployment brings.
pub fn release_name(deployment_id: u64) -> String {
    format!("d{deployment_id}")
}

/// The planner's strategy from a pipeline's settings, for `hosts` hosts.
pub fn strategy_of(pipeline: &Pipeline, hosts: usize) -> Strategy {
    let deploy = &pipeline.deploy;
    match pipeline.deploy_strategy {
        DeployStrategy::Rolling => {
            let batch = match (deploy.batch_percent, deploy.batch_size) {
                (Some(percent), _) => BatchSize::Percent(percent),
                (None, size) => BatchSize::Hosts(size.unwrap_or(1).max(1)),
            };
            let per_batch = batch.hosts_per_batch(hosts.max(1)) as u32;
            Strategy::Rolling(RollingSettings { batch, max_unavailable: deploy.max_unavailable.unwrap_or(per_batch).max(1) })
        }
        DeployStrategy::BlueGreen => {
            Strategy::BlueGreen(BlueGreenSettings { keep_old_ms: deploy.keep_old_seconds.unwrap_or(300).saturating_mul(1000) })
        }
        DeployStrategy::Canary => Strategy::Canary(CanarySettings {
            steps: deploy.canary_steps.clone().unwrap_or_else(|| vec![10, 50, 100]),
            analysis_window_ms: deploy.analysis_window_seconds.unwrap_or(60).saturating_mul(1000),
            on_inconclusive: match deploy.on_inconclusive.as_deref() {
                Some("wait") => Inconclusive::Wait { max_wait_ms: deploy.max_wait_seconds.unwrap_or(600).saturating_mul(1000) },
                _ => Inconclusive::RollBack,
            },
        }),
    }
}

/// The port the service's switch owns in `environment`: `public_port`, or for pull request n's
/// preview `preview_port_base + n` when the pipeline sets a base.
pub fn public_port(deploy: &DeploySettings, environment: &str) -> Result<u16, String> {
    let port = deploy.public_port.unwrap_or(0);
    match (super::scm::preview_pull_request(environment), deploy.preview_port_base) {
        (Some(number), Some(base)) => u16::try_from(u64::from(base) + number).map_err(|_| {
            format!(
                "the preview of pull request #{number} would listen on port {base} + {number}, beyond 65535: \
                 lower the pipeline's deploy.preview_port_base"
            )
        }),
        _ => Ok(port),
    }
}

fn run_settings(pipeline: &Pipeline, environment: &str) -> RunSettings {
    let deploy = &pipeline.deploy;
    RunSettings {
        container_port: deploy.container_port.unwrap_or(8080),
        public_port: public_port(deploy, environment).unwrap_or(0),
        image: deploy.run_image.clone(),
        command: deploy.start_command.clone(),
        cpu_millis: deploy.cpu_millis.unwrap_or(1000),
        memory_bytes: deploy.memory_mb.unwrap_or(2048).saturating_mul(1024 * 1024),
        keep_images: deploy.keep_images.unwrap_or(3),
    }
}

fn health_check(pipeline: &Pipeline) -> HealthCheck {
    let deploy = &pipeline.deploy;
    HealthCheck {
        http_path: deploy.health_path.clone(),
        interval_ms: deploy.health_interval_ms.unwrap_or(1000),
        timeout_ms: deploy.health_timeout_ms.unwrap_or(2000),
        healthy_threshold: deploy.healthy_threshold.unwrap_or(2),
        unhealthy_threshold: deploy.unhealthy_threshold.unwrap_or(3),
        deadline_ms: deploy.health_deadline_seconds.unwrap_or(120).saturating_mul(1000),
    }
}

/// What a rollout releases: the artifact, the release it replaces, and, only in a command
/// proposed before configuration versions existed, copies of the configuration.
pub(super) struct Release<'a> {
    pub digest: &'a str,
    pub kind: &'a str,
    pub previous: Option<String>,
    pub config: &'a [Configuration],
}

/// The configuration copies a rollout records: none, when its deployment references versions
/// (resolving them now for a deployment created before versions existed); a command's own copies
/// (proposed before versions existed); or the copies of the rollout it releases again in the same
/// environment, when that one is from before versions.
fn legacy_copies(txn: &mut Txn, deployment: &mut Deployment, proposed: &[Configuration]) -> StoreResult<Vec<Configuration>> {
    if !proposed.is_empty() || deployment.configuration.is_some() {
        return Ok(proposed.to_vec());
    }
    let source = match deployment.release_of {
        Some(source) => load_id::<Deployment>(txn, Table::Deployments, source)?,
        None => None,
    };
    if let Some(rollout) = source.filter(|source| source.environment == deployment.environment).and_then(|source| source.rollout) {
        return Ok(rollout.config);
    }
    let references = super::config_history::resolve(txn, &deployment.environment, deployment.pipeline_id)?;
    super::config_history::hold(txn, deployment.deployment_id, &references);
    deployment.configuration = Some(references);
    Ok(Vec::new())
}

/// `Command::StartRollout`.
pub(super) fn start(txn: &mut Txn, deployment_id: u64, hosts: &[RolloutHost], release: Release, now: Timestamp) -> StoreResult<Outcome> {
    let Release { digest: artifact_digest, kind: artifact_kind, previous, config } = release;
    let Some(mut deployment) = load_id::<Deployment>(txn, Table::Deployments, deployment_id)? else {
        return Ok(not_found("deployment", deployment_id));
    };
    if deployment.status.is_final() || deployment.rollout.is_some() {
        return Ok(Outcome::rejected(RejectionCode::Conflict, format!("deployment {deployment_id} has ended or already rolls out")));
    }
    let Some(pipeline) = load_id::<Pipeline>(txn, Table::Pipelines, deployment.pipeline_id)? else {
        return Ok(not_found("pipeline", deployment.pipeline_id));
    };
    if hosts.is_empty() {
        return Ok(Outcome::rejected(RejectionCode::Invalid, "a rollout needs at least one host"));
    }
    // The environment's strategy, when it sets one, over the pipeline's.
    let mut pipeline = pipeline;
    if let Some(strategy) = super::environments::settings(txn, &deployment.environment)?.strategy {
        pipeline.deploy_strategy = strategy;
    }
    let strategy = strategy_of(&pipeline, hosts.len());
    let config = legacy_copies(txn, &mut deployment, config)?;
    let facts = Facts {
        strategy,
        hosts: host_facts(hosts, pipeline.deploy.regions.as_ref().is_some_and(|regions| !regions.is_empty())),
        now: 0,
        rolling_back: None,
        canary: CanaryProgress::default(),
        switched_at: None,
        cleaning_up: false,
    };
    let mut regions: Vec<&str> = Vec::new();
    for host in hosts {
        let region = host.region.as_deref().unwrap_or("(no region)");
        if !regions.contains(&region) {
            regions.push(region);
        }
    }
    let release_label = release_name(deployment_id);
    let message = format!(
        "rolling out {release_label} ({artifact_kind} sha256:{}) {} to {} host(s) in {}{}",
        artifact_digest.get(..12).unwrap_or(artifact_digest),
        strategy_label(&pipeline.deploy_strategy),
        hosts.len(),
        regions.join(", then "),
        previous.as_deref().map(|previous| format!("; replacing {previous}")).unwrap_or_default()
    );
    deployment.rollout = Some(Box::new(Rollout {
        service: service_name(pipeline.pipeline_id, &deployment.environment),
        release: release_label,
        previous,
        artifact_digest: artifact_digest.to_string(),
        artifact_kind: artifact_kind.to_string(),
        hosts: hosts.to_vec(),
        facts,
        version: 1,
        config,
        run: run_settings(&pipeline, &deployment.environment),
        health: health_check(&pipeline),
        analysis: Vec::new(),
        started_at: now,
    }));
    super::progress::append(txn, &mut deployment, &[NewDeploymentEvent::new(event_kind::ROLLOUT_STARTED, message)], now);
    if deployment.status != DeploymentStatus::InProgress {
        set_deployment_status(txn, &mut deployment, DeploymentStatus::InProgress, None, now);
    } else {
        store(txn, Table::Deployments, id_key(deployment_id), &deployment);
    }
    Ok(Outcome::applied(Some(deployment_id), 1))
}

/// The planner's facts for `hosts` (in rollout order). With region waves, each region (in the
/// order its hosts come) is a wave of its own; without them, every host is in wave 0.
fn host_facts(hosts: &[RolloutHost], region_waves: bool) -> Vec<HostFacts> {
    let mut regions: Vec<Option<&str>> = Vec::new();
    hosts
        .iter()
        .map(|host| {
            let region = host.region.as_deref();
            if !regions.contains(&region) {
                regions.push(region);
            }
            let wave = if region_waves { regions.len() as u32 - 1 } else { 0 };
            HostFacts { wave, ..HostFacts::new(host.agent_id) }
        })
        .collect()
}

fn strategy_label(strategy: &DeployStrategy) -> &'static str {
    match strategy {
        DeployStrategy::Rolling => "rolling",
        DeployStrategy::BlueGreen => "blue-green",
        DeployStrategy::Canary => "canary",
    }
}

/// `Command::RolloutStep`.
pub(super) fn step(txn: &mut Txn, deployment_id: u64, version: u64, actions: &[Action], now: Timestamp) -> StoreResult<Outcome> {
    let Some(mut deployment) = load_id::<Deployment>(txn, Table::Deployments, deployment_id)? else {
        return Ok(not_found("deployment", deployment_id));
    };
    if deployment.status.is_final() {
        return Ok(Outcome::rejected(RejectionCode::Conflict, format!("deployment {deployment_id} has ended")));
    }
    let Some(mut rollout) = deployment.rollout.take() else {
        return Ok(Outcome::rejected(RejectionCode::Invalid, format!("deployment {deployment_id} does not roll out yet")));
    };
    if rollout.version != version {
        return Ok(Outcome::rejected(
            RejectionCode::Conflict,
            format!("the rollout of deployment {deployment_id} moved on (version {} is not {version}); plan again", rollout.version),
        ));
    }
    let mut events = Vec::new();
    let mut finish = None;
    let mut jobs = 0;
    for action in actions {
        match action {
            Action::Start { host } => jobs += host_job(txn, &deployment, &mut rollout, *host, ReleaseOp::Start, now)?,
            Action::CheckHealth { host } => jobs += host_job(txn, &deployment, &mut rollout, *host, ReleaseOp::CheckHealth, now)?,
            Action::SetWeight { host, weight } => {
                jobs += host_job(txn, &deployment, &mut rollout, *host, ReleaseOp::SetWeight { weight: *weight }, now)?
            }
            Action::StopOld { host } => jobs += host_job(txn, &deployment, &mut rollout, *host, ReleaseOp::StopOld, now)?,
            Action::StopNew { host } => jobs += host_job(txn, &deployment, &mut rollout, *host, ReleaseOp::StopNew, now)?,
            Action::Analyze { step, since } => {
                rollout.analysis.retain(|traffic| traffic.step == *step);
                // The hosts of the wave the canary is in: the others take none of its traffic.
                let wave = rollout.facts.canary.wave;
                let hosts: Vec<u64> =
                    rollout.facts.hosts.iter().filter(|host| !host.lost && host.wave == wave).map(|host| host.host).collect();
                for host in hosts {
                    if !rollout.analysis.iter().any(|traffic| traffic.agent_id == host) {
                        jobs += host_job(txn, &deployment, &mut rollout, host, ReleaseOp::Stats { since_ms: *since }, now)?;
                    }
                }
            }
            Action::BeginRollback { reason } => {
                if rollout.facts.rolling_back.is_none() && !rollout.facts.cleaning_up {
                    rollout.facts.rolling_back = Some(reason.clone());
                    events.push(NewDeploymentEvent::new(event_kind::ROLLBACK_STARTED, format!("rolling back: {reason}")));
                }
            }
            Action::BeginCanaryStep { step, wave } => {
                rollout.facts.canary = CanaryProgress { step: Some(*step), step_started_at: now, verdict: None, wave: *wave };
                rollout.analysis.clear();
                let weight = match &rollout.facts.strategy {
                    Strategy::Canary(settings) => settings.effective_steps().get(*step).copied(),
                    _ => None,
                };
                // With region waves, the step is in one region's hosts.
                let waves = rollout.facts.hosts.iter().map(|host| host.wave).max().unwrap_or(0) + 1;
                let region = (waves > 1)
                    .then(|| rollout.facts.hosts.iter().position(|host| host.wave == *wave))
                    .flatten()
                    .and_then(|index| rollout.hosts[index].region.clone());
                let place = region.as_deref().map(|region| format!(" in {region} (wave {} of {waves})", wave + 1)).unwrap_or_default();
                let mut event = NewDeploymentEvent::new(
                    event_kind::CANARY_STEP,
                    format!("canary step {}{place}: {} % of traffic on {}", step + 1, weight.unwrap_or(0), rollout.release),
                );
                event.weight = weight;
                event.region = region;
                events.push(event);
            }
            Action::RecordSwitch => {
                if rollout.facts.switched_at.is_none() {
                    rollout.facts.switched_at = Some(now);
                    events.push(NewDeploymentEvent::new(event_kind::HOST_SWITCHED, format!("every host serves {}", rollout.release)));
                }
            }
            Action::BeginCleanup => {
                if rollout.facts.rolling_back.is_none() {
                    rollout.facts.cleaning_up = true;
                }
            }
            Action::WaitUntil { .. } => {}
            Action::Finish(how) => finish = Some(how.clone()),
        }
    }
    rollout.version += 1;
    deployment.rollout = Some(rollout);
    super::progress::append(txn, &mut deployment, &events, now);
    match finish {
        Some(Finish::Succeeded) => set_deployment_status(txn, &mut deployment, DeploymentStatus::Success, None, now),
        Some(Finish::RolledBack(reason)) => {
            set_deployment_status(txn, &mut deployment, DeploymentStatus::RolledBack, Some(format!("rolled back: {reason}")), now)
        }
        None => store(txn, Table::Deployments, id_key(deployment_id), &deployment),
    }
    Ok(Outcome::applied(Some(deployment_id), 1 + jobs))
}

/// `Command::AbortRollout`.
pub(super) fn abort(txn: &mut Txn, deployment_id: u64, reason: &str, now: Timestamp) -> StoreResult<Outcome> {
    let Some(mut deployment) = load_id::<Deployment>(txn, Table::Deployments, deployment_id)? else {
        return Ok(not_found("deployment", deployment_id));
    };
    let Some(rollout) = deployment.rollout.as_mut().filter(|_| !deployment.status.is_final()) else {
        return Ok(Outcome::rejected(RejectionCode::Conflict, format!("deployment {deployment_id} has no rollout under way")));
    };
    if rollout.facts.cleaning_up {
        return Ok(Outcome::rejected(
            RejectionCode::Conflict,
            format!(
                "deployment {deployment_id} has already switched every host; roll it back with POST /api/v1/deployments/{deployment_id}/rollback"
            ),
        ));
    }
    if rollout.facts.rolling_back.is_none() {
        rollout.facts.rolling_back = Some(reason.to_string());
        rollout.version += 1;
        let event = NewDeploymentEvent::new(event_kind::ROLLBACK_STARTED, format!("rolling back: {reason}"));
        super::progress::append(txn, &mut deployment, &[event], now);
    }
    store(txn, Table::Deployments, id_key(deployment_id), &deployment);
    Ok(Outcome::applied(Some(deployment_id), 1))
}

/// Give `host` a release job for `op`, unless it is busy or lost (a repeated plan changes
/// nothing). Returns how many jobs were queued.
fn host_job(txn: &mut Txn, deployment: &Deployment, rollout: &mut Rollout, host: u64, op: ReleaseOp, now: Timestamp) -> StoreResult<u64> {
    let Some(index) = rollout.hosts.iter().position(|candidate| candidate.agent_id == host) else {
        return Ok(0);
    };
    if rollout.facts.hosts[index].busy || rollout.facts.hosts[index].lost {
        return Ok(0);
    }
    let timeout_seconds = match op {
        ReleaseOp::Start => 900,
        ReleaseOp::CheckHealth => rollout.health.deadline_ms / 1000 + 30,
        _ => 120,
    };
    // One attempt: a release step that could not run is a fact for the planner, not a retry
    // on another host.
    let job_id = enqueue_release_job(txn, deployment, rollout, &rollout.hosts[index].clone(), op, timeout_seconds, 1, now)?;
    rollout.hosts[index].job = Some(job_id);
    rollout.facts.hosts[index].busy = true;
    Ok(1)
}

/// Queue `op` of `rollout`'s release for `host`'s agent alone.
#[allow(clippy::too_many_arguments)]
fn enqueue_release_job(
    txn: &mut Txn,
    deployment: &Deployment,
    rollout: &Rollout,
    host: &RolloutHost,
    op: ReleaseOp,
    timeout_seconds: u64,
    max_attempts: u32,
    now: Timestamp,
) -> StoreResult<u64> {
    let name = format!("{RELEASE_JOB_PREFIX}{}:{}", op.name(), host.name);
    let spec = JobSpec::Release(ReleaseSpec {
        op,
        service: rollout.service.clone(),
        release: rollout.release.clone(),
        previous: rollout.previous.clone(),
        artifact: ReleaseArtifact { digest: rollout.artifact_digest.clone(), kind: rollout.artifact_kind.clone() },
        run: rollout.run.clone(),
        health: rollout.health.clone(),
        timeout_seconds,
    });
    let spec = serde_json::to_value(&spec).expect("release specs serialize");
    let labels = [("agent_id".to_string(), host.agent_id.to_string())].into_iter().collect();
    enqueue_job(txn, now, deployment, &name, labels, spec, max_attempts)
}

/// Attempts of a retire job: an agent lost meanwhile gets it again when it is back.
const RETIRE_ATTEMPTS: u32 = 3;

/// `pipeline_id`'s service in `environment` is no longer wanted (the environment is being
/// removed: a closed pull request's preview): every host any of its rollouts reached gets a
/// retire job (stop every release, give up the port, remove images and state), queued on the
/// newest of those deployments. Agents that were deregistered are skipped; a lost one runs the job
/// when it is back. Returns how many jobs were queued.
pub(super) fn retire_service(txn: &mut Txn, pipeline_id: u64, environment: &str, now: Timestamp) -> StoreResult<u64> {
    let mut deployments = Vec::new();
    for deployment_id in index_ids(txn, index::DEPLOYMENTS_BY_PIPELINE, &pipeline_id.to_string())? {
        if let Some(deployment) = load_id::<Deployment>(txn, Table::Deployments, deployment_id)?
            && deployment.environment == environment
            && deployment.rollout.is_some()
        {
            deployments.push(deployment);
        }
    }
    deployments.sort_by_key(|deployment| deployment.deployment_id);
    let Some(newest) = deployments.last() else { return Ok(0) };
    let rollout = newest.rollout.as_ref().expect("kept only deployments with a rollout");
    let mut hosts: BTreeMap<u64, RolloutHost> = BTreeMap::new();
    for host in deployments.iter().flat_map(|deployment| deployment.rollout.iter().flat_map(|rollout| rollout.hosts.iter())) {
        hosts.insert(host.agent_id, host.clone());
    }
    let mut queued = 0;
    for host in hosts.values() {
        // A deregistered agent never takes a job again.
        if load_id::<Agent>(txn, Table::Agents, host.agent_id)?.is_none_or(|agent| agent.deregistered_at.is_some()) {
            continue;
        }
        enqueue_release_job(txn, newest, rollout, host, ReleaseOp::Retire, 300, RETIRE_ATTEMPTS, now)?;
        queued += 1;
    }
    Ok(queued)
}

/// How many times a step of a rollback (traffic back to the old release, the new one stopped)
/// is tried on a host whose agent is still there before the host is given up: a host left
/// half-way keeps sending traffic to the release being rolled back.
pub const UNWIND_ATTEMPTS: u32 = 5;

/// Count a failed unwinding step on `host`; true when the host is to be given up (left as it
/// is) rather than tried again.
fn give_up_unwinding(host: &mut RolloutHost, agent_gone: bool) -> bool {
    host.unwind_failures += 1;
    agent_gone || host.unwind_failures >= UNWIND_ATTEMPTS
}

fn unwind_message(message: String, gave_up: bool, host: &RolloutHost) -> String {
    if gave_up {
        format!("{message}; the host is left as it is")
    } else {
        format!("{message}; trying again ({} of {UNWIND_ATTEMPTS})", host.unwind_failures + 1)
    }
}

/// A release job ended (or was given up): its result becomes the host's facts.
pub(super) fn job_ended(txn: &mut Txn, job_id: u64, output: Option<&str>, now: Timestamp) -> StoreResult<()> {
    let Some(job) = load_id::<Job>(txn, Table::Jobs, job_id)? else { return Ok(()) };
    if !matches!(job.status, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled) {
        return Ok(());
    }
    let Ok(JobSpec::Release(spec)) = serde_json::from_value::<JobSpec>(job.spec.clone()) else { return Ok(()) };
    let Some(mut deployment) = load_id::<Deployment>(txn, Table::Deployments, job.deployment_id)? else { return Ok(()) };
    if spec.op == ReleaseOp::Retire {
        let host = job.name.rsplit(':').next().unwrap_or_default().to_string();
        let message = match job.status {
            JobStatus::Succeeded => format!("{host}: {} retired (releases stopped, port given up)", spec.service),
            _ => {
                format!("{host}: retiring {} failed: {}", spec.service, job.failure_reason.as_deref().unwrap_or("the job did not succeed"))
            }
        };
        let event = NewDeploymentEvent::new(event_kind::SERVICE_RETIRED, message);
        super::progress::append(txn, &mut deployment, &[event], now);
        store(txn, Table::Deployments, id_key(deployment.deployment_id), &deployment);
        return Ok(());
    }
    let Some(mut rollout) = deployment.rollout.take() else { return Ok(()) };
    let Some(index) = rollout.hosts.iter().position(|host| host.job == Some(job_id)) else {
        deployment.rollout = Some(rollout);
        return Ok(());
    };
    rollout.hosts[index].job = None;
    rollout.facts.hosts[index].busy = false;
    let succeeded = job.status == JobStatus::Succeeded;
    let reason = job.failure_reason.clone().unwrap_or_else(|| format!("the job ended {:?}", job.status).to_lowercase());
    let output: Option<ReleaseOutput> = output.and_then(|output| serde_json::from_str(output).ok());
    let host = &rollout.hosts[index];
    let (agent_id, region, host_name) = (host.agent_id, host.region.clone(), host.name.clone());
    let event = |kind: &str, message: String| NewDeploymentEvent {
        kind: kind.to_string(),
        host: Some(agent_id),
        region: region.clone(),
        weight: None,
        message: format!("{host_name}: {message}"),
    };
    let mut events = Vec::new();
    let unwinding = rollout.facts.rolling_back.is_some() || rollout.facts.cleaning_up;
    // A host whose agent is lost or gone cannot be unwound by trying again.
    let agent_gone =
        load_id::<Agent>(txn, Table::Agents, agent_id)?.is_none_or(|agent| matches!(agent.state, AgentState::Lost | AgentState::Offline));
    let facts = &mut rollout.facts.hosts[index];
    if job.status == JobStatus::Cancelled {
        // The deployment ended (or was cancelled): nothing to learn from it.
    } else {
        match spec.op {
            ReleaseOp::Start if succeeded => {
                facts.new = NewRelease::Running;
                events.push(event(event_kind::HOST_STARTED, format!("{} started", rollout.release)));
            }
            ReleaseOp::Start => {
                facts.new = NewRelease::Failed(format!("{} did not start: {reason}", rollout.release));
                events.push(event(event_kind::HOST_FAILED, format!("{} did not start: {reason}", rollout.release)));
            }
            ReleaseOp::CheckHealth => match output.as_ref().and_then(|output| output.health.as_ref()) {
                Some(health) if succeeded && health.healthy => {
                    facts.new = NewRelease::Healthy;
                    events.push(event(event_kind::HOST_HEALTHY, format!("{} is healthy ({})", rollout.release, health.detail)));
                }
                health => {
                    let detail = match health {
                        Some(health) if succeeded => health.detail.clone(),
                        _ => reason.clone(),
                    };
                    facts.new = NewRelease::Failed(format!("{} failed its health check: {detail}", rollout.release));
                    events.push(event(event_kind::HOST_UNHEALTHY, format!("{} failed its health check: {detail}", rollout.release)));
                }
            },
            ReleaseOp::SetWeight { weight } if succeeded => {
                rollout.hosts[index].unwind_failures = 0;
                facts.weight = weight;
                let mut changed = event(event_kind::WEIGHT_CHANGED, format!("{weight} % of traffic on {}", rollout.release));
                changed.weight = Some(weight);
                events.push(changed);
                if weight == 100 && !unwinding {
                    events.push(event(event_kind::HOST_SWITCHED, format!("all traffic on {}", rollout.release)));
                }
            }
            ReleaseOp::SetWeight { weight } => {
                let message = format!("could not move traffic to {weight} %: {reason}");
                if unwinding {
                    let gave_up = give_up_unwinding(&mut rollout.hosts[index], agent_gone);
                    facts.lost = gave_up;
                    events.push(event(event_kind::HOST_FAILED, unwind_message(message, gave_up, &rollout.hosts[index])));
                } else {
                    facts.new = NewRelease::Failed(message.clone());
                    events.push(event(event_kind::HOST_FAILED, message));
                }
            }
            ReleaseOp::StopOld => {
                facts.old_stopped = true;
                let message =
                    if succeeded { "old releases stopped".to_string() } else { format!("stopping the old releases failed: {reason}") };
                events.push(event(event_kind::OLD_STOPPED, message));
            }
            ReleaseOp::StopNew => {
                if succeeded {
                    rollout.hosts[index].unwind_failures = 0;
                    facts.new = NewRelease::Stopped;
                    events.push(event(event_kind::NEW_STOPPED, format!("{} stopped", rollout.release)));
                } else {
                    let gave_up = give_up_unwinding(&mut rollout.hosts[index], agent_gone);
                    facts.lost = gave_up;
                    let message = format!("stopping {} failed: {reason}", rollout.release);
                    events.push(event(event_kind::HOST_FAILED, unwind_message(message, gave_up, &rollout.hosts[index])));
                }
            }
            ReleaseOp::Stats { .. } => {
                let stats = output.as_ref().and_then(|output| output.stats.clone()).filter(|_| succeeded).unwrap_or_default();
                rollout.analysis.push(HostTraffic {
                    agent_id,
                    step: rollout.facts.canary.step.unwrap_or(0),
                    requests: stats.release.requests,
                    server_errors: stats.release.server_errors,
                    latency_p95_us: (stats.release.latency_p95_ms.max(0.0) * 1000.0) as u64,
                    stable_requests: stats.others.requests,
                    stable_server_errors: stats.others.server_errors,
                });
                if let Some(verdict) = judge(txn, &deployment, &rollout)? {
                    let message = match &verdict {
                        Verdict::Pass => "pass".to_string(),
                        Verdict::Fail(why) => format!("fail: {why}"),
                        Verdict::Inconclusive(why) => format!("inconclusive: {why}"),
                    };
                    let step = rollout.facts.canary.step.unwrap_or(0);
                    events.push(NewDeploymentEvent::new(event_kind::ANALYSIS_VERDICT, format!("canary step {}: {message}", step + 1)));
                    rollout.facts.canary.verdict = Some((verdict, now));
                }
            }
            // Answered above: a retire job is never a rollout host's job.
            ReleaseOp::Retire => {}
        }
    }
    rollout.version += 1;
    deployment.rollout = Some(rollout);
    super::progress::append(txn, &mut deployment, &events, now);
    store(txn, Table::Deployments, id_key(deployment.deployment_id), &deployment);
    Ok(())
}

/// The verdict on the current canary step, once every host that is not lost has reported its
/// counters: too few requests is inconclusive; too many 5xx or too slow fails.
fn judge(txn: &Txn, deployment: &Deployment, rollout: &Rollout) -> StoreResult<Option<Verdict>> {
    let step = rollout.facts.canary.step.unwrap_or(0);
    let wave = rollout.facts.canary.wave;
    let waiting = rollout.facts.hosts.iter().filter(|host| host.wave == wave).any(|host| {
        !host.lost && (host.busy || !rollout.analysis.iter().any(|traffic| traffic.agent_id == host.host && traffic.step == step))
    });
    if waiting {
        return Ok(None);
    }
    let settings = load_id::<Pipeline>(txn, Table::Pipelines, deployment.pipeline_id)?.map(|pipeline| pipeline.deploy).unwrap_or_default();
    let counted: Vec<&HostTraffic> = rollout.analysis.iter().filter(|traffic| traffic.step == step).collect();
    let requests: u64 = counted.iter().map(|traffic| traffic.requests).sum();
    let errors: u64 = counted.iter().map(|traffic| traffic.server_errors).sum();
    let p95_us = counted.iter().map(|traffic| traffic.latency_p95_us).max().unwrap_or(0);
    let max_error_percent = u64::from(settings.max_error_percent.unwrap_or(5));
    let min_requests = settings.min_requests.unwrap_or(20);
    if errors * 100 > max_error_percent * requests.max(1) && errors > 0 {
        return Ok(Some(Verdict::Fail(format!(
            "{errors} of {requests} requests to the canary answered 5xx (more than {max_error_percent} %)"
        ))));
    }
    if let Some(max_ms) = settings.max_latency_p95_ms
        && requests > 0
        && p95_us > max_ms.saturating_mul(1000)
    {
        return Ok(Some(Verdict::Fail(format!("p95 latency {} ms is above {max_ms} ms", p95_us / 1000))));
    }
    if requests < min_requests {
        return Ok(Some(Verdict::Inconclusive(format!("{requests} requests reached the canary; at least {min_requests} are needed"))));
    }
    Ok(Some(Verdict::Pass))
}

#[cfg(test)]
mod tests {
    use davit_agent::job_spec::{HealthReport, TrafficCounts, TrafficStats};

    use super::*;
    use crate::deploy::plan::plan;
    use crate::state::command::{Command, JobEnd, PipelinePatch};
    use crate::state::progress::events_after;
    use crate::state::tests::{propose, seed_pipeline};
    use crate::state::txn::EmptyState;

    /// How the simulated hosts answer release steps.
    struct Hosts {
        /// Hosts whose new release fails its health check.
        unhealthy: Vec<u64>,
        /// Canary traffic per host and window: (requests, 5xx).
        canary: (u64, u64),
        /// Hosts whose agent fails to move traffic back (`set_weight 0`) this many times first.
        failing_unwinds: BTreeMap<u64, u32>,
    }

    fn setup(txn: &mut Txn, strategy: DeployStrategy, deploy: DeploySettings) -> (u64, Vec<RolloutHost>) {
        let pipeline_id = seed_pipeline(txn);
        let patch = PipelinePatch { deploy_strategy: Some(strategy), deploy: Some(deploy), ..PipelinePatch::default() };
        propose(txn, 3, Command::UpdatePipeline { pipeline_id, patch }).result.expect("updated");
        propose(txn, 3, Command::CreateRegistrationToken { description: "fleet".into(), token_hash: "t".into(), expires_at: 1_000 })
            .result
            .unwrap();
        let mut hosts = Vec::new();
        for (name, region) in [("eu-1", "eu"), ("eu-2", "eu"), ("us-1", "us"), ("us-2", "us")] {
            let labels: BTreeMap<String, String> = [("pool", "deploy"), ("environment", "production"), ("region", region)]
                .into_iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect();
            let register = Command::RegisterAgent {
                name: name.into(),
                labels: labels.clone(),
                credential_hash: format!("h-{name}"),
                registration_token_hash: "t".into(),
            };
            let agent_id = propose(txn, 4, register).result.unwrap().id.unwrap();
            let connected = Command::AgentConnected {
                agent_id,
                node_id: 1,
                labels,
                capacity: 4,
                executors: vec!["docker".into()],
                draining: false,
                version: "t".into(),
            };
            propose(txn, 4, connected).result.unwrap();
            hosts.push(RolloutHost { agent_id, name: name.into(), region: Some(region.into()), job: None, unwind_failures: 0 });
        }
        let create = Command::CreateDeployment {
            pipeline_id,
            commit_hash: "c".repeat(40),
            environment: "production".into(),
            config_overrides: BTreeMap::new(),
            rollback_of: None,
            branch: None,
            release_of: None,
        };
        let deployment_id = propose(txn, 5, create).result.unwrap().id.unwrap();
        (deployment_id, hosts)
    }

    fn deployment(txn: &Txn, deployment_id: u64) -> Deployment {
        load_id(txn, Table::Deployments, deployment_id).unwrap().unwrap()
    }

    /// Drive the rollout as the controller and the agents would, until it ends; returns the
    /// release jobs each host was given, by operation name.
    fn drive(txn: &mut Txn, deployment_id: u64, hosts: &mut Hosts) -> BTreeMap<u64, Vec<String>> {
        let mut given: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        let mut time = 1_000_000;
        for _ in 0..500 {
            time += 1_000;
            let current = deployment(txn, deployment_id);
            if current.status.is_final() {
                return given;
            }
            let rollout = current.rollout.clone().expect("a rollout");
            let mut facts = rollout.facts.clone();
            facts.now = time;
            let actions: Vec<Action> = plan(&facts).into_iter().filter(|action| !matches!(action, Action::WaitUntil { .. })).collect();
            if !actions.is_empty() {
                let step = Command::RolloutStep { deployment_id, version: rollout.version, actions };
                propose(txn, time, step).result.expect("a step planned from current facts applies");
            }
            // Every queued release job runs on its host and reports.
            let rollout = deployment(txn, deployment_id).rollout.unwrap();
            for host in rollout.hosts.iter().filter(|host| host.job.is_some()) {
                let job_id = host.job.unwrap();
                let job: Job = load_id(txn, Table::Jobs, job_id).unwrap().unwrap();
                assert_eq!(job.labels.get("agent_id"), Some(&host.agent_id.to_string()), "release jobs are pinned to their host");
                let Ok(JobSpec::Release(spec)) = serde_json::from_value::<JobSpec>(job.spec.clone()) else { panic!("a release spec") };
                given.entry(host.agent_id).or_default().push(match spec.op {
                    ReleaseOp::SetWeight { weight } => format!("set_weight {weight}"),
                    ref op => op.name().to_string(),
                });
                let assign = Command::AssignJob { job_id, agent_id: host.agent_id, attempt: 1, lease_expires_at: time + 60_000 };
                propose(txn, time, assign).result.expect("assigned");
                let mut output = ReleaseOutput::default();
                match spec.op {
                    ReleaseOp::CheckHealth => {
                        let healthy = !hosts.unhealthy.contains(&host.agent_id);
                        output.health = Some(HealthReport { healthy, detail: if healthy { "200 OK" } else { "500 from /health" }.into() });
                    }
                    ReleaseOp::Stats { .. } => {
                        let (requests, server_errors) = hosts.canary;
                        output.stats = Some(TrafficStats {
                            release: TrafficCounts { requests, server_errors, latency_p95_ms: 3.0 },
                            others: TrafficCounts { requests: requests * 9, server_errors: 0, latency_p95_ms: 2.0 },
                        });
                    }
                    _ => {}
                }
                let failing = match (&spec.op, hosts.failing_unwinds.get_mut(&host.agent_id)) {
                    (ReleaseOp::SetWeight { weight: 0 }, Some(left)) if *left > 0 => {
                        *left -= 1;
                        true
                    }
                    _ => false,
                };
                let finish = Command::FinishJob {
                    job_id,
                    attempt: 1,
                    end: if failing { JobEnd::Failed } else { JobEnd::Succeeded },
                    reason: None,
                    output: Some(serde_json::to_string(&output).unwrap()),
                    measured: Default::default(),
                };
                propose(txn, time, finish).result.expect("finished");
            }
        }
        panic!("the rollout did not end: {:?}", deployment(txn, deployment_id).rollout);
    }

    fn kinds(txn: &Txn, deployment_id: u64) -> Vec<String> {
        events_after(txn, deployment_id, 0, 1000).unwrap().into_iter().map(|event| event.kind).collect()
    }

    fn start(txn: &mut Txn, deployment_id: u64, hosts: Vec<RolloutHost>) {
        let command = Command::StartRollout {
            deployment_id,
            hosts,
            artifact_digest: "a".repeat(64),
            artifact_kind: "image".into(),
            previous: Some("d0".into()),
            config: Vec::new(),
        };
        propose(txn, 900_000, command).result.expect("the rollout starts");
    }

    #[test]
    fn blue_green_switches_every_host_once_and_succeeds() {
        let mut txn = Txn::new(&EmptyState);
        let deploy = DeploySettings { public_port: Some(8080), keep_old_seconds: Some(5), ..DeploySettings::default() };
        let (deployment_id, hosts) = setup(&mut txn, DeployStrategy::BlueGreen, deploy);
        start(&mut txn, deployment_id, hosts.clone());
        let given = drive(&mut txn, deployment_id, &mut Hosts { unhealthy: vec![], canary: (0, 0), failing_unwinds: BTreeMap::new() });
        let ended = deployment(&txn, deployment_id);
        assert_eq!(ended.status, DeploymentStatus::Success, "{:?}", ended.status_reason);
        for host in &hosts {
            assert_eq!(given[&host.agent_id], ["start", "check_health", "set_weight 100", "stop_old"], "host {}", host.name);
        }
        let kinds = kinds(&txn, deployment_id);
        assert_eq!(kinds.first().map(String::as_str), Some(event_kind::QUEUED));
        assert_eq!(kinds.last().map(String::as_str), Some(event_kind::SUCCEEDED));
        assert_eq!(kinds.iter().filter(|kind| *kind == event_kind::HOST_HEALTHY).count(), 4);
        // A step planned from facts that have since moved on is refused.
        let stale = Command::RolloutStep { deployment_id, version: 1, actions: vec![Action::Start { host: hosts[0].agent_id }] };
        assert!(propose(&mut txn, 2_000_000, stale).result.is_err());
    }

    #[test]
    fn a_preview_listens_on_its_own_port_when_the_pipeline_sets_a_base() {
        let mut deploy = DeploySettings { public_port: Some(8080), ..DeploySettings::default() };
        assert_eq!(public_port(&deploy, "pr-7"), Ok(8080), "without a base, previews use public_port");
        deploy.preview_port_base = Some(20_000);
        assert_eq!(public_port(&deploy, "production"), Ok(8080));
        assert_eq!(public_port(&deploy, "pr-7"), Ok(20_007));
        // Only pr-<n> is a preview: not pr-, pr-07 or pr-x.
        for other in ["pr-", "pr-07", "pr-x", "apr-7"] {
            assert_eq!(public_port(&deploy, other), Ok(8080), "{other}");
        }
        let error = public_port(&deploy, "pr-45536").unwrap_err();
        assert!(error.contains("beyond 65535") && error.contains("preview_port_base"), "{error}");
    }

    #[test]
    fn retiring_a_service_gives_each_host_it_reached_one_retire_job_and_records_what_it_did() {
        let mut txn = Txn::new(&EmptyState);
        let deploy = DeploySettings { public_port: Some(8080), keep_old_seconds: Some(5), ..DeploySettings::default() };
        let (deployment_id, hosts) = setup(&mut txn, DeployStrategy::BlueGreen, deploy);
        start(&mut txn, deployment_id, hosts.clone());
        drive(&mut txn, deployment_id, &mut Hosts { unhealthy: vec![], canary: (0, 0), failing_unwinds: BTreeMap::new() });
        let ended = deployment(&txn, deployment_id);
        assert_eq!(ended.status, DeploymentStatus::Success);
        // Another environment of the pipeline has nothing to retire.
        assert_eq!(retire_service(&mut txn, ended.pipeline_id, "staging", 2_000_000).unwrap(), 0);
        // A host whose agent was removed meanwhile is skipped.
        propose(&mut txn, 2_000_000, Command::DeregisterAgent { agent_id: hosts[3].agent_id }).result.unwrap();

        assert_eq!(retire_service(&mut txn, ended.pipeline_id, "production", 2_000_000).unwrap(), 3);
        let mut retire_jobs = Vec::new();
        for job_id in index_ids(&txn, index::JOBS_BY_DEPLOYMENT, &deployment_id.to_string()).unwrap() {
            let job: Job = load_id(&txn, Table::Jobs, job_id).unwrap().unwrap();
            if let Ok(JobSpec::Release(spec)) = serde_json::from_value::<JobSpec>(job.spec.clone())
                && spec.op == ReleaseOp::Retire
            {
                assert_eq!(spec.service, ended.rollout.as_ref().unwrap().service);
                assert_eq!(job.status, JobStatus::Queued);
                retire_jobs.push((job.labels["agent_id"].parse::<u64>().unwrap(), job_id));
            }
        }
        let pinned: Vec<u64> = retire_jobs.iter().map(|(agent_id, _)| *agent_id).collect();
        assert_eq!(pinned, hosts[..3].iter().map(|host| host.agent_id).collect::<Vec<_>>(), "one job pinned to each remaining host");

        // The hosts report: a success and a failure become events; the deployment stays as it ended.
        for (index, (agent_id, job_id)) in retire_jobs.iter().take(2).enumerate() {
            let assign = Command::AssignJob { job_id: *job_id, agent_id: *agent_id, attempt: 1, lease_expires_at: 3_000_000 };
            propose(&mut txn, 2_100_000, assign).result.unwrap();
            let end = if index == 0 { JobEnd::Succeeded } else { JobEnd::Failed };
            let reason = (index == 1).then(|| "docker is not running".to_string());
            let finish = Command::FinishJob { job_id: *job_id, attempt: 1, end, reason, output: None, measured: Default::default() };
            propose(&mut txn, 2_100_000, finish).result.unwrap();
        }
        let after = deployment(&txn, deployment_id);
        assert_eq!((after.status, after.end_time), (DeploymentStatus::Success, ended.end_time));
        let messages: Vec<String> = events_after(&txn, deployment_id, 0, 1000)
            .unwrap()
            .into_iter()
            .filter(|event| event.kind == event_kind::SERVICE_RETIRED)
            .map(|event| event.message)
            .collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(messages[0].starts_with("eu-1: ") && messages[0].contains("retired"), "{messages:?}");
        assert!(messages[1].starts_with("eu-2: ") && messages[1].contains("docker is not running"), "{messages:?}");
    }

    #[test]
    fn a_blue_green_host_failing_its_health_check_never_takes_traffic() {
        let mut txn = Txn::new(&EmptyState);
        let deploy = DeploySettings { public_port: Some(8080), ..DeploySettings::default() };
        let (deployment_id, hosts) = setup(&mut txn, DeployStrategy::BlueGreen, deploy);
        start(&mut txn, deployment_id, hosts.clone());
        let given = drive(
            &mut txn,
            deployment_id,
            &mut Hosts { unhealthy: vec![hosts[2].agent_id], canary: (0, 0), failing_unwinds: BTreeMap::new() },
        );
        let ended = deployment(&txn, deployment_id);
        assert_eq!(ended.status, DeploymentStatus::RolledBack);
        assert!(ended.status_reason.as_deref().unwrap_or_default().contains("health check"), "{:?}", ended.status_reason);
        for host in &hosts {
            assert!(
                !given[&host.agent_id].iter().any(|op| op == "set_weight 100"),
                "host {} got traffic: {:?}",
                host.name,
                given[&host.agent_id]
            );
        }
        assert!(kinds(&txn, deployment_id).contains(&event_kind::ROLLBACK_STARTED.to_string()));
    }

    #[test]
    fn a_canary_answering_500_rolls_back_at_its_first_step() {
        let mut txn = Txn::new(&EmptyState);
        let deploy = DeploySettings { public_port: Some(8080), analysis_window_seconds: Some(5), ..DeploySettings::default() };
        let (deployment_id, hosts) = setup(&mut txn, DeployStrategy::Canary, deploy);
        start(&mut txn, deployment_id, hosts.clone());
        let given = drive(&mut txn, deployment_id, &mut Hosts { unhealthy: vec![], canary: (30, 30), failing_unwinds: BTreeMap::new() });
        let ended = deployment(&txn, deployment_id);
        assert_eq!(ended.status, DeploymentStatus::RolledBack);
        for host in &hosts {
            let weights: Vec<&String> = given[&host.agent_id].iter().filter(|op| op.starts_with("set_weight")).collect();
            assert_eq!(weights, ["set_weight 10", "set_weight 0"], "host {}", host.name);
        }
        let events = events_after(&txn, deployment_id, 0, 1000).unwrap();
        let verdict = events.iter().find(|event| event.kind == event_kind::ANALYSIS_VERDICT).expect("a verdict");
        assert!(verdict.message.contains("fail"), "{}", verdict.message);
    }

    #[test]
    fn a_failed_step_of_a_rollback_is_tried_again_until_traffic_is_back() {
        let mut txn = Txn::new(&EmptyState);
        let deploy = DeploySettings { public_port: Some(8080), analysis_window_seconds: Some(5), ..DeploySettings::default() };
        let (deployment_id, hosts) = setup(&mut txn, DeployStrategy::Canary, deploy);
        start(&mut txn, deployment_id, hosts.clone());
        // The second host's agent fails twice to move traffic back, then manages.
        let failing_unwinds = [(hosts[1].agent_id, 2)].into_iter().collect();
        let given = drive(&mut txn, deployment_id, &mut Hosts { unhealthy: vec![], canary: (30, 30), failing_unwinds });
        assert_eq!(deployment(&txn, deployment_id).status, DeploymentStatus::RolledBack);
        assert_eq!(given[&hosts[1].agent_id].iter().filter(|op| *op == "set_weight 0").count(), 3, "{:?}", given[&hosts[1].agent_id]);
        let rollout = deployment(&txn, deployment_id).rollout.unwrap();
        for host in &rollout.facts.hosts {
            assert_eq!((host.weight, host.lost, &host.new), (0, false, &NewRelease::Stopped), "host {}", host.host);
        }
    }

    #[test]
    fn a_host_that_keeps_failing_to_unwind_is_given_up_and_the_rollback_ends() {
        let mut txn = Txn::new(&EmptyState);
        let deploy = DeploySettings { public_port: Some(8080), analysis_window_seconds: Some(5), ..DeploySettings::default() };
        let (deployment_id, hosts) = setup(&mut txn, DeployStrategy::Canary, deploy);
        start(&mut txn, deployment_id, hosts.clone());
        let failing_unwinds = [(hosts[0].agent_id, u32::MAX)].into_iter().collect();
        let given = drive(&mut txn, deployment_id, &mut Hosts { unhealthy: vec![], canary: (30, 30), failing_unwinds });
        let tries = given[&hosts[0].agent_id].iter().filter(|op| *op == "set_weight 0").count();
        assert_eq!(tries as u32, UNWIND_ATTEMPTS);
        let ended = deployment(&txn, deployment_id);
        assert_eq!(ended.status, DeploymentStatus::RolledBack);
        let facts = ended.rollout.unwrap().facts;
        assert!(facts.hosts.iter().find(|host| host.host == hosts[0].agent_id).unwrap().lost);
        assert!(facts.hosts.iter().filter(|host| host.host != hosts[0].agent_id).all(|host| host.weight == 0 && !host.lost));
    }

    #[test]
    fn a_healthy_canary_with_enough_traffic_goes_through_every_step() {
        let mut txn = Txn::new(&EmptyState);
        let deploy = DeploySettings { public_port: Some(8080), analysis_window_seconds: Some(5), ..DeploySettings::default() };
        let (deployment_id, hosts) = setup(&mut txn, DeployStrategy::Canary, deploy);
        start(&mut txn, deployment_id, hosts.clone());
        let given = drive(&mut txn, deployment_id, &mut Hosts { unhealthy: vec![], canary: (50, 0), failing_unwinds: BTreeMap::new() });
        assert_eq!(deployment(&txn, deployment_id).status, DeploymentStatus::Success);
        let weights: Vec<&String> = given[&hosts[0].agent_id].iter().filter(|op| op.starts_with("set_weight")).collect();
        assert_eq!(weights, ["set_weight 10", "set_weight 50", "set_weight 100"]);
    }

    #[test]
    fn rolling_goes_region_by_region_one_host_at_a_time() {
        let mut txn = Txn::new(&EmptyState);
        let deploy = DeploySettings { public_port: Some(8080), ..DeploySettings::default() };
        let (deployment_id, hosts) = setup(&mut txn, DeployStrategy::Rolling, deploy);
        start(&mut txn, deployment_id, hosts.clone());
        drive(&mut txn, deployment_id, &mut Hosts { unhealthy: vec![], canary: (0, 0), failing_unwinds: BTreeMap::new() });
        assert_eq!(deployment(&txn, deployment_id).status, DeploymentStatus::Success);
        let switched: Vec<Option<u64>> = events_after(&txn, deployment_id, 0, 1000)
            .unwrap()
            .into_iter()
            .filter(|event| event.kind == event_kind::HOST_SWITCHED)
            .map(|event| event.host)
            .collect();
        assert_eq!(switched, hosts.iter().map(|host| Some(host.agent_id)).collect::<Vec<_>>(), "in rollout order, once each");
    }
}
