//! The leader's live view of the agent fleet: which agents hold a session with which
//! coordinator, their free capacity and when they were last heard of. Every coordinator reports
//! its own sessions to the leader (`ClusterService.ReportAgents`, each second); the leader keeps
//! the reports in memory only. Heartbeats never go through Raft: only connecting and being lost
//! do, so the log grows with what changes, not with time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// One agent session as its coordinator reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPresence {
    pub agent_id: u64,
    pub capacity: u32,
    pub draining: bool,
    /// Jobs (id, attempt) the agent says it runs.
    pub running: Vec<(u64, u32)>,
    /// Time since the agent's last heartbeat, as its coordinator measured it.
    pub silent_for_ms: u64,
}

struct Heard {
    presence: AgentPresence,
    node_id: u64,
    at: Instant,
}

#[derive(Default)]
pub struct Fleet {
    agents: Mutex<HashMap<u64, Heard>>,
    changed: Arc<Notify>,
    /// A session on this node opened, closed or changed: report to the leader now.
    changed_here: Arc<Notify>,
}

impl Fleet {
    pub fn new() -> Arc<Self> {
        Arc::new(Fleet::default())
    }

    /// A coordinator's full list of sessions. Agents it no longer lists are forgotten unless
    /// another coordinator reported them since.
    pub fn report(&self, node_id: u64, sessions: Vec<AgentPresence>) {
        let now = Instant::now();
        let mut agents = self.agents.lock().expect("fleet lock");
        let listed: std::collections::HashSet<u64> = sessions.iter().map(|presence| presence.agent_id).collect();
        let mut changed = false;
        agents.retain(|agent_id, heard| {
            let keep = heard.node_id != node_id || listed.contains(agent_id);
            changed |= !keep;
            keep
        });
        for presence in sessions {
            let at = now.checked_sub(Duration::from_millis(presence.silent_for_ms)).unwrap_or(now);
            let previous = agents.get(&presence.agent_id);
            // A report about an older session must not overwrite a fresher one elsewhere.
            if previous.is_some_and(|heard| heard.node_id != node_id && heard.at > at) {
                continue;
            }
            changed |=
                previous.is_none_or(|heard| heard.presence.capacity != presence.capacity || heard.presence.draining != presence.draining);
            agents.insert(presence.agent_id, Heard { presence, node_id, at });
        }
        drop(agents);
        if changed {
            self.changed.notify_one();
        }
    }

    /// How long ago each reported agent was last heard of.
    pub fn last_heard(&self) -> HashMap<u64, Duration> {
        let agents = self.agents.lock().expect("fleet lock");
        agents.iter().map(|(agent_id, heard)| (*agent_id, heard.at.elapsed())).collect()
    }

    /// Agents currently holding a session somewhere.
    pub fn present(&self) -> Vec<AgentPresence> {
        let agents = self.agents.lock().expect("fleet lock");
        agents.values().map(|heard| heard.presence.clone()).collect()
    }

    /// Where each present agent holds its session.
    pub fn node_of(&self, agent_id: u64) -> Option<u64> {
        self.agents.lock().expect("fleet lock").get(&agent_id).map(|heard| heard.node_id)
    }

    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    pub fn changed_here(&self) -> Arc<Notify> {
        self.changed_here.clone()
    }

    pub fn notify_here(&self) {
        self.changed_here.notify_one();
    }

    /// Forget everything (this node stopped leading; the next leader builds its own view).
    pub fn clear(&self) {
        self.agents.lock().expect("fleet lock").clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(agent_id: u64, silent_for_ms: u64) -> AgentPresence {
        AgentPresence { agent_id, capacity: 2, draining: false, running: vec![], silent_for_ms }
    }

    #[test]
    fn reports_replace_a_nodes_sessions() {
        let fleet = Fleet::default();
        fleet.report(1, vec![presence(10, 0), presence(11, 0)]);
        fleet.report(2, vec![presence(12, 0)]);
        assert_eq!(fleet.present().len(), 3);
        fleet.report(1, vec![presence(11, 0)]);
        let mut present: Vec<u64> = fleet.present().into_iter().map(|presence| presence.agent_id).collect();
        present.sort();
        assert_eq!(present, vec![11, 12]);
        assert_eq!(fleet.node_of(12), Some(2));
    }

    #[test]
    fn silence_is_carried_over() {
        let fleet = Fleet::default();
        fleet.report(1, vec![presence(10, 5_000)]);
        assert!(fleet.last_heard()[&10] >= Duration::from_secs(5));
    }

    #[test]
    fn an_agent_that_moved_is_reported_by_its_new_node() {
        let fleet = Fleet::default();
        fleet.report(1, vec![presence(10, 0)]);
        fleet.report(2, vec![presence(10, 0)]);
        assert_eq!(fleet.node_of(10), Some(2));
        // The old node's stale report of the same agent does not win it back.
        fleet.report(1, vec![presence(10, 30_000)]);
        assert_eq!(fleet.node_of(10), Some(2));
    }
}
