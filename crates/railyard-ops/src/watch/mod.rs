//! What the data layer sees, sampled every second and kept for a while: the
//! figures behind the dashboard and the alert rules.
//!
//! A [`Watcher`] samples a [`Database`] once per period (default 1 s): the
//! health verdict and its reasons (one pooled probe, reused for a second by
//! the handle), the pools, the replicas, and the rates and latency
//! percentiles of the last period, diffed from [`Database::activity`]. The
//! last [`WatchOptions::keep`] samples (default 900: fifteen minutes) are kept
//! in a ring, so a page opened now has a past; subscribers get each new
//! sample as it is taken. The sampler stops when the watcher is dropped.
//!
//! ```no_run
//! # async fn demo(db: railyard::Database) {
//! let watcher = railyard_ops::watch::Watcher::spawn(db, railyard_ops::watch::WatchOptions::default());
//! let mut samples = watcher.subscribe();
//! while samples.changed().await.is_ok() {
//!     let s = samples.borrow_and_update().clone();
//!     println!("{:.0} queries/s, p99 {:?} ms", s.queries_per_s, s.p99_ms);
//! }
//! # }
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use railyard::database::Database;
use railyard::observe::{Activity, HealthCheck, HealthStatus, StatementStats};
use railyard::route::ReplicaStatus;

/// How often and how much: `WatchOptions::default().every(…).statements(…)`.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    every: Duration,
    keep: usize,
    statements: Option<StatementStats>,
}

impl WatchOptions {
    /// Between samples (default 1 s; at least 100 ms).
    pub fn every(mut self, d: Duration) -> Self {
        self.every = d;
        self
    }

    /// Samples kept (default 900; at least 1, at most 86,400).
    pub fn keep(mut self, n: usize) -> Self {
        self.keep = n;
        self
    }

    /// Statement statistics to show top statements from (register the same
    /// [`StatementStats`] as a hook on the database).
    pub fn statements(mut self, stats: StatementStats) -> Self {
        self.statements = Some(stats);
        self
    }
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            every: Duration::from_secs(1),
            keep: 900,
            statements: None,
        }
    }
}

/// One pool at one moment.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[non_exhaustive]
pub struct PoolSample {
    /// `primary`, or the replica's name.
    pub name: String,
    /// `primary` or `replica`.
    pub route: &'static str,
    /// Connections open.
    pub open: u32,
    /// Of which idle.
    pub idle: u32,
    /// Of which in use.
    pub in_use: u32,
    /// The pool's size.
    pub max: u32,
    /// Check-outs waiting now.
    pub waiting: u32,
    /// Check-outs shed in the last minute.
    pub shed_last_minute: u64,
    /// The circuit breaker is open.
    pub breaker_open: bool,
}

/// One replica at one moment.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[non_exhaustive]
pub struct ReplicaSample {
    /// Its name (host:port).
    pub name: String,
    /// `healthy`, `lagging`, `down`, `promoted` or `unknown`.
    pub state: &'static str,
    /// Bytes of WAL behind the primary.
    pub lag_bytes: u64,
    /// Seconds behind.
    pub lag_seconds: f64,
    /// Reads are kept off it.
    pub ejected: bool,
    /// Times it was ejected since the watcher started.
    pub ejections: u64,
}

/// What the data layer looked like at one moment, and did in the period
/// before it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Sample {
    /// When, in milliseconds since 1970.
    pub at_ms: u64,
    /// The health verdict.
    pub status: HealthStatus,
    /// The checks that are not healthy (all of them when `status` is healthy
    /// is empty).
    pub reasons: Vec<HealthCheck>,
    /// The primary answered its probe.
    pub primary_up: bool,
    /// The migrations' check, when the handle runs migrations.
    pub migrations: Option<HealthCheck>,
    /// Each pool.
    pub pools: Vec<PoolSample>,
    /// Each replica.
    pub replicas: Vec<ReplicaSample>,
    /// Queries per second over the period.
    pub queries_per_s: f64,
    /// Latency percentiles over the period, ms (`None` without queries).
    pub p50_ms: Option<f64>,
    /// 95th percentile.
    pub p95_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// Failures per second by class over the period.
    pub errors_per_s: BTreeMap<&'static str, f64>,
    /// Retries per second by class over the period.
    pub retries_per_s: BTreeMap<&'static str, f64>,
}

impl Default for Sample {
    /// An empty sample: no pools, no queries, an unhealthy verdict until a
    /// probe says otherwise.
    fn default() -> Self {
        Sample {
            at_ms: 0,
            status: HealthStatus::Unhealthy,
            reasons: Vec::new(),
            primary_up: false,
            migrations: None,
            pools: Vec::new(),
            replicas: Vec::new(),
            queries_per_s: 0.0,
            p50_ms: None,
            p95_ms: None,
            p99_ms: None,
            errors_per_s: BTreeMap::new(),
            retries_per_s: BTreeMap::new(),
        }
    }
}

/// A statement among the costliest, for the page.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[non_exhaustive]
pub struct TopStatement {
    /// Its shape.
    pub statement: String,
    /// Executions.
    pub calls: u64,
    /// Failed ones.
    pub errors: u64,
    /// Total time, ms.
    pub total_ms: f64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 95th percentile, ms.
    pub p95_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
}

struct Shared {
    history: Mutex<VecDeque<Arc<Sample>>>,
    keep: usize,
    every: Duration,
    statements: Option<StatementStats>,
}

/// The sampler and its history. Clones share them; the sampler stops when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Watcher {
    shared: Arc<Shared>,
    latest: tokio::sync::watch::Receiver<Arc<Sample>>,
    _task: Arc<AbortOnDrop>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("samples", &self.history().len())
            .finish_non_exhaustive()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Watcher {
    /// Starts sampling `db` (on the current Tokio runtime).
    pub fn spawn(db: Database, options: WatchOptions) -> Watcher {
        let every = options.every.max(Duration::from_millis(100));
        let keep = options.keep.clamp(1, 86_400);
        let shared = Arc::new(Shared {
            history: Mutex::new(VecDeque::with_capacity(keep.min(1024))),
            keep,
            every,
            statements: options.statements,
        });
        let (tx, latest) = tokio::sync::watch::channel(Arc::new(empty_sample()));
        let task = {
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut sampler = Sampler::new(db.activity());
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    if db.is_closed() {
                        break;
                    }
                    let sample = Arc::new(sampler.take(&db).await);
                    {
                        let mut h = shared.history.lock().unwrap_or_else(|p| p.into_inner());
                        if h.len() >= shared.keep {
                            h.pop_front();
                        }
                        h.push_back(sample.clone());
                    }
                    if tx.send(sample).is_err() && Arc::strong_count(&shared) == 1 {
                        break;
                    }
                }
            })
        };
        Watcher {
            shared,
            latest,
            _task: Arc::new(AbortOnDrop(task)),
        }
    }

    /// The samples kept, oldest first.
    pub fn history(&self) -> Vec<Arc<Sample>> {
        self.shared
            .history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The samples taken after `at_ms` (milliseconds since 1970), oldest
    /// first, at most the newest `max`: what a poller that has seen
    /// everything up to `at_ms` is missing. Copies only those.
    ///
    /// ```no_run
    /// # fn demo(watcher: railyard_ops::watch::Watcher) {
    /// let mut seen = 0;
    /// for s in watcher.since(seen, 900) {
    ///     seen = s.at_ms;
    /// }
    /// # }
    /// ```
    pub fn since(&self, at_ms: u64, max: usize) -> Vec<Arc<Sample>> {
        let h = self
            .shared
            .history
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        after(&h, at_ms, max)
    }

    /// The time between samples.
    pub fn every(&self) -> Duration {
        self.shared.every
    }

    /// How many samples are kept at most.
    pub fn keep(&self) -> usize {
        self.shared.keep
    }

    /// The newest sample (an empty one before the first).
    pub fn latest(&self) -> Arc<Sample> {
        self.latest.borrow().clone()
    }

    /// A receiver that sees each new sample.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<Sample>> {
        self.latest.clone()
    }

    /// The statement statistics the watcher was given, if any.
    pub fn statements(&self) -> Option<&StatementStats> {
        self.shared.statements.as_ref()
    }

    /// The `n` statements with the most total time, when the watcher was
    /// given statement statistics.
    pub fn top_statements(&self, n: usize) -> Vec<TopStatement> {
        let Some(stats) = &self.shared.statements else {
            return Vec::new();
        };
        let mut all = stats.snapshot();
        all.sort_by_key(|s| std::cmp::Reverse(s.total));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        all.into_iter()
            .take(n)
            .map(|s| TopStatement {
                calls: s.calls,
                errors: s.errors,
                total_ms: ms(s.total),
                p50_ms: ms(s.p50),
                p95_ms: ms(s.p95),
                p99_ms: ms(s.p99),
                statement: s.sql,
            })
            .collect()
    }
}

/// The newest `max` samples of `h` taken after `at_ms`.
fn after(h: &VecDeque<Arc<Sample>>, at_ms: u64, max: usize) -> Vec<Arc<Sample>> {
    // Samples are taken in order, so their times only grow.
    let first = h.partition_point(|s| s.at_ms <= at_ms);
    let first = first.max(h.len().saturating_sub(max));
    h.range(first..).cloned().collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn empty_sample() -> Sample {
    Sample {
        at_ms: now_ms(),
        status: HealthStatus::Healthy,
        reasons: Vec::new(),
        primary_up: true,
        migrations: None,
        pools: Vec::new(),
        replicas: Vec::new(),
        queries_per_s: 0.0,
        p50_ms: None,
        p95_ms: None,
        p99_ms: None,
        errors_per_s: BTreeMap::new(),
        retries_per_s: BTreeMap::new(),
    }
}

/// Takes samples, remembering what it needs to diff and count.
struct Sampler {
    last: Activity,
    last_at: std::time::Instant,
    ejected: BTreeMap<String, (bool, u64)>,
}

impl Sampler {
    fn new(first: Activity) -> Self {
        Sampler {
            last: first,
            last_at: std::time::Instant::now(),
            ejected: BTreeMap::new(),
        }
    }

    // Long by design: one sample reads every figure of the page at one moment.
    async fn take(&mut self, db: &Database) -> Sample {
        let report = db.health().await;
        let now = db.activity();
        let secs = self.last_at.elapsed().as_secs_f64().max(1e-3);
        self.last_at = std::time::Instant::now();
        let rate = |a: &[(railyard::error::ErrorClass, u64)],
                    b: &[(railyard::error::ErrorClass, u64)]| {
            a.iter()
                .filter_map(|(c, n)| {
                    let before = b.iter().find(|(k, _)| k == c).map_or(0, |(_, m)| *m);
                    let d = n.saturating_sub(before);
                    (d > 0).then(|| (c.as_str(), d as f64 / secs))
                })
                .collect::<BTreeMap<_, _>>()
        };
        let q = |p| {
            now.latency
                .quantile_since(&self.last.latency, p)
                .map(|d| d.as_secs_f64() * 1000.0)
        };
        let mut sample = Sample {
            at_ms: now_ms(),
            status: report.status,
            primary_up: report
                .checks
                .iter()
                .any(|c| c.name == "primary" && c.status == HealthStatus::Healthy),
            migrations: report
                .checks
                .iter()
                .find(|c| c.name == "migrations")
                .cloned(),
            reasons: report
                .checks
                .iter()
                .filter(|c| c.status != HealthStatus::Healthy)
                .cloned()
                .collect(),
            pools: db
                .pool_status()
                .into_iter()
                .map(|p| PoolSample {
                    route: match p.route {
                        railyard::conn::Route::Primary => "primary",
                        _ => "replica",
                    },
                    in_use: p.connections.saturating_sub(p.idle),
                    open: p.connections,
                    idle: p.idle,
                    max: p.max_size,
                    waiting: p.waiters,
                    shed_last_minute: p.shed_last_minute,
                    breaker_open: p.circuit_open,
                    name: p.name,
                })
                .collect(),
            replicas: Vec::new(),
            queries_per_s: now.queries.saturating_sub(self.last.queries) as f64 / secs,
            p50_ms: q(0.5),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
            errors_per_s: rate(&now.errors, &self.last.errors),
            retries_per_s: rate(&now.retries, &self.last.retries),
        };
        for r in db.replica_health() {
            let ejected = !matches!(r.status, ReplicaStatus::Healthy | ReplicaStatus::Unknown);
            let entry = self.ejected.entry(r.name.clone()).or_insert((false, 0));
            if ejected && !entry.0 {
                entry.1 += 1;
            }
            entry.0 = ejected;
            sample.replicas.push(ReplicaSample {
                state: match r.status {
                    ReplicaStatus::Healthy => "healthy",
                    ReplicaStatus::Lagging => "lagging",
                    ReplicaStatus::Down => "down",
                    ReplicaStatus::Promoted => "promoted",
                    _ => "unknown",
                },
                lag_bytes: r.lag_bytes,
                lag_seconds: r.lag.as_secs_f64(),
                ejected,
                ejections: entry.1,
                name: r.name,
            });
        }
        self.last = now;
        sample
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_returns_only_newer_samples_and_at_most_max() {
        let h: VecDeque<Arc<Sample>> = (1..=10)
            .map(|i| {
                let mut s = empty_sample();
                s.at_ms = i * 1000;
                Arc::new(s)
            })
            .collect();
        let at = |v: Vec<Arc<Sample>>| v.iter().map(|s| s.at_ms / 1000).collect::<Vec<_>>();
        assert_eq!(at(after(&h, 0, 100)), (1..=10).collect::<Vec<_>>());
        assert_eq!(at(after(&h, 8000, 100)), vec![9, 10]);
        assert_eq!(at(after(&h, 8500, 100)), vec![9, 10]);
        assert_eq!(at(after(&h, 10_000, 100)), Vec::<u64>::new());
        assert_eq!(at(after(&h, 0, 3)), vec![8, 9, 10]);
        assert_eq!(at(after(&h, 0, 1)), vec![10]);
        assert!(after(&VecDeque::new(), 0, 5).is_empty());
    }
}
