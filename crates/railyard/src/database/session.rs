//! [`Session`]: read-your-writes and monotonic reads across replicas.

use std::sync::{Arc, Mutex};

use super::{Database, TransactionBuilder, WriteBuilder};
use crate::conn::Route;
use crate::exec::ConnWork;
use crate::route::{CausalToken, Floor, Staleness};

/// A sequence of operations with read-your-writes and monotonic reads: reads go
/// to a replica only when it has replayed past this session's writes and past
/// what the session already read.
///
/// Its transactions and writes take the same options as the `Database`'s
/// ([`Session::build_transaction`], [`Session::build_write`]).
///
/// What the guarantees cost, in round trips to the server:
///
/// - a transaction: nothing more than without a session. The query for the
///   commit's position is sent with `COMMIT`, in the same round trip;
/// - an autocommit write: one round trip more, for the position (see
///   [`Session::write`]);
/// - a read: nothing more, on a replica or on the primary. After a read on the
///   primary (no replica had caught up), the session reads on the primary
///   until the primary's monitor has sampled its position, at most one
///   [check interval](crate::RoutingConfig::check_interval) later; from then
///   on, replicas that replayed that far serve it again.
///
/// ```no_run
/// use diesel_async::RunQueryDsl;
/// # async fn demo(db: &railyard::Database) -> Result<(), railyard::Error> {
/// let session = db.session();
/// session
///     .build_transaction()
///     .serializable()
///     .run(async |conn| {
///         diesel::sql_query("UPDATE accounts SET balance_cents = 0 WHERE id = 1")
///             .execute(conn)
///             .await
///             .map_err(railyard::Error::from)
///     })
///     .await?;
/// let token = session.token().expect("a write was recorded").to_string(); // e.g. for a header
/// // …later, in another request:
/// let later = db.session_from(token.parse()?);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Session {
    db: Database,
    floor: Arc<Mutex<Floor>>,
    staleness: Staleness,
}

impl Session {
    pub(crate) fn new(db: Database, floor: Floor) -> Self {
        Session {
            db,
            floor: Arc::new(Mutex::new(floor)),
            staleness: Staleness::Causal,
        }
    }

    /// The session's floor, resolved from the monitors' figures when it was
    /// waiting for a sample of the primary's position.
    fn floor(&self) -> Floor {
        let mut f = self.floor.lock().unwrap_or_else(|p| p.into_inner());
        *f = self.db.resolve_floor(*f);
        *f
    }

    /// Moves the session's floor forward (never back).
    pub(crate) fn advance(&self, to: Floor) {
        let mut f = self.floor.lock().unwrap_or_else(|p| p.into_inner());
        *f = self.db.resolve_floor(f.max(to));
    }

    /// This session's token: the newest position it wrote or read, if any.
    ///
    /// A commit's position is in the token as soon as the write returns. A
    /// read on the primary is in it once the primary's monitor has sampled
    /// the primary's position after the read (within one
    /// [check interval](crate::RoutingConfig::check_interval)): the read pays
    /// no round trip to learn it. Until then the token carries the session's
    /// writes and earlier reads, and the session itself keeps reading on the
    /// primary.
    ///
    /// `None` for a session with nothing to carry yet (no write, no read
    /// whose position is known), and when a commit position could not be
    /// read (the session then reads from the primary, which needs no token).
    pub fn token(&self) -> Option<CausalToken> {
        match self.floor() {
            Floor::At(lsn) => Some(CausalToken::new(lsn)),
            Floor::Sampled { at, .. } => {
                (at != 0).then(|| CausalToken::new(tokio_postgres::types::PgLsn::from(at)))
            }
            Floor::Any | Floor::Primary => None,
        }
    }

    /// Accepts stale reads explicitly (they still go only to healthy replicas).
    #[must_use]
    pub fn staleness(mut self, s: Staleness) -> Self {
        self.staleness = s;
        self
    }

    /// Reads, on a replica that has caught up with this session, else per the
    /// database's [`Fallback`](crate::route::Fallback). Either way the read
    /// costs the round trips of the same read without a session.
    pub async fn read<F: ConnWork>(&self, f: F) -> Result<F::Value, F::Error> {
        self.read_routed(f).await.map(|(v, _)| v)
    }

    /// Like [`Session::read`], and says where the read ran.
    pub async fn read_routed<F: ConnWork>(&self, f: F) -> Result<(F::Value, Route), F::Error> {
        let floor = match self.staleness {
            Staleness::Causal => self.floor(),
            Staleness::Any => Floor::Any,
        };
        let (v, route, seen) = self.db.read_at(floor, f).await?;
        if self.staleness == Staleness::Causal {
            // Monotonic reads: never go back to a replica behind what was seen.
            self.advance(seen);
        }
        Ok((v, route))
    }

    /// A write on the primary (see [`Database::write`]); its commit position
    /// becomes the session's token.
    ///
    /// It costs one round trip more than the same write without a session:
    /// autocommit work commits inside the closure's own statements, so the
    /// position can only be asked for after the last of them, once the
    /// closure has returned. (Work of `k` statements: `k + 1` round trips
    /// here, `k + 2` in [`Session::transaction`], whose position travels with
    /// its `COMMIT` but which pays for `BEGIN`.)
    pub async fn write<F: ConnWork>(&self, f: F) -> Result<F::Value, F::Error> {
        self.build_write().run(f).await
    }

    /// A write with options (idempotency, deadline, retry policy); its commit
    /// position becomes the session's token.
    pub fn build_write(&self) -> WriteBuilder<'_> {
        WriteBuilder::new(&self.db, Some(self))
    }

    /// A transaction on the primary (see [`Database::transaction`]); its
    /// commit position becomes the session's token. It costs the round trips
    /// of the same transaction without a session: the position is read in
    /// the round trip of its `COMMIT`.
    pub async fn transaction<F: ConnWork>(&self, f: F) -> Result<F::Value, F::Error> {
        self.build_transaction().run(f).await
    }

    /// A transaction with options (isolation, read-only, deferrable, statement
    /// timeout, deadline, retry policy); its commit position becomes the
    /// session's token.
    pub fn build_transaction(&self) -> TransactionBuilder<'_> {
        TransactionBuilder::new(&self.db, Some(self))
    }
}
