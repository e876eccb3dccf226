//! Closing: the gate every check-out and every new connection of a `Database`
//! passes, the leases out, and the connections its openers made.
//!
//! Once the gate is closed, openers refuse to connect, pools drop the
//! connections handed back to them, and waiting check-outs give up. The gate
//! counts the leases out (a check-out holds a [`LeaseMark`] for as long as it
//! lives), so that the closing handle can wait for them, cancel what they run
//! and, as a last resort, sever their connections. It also remembers every
//! connection its openers made, so that closing can make sure each one hung
//! up. That list holds one entry per open connection (pool connections and the
//! replica monitors' ones): bounded by the pools' sizes, and pruned as
//! connections close.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::CancelHandle;
use super::wire::WireState;

/// Where a `Database` is in its life, as the work in flight sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifecycle {
    /// Serving.
    Open,
    /// Closing: new check-outs (retries included) are refused; work in flight
    /// may finish.
    Draining,
    /// Closing, past the deadline: what still ran was cancelled, or its
    /// connection severed; the failures that follow are the close's doing.
    Cancelling,
}

/// The closing state of one `Database`, shared by its check-outs, pools and
/// openers.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    phase: AtomicU8,
    /// Woken once, when the gate closes (waiting check-outs give up).
    closed: tokio::sync::Notify,
    /// Woken when a lease comes back while the gate is closed.
    returned: tokio::sync::Notify,
    /// Leases handed out so far, and out now.
    issued: AtomicU64,
    out: AtomicU64,
    /// `issued` and `out` when the gate closed.
    at_close: OnceLock<(u64, u64)>,
    conns: Mutex<Registry>,
}

/// The connections the gate's openers made and that may still be open.
#[derive(Debug, Default)]
struct Registry {
    /// Each connection's wire, how to cancel its query, and its backend pid.
    live: Vec<(Weak<WireState>, CancelHandle, i32)>,
    /// Dead entries are dropped when the list reaches this length.
    prune_at: usize,
}

/// Marks one check-out as out for as long as it lives.
#[derive(Debug)]
pub(crate) struct LeaseMark {
    gate: Arc<Gate>,
    wire: Option<Arc<WireState>>,
}

impl Drop for LeaseMark {
    fn drop(&mut self) {
        if let Some(w) = &self.wire {
            w.set_leased(false);
        }
        self.gate.out.fetch_sub(1, Ordering::AcqRel);
        if self.gate.is_closed() {
            self.gate.returned.notify_waiters();
        }
    }
}

impl Gate {
    pub(crate) fn lifecycle(&self) -> Lifecycle {
        match self.phase.load(Ordering::Acquire) {
            0 => Lifecycle::Open,
            1 => Lifecycle::Draining,
            _ => Lifecycle::Cancelling,
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lifecycle() != Lifecycle::Open
    }

    /// Closes the gate (harmless when closed already) and wakes the check-outs
    /// waiting for a connection.
    pub(crate) fn close(&self) {
        if self
            .phase
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            let _ = self.at_close.set((
                self.issued.load(Ordering::Acquire),
                self.out.load(Ordering::Acquire),
            ));
            self.closed.notify_waiters();
        }
    }

    /// From now on, failures of the work still out are the close's doing.
    pub(crate) fn cancelling(&self) {
        self.phase.store(2, Ordering::Release);
    }

    /// Completes when the gate is closed.
    pub(crate) async fn wait_closed(&self) {
        let notified = self.closed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_closed() {
            return;
        }
        notified.await;
    }

    /// Counts a lease out until the mark is dropped; `wire` is its connection
    /// when the gate may cancel or sever it (a pool's; not the test harness's
    /// shared one).
    pub(crate) fn lease(self: &Arc<Self>, wire: Option<Arc<WireState>>) -> LeaseMark {
        if let Some(w) = &wire {
            w.set_leased(true);
        }
        self.issued.fetch_add(1, Ordering::AcqRel);
        self.out.fetch_add(1, Ordering::AcqRel);
        LeaseMark {
            gate: self.clone(),
            wire,
        }
    }

    /// Leases handed out so far, and out now.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.issued.load(Ordering::Acquire),
            self.out.load(Ordering::Acquire),
        )
    }

    /// `counts()` when the gate closed (zeros while it is open).
    pub(crate) fn counts_at_close(&self) -> (u64, u64) {
        self.at_close.get().copied().unwrap_or_default()
    }

    /// Waits until no lease is out, or `until`; returns whether none is.
    pub(crate) async fn leases_back(&self, until: Instant) -> bool {
        loop {
            let notified = self.returned.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.out.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return self.out.load(Ordering::Acquire) == 0;
            }
        }
    }

    /// Remembers a connection an opener made.
    pub(crate) fn register(&self, wire: &Arc<WireState>, cancel: CancelHandle, pid: i32) {
        let mut r = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if r.live.len() >= r.prune_at {
            r.live.retain(|(w, _, _)| w.strong_count() > 0);
            r.prune_at = (r.live.len() * 2).max(16);
        }
        r.live.push((Arc::downgrade(wire), cancel, pid));
    }

    /// The backend pids of the registered connections still open: what the
    /// watchdog may cancel, and nothing else.
    pub(crate) fn backend_pids(&self) -> Vec<i32> {
        let r = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        r.live
            .iter()
            .filter(|(w, _, _)| w.upgrade().is_some_and(|w| !w.is_closed()))
            .map(|(_, _, pid)| *pid)
            .collect()
    }

    /// The registered connections still open, with how to cancel their queries.
    fn open_conns(&self) -> Vec<(Arc<WireState>, CancelHandle)> {
        let r = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        r.live
            .iter()
            .filter_map(|(w, c, _)| w.upgrade().map(|w| (w, c.clone())))
            .filter(|(w, _)| !w.is_closed())
            .collect()
    }

    /// Sends a cancel request to every leased connection running a query, and
    /// waits for the requests to be delivered (each is a connection of its
    /// own), up to `until`. Returns how many were sent.
    pub(crate) async fn cancel_running(&self, until: Instant) -> usize {
        let running: Vec<CancelHandle> = self
            .open_conns()
            .into_iter()
            .filter(|(w, _)| w.is_leased() && w.in_flight() > 0)
            .map(|(_, c)| c)
            .collect();
        let sent = running.len();
        let requests = futures_util::future::join_all(running.iter().map(|c| async move {
            if let Err(e) = c.cancel().await {
                tracing::warn!(target: "railyard::close", error = %e, "cancel request failed");
            }
        }));
        if tokio::time::timeout_at(until, requests).await.is_err() {
            tracing::warn!(target: "railyard::close", "cancel requests not delivered in time; their connections will be closed");
        }
        sent
    }

    /// Severs the connections of the leases still out; returns how many.
    pub(crate) fn sever_leased(&self) -> usize {
        let held: Vec<_> = self
            .open_conns()
            .into_iter()
            .filter(|(w, _)| w.is_leased())
            .collect();
        for (w, _) in &held {
            w.sever();
        }
        held.len()
    }

    /// Waits up to `patience` for every registered connection to close (those
    /// whose holders let go hang up by themselves), then severs the rest and
    /// waits up to `patience` again. Returns how many had to be severed.
    pub(crate) async fn hang_up(&self, patience: Duration) -> usize {
        self.wait_all_closed(patience).await;
        let left = self.open_conns();
        for (w, _) in &left {
            w.sever();
        }
        if !left.is_empty() {
            self.wait_all_closed(patience).await;
        }
        left.len()
    }

    /// Polls (every 5 ms: a connection's driver says nothing when it ends)
    /// until every registered connection is closed, up to `patience`.
    async fn wait_all_closed(&self, patience: Duration) {
        let until = Instant::now() + patience;
        while !self.open_conns().is_empty() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn leases_are_counted_until_dropped_and_closing_wakes_the_waiters() {
        let gate = Arc::new(Gate::default());
        let a = gate.lease(None);
        let b = gate.lease(Some(Arc::new(WireState::default())));
        assert_eq!(gate.counts(), (2, 2));
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.wait_closed().await })
        };
        gate.close();
        gate.close();
        waiter.await.unwrap();
        assert_eq!(gate.counts_at_close(), (2, 2));
        assert_eq!(gate.lifecycle(), Lifecycle::Draining);
        let back = {
            let gate = gate.clone();
            tokio::spawn(async move {
                gate.leases_back(Instant::now() + Duration::from_secs(5))
                    .await
            })
        };
        drop(a);
        drop(b);
        assert!(back.await.unwrap());
        assert_eq!(gate.counts(), (2, 0));
        assert!(
            gate.leases_back(Instant::now() + Duration::from_millis(1))
                .await
        );
    }

    #[tokio::test]
    async fn waiting_for_leases_ends_at_the_deadline() {
        let gate = Arc::new(Gate::default());
        let _held = gate.lease(None);
        gate.close();
        let started = Instant::now();
        assert!(
            !gate
                .leases_back(Instant::now() + Duration::from_millis(30))
                .await
        );
        assert!(started.elapsed() >= Duration::from_millis(30));
    }
}
