//! [`Database`]: the handle applications keep, and the one place connections
//! are handed out.
//!
//! A `Database` gets its connections from its pools (a pool per target with
//! a router over the replicas), or from another [`ConnSource`]: the test
//! harness (`railyard-test`) lends the test's connection through that seam,
//! and none of its code is in this crate. Every way the handle gives out a
//! connection (`primary`, `replica`, `with_primary`, `read`, `write`,
//! `transaction`, sessions, builders, health) goes through one function,
//! `Database::checkout` (reads through its routed sibling `checkout_read`),
//! the only code that looks at where connections come from. A lent
//! connection that is *enclosed* in a transaction its holder does not own
//! runs the work in savepoints. A new entry point cannot leak past the
//! harness by forgetting a branch: there is no branch to forget. The same function is where a closed handle refuses new work (see
//! [`Database::close`], in `close.rs`).

mod attach;
mod builders;
mod close;
mod connect;
mod health;
mod read;
mod replicas;
mod session;
mod source;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::QueryableByName;
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use tokio_postgres::types::PgLsn;

use crate::config::{Config, ConnectTarget, TargetSessionAttrs};
use crate::conn::gate::{Gate, Lifecycle};
use crate::conn::open::Opener;
use crate::conn::pool::TargetPool;
use crate::conn::{PoolStatus, PooledConn, Route, ServerRole};
use crate::error::{ConfigError, Error, ErrorClass, classify};
use crate::exec::contention::Contention;
use crate::exec::retry::{Retries, RetryBudget, RetryPolicy};
use crate::exec::{self, CommitPosition, ConnWork, Source};
use crate::migrate::{MigrationReport, Migrator};
use crate::observe::health::{HealthReport, PrimaryProbe};
use crate::observe::{Observer, QueryHook, prometheus};
use crate::route::{
    CausalToken, Fallback, Floor, Outstanding, ReplicaHealth, ReplicaNode, Router, RoutingConfig,
};

pub use attach::Attachment;
pub use builders::{TransactionBuilder, WriteBuilder};
pub use close::{CLOSE_GRACE, CloseReport};
pub use connect::DatabaseBuilder;
use health::Probes;
pub use health::{MIGRATIONS_PROBE_TTL, PRIMARY_PROBE_TTL, SIZES_PROBE_TTL, SIZES_TOP_TABLES};
pub use replicas::{ReplicaReport, ReplicaState};
pub use session::Session;
#[doc(hidden)]
pub use source::{ConnSource, SourceFuture};

/// Where a `Database`'s connections come from.
enum Connections {
    /// A pool per target, and the router over the replicas: production.
    Pooled {
        // Boxed: a pool carries its queue and shedding counters.
        primary: Box<TargetPool>,
        router: Arc<Router>,
    },
    /// Another source's (see [`ConnSource`]): the test harness's.
    Lent(Arc<dyn ConnSource>),
}

struct Inner {
    retries: Retries,
    config: Arc<Config>,
    connections: Connections,
    observer: Arc<Observer>,
    migrator: Option<Migrator>,
    migrations: Option<MigrationReport>,
    boot_time: Duration,
    probes: Probes,
    /// Closed by [`Database::close`]: what every check-out and connection passes.
    gate: Arc<Gate>,
    /// The report of the close, once one ran (later calls return it).
    closing: tokio::sync::OnceCell<CloseReport>,
    /// The long-running statement watchdog, when one was asked for.
    watchdog: Option<crate::observe::RunningWatchdog>,
    /// The task explaining slow statements, and the plans it keeps.
    planner: Option<crate::observe::RunningWatchdog>,
    plan_store: Option<Arc<crate::observe::PlanStore>>,
    /// What product crates keep on this handle (see [`Attachment`]).
    attachments: attach::Attachments,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The monitors hold only weak references; this stops them at once.
        if let Connections::Pooled { router, .. } = &self.connections {
            router.stop();
        }
    }
}

/// The handle applications keep: cheap to clone, `Send + Sync`.
///
/// # Example
/// ```no_run
/// use diesel_async::RunQueryDsl;
/// use diesel_migrations::{embed_migrations, EmbeddedMigrations};
/// # const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations");
/// # /*
/// const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");
/// # */
///
/// # async fn app() -> Result<(), railyard::Error> {
/// let db = railyard::Database::builder(railyard::Config::from_env()?)
///     .migrations(railyard::Migrator::new(MIGRATIONS))
///     .connect()
///     .await?;
/// let n: i64 = db
///     .with_primary(async |conn| {
///         diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>("1"))
///             .get_result(conn)
///             .await
///             .map_err(railyard::Error::from)
///     })
///     .await?;
/// assert_eq!(n, 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

fn replica_node(router: &Router, index: usize) -> Result<&Arc<ReplicaNode>, Error> {
    router.replicas.get(index).ok_or_else(|| {
        Error::Config(ConfigError::new(
            "replica index",
            index.to_string(),
            format!("{} replicas are configured", router.replicas.len()),
        ))
    })
}

/// What a check-out is for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Want {
    /// The primary.
    Primary,
    /// Replica `i`, in configuration order.
    Replica(usize),
}

impl Database {
    /// Starts building a database handle from a config.
    pub fn builder(config: Config) -> DatabaseBuilder {
        DatabaseBuilder {
            config,
            migrator: None,
            policy: RetryPolicy::default(),
            budget: RetryBudget::default(),
            routing: RoutingConfig::default(),
            hooks: Vec::new(),
            watchdog: None,
            repeats: None,
            plans: None,
            on_plan_change: None,
        }
    }

    /// Builds the pools without running migrations. See [`DatabaseBuilder::connect`].
    pub async fn connect(config: Config) -> Result<Database, Error> {
        Database::builder(config).connect().await
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// What the boot's migration run did, when migrations were configured.
    pub fn migration_report(&self) -> Option<&MigrationReport> {
        self.inner.migrations.as_ref()
    }

    /// How long [`DatabaseBuilder::connect`] took (migrations included).
    pub fn boot_time(&self) -> Duration {
        self.inner.boot_time
    }

    // ---- The one check-out path -------------------------------------------

    /// Hands out a connection for `want`: from the pools, or from the
    /// handle's [`ConnSource`] whatever was asked for. A closed handle
    /// ([`Database::close`]) refuses at once.
    pub(crate) async fn checkout(&self, want: Want) -> Result<PooledConn, Error> {
        let gate = &self.inner.gate;
        if gate.is_closed() {
            return Err(Error::Closed { source: None });
        }
        let (primary, router) = match &self.inner.connections {
            Connections::Lent(source) => return Ok(source.checkout().await?.marked(gate)),
            Connections::Pooled { primary, router } => (&**primary, router),
        };
        let pool = match want {
            Want::Primary => primary,
            Want::Replica(i) => &replica_node(router, i)?.pool,
        };
        match pool.get_owned().await {
            Ok(conn) => Ok(PooledConn::pooled(conn).marked(gate)),
            Err(e) => {
                self.note_failed_checkout(&e);
                Err(e)
            }
        }
    }

    /// A failed check-out counts in the error rate (a refusal of a closing
    /// handle does not: nothing failed).
    fn note_failed_checkout(&self, e: &Error) {
        if !matches!(e, Error::Closed { .. }) {
            self.inner
                .observer
                .metrics
                .record_failed_checkout(e.class());
        }
    }

    /// Where the handle is in its life (see [`Database::close`]).
    pub(crate) fn lifecycle(&self) -> Lifecycle {
        self.inner.gate.lifecycle()
    }

    /// A failure of work on a lease: after the close's deadline, one that the
    /// close caused (judged from the tap) is reported as [`Error::Closed`].
    fn after_close<E: 'static>(
        &self,
        e: E,
        wire: &crate::conn::wire::WireState,
        mark: crate::conn::wire::WireMark,
    ) -> E {
        if self.lifecycle() != Lifecycle::Cancelling {
            return e;
        }
        let class = match wire.error_since(mark) {
            Some(s) => s.class(wire.is_closed()),
            None => classify(None, wire.is_closed()),
        };
        if exec::cancelled_by_close(class) {
            exec::closed_by(e)
        } else {
            e
        }
    }

    /// The replicas, when the handle has pools.
    fn replicas(&self) -> &[Arc<ReplicaNode>] {
        match &self.inner.connections {
            Connections::Pooled { router, .. } => &router.replicas,
            Connections::Lent(_) => &[],
        }
    }

    // ---- Connections --------------------------------------------------------

    /// Checks out a primary connection.
    pub async fn primary(&self) -> Result<PooledConn, Error> {
        self.checkout(Want::Primary).await
    }

    /// Opens a connection to the primary outside the pools, for work that
    /// changes session state the pools must not see (the advisor's
    /// hypothetical indexes and prepared statements). Uninstrumented: it is
    /// not the application's traffic. Closed by dropping it.
    #[doc(hidden)]
    pub async fn dedicated_primary(&self) -> Result<crate::conn::Conn, Error> {
        self.dedicated_opener()?.open().await
    }

    /// The opener behind [`Database::dedicated_primary`], for a crate that
    /// keeps reopening its own connection (a listener). Workspace-internal.
    #[doc(hidden)]
    pub fn dedicated_opener(&self) -> Result<Opener, Error> {
        Ok(Opener::new(
            self.inner.config.primary.clone(),
            self.inner.config.clone(),
            TargetSessionAttrs::ReadWrite,
        )?
        .gated(self.inner.gate.clone()))
    }

    /// The number of configured replicas.
    #[doc(hidden)]
    pub fn replica_count(&self) -> usize {
        self.replicas().len()
    }

    /// Checks out a connection to replica `index` (in configuration order): the
    /// raw access, without routing.
    pub async fn replica(&self, index: usize) -> Result<PooledConn, Error> {
        self.checkout(Want::Replica(index)).await
    }

    /// Runs `f` on a primary connection in autocommit mode (each statement is
    /// its own transaction unless `f` opens one), once: no retries. Prefer
    /// [`Database::write`] or [`Database::transaction`].
    pub async fn with_primary<F: ConnWork>(&self, f: F) -> Result<F::Value, F::Error> {
        let conn = self.checkout(Want::Primary).await?;
        let wire = conn.wire_arc();
        let mark = wire.mark();
        let host = format!("{}:{}", conn.info().host, conn.info().port);
        match run_once(conn, f, self.contention()).await {
            Ok(v) => Ok(v),
            Err(e) => {
                let e = exec::enrich_once(e, &wire, mark, host).await;
                Err(self.after_close(e, &wire, mark))
            }
        }
    }

    // ---- Work ---------------------------------------------------------------

    /// Runs `f` in a transaction on the primary, re-run from the top when a retry
    /// is safe (see [`TransactionBuilder::run`]).
    ///
    /// ```no_run
    /// use diesel_async::RunQueryDsl;
    /// # async fn demo(db: &railyard::Database) -> Result<(), railyard::Error> {
    /// let moved = db
    ///     .transaction(async |conn| {
    ///         diesel::sql_query("UPDATE accounts SET balance_cents = balance_cents - 5 WHERE id = 1")
    ///             .execute(conn)
    ///             .await
    ///             .map_err(railyard::Error::from)
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn transaction<F: ConnWork>(&self, f: F) -> Result<F::Value, F::Error> {
        self.build_transaction().run(f).await
    }

    /// A transaction with options: isolation level, read-only, deferrable,
    /// statement timeout, deadline, retry policy.
    pub fn build_transaction(&self) -> TransactionBuilder<'_> {
        TransactionBuilder::new(self, None)
    }

    /// Runs `f` in autocommit mode on the primary, retried only when safe (see
    /// [`WriteBuilder::run`]).
    pub async fn write<F: ConnWork>(&self, f: F) -> Result<F::Value, F::Error> {
        self.build_write().run(f).await
    }

    /// An autocommit write with options: idempotency, deadline, retry policy.
    pub fn build_write(&self) -> WriteBuilder<'_> {
        WriteBuilder::new(self, None)
    }

    // ---- Reports ------------------------------------------------------------

    /// The captured plans of slow statements, newest first (empty unless
    /// [`DatabaseBuilder::capture_plans`] was used).
    pub fn plans(&self) -> Vec<crate::observe::CapturedPlan> {
        self.inner
            .plan_store
            .as_ref()
            .map(|s| s.plans())
            .unwrap_or_default()
    }

    /// Statements whose captured plan changed and which got slower with it
    /// (at most [`MAX_PLAN_CHANGES`](crate::observe::MAX_PLAN_CHANGES), oldest
    /// first); each is also a warning on target `railyard::plans`.
    pub fn plan_changes(&self) -> Vec<crate::observe::PlanChange> {
        self.inner
            .plan_store
            .as_ref()
            .map(|s| s.changes())
            .unwrap_or_default()
    }

    /// Each replica's monitored state.
    pub fn replica_health(&self) -> Vec<ReplicaHealth> {
        self.replicas().iter().map(|r| r.health()).collect()
    }

    /// Retries made so far, by class.
    pub fn retry_counts(&self) -> Vec<(ErrorClass, u64)> {
        self.inner.retries.counts()
    }

    /// Cumulative figures since the handle was built (queries, their
    /// latencies, failures and retries by class): a sampler diffs two of them
    /// for rates and percentiles of the interval between. No I/O.
    ///
    /// ```no_run
    /// # async fn demo(db: railyard::Database) {
    /// let before = db.activity();
    /// tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    /// let now = db.activity();
    /// println!("{} queries/s, p99 {:?}", now.queries - before.queries, now.latency.quantile_since(&before.latency, 0.99));
    /// # }
    /// ```
    pub fn activity(&self) -> crate::observe::Activity {
        self.inner.observer.metrics.activity(self.retry_counts())
    }

    /// Snapshots of the primary pool and each replica pool.
    pub fn pool_status(&self) -> Vec<PoolStatus> {
        let Connections::Pooled { primary, router } = &self.inner.connections else {
            return Vec::new();
        };
        std::iter::once(&**primary)
            .chain(router.replicas.iter().map(|r| &r.pool))
            .map(TargetPool::status)
            .collect()
    }

    /// The product state of type `T` kept on this handle, made on first use
    /// (see [`Attachment`]). Clones of the handle share it.
    pub fn attachment<T: Attachment + Default>(&self) -> Arc<T> {
        self.inner.attachments.get_or_default::<T>()
    }

    // ---- Another source's connections -----------------------------------------

    /// A `Database` whose every route takes its connections from `source`
    /// (the test harness's), with no retries, pools or monitors.
    /// Workspace-internal.
    #[doc(hidden)]
    pub fn with_source(config: Config, source: Arc<dyn ConnSource>, migrator: Migrator) -> Self {
        Database {
            inner: Arc::new(Inner {
                retries: Retries::new(RetryPolicy::never(), RetryBudget::default()),
                config: Arc::new(config),
                connections: Connections::Lent(source),
                observer: Arc::new(Observer::default()),
                migrator: Some(migrator),
                migrations: None,
                boot_time: Duration::ZERO,
                probes: Probes::default(),
                gate: Arc::default(),
                closing: tokio::sync::OnceCell::new(),
                watchdog: None,
                planner: None,
                plan_store: None,
                attachments: Default::default(),
            }),
        }
    }

    /// The source of a handle made with [`Database::with_source`].
    /// Workspace-internal.
    #[doc(hidden)]
    pub fn source(&self) -> Option<&dyn ConnSource> {
        match &self.inner.connections {
            Connections::Lent(source) => Some(&**source),
            Connections::Pooled { .. } => None,
        }
    }
}

/// Work run once on a connection: a savepoint when enclosed, else as is.
async fn run_once<F: ConnWork>(
    mut conn: PooledConn,
    f: F,
    contention: Option<&Contention>,
) -> Result<F::Value, F::Error> {
    if conn.enclosed() {
        return exec::in_savepoint(conn, f, false, None, contention)
            .await
            .map(|(v, _)| v)
            .map_err(exec::Failed::into_error);
    }
    f(&mut conn).await
}

impl Source for Database {
    fn checkout_primary(&self) -> impl Future<Output = Result<PooledConn, Error>> + Send {
        self.checkout(Want::Primary)
    }

    fn reroute_primary(&self) {
        if let Connections::Pooled { primary, .. } = &self.inner.connections {
            primary.reroute();
        }
    }

    fn retries(&self) -> &Retries {
        &self.inner.retries
    }

    fn transaction_statement_timeout(&self) -> Option<Duration> {
        let config = &self.inner.config;
        config
            .pooler
            .per_transaction()
            .then_some(config.statement_timeout)
            .flatten()
    }

    fn contention(&self) -> Option<&Contention> {
        match &self.inner.connections {
            Connections::Lent(source) => source.contention(),
            Connections::Pooled { .. } => None,
        }
    }

    fn lifecycle(&self) -> Lifecycle {
        Database::lifecycle(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn _handles_are_send_and_sync() {
        fn check<T: Send + Sync + Clone>() {}
        check::<Database>();
    }
}
