//! CPU and memory of containers, from the Docker engine's stats: one sample per container with
//! `stream: false` (the engine reads the counters twice, about a second apart, so the answer
//! holds a CPU rate), summarised per job or release into peak and mean. Sampling never fails a
//! job: a container that is gone, or an engine that does not answer, just gives no sample.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use bollard::models::ContainerStatsResponse;
use bollard::query_parameters::StatsOptionsBuilder;
use davit_proto::agent as pb;
use futures::StreamExt;

/// How often a running container is sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);
/// A stats request that takes longer than this is dropped (the engine answers in about 1 s).
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(5);

/// One reading of one container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// CPU in millicores over the engine's interval: 1000 is one core busy (100 %).
    pub cpu_millicores: u64,
    /// Memory in use, page cache excluded (what `docker stats` shows).
    pub memory_bytes: u64,
}

/// CPU millicores between the two readings of a stats answer, as `docker stats` computes its
/// percentage: the container's CPU time over the host's, times the CPUs online.
pub fn cpu_millicores(stats: &ContainerStatsResponse) -> Option<u64> {
    let now = stats.cpu_stats.as_ref()?;
    let before = stats.precpu_stats.as_ref()?;
    let used = now.cpu_usage.as_ref()?.total_usage?.checked_sub(before.cpu_usage.as_ref()?.total_usage?)?;
    let system = now.system_cpu_usage?.checked_sub(before.system_cpu_usage?)?;
    if system == 0 {
        return None;
    }
    let cpus = now
        .online_cpus
        .filter(|&cpus| cpus > 0)
        .map(u64::from)
        .or_else(|| now.cpu_usage.as_ref()?.percpu_usage.as_ref().map(|per_cpu| per_cpu.len() as u64))
        .unwrap_or(1);
    Some(((used as f64 / system as f64) * cpus as f64 * 1000.0).round() as u64)
}

/// Memory in use without the page cache: `usage - inactive_file` on cgroup v2, `usage - cache`
/// on v1 (the Docker CLI's rule).
pub fn memory_bytes(stats: &ContainerStatsResponse) -> Option<u64> {
    let memory = stats.memory_stats.as_ref()?;
    let usage = memory.usage?;
    let cache = memory
        .stats
        .as_ref()
        .and_then(|stats| stats.get("inactive_file").or_else(|| stats.get("total_inactive_file")).or_else(|| stats.get("cache")).copied())
        .unwrap_or(0);
    Some(usage.saturating_sub(cache))
}

/// One sample of `container` (a name or id), or `None` when it is not running or the engine
/// does not answer in time.
pub async fn sample(docker: &Docker, container: &str) -> Option<Sample> {
    let options = StatsOptionsBuilder::new().stream(false).one_shot(false).build();
    let mut stream = docker.stats(container, Some(options));
    let stats = tokio::time::timeout(SAMPLE_TIMEOUT, stream.next()).await.ok()??.ok()?;
    Some(Sample { cpu_millicores: cpu_millicores(&stats)?, memory_bytes: memory_bytes(&stats)? })
}

/// Peak and mean of the samples taken so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub samples: u64,
    cpu_sum: u64,
    cpu_peak: u64,
    memory_sum: u64,
    memory_peak: u64,
}

impl Usage {
    pub fn record(&mut self, sample: Sample) {
        self.samples += 1;
        self.cpu_sum = self.cpu_sum.saturating_add(sample.cpu_millicores);
        self.cpu_peak = self.cpu_peak.max(sample.cpu_millicores);
        self.memory_sum = self.memory_sum.saturating_add(sample.memory_bytes);
        self.memory_peak = self.memory_peak.max(sample.memory_bytes);
    }

    /// The summary as `JobResult.resources`; `None` without samples.
    pub fn to_proto(&self) -> Option<pb::ResourceUsage> {
        (self.samples > 0).then(|| pb::ResourceUsage {
            samples: self.samples,
            cpu_millicores_peak: self.cpu_peak,
            cpu_millicores_mean: self.cpu_sum / self.samples,
            memory_bytes_peak: self.memory_peak,
            memory_bytes_mean: self.memory_sum / self.samples,
        })
    }
}

/// A job's usage, shared between the job and the executor sampling its step containers.
#[derive(Debug, Clone, Default)]
pub struct UsageRecorder(Arc<Mutex<Usage>>);

impl UsageRecorder {
    pub fn record(&self, sample: Sample) {
        self.0.lock().expect("usage lock").record(sample);
    }

    pub fn usage(&self) -> Usage {
        *self.0.lock().expect("usage lock")
    }
}

/// Samples `container` every [`SAMPLE_INTERVAL`] into `recorder`, until dropped (run it beside
/// the container in a `select!`).
pub async fn sample_until_dropped(docker: &Docker, container: &str, recorder: &UsageRecorder) {
    loop {
        // A request takes about a second; the first one starts at once, so that a short step
        // still gets a sample.
        if let Some(sample) = sample(docker, container).await {
            recorder.record(sample);
        }
        tokio::time::sleep(SAMPLE_INTERVAL.saturating_sub(Duration::from_secs(1))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(json: serde_json::Value) -> ContainerStatsResponse {
        serde_json::from_value(json).expect("a stats answer")
    }

    #[test]
    fn cpu_and_memory_as_docker_stats_computes_them() {
        // Real shape of an engine's answer (cgroup v2), trimmed: 1.5 of 4 CPUs busy.
        let answer = stats(serde_json::json!({
            "cpu_stats": {"cpu_usage": {"total_usage": 2_500_000_000u64}, "system_cpu_usage": 104_000_000_000u64, "online_cpus": 4},
            "precpu_stats": {"cpu_usage": {"total_usage": 1_000_000_000u64}, "system_cpu_usage": 100_000_000_000u64},
            "memory_stats": {"usage": 300_000_000u64, "stats": {"inactive_file": 100_000_000u64, "anon": 190_000_000u64}, "limit": 2_147_483_648u64}
        }));
        assert_eq!(cpu_millicores(&answer), Some(1500));
        assert_eq!(memory_bytes(&answer), Some(200_000_000));
        // cgroup v1 names the cache `cache`; without `online_cpus`, the per-CPU list counts them.
        let v1 = stats(serde_json::json!({
            "cpu_stats": {"cpu_usage": {"total_usage": 300u64, "percpu_usage": [1, 1]}, "system_cpu_usage": 1200u64},
            "precpu_stats": {"cpu_usage": {"total_usage": 0u64}, "system_cpu_usage": 0u64},
            "memory_stats": {"usage": 5000u64, "stats": {"cache": 1000u64}}
        }));
        assert_eq!(cpu_millicores(&v1), Some(500));
        assert_eq!(memory_bytes(&v1), Some(4000));
        // A container that just stopped answers without readings: no sample.
        let gone = stats(serde_json::json!({"cpu_stats": {}, "precpu_stats": {}, "memory_stats": {}}));
        assert_eq!((cpu_millicores(&gone), memory_bytes(&gone)), (None, None));
    }

    #[test]
    fn usage_keeps_peak_and_mean() {
        let mut usage = Usage::default();
        assert_eq!(usage.to_proto(), None);
        usage.record(Sample { cpu_millicores: 1000, memory_bytes: 100 });
        usage.record(Sample { cpu_millicores: 200, memory_bytes: 300 });
        let summary = usage.to_proto().unwrap();
        assert_eq!((summary.samples, summary.cpu_millicores_peak, summary.cpu_millicores_mean), (2, 1000, 600));
        assert_eq!((summary.memory_bytes_peak, summary.memory_bytes_mean), (300, 200));
    }
}
