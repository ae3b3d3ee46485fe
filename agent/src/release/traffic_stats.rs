//! The switch's counters per release: requests, 5xx answers and time to the answer's head, in
//! one bucket per second, kept for an hour. Latencies go into a log-scale histogram (4 %
//! wide classes), so that a p95 over any window costs no per-request memory.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::job_spec::TrafficCounts;

/// How long buckets are kept.
pub const RETENTION_SECONDS: i64 = 3600;
/// Ratio between successive latency classes.
const CLASS_RATIO: f64 = 1.04;

#[derive(Debug, Default, Clone)]
struct Bucket {
    second: i64,
    requests: u64,
    server_errors: u64,
    /// Latency class -> requests in it.
    latencies: BTreeMap<u16, u64>,
}

/// Counters of every release that took traffic in the last hour.
#[derive(Debug, Default)]
pub struct TrafficStatsStore {
    releases: HashMap<String, VecDeque<Bucket>>,
}

fn class_of(latency_micros: u64) -> u16 {
    ((1.0 + latency_micros as f64).ln() / CLASS_RATIO.ln()).floor().min(u16::MAX as f64) as u16
}

/// The upper bound of a class, in milliseconds.
fn class_upper_ms(class: u16) -> f64 {
    (CLASS_RATIO.powi(i32::from(class) + 1) - 1.0) / 1000.0
}

impl TrafficStatsStore {
    /// Count one answer of `release` at `now_ms`.
    pub fn record(&mut self, release: &str, now_ms: i64, latency_micros: u64, server_error: bool) {
        let second = now_ms.div_euclid(1000);
        let buckets = self.releases.entry(release.to_string()).or_default();
        if buckets.back().is_none_or(|bucket| bucket.second != second) {
            buckets.push_back(Bucket { second, ..Default::default() });
        }
        let bucket = buckets.back_mut().expect("pushed above");
        bucket.requests += 1;
        bucket.server_errors += u64::from(server_error);
        *bucket.latencies.entry(class_of(latency_micros)).or_default() += 1;
        while buckets.front().is_some_and(|bucket| bucket.second < second - RETENTION_SECONDS) {
            buckets.pop_front();
        }
    }

    /// Counts since `since_ms` of the releases `include` accepts, taken together.
    pub fn counts(&self, since_ms: i64, include: impl Fn(&str) -> bool) -> TrafficCounts {
        let since_second = since_ms.div_euclid(1000);
        let mut counts = TrafficCounts::default();
        let mut latencies: BTreeMap<u16, u64> = BTreeMap::new();
        for (release, buckets) in &self.releases {
            if !include(release) {
                continue;
            }
            for bucket in buckets.iter().filter(|bucket| bucket.second >= since_second) {
                counts.requests += bucket.requests;
                counts.server_errors += bucket.server_errors;
                for (class, count) in &bucket.latencies {
                    *latencies.entry(*class).or_default() += count;
                }
            }
        }
        if counts.requests > 0 {
            let rank = (counts.requests as f64 * 0.95).ceil() as u64;
            let mut seen = 0;
            for (class, count) in latencies {
                seen += count;
                if seen >= rank {
                    counts.latency_p95_ms = (class_upper_ms(class) * 100.0).round() / 100.0;
                    break;
                }
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_and_errors_are_counted_per_release_and_window() {
        let mut store = TrafficStatsStore::default();
        for i in 0..100u64 {
            // 95 answers at 10 ms, 5 at 500 ms.
            let latency = if i < 95 { 10_000 } else { 500_000 };
            store.record("d2", 10_000 + i as i64, latency, i % 10 == 0);
        }
        store.record("d1", 10_000, 1_000, false);
        store.record("d2", 1_000, 1_000, true);
        let canary = store.counts(5_000, |release| release == "d2");
        assert_eq!((canary.requests, canary.server_errors), (100, 10));
        assert!((canary.latency_p95_ms - 10.0).abs() < 0.5, "p95 {}", canary.latency_p95_ms);
        let stable = store.counts(5_000, |release| release != "d2");
        assert_eq!((stable.requests, stable.server_errors), (1, 0));
        assert_eq!(store.counts(0, |release| release == "d2").requests, 101);
        assert_eq!(store.counts(20_000, |_| true), TrafficCounts::default());
    }

    #[test]
    fn buckets_older_than_an_hour_are_dropped() {
        let mut store = TrafficStatsStore::default();
        store.record("d1", 0, 1_000, false);
        store.record("d1", (RETENTION_SECONDS + 5) * 1000, 1_000, false);
        assert_eq!(store.counts(0, |_| true).requests, 1);
    }
}
