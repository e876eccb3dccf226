//! The statistics' sharded storage: the figures of one statement, the shards
//! that hold them by the hash of their key, and the HyperLogLog estimate of
//! distinct statements beyond the cap.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use super::super::{Outcome, QueryEvent, hist};
use super::StatementStat;

// Counting distinct statements beyond the cap, in fixed memory.

pub(super) const DISTINCT_BITS: u32 = 10;
pub(super) const DISTINCT_REGISTERS: usize = 1 << DISTINCT_BITS;

/// A HyperLogLog estimate of distinct hashes: 1 KiB, a standard error of about
/// 3 % (1.04 / √1024), lock-free.
pub(super) struct Distinct {
    pub(super) registers: [AtomicU8; DISTINCT_REGISTERS],
}

impl Distinct {
    pub(super) fn new() -> Self {
        Distinct {
            registers: std::array::from_fn(|_| AtomicU8::new(0)),
        }
    }

    pub(super) fn add(&self, hash: u64) {
        let register = &self.registers[(hash >> (64 - DISTINCT_BITS)) as usize];
        // The position of the first one bit among the remaining bits (the
        // guard bit caps it).
        let rank = ((hash << DISTINCT_BITS) | (1 << (DISTINCT_BITS - 1))).leading_zeros() as u8 + 1;
        if register.load(Ordering::Relaxed) < rank {
            register.fetch_max(rank, Ordering::Relaxed);
        }
    }

    pub(super) fn estimate(&self) -> u64 {
        let m = DISTINCT_REGISTERS as f64;
        let (mut sum, mut zeros) = (0.0, 0u32);
        for r in &self.registers {
            let rank = r.load(Ordering::Relaxed);
            sum += (-f64::from(rank)).exp2();
            zeros += u32::from(rank == 0);
        }
        if zeros as usize == DISTINCT_REGISTERS {
            return 0;
        }
        let raw = 0.7213 / (1.0 + 1.079 / m) * m * m / sum;
        let estimate = if raw <= 2.5 * m && zeros > 0 {
            // Few values: count the empty registers instead.
            m * (m / f64::from(zeros)).ln()
        } else {
            raw
        };
        estimate.round() as u64
    }

    pub(super) fn clear(&self) {
        for r in &self.registers {
            r.store(0, Ordering::Relaxed);
        }
    }
}

/// The smallest duration counted, in microseconds (the histogram's unit).
pub(super) const HIST_LOW_US: u64 = 1;

/// The figures of one statement (or of the statements beyond the cap).
pub(super) struct Figures {
    pub(super) calls: u64,
    pub(super) errors: u64,
    pub(super) total_ns: u64,
    /// Counts saturate at `u32::MAX` per bucket (over four billion calls of one
    /// statement within 1 % of one duration); calls, errors and totals do not.
    pub(super) hist: hist::Histogram,
}

impl Figures {
    pub(super) fn new() -> Self {
        Figures {
            calls: 0,
            errors: 0,
            total_ns: 0,
            hist: hist::Histogram::default(),
        }
    }

    pub(super) fn record(&mut self, e: &QueryEvent<'_>) {
        self.calls += 1;
        self.errors += u64::from(e.outcome == Outcome::Error);
        let ns = u64::try_from(e.duration.as_nanos()).unwrap_or(u64::MAX);
        self.total_ns = self.total_ns.saturating_add(ns);
        // Values past the histogram's range count as its last bucket; none is lost.
        self.hist.record((ns / 1_000).max(HIST_LOW_US));
    }

    pub(super) fn clear(&mut self) {
        self.calls = 0;
        self.errors = 0;
        self.total_ns = 0;
        self.hist.reset();
    }

    pub(super) fn stat(&self, sql: &str) -> StatementStat {
        let q = |p: f64| Duration::from_micros(self.hist.value_at_quantile(p));
        StatementStat {
            sql: sql.to_owned(),
            calls: self.calls,
            errors: self.errors,
            total: Duration::from_nanos(self.total_ns),
            mean: Duration::from_nanos(self.total_ns / self.calls.max(1)),
            p50: q(0.5),
            p95: q(0.95),
            p99: q(0.99),
        }
    }
}

/// Hashes a `u64` key as itself (keys are already hashes).
#[derive(Default)]
pub(super) struct KeyHasher(pub(super) u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The statements of one shard by the hash of their key; a hash shared by
/// several keys holds them all.
pub(super) type ShardMap =
    HashMap<u64, Vec<(Box<str>, Mutex<Figures>)>, BuildHasherDefault<KeyHasher>>;

/// Shards: statements whose keys hash to different shards never share a lock.
pub(super) const SHARDS: usize = 16;

/// One shard, alone on its cache lines.
#[repr(align(128))]
pub(super) struct Shard {
    pub(super) map: RwLock<ShardMap>,
    /// This shard's part of the statements beyond the cap (merged in snapshots):
    /// a shard of its own so that an overflowing workload has no global lock either.
    pub(super) other: OnceLock<Mutex<Figures>>,
}

pub(super) struct Inner {
    pub(super) shards: [Shard; SHARDS],
    pub(super) hasher: RandomState,
    /// This instance, for the per-thread caches of keys and hashes.
    pub(super) id: u64,
    pub(super) capacity: usize,
    /// Statements held (at most `capacity`).
    pub(super) len: AtomicUsize,
    /// Distinct statements that went to `<other>`.
    pub(super) overflowed: Distinct,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    /// Records `e` under `key`, whose hash by `self.hasher` is `hash`.
    pub(super) fn record(&self, key: &str, hash: u64, e: &QueryEvent<'_>) {
        // Bits the map's own layout (low bits, top seven) does not use.
        let shard = &self.shards[(hash >> 32) as usize % SHARDS];
        {
            let map = shard.map.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(entries) = map.get(&hash)
                && let Some((_, figures)) = entries.iter().find(|(k, _)| **k == *key)
            {
                return lock(figures).record(e);
            }
        }
        if self.len.load(Ordering::Relaxed) < self.capacity {
            let mut map = shard.map.write().unwrap_or_else(PoisonError::into_inner);
            let entries = map.entry(hash).or_default();
            if let Some((_, figures)) = entries.iter().find(|(k, _)| **k == *key) {
                // Another thread added it meanwhile.
                return lock(figures).record(e);
            }
            let reserved = self
                .len
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < self.capacity).then_some(n + 1)
                })
                .is_ok();
            if reserved {
                let mut figures = Figures::new();
                figures.record(e);
                entries.push((key.into(), Mutex::new(figures)));
                return;
            }
            if entries.is_empty() {
                map.remove(&hash);
            }
        }
        self.overflowed.add(hash);
        lock(shard.other.get_or_init(|| Mutex::new(Figures::new()))).record(e);
    }
}

#[cfg(test)]
mod distinct_tests {
    use super::*;

    /// A well-mixed 64-bit hash of `i` (SplitMix64's finaliser): the
    /// estimator's input, deterministic.
    fn mix(i: u64) -> u64 {
        let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn the_distinct_estimate_is_within_its_standard_error() {
        // 1,024 registers: a standard error of 1.04 / 32 = 3.25 %. Over many
        // independent sets the errors must look like that, not just one.
        let mut errors = Vec::new();
        for set in 0..40u64 {
            for n in [1_000u64, 50_000, 200_000] {
                let d = Distinct::new();
                for i in 0..n {
                    d.add(mix(set << 40 | i));
                }
                let e = (d.estimate() as f64 - n as f64) / n as f64;
                errors.push(e);
            }
        }
        let rms = (errors.iter().map(|e| e * e).sum::<f64>() / errors.len() as f64).sqrt();
        let worst = errors.iter().fold(0f64, |m, e| m.max(e.abs()));
        eprintln!(
            "distinct estimate over {} sets: rms error {rms:.4}, worst {worst:.4}",
            errors.len()
        );
        assert!(rms < 0.045, "rms error {rms}");
        assert!(worst < 0.15, "worst error {worst}");
    }
}
