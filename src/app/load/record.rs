//! What a run measured: per operation, an HDR histogram of latencies (from
//! each operation's *intended* start, so a stalled client cannot hide the
//! stall), errors and retries by class, reads served by a replica, stale
//! reads; per second, a small log-bucketed histogram for the time series. All
//! of it is bounded: the histograms have a fixed size, and the series keeps at
//! most [`MAX_SECONDS`] seconds.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use super::plan::OpKind;

/// The longest series kept (a day at one-second resolution).
pub const MAX_SECONDS: usize = 86_400;

/// An operation that starts this long after its intended time was held up by
/// busy workers (below it, the timer's resolution of a millisecond or so).
pub const LATE: Duration = Duration::from_millis(5);

/// How one step of an operation ended.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The error's class, when it failed.
    pub error: Option<&'static str>,
    /// The class of each retried attempt's failure, in order.
    pub retries: Vec<&'static str>,
    /// For reads: whether a replica served it.
    pub replica: Option<bool>,
    /// For reads: whether it missed the trader's acknowledged writes.
    pub stale: bool,
}

/// One step of an operation (a placement is two: the order, then the match).
#[derive(Debug, Clone)]
pub struct Step {
    /// What it was.
    pub kind: OpKind,
    /// When it started (the first step's latency counts from the intended start instead).
    pub started: Instant,
    /// When it ended.
    pub ended: Instant,
    /// How.
    pub outcome: Outcome,
}

/// Buckets of the per-second histograms.
const LOG_BUCKETS: usize = 80;

/// A histogram of 80 logarithmic buckets (each 30% wider than the one
/// before) from 1 µs to about 20 minutes: enough for p50 and p99 of one
/// second, even when a burst has queued operations for minutes.
#[derive(Debug, Clone, Copy)]
struct LogHist([u32; LOG_BUCKETS]);

const LOG_BASE: f64 = 1.3;

impl LogHist {
    fn record(&mut self, micros: u64) {
        let i = if micros <= 1 {
            0
        } else {
            ((micros as f64).ln() / LOG_BASE.ln()) as usize
        };
        self.0[i.min(LOG_BUCKETS - 1)] += 1;
    }

    fn merge(&mut self, other: &LogHist) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a += b;
        }
    }

    /// The upper bound of the bucket holding quantile `q`, in milliseconds.
    fn quantile_ms(&self, q: f64) -> f64 {
        let total: u64 = self.0.iter().map(|&c| u64::from(c)).sum();
        if total == 0 {
            return 0.0;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.0.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return LOG_BASE.powi(i as i32 + 1) / 1000.0;
            }
        }
        LOG_BASE.powi(LOG_BUCKETS as i32) / 1000.0
    }
}

#[derive(Debug, Clone, Copy)]
struct Second {
    done: u64,
    errors: u64,
    hist: LogHist,
}

impl Default for Second {
    fn default() -> Self {
        Second {
            done: 0,
            errors: 0,
            hist: LogHist([0; LOG_BUCKETS]),
        }
    }
}

#[derive(Debug)]
struct OpStats {
    hist: Histogram<u64>,
    errors: BTreeMap<&'static str, u64>,
    retries: BTreeMap<&'static str, u64>,
    reads: u64,
    replica: u64,
    stale: u64,
}

impl OpStats {
    fn new() -> Self {
        OpStats {
            // 1 µs to 10 min at 3 significant digits: a fixed ~100 KiB.
            hist: Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds"),
            errors: BTreeMap::new(),
            retries: BTreeMap::new(),
            reads: 0,
            replica: 0,
            stale: 0,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    ops: BTreeMap<OpKind, OpStats>,
    series: Vec<Second>,
    events: Vec<(f64, String)>,
    late: u64,
}

/// The run's measurements, shared by the workers.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    inner: Mutex<Inner>,
}

/// A live view for the progress line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Operations finished.
    pub done: u64,
    /// Of which failed.
    pub errors: u64,
    /// Operations per second over the last five seconds.
    pub rate: f64,
    /// p50 over the last five seconds, ms.
    pub p50_ms: f64,
    /// p99 over the last five seconds, ms.
    pub p99_ms: f64,
    /// Retries so far.
    pub retries: u64,
    /// Share of reads a replica served.
    pub replica_share: f64,
    /// Stale reads.
    pub stale: u64,
}

impl Recorder {
    /// A recorder whose clock starts at `start`.
    pub fn new(start: Instant) -> Self {
        Recorder {
            start,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes an event (a stress action) at the current time.
    pub fn event(&self, what: impl Into<String>) {
        let t = self.start.elapsed().as_secs_f64();
        let mut inner = self.lock();
        if inner.events.len() < 1_000 {
            inner.events.push((t, what.into()));
        }
    }

    /// Records an operation's steps; the first step's latency counts from
    /// `intended`, the operation's planned start.
    pub fn record(&self, intended: Instant, steps: &[Step]) {
        let mut inner = self.lock();
        for (i, step) in steps.iter().enumerate() {
            let from = if i == 0 { intended } else { step.started };
            if i == 0 && step.started.duration_since(intended) > LATE {
                inner.late += 1;
            }
            let micros = step
                .ended
                .saturating_duration_since(from)
                .as_micros()
                .max(1) as u64;
            let second = step.ended.saturating_duration_since(self.start).as_secs() as usize;
            let stats = inner.ops.entry(step.kind).or_insert_with(OpStats::new);
            let _ = stats.hist.record(micros.min(600_000_000));
            if let Some(class) = step.outcome.error {
                *stats.errors.entry(class).or_default() += 1;
            }
            for class in &step.outcome.retries {
                *stats.retries.entry(class).or_default() += 1;
            }
            if let Some(replica) = step.outcome.replica {
                stats.reads += 1;
                stats.replica += u64::from(replica);
            }
            stats.stale += u64::from(step.outcome.stale);
            if second < MAX_SECONDS {
                if inner.series.len() <= second {
                    inner.series.resize(second + 1, Second::default());
                }
                let s = &mut inner.series[second];
                s.done += 1;
                s.errors += u64::from(step.outcome.error.is_some());
                s.hist.record(micros);
            }
        }
    }

    /// The progress line's figures.
    pub fn progress(&self) -> Progress {
        let inner = self.lock();
        let now = self.start.elapsed().as_secs() as usize;
        let mut recent = Second::default();
        let from = now.saturating_sub(5);
        let window = inner
            .series
            .get(from..now.min(inner.series.len()))
            .unwrap_or(&[]);
        for s in window {
            recent.done += s.done;
            recent.hist.merge(&s.hist);
        }
        let mut p = Progress {
            rate: recent.done as f64 / window.len().max(1) as f64,
            p50_ms: recent.hist.quantile_ms(0.5),
            p99_ms: recent.hist.quantile_ms(0.99),
            ..Progress::default()
        };
        let (mut reads, mut replica) = (0, 0);
        for s in inner.ops.values() {
            p.done += s.hist.len();
            p.errors += s.errors.values().sum::<u64>();
            p.retries += s.retries.values().sum::<u64>();
            p.stale += s.stale;
            reads += s.reads;
            replica += s.replica;
        }
        p.replica_share = if reads == 0 {
            0.0
        } else {
            replica as f64 / reads as f64
        };
        p
    }

    /// The report, for a run of `elapsed`.
    // Long by design: every figure of the run report, in the order it prints.
    pub fn report(&self, engine: &str, elapsed: Duration) -> RunReport {
        let inner = self.lock();
        let secs = elapsed.as_secs_f64().max(1e-9);
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let mut ops = Vec::new();
        let mut totals = Totals::default();
        let mut retries_by_class: BTreeMap<String, u64> = BTreeMap::new();
        let mut errors_by_class: BTreeMap<String, u64> = BTreeMap::new();
        for kind in OpKind::ALL {
            let Some(s) = inner.ops.get(&kind) else {
                continue;
            };
            let count = s.hist.len();
            totals.count += count;
            totals.reads += s.reads;
            totals.replica += s.replica;
            totals.stale += s.stale;
            for (c, n) in &s.retries {
                *retries_by_class.entry((*c).to_owned()).or_default() += n;
            }
            for (c, n) in &s.errors {
                *errors_by_class.entry((*c).to_owned()).or_default() += n;
            }
            ops.push(OpReport {
                op: kind.name().to_owned(),
                count,
                throughput: count as f64 / secs,
                p50_ms: ms(&s.hist, 0.5),
                p95_ms: ms(&s.hist, 0.95),
                p99_ms: ms(&s.hist, 0.99),
                max_ms: s.hist.max() as f64 / 1000.0,
                errors: s
                    .errors
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), *v))
                    .collect(),
                retries: s
                    .retries
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), *v))
                    .collect(),
                replica_share: (s.reads > 0).then(|| s.replica as f64 / s.reads as f64),
                stale_reads: s.stale,
            });
        }
        let mut all = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("bounds");
        for s in inner.ops.values() {
            let _ = all.add(&s.hist);
        }
        // Whole seconds only: a last, partial second would read as a drop.
        let whole = (secs.floor() as usize).max(1);
        let series = inner
            .series
            .iter()
            .take(whole)
            .enumerate()
            .map(|(t, s)| SecondReport {
                t: t as u64,
                ops: s.done,
                errors: s.errors,
                p50_ms: s.hist.quantile_ms(0.5),
                p99_ms: s.hist.quantile_ms(0.99),
            })
            .collect();
        RunReport {
            engine: engine.to_owned(),
            elapsed_s: secs,
            operations: totals.count,
            throughput: totals.count as f64 / secs,
            p50_ms: ms(&all, 0.5),
            p99_ms: ms(&all, 0.99),
            max_ms: all.max() as f64 / 1000.0,
            late_starts: inner.late,
            replica_share: if totals.reads == 0 {
                None
            } else {
                Some(totals.replica as f64 / totals.reads as f64)
            },
            stale_reads: totals.stale,
            errors_by_class,
            retries_by_class,
            ops,
            series,
            events: inner
                .events
                .iter()
                .map(|(t, e)| Event {
                    t: *t,
                    what: e.clone(),
                })
                .collect(),
        }
    }
}

#[derive(Default)]
struct Totals {
    count: u64,
    reads: u64,
    replica: u64,
    stale: u64,
}

/// One operation kind's figures.
#[derive(Debug, Clone, Serialize)]
pub struct OpReport {
    /// The operation.
    pub op: String,
    /// Finished (ok or not).
    pub count: u64,
    /// Per second of the run.
    pub throughput: f64,
    /// Latency percentiles, ms.
    pub p50_ms: f64,
    /// p95, ms.
    pub p95_ms: f64,
    /// p99, ms.
    pub p99_ms: f64,
    /// Max, ms.
    pub max_ms: f64,
    /// Failures by class.
    pub errors: BTreeMap<String, u64>,
    /// Retried attempts by the class of their failure.
    pub retries: BTreeMap<String, u64>,
    /// For reads: the share a replica served.
    pub replica_share: Option<f64>,
    /// Reads that missed the trader's acknowledged writes.
    pub stale_reads: u64,
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct SecondReport {
    /// Seconds since the start.
    pub t: u64,
    /// Operations finished in it.
    pub ops: u64,
    /// Of which failed.
    pub errors: u64,
    /// p50 of those finished in it, ms (bucket bound: ±15%).
    pub p50_ms: f64,
    /// p99, ms.
    pub p99_ms: f64,
}

/// A stress action and when it happened.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// Seconds since the start.
    pub t: f64,
    /// What.
    pub what: String,
}

/// A run's report.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// `railyard` or `raw`.
    pub engine: String,
    /// Wall time of the run, s.
    pub elapsed_s: f64,
    /// Operation steps finished.
    pub operations: u64,
    /// Per second.
    pub throughput: f64,
    /// Over every step, ms.
    pub p50_ms: f64,
    /// p99 over every step, ms.
    pub p99_ms: f64,
    /// Max, ms.
    pub max_ms: f64,
    /// Operations that started more than [`LATE`] after their intended time
    /// (every worker was busy): their wait is in their latency.
    pub late_starts: u64,
    /// Share of reads a replica served.
    pub replica_share: Option<f64>,
    /// Reads that missed the trader's acknowledged writes (must be 0).
    pub stale_reads: u64,
    /// Failures by class.
    pub errors_by_class: BTreeMap<String, u64>,
    /// Retries by class.
    pub retries_by_class: BTreeMap<String, u64>,
    /// Per operation.
    pub ops: Vec<OpReport>,
    /// Per second.
    pub series: Vec<SecondReport>,
    /// Stress actions.
    pub events: Vec<Event>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_histogram_quantiles_are_within_a_bucket() {
        let mut h = LogHist([0; LOG_BUCKETS]);
        for us in 1..=10_000u64 {
            h.record(us);
        }
        let p50 = h.quantile_ms(0.5);
        let p99 = h.quantile_ms(0.99);
        assert!((5.0..=5.0 * 1.3 * 1.3).contains(&p50), "p50 {p50} ms");
        assert!((9.9..=9.9 * 1.3 * 1.3).contains(&p99), "p99 {p99} ms");
        let mut slow = LogHist([0; LOG_BUCKETS]);
        slow.record(40_000_000);
        let p = slow.quantile_ms(0.99);
        assert!(
            (40_000.0..=40_000.0 * 1.3 * 1.3).contains(&p),
            "40 s reads as {p} ms"
        );
    }

    #[tokio::test]
    async fn latency_counts_from_the_intended_start() {
        let start = Instant::now();
        let r = Recorder::new(start);
        let intended = start;
        let began = start + Duration::from_millis(90); // later than LATE
        let step = Step {
            kind: OpKind::Place,
            started: began,
            ended: began + Duration::from_millis(10),
            outcome: Outcome::default(),
        };
        r.record(intended, &[step]);
        let rep = r.report("test", Duration::from_secs(1));
        assert_eq!(rep.late_starts, 1);
        assert!(
            (rep.ops[0].p50_ms - 100.0).abs() < 1.0,
            "{}",
            rep.ops[0].p50_ms
        );
    }
}
