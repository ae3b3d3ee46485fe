//! Commit statuses, on the leader: when a run (a deployment) changes state, tell its
//! repository's provider (GitHub, GitLab, Bitbucket) through its commit-status API, with retries
//! and exponential backoff. It only watches applied state and sends from its own queue: nothing
//! on the run's path ever waits for it, so a provider outage never blocks or slows a run. It must
//! never log an access token.
//!
//! `state events -> Watch::observe (leader: new and tracked deployments, state changed?) ->
//! scm::status::build_request -> ReportQueue (newest per repository, commit and context) ->
//! send loop (at most MAX_IN_FLIGHT at once, one per key) -> provider -> retry or done`.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::node::Node;
use crate::outbound::OutboundPolicy;
use crate::scm::status::{self, CommitState, StatusRequest, StatusUpdate};
use crate::secrets::MasterKeys;
use crate::state::apply::{index, index_ids, load_id, status_name};
use crate::state::codec::{id_key, key_id};
use crate::state::records::{Deployment, DeploymentStatus, Job, Pipeline, Repository, ScmType};
use crate::store::{StoreResult, Table};

/// Reports waiting or in flight, at most (one per repository, commit and context). Beyond it new
/// reports are dropped and counted: memory stays bounded through a long provider outage.
pub const QUEUE_CAPACITY: usize = 10_000;
/// Requests in flight at once, across providers.
pub const MAX_IN_FLIGHT: usize = 16;
/// How often the leader looks at its runs even without a state event (a safety net).
const OBSERVE_INTERVAL: Duration = Duration::from_secs(2);
/// At most one pass per this interval: under a burst of state events (a fleet finishing jobs)
/// the runs are read a few times a second, not once per event; a status a quarter second later
/// changes nothing for the people reading it.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(250);
/// New deployments read per pass; more are read at the next pass.
const NEW_DEPLOYMENTS_PER_PASS: usize = 1000;

/// How failed deliveries are retried: the delay doubles from `first_delay` up to `max_delay`
/// (each with jitter), and a report still undelivered `give_up_after` its first try is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub first_delay: Duration,
    pub max_delay: Duration,
    pub give_up_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { first_delay: Duration::from_secs(1), max_delay: Duration::from_secs(300), give_up_after: Duration::from_secs(3600) }
    }
}

/// The delay before the next try after `failures` failed ones (1 or more), before jitter.
pub fn retry_delay(policy: &RetryPolicy, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(30);
    policy.first_delay.saturating_mul(1 << doublings).min(policy.max_delay)
}

/// What a provider's answer means for a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    /// Worth trying again: no answer (refused, timed out), 5xx, 408 or 429.
    Retry,
    /// The provider refused the request itself (bad token, unknown repository, invalid state
    /// transition): trying again would get the same answer.
    Rejected,
}

/// Classify a provider's answer: `None` when no HTTP answer came.
pub fn classify(status: Option<u16>) -> Delivery {
    match status {
        Some(200..=299) => Delivery::Delivered,
        None | Some(408) | Some(429) | Some(500..=599) => Delivery::Retry,
        Some(_) => Delivery::Rejected,
    }
}

/// One status per repository, commit and context is what a provider shows; a newer one for the
/// same key replaces an older one not yet sent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReportKey {
    pub repo_id: u64,
    pub commit: String,
    pub context: String,
}

/// Which report is newer: a later deployment, or a later state of the same deployment
/// (`CommitState` is ordered queued < running < final).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReportVersion {
    pub deployment_id: u64,
    pub state: CommitState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub key: ReportKey,
    pub version: ReportVersion,
    pub provider: ScmType,
    pub request: StatusRequest,
}

#[derive(Debug, Clone)]
struct Pending {
    report: Report,
    first_queued_ms: u64,
    failures: u32,
    due_ms: u64,
}

#[derive(Debug, Default)]
struct Slot {
    queued: Option<Pending>,
    sending: Option<Pending>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    Queued,
    /// It replaced an older report of the same key that was waiting.
    Replaced,
    /// A report as new or newer for the same key is already waiting or in flight.
    Stale,
    /// The queue is full; the report is dropped.
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    Delivered,
    Rejected,
    Retrying {
        after: Duration,
    },
    /// Failed, and a newer report for the same key is waiting: the failed one is dropped.
    Superseded,
    GaveUp,
}

/// The reports to send, newest per key, one in flight per key so that they reach the provider in
/// order: a stale "pending" never lands after "success". Pure (time is passed in, as
/// milliseconds from any fixed origin), so its rules are tested without a network or a clock.
#[derive(Debug)]
pub struct ReportQueue {
    slots: BTreeMap<ReportKey, Slot>,
    capacity: usize,
    policy: RetryPolicy,
}

impl ReportQueue {
    pub fn new(capacity: usize, policy: RetryPolicy) -> Self {
        ReportQueue { slots: BTreeMap::new(), capacity, policy }
    }

    /// Keys with a report waiting or in flight.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn offer(&mut self, report: Report, now_ms: u64) -> Offered {
        if !self.slots.contains_key(&report.key) && self.slots.len() >= self.capacity {
            return Offered::Full;
        }
        let slot = self.slots.entry(report.key.clone()).or_default();
        let newest = [&slot.queued, &slot.sending].into_iter().flatten().map(|pending| pending.report.version).max();
        if newest.is_some_and(|newest| newest >= report.version) {
            return Offered::Stale;
        }
        let replaced = slot.queued.is_some();
        slot.queued = Some(Pending { report, first_queued_ms: now_ms, failures: 0, due_ms: now_ms });
        if replaced { Offered::Replaced } else { Offered::Queued }
    }

    /// Up to `limit` reports due by `now_ms`, marked in flight until [`finish`](Self::finish).
    pub fn take_due(&mut self, now_ms: u64, limit: usize) -> Vec<Report> {
        let mut due = Vec::new();
        for slot in self.slots.values_mut() {
            if due.len() >= limit {
                break;
            }
            if slot.sending.is_none() && slot.queued.as_ref().is_some_and(|pending| pending.due_ms <= now_ms) {
                let pending = slot.queued.take().expect("checked above");
                due.push(pending.report.clone());
                slot.sending = Some(pending);
            }
        }
        due
    }

    /// When the next waiting report is due, if one is waiting (not in flight).
    pub fn next_due_ms(&self) -> Option<u64> {
        self.slots
            .values()
            .filter(|slot| slot.sending.is_none())
            .filter_map(|slot| slot.queued.as_ref())
            .map(|pending| pending.due_ms)
            .min()
    }

    /// Record how sending `key`'s in-flight report went. `jitter` in `[0, 1]` scales the retry
    /// delay between half and all of it, so that reports failed together spread out.
    pub fn finish(&mut self, key: &ReportKey, delivery: Delivery, now_ms: u64, jitter: f64) -> Finished {
        let Some(slot) = self.slots.get_mut(key) else { return Finished::Superseded };
        let Some(mut sent) = slot.sending.take() else { return Finished::Superseded };
        let finished = match delivery {
            Delivery::Delivered => Finished::Delivered,
            Delivery::Rejected => Finished::Rejected,
            Delivery::Retry if slot.queued.is_some() => Finished::Superseded,
            Delivery::Retry => {
                sent.failures += 1;
                let delay = retry_delay(&self.policy, sent.failures).mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
                let due_ms = now_ms.saturating_add(delay.as_millis() as u64);
                if due_ms.saturating_sub(sent.first_queued_ms) > self.policy.give_up_after.as_millis() as u64 {
                    Finished::GaveUp
                } else {
                    sent.due_ms = due_ms;
                    slot.queued = Some(sent);
                    Finished::Retrying { after: delay }
                }
            }
        };
        if slot.queued.is_none() && slot.sending.is_none() {
            self.slots.remove(key);
        }
        finished
    }
}

/// Counts since start, for tests and logs (the same numbers go to Prometheus).
#[derive(Debug, Default)]
pub struct DeliveryCounts {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
}

/// The reporter's HTTP client, the only one it uses. Short timeouts: a slow provider only delays
/// its own reports. No redirects: a status API has no reason to send one, and following it would
/// carry the token elsewhere.
pub fn status_http_client(outbound: &Arc<OutboundPolicy>) -> reqwest::Client {
    // The outbound policy's client: its resolver, peer-address check and redirect policy refuse
    // internal addresses (a provider API base URL pointing at the metadata service, say) when it
    // connects, not only when the URL was saved. Refusing every redirect only narrows it.
    outbound
        .http_client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .user_agent(concat!("davit/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a reqwest client with these settings always builds")
}

/// What the leader has already reported for the runs it follows.
#[derive(Debug, Default)]
struct Watch {
    leading: bool,
    /// Runs not ended yet, with the state last reported for each (`None`: nothing yet).
    tracked: BTreeMap<u64, Option<CommitState>>,
    /// Deployment ids are handed out in increasing order; everything above this one is new.
    highest_seen: u64,
}

pub struct CommitStatusReporter {
    node: Arc<Node>,
    secrets: Arc<MasterKeys>,
    public_base_url: String,
    client: reqwest::Client,
    queue: Mutex<ReportQueue>,
    wake: tokio::sync::Notify,
    origin: Instant,
    pub counts: DeliveryCounts,
}

impl CommitStatusReporter {
    pub fn new(node: Arc<Node>, secrets: Arc<MasterKeys>, outbound: &Arc<OutboundPolicy>, policy: RetryPolicy) -> Arc<Self> {
        let public_base_url = node.config.public_base_url();
        Arc::new(CommitStatusReporter {
            node,
            secrets,
            public_base_url,
            client: status_http_client(outbound),
            queue: Mutex::new(ReportQueue::new(QUEUE_CAPACITY, policy)),
            wake: tokio::sync::Notify::new(),
            origin: Instant::now(),
            counts: DeliveryCounts::default(),
        })
    }

    /// Start watching runs and sending reports. Both loops run on every node; only the leader
    /// finds anything to report.
    pub fn start(self: &Arc<Self>) {
        tokio::spawn(self.clone().watch_loop());
        tokio::spawn(self.clone().send_loop());
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    async fn watch_loop(self: Arc<Self>) {
        let mut events = self.node.subscribe();
        let mut ticker = tokio::time::interval(OBSERVE_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch = Watch::default();
        loop {
            tokio::select! {
                event = events.recv() => if let Err(tokio::sync::broadcast::error::RecvError::Closed) = event { return },
                _ = ticker.tick() => {}
            }
            // Everything that arrived meanwhile is answered by the same pass.
            loop {
                match events.try_recv() {
                    Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::TryRecvError::Empty) => break,
                    Err(tokio::sync::broadcast::error::TryRecvError::Closed) => return,
                }
            }
            if let Err(error) = self.observe(&mut watch) {
                tracing::warn!(%error, "commit statuses: reading deployments failed; trying again at the next event");
            }
            tokio::time::sleep(MIN_PASS_INTERVAL).await;
        }
    }

    /// One pass: on the leader, report every followed run whose commit state changed, and start
    /// following the runs created since the last pass. A new leader takes over the runs not ended
    /// yet and reports their current state once (what the previous leader had queued may be lost).
    fn observe(&self, watch: &mut Watch) -> StoreResult<()> {
        if !self.node.is_leader() {
            watch.leading = false;
            watch.tracked.clear();
            return Ok(());
        }
        let state = self.node.state();
        if !watch.leading {
            let last = self.node.backend.scan(Table::Deployments, (Bound::Unbounded, Bound::Unbounded), 1, true)?;
            watch.highest_seen = last.first().and_then(|(key, _)| key_id(key)).unwrap_or(0);
            for status in [DeploymentStatus::Pending, DeploymentStatus::InProgress] {
                for deployment_id in index_ids(&state, index::DEPLOYMENTS_BY_STATUS, status_name(status))? {
                    watch.tracked.insert(deployment_id, None);
                }
            }
            watch.leading = true;
        }
        let range = (Bound::Excluded(id_key(watch.highest_seen).to_vec()), Bound::Unbounded);
        for (key, _) in self.node.backend.scan(Table::Deployments, range, NEW_DEPLOYMENTS_PER_PASS, false)? {
            if let Some(deployment_id) = key_id(&key) {
                watch.tracked.insert(deployment_id, None);
                watch.highest_seen = watch.highest_seen.max(deployment_id);
            }
        }
        let mut ended = Vec::new();
        for (&deployment_id, reported) in watch.tracked.iter_mut() {
            let Some(deployment) = load_id::<Deployment>(&state, Table::Deployments, deployment_id)? else {
                ended.push(deployment_id);
                continue;
            };
            let jobs: Vec<Job> = if deployment.status == DeploymentStatus::Failed {
                let mut jobs = Vec::new();
                for job_id in index_ids(&state, index::JOBS_BY_DEPLOYMENT, &deployment_id.to_string())? {
                    jobs.extend(load_id::<Job>(&state, Table::Jobs, job_id)?);
                }
                jobs
            } else {
                Vec::new()
            };
            let commit_state = status::commit_state(&deployment, &jobs);
            if *reported != Some(commit_state) {
                self.enqueue(&deployment, commit_state)?;
                *reported = Some(commit_state);
            }
            if commit_state.is_final() {
                ended.push(deployment_id);
            }
        }
        for deployment_id in ended {
            watch.tracked.remove(&deployment_id);
        }
        Ok(())
    }

    /// Queue the report of `deployment` in `commit_state`, if its repository has an access token.
    fn enqueue(&self, deployment: &Deployment, commit_state: CommitState) -> StoreResult<()> {
        let state = self.node.state();
        let Some(pipeline) = load_id::<Pipeline>(&state, Table::Pipelines, deployment.pipeline_id)? else { return Ok(()) };
        let Some(repository) = load_id::<Repository>(&state, Table::Repositories, pipeline.repo_id)? else { return Ok(()) };
        // Without a token there is no status API to call (plain git servers, or not configured).
        let Some(sealed_token) = &repository.access_token else { return Ok(()) };
        if repository.scm_type == ScmType::Git {
            return Ok(());
        }
        let provider = provider_label(repository.scm_type);
        let failed = |reason: &'static str| {
            self.counts.failed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("davit_commit_status_failed_total", "provider" => provider, "reason" => reason).increment(1);
        };
        let access_token = match self.secrets.open(sealed_token, &crate::api::repos::access_token_context(&repository.repo_url)) {
            Ok(token) => token,
            Err(error) => {
                tracing::warn!(repo_id = repository.repo_id, %error, "commit statuses: the repository's access token cannot be opened");
                failed("token");
                return Ok(());
            }
        };
        let api_base = repository.api_url.clone().unwrap_or_else(|| status::default_api_base(repository.scm_type).to_string());
        let context = status::status_context(&pipeline.name, &pipeline.environment, &deployment.environment);
        let commit = status::reported_commit(deployment);
        let description = match (&deployment.status_reason, commit_state) {
            (Some(reason), CommitState::Failed | CommitState::Errored | CommitState::Cancelled) => {
                format!("{}: {reason}", commit_state.describe())
            }
            _ => commit_state.describe().to_string(),
        };
        let target_url = status::run_url(&self.public_base_url, deployment.deployment_id);
        let update = StatusUpdate {
            provider: repository.scm_type,
            api_base: &api_base,
            repo_url: &repository.repo_url,
            commit: &commit,
            state: commit_state,
            target_url: &target_url,
            description: &description,
            context: &context,
            access_token: &access_token,
        };
        let request = match status::build_request(&update) {
            Ok(request) => request,
            Err(error) => {
                tracing::warn!(repo_id = repository.repo_id, deployment_id = deployment.deployment_id, %error, "commit statuses: cannot build the request");
                failed("invalid");
                return Ok(());
            }
        };
        let report = Report {
            key: ReportKey { repo_id: repository.repo_id, commit, context },
            version: ReportVersion { deployment_id: deployment.deployment_id, state: commit_state },
            provider: repository.scm_type,
            request,
        };
        let offered = {
            let mut queue = self.queue.lock().expect("commit status queue lock");
            let offered = queue.offer(report, self.now_ms());
            metrics::gauge!("davit_commit_status_queue_length").set(queue.len() as f64);
            offered
        };
        match offered {
            Offered::Queued | Offered::Replaced => self.wake.notify_one(),
            Offered::Stale => {}
            Offered::Full => {
                tracing::warn!(
                    repo_id = repository.repo_id,
                    deployment_id = deployment.deployment_id,
                    "commit statuses: queue full; report dropped"
                );
                failed("queue_full");
            }
        }
        Ok(())
    }

    async fn send_loop(self: Arc<Self>) {
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            let now = self.now_ms();
            let (due, next_due) = {
                let mut queue = self.queue.lock().expect("commit status queue lock");
                let due = queue.take_due(now, MAX_IN_FLIGHT.saturating_sub(in_flight.len()));
                (due, queue.next_due_ms())
            };
            for report in due {
                let client = self.client.clone();
                in_flight.spawn(async move {
                    let answer = send(&client, &report.request).await;
                    (report, answer)
                });
            }
            let wait = next_due.map(|due| Duration::from_millis(due.saturating_sub(now))).unwrap_or(Duration::from_secs(60));
            tokio::select! {
                Some(joined) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Ok((report, answer)) = joined {
                        self.finished(report, answer);
                    }
                }
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait.min(Duration::from_secs(60))) => {}
            }
        }
    }

    fn finished(&self, report: Report, answer: Result<(u16, String), String>) {
        let status_code = answer.as_ref().ok().map(|(status_code, _)| *status_code);
        let delivery = classify(status_code);
        let jitter = rand::random::<f64>();
        let finished = {
            let mut queue = self.queue.lock().expect("commit status queue lock");
            let finished = queue.finish(&report.key, delivery, self.now_ms(), jitter);
            metrics::gauge!("davit_commit_status_queue_length").set(queue.len() as f64);
            finished
        };
        let provider = provider_label(report.provider);
        let (repo_id, deployment_id) = (report.key.repo_id, report.version.deployment_id);
        let detail = match &answer {
            Ok((status_code, body)) => format!("HTTP {status_code}: {body}"),
            Err(error) => error.clone(),
        };
        match finished {
            Finished::Delivered => {
                self.counts.sent.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("davit_commit_status_sent_total", "provider" => provider).increment(1);
                tracing::debug!(repo_id, deployment_id, provider, state = ?report.version.state, "commit status sent");
            }
            Finished::Retrying { after } => {
                self.counts.retried.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("davit_commit_status_retried_total", "provider" => provider).increment(1);
                tracing::info!(repo_id, deployment_id, provider, retry_in_ms = after.as_millis() as u64, %detail, "commit status not delivered; retrying");
                self.wake.notify_one();
            }
            Finished::Superseded => {}
            Finished::Rejected | Finished::GaveUp => {
                self.counts.failed.fetch_add(1, Ordering::Relaxed);
                let reason = if finished == Finished::Rejected { "rejected" } else { "gave_up" };
                metrics::counter!("davit_commit_status_failed_total", "provider" => provider, "reason" => reason).increment(1);
                tracing::warn!(repo_id, deployment_id, provider, reason, %detail, "commit status not delivered");
            }
        }
    }

    #[cfg(test)]
    fn queue_len(&self) -> usize {
        self.queue.lock().expect("commit status queue lock").len()
    }

    /// The newest state waiting or in flight for any key, for tests that must know the watcher
    /// has seen a change.
    #[cfg(test)]
    fn newest_queued_states(&self) -> Vec<CommitState> {
        let queue = self.queue.lock().expect("commit status queue lock");
        queue.slots.values().flat_map(|slot| [&slot.queued, &slot.sending]).flatten().map(|pending| pending.report.version.state).collect()
    }
}

fn provider_label(provider: ScmType) -> &'static str {
    match provider {
        ScmType::Github => "github",
        ScmType::Gitlab => "gitlab",
        ScmType::Bitbucket => "bitbucket",
        ScmType::Git => "git",
    }
}

/// Send one request: the status code and the start of the answer's body, or why no answer came.
/// The error text never holds the token (it is only in a header, which reqwest does not print).
async fn send(client: &reqwest::Client, request: &StatusRequest) -> Result<(u16, String), String> {
    let method = reqwest::Method::from_bytes(request.method.as_bytes()).map_err(|error| error.to_string())?;
    let mut builder = client.request(method, &request.url);
    for (name, value) in &request.headers {
        builder = builder.header(*name, value);
    }
    let response = builder.body(serde_json::to_vec(&request.body).unwrap_or_default()).send().await.map_err(|error| error.to_string())?;
    let status_code = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    Ok((status_code, body.chars().take(300).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECOND: u64 = 1000;

    fn report(deployment_id: u64, state: CommitState) -> Report {
        Report {
            key: ReportKey { repo_id: 1, commit: "abc1234".into(), context: "davit/build".into() },
            version: ReportVersion { deployment_id, state },
            provider: ScmType::Github,
            request: StatusRequest {
                method: "POST",
                url: format!("https://api.github.com/{deployment_id}/{state:?}"),
                headers: Vec::new(),
                body: json!({}),
            },
        }
    }

    #[test]
    fn delays_double_from_one_second_to_five_minutes() {
        let policy = RetryPolicy::default();
        let delays: Vec<u64> = (1..=12).map(|failures| retry_delay(&policy, failures).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(retry_delay(&policy, u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn answers_are_classified() {
        assert_eq!(classify(Some(201)), Delivery::Delivered);
        assert_eq!(classify(Some(200)), Delivery::Delivered);
        for retry in [None, Some(500), Some(502), Some(503), Some(408), Some(429)] {
            assert_eq!(classify(retry), Delivery::Retry, "{retry:?}");
        }
        for rejected in [Some(400), Some(401), Some(403), Some(404), Some(422), Some(301)] {
            assert_eq!(classify(rejected), Delivery::Rejected, "{rejected:?}");
        }
    }

    #[test]
    fn the_newest_state_wins_and_is_sent_after_the_one_in_flight() {
        let mut queue = ReportQueue::new(10, RetryPolicy::default());
        assert_eq!(queue.offer(report(7, CommitState::Queued), 0), Offered::Queued);
        assert_eq!(queue.offer(report(7, CommitState::Running), 0), Offered::Replaced);
        let sending = queue.take_due(0, 10);
        assert_eq!(sending.iter().map(|report| report.version.state).collect::<Vec<_>>(), [CommitState::Running]);
        // Success arrives while "running" is in flight: it waits, so the two cannot cross.
        assert_eq!(queue.offer(report(7, CommitState::Succeeded), 0), Offered::Queued);
        assert!(queue.take_due(0, 10).is_empty());
        // A stale report of the same run is refused.
        assert_eq!(queue.offer(report(7, CommitState::Queued), 0), Offered::Stale);
        assert_eq!(queue.offer(report(7, CommitState::Succeeded), 0), Offered::Stale);
        // "running" failed: it is not retried, since success supersedes it.
        assert_eq!(queue.finish(&sending[0].key, Delivery::Retry, 10, 1.0), Finished::Superseded);
        let next = queue.take_due(10, 10);
        assert_eq!(next.iter().map(|report| report.version.state).collect::<Vec<_>>(), [CommitState::Succeeded]);
        assert_eq!(queue.finish(&next[0].key, Delivery::Delivered, 20, 1.0), Finished::Delivered);
        assert!(queue.is_empty());
        // A later run of the same pipeline on the same commit starts over from pending.
        assert_eq!(queue.offer(report(8, CommitState::Queued), 30), Offered::Queued);
        assert_eq!(queue.offer(report(7, CommitState::Failed), 30), Offered::Stale);
    }

    #[test]
    fn failures_are_retried_with_backoff_until_an_hour_has_passed() {
        let mut queue = ReportQueue::new(10, RetryPolicy::default());
        queue.offer(report(1, CommitState::Succeeded), 0);
        let mut now = 0;
        let mut delays = Vec::new();
        loop {
            let due = queue.take_due(now, 10);
            assert_eq!(due.len(), 1, "due at {now}");
            assert!(queue.take_due(now, 10).is_empty(), "one in flight per key");
            match queue.finish(&due[0].key, Delivery::Retry, now, 1.0) {
                Finished::Retrying { after } => {
                    delays.push(after.as_secs());
                    // Not due a moment before the delay is over.
                    assert!(queue.take_due(now + after.as_millis() as u64 - 1, 10).is_empty());
                    now = queue.next_due_ms().unwrap();
                }
                Finished::GaveUp => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(delays[..10], [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert!(now <= 3600 * SECOND && now > 3000 * SECOND, "gave up at {now} ms");
        assert!(queue.is_empty());
        // Jitter shortens a delay to between half and all of it.
        queue.offer(report(2, CommitState::Succeeded), 0);
        let due = queue.take_due(0, 10);
        assert_eq!(queue.finish(&due[0].key, Delivery::Retry, 0, 0.0), Finished::Retrying { after: Duration::from_millis(500) });
    }

    #[test]
    fn rejections_are_final_and_the_queue_is_bounded() {
        let mut queue = ReportQueue::new(2, RetryPolicy::default());
        queue.offer(report(1, CommitState::Succeeded), 0);
        let due = queue.take_due(0, 10);
        assert_eq!(queue.finish(&due[0].key, Delivery::Rejected, 0, 1.0), Finished::Rejected);
        assert!(queue.is_empty());
        let keyed =
            |repo_id: u64| Report { key: ReportKey { repo_id, ..report(1, CommitState::Queued).key }, ..report(1, CommitState::Queued) };
        assert_eq!(queue.offer(keyed(1), 0), Offered::Queued);
        assert_eq!(queue.offer(keyed(2), 0), Offered::Queued);
        assert_eq!(queue.offer(keyed(3), 0), Offered::Full);
        // A newer report for a key already held still fits.
        assert_eq!(
            queue.offer(Report { version: ReportVersion { deployment_id: 1, state: CommitState::Failed }, ..keyed(2) }, 0),
            Offered::Replaced
        );
        assert_eq!(queue.take_due(0, 1).len(), 1, "at most the limit at once");
    }

    // A real node and a local HTTP server standing in for each provider's API.

    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode, Uri};
    use std::sync::atomic::AtomicUsize;

    use crate::node::Requester;
    use crate::state::Command;
    use crate::state::records::DeployStrategy;

    const SHA: &str = "ec26c3e57ca3a959ca5aad62de7213c562f8c821";

    #[derive(Debug, Clone)]
    struct Received {
        path: String,
        headers: HeaderMap,
        body: serde_json::Value,
        answered: u16,
    }

    /// The stand-in provider: records every request; answers 500 while `failures_left` > 0,
    /// then 201.
    #[derive(Clone, Default)]
    struct FakeProvider {
        received: Arc<Mutex<Vec<Received>>>,
        failures_left: Arc<AtomicUsize>,
    }

    impl FakeProvider {
        async fn serve(&self, listener: tokio::net::TcpListener) {
            let provider = self.clone();
            let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
                let provider = provider.clone();
                async move {
                    let failing =
                        provider.failures_left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(1)).is_ok();
                    let answered = if failing { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::CREATED };
                    let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                    provider.received.lock().unwrap().push(Received {
                        path: uri.path().to_string(),
                        headers,
                        body,
                        answered: answered.as_u16(),
                    });
                    (answered, "{}")
                }
            });
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        }

        fn received(&self, path_prefix: &str) -> Vec<Received> {
            self.received.lock().unwrap().iter().filter(|received| received.path.starts_with(path_prefix)).cloned().collect()
        }

        async fn wait_for(&self, path_prefix: &str, count: usize) -> Vec<Received> {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let received = self.received(path_prefix);
                if received.len() >= count {
                    return received;
                }
                assert!(Instant::now() < deadline, "{path_prefix}: {} of {count} requests after 20 s: {received:?}", received.len());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    struct TestNode {
        node: Arc<Node>,
        secrets: Arc<MasterKeys>,
        _dir: tempfile::TempDir,
    }

    impl TestNode {
        async fn start() -> TestNode {
            let dir = tempfile::tempdir().unwrap();
            let node = crate::node::testing::single_leader(&dir.path().join("data"), "public_url = \"https://davit.example.com/\"\n").await;
            let secrets = Arc::new(MasterKeys::parse(&MasterKeys::generate_file_text("test")).unwrap());
            TestNode { node, secrets, _dir: dir }
        }

        /// Propose and return the id, timing it: the run's path must not wait on any provider.
        async fn propose(&self, command: Command) -> u64 {
            let started = Instant::now();
            let (outcome, _) = self.node.propose(&Requester::system(), command).await.unwrap();
            assert!(started.elapsed() < Duration::from_secs(2), "a proposal took {:?}", started.elapsed());
            outcome.result.unwrap().id.unwrap()
        }

        /// A repository with a pipeline `build` (environment `staging`); its id and the pipeline's.
        async fn repository(&self, scm_type: ScmType, repo_url: &str, api_url: Option<String>, token: Option<&str>) -> (u64, u64) {
            let access_token = token.map(|token| self.secrets.seal(token, &crate::api::repos::access_token_context(repo_url)));
            let repo_id = self
                .propose(Command::ConnectRepository {
                    name: repo_url.rsplit('/').next().unwrap().into(),
                    repo_url: repo_url.into(),
                    branch: "main".into(),
                    scm_type,
                    webhook_secret: None,
                    api_url,
                    access_token,
                    poll_interval_seconds: None,
                })
                .await;
            let pipeline_id = self
                .propose(Command::CreatePipeline {
                    name: "build".into(),
                    repo_id,
                    branch: None,
                    build_command: None,
                    deploy_strategy: DeployStrategy::Rolling,
                    environment: "staging".into(),
                    build: Default::default(),
                    deploy: Default::default(),
                })
                .await;
            (repo_id, pipeline_id)
        }

        async fn deploy(&self, pipeline_id: u64) -> u64 {
            self.propose(Command::CreateDeployment {
                pipeline_id,
                commit_hash: SHA.into(),
                environment: "staging".into(),
                config_overrides: Default::default(),
                rollback_of: None,
                branch: None,
                release_of: None,
            })
            .await
        }

        async fn set_status(&self, deployment_id: u64, status: DeploymentStatus) {
            self.propose(Command::SetDeploymentStatus { deployment_id, status, reason: None }).await;
        }

        fn deployment_status(&self, deployment_id: u64) -> DeploymentStatus {
            load_id::<Deployment>(&self.node.state(), Table::Deployments, deployment_id).unwrap().unwrap().status
        }
    }

    fn fast_retries() -> RetryPolicy {
        RetryPolicy {
            first_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(400),
            give_up_after: Duration::from_secs(60),
        }
    }

    /// The stand-in providers listen on 127.0.0.1, which a real node refuses unless allowed.
    fn loopback_allowed() -> Arc<OutboundPolicy> {
        let settings = crate::outbound::OutboundSettings { allow_ranges: vec!["127.0.0.0/8".into()], ..Default::default() };
        Arc::new(OutboundPolicy::new(&settings).unwrap())
    }

    fn header<'a>(received: &'a Received, name: &str) -> Option<&'a str> {
        received.headers.get(name).and_then(|value| value.to_str().ok())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_provider_gets_pending_then_success_on_its_own_api() {
        let test = TestNode::start().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let provider = FakeProvider::default();
        provider.serve(listener).await;
        let reporter = CommitStatusReporter::new(test.node.clone(), test.secrets.clone(), &loopback_allowed(), fast_retries());
        reporter.start();

        let (_, github) = test
            .repository(ScmType::Github, "https://github.com/octo-org/hello-world.git", Some(format!("{base}/github")), Some("ghp_token1"))
            .await;
        let (_, gitlab) = test
            .repository(
                ScmType::Gitlab,
                "git@gitlab.example.com:group/sub/project.git",
                Some(format!("{base}/gitlab/api/v4")),
                Some("glpat-token2"),
            )
            .await;
        let (_, bitbucket) = test
            .repository(
                ScmType::Bitbucket,
                "https://bitbucket.org/my-workspace/my-repo",
                Some(format!("{base}/bitbucket/2.0")),
                Some("bb-token3"),
            )
            .await;
        // A repository without an access token: nothing is reported for it.
        let (_, silent) =
            test.repository(ScmType::Github, "https://github.com/octo-org/silent", Some(format!("{base}/silent")), None).await;
        let silent_run = test.deploy(silent).await;
        test.set_status(silent_run, DeploymentStatus::Success).await;

        let github_path = format!("/github/repos/octo-org/hello-world/statuses/{SHA}");
        let gitlab_path = format!("/gitlab/api/v4/projects/group%2Fsub%2Fproject/statuses/{SHA}");
        let bitbucket_path = format!("/bitbucket/2.0/repositories/my-workspace/my-repo/commit/{SHA}/statuses/build");
        let mut runs = Vec::new();
        for (pipeline_id, path) in [(github, &github_path), (gitlab, &gitlab_path), (bitbucket, &bitbucket_path)] {
            let deployment_id = test.deploy(pipeline_id).await;
            provider.wait_for(path, 1).await;
            test.set_status(deployment_id, DeploymentStatus::InProgress).await;
            provider.wait_for(path, 2).await;
            test.set_status(deployment_id, DeploymentStatus::Success).await;
            provider.wait_for(path, 3).await;
            runs.push(deployment_id);
        }

        let target = |deployment_id: u64| format!("https://davit.example.com/runs/{deployment_id}");
        let github_received = provider.received("/github/");
        assert_eq!(github_received.len(), 3, "{github_received:?}");
        for received in &github_received {
            assert_eq!(received.path, github_path);
            assert_eq!(header(received, "authorization"), Some("Bearer ghp_token1"));
            assert_eq!(header(received, "accept"), Some("application/vnd.github+json"));
            assert_eq!(header(received, "x-github-api-version"), Some("2022-11-28"));
            assert_eq!(header(received, "content-type"), Some("application/json"));
        }
        let github_bodies: Vec<&serde_json::Value> = github_received.iter().map(|received| &received.body).collect();
        assert_eq!(
            github_bodies,
            [
                &json!({"state": "pending", "target_url": target(runs[0]), "description": "Queued: waiting for an agent", "context": "davit/build"}),
                &json!({"state": "pending", "target_url": target(runs[0]), "description": "Running", "context": "davit/build"}),
                &json!({"state": "success", "target_url": target(runs[0]), "description": "Succeeded", "context": "davit/build"}),
            ]
        );

        let gitlab_received = provider.received("/gitlab/");
        assert_eq!(gitlab_received.len(), 3, "{gitlab_received:?}");
        for received in &gitlab_received {
            assert_eq!(received.path, gitlab_path);
            assert_eq!(header(received, "private-token"), Some("glpat-token2"));
            assert_eq!(header(received, "authorization"), None);
        }
        let gitlab_states: Vec<&serde_json::Value> = gitlab_received.iter().map(|received| &received.body["state"]).collect();
        assert_eq!(gitlab_states, ["pending", "running", "success"]);
        assert_eq!(
            gitlab_received[2].body,
            json!({"state": "success", "target_url": target(runs[1]), "description": "Succeeded", "name": "davit/build"})
        );

        let bitbucket_received = provider.received("/bitbucket/");
        assert_eq!(bitbucket_received.len(), 3, "{bitbucket_received:?}");
        for received in &bitbucket_received {
            assert_eq!(received.path, bitbucket_path);
            assert_eq!(header(received, "authorization"), Some("Bearer bb-token3"));
        }
        let bitbucket_states: Vec<&serde_json::Value> = bitbucket_received.iter().map(|received| &received.body["state"]).collect();
        assert_eq!(bitbucket_states, ["INPROGRESS", "INPROGRESS", "SUCCESSFUL"]);
        assert_eq!(
            bitbucket_received[2].body,
            json!({"key": "davit/build", "state": "SUCCESSFUL", "name": "davit/build", "url": target(runs[2]), "description": "Succeeded"})
        );

        assert!(provider.received("/silent/").is_empty(), "a repository without a token gets no status");
        // The provider records a request before it answers, and the reporter counts it as sent
        // once it has read the answer: the last one may still be on its way back.
        let deadline = Instant::now() + Duration::from_secs(10);
        while reporter.counts.sent.load(Ordering::Relaxed) < 9 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(reporter.counts.sent.load(Ordering::Relaxed), 9);
        assert_eq!(reporter.counts.failed.load(Ordering::Relaxed), 0);
        assert_eq!(reporter.queue_len(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_provider_outage_is_retried_with_backoff_and_never_holds_up_the_run() {
        let test = TestNode::start().await;
        // A port nobody listens on yet: connections are refused.
        let address = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let reporter = CommitStatusReporter::new(test.node.clone(), test.secrets.clone(), &loopback_allowed(), fast_retries());
        reporter.start();
        let (_, pipeline_id) = test
            .repository(ScmType::Github, "https://github.com/octo-org/outage", Some(format!("http://{address}")), Some("ghp_outage"))
            .await;

        // The whole run goes through while the provider is down; each proposal is timed.
        let deployment_id = test.deploy(pipeline_id).await;
        test.set_status(deployment_id, DeploymentStatus::InProgress).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while reporter.counts.retried.load(Ordering::Relaxed) < 3 {
            assert!(Instant::now() < deadline, "refused connections were not retried");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        test.set_status(deployment_id, DeploymentStatus::Success).await;
        assert_eq!(test.deployment_status(deployment_id), DeploymentStatus::Success);
        assert_eq!(reporter.counts.sent.load(Ordering::Relaxed), 0);
        // The watcher has queued success (behind the failing "running" in flight, at worst).
        let deadline = Instant::now() + Duration::from_secs(20);
        while !reporter.newest_queued_states().contains(&CommitState::Succeeded) {
            assert!(Instant::now() < deadline, "success was not queued: {:?}", reporter.newest_queued_states());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // The provider comes back answering 500 twice, then accepts.
        let provider = FakeProvider::default();
        provider.failures_left.store(2, Ordering::SeqCst);
        provider.serve(tokio::net::TcpListener::bind(address).await.unwrap()).await;
        let path = format!("/repos/octo-org/outage/statuses/{SHA}");
        let received = provider.wait_for(&path, 3).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while reporter.counts.sent.load(Ordering::Relaxed) < 1 {
            assert!(Instant::now() < deadline, "the status was not delivered after the provider recovered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let received = if received.len() == 3 { received } else { provider.received(&path) };
        let answers: Vec<u16> = received.iter().map(|received| received.answered).collect();
        assert_eq!(answers, [500, 500, 201]);
        // Only the newest state was retried: the pending ones queued during the outage were
        // superseded by success and never reach the provider after it.
        for received in &received {
            assert_eq!(received.body["state"], "success", "{received:?}");
            assert_eq!(header(received, "authorization"), Some("Bearer ghp_outage"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(provider.received(&path).len(), 3, "nothing is sent after delivery");
        assert!(reporter.counts.retried.load(Ordering::Relaxed) >= 5);
        assert_eq!(reporter.counts.failed.load(Ordering::Relaxed), 0);
        assert_eq!(reporter.queue_len(), 0);
    }
}
