//! An operation's deadline, and the slot that lets it cancel the query an
//! attempt is running.

use super::*;

/// An operation's deadline: how long it was given, and when it passes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadline(pub(super) Option<(Duration, Instant)>);

impl Deadline {
    pub(super) fn start(after: Option<Duration>) -> Self {
        Deadline(after.map(|d| (d, Instant::now() + d)))
    }

    pub(super) fn passed(self, attempts: u32) -> Error {
        Error::Timeout {
            deadline: self.0.map_or(Duration::ZERO, |(d, _)| d),
            attempts,
            last: None,
        }
    }
}

/// The connection an attempt is using, so that a deadline can cancel its query.
#[derive(Clone, Default)]
pub(super) struct CancelSlot(pub(super) Arc<std::sync::Mutex<Option<Running>>>);

/// The connection an attempt runs on: how to cancel it, and its wire state.
pub(super) type Running = (CancelHandle, Arc<WireState>);

impl CancelSlot {
    pub(super) fn set(&self, conn: &Conn) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((conn.cancel_handle(), conn.wire_arc()));
    }
    pub(super) fn take(&self) -> Option<Running> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

pub(super) async fn with_deadline<R, E>(
    deadline: Deadline,
    work: impl Future<Output = Result<R, Failed<E>>>,
    attempts: &AtomicU32,
    cancel: &CancelSlot,
) -> Result<R, Failed<E>>
where
    E: From<Error>,
{
    let Some((_, until)) = deadline.0 else {
        return work.await;
    };
    match tokio::time::timeout_at(until, work).await {
        Ok(r) => r,
        Err(_) => {
            // The attempt's future is gone; its connection goes back to the pool,
            // which refuses it until it is idle again. Cancel what it was running.
            if let Some((handle, wire)) = cancel.take()
                && wire.in_flight() > 0
            {
                tokio::spawn(async move {
                    if let Err(e) = handle.cancel().await {
                        tracing::warn!(target: "railyard::tx", error = %e, "cancel request failed");
                    }
                });
            }
            let attempts = attempts.load(Ordering::Relaxed);
            Err(Failed::bare(
                E::from(deadline.passed(attempts)),
                Some(ErrorClass::Timeout),
                attempts,
            ))
        }
    }
}
