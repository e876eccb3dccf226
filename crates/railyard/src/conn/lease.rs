//! What a check-out hands out: a pooled connection, or a connection lent by
//! another source (the test harness lends its test's connection).

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use super::Conn;
use super::gate::{Gate, LeaseMark};
use super::pool::Manager;

/// A connection lent to a [`PooledConn`] by a source other than the pools
/// (see `database::ConnSource`): it goes back to its lender when dropped.
/// Workspace-internal: the test harness implements it.
#[doc(hidden)]
pub trait LentConn: Send {
    /// The connection.
    fn conn(&self) -> &Conn;
    /// The connection, to work on.
    fn conn_mut(&mut self) -> &mut Conn;
}

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
// add an allocation to every check-out for the sake of the lent variant.
#[allow(clippy::large_enum_variant)]
enum Held {
    Pool(bb8::PooledConnection<'static, Manager>),
    Lent(Box<dyn LentConn>),
}

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
    /// lease may be cancelled or severed by a closing `Database`; a lent
    /// connection (the test harness's) is only counted.
    pub(crate) fn marked(mut self, gate: &Arc<Gate>) -> Self {
        let wire = match &self.held {
            Held::Pool(c) => Some(c.wire_arc()),
            Held::Lent(_) => None,
        };
        self.mark = Some(gate.lease(wire));
        self
    }

    /// A lease on a lent connection. An *enclosed* one is inside a
    /// transaction that its holder does not own (the test's), so work on it
    /// runs in savepoints and is never retried. Workspace-internal.
    #[doc(hidden)]
    pub fn lent(conn: Box<dyn LentConn>, enclosed: bool) -> Self {
        PooledConn {
            held: Held::Lent(conn),
            enclosed,
            mark: None,
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
            Held::Lent(c) => c.conn(),
        }
    }
}

impl DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut Conn {
        match &mut self.held {
            Held::Pool(c) => c,
            Held::Lent(c) => c.conn_mut(),
        }
    }
}
