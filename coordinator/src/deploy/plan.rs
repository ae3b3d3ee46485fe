//! The deployment planner: a pure function from what is known about one deployment and its
//! target hosts ([`Facts`]) to what should happen next ([`Action`]s). The controller loop on the
//! leader carries actions out (as agent jobs, or by recording a decision through Raft), records
//! their results as facts, and asks again; nothing here reads the clock or draws randomness
//! (`now` is a fact), so a new leader resumes from the replicated facts with the same answers.
//!
//! Every strategy runs the new release beside the old one on each host, behind the agent's own
//! traffic switch, and stops the old release only once the deployment has succeeded: a rollback
//! at any point is a weight change back to the old release (instant, no restart), followed by
//! stopping the new one.
//!
//! - `rolling`: hosts in batches (in the order given, which is the region-wave order); a batch
//!   starts only when the previous one is all switched, and at most `max_unavailable` hosts are
//!   being updated (started but not yet switched) at once.
//! - `blue-green`: the new release starts and is health-checked on every host; only when all are
//!   healthy do all hosts switch together; the old release stays warm for `keep_old_ms`.
//! - `canary`: after every host is healthy, traffic moves in weighted steps; each step is held
//!   for an analysis window and advances only on a passing verdict. A failing verdict rolls back;
//!   an inconclusive one rolls back or waits (at most `max_wait_ms`), per setting.
//!
//! Region waves: each host belongs to a wave (its region's place in the pipeline's `regions`;
//! every host is in wave 0 without them). Every strategy finishes a wave — all its hosts switched
//! to the new release — before it touches the next: rolling batches never straddle two waves,
//! blue-green starts, checks and switches one wave at a time, and a canary runs all its steps
//! (with their analyses) in one wave before it begins again at the first step in the next.
//!
//! A host whose new release fails to start or fails its health check, or that is lost, rolls the
//! whole deployment back, every wave (a global abort); so does an abort. Once every host serves the new release (and, for
//! blue-green, the warm window is over), the deployment commits ([`Action::BeginCleanup`]): it has
//! succeeded, the old releases are stopped, and nothing rolls it back any more — undoing it from
//! then on is a new deployment of the previous release.

use serde::{Deserialize, Serialize};

use crate::state::records::Timestamp;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "strategy")]
pub enum Strategy {
    Rolling(RollingSettings),
    BlueGreen(BlueGreenSettings),
    Canary(CanarySettings),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollingSettings {
    pub batch: BatchSize,
    /// Hosts that may be between "started" and "switched" at once (at least 1 is used).
    pub max_unavailable: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchSize {
    Hosts(u32),
    /// A percentage of the hosts, rounded up (at least one host).
    Percent(u8),
}

impl BatchSize {
    /// Hosts per batch out of `hosts` (at least 1).
    pub fn hosts_per_batch(self, hosts: usize) -> usize {
        let size = match self {
            BatchSize::Hosts(count) => count as usize,
            BatchSize::Percent(percent) => (hosts * usize::from(percent.min(100))).div_ceil(100),
        };
        size.max(1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlueGreenSettings {
    /// How long the old release keeps running after the switch, for an instant rollback.
    pub keep_old_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanarySettings {
    /// Percent of traffic on the new release at each step, increasing; a last step of 100 is
    /// implied when missing.
    pub steps: Vec<u8>,
    pub analysis_window_ms: u64,
    pub on_inconclusive: Inconclusive,
}

impl CanarySettings {
    /// The steps as run: increasing, within 1..=100, ending with 100.
    pub fn effective_steps(&self) -> Vec<u8> {
        let mut steps: Vec<u8> = Vec::new();
        for &step in &self.steps {
            let step = step.clamp(1, 100);
            if steps.last().is_none_or(|&last| step > last) {
                steps.push(step);
            }
        }
        if steps.last() != Some(&100) {
            steps.push(100);
        }
        steps
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Inconclusive {
    /// Too little data is a failure.
    RollBack,
    /// Keep analysing, one more window at a time, for at most this long past the first window.
    Wait { max_wait_ms: u64 },
}

/// The new release on one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NewRelease {
    Absent,
    /// Started; its health is not known yet.
    Running,
    Healthy,
    /// It did not start, or failed its health check.
    Failed(String),
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub host: u64,
    pub new: NewRelease,
    /// Percent of this host's traffic on the new release.
    pub weight: u8,
    pub old_stopped: bool,
    /// An action for this host is in flight: nothing else is planned for it until it reports.
    pub busy: bool,
    /// The host's agent stopped answering.
    pub lost: bool,
    /// The host's region wave: waves go in increasing order.
    #[serde(default)]
    pub wave: u32,
}

impl HostFacts {
    pub fn new(host: u64) -> HostFacts {
        HostFacts { host, new: NewRelease::Absent, weight: 0, old_stopped: false, busy: false, lost: false, wave: 0 }
    }

    /// Switched to the new release: the host's part of a rolling update is done.
    fn switched(&self) -> bool {
        self.new == NewRelease::Healthy && self.weight == 100
    }

    /// Between "started" and "switched": counted against `max_unavailable`.
    fn updating(&self) -> bool {
        !self.switched() && (self.busy || matches!(self.new, NewRelease::Running | NewRelease::Healthy))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    Fail(String),
    Inconclusive(String),
}

/// The canary's recorded progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryProgress {
    /// The index of the current step in [`CanarySettings::effective_steps`], once traffic moved.
    pub step: Option<usize>,
    pub step_started_at: Timestamp,
    /// The latest verdict on the current step, and when it was given.
    pub verdict: Option<(Verdict, Timestamp)>,
    /// The region wave the current step is in.
    #[serde(default)]
    pub wave: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    pub strategy: Strategy,
    /// Target hosts in rollout order (region waves first).
    pub hosts: Vec<HostFacts>,
    pub now: Timestamp,
    /// Set once a rollback has been decided (by the planner or by a user's abort); never unset.
    pub rolling_back: Option<String>,
    pub canary: CanaryProgress,
    /// Blue-green: when every host was switched.
    pub switched_at: Option<Timestamp>,
    /// Set by [`Action::BeginCleanup`]: the deployment has succeeded and its old releases are
    /// being stopped; aborts are refused and failures no longer roll it back.
    #[serde(default)]
    pub cleaning_up: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Action {
    /// Start the new release beside the old one, taking no traffic.
    Start {
        host: u64,
    },
    CheckHealth {
        host: u64,
    },
    SetWeight {
        host: u64,
        weight: u8,
    },
    StopOld {
        host: u64,
    },
    StopNew {
        host: u64,
    },
    /// Record the decision to roll back (a fact from then on).
    BeginRollback {
        reason: String,
    },
    /// Record that canary step `step` began now in region wave `wave` (with its weights set in
    /// the same round).
    BeginCanaryStep {
        step: usize,
        #[serde(default)]
        wave: u32,
    },
    /// Judge the current canary step over its traffic since `since`.
    Analyze {
        step: usize,
        since: Timestamp,
    },
    /// Record that every host has switched (blue-green).
    RecordSwitch,
    /// Record that the deployment has committed: every host serves the new release.
    BeginCleanup,
    /// Nothing to do before this time (unless a fact changes).
    WaitUntil {
        at: Timestamp,
    },
    Finish(Finish),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Succeeded,
    RolledBack(String),
}

/// The next actions for a deployment. An empty answer means "wait for the actions in flight".
pub fn plan(facts: &Facts) -> Vec<Action> {
    if facts.cleaning_up {
        return plan_cleanup(facts);
    }
    if let Some(reason) = &facts.rolling_back {
        return plan_rollback(facts, reason);
    }
    if let Some(reason) = failure(facts) {
        return vec![Action::BeginRollback { reason }];
    }
    match &facts.strategy {
        Strategy::Rolling(settings) => plan_rolling(facts, settings),
        Strategy::BlueGreen(settings) => plan_blue_green(facts, settings),
        Strategy::Canary(settings) => plan_canary(facts, settings),
    }
}

/// The first reason the deployment cannot go on, if any.
fn failure(facts: &Facts) -> Option<String> {
    facts.hosts.iter().find_map(|host| match &host.new {
        _ if host.lost => Some(format!("host {} was lost during the deployment", host.host)),
        NewRelease::Failed(reason) => Some(format!("host {}: {reason}", host.host)),
        _ => None,
    })
}

/// Hosts the planner can act on now.
fn idle(facts: &Facts) -> impl Iterator<Item = &HostFacts> {
    facts.hosts.iter().filter(|host| !host.busy && !host.lost)
}

fn any_busy(facts: &Facts) -> bool {
    facts.hosts.iter().any(|host| host.busy && !host.lost)
}

/// The first region wave with a host not yet switched to the new release; `None` once every
/// host (that is not lost) has switched.
fn active_wave(facts: &Facts) -> Option<u32> {
    facts.hosts.iter().filter(|host| !host.lost && !host.switched()).map(|host| host.wave).min()
}

/// The hosts of region wave `wave`.
fn in_wave(facts: &Facts, wave: u32) -> impl Iterator<Item = &HostFacts> {
    facts.hosts.iter().filter(move |host| host.wave == wave)
}

/// Traffic back to the old release everywhere, then the new release stopped; lost hosts are
/// left as they are (their agent will find its releases when it comes back).
fn plan_rollback(facts: &Facts, reason: &str) -> Vec<Action> {
    let mut actions = Vec::new();
    for host in idle(facts) {
        if host.weight != 0 {
            actions.push(Action::SetWeight { host: host.host, weight: 0 });
        } else if matches!(host.new, NewRelease::Running | NewRelease::Healthy | NewRelease::Failed(_)) {
            actions.push(Action::StopNew { host: host.host });
        }
    }
    if actions.is_empty() && !any_busy(facts) {
        actions.push(Action::Finish(Finish::RolledBack(reason.to_string())));
    }
    actions
}

/// Once every host serves the new release: commit, stop the old releases, then finish. Hosts
/// lost by then are left as they are.
fn plan_cleanup(facts: &Facts) -> Vec<Action> {
    if !facts.cleaning_up {
        return vec![Action::BeginCleanup];
    }
    let actions: Vec<Action> = idle(facts).filter(|host| !host.old_stopped).map(|host| Action::StopOld { host: host.host }).collect();
    if actions.is_empty() && !any_busy(facts) { vec![Action::Finish(Finish::Succeeded)] } else { actions }
}

/// Start, then health-check, the new release on `host` (the steps before any traffic moves).
fn prepare(host: &HostFacts) -> Option<Action> {
    match host.new {
        NewRelease::Absent => Some(Action::Start { host: host.host }),
        NewRelease::Running => Some(Action::CheckHealth { host: host.host }),
        _ => None,
    }
}

fn plan_rolling(facts: &Facts, settings: &RollingSettings) -> Vec<Action> {
    let Some(wave) = active_wave(facts) else {
        return plan_cleanup(facts);
    };
    let per_batch = settings.batch.hosts_per_batch(facts.hosts.len());
    // The current batch: the first one of the wave not yet entirely switched.
    let wave_hosts: Vec<&HostFacts> = in_wave(facts, wave).collect();
    let first_pending = wave_hosts.iter().position(|host| !host.switched()).unwrap_or(0);
    let batch_start = first_pending / per_batch * per_batch;
    let batch = &wave_hosts[batch_start..(batch_start + per_batch).min(wave_hosts.len())];
    let mut updating = facts.hosts.iter().filter(|host| host.updating()).count();
    let limit = settings.max_unavailable.max(1) as usize;
    let mut actions = Vec::new();
    for host in batch.iter().filter(|host| !host.busy && !host.lost) {
        match host.new {
            NewRelease::Absent if updating < limit => {
                updating += 1;
                actions.push(Action::Start { host: host.host });
            }
            NewRelease::Running => actions.push(Action::CheckHealth { host: host.host }),
            NewRelease::Healthy if host.weight != 100 => actions.push(Action::SetWeight { host: host.host, weight: 100 }),
            _ => {}
        }
    }
    actions
}

fn plan_blue_green(facts: &Facts, settings: &BlueGreenSettings) -> Vec<Action> {
    if let Some(switched_at) = facts.switched_at {
        let warm_until = switched_at.saturating_add(settings.keep_old_ms as Timestamp);
        if facts.now < warm_until {
            return vec![Action::WaitUntil { at: warm_until }];
        }
        return plan_cleanup(facts);
    }
    let Some(wave) = active_wave(facts) else {
        // Every host has switched: recorded once, which starts the warm window.
        return vec![Action::RecordSwitch];
    };
    let preparing: Vec<Action> = in_wave(facts, wave).filter(|host| !host.busy).filter_map(prepare).collect();
    if !preparing.is_empty() || any_busy(facts) {
        return preparing;
    }
    // Every host of the wave is healthy: all of them switch in one step.
    in_wave(facts, wave).filter(|host| host.weight != 100).map(|host| Action::SetWeight { host: host.host, weight: 100 }).collect()
}

fn plan_canary(facts: &Facts, settings: &CanarySettings) -> Vec<Action> {
    let Some(wave) = active_wave(facts) else {
        return plan_cleanup(facts);
    };
    // The recorded step belongs to this wave, or to an earlier one that has switched entirely.
    let current = facts.canary.step.filter(|_| facts.canary.wave == wave);
    let preparing: Vec<Action> = in_wave(facts, wave).filter(|host| !host.busy).filter_map(prepare).collect();
    if !preparing.is_empty() || (current.is_none() && any_busy(facts)) {
        return preparing;
    }
    let steps = settings.effective_steps();
    let Some(step) = current else {
        return begin_step(facts, wave, 0, steps[0]);
    };
    let target = steps[step];
    let moving: Vec<Action> = in_wave(facts, wave)
        .filter(|host| !host.busy && host.weight != target)
        .map(|host| Action::SetWeight { host: host.host, weight: target })
        .collect();
    if !moving.is_empty() || any_busy(facts) {
        return moving;
    }
    if target == 100 {
        return plan_cleanup(facts);
    }
    let window = settings.analysis_window_ms as Timestamp;
    let window_ends = facts.canary.step_started_at.saturating_add(window);
    if facts.now < window_ends {
        return vec![Action::WaitUntil { at: window_ends }];
    }
    let analyze = Action::Analyze { step, since: facts.canary.step_started_at };
    match &facts.canary.verdict {
        None => vec![analyze],
        Some((Verdict::Pass, _)) => begin_step(facts, wave, step + 1, steps[step + 1]),
        Some((Verdict::Fail(reason), _)) => {
            vec![Action::BeginRollback { reason: format!("canary step {} ({target} %) failed its analysis: {reason}", step + 1) }]
        }
        Some((Verdict::Inconclusive(reason), judged_at)) => match settings.on_inconclusive {
            Inconclusive::RollBack => {
                vec![Action::BeginRollback { reason: format!("canary step {} ({target} %) was inconclusive: {reason}", step + 1) }]
            }
            Inconclusive::Wait { max_wait_ms } => {
                let give_up_at = window_ends.saturating_add(max_wait_ms as Timestamp);
                let next_analysis = judged_at.saturating_add(window);
                if next_analysis > give_up_at {
                    vec![Action::BeginRollback {
                        reason: format!("canary step {} ({target} %) stayed inconclusive past the wait limit: {reason}", step + 1),
                    }]
                } else if facts.now < next_analysis {
                    vec![Action::WaitUntil { at: next_analysis }]
                } else {
                    vec![analyze]
                }
            }
        },
    }
}

/// Move every host of region wave `wave` to `weight` and record that step `step` begins there.
fn begin_step(facts: &Facts, wave: u32, step: usize, weight: u8) -> Vec<Action> {
    let mut actions: Vec<Action> = in_wave(facts, wave).map(|host| Action::SetWeight { host: host.host, weight }).collect();
    actions.push(Action::BeginCanaryStep { step, wave });
    actions
}

// By path: the fuzz crate includes this file by path too, where `mod tests;` would be looked
// for beside it rather than in `plan/`.
#[cfg(test)]
#[path = "plan/tests.rs"]
mod tests;
