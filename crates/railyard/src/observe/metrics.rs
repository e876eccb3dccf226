//! The query metrics: durations in OpenTelemetry's buckets, errors by class,
//! and the recent window of queries and errors per second.

use super::*;

/// OpenTelemetry's recommended bucket bounds for `db.client.operation.duration`, in seconds.
pub(crate) const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// A duration histogram with OpenTelemetry's buckets.
#[derive(Debug, Default)]
pub(crate) struct DurationHistogram {
    pub(crate) buckets: [AtomicU64; 15],
    pub(crate) sum_ns: AtomicU64,
    pub(crate) count: AtomicU64,
}

impl DurationHistogram {
    pub(super) fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = DURATION_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Railyard's own always-on figures: durations per route, errors by class, and
/// a sliding window of recent outcomes for the health report.
#[derive(Debug)]
pub(crate) struct Metrics {
    pub(crate) primary: DurationHistogram,
    pub(crate) replica: DurationHistogram,
    pub(crate) errors: [AtomicU64; CLASS_COUNT],
    /// Every query's latency, in fine buckets (for samplers).
    pub(crate) latency: activity::LatencyBuckets,
    /// Per-second buckets of the last minute, indexed by second modulo 60:
    /// bounded, and lock-free (a query records with atomics only).
    pub(super) window: [Second; WINDOW],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            primary: DurationHistogram::default(),
            replica: DurationHistogram::default(),
            errors: Default::default(),
            latency: Default::default(),
            window: std::array::from_fn(|_| Second::default()),
        }
    }
}

/// Seconds kept for the recent error rate.
pub(super) const WINDOW: usize = 60;

/// Queries and errors by class in one second.
#[derive(Debug, Default)]
pub(super) struct Second {
    /// Which second (since the process's first query) the counts are for.
    pub(super) at: AtomicU64,
    pub(super) total: AtomicU64,
    pub(super) errors: [AtomicU64; CLASS_COUNT],
}

pub(super) const CLASS_COUNT: usize = ErrorClass::ALL.len();

pub(super) fn epoch_secs() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

impl Metrics {
    pub(super) fn record(&self, e: &QueryEvent<'_>) {
        match e.route {
            Route::Primary => self.primary.record(e.duration),
            Route::Replica(_) => self.replica.record(e.duration),
        }
        self.latency.record(e.duration);
        self.count(e.class);
    }

    /// A check-out that failed (no connection could be opened, the pool timed
    /// out, the circuit is open): an operation that failed before its query,
    /// counted with the queries in the error rate.
    pub(crate) fn record_failed_checkout(&self, class: ErrorClass) {
        self.count(Some(class));
    }

    pub(super) fn count(&self, class: Option<ErrorClass>) {
        let class = class.map(ErrorClass::index);
        if let Some(i) = class {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
        let now = epoch_secs();
        let slot = &self.window[(now % WINDOW as u64) as usize];
        let at = slot.at.load(Ordering::Acquire);
        // A bucket last used a minute (or more) ago is taken over by the first
        // query of this second; counts from another thread racing the takeover
        // may land before the reset and be lost: an approximation of a second's
        // worth at most, which the health rate can afford.
        if at != now
            && slot
                .at
                .compare_exchange(at, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.total.store(0, Ordering::Relaxed);
            for e in &slot.errors {
                e.store(0, Ordering::Relaxed);
            }
        }
        slot.total.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = class {
            slot.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The cumulative figures a sampler diffs.
    pub(crate) fn activity(&self, retries: Vec<(ErrorClass, u64)>) -> Activity {
        Activity {
            queries: self.primary.count.load(Ordering::Relaxed)
                + self.replica.count.load(Ordering::Relaxed),
            latency: self.latency.counts(),
            errors: ErrorClass::ALL
                .iter()
                .map(|c| (*c, self.errors[c.index()].load(Ordering::Relaxed)))
                .collect(),
            retries,
        }
    }

    /// Queries and errors by class over the last minute.
    pub(crate) fn recent(&self) -> (u64, [u64; CLASS_COUNT]) {
        let now = epoch_secs();
        let mut total = 0;
        let mut errors = [0; CLASS_COUNT];
        for slot in &self.window {
            let at = slot.at.load(Ordering::Acquire);
            // Slot 0 starts at second 0 with nothing in it: harmless.
            if now.saturating_sub(at) < WINDOW as u64 {
                total += slot.total.load(Ordering::Relaxed);
                for (sum, e) in errors.iter_mut().zip(&slot.errors) {
                    *sum += e.load(Ordering::Relaxed);
                }
            }
        }
        (total, errors)
    }
}
