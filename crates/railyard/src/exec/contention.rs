//! Enclosed work under locks held by *other* transactions on the same server.
//!
//! The test harness runs many tests at once in one shared database, each in
//! its own transaction. Two tests that touch the same rows meet in the lock
//! manager: one waits for the other, or (when they take two locks in opposite
//! orders) the server breaks a deadlock by failing one of them with 40P01.
//! Neither is a bug in the code under test; both are artefacts of sharing.
//!
//! An enclosed piece of work (a `db.transaction` or `db.write` inside a test)
//! runs in a savepoint, and rolling back to a savepoint releases every lock
//! taken after it. So a group of statements that failed with 40P01, 40001 or
//! 55P03 can be rolled back and run again: the other test then goes on,
//! and the retry's waits end when the other test ends (its rollback releases
//! its locks). What bounds it is a [`Contention`] policy, given to the
//! enclosed source by the harness:
//!
//! - `bound`: the longest a piece of work keeps retrying, which the harness
//!   also sets as the transaction's `lock_timeout`, so that a single wait is
//!   bounded too;
//! - `blockers`: who was seen blocking the connection, written by the
//!   harness's watchdog while a statement waits (after the error the wait is
//!   over and the server no longer says who it was), read here to name them
//!   when the work gives up.
//!
//! In production nothing is enclosed and none of this runs: a top-level
//! transaction is retried from the top by the ordinary retry loop.

use std::sync::Mutex;
use std::time::Duration;

use tokio_postgres::error::SqlState;

/// The SQLSTATEs that mean "another transaction's locks were in the way":
/// deadlock detected, serialization failure, lock not available (`NOWAIT`
/// or `lock_timeout`).
pub(crate) fn is_lock_conflict(code: &SqlState) -> bool {
    *code == SqlState::T_R_DEADLOCK_DETECTED
        || *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::LOCK_NOT_AVAILABLE
}

/// How enclosed work copes with other transactions' locks (see the module
/// documentation).
#[derive(Debug)]
pub struct Contention {
    /// How long a piece of work keeps retrying.
    pub(crate) bound: Duration,
    /// At most this many attempts, whatever the bound.
    pub(crate) max_attempts: u32,
    /// Who was last seen blocking the connection.
    pub blockers: Blockers,
}

impl Contention {
    /// A policy with `bound` and the harness's attempt limit.
    pub fn new(bound: Duration) -> Self {
        Contention {
            bound,
            max_attempts: 50,
            blockers: Blockers::default(),
        }
    }

    /// The pause before attempt `attempt + 1`: short, growing, jittered. A
    /// deadlock's loser waits in the lock manager anyway; this matters for
    /// `NOWAIT`, which fails at once while the other test still holds the lock.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let cap = Duration::from_millis(10 << attempt.min(5)).min(Duration::from_millis(250));
        cap.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }
}

/// The description of whoever was last seen holding a lock that the enclosed
/// connection waited for: a short, bounded text, replaced (never appended) at
/// each sighting.
#[derive(Debug, Default)]
pub struct Blockers(Mutex<Option<String>>);

/// Longest description kept.
const MAX_DESCRIPTION: usize = 1024;

impl Blockers {
    /// Records a sighting.
    pub fn saw(&self, description: String) {
        let mut d = description;
        if d.len() > MAX_DESCRIPTION {
            let mut end = MAX_DESCRIPTION;
            while !d.is_char_boundary(end) {
                end -= 1;
            }
            d.truncate(end);
            d.push('…');
        }
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(d);
    }

    /// The last sighting, if any.
    pub fn last(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets sightings (a new piece of work starts).
    pub fn clear(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_lock_conflicts_and_nothing_else() {
        assert!(is_lock_conflict(&SqlState::T_R_DEADLOCK_DETECTED));
        assert!(is_lock_conflict(&SqlState::T_R_SERIALIZATION_FAILURE));
        assert!(is_lock_conflict(&SqlState::LOCK_NOT_AVAILABLE));
        assert!(!is_lock_conflict(&SqlState::UNIQUE_VIOLATION));
        assert!(!is_lock_conflict(&SqlState::QUERY_CANCELED));
    }

    #[test]
    fn backoff_grows_and_stays_bounded() {
        let c = Contention::new(Duration::from_secs(10));
        for attempt in 0..100 {
            let b = c.backoff(attempt);
            assert!(b <= Duration::from_millis(250), "{attempt}: {b:?}");
            assert!(b >= Duration::from_millis(5), "{attempt}: {b:?}");
        }
    }

    #[test]
    fn a_description_is_bounded() {
        let b = Blockers::default();
        b.saw("é".repeat(5000));
        assert!(b.last().unwrap().len() <= MAX_DESCRIPTION + '…'.len_utf8());
        b.clear();
        assert!(b.last().is_none());
    }
}
