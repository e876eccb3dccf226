//! What a check-out hands out: a pooled connection, or exclusive use of a
//! connection that several handles share.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use super::Conn;
use super::gate::{Gate, LeaseMark};
use super::pool::Manager;
use crate::error::Error;

/// A connection that several handles share, one user at a time (the test
/// harness pins every route of a `Database` to one such connection). `None`
/// once its owner has taken it back.
pub(crate) type SharedConn = Arc<tokio::sync::Mutex<Option<Conn>>>;

/// A connection checked out of one of the [`Database`](crate::Database)'s pools.
/// It goes back to the pool when dropped (or is discarded, when it is no longer
/// usable). Dereferences to [`Conn`].
pub struct PooledConn {
    // Dropped first: the connection is back in its pool (or discarded) before
    // the mark says the lease is over.
    held: Held,
    enclosed: bool,
    /// Counts the lease with the `Database`'s gate while it lives.
    mark: Option<LeaseMark>,
}

// The pooled variant is as large as before this enum existed; boxing it would
// add an allocation to every check-out for the sake of the shared variant.
#[allow(clippy::large_enum_variant)]
enum Held {
    Pool(bb8::PooledConnection<'static, Manager>),
    Shared(tokio::sync::OwnedMutexGuard<Option<Conn>>),
}

const SHARED_GONE: &str = "a shared connection is handed out only while its owner holds it";

impl PooledConn {
    pub(crate) fn pooled(c: bb8::PooledConnection<'static, Manager>) -> Self {
        // A new lease is a new operation: its queries are its first attempt
        // until the retry loop says otherwise (the label outlives the lease).
        c.begin_operation();
        PooledConn {
            held: Held::Pool(c),
            enclosed: false,
            mark: None,
        }
    }

    /// Counts this lease with `gate` until it is dropped. A pooled connection's
    /// lease may be cancelled or severed by a closing `Database`; the shared
    /// connection of the test harness is only counted.
    pub(crate) fn marked(mut self, gate: &Arc<Gate>) -> Self {
        let wire = match &self.held {
            Held::Pool(c) => Some(c.wire_arc()),
            Held::Shared(_) => None,
        };
        self.mark = Some(gate.lease(wire));
        self
    }

    /// Waits up to `patience` for exclusive use of a shared connection. The
    /// lease is *enclosed*: the connection is inside a transaction that its
    /// holder does not own, so work on it runs in savepoints and is never
    /// retried.
    pub(crate) async fn shared(
        slot: &SharedConn,
        patience: Duration,
        enclosed: bool,
    ) -> Result<Self, Error> {
        match tokio::time::timeout(patience, slot.clone().lock_owned()).await {
            Ok(guard) if guard.is_none() => Err(Error::TestIsolation(
                "the test has ended: its connection was handed back (a task outlived the test?)"
                    .into(),
            )),
            Ok(guard) => Ok(PooledConn {
                held: Held::Shared(guard),
                enclosed,
                mark: None,
            }),
            Err(_) => Err(Error::TestIsolation(format!(
                "the test's connection stayed busy for {patience:?}: a connection from `db.primary()` is probably still held while another operation waits for it (drop it first)"
            ))),
        }
    }

    /// Whether the connection is inside a transaction that this lease's holder
    /// does not own (see [`PooledConn::shared`]).
    pub(crate) fn enclosed(&self) -> bool {
        self.enclosed
    }
}

impl fmt::Debug for PooledConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

impl Deref for PooledConn {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        match &self.held {
            Held::Pool(c) => c,
            Held::Shared(c) => c.as_ref().expect(SHARED_GONE),
        }
    }
}

impl DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut Conn {
        match &mut self.held {
            Held::Pool(c) => c,
            Held::Shared(c) => c.as_mut().expect(SHARED_GONE),
        }
    }
}
