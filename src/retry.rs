//! Error classification and retry policy (DESIGN.md D3).
//!
//! Every failure gets one [`ErrorClass`], computed in one place
//! ([`classify`]) from the SQLSTATE the protocol tap saw (never from message
//! text, which follows `lc_messages`) and from whether the connection died.
//! Whether a failure is *retried* then depends on the phase it happened in:
//!
//! | SQLSTATE / event | class | retried when |
//! |---|---|---|
//! | 40001 serialization failure, 40P01 deadlock, 55P03 lock not available | `RetryTransaction` | always, the whole transaction from the top (never a nested block alone) |
//! | 08xxx, 57P01/02/03 (shutdown, terminated), 53300 (too many connections), socket closed | `Reconnect` | nothing was sent, or the work is idempotent, or it failed before COMMIT was sent |
//! | connection lost while COMMIT (or an autocommit statement) was in flight | `Ambiguous` | never: the outcome is unknown, the caller must check |
//! | 25006 read-only transaction (a write reached a standby) | `Reroute` | after re-resolving the primary |
//! | 57014 query cancelled (statement_timeout, our deadline) | `Timeout` | never |
//! | 23xxx integrity violation | `Constraint` | never (carries constraint, table, column) |
//! | anything else | `Permanent` | never |
//!
//! Backoff is exponential with full jitter, bounded by an attempt limit and by a
//! [`RetryBudget`] shared per `Database`: retries may spend at most a fraction of
//! recent successful work, so an outage cannot turn into a retry storm.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio_postgres::error::SqlState;

/// What kind of failure an error is, for deciding what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// The transaction lost a race (serialization failure, deadlock, lock
    /// timeout): re-run it from the top.
    RetryTransaction,
    /// The connection failed or the server refused connections for now.
    Reconnect,
    /// A write reached a server in recovery: find the primary again.
    Reroute,
    /// The connection died while the outcome was being decided (COMMIT in
    /// flight): it may or may not have committed.
    Ambiguous,
    /// A timeout or cancellation (57014, or Railyard's deadline).
    Timeout,
    /// An integrity constraint was violated (23xxx).
    Constraint,
    /// Anything else: retrying cannot help.
    Permanent,
}

impl ErrorClass {
    /// A short lowercase name, for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::RetryTransaction => "retry_transaction",
            ErrorClass::Reconnect => "reconnect",
            ErrorClass::Reroute => "reroute",
            ErrorClass::Ambiguous => "ambiguous",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Constraint => "constraint",
            ErrorClass::Permanent => "permanent",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where in an operation a failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Opening or checking out a connection.
    Connect,
    /// Before any byte of the operation reached the server.
    BeforeSend,
    /// While statements were running (inside a transaction, before COMMIT).
    InFlight,
    /// While COMMIT (or an autocommit statement) was being decided.
    Commit,
}

/// The class of a failure, from the server's SQLSTATE when it sent one and from
/// whether the connection is gone. The one place SQLSTATEs are interpreted.
///
/// ```
/// use railyard::{classify, ErrorClass};
/// use tokio_postgres::error::SqlState;
/// assert_eq!(classify(Some(&SqlState::T_R_DEADLOCK_DETECTED), false), ErrorClass::RetryTransaction);
/// assert_eq!(classify(None, true), ErrorClass::Reconnect);
/// ```
pub fn classify(sqlstate: Option<&SqlState>, connection_lost: bool) -> ErrorClass {
    let Some(code) = sqlstate else {
        return if connection_lost {
            ErrorClass::Reconnect
        } else {
            ErrorClass::Permanent
        };
    };
    match code {
        c if *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::LOCK_NOT_AVAILABLE =>
        {
            ErrorClass::RetryTransaction
        }
        c if *c == SqlState::T_R_STATEMENT_COMPLETION_UNKNOWN => ErrorClass::Ambiguous,
        c if *c == SqlState::READ_ONLY_SQL_TRANSACTION => ErrorClass::Reroute,
        c if *c == SqlState::QUERY_CANCELED => ErrorClass::Timeout,
        c if *c == SqlState::ADMIN_SHUTDOWN
            || *c == SqlState::CRASH_SHUTDOWN
            || *c == SqlState::CANNOT_CONNECT_NOW
            || *c == SqlState::TOO_MANY_CONNECTIONS
            || c.code().starts_with("08") =>
        {
            ErrorClass::Reconnect
        }
        c if c.code().starts_with("23") => ErrorClass::Constraint,
        _ => ErrorClass::Permanent,
    }
}

/// Whether a failure of `class` in `phase` may be retried.
///
/// `idempotent` is the caller's promise that running the work twice is harmless;
/// `sent` says whether any byte of the operation reached the server.
pub fn retryable(class: ErrorClass, phase: Phase, idempotent: bool, sent: bool) -> bool {
    match class {
        ErrorClass::RetryTransaction => true,
        ErrorClass::Reconnect => match phase {
            Phase::Connect | Phase::BeforeSend | Phase::InFlight => true,
            Phase::Commit => !sent || idempotent,
        },
        ErrorClass::Reroute => phase != Phase::Commit || idempotent,
        ErrorClass::Ambiguous => idempotent,
        ErrorClass::Timeout | ErrorClass::Constraint | ErrorClass::Permanent => false,
    }
}

/// How many attempts and how long to wait between them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. Defaults to 10.
    pub max_attempts: u32,
    /// The first backoff's upper bound. Defaults to 5 ms.
    pub base_delay: Duration,
    /// The largest backoff. Defaults to 1 s.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
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

impl Default for RetryBudget {
    /// 20 % of recent work plus 10 retries per second, over 10 s.
    fn default() -> Self {
        RetryBudget::new(0.2, 10.0, Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_holds() {
        use ErrorClass::*;
        let cases = [
            ("40001", RetryTransaction),
            ("40P01", RetryTransaction),
            ("55P03", RetryTransaction),
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
