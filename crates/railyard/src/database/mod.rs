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
use crate::observe::health::{self, HealthReport, PrimaryProbe};
use crate::observe::{Observer, QueryHook, prometheus};
use crate::route::{
    CausalToken, Fallback, Floor, Outstanding, ReplicaHealth, ReplicaNode, Router, RoutingConfig,
};

pub use attach::Attachment;
pub use builders::{TransactionBuilder, WriteBuilder};
pub use close::{CLOSE_GRACE, CloseReport};
pub use session::Session;
#[doc(hidden)]
pub use source::{ConnSource, SourceFuture};

/// Builds a [`Database`]: pools, and migrations at boot.
#[must_use = "a builder does nothing until `connect` is called"]
pub struct DatabaseBuilder {
    config: Config,
    migrator: Option<Migrator>,
    policy: RetryPolicy,
    budget: RetryBudget,
    routing: RoutingConfig,
    hooks: Vec<Arc<dyn QueryHook>>,
    watchdog: Option<crate::observe::Watchdog>,
    repeats: Option<u32>,
    plans: Option<crate::observe::PlanCapture>,
    on_plan_change: Option<crate::observe::ChangeHook>,
}

impl fmt::Debug for DatabaseBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseBuilder")
            .field("config", &self.config)
            .field("migrator", &self.migrator)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl DatabaseBuilder {
    /// Runs these migrations at boot, before the pools serve. Defaults to none.
    pub fn migrations(mut self, migrator: Migrator) -> Self {
        self.migrator = Some(migrator);
        self
    }

    /// Attempts and backoff of `transaction` and `write`. Defaults to
    /// [`RetryPolicy::default`] (10 attempts, 5 ms to 1 s full-jitter backoff).
    pub fn retry_policy(mut self, p: RetryPolicy) -> Self {
        self.policy = p;
        self
    }

    /// The retry budget shared by every operation of this `Database`. Defaults to
    /// [`RetryBudget::default`] (20 % of recent work plus 10 per second).
    pub fn retry_budget(mut self, b: RetryBudget) -> Self {
        self.budget = b;
        self
    }

    /// How reads are routed to replicas and when replicas are ejected. Defaults
    /// to [`RoutingConfig::default`].
    pub fn routing(mut self, r: RoutingConfig) -> Self {
        self.routing = r;
        self
    }

    /// Registers a hook that sees every finished query (hooks must be cheap:
    /// see [`QueryHook`]). Built-in hooks: [`crate::SlowQueryLog`],
    /// [`crate::StatementStats`], [`crate::QuerySpans`], [`crate::AuditLog`].
    pub fn hook(mut self, hook: impl QueryHook) -> Self {
        self.hooks.push(Arc::new(hook));
        self
    }

    /// Captures the plans of statements slower than the capture's threshold,
    /// off the request path: the caller never waits; a task on one dedicated
    /// connection explains a generic form of each statement (see
    /// [`PlanCapture`](crate::observe::PlanCapture)) and keeps the newest
    /// plan per statement shape, with every constant replaced
    /// ([`Database::plans`]).
    ///
    /// Without this call, the configuration's
    /// [`Config::capture_plans_slower_than`] (`RAILYARD_CAPTURE_PLANS_SLOWER_THAN`)
    /// applies, when set.
    ///
    /// ```no_run
    /// # async fn demo(config: railyard::Config) -> Result<(), railyard::Error> {
    /// use std::time::Duration;
    /// let db = railyard::Database::builder(config)
    ///     .capture_plans(railyard::observe::PlanCapture::slower_than(Duration::from_millis(200)))
    ///     .connect()
    ///     .await?;
    /// for plan in db.plans() {
    ///     println!("{}: {:?} (cost {:.0})", plan.statement, plan.nodes, plan.total_cost);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn capture_plans(mut self, p: crate::observe::PlanCapture) -> Self {
        self.plans = Some(p);
        self
    }

    /// Calls `f` with each plan change (see [`Database::plan_changes`]): a
    /// statement whose captured plan changed structure and which ran
    /// [`plan_change_slowdown`](crate::observe::PlanCapture::plan_change_slowdown)
    /// times slower under it. Called on the plan-capture task, never on the
    /// request path; it should be quick (send to a channel, page someone).
    /// Needs [`capture_plans`](DatabaseBuilder::capture_plans) (or
    /// [`Config::capture_plans_slower_than`]).
    ///
    /// ```no_run
    /// # async fn demo(config: railyard::Config) -> Result<(), railyard::Error> {
    /// use std::time::Duration;
    /// let db = railyard::Database::builder(config)
    ///     .capture_plans(railyard::observe::PlanCapture::slower_than(Duration::from_millis(100)))
    ///     .on_plan_change(|c| eprintln!("{} now runs {:?}", c.statement, c.after))
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn on_plan_change(
        mut self,
        f: impl Fn(&crate::observe::PlanChange) + Send + Sync + 'static,
    ) -> Self {
        self.on_plan_change = Some(crate::observe::ChangeHook(Arc::new(f)));
        self
    }

    /// Warns (target `railyard::n_plus_one`) when the same statement, its
    /// constants and parameters aside, runs `threshold` times (at least 2) in
    /// one operation: one check-out of a connection, or one top-level
    /// transaction (each attempt of a retried one counts on its own). The
    /// warning names the statement's shape, never a value. Each statement is
    /// then formatted and normalised as hooks do, so this has the cost of a
    /// hook; it suits development and test more than production.
    ///
    /// Without this call, the configuration's [`Config::detect_repeats`]
    /// (`RAILYARD_DETECT_REPEATS`) applies, when set.
    ///
    /// ```no_run
    /// # async fn demo(config: railyard::Config) -> Result<(), railyard::Error> {
    /// let db = railyard::Database::builder(config).detect_repeats(20).connect().await?;
    /// # Ok(()) }
    /// ```
    pub fn detect_repeats(mut self, threshold: u32) -> Self {
        self.repeats = Some(threshold.max(2));
        self
    }

    /// Runs the long-running statement watchdog: statements of this
    /// application (its `application_name`) that run longer than the
    /// watchdog's limit are cancelled, and their shape (never a value) is
    /// logged on target `railyard::audit`. It uses one dedicated connection
    /// and stops when the handle closes.
    ///
    /// Without this call, the configuration's
    /// [`Config::watchdog_cancel_after`] (`RAILYARD_WATCHDOG_CANCEL_AFTER`)
    /// applies, when set.
    ///
    /// ```no_run
    /// # async fn demo(config: railyard::Config) -> Result<(), railyard::Error> {
    /// use std::time::Duration;
    /// let db = railyard::Database::builder(config)
    ///     .watchdog(railyard::observe::Watchdog::cancel_after(Duration::from_secs(30)))
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn watchdog(mut self, w: crate::observe::Watchdog) -> Self {
        self.watchdog = Some(w);
        self
    }

    /// Validates the config, runs the migrations (if any) on a dedicated
    /// connection, opens the first primary connection (so a wrong password or an
    /// unreachable server fails here, with its SQLSTATE), and builds the pools.
    pub async fn connect(self) -> Result<Database, Error> {
        let started = Instant::now();
        self.config.validate()?;
        let insights = self.insights();
        let config = Arc::new(resolve_local(self.config).await?);
        let migrations = match &self.migrator {
            Some(m) => Some(m.run(&config).await?),
            None => None,
        };
        let (plan_store, plan_queue) = match insights.plans {
            Some(p) => {
                let (store, rx) = crate::observe::PlanStore::new(p, self.on_plan_change);
                (Some(Arc::new(store)), Some(rx))
            }
            None => (None, None),
        };
        let observer = Arc::new(Observer {
            hooks: self.hooks,
            metrics: Default::default(),
            repeats: insights.repeats,
            plans: plan_store.clone(),
        });
        // Every connection of this handle passes its gate (see `close`).
        let gate = Arc::new(Gate::default());
        // Monitors use uninstrumented openers: their polling is not the
        // application's traffic.
        let monitor = Opener::new(
            config.primary.clone(),
            config.clone(),
            TargetSessionAttrs::ReadWrite,
        )?
        .gated(gate.clone());
        let opener = monitor.clone().observed(observer.clone(), Route::Primary);
        let mut first = opener.open().await?;
        let mut replicas = Vec::new();
        let mut openers = Vec::new();
        for target in &config.replicas {
            let name: Arc<str> = replica_name(target).into();
            let route = Route::Replica(name.clone());
            // The monitor's opener shares the pool's breaker but not its
            // instrumentation: its polling is not the application's traffic
            // (statistics, hooks, the error rate, the dashboard).
            let watching = Opener::new(target.clone(), config.clone(), TargetSessionAttrs::Any)?
                .gated(gate.clone());
            let replica = watching.clone().observed(observer.clone(), route.clone());
            let pool = TargetPool::build(
                route,
                replica.clone(),
                config.replica_pool_max_size,
                &config,
            );
            openers.push(replica.clone());
            replicas.push(Arc::new(ReplicaNode::new(name, pool, watching)));
        }
        check_replicas_at_boot(&config, &mut first, &replicas, &openers).await?;
        let primary = TargetPool::build(Route::Primary, opener, config.pool.max_size, &config);
        primary.add(first);
        let router = Arc::new(Router::new(replicas, self.routing));
        let watchdog = insights.watchdog.map(|w| {
            let name = config.effective_application_name().to_owned();
            crate::observe::spawn_watchdog(w, monitor.clone(), name)
        });
        let planner = plan_store
            .clone()
            .zip(plan_queue)
            .map(|(store, rx)| crate::observe::spawn_plans(store, rx, monitor.clone()));
        Router::spawn_monitors(&router, monitor);
        Ok(Database {
            inner: Arc::new(Inner {
                retries: Retries::new(self.policy, self.budget),
                config,
                connections: Connections::Pooled {
                    primary: Box::new(primary),
                    router,
                },
                observer,
                migrator: self.migrator,
                migrations,
                boot_time: started.elapsed(),
                probes: Probes::default(),
                gate,
                closing: tokio::sync::OnceCell::new(),
                watchdog,
                planner,
                plan_store,
                attachments: Default::default(),
            }),
        })
    }
}

impl DatabaseBuilder {
    /// The query-insight features to run: each builder call made, else the
    /// configuration's setting (`RAILYARD_WATCHDOG_CANCEL_AFTER`,
    /// `RAILYARD_DETECT_REPEATS`, `RAILYARD_CAPTURE_PLANS_SLOWER_THAN`).
    fn insights(&self) -> Insights {
        let config = &self.config;
        Insights {
            watchdog: self.watchdog.or_else(|| {
                config
                    .watchdog_cancel_after
                    .map(crate::observe::Watchdog::cancel_after)
            }),
            repeats: self.repeats.or(config.detect_repeats),
            plans: self.plans.or_else(|| {
                config
                    .capture_plans_slower_than
                    .map(crate::observe::PlanCapture::slower_than)
            }),
        }
    }
}

/// The query-insight features a [`DatabaseBuilder`] starts.
#[derive(Debug, PartialEq)]
struct Insights {
    watchdog: Option<crate::observe::Watchdog>,
    repeats: Option<u32>,
    plans: Option<crate::observe::PlanCapture>,
}

/// A configuration that stands for the local cluster (no `DATABASE_URL`, in
/// the development or test profile) is refused here: `railyard-local`'s
/// `LocalCluster::resolve` points it at a cluster first.
async fn resolve_local(config: Config) -> Result<Config, Error> {
    if config.local_database().is_none() {
        return Ok(config);
    }
    Err(ConfigError::hidden(
        "DATABASE_URL",
        format!(
            "not set; in the {} profile a local PostgreSQL cluster can stand in for it: point the config at one with the railyard-local crate (`railyard_local::resolve(config).await?`), or set DATABASE_URL",
            config.profile()
        ),
    )
    .into())
}

/// Opens one connection to each replica, at once and within the connect
/// timeout, and keeps it in the replica's pool. A replica that is not in
/// recovery is either the primary itself under another name (`localhost`
/// and `127.0.0.1`, say): refused, since every "replica" read would be a
/// primary read and the report would be a lie; or another server that is a
/// primary of its own (promoted, or never a standby): warned about, and it
/// gets no reads until it is a standby. A replica that cannot be reached is
/// left to its monitor.
async fn check_replicas_at_boot(
    config: &Config,
    primary: &mut crate::conn::Conn,
    replicas: &[Arc<ReplicaNode>],
    openers: &[Opener],
) -> Result<(), Error> {
    let bound = config.connect_timeout;
    let opened = futures_util::future::join_all(
        openers
            .iter()
            .map(|o| tokio::time::timeout(bound, o.open())),
    )
    .await;
    let mut primary_identity = None;
    for (i, (node, conn)) in replicas.iter().zip(opened).enumerate() {
        let mut conn = match conn {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(target: "railyard::route", replica = %node.name, error = %e, "replica unreachable at boot; it gets no reads until it answers");
                continue;
            }
            Err(_) => {
                tracing::warn!(target: "railyard::route", replica = %node.name, timeout = ?bound, "replica did not answer at boot; it gets no reads until it answers");
                continue;
            }
        };
        if conn.info().role == ServerRole::Standby {
            node.pool.add(conn);
            continue;
        }
        if primary_identity.is_none() {
            primary_identity = Some(server_identity(primary).await);
        }
        let replica_identity = server_identity(&mut conn).await;
        if let (Some(Ok(p)), Ok(r)) = (&primary_identity, &replica_identity)
            && p == r
        {
            return Err(ConfigError::hidden(
                config.target_field(i + 1),
                format!(
                    "{} reaches the primary itself (the server at {}, under another name), not a standby; list the replicas' servers",
                    node.name,
                    replica_name(&config.primary),
                ),
            )
            .into());
        }
        tracing::warn!(
            target: "railyard::route",
            replica = %node.name,
            "replica is not in recovery: it is a primary of its own (promoted, or never a standby); it gets no reads until it is a standby again"
        );
    }
    Ok(())
}

/// What tells two servers apart: the cluster's system identifier (shared by
/// a primary and its physical standbys) and when its postmaster started.
async fn server_identity(conn: &mut crate::conn::Conn) -> Result<(String, String), Error> {
    #[derive(QueryableByName)]
    struct Identity {
        #[diesel(sql_type = diesel::sql_types::Text)]
        system: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        started: String,
    }
    let id: Identity = diesel::sql_query(
        "SELECT system_identifier::text AS system, pg_postmaster_start_time()::text AS started FROM pg_control_system()",
    )
    .get_result(&mut **conn)
    .await?;
    Ok((id.system, id.started))
}

fn replica_name(t: &ConnectTarget) -> String {
    t.hosts()
        .iter()
        .map(|(h, p)| format!("{h}:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

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

/// How long the primary's health answer is reused ([`Database::health`] and
/// [`Database::readiness`]): a storm of probes costs one round trip per period,
/// on a pooled connection.
pub const PRIMARY_PROBE_TTL: Duration = Duration::from_secs(1);

/// How long the migrations' health answer is reused: it changes only when a
/// deployment migrates.
pub const MIGRATIONS_PROBE_TTL: Duration = Duration::from_secs(5);

/// Health answers reused for a short time; concurrent probes wait for the one
/// computation in progress instead of starting their own.
#[derive(Default)]
struct Probes {
    /// Probes that went to the server (`railyard_health_probes_total`), each
    /// one to a few statements: Railyard's own, not the application's
    /// traffic, so the query metrics do not count them.
    ran: std::sync::atomic::AtomicU64,
    primary: tokio::sync::Mutex<Option<(Instant, health::HealthCheck)>>,
    migrations: tokio::sync::Mutex<Option<(Instant, Option<health::HealthCheck>)>>,
    sizes: tokio::sync::Mutex<Option<(Instant, Option<crate::observe::StorageFigures>)>>,
}

/// How long a measurement of the database's size and its largest tables is
/// reused ([`Database::storage_figures`], `/health`, `/metrics`): sizes change
/// slowly, and measuring costs a catalog scan on the primary.
pub const SIZES_PROBE_TTL: Duration = Duration::from_secs(60);

/// How many of the largest tables a size measurement reports (partitioned
/// tables counted with their partitions).
pub const SIZES_TOP_TABLES: i64 = 10;

#[derive(QueryableByName)]
struct MeasuredTable {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    bytes: i64,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    archived: bool,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    database: i64,
}

/// The database's size and its largest tables (a partitioned table with its
/// partitions; `railyard_archive` counts as archive).
const MEASURE_SIZES: &str = "SELECT n.nspname || '.' || c.relname AS name, \
       (SELECT coalesce(sum(pg_total_relation_size(t.relid)), 0) FROM pg_partition_tree(c.oid) t)::bigint AS bytes, \
       n.nspname = 'railyard_archive' AS archived, \
       pg_database_size(current_database())::bigint AS database \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
       AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%' \
     ORDER BY bytes DESC, name LIMIT $1";

async fn cached<T: Clone>(
    slot: &tokio::sync::Mutex<Option<(Instant, T)>>,
    ttl: Duration,
    compute: impl Future<Output = T>,
) -> T {
    let mut held = slot.lock().await;
    if let Some((at, value)) = &*held
        && at.elapsed() < ttl
    {
        return value.clone();
    }
    let value = compute.await;
    *held = Some((Instant::now(), value.clone()));
    value
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

/// A connection for a read, and what it promises.
struct ReadLease {
    conn: PooledConn,
    route: Route,
    /// The replica it came from, so a failure can be judged.
    node: Option<Arc<ReplicaNode>>,
    /// The oldest data this read may return (what the session may assume after).
    seen: Floor,
    /// Counts the read in flight on its replica while it lives.
    _outstanding: Option<Outstanding>,
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

    /// A connection for a read at or past `floor`: a caught-up replica, else
    /// the primary (per the routing config's [`Fallback`]); a lent handle's
    /// source decides for itself.
    async fn checkout_read(&self, floor: Floor) -> Result<ReadLease, Error> {
        if self.inner.gate.is_closed() {
            return Err(Error::Closed { source: None });
        }
        let router = match &self.inner.connections {
            Connections::Pooled { router, .. } => router,
            Connections::Lent(source) => {
                let (conn, route) = source.checkout_read(floor != Floor::Any).await?;
                return Ok(ReadLease {
                    conn,
                    route,
                    node: None,
                    seen: floor,
                    _outstanding: None,
                });
            }
        };
        let mut floor = router.resolve(floor);
        let mut choice = router.choose(floor);
        if choice.is_none()
            && let Floor::At(_) | Floor::Sampled { .. } = floor
            && let Fallback::Wait(bound) = router.config.fallback
        {
            let deadline = tokio::time::Instant::now() + bound;
            while choice.is_none() && tokio::time::Instant::now() < deadline {
                router
                    .changed(deadline.saturating_duration_since(tokio::time::Instant::now()))
                    .await;
                floor = router.resolve(floor);
                choice = router.choose(floor);
            }
        }
        if let Some((node, outstanding)) = choice {
            // Cached before the read: the data read includes at least this.
            let seen = match node.replay_lsn() {
                0 => floor,
                lsn => floor.max(Floor::At(PgLsn::from(lsn))),
            };
            match node.pool.get_owned().await {
                Ok(conn) => {
                    return Ok(ReadLease {
                        conn: PooledConn::pooled(conn).marked(&self.inner.gate),
                        route: Route::Replica(node.name.clone()),
                        node: Some(node),
                        seen,
                        _outstanding: Some(outstanding),
                    });
                }
                // A busy replica is not a failing one, and its overflow does
                // not belong on the primary: the caller hears "busy".
                Err(e @ (Error::Overloaded { .. } | Error::Closed { .. })) => {
                    self.note_failed_checkout(&e);
                    return Err(e);
                }
                Err(e) => node.note_failure(e.to_string()),
            }
        }
        Ok(ReadLease {
            conn: self.checkout(Want::Primary).await?,
            route: Route::Primary,
            node: None,
            seen: floor,
            _outstanding: None,
        })
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

    /// Reads, on a healthy replica when there is one (round-robin or least
    /// outstanding), else on the primary. Without a [`Session`] there is no
    /// read-your-writes guarantee: use [`Database::session`] after writes.
    /// A read that fails on a replica because of the replica (its connection,
    /// a recovery conflict) runs again on the primary; one whose primary
    /// connection was lost under it (reset, closed, given up as stalled)
    /// runs again on a new connection, within the retry policy and budget.
    /// Any other failure is returned as it is.
    pub async fn read<F: ConnWork>(&self, f: F) -> Result<F::Value, F::Error> {
        self.read_at(Floor::Any, f).await.map(|(v, _, _)| v)
    }

    /// Like [`Database::read`], and says where the read ran.
    pub async fn read_routed<F: ConnWork>(&self, f: F) -> Result<(F::Value, Route), F::Error> {
        self.read_at(Floor::Any, f).await.map(|(v, r, _)| (v, r))
    }

    /// A new session (read-your-writes, monotonic reads).
    pub fn session(&self) -> Session {
        Session::new(self.clone(), Floor::Any)
    }

    /// A session that continues from a token, typically from another request.
    pub fn session_from(&self, token: CausalToken) -> Session {
        Session::new(self.clone(), Floor::At(token.lsn()))
    }

    /// Where a read would go now, for a session at `token` (or any session when
    /// `None`): the routing decision alone, from cached figures, no I/O.
    pub fn route_for_read(&self, token: Option<CausalToken>) -> Route {
        let floor = token.map_or(Floor::Any, |t| Floor::At(t.lsn()));
        let Connections::Pooled { router, .. } = &self.inner.connections else {
            return Route::Replica("test-connection".into());
        };
        match router.choose(floor) {
            Some((node, _outstanding)) => Route::Replica(node.name.clone()),
            None => Route::Primary,
        }
    }

    /// Runs a read at or past `floor`. Returns the value, the route, and the
    /// floor the data is known to include.
    pub(crate) async fn read_at<F: ConnWork>(
        &self,
        floor: Floor,
        f: F,
    ) -> Result<(F::Value, Route, Floor), F::Error> {
        let lease = self.checkout_read(floor).await?;
        let wire = lease.conn.wire_arc();
        let mark = wire.mark();
        self.read_on(lease, floor, f)
            .await
            .map_err(|e| self.after_close(e, &wire, mark))
    }

    /// Runs a read on its lease (see [`Database::read_at`]).
    async fn read_on<F: ConnWork>(
        &self,
        lease: ReadLease,
        floor: Floor,
        f: F,
    ) -> Result<(F::Value, Route, Floor), F::Error> {
        if lease.conn.enclosed() {
            let (v, _) = exec::in_savepoint(lease.conn, f, false, None, self.contention())
                .await
                .map_err(exec::Failed::into_error)?;
            return Ok((v, lease.route, lease.seen));
        }
        let ReadLease {
            mut conn,
            route,
            node,
            seen,
            _outstanding,
        } = lease;
        let Some(node) = node else {
            // (A harness's stale-replica read has no node either.)
            if route != Route::Primary {
                return Ok((f(&mut conn).await?, route, seen));
            }
            let v = self.read_on_primary(conn, f).await?;
            return Ok((v, route, self.after_primary_read(seen)));
        };
        let wire = conn.wire_arc();
        let mark = wire.mark();
        match f.clone()(&mut conn).await {
            Ok(v) => Ok((v, route, seen)),
            Err(e) => {
                let server = wire.error_since(mark);
                let class = match &server {
                    Some(s) => s.class(wire.is_closed()),
                    None => classify(None, wire.is_closed()),
                };
                drop(conn);
                // A closing handle starts nothing new, and a replica that
                // failed because of the close is not at fault.
                if self.lifecycle() != Lifecycle::Open || !node.after_failed_read(class) {
                    return Err(e);
                }
                let mut conn = self.checkout(Want::Primary).await?;
                let v = f(&mut conn).await?;
                Ok((v, Route::Primary, self.after_primary_read(floor)))
            }
        }
    }

    /// Runs a read on a primary connection, again on a new one when the
    /// connection was lost (see `exec::read_primary`).
    async fn read_on_primary<F: ConnWork>(
        &self,
        conn: PooledConn,
        f: F,
    ) -> Result<F::Value, F::Error> {
        exec::read_primary(self, conn, f).await
    }

    /// The floor after a read on the primary, which just ended. The primary's
    /// data is the newest: a causal session must not read older data
    /// afterwards (monotonic reads), not even other sessions' commits that
    /// its floor does not cover. That needs a position past everything the
    /// read saw, and asking the read's connection for one would cost a round
    /// trip on every fallback read. A position sampled *before* the read is
    /// not enough (it may predate commits the read saw); one sampled after
    /// is. So the floor becomes [`Floor::Sampled`]: the primary's position at
    /// the primary monitor's next sample (within a check interval), and until
    /// then the session reads from the primary, which costs no round trip
    /// more than a replica. No I/O here.
    fn after_primary_read(&self, floor: Floor) -> Floor {
        match &self.inner.connections {
            Connections::Pooled { router, .. } => router.after_primary_read(floor),
            Connections::Lent(_) => floor,
        }
    }

    /// `floor`, resolved from the monitors' figures when it waited for a
    /// sample of the primary's position (see [`Floor::Sampled`]); no I/O.
    pub(crate) fn resolve_floor(&self, floor: Floor) -> Floor {
        match &self.inner.connections {
            Connections::Pooled { router, .. } => router.resolve(floor),
            Connections::Lent(_) => floor,
        }
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

    /// Probes each replica: reachable, in recovery, streaming, and its lag.
    pub async fn replica_report(&self) -> Vec<ReplicaReport> {
        #[derive(QueryableByName)]
        struct Position {
            #[diesel(sql_type = diesel::pg::sql_types::PgLsn)]
            lsn: diesel::pg::data_types::PgLsn,
        }
        #[derive(QueryableByName)]
        struct Probe {
            #[diesel(sql_type = diesel::sql_types::Bool)]
            in_recovery: bool,
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::pg::sql_types::PgLsn>)]
            replay_lsn: Option<diesel::pg::data_types::PgLsn>,
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
            receiver: Option<String>,
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
            delay_secs: Option<f64>,
        }
        let primary_lsn = match self.checkout(Want::Primary).await {
            Ok(mut c) => diesel::sql_query("SELECT pg_current_wal_lsn() AS lsn")
                .get_result::<Position>(&mut **c)
                .await
                .ok()
                .map(|p| p.lsn.0),
            Err(_) => None,
        };
        let mut out = Vec::new();
        for (i, target) in self.inner.config.replicas.iter().enumerate() {
            let probe = async {
                let mut c = self.checkout(Want::Replica(i)).await?;
                let p: Probe = diesel::sql_query(
                    "SELECT pg_is_in_recovery() AS in_recovery, pg_last_wal_replay_lsn() AS replay_lsn, \
                     (SELECT status FROM pg_stat_wal_receiver LIMIT 1) AS receiver, \
                     extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS delay_secs",
                )
                .get_result(&mut **c)
                .await?;
                Ok::<_, Error>(p)
            };
            let state = match probe.await {
                Ok(p) => ReplicaState::Reachable {
                    role: if p.in_recovery {
                        ServerRole::Standby
                    } else {
                        ServerRole::Primary
                    },
                    streaming: p.receiver.as_deref() == Some("streaming"),
                    lag_bytes: match (primary_lsn, p.replay_lsn.map(|l| l.0)) {
                        (Some(a), Some(b)) => Some(a.saturating_sub(b)),
                        _ => None,
                    },
                    replay_delay: p.delay_secs.map(|s| Duration::from_secs_f64(s.max(0.0))),
                },
                Err(e) => ReplicaState::Unreachable {
                    error: e.to_string(),
                },
            };
            out.push(ReplicaReport {
                target: target.to_string(),
                state,
            });
        }
        out
    }

    /// Checks the primary (a round trip, timed), each replica (from the monitor's
    /// figures), the migrations (when the database was built with them), pool
    /// saturation, the error rate of the last minute by class, and the circuit
    /// breakers.
    ///
    /// ```no_run
    /// # async fn demo(db: railyard::Database) {
    /// use railyard::observe::HealthStatus;
    /// let report = db.health().await;
    /// if report.status != HealthStatus::Healthy {
    ///     for c in &report.checks {
    ///         eprintln!("{}: {:?} — {}", c.name, c.status, c.reason);
    ///     }
    /// }
    /// # }
    /// ```
    ///
    /// The primary's answer is reused for [`PRIMARY_PROBE_TTL`] and the
    /// migrations' for [`MIGRATIONS_PROBE_TTL`]; both use pooled connections.
    pub async fn health(&self) -> HealthReport {
        if self.is_closed() {
            return HealthReport::of(vec![health::closed()]);
        }
        let mut checks = vec![self.primary_check().await];
        if let Some(c) = self.migration_check().await {
            checks.push(c);
        }
        checks.extend(self.replica_health().iter().map(health::replica));
        checks.extend(self.pool_status().iter().map(health::pool));
        checks.push(health::errors(&self.inner.observer.metrics));
        if let Some(store) = &self.inner.plan_store {
            checks.push(health::plans(store.plans().len(), &store.changes()));
        }
        for a in self.inner.attachments.each() {
            checks.extend(a.health_checks());
        }
        if let Some(f) = self.storage_figures().await {
            checks.push(crate::observe::storage_check(&f));
        }
        HealthReport::of(checks)
    }

    /// Ready to serve: the primary answers and the migrations are current
    /// (answers reused as in [`Database::health`]).
    pub async fn readiness(&self) -> HealthReport {
        if self.is_closed() {
            return HealthReport::of(vec![health::closed()]);
        }
        let mut checks = vec![self.primary_check().await];
        if let Some(c) = self.migration_check().await {
            checks.push(c);
        }
        HealthReport::of(checks)
    }

    async fn primary_check(&self) -> health::HealthCheck {
        cached(&self.inner.probes.primary, PRIMARY_PROBE_TTL, async {
            health::primary(self.probe_primary().await)
        })
        .await
    }

    async fn probe_primary(&self) -> PrimaryProbe {
        const BOUND: Duration = Duration::from_secs(2);
        let started = Instant::now();
        let probe = async {
            let mut conn = self.probe_checkout().await?;
            let _quiet = crate::conn::Quiet::new(&conn);
            conn.batch_execute("SELECT 1").await?;
            Ok::<_, Error>(())
        };
        match tokio::time::timeout(BOUND, probe).await {
            Ok(Ok(())) => PrimaryProbe::Answered(started.elapsed()),
            Ok(Err(e)) => PrimaryProbe::Failed(e.to_string()),
            Err(_) => PrimaryProbe::Silent(BOUND),
        }
    }

    /// A primary connection for a health probe, counted as one.
    async fn probe_checkout(&self) -> Result<PooledConn, Error> {
        let conn = self.checkout(Want::Primary).await?;
        self.inner
            .probes
            .ran
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(conn)
    }

    async fn migration_check(&self) -> Option<health::HealthCheck> {
        let migrator = self.inner.migrator.as_ref()?;
        const BOUND: Duration = Duration::from_secs(5);
        cached(&self.inner.probes.migrations, MIGRATIONS_PROBE_TTL, async {
            let read = async {
                let mut conn = self.probe_checkout().await?;
                let _quiet = crate::conn::Quiet::new(&conn);
                migrator.status_on(&mut conn).await
            };
            let rows = match tokio::time::timeout(BOUND, read).await {
                Ok(Ok(rows)) => Ok(rows),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {BOUND:?}")),
            };
            Some(health::migrations(rows))
        })
        .await
    }

    /// Prometheus text exposition of query durations (OpenTelemetry's bucket
    /// bounds), pool gauges, retries and errors by class, and replica lag.
    pub fn metrics_text(&self) -> String {
        let mut text = prometheus::render(&prometheus::Figures {
            metrics: &self.inner.observer.metrics,
            retries: self.retry_counts(),
            pools: self.pool_status(),
            replicas: self.replica_health(),
        });
        for a in self.inner.attachments.each() {
            a.metrics_text(&mut text);
        }
        text.push_str(&format!(
            "# HELP railyard_health_probes_total Health probes that went to the primary (not counted as queries).\n\
             # TYPE railyard_health_probes_total counter\n\
             railyard_health_probes_total {}\n",
            std::sync::atomic::AtomicU64::load(
                &self.inner.probes.ran,
                std::sync::atomic::Ordering::Relaxed
            )
        ));
        if let Some(f) = self.storage().or_else(|| self.measured_sizes()) {
            crate::observe::render_storage(&mut text, &f);
        }
        text
    }

    /// The product state of type `T` kept on this handle, made on first use
    /// (see [`Attachment`]). Clones of the handle share it.
    pub fn attachment<T: Attachment + Default>(&self) -> Arc<T> {
        self.inner.attachments.get_or_default::<T>()
    }

    /// The storage figures `/health` and `/metrics` show: the retention
    /// job's when one recorded them (they carry its threshold and verdict),
    /// otherwise a measurement of the database's size and its
    /// [largest tables](SIZES_TOP_TABLES) on the primary, taken at most once
    /// per [`SIZES_PROBE_TTL`] (concurrent callers wait for the one in
    /// progress), bounded by 5 s. `None` when it cannot be measured. Called
    /// by [`Database::health`] and the `/metrics` endpoint, never by queries.
    pub async fn storage_figures(&self) -> Option<crate::observe::StorageFigures> {
        if let Some(f) = self.storage() {
            return Some(f);
        }
        const BOUND: Duration = Duration::from_secs(5);
        cached(&self.inner.probes.sizes, SIZES_PROBE_TTL, async {
            let read = async {
                let mut conn = self.probe_checkout().await?;
                let _quiet = crate::conn::Quiet::new(&conn);
                diesel::sql_query(MEASURE_SIZES)
                    .bind::<diesel::sql_types::BigInt, _>(SIZES_TOP_TABLES)
                    .load::<MeasuredTable>(&mut **conn)
                    .await
                    .map_err(Error::from)
            };
            match tokio::time::timeout(BOUND, read).await {
                Ok(Ok(rows)) => {
                    let database = <[MeasuredTable]>::first(&rows).map_or(0, |r| r.database);
                    let tables = rows
                        .into_iter()
                        .map(|r| {
                            crate::observe::TableSize::new(
                                r.name,
                                u64::try_from(r.bytes).unwrap_or(0),
                                r.archived,
                            )
                        })
                        .collect();
                    Some(crate::observe::StorageFigures::new(
                        u64::try_from(database).unwrap_or(0),
                        tables,
                        None,
                    ))
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cannot measure the database's size");
                    None
                }
                Err(_) => None,
            }
        })
        .await
    }

    /// The last size measurement of [`Database::storage_figures`], if one is
    /// cached and not being taken right now.
    fn measured_sizes(&self) -> Option<crate::observe::StorageFigures> {
        self.inner
            .probes
            .sizes
            .try_lock()
            .ok()
            .and_then(|g| g.as_ref().and_then(|(_, f)| f.clone()))
    }

    /// The storage figures an attachment recorded (a retention job's).
    pub fn storage(&self) -> Option<crate::observe::StorageFigures> {
        self.inner
            .attachments
            .each()
            .iter()
            .find_map(|a| a.storage())
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

/// The state of one replica, as probed by [`Database::replica_report`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReplicaReport {
    /// The replica's URL (password redacted).
    pub target: String,
    /// What the probe found.
    pub state: ReplicaState,
}

/// What a replica probe found.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ReplicaState {
    /// A connection was opened and the probe answered.
    Reachable {
        /// Whether it is in recovery (a standby).
        role: ServerRole,
        /// Whether its WAL receiver is streaming.
        streaming: bool,
        /// WAL bytes between the primary's current position and the replica's
        /// replay, when both are known.
        lag_bytes: Option<u64>,
        /// Time since the last replayed transaction committed on the primary;
        /// `None` before any replay (meaningless on an idle primary, so read it
        /// with the bytes).
        replay_delay: Option<Duration>,
    },
    /// No connection, or the probe failed.
    Unreachable {
        /// Why.
        error: String,
    },
}

impl CommitPosition {
    /// The floor a session must read at after this commit.
    pub(crate) fn floor(self) -> Floor {
        match self {
            CommitPosition::NotRecorded => Floor::Any,
            CommitPosition::At(lsn) => Floor::At(lsn),
            CommitPosition::Unknown => Floor::Primary,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn _handles_are_send_and_sync() {
        fn check<T: Send + Sync + Clone>() {}
        check::<Database>();
    }

    #[test]
    fn query_insights_come_from_the_config_unless_the_builder_sets_them() {
        use crate::observe::{PlanCapture, Watchdog};
        let ms = Duration::from_millis;
        let base = Config::from_url("postgres://u@h/db").unwrap();
        assert_eq!(
            Database::builder(base.clone()).insights(),
            Insights {
                watchdog: None,
                repeats: None,
                plans: None
            },
            "all off by default"
        );
        let config = Config::from_vars([
            ("DATABASE_URL", "postgres://u@h/db"),
            ("RAILYARD_WATCHDOG_CANCEL_AFTER", "300ms"),
            ("RAILYARD_DETECT_REPEATS", "7"),
            ("RAILYARD_CAPTURE_PLANS_SLOWER_THAN", "250ms"),
        ])
        .unwrap();
        assert_eq!(
            Database::builder(config.clone()).insights(),
            Insights {
                watchdog: Some(Watchdog::cancel_after(ms(300))),
                repeats: Some(7),
                plans: Some(PlanCapture::slower_than(ms(250))),
            },
            "from the config"
        );
        assert_eq!(
            Database::builder(config)
                .watchdog(Watchdog::cancel_after(ms(900)))
                .detect_repeats(3)
                .capture_plans(PlanCapture::slower_than(ms(50)))
                .insights(),
            Insights {
                watchdog: Some(Watchdog::cancel_after(ms(900))),
                repeats: Some(3),
                plans: Some(PlanCapture::slower_than(ms(50))),
            },
            "the builder's calls win"
        );
        assert_eq!(
            Database::builder(base.detect_repeats(Some(4)))
                .insights()
                .repeats,
            Some(4),
            "from a setter"
        );
    }
}
