//! Cumulative counts of what the handle did, for samplers that diff them: the
//! queries, their latencies in fine logarithmic buckets, and the failures by
//! class. Recording is one atomic add per query per figure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::ErrorClass;

/// Latency buckets: four per doubling (each about 19 % wide) from 1 µs; the
/// last holds everything from about 16.8 s up.
pub const LATENCY_BUCKETS: usize = 97;

/// The bucket of a duration.
fn bucket(d: Duration) -> usize {
    let us = d.as_secs_f64() * 1e6;
    if us < 1.0 {
        return 0;
    }
    ((us.log2() * 4.0).floor() as usize + 1).min(LATENCY_BUCKETS - 1)
}

/// The upper bound of bucket `i`.
fn upper(i: usize) -> Duration {
    Duration::from_secs_f64(2f64.powf(i as f64 / 4.0) / 1e6)
}

/// Latency counts of every query, lock-free.
#[derive(Debug)]
pub struct LatencyBuckets([AtomicU64; LATENCY_BUCKETS]);

impl Default for LatencyBuckets {
    fn default() -> Self {
        LatencyBuckets(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl LatencyBuckets {
    /// Counts one query that took `d`.
    pub fn record(&self, d: Duration) {
        self.0[bucket(d)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn counts(&self) -> LatencyCounts {
        LatencyCounts(self.0.iter().map(|c| c.load(Ordering::Relaxed)).collect())
    }
}

/// A snapshot of the latency buckets (cumulative since the handle was built).
///
/// ```
/// # use railyard::observe::LatencyCounts;
/// let before = LatencyCounts::default();
/// assert_eq!(before.quantile_since(&before, 0.5), None);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencyCounts(Vec<u64>);

impl LatencyCounts {
    /// Queries counted.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The `q` quantile (0 to 1) of the queries counted since `earlier` (the
    /// upper bound of its bucket: within 19 % above the true value), or
    /// `None` when there were none.
    pub fn quantile_since(&self, earlier: &LatencyCounts, q: f64) -> Option<Duration> {
        let delta: Vec<u64> = self
            .0
            .iter()
            .enumerate()
            .map(|(i, c)| c.saturating_sub(earlier.0.get(i).copied().unwrap_or(0)))
            .collect();
        let total: u64 = delta.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in delta.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(upper(i));
            }
        }
        Some(upper(LATENCY_BUCKETS - 1))
    }
}

/// Cumulative figures of a `Database` since it was built: diff two to get a
/// rate (see `Database::activity`).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Activity {
    /// Queries finished (failed ones included).
    pub queries: u64,
    /// Their latencies.
    pub latency: LatencyCounts,
    /// Failures by class (queries and check-outs).
    pub errors: Vec<(ErrorClass, u64)>,
    /// Retries by the class of the failure retried.
    pub retries: Vec<(ErrorClass, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_an_interval_come_from_the_difference_of_two_snapshots() {
        let b = LatencyBuckets::default();
        for _ in 0..90 {
            b.record(Duration::from_millis(1));
        }
        let earlier = b.counts();
        for _ in 0..98 {
            b.record(Duration::from_micros(200));
        }
        b.record(Duration::from_millis(50));
        b.record(Duration::from_millis(50));
        let now = b.counts();
        assert_eq!(now.total(), 190);
        let p50 = now.quantile_since(&earlier, 0.5).unwrap();
        assert!(
            p50 >= Duration::from_micros(200) && p50 < Duration::from_micros(240),
            "{p50:?}"
        );
        let p99 = now.quantile_since(&earlier, 0.99).unwrap();
        assert!(
            p99 >= Duration::from_millis(50) && p99 < Duration::from_millis(60),
            "{p99:?}"
        );
        assert_eq!(now.quantile_since(&now, 0.5), None);
        assert_eq!(bucket(Duration::from_secs(3600)), LATENCY_BUCKETS - 1);
        assert_eq!(bucket(Duration::ZERO), 0);
    }
}
