//! The seam a [`Database`](super::Database) gets its connections through when
//! they do not come from its pools. The test harness (`railyard-test`) is the
//! one implementation: every route of its handle uses the test's connection,
//! inside the test's transaction. Production code has no branch for it: the
//! one check-out path asks the source, whatever it is.

use std::future::Future;
use std::pin::Pin;

use crate::conn::{PooledConn, Route};
use crate::error::Error;
use crate::exec::contention::Contention;

/// What a [`ConnSource`] returns.
pub type SourceFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'a>>;

/// Where a handle made with `Database::with_source` gets its connections.
/// Workspace-internal: `railyard-test` implements it.
#[doc(hidden)]
pub trait ConnSource: std::any::Any + Send + Sync {
    /// A connection for any route.
    fn checkout(&self) -> SourceFuture<'_, PooledConn>;

    /// A connection for a read, and the route to report for it; `tokened`
    /// says whether the read carries a causal position (without one it may
    /// see any committed state).
    fn checkout_read(&self, tokened: bool) -> SourceFuture<'_, (PooledConn, Route)>;

    /// How work on an enclosed lease copes with locks held elsewhere.
    fn contention(&self) -> Option<&Contention> {
        None
    }
}
