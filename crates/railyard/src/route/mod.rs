//! Routing: reads may go to replicas, everything else to the primary, and a
//! session never reads older data than it wrote or already read.
//!
//! - [`Database::read`](crate::Database::read) may use a replica; `write` and `transaction` always use
//!   the primary. The route taken is a [`Route`](crate::conn::Route).
//! - A [`Session`](crate::database::Session) records the primary's WAL insert position after each of its
//!   writes commits: a [`CausalToken`], which converts to and from a short string
//!   (for an HTTP header, a cookie or a job payload). A session's read goes to a
//!   replica only when that replica has replayed past the session's token and
//!   past everything the session already read (monotonic reads). What a read
//!   on the primary saw joins the session's floor from the primary monitor's
//!   next sample of its position, which costs the read no round trip.
//! - A background monitor per replica polls its replay position, recovery state
//!   and lag at a jittered interval, under a short `SET LOCAL statement_timeout`.
//!   Routing reads only these cached figures: no extra round trip per read. A
//!   replica that lags past a bound (bytes, or seconds while WAL is pending),
//!   fails its checks or its connections, or leaves recovery, is ejected, and is
//!   re-admitted after consecutive good checks.
//! - With no replica caught up, [`Fallback`] decides: read on the primary (the
//!   default) or wait up to a bound. [`Staleness::Any`] accepts stale data
//!   explicitly.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use diesel::QueryableByName;
use tokio_postgres::types::PgLsn;

use crate::conn::Conn;
use crate::conn::open::Opener;
use crate::conn::pool::TargetPool;
use crate::error::{ConfigError, Error, ErrorClass};

mod monitor;
#[cfg(test)]
mod tests;

use monitor::*;

/// The position a session has written (or read) up to: a WAL position of the
/// primary. Carry it between requests as a string; a read with it never sees
/// older data.
///
/// ```
/// use railyard::CausalToken;
/// let t: CausalToken = "16/B374D848".parse()?;
/// assert_eq!(t.to_string(), "16/B374D848");
/// assert!("yesterday".parse::<CausalToken>().is_err());
/// # Ok::<(), railyard::error::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CausalToken(PgLsn);

impl CausalToken {
    pub(crate) fn new(lsn: PgLsn) -> Self {
        CausalToken(lsn)
    }

    /// The WAL position.
    pub fn lsn(self) -> PgLsn {
        self.0
    }
}

impl fmt::Display for CausalToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for CausalToken {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        s.trim().parse::<PgLsn>().map(CausalToken).map_err(|_| {
            ConfigError::new(
                "causal token",
                s,
                "expected a WAL position such as 16/B374D848",
            )
        })
    }
}

/// The oldest data a read may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Floor {
    /// Any healthy replica will do.
    Any,
    /// A replica that replayed at least this far.
    At(PgLsn),
    /// After a read on the primary: at least `at` (a WAL position; 0 for
    /// none), and at least the primary's WAL insert position as its monitor
    /// samples it in a sample numbered above `after`, that is, one that began
    /// after the read ended, so past every commit the read could see. Until
    /// such a sample is in, only the primary will do; then the floor
    /// [resolves](Router::resolve) to [`Floor::At`]. This is how a read on the
    /// primary keeps a session's reads monotonic without a round trip of its
    /// own (see `Database::after_primary_read`).
    Sampled {
        /// The floor the session had before, as a raw WAL position (0: none).
        at: u64,
        /// The number of the primary's position samples begun when the read
        /// ended.
        after: u64,
    },
    /// Only the primary (a commit position could not be read).
    Primary,
}

impl Floor {
    /// The later of two floors.
    pub(crate) fn max(self, other: Floor) -> Floor {
        match (self, other) {
            (Floor::Primary, _) | (_, Floor::Primary) => Floor::Primary,
            (Floor::Any, f) | (f, Floor::Any) => f,
            (Floor::At(a), Floor::At(b)) => Floor::At(a.max(b)),
            (Floor::At(a), Floor::Sampled { at, after })
            | (Floor::Sampled { at, after }, Floor::At(a)) => Floor::Sampled {
                at: at.max(u64::from(a)),
                after,
            },
            (Floor::Sampled { at: a, after: x }, Floor::Sampled { at: b, after: y }) => {
                Floor::Sampled {
                    at: a.max(b),
                    after: x.max(y),
                }
            }
        }
    }
}

/// How a read picks among eligible replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ReplicaChoice {
    /// In turn.
    #[default]
    RoundRobin,
    /// The one with the fewest reads in flight.
    LeastOutstanding,
}

/// What a causal read does when no replica has caught up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Fallback {
    /// Read on the primary.
    #[default]
    Primary,
    /// Wait up to this long for a replica to catch up, then read on the primary.
    Wait(Duration),
}

/// Whether a read must be causally consistent with the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Staleness {
    /// Never older than the session's writes and reads.
    #[default]
    Causal,
    /// Any healthy replica will do, however far behind (within the lag bound).
    Any,
}

/// Routing settings.
///
/// ```
/// use std::time::Duration;
/// use railyard::route::{Fallback, RoutingConfig};
/// let r = RoutingConfig::default()
///     .fallback(Fallback::Wait(Duration::from_millis(200)))
///     .max_lag_bytes(1 << 20);
/// # let _ = r;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingConfig {
    pub(crate) choice: ReplicaChoice,
    pub(crate) fallback: Fallback,
    pub(crate) max_lag_bytes: u64,
    pub(crate) max_lag: Duration,
    pub(crate) check_interval: Duration,
    pub(crate) check_timeout: Duration,
    pub(crate) readmit_after: u32,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            choice: ReplicaChoice::RoundRobin,
            fallback: Fallback::Primary,
            max_lag_bytes: 16 * 1024 * 1024,
            max_lag: Duration::from_secs(10),
            check_interval: Duration::from_millis(200),
            check_timeout: Duration::from_secs(1),
            readmit_after: 2,
        }
    }
}

impl RoutingConfig {
    /// How replicas are picked. Defaults to round-robin.
    pub fn choice(mut self, c: ReplicaChoice) -> Self {
        self.choice = c;
        self
    }
    /// What causal reads do when no replica caught up. Defaults to the primary.
    pub fn fallback(mut self, f: Fallback) -> Self {
        self.fallback = f;
        self
    }
    /// A replica further behind than this many WAL bytes is ejected. Defaults to 16 MiB.
    pub fn max_lag_bytes(mut self, n: u64) -> Self {
        self.max_lag_bytes = n;
        self
    }
    /// A replica whose last replayed commit is older than this while WAL is
    /// still pending is ejected. Defaults to 10 s.
    pub fn max_lag(mut self, d: Duration) -> Self {
        self.max_lag = d;
        self
    }
    /// The monitor's interval (jittered ±25 %). Defaults to 200 ms.
    pub fn check_interval(mut self, d: Duration) -> Self {
        self.check_interval = d;
        self
    }
    /// The monitor query's `statement_timeout`. Defaults to 1 s.
    pub fn check_timeout(mut self, d: Duration) -> Self {
        self.check_timeout = d;
        self
    }
    /// Consecutive good checks before an ejected replica is re-admitted. Defaults to 2.
    pub fn readmit_after(mut self, n: u32) -> Self {
        self.readmit_after = n.max(1);
        self
    }
}

/// A replica's state as routing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReplicaStatus {
    /// Not checked yet.
    Unknown,
    /// Serving reads.
    Healthy,
    /// Ejected: behind the lag bound.
    Lagging,
    /// Ejected: checks or connections fail.
    Down,
    /// Ejected: its recovery ended (it was promoted); no longer a replica.
    Promoted,
}

impl ReplicaStatus {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => ReplicaStatus::Healthy,
            2 => ReplicaStatus::Lagging,
            3 => ReplicaStatus::Down,
            4 => ReplicaStatus::Promoted,
            _ => ReplicaStatus::Unknown,
        }
    }
    fn as_u8(self) -> u8 {
        match self {
            ReplicaStatus::Unknown => 0,
            ReplicaStatus::Healthy => 1,
            ReplicaStatus::Lagging => 2,
            ReplicaStatus::Down => 3,
            ReplicaStatus::Promoted => 4,
        }
    }
}

/// A snapshot of one replica's monitored state.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicaHealth {
    /// `host:port`.
    pub name: String,
    /// Whether reads go there, and why not.
    pub status: ReplicaStatus,
    /// Its last known replay position (`None` before the first check).
    pub replay_lsn: Option<PgLsn>,
    /// WAL bytes behind the primary at the last check.
    pub lag_bytes: u64,
    /// Age of its last replayed commit while WAL was pending, at the last check.
    pub lag: Duration,
    /// Reads in flight there.
    pub outstanding: usize,
    /// The last check's error, when it failed.
    pub last_error: Option<String>,
}

/// One replica: its pool and what the monitor knows of it.
pub(crate) struct ReplicaNode {
    pub(crate) name: Arc<str>,
    pub(crate) pool: TargetPool,
    opener: Opener,
    status: AtomicU8,
    replay_lsn: AtomicU64,
    lag_bytes: AtomicU64,
    lag_ms: AtomicU64,
    good_checks: AtomicU32,
    outstanding: AtomicUsize,
    last_error: Mutex<Option<String>>,
}

impl ReplicaNode {
    pub(crate) fn new(name: Arc<str>, pool: TargetPool, opener: Opener) -> Self {
        ReplicaNode {
            name,
            pool,
            opener,
            status: AtomicU8::new(ReplicaStatus::Unknown.as_u8()),
            replay_lsn: AtomicU64::new(0),
            lag_bytes: AtomicU64::new(0),
            lag_ms: AtomicU64::new(0),
            good_checks: AtomicU32::new(0),
            outstanding: AtomicUsize::new(0),
            last_error: Mutex::new(None),
        }
    }

    pub(crate) fn status(&self) -> ReplicaStatus {
        ReplicaStatus::from_u8(self.status.load(Ordering::Acquire))
    }

    fn set_status(&self, s: ReplicaStatus) {
        let old = self.status.swap(s.as_u8(), Ordering::AcqRel);
        if old != s.as_u8() {
            tracing::info!(target: "railyard::route", replica = %self.name, from = ?ReplicaStatus::from_u8(old), to = ?s, "replica status changed");
        }
    }

    pub(crate) fn replay_lsn(&self) -> u64 {
        self.replay_lsn.load(Ordering::Acquire)
    }

    /// What a failed read on this replica means, and whether to read on the
    /// primary instead: a lost connection ejects the replica until the monitor
    /// re-admits it; a recovery conflict is the replica's business too; any
    /// other failure is the read's own and is returned to the caller.
    pub(crate) fn after_failed_read(&self, class: ErrorClass) -> bool {
        match class {
            ErrorClass::Reconnect => {
                self.note_failure(format!("read failed: {class}"));
                true
            }
            ErrorClass::RetryTransaction => {
                tracing::info!(target: "railyard::route", replica = %self.name, "recovery conflict on a replica; reading on the primary");
                true
            }
            _ => false,
        }
    }

    /// The replica's pool could not hand out a connection: eject it until the
    /// monitor re-admits it.
    pub(crate) fn note_failure(&self, why: String) {
        if self.status() == ReplicaStatus::Healthy {
            self.set_status(ReplicaStatus::Down);
        }
        self.good_checks.store(0, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    pub(crate) fn health(&self) -> ReplicaHealth {
        ReplicaHealth {
            name: self.name.to_string(),
            status: self.status(),
            replay_lsn: match self.replay_lsn() {
                0 => None,
                lsn => Some(PgLsn::from(lsn)),
            },
            lag_bytes: self.lag_bytes.load(Ordering::Relaxed),
            lag: Duration::from_millis(self.lag_ms.load(Ordering::Relaxed)),
            outstanding: self.outstanding.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// Counts a read in flight on a replica for as long as it lives.
pub(crate) struct Outstanding(Arc<ReplicaNode>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The routing state shared by a `Database`'s handles and its monitors.
pub(crate) struct Router {
    pub(crate) replicas: Vec<Arc<ReplicaNode>>,
    pub(crate) config: RoutingConfig,
    rr: AtomicUsize,
    /// The primary's WAL write position at its latest sample: what replicas'
    /// lag is measured against.
    primary_lsn: AtomicU64,
    /// The primary's WAL insert position at its latest sample: what a
    /// [`Floor::Sampled`] resolves to (past every commit record written
    /// before the sample, flushed or not).
    primary_insert_lsn: AtomicU64,
    /// Samples of the primary's position begun, and the number of the latest
    /// one that completed (numbered from 1).
    primary_samples_begun: AtomicU64,
    primary_samples_done: AtomicU64,
    /// Signalled after every monitor round, for `Fallback::Wait`.
    changed: tokio::sync::Notify,
    stopped: AtomicBool,
    /// The monitor tasks: one per replica and one for the primary's position.
    monitors: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("replicas", &self.replicas.len())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Router {
    pub(crate) fn new(replicas: Vec<Arc<ReplicaNode>>, config: RoutingConfig) -> Self {
        Router {
            replicas,
            config,
            rr: AtomicUsize::new(0),
            primary_lsn: AtomicU64::new(0),
            primary_insert_lsn: AtomicU64::new(0),
            primary_samples_begun: AtomicU64::new(0),
            primary_samples_done: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
            stopped: AtomicBool::new(false),
            monitors: Mutex::new(Vec::new()),
        }
    }

    /// The floor of a session whose `floor` was `floor` before a read on the
    /// primary that has just ended: the read saw every commit the primary had
    /// made visible, so the session must not read older data afterwards. No
    /// I/O: the position is the one the primary's monitor finds in its next
    /// sample (see [`Floor::Sampled`]). Without replicas there is nothing to
    /// fall behind: the floor stays.
    pub(crate) fn after_primary_read(&self, floor: Floor) -> Floor {
        if self.replicas.is_empty() {
            return floor;
        }
        // SeqCst, like the monitor's count: a sample numbered above this one
        // began after this load, so after the read.
        let after = self.primary_samples_begun.load(Ordering::SeqCst);
        floor.max(Floor::Sampled { at: 0, after })
    }

    /// `floor`, with a [`Floor::Sampled`] replaced by the position its sample
    /// found once that sample is in; no I/O.
    pub(crate) fn resolve(&self, floor: Floor) -> Floor {
        let Floor::Sampled { at, after } = floor else {
            return floor;
        };
        if self.primary_samples_done.load(Ordering::SeqCst) <= after {
            return floor;
        }
        // Stored before the sample was counted done: at least that sample's.
        let sampled = self.primary_insert_lsn.load(Ordering::SeqCst);
        Floor::At(PgLsn::from(at.max(sampled)))
    }

    /// Numbers a sample of the primary's position about to be taken.
    fn begin_primary_sample(&self) -> u64 {
        self.primary_samples_begun.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Records sample `n` of the primary's position (write and insert) and
    /// wakes reads waiting for a floor to resolve or a replica to catch up.
    fn end_primary_sample(&self, n: u64, write: u64, insert: u64) {
        self.primary_lsn.fetch_max(write, Ordering::AcqRel);
        self.primary_insert_lsn.fetch_max(insert, Ordering::SeqCst);
        self.primary_samples_done.fetch_max(n, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Picks a healthy replica that has replayed at least the floor; cached
    /// figures only, no I/O.
    pub(crate) fn choose(&self, floor: Floor) -> Option<(Arc<ReplicaNode>, Outstanding)> {
        let n = self.replicas.len();
        let min_lsn = match self.resolve(floor) {
            Floor::Any => 0,
            Floor::At(lsn) => u64::from(lsn),
            // Not sampled yet: only the primary has what the read saw.
            Floor::Sampled { .. } | Floor::Primary => return None,
        };
        if n == 0 {
            return None;
        }
        let eligible =
            |r: &ReplicaNode| r.status() == ReplicaStatus::Healthy && r.replay_lsn() >= min_lsn;
        let chosen = match self.config.choice {
            ReplicaChoice::RoundRobin => {
                let start = self.rr.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| &self.replicas[(start + i) % n])
                    .find(|r| eligible(r))
            }
            ReplicaChoice::LeastOutstanding => self
                .replicas
                .iter()
                .filter(|r| eligible(r))
                .min_by_key(|r| r.outstanding.load(Ordering::Relaxed)),
        }?;
        chosen.outstanding.fetch_add(1, Ordering::Relaxed);
        Some((chosen.clone(), Outstanding(chosen.clone())))
    }

    /// Waits for the next monitor round (or the timeout).
    pub(crate) async fn changed(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.changed.notified()).await;
    }

    /// Stops the monitors: each ends at its next await (a probe in flight is
    /// dropped with its connection).
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        for task in self
            .monitors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            task.abort();
        }
    }

    /// Stops the monitors and waits for them to end, up to `bound` in all;
    /// returns how many ended.
    pub(crate) async fn stop_monitors(&self, bound: Duration) -> usize {
        self.stop();
        let tasks = std::mem::take(&mut *self.monitors.lock().unwrap_or_else(|p| p.into_inner()));
        let until = tokio::time::Instant::now() + bound;
        let mut ended = 0;
        for task in tasks {
            if tokio::time::timeout_at(until, task).await.is_ok() {
                ended += 1;
            }
        }
        ended
    }

    /// Starts one monitor task per replica, plus one that follows the primary's
    /// WAL position. Each ends when the router is stopped or dropped.
    pub(crate) fn spawn_monitors(router: &Arc<Router>, primary: Opener) {
        if router.replicas.is_empty() {
            return;
        }
        let weak = Arc::downgrade(router);
        let mut tasks = vec![tokio::spawn(monitor_primary(weak, primary))];
        for node in &router.replicas {
            tasks.push(tokio::spawn(monitor_replica(
                Arc::downgrade(router),
                node.clone(),
            )));
        }
        router
            .monitors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(tasks);
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        // The monitors hold weak references and would end at their next round;
        // this ends them now.
        self.stop();
    }
}
