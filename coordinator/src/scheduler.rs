//! The leader's scheduler: matches queued jobs to connected agents by labels and free capacity,
//! fairly between pipelines and within each pipeline's concurrency, and watches agents'
//! heartbeats to declare the silent ones lost (their jobs are then retried elsewhere).
//! `plan_assignments` and `lost_agents` are pure; `Scheduler` carries out one round at a time.
//!
//! A round costs O(queued + running jobs + present agents) in memory: the agents' records are
//! kept in [`AgentRecords`] (reloaded per agent on `AgentChanged`), and every state event that
//! arrived while a round ran is answered by one next round, so the cost follows the rate of
//! rounds, not of events.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fleet::Fleet;
use crate::node::{Node, Requester};
use crate::state::Command;
use crate::state::apply::{index, index_ids, job_status_name, load_id};
use crate::state::command::Assignment;
use crate::state::events::StateEvent;
use crate::state::records::{Agent, AgentState, Job, JobStatus, Pipeline};
use crate::store::Table;

/// A queued job as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedJob {
    pub job_id: u64,
    pub pipeline_id: u64,
    pub labels: BTreeMap<String, String>,
    pub next_attempt: u32,
    pub queued_at: i64,
}

/// A connected agent that takes work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub agent_id: u64,
    /// Shared with the scheduler's copy of the agent: a round does not copy every agent's labels.
    pub labels: Arc<BTreeMap<String, String>>,
    pub free: u32,
}

/// Whether an agent's labels satisfy a job's requirements. An agent label may hold a
/// comma-separated list (`environment=staging,production`, `executor=docker,shell`); a required
/// value matches any element of it.
pub fn labels_match(required: &BTreeMap<String, String>, offered: &BTreeMap<String, String>) -> bool {
    required.iter().all(|(key, value)| offered.get(key).is_some_and(|offered| offered.split(',').any(|element| element.trim() == value)))
}

/// One round of decisions. Pipelines take turns, oldest waiting job first, so one pipeline's
/// burst cannot starve another; a pipeline at its concurrency limit is skipped; among the
/// agents that match, the one with the most free slots takes the job (spreading the load).
pub fn plan_assignments(
    queued: &[QueuedJob],
    agents: &mut [Candidate],
    running_per_pipeline: &HashMap<u64, u32>,
    concurrency: &HashMap<u64, u32>,
) -> Vec<Assignment> {
    let mut per_pipeline: BTreeMap<u64, VecDeque<&QueuedJob>> = BTreeMap::new();
    let mut ordered: Vec<&QueuedJob> = queued.iter().collect();
    ordered.sort_by_key(|job| (job.queued_at, job.job_id));
    for job in ordered {
        per_pipeline.entry(job.pipeline_id).or_default().push_back(job);
    }
    // Pipelines in the order of their oldest waiting job.
    let mut turn: VecDeque<u64> = {
        let mut pipelines: Vec<(i64, u64, u64)> =
            per_pipeline.iter().map(|(pipeline, jobs)| (jobs[0].queued_at, jobs[0].job_id, *pipeline)).collect();
        pipelines.sort();
        pipelines.into_iter().map(|(_, _, pipeline)| pipeline).collect()
    };
    let mut running = running_per_pipeline.clone();
    let mut assignments = Vec::new();
    while let Some(pipeline_id) = turn.pop_front() {
        if agents.iter().all(|agent| agent.free == 0) {
            break;
        }
        let jobs = per_pipeline.get_mut(&pipeline_id).expect("every pipeline in turn has jobs");
        let at_limit = concurrency.get(&pipeline_id).is_some_and(|limit| running.get(&pipeline_id).copied().unwrap_or(0) >= *limit);
        if at_limit {
            continue;
        }
        // The pipeline's oldest job that some agent can take now; jobs nobody can take wait
        // without blocking the pipeline's others.
        let mut placed = false;
        for position in 0..jobs.len() {
            let job = jobs[position];
            let best = agents
                .iter_mut()
                .filter(|agent| agent.free > 0 && labels_match(&job.labels, &agent.labels))
                .max_by_key(|agent| (agent.free, std::cmp::Reverse(agent.agent_id)));
            if let Some(agent) = best {
                agent.free -= 1;
                assignments.push(Assignment { job_id: job.job_id, agent_id: agent.agent_id, attempt: job.next_attempt });
                *running.entry(pipeline_id).or_default() += 1;
                jobs.remove(position);
                placed = true;
                break;
            }
        }
        if placed && !jobs.is_empty() {
            turn.push_back(pipeline_id);
        }
    }
    assignments
}

/// Agents the replicated state calls connected that the leader has not heard from within
/// `grace`. `last_heard` is how long ago each was heard of (absent: never since this node
/// became leader, counted from `leader_for`).
pub fn lost_agents(connected: &[u64], last_heard: &HashMap<u64, Duration>, leader_for: Duration, grace: Duration) -> Vec<(u64, Duration)> {
    connected
        .iter()
        .filter_map(|agent_id| {
            let silent = last_heard.get(agent_id).copied().unwrap_or(leader_for).min(leader_for);
            (silent > grace).then_some((*agent_id, silent))
        })
        .collect()
}

/// The scheduler's copy of the agents' records, so that a round does not read and decode every
/// agent. An agent's record changes only through commands that raise `AgentChanged` (connected,
/// lost, deregistered), except registration, which leaves it offline (nothing to schedule
/// on, nothing to lose) until it connects. A changed agent is reloaded before the next round;
/// everything is reloaded after a missed event, when this node becomes leader, and every
/// [`AgentRecords::RELOAD_ALL_EVERY`] (one second) as a safety net.
#[derive(Default)]
struct AgentRecords {
    agents: HashMap<u64, KnownAgent>,
    stale: HashSet<u64>,
    loaded_at: Option<Instant>,
}

struct KnownAgent {
    agent: Agent,
    /// The labels jobs are matched against: the agent's own and `executor=<its executors>`.
    offered: Arc<BTreeMap<String, String>>,
}

impl KnownAgent {
    fn new(agent: Agent) -> Self {
        let mut offered = agent.labels.clone();
        offered.insert("executor".into(), agent.executors.join(","));
        // Release jobs are for one host: they require `agent_id=<its id>`.
        offered.insert("agent_id".into(), agent.agent_id.to_string());
        KnownAgent { agent, offered: Arc::new(offered) }
    }
}

impl AgentRecords {
    /// Short on purpose: a reload of every agent is cheap next to a round's other reads (about a
    /// millisecond for 1,000 agents), and it bounds how long a record missed by the
    /// invalidation can stay stale (a queued job once waited 15 s beside a free agent).
    const RELOAD_ALL_EVERY: Duration = Duration::from_secs(1);

    fn invalidate(&mut self, agent_id: u64) {
        self.stale.insert(agent_id);
    }

    fn invalidate_all(&mut self) {
        self.loaded_at = None;
    }

    /// Bring the copy up to date with the applied state.
    fn refresh(&mut self, node: &Node) -> anyhow::Result<()> {
        if self.loaded_at.is_none_or(|loaded_at| loaded_at.elapsed() > Self::RELOAD_ALL_EVERY) {
            let mut agents = HashMap::new();
            for (_, bytes) in node.backend.scan(Table::Agents, crate::store::prefix_range(&[]), usize::MAX, false)? {
                let agent: Agent = crate::state::codec::decode(Table::Agents, &bytes)?;
                agents.insert(agent.agent_id, KnownAgent::new(agent));
            }
            self.agents = agents;
            self.stale.clear();
            self.loaded_at = Some(Instant::now());
            return Ok(());
        }
        let state = node.state();
        for agent_id in std::mem::take(&mut self.stale) {
            match load_id::<Agent>(&state, Table::Agents, agent_id)? {
                Some(agent) => self.agents.insert(agent_id, KnownAgent::new(agent)),
                None => self.agents.remove(&agent_id),
            };
        }
        Ok(())
    }
}

pub struct Scheduler {
    node: Arc<Node>,
    fleet: Arc<Fleet>,
    /// When this node last became leader (leases get a grace from then).
    leader_since: Option<Instant>,
    lease_grace: Duration,
    agents: AgentRecords,
}

impl Scheduler {
    pub fn new(node: Arc<Node>, fleet: Arc<Fleet>, lease_grace: Duration) -> Self {
        Scheduler { node, fleet, leader_since: None, lease_grace, agents: AgentRecords::default() }
    }

    /// Run for as long as the node lives: a round whenever work or the fleet changes, and at
    /// least every second. Events that arrive while a round runs are answered together by the
    /// next one.
    pub async fn run(mut self) {
        let mut events = self.node.subscribe();
        let fleet_changed = self.fleet.changed();
        loop {
            let mut due = tokio::select! {
                event = events.recv() => match event {
                    Ok(event) => self.note(&event),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.missed_events(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = fleet_changed.notified() => true,
                _ = tokio::time::sleep(Duration::from_secs(1)) => true,
            };
            loop {
                match events.try_recv() {
                    Ok(event) => due |= self.note(&event),
                    Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => due |= self.missed_events(),
                    Err(tokio::sync::broadcast::error::TryRecvError::Empty) => break,
                    Err(tokio::sync::broadcast::error::TryRecvError::Closed) => return,
                }
            }
            if !due {
                continue;
            }
            if let Err(error) = self.round().await {
                tracing::warn!(%error, "scheduler round failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Take note of an applied change; whether it calls for a round. Assignments are the
    /// scheduler's own doing and free nothing.
    fn note(&mut self, event: &StateEvent) -> bool {
        match event {
            StateEvent::JobsAssigned { .. } | StateEvent::RepositoriesChanged | StateEvent::DeploymentProgress { .. } => false,
            StateEvent::AgentChanged { agent_id } => {
                self.agents.invalidate(*agent_id);
                true
            }
            StateEvent::WorkChanged | StateEvent::JobsChanged { .. } | StateEvent::DeploymentChanged { .. } => true,
        }
    }

    /// Events were dropped (the scheduler fell behind): nothing cached can be trusted.
    fn missed_events(&mut self) -> bool {
        self.agents.invalidate_all();
        true
    }

    /// One round: declare silent agents lost, then assign what can be assigned.
    pub async fn round(&mut self) -> anyhow::Result<usize> {
        if !self.node.is_leader() {
            self.leader_since = None;
            self.agents.invalidate_all();
            return Ok(0);
        }
        let leader_since = *self.leader_since.get_or_insert_with(Instant::now);
        self.agents.refresh(&self.node)?;
        self.expire_silent_agents(leader_since.elapsed()).await?;
        let started = Instant::now();
        let (queued, mut candidates, running, concurrency) = self.view()?;
        metrics::gauge!("davit_scheduler_queue_depth").set(queued.len() as f64);
        if queued.is_empty() || candidates.is_empty() {
            return Ok(0);
        }
        let now = crate::auth::now_millis();
        for job in &queued {
            metrics::histogram!("davit_scheduler_wait_seconds").record(((now - job.queued_at).max(0) as f64) / 1000.0);
        }
        let assignments = plan_assignments(&queued, &mut candidates, &running, &concurrency);
        if assignments.is_empty() {
            return Ok(0);
        }
        let count = assignments.len();
        let lease_expires_at = now + self.lease_grace.as_millis() as i64;
        let (outcome, _) = self.node.propose(&Requester::system(), Command::AssignJobs { assignments, lease_expires_at }).await?;
        let assigned = outcome.result.map(|applied| applied.affected as usize).unwrap_or(0);
        metrics::counter!("davit_scheduler_assignments_total").increment(assigned as u64);
        metrics::histogram!("davit_scheduler_dispatch_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(planned = count, assigned, "scheduler round");
        Ok(assigned)
    }

    async fn expire_silent_agents(&self, leader_for: Duration) -> anyhow::Result<()> {
        let mut connected = Vec::new();
        let mut heard = self.fleet.last_heard();
        let now = crate::auth::now_millis();
        for KnownAgent { agent, .. } in self.agents.agents.values() {
            if matches!(agent.state, AgentState::Online | AgentState::Draining) {
                connected.push(agent.agent_id);
                // A session that just (re)connected counts as heard from at its connection,
                // even before its coordinator's first report arrives.
                if let Some(connected_at) = agent.connected_at {
                    let since_connected = Duration::from_millis((now - connected_at).max(0) as u64);
                    heard.entry(agent.agent_id).and_modify(|silent| *silent = (*silent).min(since_connected)).or_insert(since_connected);
                }
            }
        }
        for (agent_id, silent) in lost_agents(&connected, &heard, leader_for, self.lease_grace) {
            let reason = format!("agent {agent_id} sent no heartbeat for {} s (grace {} s)", silent.as_secs(), self.lease_grace.as_secs());
            tracing::warn!(agent_id, "{reason}; retrying its jobs elsewhere");
            self.node.propose(&Requester::system(), Command::AgentLost { agent_id, reason }).await?;
        }
        Ok(())
    }

    /// Queued jobs, agents with free capacity, running builds per pipeline and pipeline limits.
    #[allow(clippy::type_complexity)]
    fn view(&self) -> anyhow::Result<(Vec<QueuedJob>, Vec<Candidate>, HashMap<u64, u32>, HashMap<u64, u32>)> {
        let state = self.node.state();
        let mut queued = Vec::new();
        let mut concurrency = HashMap::new();
        for job_id in index_ids(&state, index::JOBS_BY_STATUS, job_status_name(JobStatus::Queued))? {
            let Some(job) = load_id::<Job>(&state, Table::Jobs, job_id)? else { continue };
            if let std::collections::hash_map::Entry::Vacant(entry) = concurrency.entry(job.pipeline_id)
                && let Some(limit) =
                    load_id::<Pipeline>(&state, Table::Pipelines, job.pipeline_id)?.and_then(|pipeline| pipeline.build.concurrency)
            {
                entry.insert(limit);
            }
            queued.push(QueuedJob {
                job_id,
                pipeline_id: job.pipeline_id,
                labels: job.labels,
                next_attempt: job.attempt + 1,
                queued_at: job.queued_at,
            });
        }
        let mut running_per_agent: HashMap<u64, u32> = HashMap::new();
        let mut running_per_pipeline: HashMap<u64, u32> = HashMap::new();
        if !queued.is_empty() {
            for job_id in index_ids(&state, index::JOBS_BY_STATUS, job_status_name(JobStatus::Running))? {
                let Some(job) = load_id::<Job>(&state, Table::Jobs, job_id)? else { continue };
                if let Some(lease) = &job.lease {
                    *running_per_agent.entry(lease.agent_id).or_default() += 1;
                }
                *running_per_pipeline.entry(job.pipeline_id).or_default() += 1;
            }
        }
        let mut candidates = Vec::new();
        for presence in self.fleet.present() {
            if presence.draining {
                continue;
            }
            let Some(KnownAgent { agent, offered }) = self.agents.agents.get(&presence.agent_id) else { continue };
            if agent.state != AgentState::Online {
                continue;
            }
            let busy = running_per_agent.get(&agent.agent_id).copied().unwrap_or(0);
            let free = presence.capacity.saturating_sub(busy);
            if free > 0 {
                candidates.push(Candidate { agent_id: agent.agent_id, labels: offered.clone(), free });
            }
        }
        Ok((queued, candidates, running_per_pipeline, concurrency))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect()
    }

    fn job(job_id: u64, pipeline_id: u64, queued_at: i64, required: &[(&str, &str)]) -> QueuedJob {
        QueuedJob { job_id, pipeline_id, labels: labels(required), next_attempt: 1, queued_at }
    }

    fn agent(agent_id: u64, free: u32, offered: &[(&str, &str)]) -> Candidate {
        Candidate { agent_id, labels: Arc::new(labels(offered)), free }
    }

    #[test]
    fn labels_match_exact_values_and_list_elements() {
        let offered = labels(&[("pool", "build"), ("environment", "staging, production"), ("executor", "docker,shell")]);
        assert!(labels_match(&labels(&[("pool", "build")]), &offered));
        assert!(labels_match(&labels(&[("environment", "production"), ("executor", "docker")]), &offered));
        assert!(!labels_match(&labels(&[("pool", "deploy")]), &offered));
        assert!(!labels_match(&labels(&[("region", "eu")]), &offered));
        assert!(!labels_match(&labels(&[("environment", "prod")]), &offered));
        assert!(labels_match(&BTreeMap::new(), &offered));
    }

    #[test]
    fn pipelines_take_turns() {
        // Pipeline 1 queued five jobs before pipeline 2 queued one: with three free slots,
        // pipeline 2 still gets one.
        let queued: Vec<QueuedJob> = (1..=5).map(|id| job(id, 1, id as i64, &[])).chain([job(6, 2, 10, &[])]).collect();
        let mut agents = vec![agent(1, 3, &[])];
        let plan = plan_assignments(&queued, &mut agents, &HashMap::new(), &HashMap::new());
        let jobs: Vec<u64> = plan.iter().map(|assignment| assignment.job_id).collect();
        assert_eq!(jobs, vec![1, 6, 2]);
        assert_eq!(agents[0].free, 0);
    }

    #[test]
    fn concurrency_limits_and_labels_are_honoured() {
        let queued = vec![job(1, 1, 1, &[]), job(2, 1, 2, &[]), job(3, 2, 3, &[("region", "eu")]), job(4, 2, 4, &[])];
        let mut agents = vec![agent(7, 4, &[("region", "us")])];
        let running = HashMap::from([(1, 1)]);
        let limits = HashMap::from([(1, 2)]);
        let plan = plan_assignments(&queued, &mut agents, &running, &limits);
        // Pipeline 1 may start one more (limit 2, one running); job 3 needs an eu agent.
        let jobs: Vec<u64> = plan.iter().map(|assignment| assignment.job_id).collect();
        assert_eq!(jobs, vec![1, 4]);
        assert!(plan.iter().all(|assignment| assignment.agent_id == 7 && assignment.attempt == 1));
    }

    #[test]
    fn load_spreads_to_the_freest_agent() {
        let queued = vec![job(1, 1, 1, &[]), job(2, 2, 2, &[]), job(3, 3, 3, &[])];
        let mut agents = vec![agent(1, 1, &[]), agent(2, 2, &[])];
        let plan = plan_assignments(&queued, &mut agents, &HashMap::new(), &HashMap::new());
        let agents_used: Vec<u64> = plan.iter().map(|assignment| assignment.agent_id).collect();
        assert_eq!(agents_used, vec![2, 1, 2]);
    }

    #[test]
    fn silent_agents_are_lost_after_the_grace_counted_from_leadership() {
        let grace = Duration::from_secs(60);
        let heard = HashMap::from([(1, Duration::from_secs(5)), (2, Duration::from_secs(90))]);
        // A new leader (10 s) has heard of neither 2 nor 3 for long enough.
        assert!(lost_agents(&[1, 2, 3], &heard, Duration::from_secs(10), grace).is_empty());
        let lost: Vec<u64> = lost_agents(&[1, 2, 3], &heard, Duration::from_secs(600), grace).into_iter().map(|(id, _)| id).collect();
        assert_eq!(lost, vec![2, 3]);
    }
}
