//! Live CPU and memory of release containers, as the agents connected to this coordinator sample
//! them (`ReleaseStats` on their sessions, every few seconds): per deployment and host, the
//! latest sample and the peak and mean since this node first heard of it. Memory only, like
//! heartbeats: it never goes through Raft. The durable figures are the release jobs' results
//! (`Job.resources`, replicated); these add what happened since the last release job.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::state::records::{ResourceUsage, Timestamp};

/// A host that has sent nothing about a release for this long is forgotten (its container
/// stopped, or its agent went elsewhere).
const FORGET_AFTER: Duration = Duration::from_secs(10 * 60);

/// One host's live view of one release container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveRelease {
    pub service: String,
    pub release: String,
    /// When the agent took the latest sample (its clock, Unix ms).
    pub sampled_at: Timestamp,
    pub cpu_millicores: u64,
    pub memory_bytes: u64,
    /// Peak and mean over every sample this node received.
    pub usage: ResourceUsage,
    sums: (u64, u64),
    heard: Instant,
}

#[derive(Debug, Default)]
pub struct ReleaseUsage {
    /// (deployment id, agent id) -> its release container.
    live: Mutex<BTreeMap<(u64, u64), LiveRelease>>,
}

/// The deployment a release name belongs to: releases are named `d<deployment id>`
/// (`state::rollout::release_name`).
pub fn deployment_of(release: &str) -> Option<u64> {
    release.strip_prefix('d')?.parse().ok()
}

impl ReleaseUsage {
    /// Record one sample an agent sent. Samples of releases Davit did not name are ignored.
    pub fn record(&self, agent_id: u64, service: &str, release: &str, at: Timestamp, cpu_millicores: u64, memory_bytes: u64) {
        let Some(deployment_id) = deployment_of(release) else { return };
        let mut live = self.live.lock().expect("release usage lock");
        let now = Instant::now();
        live.retain(|_, entry| now.duration_since(entry.heard) < FORGET_AFTER);
        let entry = live.entry((deployment_id, agent_id)).or_insert_with(|| LiveRelease {
            service: service.to_string(),
            release: release.to_string(),
            sampled_at: at,
            cpu_millicores,
            memory_bytes,
            usage: ResourceUsage::default(),
            sums: (0, 0),
            heard: now,
        });
        entry.sampled_at = at;
        entry.cpu_millicores = cpu_millicores;
        entry.memory_bytes = memory_bytes;
        entry.heard = now;
        entry.sums = (entry.sums.0.saturating_add(cpu_millicores), entry.sums.1.saturating_add(memory_bytes));
        let usage = &mut entry.usage;
        usage.samples += 1;
        usage.cpu_millicores_peak = usage.cpu_millicores_peak.max(cpu_millicores);
        usage.memory_bytes_peak = usage.memory_bytes_peak.max(memory_bytes);
        usage.cpu_millicores_mean = entry.sums.0 / usage.samples;
        usage.memory_bytes_mean = entry.sums.1 / usage.samples;
    }

    /// What is known live of a deployment's release containers: agent id -> its container.
    pub fn of_deployment(&self, deployment_id: u64) -> BTreeMap<u64, LiveRelease> {
        let live = self.live.lock().expect("release usage lock");
        live.range((deployment_id, 0)..=(deployment_id, u64::MAX)).map(|((_, agent_id), entry)| (*agent_id, entry.clone())).collect()
    }

    /// Every live release container: ((deployment id, agent id), container).
    pub fn all(&self) -> Vec<((u64, u64), LiveRelease)> {
        self.live.lock().expect("release usage lock").iter().map(|(key, entry)| (*key, entry.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_add_up_per_deployment_and_host() {
        let usage = ReleaseUsage::default();
        usage.record(7, "web-staging", "d12", 1_000, 500, 100);
        usage.record(7, "web-staging", "d12", 6_000, 1500, 300);
        usage.record(8, "web-staging", "d12", 6_000, 100, 50);
        usage.record(7, "web-staging", "d13", 6_000, 1, 1);
        usage.record(7, "web-staging", "not-ours", 6_000, 1, 1);
        let live = usage.of_deployment(12);
        assert_eq!(live.keys().copied().collect::<Vec<_>>(), vec![7, 8]);
        let host = &live[&7];
        assert_eq!((host.sampled_at, host.cpu_millicores, host.memory_bytes), (6_000, 1500, 300));
        assert_eq!(
            host.usage,
            ResourceUsage {
                samples: 2,
                cpu_millicores_peak: 1500,
                cpu_millicores_mean: 1000,
                memory_bytes_peak: 300,
                memory_bytes_mean: 200
            }
        );
        assert_eq!(usage.all().len(), 3);
        assert_eq!(deployment_of("d42"), Some(42));
        assert_eq!(deployment_of("42"), None);
    }
}
