//! The planner driven by a simulated fleet: actions take effect in an arbitrary order, hosts
//! fail to start, fail health checks or get lost, verdicts pass, fail or say nothing, users
//! abort, and the facts survive a round trip through JSON (a leader change) at any point.
//! Properties checked on every run: it ends, all-new or all-old; never more than
//! `max_unavailable` hosts updating; no traffic to a release that is not healthy; blue-green
//! switches only once every host is healthy; a canary never moves past a step without a passing
//! verdict; no host is switched to the new release twice; region waves go in order (no host of a
//! wave starts, and no canary step begins in it, before every host of the earlier waves has
//! switched).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::{Just, ProptestConfig, any, prop_oneof, proptest};
use proptest::strategy::Strategy as _;

use super::*;

/// What can go wrong, and when (in rounds of the simulation).
#[derive(Debug, Clone, Default)]
struct Trouble {
    start_fails: Option<usize>,
    health_fails: Option<usize>,
    lost: Option<(usize, u32)>,
    abort_at: Option<u32>,
    /// Verdicts given in turn (cycled): 0 pass, 1 fail, 2 inconclusive.
    verdicts: Vec<u8>,
}

struct Simulation {
    facts: Facts,
    trouble: Trouble,
    /// Host actions in flight, completed in the order `choices` picks.
    pending: Vec<Action>,
    choices: Vec<u8>,
    round: u32,
    verdicts_given: usize,
    /// Canary steps with a passing verdict, as (wave, step).
    passed_steps: BTreeSet<(u32, usize)>,
    switches_to_new: BTreeMap<u64, u32>,
    failure_seen: bool,
    /// Every weight change sent, in order, as (host, weight).
    sent_weights: Vec<(u64, u8)>,
}

impl Simulation {
    /// `waves`: each host's region wave (hosts come in wave order); missing ones are in wave 0.
    fn new(strategy: Strategy, hosts: usize, waves: &[u32], trouble: Trouble, choices: Vec<u8>) -> Simulation {
        let mut waves = waves.to_vec();
        waves.sort_unstable();
        let facts = Facts {
            strategy,
            hosts: (0..hosts)
                .map(|index| HostFacts { wave: waves.get(index).copied().unwrap_or(0), ..HostFacts::new(100 + index as u64) })
                .collect(),
            now: 1_000,
            rolling_back: None,
            canary: CanaryProgress::default(),
            switched_at: None,
            cleaning_up: false,
        };
        Simulation {
            facts,
            trouble,
            pending: Vec::new(),
            choices,
            round: 0,
            verdicts_given: 0,
            passed_steps: BTreeSet::new(),
            switches_to_new: BTreeMap::new(),
            failure_seen: false,
            sent_weights: Vec::new(),
        }
    }

    fn host(&mut self, id: u64) -> &mut HostFacts {
        self.facts.hosts.iter_mut().find(|host| host.host == id).expect("known host")
    }

    fn index_of(&self, id: u64) -> usize {
        self.facts.hosts.iter().position(|host| host.host == id).expect("known host")
    }

    fn steps(&self) -> Vec<u8> {
        match &self.facts.strategy {
            Strategy::Canary(settings) => settings.effective_steps(),
            _ => vec![100],
        }
    }

    /// Runs until the planner finishes; returns how it finished.
    fn run(&mut self) -> Finish {
        loop {
            self.round += 1;
            assert!(self.round < 2_000, "the deployment did not end: {:#?}", self.facts);
            self.inject_trouble();
            // A leader change at any point: the next leader plans from the replicated facts.
            let resumed: Facts = serde_json::from_str(&serde_json::to_string(&self.facts).unwrap()).unwrap();
            let actions = plan(&resumed);
            assert_eq!(actions, plan(&self.facts), "planning is not a function of the facts");
            if let Some(finish) = self.dispatch(actions) {
                return finish;
            }
            self.complete_some();
            self.check_invariants();
            self.facts.now += 7;
        }
    }

    fn inject_trouble(&mut self) {
        if let Some((index, round)) = self.trouble.lost
            && round == self.round
            && index < self.facts.hosts.len()
        {
            let id = self.facts.hosts[index].host;
            self.pending.retain(|action| host_of(action) != Some(id));
            let host = self.host(id);
            host.lost = true;
            host.busy = false;
            // Once committed, a lost host is only left out of the cleanup.
            self.failure_seen |= !self.facts.cleaning_up;
        }
        // The controller refuses aborts once the deployment has committed.
        if self.trouble.abort_at == Some(self.round) && self.facts.rolling_back.is_none() && !self.facts.cleaning_up {
            self.facts.rolling_back = Some("aborted by a user".to_string());
            self.failure_seen = true;
        }
    }

    fn dispatch(&mut self, actions: Vec<Action>) -> Option<Finish> {
        let idle_before = self.pending.is_empty();
        if actions.is_empty() {
            assert!(!idle_before, "the planner has nothing to do and nothing is in flight: {:#?}", self.facts);
        }
        for action in actions {
            if let Some(id) = host_of(&action) {
                let host = self.host(id).clone();
                assert!(!host.busy, "{action:?} planned for a busy host");
                assert!(!host.lost, "{action:?} planned for a lost host");
                self.check_dispatch(&action, &host);
                if let Action::SetWeight { host, weight } = action {
                    self.sent_weights.push((host, weight));
                }
                self.host(id).busy = true;
                self.pending.push(action);
                continue;
            }
            match action {
                Action::BeginRollback { reason } => {
                    assert!(self.facts.rolling_back.is_none(), "a second rollback decision");
                    assert!(
                        self.failure_seen || reason.contains("analysis") || reason.contains("inconclusive"),
                        "rollback without a cause: {reason}"
                    );
                    self.facts.rolling_back = Some(reason);
                }
                Action::BeginCanaryStep { step, wave } => {
                    assert!(
                        step == 0 || self.passed_steps.contains(&(wave, step - 1)),
                        "canary step {step} began in wave {wave} without a passing verdict"
                    );
                    assert!(self.earlier_waves_switched(wave), "canary step {step} began in wave {wave} before the earlier waves switched");
                    self.facts.canary = CanaryProgress { step: Some(step), step_started_at: self.facts.now, verdict: None, wave };
                }
                Action::Analyze { step, since } => {
                    assert_eq!(Some(step), self.facts.canary.step);
                    assert!(since <= self.facts.now);
                    let verdict =
                        match self.trouble.verdicts.get(self.verdicts_given % self.trouble.verdicts.len().max(1)).copied().unwrap_or(0) {
                            0 => Verdict::Pass,
                            1 => Verdict::Fail("5xx rate 12 % above the 1 % threshold".to_string()),
                            _ => Verdict::Inconclusive("42 requests, fewer than the 100 needed".to_string()),
                        };
                    self.verdicts_given += 1;
                    if verdict == Verdict::Pass {
                        self.passed_steps.insert((self.facts.canary.wave, step));
                    }
                    self.facts.canary.verdict = Some((verdict, self.facts.now));
                }
                Action::BeginCleanup => {
                    let present = self.facts.hosts.iter().filter(|host| !host.lost);
                    assert!(present.clone().all(|host| host.weight == 100 && host.new == NewRelease::Healthy), "committed before all-new");
                    assert!(self.facts.rolling_back.is_none(), "committed during a rollback");
                    self.facts.cleaning_up = true;
                }
                Action::RecordSwitch => {
                    assert!(self.facts.hosts.iter().all(|host| host.weight == 100), "switch recorded before every host switched");
                    self.facts.switched_at = Some(self.facts.now);
                }
                Action::WaitUntil { at } => {
                    assert!(at > self.facts.now, "waiting for the past");
                    assert!(self.pending.is_empty(), "waiting while actions are in flight");
                    self.facts.now = at;
                }
                Action::Finish(finish) => {
                    assert!(self.pending.is_empty(), "finished with actions in flight");
                    return Some(finish);
                }
                other => unreachable!("host action {other:?} without a host"),
            }
        }
        None
    }

    /// Every host (not lost) of the waves before `wave` serves the new release.
    fn earlier_waves_switched(&self, wave: u32) -> bool {
        self.facts.hosts.iter().filter(|host| host.wave < wave && !host.lost).all(|host| host.switched())
    }

    /// Rules that hold at the moment an action is sent.
    fn check_dispatch(&self, action: &Action, host: &HostFacts) {
        if let Action::Start { .. } = action {
            assert!(
                self.earlier_waves_switched(host.wave),
                "host {} of wave {} started before the earlier waves switched",
                host.host,
                host.wave
            );
        }
        if let Action::SetWeight { weight, .. } = action
            && *weight > 0
        {
            assert!(self.facts.rolling_back.is_none(), "traffic moved to the new release during a rollback");
            assert_eq!(host.new, NewRelease::Healthy, "traffic sent to a release that is not healthy");
            if matches!(self.facts.strategy, Strategy::BlueGreen(_) | Strategy::Canary(_)) {
                let all_healthy =
                    self.facts.hosts.iter().filter(|other| other.wave == host.wave).all(|host| host.new == NewRelease::Healthy);
                assert!(all_healthy, "traffic moved before every host of its wave was healthy");
            }
            assert!(self.earlier_waves_switched(host.wave), "traffic moved in wave {} before the earlier waves switched", host.wave);
            let steps = self.steps();
            let index = steps.iter().position(|step| step == weight).expect("a weight that is a step");
            assert!(
                (0..index).all(|earlier| self.passed_steps.contains(&(host.wave, earlier))),
                "weight {weight} without passing verdicts before it in wave {}",
                host.wave
            );
        }
        if let Action::StopOld { .. } = action {
            assert!(self.facts.cleaning_up, "the old release stopped before the deployment committed");
            assert!(
                self.facts.hosts.iter().all(|host| host.lost || host.weight == 100),
                "the old release stopped before every host switched"
            );
        }
    }

    fn complete_some(&mut self) {
        let choice = self.choices.get(self.round as usize % self.choices.len().max(1)).copied().unwrap_or(0) as usize;
        // Complete between one and all of the actions in flight, starting at a chosen one.
        let count = if self.pending.is_empty() { 0 } else { 1 + choice % self.pending.len() };
        for _ in 0..count {
            let index = choice % self.pending.len();
            let action = self.pending.remove(index);
            self.complete(action);
        }
    }

    fn complete(&mut self, action: Action) {
        let id = host_of(&action).expect("host action");
        let index = self.index_of(id);
        let (start_fails, health_fails) = (self.trouble.start_fails == Some(index), self.trouble.health_fails == Some(index));
        let mut switched = false;
        {
            let host = self.host(id);
            host.busy = false;
            match action {
                Action::Start { .. } if start_fails => host.new = NewRelease::Failed("the container exited with code 1".to_string()),
                Action::Start { .. } => host.new = NewRelease::Running,
                Action::CheckHealth { .. } if health_fails => host.new = NewRelease::Failed("GET /health answered 500".to_string()),
                Action::CheckHealth { .. } => host.new = NewRelease::Healthy,
                Action::SetWeight { weight, .. } => {
                    switched = weight == 100 && host.weight != 100;
                    host.weight = weight;
                }
                Action::StopOld { .. } => host.old_stopped = true,
                Action::StopNew { .. } => host.new = NewRelease::Stopped,
                other => unreachable!("{other:?} is not a host action"),
            }
        }
        if start_fails || health_fails {
            self.failure_seen = true;
        }
        if switched {
            let count = self.switches_to_new.entry(id).or_default();
            *count += 1;
            assert_eq!(*count, 1, "host {id} switched to the new release twice");
        }
    }

    fn check_invariants(&self) {
        // Rolling back moves traffic to the old release, which never stopped: no host is down.
        if let Strategy::Rolling(settings) = &self.facts.strategy
            && self.facts.rolling_back.is_none()
        {
            let updating = self.facts.hosts.iter().filter(|host| !host.lost && host.updating()).count();
            assert!(updating <= settings.max_unavailable.max(1) as usize, "{updating} hosts updating at once");
        }
    }

    /// How a finished run must look.
    fn check_end(&self, finish: &Finish) {
        let present = self.facts.hosts.iter().filter(|host| !host.lost);
        match finish {
            Finish::Succeeded => {
                assert!(!self.failure_seen, "succeeded although something failed");
                for host in present {
                    assert!(host.weight == 100 && host.new == NewRelease::Healthy && host.old_stopped, "not all-new: {host:?}");
                }
            }
            Finish::RolledBack(_) => {
                for host in present {
                    assert!(host.weight == 0 && matches!(host.new, NewRelease::Absent | NewRelease::Stopped), "not all-old: {host:?}");
                    assert!(!host.old_stopped, "the old release of host {} was stopped", host.host);
                }
            }
        }
    }
}

fn host_of(action: &Action) -> Option<u64> {
    match action {
        Action::Start { host }
        | Action::CheckHealth { host }
        | Action::SetWeight { host, .. }
        | Action::StopOld { host }
        | Action::StopNew { host } => Some(*host),
        _ => None,
    }
}

fn strategy() -> impl proptest::strategy::Strategy<Value = Strategy> {
    prop_oneof![
        (1u32..6, 0u8..=100, any::<bool>(), 0u32..4).prop_map(|(hosts, percent, by_percent, max_unavailable)| {
            let batch = if by_percent { BatchSize::Percent(percent) } else { BatchSize::Hosts(hosts) };
            Strategy::Rolling(RollingSettings { batch, max_unavailable })
        }),
        (0u64..100).prop_map(|keep_old_ms| Strategy::BlueGreen(BlueGreenSettings { keep_old_ms })),
        (proptest::collection::vec(0u8..=100, 0..5), 1u64..50, proptest::option::of(0u64..200)).prop_map(|(steps, window, wait)| {
            let on_inconclusive = wait.map_or(Inconclusive::RollBack, |max_wait_ms| Inconclusive::Wait { max_wait_ms });
            Strategy::Canary(CanarySettings { steps, analysis_window_ms: window, on_inconclusive })
        }),
    ]
}

fn trouble(hosts: usize) -> impl proptest::strategy::Strategy<Value = Trouble> {
    let host = move || proptest::option::weighted(0.2, 0..hosts);
    (
        host(),
        host(),
        proptest::option::weighted(0.15, (0..hosts, 1u32..40)),
        proptest::option::weighted(0.1, 1u32..40),
        proptest::collection::vec(0u8..3, 0..6),
    )
        .prop_map(|(start_fails, health_fails, lost, abort_at, verdicts)| Trouble {
            start_fails,
            health_fails,
            lost,
            abort_at,
            verdicts,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn every_rollout_ends_all_new_or_all_old_within_the_rules(
        (strategy, hosts, trouble) in (strategy(), 1usize..9).prop_flat_map(|(strategy, hosts)| (Just(strategy), Just(hosts), trouble(hosts))),
        choices in proptest::collection::vec(any::<u8>(), 1..32),
        waves in proptest::collection::vec(0u32..3, 0..9),
    ) {
        let mut simulation = Simulation::new(strategy, hosts, &waves, trouble, choices);
        let finish = simulation.run();
        simulation.check_end(&finish);
    }
}

fn canary(steps: Vec<u8>, on_inconclusive: Inconclusive) -> Strategy {
    Strategy::Canary(CanarySettings { steps, analysis_window_ms: 30_000, on_inconclusive })
}

/// Runs with every action completing in the order sent; returns how it finished and the
/// highest weight any host reached.
fn run_recording_weights(strategy: Strategy, hosts: usize, trouble: Trouble) -> (Finish, u8, Simulation) {
    run_in_order(Simulation::new(strategy, hosts, &[], trouble, vec![0]))
}

fn run_in_order(mut simulation: Simulation) -> (Finish, u8, Simulation) {
    loop {
        simulation.round += 1;
        assert!(simulation.round < 1_000, "did not end");
        let actions = plan(&simulation.facts);
        let waited = actions.iter().any(|action| matches!(action, Action::WaitUntil { .. }));
        if let Some(finish) = simulation.dispatch(actions) {
            let highest = simulation.sent_weights.iter().map(|(_, weight)| *weight).max().unwrap_or(0);
            return (finish, highest, simulation);
        }
        while !simulation.pending.is_empty() {
            let action = simulation.pending.remove(0);
            simulation.complete(action);
        }
        if !waited {
            simulation.facts.now += 1_000;
        }
    }
}

#[test]
fn a_canary_that_fails_its_first_analysis_never_gets_past_the_first_step() {
    let trouble = Trouble { verdicts: vec![1], ..Trouble::default() };
    let (finish, highest, _) = run_recording_weights(canary(vec![10, 50, 100], Inconclusive::RollBack), 4, trouble);
    assert_eq!(highest, 10);
    let Finish::RolledBack(reason) = finish else { panic!("expected a rollback") };
    assert!(reason.contains("canary step 1 (10 %) failed its analysis: 5xx rate"), "{reason}");
}

#[test]
fn an_inconclusive_canary_rolls_back_or_waits_as_configured() {
    let trouble = Trouble { verdicts: vec![2], ..Trouble::default() };
    let (finish, highest, _) = run_recording_weights(canary(vec![10, 50], Inconclusive::RollBack), 2, trouble.clone());
    assert!(matches!(finish, Finish::RolledBack(reason) if reason.contains("inconclusive")));
    assert_eq!(highest, 10);

    // Waiting: two more windows fit in the limit, then it gives up; never promoted meanwhile.
    let (finish, highest, simulation) = run_recording_weights(canary(vec![10, 50], Inconclusive::Wait { max_wait_ms: 60_000 }), 2, trouble);
    assert!(matches!(finish, Finish::RolledBack(reason) if reason.contains("past the wait limit")));
    assert_eq!(highest, 10);
    assert_eq!(simulation.verdicts_given, 3);

    // Inconclusive, then passing: it waits one more window and goes on.
    let trouble = Trouble { verdicts: vec![2, 0, 0], ..Trouble::default() };
    let (finish, highest, _) = run_recording_weights(canary(vec![10, 50], Inconclusive::Wait { max_wait_ms: 60_000 }), 2, trouble);
    assert_eq!((finish, highest), (Finish::Succeeded, 100));
}

#[test]
fn region_waves_go_one_after_the_other_each_with_every_step() {
    let strategies = [
        canary(vec![10, 50], Inconclusive::RollBack),
        Strategy::BlueGreen(BlueGreenSettings { keep_old_ms: 1_000 }),
        Strategy::Rolling(RollingSettings { batch: BatchSize::Hosts(3), max_unavailable: 3 }),
    ];
    for strategy in strategies {
        // Hosts 100 and 101 are the first region, 102 and 103 the second.
        let simulation = Simulation::new(strategy.clone(), 4, &[0, 0, 1, 1], Trouble::default(), vec![0]);
        let (finish, _, simulation) = run_in_order(simulation);
        assert_eq!(finish, Finish::Succeeded, "{strategy:?}");
        let sent = &simulation.sent_weights;
        let second_wave_begins = sent.iter().position(|(host, _)| *host >= 102).expect("the second wave got traffic");
        for host in [100, 101] {
            assert!(sent[..second_wave_begins].contains(&(host, 100)), "{strategy:?}: host {host} had not switched: {sent:?}");
            assert!(!sent[second_wave_begins..].iter().any(|(sent_to, _)| *sent_to == host), "{strategy:?}: {sent:?}");
        }
        let per_host = |host: u64| sent.iter().filter(|(to, _)| *to == host).map(|(_, weight)| *weight).collect::<Vec<u8>>();
        let expected = if matches!(strategy, Strategy::Canary(_)) { vec![10, 50, 100] } else { vec![100] };
        for host in 100..104 {
            assert_eq!(per_host(host), expected, "{strategy:?}: host {host}");
        }
    }
    // A failure in the second wave rolls the first one back too (a global abort).
    let trouble = Trouble { health_fails: Some(3), ..Trouble::default() };
    let simulation = Simulation::new(canary(vec![10, 50], Inconclusive::RollBack), 4, &[0, 0, 1, 1], trouble, vec![0]);
    let (finish, _, simulation) = run_in_order(simulation);
    assert!(matches!(finish, Finish::RolledBack(_)));
    assert!(simulation.facts.hosts.iter().all(|host| host.weight == 0), "{:?}", simulation.facts.hosts);
    assert!(simulation.sent_weights.contains(&(100, 100)), "the first wave had switched before the second failed");
}

#[test]
fn blue_green_with_a_host_failing_its_health_check_never_sends_it_traffic() {
    let trouble = Trouble { health_fails: Some(2), ..Trouble::default() };
    let (finish, highest, simulation) = run_recording_weights(Strategy::BlueGreen(BlueGreenSettings { keep_old_ms: 600_000 }), 4, trouble);
    assert_eq!(highest, 0, "no host may take traffic");
    assert!(matches!(finish, Finish::RolledBack(reason) if reason.contains("host 102: GET /health answered 500")));
    assert!(simulation.facts.hosts.iter().all(|host| host.new == NewRelease::Stopped));
}

#[test]
fn blue_green_switches_all_hosts_in_one_round_and_keeps_the_old_release_warm() {
    let mut facts = Facts {
        strategy: Strategy::BlueGreen(BlueGreenSettings { keep_old_ms: 60_000 }),
        hosts: (1..=3).map(|host| HostFacts { new: NewRelease::Healthy, ..HostFacts::new(host) }).collect(),
        now: 5_000,
        rolling_back: None,
        canary: CanaryProgress::default(),
        switched_at: None,
        cleaning_up: false,
    };
    let switch: Vec<Action> = (1..=3).map(|host| Action::SetWeight { host, weight: 100 }).collect();
    assert_eq!(plan(&facts), switch);
    facts.hosts.iter_mut().for_each(|host| host.weight = 100);
    assert_eq!(plan(&facts), vec![Action::RecordSwitch]);
    facts.switched_at = Some(5_000);
    assert_eq!(plan(&facts), vec![Action::WaitUntil { at: 65_000 }]);
    // A rollback during the warm window is a weight change, no restart.
    let mut rolled_back = facts.clone();
    rolled_back.rolling_back = Some("rolled back by a user".to_string());
    assert_eq!(plan(&rolled_back), (1..=3).map(|host| Action::SetWeight { host, weight: 0 }).collect::<Vec<_>>());
    facts.now = 65_000;
    assert_eq!(plan(&facts), vec![Action::BeginCleanup]);
    facts.cleaning_up = true;
    assert_eq!(plan(&facts), (1..=3).map(|host| Action::StopOld { host }).collect::<Vec<_>>());
    // Committed: a lost host is left out and nothing rolls back any more.
    facts.hosts[1].lost = true;
    facts.rolling_back = Some("too late".to_string());
    assert_eq!(plan(&facts), vec![Action::StopOld { host: 1 }, Action::StopOld { host: 3 }]);
}

#[test]
fn rolling_goes_batch_by_batch_within_max_unavailable() {
    let strategy = Strategy::Rolling(RollingSettings { batch: BatchSize::Percent(50), max_unavailable: 1 });
    let mut facts = Facts {
        strategy,
        hosts: (1..=4).map(HostFacts::new).collect(),
        now: 0,
        rolling_back: None,
        canary: CanaryProgress::default(),
        switched_at: None,
        cleaning_up: false,
    };
    // Batch one is hosts 1 and 2, one at a time.
    assert_eq!(plan(&facts), vec![Action::Start { host: 1 }]);
    facts.hosts[0].new = NewRelease::Healthy;
    assert_eq!(plan(&facts), vec![Action::SetWeight { host: 1, weight: 100 }]);
    facts.hosts[0].weight = 100;
    assert_eq!(plan(&facts), vec![Action::Start { host: 2 }]);
    facts.hosts[1].busy = true;
    assert_eq!(plan(&facts), vec![], "batch two waits for batch one");
    facts.hosts[1] = HostFacts { new: NewRelease::Healthy, weight: 100, ..HostFacts::new(2) };
    assert_eq!(plan(&facts), vec![Action::Start { host: 3 }]);
    assert_eq!(BatchSize::Percent(0).hosts_per_batch(4), 1);
    assert_eq!(BatchSize::Percent(30).hosts_per_batch(10), 3);
    assert_eq!(BatchSize::Percent(34).hosts_per_batch(10), 4);
}

#[test]
fn canary_steps_are_increasing_and_end_at_100() {
    let steps = |steps: Vec<u8>| CanarySettings { steps, analysis_window_ms: 1, on_inconclusive: Inconclusive::RollBack }.effective_steps();
    assert_eq!(steps(vec![10, 50, 100]), vec![10, 50, 100]);
    assert_eq!(steps(vec![]), vec![100]);
    assert_eq!(steps(vec![0, 50, 20, 50, 200]), vec![1, 50, 100]);
}
