//! The test's connection, lent to the test's [`Database`] for every route:
//! the core's `ConnSource` seam, implemented here so that the data layer
//! carries no harness code. Work on it is *enclosed* in the test's
//! transaction (savepoints, never retried); in stale-replica mode, reads
//! without a causal token go to a second connection that sees only committed
//! data.

use std::sync::Arc;
use std::time::Duration;

use railyard::conn::{Conn, ConnLabels, LentConn, PooledConn, Route};
use railyard::database::{ConnSource, SourceFuture};
use railyard::error::Error;
use railyard::exec::contention::Contention;
use railyard::{Database, Migrator};

/// How long a check-out of the test's connection waits for it.
const PATIENCE: Duration = Duration::from_secs(30);

/// A connection the test's handle shares, one user at a time; `None` once
/// the harness has taken it back.
type Shared = Arc<tokio::sync::Mutex<Option<Conn>>>;

/// The harness's connections for one test.
pub(crate) struct Pinned {
    conn: Shared,
    stale: Option<Shared>,
    contention: Arc<Contention>,
    labels: Option<Arc<ConnLabels>>,
}

/// Exclusive use of a shared connection while it lives.
struct Guard(tokio::sync::OwnedMutexGuard<Option<Conn>>);

const GONE: &str = "a shared connection is lent only while the harness holds it";

impl LentConn for Guard {
    fn conn(&self) -> &Conn {
        self.0.as_ref().expect(GONE)
    }
    fn conn_mut(&mut self) -> &mut Conn {
        self.0.as_mut().expect(GONE)
    }
}

/// Waits up to [`PATIENCE`] for exclusive use of `slot`.
async fn lend(slot: &Shared, enclosed: bool) -> Result<PooledConn, Error> {
    match tokio::time::timeout(PATIENCE, slot.clone().lock_owned()).await {
        Ok(guard) if guard.is_none() => Err(Error::TestIsolation(
            "the test has ended: its connection was handed back (a task outlived the test?)".into(),
        )),
        Ok(guard) => Ok(PooledConn::lent(Box::new(Guard(guard)), enclosed)),
        Err(_) => Err(Error::TestIsolation(format!(
            "the test's connection stayed busy for {PATIENCE:?}: a connection from `db.primary()` is probably still held while another operation waits for it (drop it first)"
        ))),
    }
}

impl ConnSource for Pinned {
    fn checkout(&self) -> SourceFuture<'_, PooledConn> {
        Box::pin(lend(&self.conn, true))
    }

    fn checkout_read(&self, tokened: bool) -> SourceFuture<'_, (PooledConn, Route)> {
        Box::pin(async move {
            match (&self.stale, tokened) {
                (Some(stale), false) => Ok((
                    lend(stale, false).await?,
                    Route::Replica("stale-replica".into()),
                )),
                _ => Ok((
                    lend(&self.conn, true).await?,
                    Route::Replica("test-connection".into()),
                )),
            }
        })
    }

    fn contention(&self) -> Option<&Contention> {
        Some(&self.contention)
    }
}

impl Pinned {
    /// A handle whose every route uses `conn` (already inside the test's
    /// transaction), and `stale` for untokened reads in stale-replica mode.
    pub(crate) fn database(
        config: railyard::Config,
        conn: Conn,
        stale: Option<Conn>,
        contention: Arc<Contention>,
        migrator: Migrator,
    ) -> Database {
        let shared = |c| Arc::new(tokio::sync::Mutex::new(Some(c)));
        let labels = conn.labels().cloned();
        let source = Pinned {
            conn: shared(conn),
            stale: stale.map(shared),
            contention,
            labels,
        };
        Database::with_source(config, Arc::new(source), migrator)
    }

    /// The pinned source of a handle the harness made.
    pub(crate) fn of(db: &Database) -> Option<&Pinned> {
        let source: &dyn std::any::Any = db.source()?;
        source.downcast_ref::<Pinned>()
    }

    /// The test's connection's statement recording.
    pub(crate) fn labels(&self) -> Option<&Arc<ConnLabels>> {
        self.labels.as_ref()
    }

    /// Takes the connections back: the test's and the stale one.
    pub(crate) async fn take_back(&self) -> (Option<Conn>, Option<Conn>) {
        let conn = self.conn.lock().await.take();
        let stale = match &self.stale {
            Some(s) => s.lock().await.take(),
            None => None,
        };
        (conn, stale)
    }
}
