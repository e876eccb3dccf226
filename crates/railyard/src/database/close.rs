//! [`Database::close`]: refuse new work, let the work in flight finish until a
//! deadline, cancel what still runs, then let go of every connection and stop
//! the replica monitors.

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

use super::{Connections, Database};

/// How long after its deadline [`Database::close`] may take at most: the
/// cancelled work gets half a second to hand its connection back, then the
/// connections still open get a moment to hang up, twice (before and after
/// the stubborn ones are severed).
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// After the deadline's cancel requests, how long the cancelled work has to
/// roll back and hand its connection back before the connection is severed.
const CANCEL_GRACE: Duration = Duration::from_millis(500);

/// How long connections get to hang up once let go of, before they are
/// severed (and again after).
const HANG_UP: Duration = Duration::from_millis(150);

/// How long the replica monitors get to end once stopped (they are aborted,
/// which ends them at once).
const MONITOR_END: Duration = Duration::from_millis(100);

/// What [`Database::close`] did.
///
/// Its counts are of *check-outs*: each operation in flight holds one (a
/// transaction retried after the close was called does not start again: see
/// [`crate::error::RetriesExhausted::Closing`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CloseReport {
    /// Check-outs out when `close` was called, and those already waiting for
    /// a connection then that got one.
    pub in_flight: u64,
    /// Of those, handed back before the deadline: their work ended by itself
    /// (committed, or failed on its own).
    pub finished: u64,
    /// Still out at the deadline: the queries they were running got a cancel
    /// request, and their callers an [`crate::Error::Closed`] holding what the
    /// query reported.
    pub cancelled: u64,
    /// Of the cancelled, still out half a second later (work that held its
    /// connection without running a query, or did not let go): their
    /// connections were closed under them, so the server rolled back whatever
    /// they had open.
    pub severed: u64,
    /// Replica monitors stopped.
    pub monitors_stopped: usize,
    /// How long the close took, from the call.
    pub took: Duration,
}

impl fmt::Display for CloseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} in flight: {} finished, {} cancelled at the deadline ({} of them severed); {} monitors stopped; {:.2?}",
            self.in_flight,
            self.finished,
            self.cancelled,
            self.severed,
            self.monitors_stopped,
            self.took
        )
    }
}

impl Database {
    /// Shuts the handle down, and every clone of it.
    ///
    /// From the call on (before the returned future is first polled), every
    /// new check-out fails at once with [`crate::Error::Closed`] (class
    /// `Permanent`, never retried), and check-outs waiting for a connection
    /// give up with it; no retry starts. The work in flight may finish until
    /// `deadline`; then its running queries are sent a cancel request, and
    /// what still holds a connection half a second later has it closed
    /// under it, so that no connection stays inside a transaction. Then the
    /// pools let go of their connections and the replica monitors stop. The
    /// returned future completes at most [`CLOSE_GRACE`] after `deadline`,
    /// with every connection this handle opened closed.
    ///
    /// Calling it again (or on a clone) is harmless: the call waits for the
    /// first close to end and returns its report.
    ///
    /// ```no_run
    /// # async fn demo(db: railyard::Database) {
    /// use std::time::Duration;
    /// let report = db.close(Duration::from_secs(10)).await;
    /// eprintln!("closed: {report}");
    /// assert!(db.is_closed());
    /// let refused = db.primary().await.unwrap_err();
    /// assert!(matches!(refused, railyard::Error::Closed { .. }));
    /// # }
    /// ```
    pub fn close(&self, deadline: Duration) -> impl Future<Output = CloseReport> + Send + '_ {
        let called = Instant::now();
        self.inner.gate.close();
        async move {
            self.inner
                .closing
                .get_or_init(|| self.drain(called, deadline))
                .await
                .clone()
        }
    }

    /// Whether [`Database::close`] was called on this handle or a clone.
    pub fn is_closed(&self) -> bool {
        self.inner.gate.is_closed()
    }

    async fn drain(&self, called: Instant, deadline: Duration) -> CloseReport {
        let gate = &self.inner.gate;
        let until = tokio::time::Instant::from_std(called)
            .checked_add(deadline)
            .unwrap_or_else(far_future);
        let (issued_then, out_then) = gate.counts_at_close();
        gate.leases_back(until).await;
        let (issued, out) = gate.counts();
        let in_flight = out_then + issued.saturating_sub(issued_then);
        let (mut cancelled, mut severed) = (0, 0);
        if out > 0 {
            gate.cancelling();
            cancelled = out;
            let grace = tokio::time::Instant::now() + CANCEL_GRACE;
            let sent = gate.cancel_running(grace).await;
            if !gate.leases_back(grace).await {
                severed = gate.sever_leased() as u64;
            }
            tracing::warn!(
                target: "railyard::close",
                cancelled,
                cancel_requests = sent,
                severed,
                "work still running at the close's deadline was cancelled"
            );
        }
        if let Some(w) = &self.inner.watchdog {
            w.stop();
        }
        if let Some(p) = &self.inner.planner {
            p.stop();
        }
        let mut monitors_stopped = 0;
        if let Connections::Pooled { primary, router } = &self.inner.connections {
            primary.close();
            for node in &router.replicas {
                node.pool.close();
            }
            monitors_stopped = router.stop_monitors(MONITOR_END).await;
        }
        let forced = gate.hang_up(HANG_UP).await;
        if forced > 0 {
            tracing::warn!(target: "railyard::close", connections = forced, "connections still open after the pools let go were severed");
        }
        CloseReport {
            in_flight,
            finished: in_flight.saturating_sub(cancelled),
            cancelled,
            severed,
            monitors_stopped,
            took: called.elapsed(),
        }
    }
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}
