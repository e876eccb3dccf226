//! Retry policy: which failures may be retried, how often, and how long to wait.
//!
//! Every failure gets one [`ErrorClass`], computed in one place
//! (`crate::error::classify`) from the SQLSTATE the protocol tap saw (never from message
//! text, which follows `lc_messages`) and from whether the connection died.
//! Whether a failure is *retried* then depends on the phase it happened in:
//!
//! | SQLSTATE / event | class | retried when |
//! |---|---|---|
//! | 40001 serialization failure, 40P01 deadlock, 55P03 raised by `lock_timeout` | `RetryTransaction` | always, the whole transaction from the top (never a nested block alone) |
//! | 55P03 raised by a `NOWAIT` lock request (told apart by the error's routine field, never its message) | `LockNotAvailable` | never: the caller asked not to wait |
//! | 08xxx, 57P01/02/03 (shutdown, terminated), 53300 (too many connections), socket closed | `Reconnect` | nothing was sent, or the work is idempotent, or it failed before COMMIT was sent |
//! | connection lost while COMMIT (or an autocommit statement) was in flight | `Ambiguous` | never: the outcome is unknown, the caller must check |
//! | 25006 read-only transaction (a write reached a standby) | `Reroute` | after re-resolving the primary |
//! | 57014 query cancelled (statement_timeout, our deadline) | `Timeout` | never |
//! | 23xxx integrity violation | `Constraint` | never (carries constraint, table, column) |
//! | a check-out shed by the pool: its queue full, or its wait budget spent with every connection in use ([`Error::Overloaded`](crate::Error::Overloaded)) | `Overloaded` | never: a retry adds to the overload |
//! | the handle is closing ([`Error::Closed`](crate::Error::Closed)), and anything else | `Permanent` | never |
//!
//! While the `Database` closes ([`Database::close`](crate::Database::close)),
//! no retry is started either: a retryable failure is returned with
//! [`RetriesExhausted::Closing`](crate::error::RetriesExhausted::Closing).
//!
//! Backoff is exponential with full jitter, bounded by an attempt limit and by a
//! [`RetryBudget`] shared per `Database`: retries may spend at most a fraction of
//! recent successful work, so an outage cannot turn into a retry storm. When
//! either stops a retryable failure, the error says so
//! ([`Error::retries_exhausted`](crate::Error::retries_exhausted), and
//! [`Failed::retries_exhausted`](crate::exec::Failed::retries_exhausted) for
//! closures with their own error type).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};

use rand::RngExt;

use crate::error::{ErrorClass, Phase};

/// Whether a failure of `class` in `phase` may be retried.
///
/// `idempotent` is the caller's promise that running the work twice is harmless;
/// `sent` says whether any byte of the operation reached the server.
pub(crate) fn retryable(class: ErrorClass, phase: Phase, idempotent: bool, sent: bool) -> bool {
    match class {
        ErrorClass::RetryTransaction => true,
        ErrorClass::Reconnect => match phase {
            Phase::Connect | Phase::BeforeSend | Phase::InFlight => true,
            Phase::Commit => !sent || idempotent,
        },
        ErrorClass::Reroute => phase != Phase::Commit || idempotent,
        ErrorClass::Ambiguous => idempotent,
        ErrorClass::Timeout
        | ErrorClass::Constraint
        | ErrorClass::LockNotAvailable
        | ErrorClass::Overloaded
        | ErrorClass::Permanent => false,
    }
}

/// How many attempts and how long to wait between them.
///
/// ```
/// use std::time::Duration;
/// let p = railyard::RetryPolicy::default()
///     .max_attempts(3)
///     .backoff_between(Duration::from_millis(2), Duration::from_millis(50));
/// assert_eq!(p.attempts(), 3);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    base_delay: Duration,
    max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 10 attempts, full-jitter backoff from 5 ms up to 1 s.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The first backoff's upper bound and the largest backoff.
    pub fn backoff_between(mut self, base: Duration, max: Duration) -> Self {
        self.base_delay = base;
        self.max_delay = max.max(base);
        self
    }

    /// Attempts in all, the first included.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// No retries at all.
    pub fn never() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The wait before attempt `attempt + 1` (after `attempt` failures): a uniform
    /// draw from zero to `min(max_delay, base_delay * 2^(attempt-1))` ("full
    /// jitter"), so that contending clients spread out.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(20);
        let cap = self
            .base_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay);
        let nanos = cap.as_nanos() as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

/// A budget that limits retries to a fraction of recent work (after tower's
/// retry budget): each first attempt deposits, each retry withdraws, both expire
/// after a window, and a small floor of retries per second is always allowed.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: f64,
    window: Duration,
    created: Instant,
    state: Mutex<[Bucket; BUCKETS]>,
}

const BUCKETS: usize = 10;

/// Deposits and withdrawals of one tenth of the window.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    index: u64,
    deposits: f64,
    withdrawals: f64,
}

impl RetryBudget {
    /// `ratio` retries per first attempt (0.2 = one in five), plus `min_per_sec`,
    /// over a `window`.
    pub fn new(ratio: f64, min_per_sec: f64, window: Duration) -> Self {
        RetryBudget {
            ratio,
            min_per_sec,
            window,
            created: Instant::now(),
            state: Mutex::new([Bucket::default(); BUCKETS]),
        }
    }

    fn current(&self) -> u64 {
        let width = (self.window.as_nanos() / BUCKETS as u128).max(1);
        (self.created.elapsed().as_nanos() / width) as u64
    }

    fn with_bucket<T>(&self, f: impl FnOnce(&mut [Bucket; BUCKETS], usize, u64) -> T) -> T {
        let now = self.current();
        let mut buckets = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let i = (now % BUCKETS as u64) as usize;
        if buckets[i].index != now {
            buckets[i] = Bucket {
                index: now,
                ..Bucket::default()
            };
        }
        f(&mut buckets, i, now)
    }

    /// Records a first attempt.
    pub fn deposit(&self) {
        self.with_bucket(|b, i, _| b[i].deposits += 1.0);
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub fn withdraw(&self) -> bool {
        let floor = self.min_per_sec * self.window.as_secs_f64();
        let ratio = self.ratio;
        self.with_bucket(|b, i, now| {
            let live = b
                .iter()
                .filter(|x| now - x.index < BUCKETS as u64 && x.index <= now);
            let (dep, wd) = live.fold((0.0, 0.0), |(d, w), x| (d + x.deposits, w + x.withdrawals));
            if dep * ratio + floor - wd >= 1.0 {
                b[i].withdrawals += 1.0;
                true
            } else {
                false
            }
        })
    }
}

/// The retry settings and counters of one `Database`.
#[derive(Debug, Default)]
pub(crate) struct Retries {
    pub(crate) policy: RetryPolicy,
    pub(crate) budget: RetryBudget,
    counts: [AtomicU64; ErrorClass::ALL.len()],
}

impl Retries {
    pub(crate) fn new(policy: RetryPolicy, budget: RetryBudget) -> Self {
        Retries {
            policy,
            budget,
            counts: Default::default(),
        }
    }

    pub(crate) fn note(&self, class: ErrorClass) {
        self.counts[class.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Retries made so far, by class.
    pub(crate) fn counts(&self) -> Vec<(ErrorClass, u64)> {
        ErrorClass::ALL
            .iter()
            .map(|c| (*c, self.counts[c.index()].load(Ordering::Relaxed)))
            .collect()
    }
}

impl Default for RetryBudget {
    /// 20 % of recent work plus 10 retries per second, over 10 s.
    fn default() -> Self {
        RetryBudget::new(0.2, 10.0, Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::classify;
    use tokio_postgres::error::SqlState;

    #[test]
    fn the_table_holds() {
        use ErrorClass::*;
        let cases = [
            ("40001", RetryTransaction),
            ("40P01", RetryTransaction),
            ("55P03", LockNotAvailable),
            ("40003", Ambiguous),
            ("25006", Reroute),
            ("57014", Timeout),
            ("57P01", Reconnect),
            ("57P02", Reconnect),
            ("57P03", Reconnect),
            ("53300", Reconnect),
            ("08006", Reconnect),
            ("08001", Reconnect),
            ("23505", Constraint),
            ("23503", Constraint),
            ("23514", Constraint),
            ("42P01", Permanent),
            ("22012", Permanent),
            ("25P02", Permanent),
        ];
        for (code, class) in cases {
            assert_eq!(
                classify(Some(&SqlState::from_code(code)), false),
                class,
                "{code}"
            );
        }
        assert_eq!(classify(None, true), Reconnect);
        assert_eq!(classify(None, false), Permanent);
    }

    #[test]
    fn a_lock_timeout_is_told_from_nowait_by_the_routine_not_the_message() {
        use crate::error::ServerError;
        let error = |routine: &str, message: &str| ServerError {
            code: "55P03".into(),
            routine: Some(routine.into()),
            message: message.into(),
            ..ServerError::default()
        };
        let timeout = error(
            "ProcessInterrupts",
            "Abbruch der Anweisung wegen Zeitüberschreitung einer Sperre",
        );
        assert_eq!(timeout.class(false), ErrorClass::RetryTransaction);
        for routine in [
            "heap_lock_tuple",
            "heapam_tuple_lock",
            "RangeVarGetRelidExtended",
            "",
        ] {
            let nowait = error(routine, "canceling statement due to lock timeout");
            assert_eq!(
                nowait.class(false),
                ErrorClass::LockNotAvailable,
                "{routine}"
            );
        }
        assert!(!retryable(
            ErrorClass::LockNotAvailable,
            Phase::InFlight,
            true,
            false
        ));
    }

    #[test]
    fn reconnects_are_retried_only_when_safe() {
        use ErrorClass::*;
        assert!(retryable(Reconnect, Phase::BeforeSend, false, false));
        assert!(retryable(Reconnect, Phase::InFlight, false, true));
        assert!(!retryable(Reconnect, Phase::Commit, false, true));
        assert!(retryable(Reconnect, Phase::Commit, true, true));
        assert!(!retryable(Ambiguous, Phase::Commit, false, true));
        assert!(!retryable(Constraint, Phase::InFlight, true, true));
        assert!(retryable(RetryTransaction, Phase::Commit, false, true));
    }

    #[test]
    fn a_shed_check_out_is_never_retried_whatever_the_phase_or_promise() {
        for phase in [
            Phase::Connect,
            Phase::BeforeSend,
            Phase::InFlight,
            Phase::Commit,
        ] {
            for idempotent in [false, true] {
                for sent in [false, true] {
                    assert!(!retryable(ErrorClass::Overloaded, phase, idempotent, sent));
                }
            }
        }
        let shed = crate::error::Error::Overloaded {
            pool: "primary".into(),
            why: crate::error::Shed::QueueFull { max_waiters: 8 },
        };
        assert_eq!(shed.class(), ErrorClass::Overloaded);
        assert_eq!(
            crate::error::Error::Closed { source: None }.class(),
            ErrorClass::Permanent
        );
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let p = RetryPolicy::default();
        for attempt in 1..30 {
            let d = p.backoff(attempt);
            assert!(d <= p.max_delay);
            let cap = p
                .base_delay
                .saturating_mul(1 << (attempt - 1).min(20))
                .min(p.max_delay);
            assert!(d <= cap);
        }
        let draws: std::collections::HashSet<_> = (0..20).map(|_| p.backoff(5)).collect();
        assert!(draws.len() > 10, "full jitter spreads the waits");
    }

    #[test]
    fn the_budget_runs_out_without_successes_and_refills_with_them() {
        let b = RetryBudget::new(0.5, 0.0, Duration::from_secs(60));
        assert!(!b.withdraw(), "no work, no retries");
        for _ in 0..10 {
            b.deposit();
        }
        let granted = (0..20).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 5);
        let floor = RetryBudget::new(0.0, 1.0, Duration::from_secs(3));
        assert_eq!((0..10).filter(|_| floor.withdraw()).count(), 3);
    }
}
