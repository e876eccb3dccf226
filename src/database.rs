//! [`Database`]: the handle applications keep.

use std::fmt;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use crate::config::{Config, ConnectTarget, TargetSessionAttrs};
use crate::error::Error;
use crate::migrate::{MigrationReport, Migrator};
use crate::pool::{Conn, Manager, Opener, ServerRole, TargetPool};
use crate::retry::{ErrorClass, RetryBudget, RetryPolicy};
use crate::route::{ReplicaHealth, ReplicaNode, Route, Router, RoutingConfig, Session};
use crate::tx::{TransactionBuilder, WriteBuilder};

/// An async closure over a connection whose future is `Send`.
///
/// Implemented for every `async |conn| { … }` closure; it exists because the
/// future type of `AsyncFnOnce` cannot be bounded on stable Rust. You never
/// implement it yourself.
pub trait ConnFn<T, R>: AsyncFnOnce(T) -> R + FnOnce(T) -> <Self as ConnFn<T, R>>::Fut {
    /// The future the closure returns.
    type Fut: Future<Output = R>;
}

impl<F, T, Fut, R> ConnFn<T, R> for F
where
    F: AsyncFnOnce(T) -> R + FnOnce(T) -> Fut,
    Fut: Future<Output = R>,
{
    type Fut = Fut;
}

/// A connection checked out of one of the [`Database`]'s pools. It goes back to
/// the pool when dropped (or is discarded, when it is no longer usable).
pub struct PooledConn {
    inner: Held,
}

// The pooled variant is as large as before this enum existed; boxing it would
// add an allocation to every checkout for the sake of the test-only variant.
#[allow(clippy::large_enum_variant)]
enum Held {
    Pool(bb8::PooledConnection<'static, Manager>),
    /// The test harness's one connection (see `testing`).
    Pinned(tokio::sync::OwnedMutexGuard<Option<Conn>>),
}

impl fmt::Debug for PooledConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

impl Deref for PooledConn {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        match &self.inner {
            Held::Pool(c) => c,
            Held::Pinned(c) => c.as_ref().expect(PINNED_GONE),
        }
    }
}

const PINNED_GONE: &str = "the test's connection is used only while the test runs";

impl DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut Conn {
        match &mut self.inner {
            Held::Pool(c) => c,
            Held::Pinned(c) => c.as_mut().expect(PINNED_GONE),
        }
    }
}

/// The connections a harness-made `Database` uses for every route.
pub(crate) struct Pinned {
    pub(crate) conn: Arc<tokio::sync::Mutex<Option<Conn>>>,
    /// Stale-replica mode: reads without a causal token go here.
    pub(crate) stale: Option<Arc<tokio::sync::Mutex<Option<Conn>>>>,
}

async fn lock_pinned(m: &Arc<tokio::sync::Mutex<Option<Conn>>>) -> Result<PooledConn, Error> {
    match tokio::time::timeout(Duration::from_secs(30), m.clone().lock_owned()).await {
        Ok(guard) if guard.is_none() => Err(Error::TestIsolation(
            "the test has ended: its connection was handed back (a task outlived the test?)".into(),
        )),
        Ok(guard) => Ok(PooledConn {
            inner: Held::Pinned(guard),
        }),
        Err(_) => Err(Error::TestIsolation(
            "the test's connection stayed busy for 30 s: a connection from `db.primary()` is probably still held while another operation waits for it (drop it first)".into(),
        )),
    }
}

/// A snapshot of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    /// `primary`, or the replica's host and port.
    pub name: String,
    /// Connections open (idle + in use).
    pub connections: u32,
    /// Idle connections.
    pub idle: u32,
    /// The pool's maximum.
    pub max_size: u32,
    /// Checkouts served since the pool was built.
    pub gets: u64,
    /// Checkouts that had to wait.
    pub gets_waited: u64,
    /// Checkouts that timed out.
    pub gets_timed_out: u64,
    /// Connections opened.
    pub connections_created: u64,
    /// Connections closed because they were broken.
    pub connections_closed_broken: u64,
    /// Whether the host's circuit breaker is open (calls fail fast).
    pub circuit_open: bool,
}

/// The state of one replica, as seen at [`Database::replica_report`].
#[derive(Debug, Clone)]
pub struct ReplicaReport {
    /// The replica's URL (password redacted).
    pub target: String,
    /// Whether a connection could be opened.
    pub reachable: bool,
    /// Whether it is in recovery (a standby), when reachable.
    pub role: Option<ServerRole>,
    /// Whether its WAL receiver is streaming.
    pub streaming: bool,
    /// WAL bytes between the primary's current position and the replica's replay.
    pub lag_bytes: Option<u64>,
    /// Time since the last replayed transaction committed on the primary; `None`
    /// before any replay (meaningless on an idle primary, so read it with the bytes).
    pub replay_delay: Option<Duration>,
    /// The error, when unreachable.
    pub error: Option<String>,
}

/// Builds a [`Database`]: pools, and migrations at boot.
#[must_use = "a builder does nothing until `connect` is called"]
pub struct DatabaseBuilder {
    config: Config,
    migrator: Option<Migrator>,
    policy: RetryPolicy,
    budget: RetryBudget,
    routing: RoutingConfig,
    hooks: Vec<Arc<dyn crate::observe::QueryHook>>,
}

impl fmt::Debug for DatabaseBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseBuilder")
            .field("config", &self.config)
            .field("migrator", &self.migrator)
            .field("policy", &self.policy)
            .finish()
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

    /// Registers a hook that sees every finished query (see the `observe` module
    /// docs: hooks must be cheap). Built-in hooks: [`crate::SlowQueryLog`],
    /// [`crate::StatementStats`], [`crate::QuerySpans`], [`crate::AuditLog`].
    pub fn hook(mut self, hook: impl crate::observe::QueryHook) -> Self {
        self.hooks.push(Arc::new(hook));
        self
    }

    /// Validates the config, runs the migrations (if any) on a dedicated
    /// connection, opens the first primary connection (so a wrong password or an
    /// unreachable server fails here, with its SQLSTATE), and builds the pools.
    pub async fn connect(self) -> Result<Database, Error> {
        let started = Instant::now();
        self.config.validate()?;
        let config = Arc::new(self.config);
        let migrations = match &self.migrator {
            Some(m) => Some(m.run(&config).await?),
            None => None,
        };
        let observer = Arc::new(crate::observe::Observer {
            hooks: self.hooks,
            metrics: Default::default(),
        });
        // Monitors use uninstrumented openers: their polling is not the
        // application's traffic.
        let monitor = Opener::new(
            config.primary.clone(),
            config.clone(),
            TargetSessionAttrs::ReadWrite,
        )?;
        let opener = monitor.clone().observed(observer.clone(), Route::Primary);
        let first = opener.open().await?;
        let primary = TargetPool::build("primary", opener.clone(), config.pool.max_size, &config);
        if let Err(e) = primary.pool.add(first) {
            drop(e);
        }
        let mut replicas = Vec::new();
        for target in &config.replicas {
            let name = replica_name(target);
            let replica = Opener::new(target.clone(), config.clone(), TargetSessionAttrs::Any)?
                .observed(observer.clone(), Route::Replica(name.clone().into()));
            let pool = TargetPool::build(
                &name,
                replica.clone(),
                config.replica_pool_max_size,
                &config,
            );
            replicas.push(Arc::new(ReplicaNode::new(name, pool, replica)));
        }
        let router = Arc::new(Router::new(replicas, self.routing));
        Router::spawn_monitors(&router, monitor);
        Ok(Database {
            inner: Arc::new(Inner {
                policy: self.policy,
                budget: self.budget,
                retries: Default::default(),
                config,
                primary,
                router,
                pinned: None,
                observer,
                migrator: self.migrator,
                migrations,
                boot_time: started.elapsed(),
            }),
        })
    }
}

fn replica_name(t: &ConnectTarget) -> String {
    t.hosts()
        .iter()
        .map(|(h, p)| format!("{h}:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

struct Inner {
    policy: RetryPolicy,
    budget: RetryBudget,
    retries: [std::sync::atomic::AtomicU64; 7],
    config: Arc<Config>,
    primary: TargetPool,
    router: Arc<Router>,
    pinned: Option<Pinned>,
    observer: Arc<crate::observe::Observer>,
    migrator: Option<Migrator>,
    migrations: Option<MigrationReport>,
    boot_time: Duration,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The monitors hold only weak references; this stops them at once.
        self.router.stop();
    }
}

/// The handle applications keep: cheap to clone, `Send + Sync`.
///
/// # Example
/// ```no_run
/// use diesel_async::RunQueryDsl;
/// use diesel_migrations::{embed_migrations, EmbeddedMigrations};
/// const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");
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

#[derive(QueryableByName)]
struct ReplicaProbe {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    in_recovery: bool,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    replay_lsn: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    receiver: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
    delay_secs: Option<f64>,
}

#[derive(QueryableByName)]
struct Lsn {
    #[diesel(sql_type = diesel::sql_types::Text)]
    lsn: String,
}

/// Parses a `pg_lsn` text (`16/B374D848`) into its 64-bit position.
pub(crate) fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
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

    /// Runs `f` in a transaction on the primary, re-run from the top when a retry
    /// is safe (see [`TransactionBuilder::run`] and the `tx` module docs).
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
    pub async fn transaction<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: for<'r> AsyncFnOnce(&'r mut Conn) -> Result<R, E>
            + for<'r> ConnFn<&'r mut Conn, Result<R, E>, Fut: Send>
            + Clone
            + Send,
        E: From<Error> + Send + 'static,
        R: Send,
    {
        self.build_transaction().run(f).await
    }

    /// A transaction with options: isolation level, read-only, deferrable,
    /// statement timeout, deadline, retry policy.
    pub fn build_transaction(&self) -> TransactionBuilder<'_> {
        TransactionBuilder::new(self)
    }

    /// Runs `f` in autocommit mode on the primary, retried only when safe (see
    /// [`WriteBuilder::run`]).
    pub async fn write<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: for<'r> AsyncFnOnce(&'r mut Conn) -> Result<R, E>
            + for<'r> ConnFn<&'r mut Conn, Result<R, E>, Fut: Send>
            + Clone
            + Send,
        E: From<Error> + Send + 'static,
        R: Send,
    {
        self.build_write().run(f).await
    }

    /// An autocommit write with options: idempotency, deadline, retry policy.
    pub fn build_write(&self) -> WriteBuilder<'_> {
        WriteBuilder::new(self)
    }

    /// Reads, on a healthy replica when there is one (round-robin or least
    /// outstanding), else on the primary. Without a [`Session`] there is no
    /// read-your-writes guarantee: use [`Database::session`] after writes.
    /// A read that fails on a replica because of the replica (its connection,
    /// a recovery conflict) runs again on the primary.
    pub async fn read<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: for<'r> AsyncFnOnce(&'r mut Conn) -> Result<R, E>
            + for<'r> ConnFn<&'r mut Conn, Result<R, E>, Fut: Send>
            + Clone
            + Send,
        E: From<Error> + Send + 'static,
        R: Send,
    {
        self.read_at(0, f).await.map(|(v, _, _)| v)
    }

    /// Like [`Database::read`], and says where the read ran.
    pub async fn read_routed<R, E, F>(&self, f: F) -> Result<(R, Route), E>
    where
        F: for<'r> AsyncFnOnce(&'r mut Conn) -> Result<R, E>
            + for<'r> ConnFn<&'r mut Conn, Result<R, E>, Fut: Send>
            + Clone
            + Send,
        E: From<Error> + Send + 'static,
        R: Send,
    {
        self.read_at(0, f).await.map(|(v, r, _)| (v, r))
    }

    /// A new session (read-your-writes, monotonic reads).
    pub fn session(&self) -> Session {
        Session::new(self.clone(), 0)
    }

    /// A session that continues from a token, typically from another request.
    pub fn session_from(&self, token: crate::route::CausalToken) -> Session {
        Session::new(self.clone(), token.0.0)
    }

    /// Where a read would go now, for a session at `token` (or any session when
    /// `None`): the routing decision alone, from cached figures, no I/O.
    pub fn route_for_read(&self, token: Option<crate::route::CausalToken>) -> Route {
        match self.inner.router.choose(token.map_or(0, |t| t.0.0)) {
            Some((node, _outstanding)) => Route::Replica(node.name.clone()),
            None => Route::Primary,
        }
    }

    /// Each replica's monitored state.
    pub fn replica_health(&self) -> Vec<ReplicaHealth> {
        self.inner
            .router
            .replicas
            .iter()
            .map(|r| r.health())
            .collect()
    }

    /// Runs a read at or past `floor` (0: any healthy replica). Returns the
    /// value, the route, and the position the data is known to include.
    pub(crate) async fn read_at<R, E, F>(&self, floor: u64, f: F) -> Result<(R, Route, u64), E>
    where
        F: for<'r> AsyncFnOnce(&'r mut Conn) -> Result<R, E>
            + for<'r> ConnFn<&'r mut Conn, Result<R, E>, Fut: Send>
            + Clone
            + Send,
        E: From<Error> + Send + 'static,
        R: Send,
    {
        if let Some(p) = &self.inner.pinned {
            return crate::tx::pinned_read(self, p, floor, f).await;
        }
        let router = &self.inner.router;
        let mut choice = router.choose(floor);
        if choice.is_none()
            && floor > 0
            && let crate::route::Fallback::Wait(bound) = router.config.fallback
        {
            let deadline = tokio::time::Instant::now() + bound;
            while choice.is_none() && tokio::time::Instant::now() < deadline {
                router
                    .changed(deadline.saturating_duration_since(tokio::time::Instant::now()))
                    .await;
                choice = router.choose(floor);
            }
        }
        if let Some((node, _outstanding)) = choice {
            // Cached before the read: the data read includes at least this.
            let seen = node.replay_lsn().max(floor);
            match node.pool.get_owned().await {
                Ok(mut conn) => {
                    let wire = conn.wire_arc();
                    let mark = wire.mark();
                    match f.clone()(&mut conn).await {
                        Ok(v) => return Ok((v, Route::Replica(node.name.clone()), seen)),
                        Err(e) => {
                            let server = wire.error_since(mark);
                            let class = crate::retry::classify(
                                server.as_ref().map(|s| s.sqlstate()).as_ref(),
                                wire.is_closed(),
                            );
                            match class {
                                // The replica's fault (connection lost, or a
                                // recovery conflict): read on the primary instead.
                                crate::retry::ErrorClass::Reconnect => {
                                    node.note_failure(format!("read failed: {class}"));
                                }
                                crate::retry::ErrorClass::RetryTransaction => {
                                    tracing::info!(target: "railyard::route", replica = %node.name, "recovery conflict on a replica; reading on the primary");
                                }
                                _ => return Err(e),
                            }
                        }
                    }
                }
                Err(e) => node.note_failure(e.to_string()),
            }
        }
        let mut conn = self.checkout_primary().await.map_err(E::from)?;
        let v = f(&mut conn).await?;
        // The primary's data is the newest: a causal session must not read older
        // data afterwards, so it learns the primary's position (only on this
        // fallback path, never on replica reads).
        let seen = if floor > 0 {
            crate::route::insert_lsn(&mut conn).await.unwrap_or(floor)
        } else {
            0
        };
        Ok((v, Route::Primary, seen))
    }

    pub(crate) fn observer(&self) -> &crate::observe::Observer {
        &self.inner.observer
    }

    pub(crate) fn migrator(&self) -> Option<&Migrator> {
        self.inner.migrator.as_ref()
    }

    #[cfg(feature = "testing")]
    /// A `Database` whose every route uses `conn` (already inside the test's
    /// transaction), and, in stale-replica mode, `stale` for untokened reads.
    pub(crate) fn pinned_to(
        config: Config,
        conn: Conn,
        stale: Option<Conn>,
        migrator: Migrator,
    ) -> Self {
        let config = Arc::new(config);
        let observer = Arc::new(crate::observe::Observer::default());
        let opener = Opener::new(
            config.primary.clone(),
            config.clone(),
            TargetSessionAttrs::Any,
        )
        .expect("the harness config was already used to connect");
        let primary = TargetPool::build("primary", opener, 1, &config);
        Database {
            inner: Arc::new(Inner {
                policy: RetryPolicy::never(),
                budget: RetryBudget::default(),
                retries: Default::default(),
                config,
                primary,
                router: Arc::new(Router::new(Vec::new(), RoutingConfig::default())),
                pinned: Some(Pinned {
                    conn: Arc::new(tokio::sync::Mutex::new(Some(conn))),
                    stale: stale.map(|c| Arc::new(tokio::sync::Mutex::new(Some(c)))),
                }),
                observer,
                migrator: Some(migrator),
                migrations: None,
                boot_time: Duration::ZERO,
            }),
        }
    }

    pub(crate) fn reroute_primary(&self) {
        self.inner.primary.reroute();
    }

    /// Retries made so far, by class.
    pub fn retry_counts(&self) -> Vec<(ErrorClass, u64)> {
        crate::observe::CLASSES
            .iter()
            .zip(&self.inner.retries)
            .map(|(c, n)| (*c, n.load(std::sync::atomic::Ordering::Relaxed)))
            .collect()
    }

    pub(crate) fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.policy
    }

    pub(crate) fn budget(&self) -> &RetryBudget {
        &self.inner.budget
    }

    pub(crate) fn note_retry(&self, class: ErrorClass) {
        let i = crate::observe::class_index(class);
        self.inner.retries[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) async fn checkout_primary(&self) -> Result<PooledConn, Error> {
        match &self.inner.pinned {
            Some(p) => lock_pinned(&p.conn).await,
            None => Ok(PooledConn {
                inner: Held::Pool(self.inner.primary.get_owned().await?),
            }),
        }
    }

    #[cfg(feature = "testing")]
    /// Takes the test's connection back from a harness-made `Database`.
    pub(crate) async fn take_pinned(&self) -> Option<Conn> {
        self.inner.pinned.as_ref()?.conn.lock().await.take()
    }

    pub(crate) fn pinned(&self) -> Option<&Pinned> {
        self.inner.pinned.as_ref()
    }

    /// Checks out a primary connection.
    pub async fn primary(&self) -> Result<PooledConn, Error> {
        self.checkout_primary().await
    }

    /// Checks out a connection to replica `index` (in configuration order).
    /// Routing between replicas and the primary comes with the routing layer; this
    /// is the raw access.
    pub async fn replica(&self, index: usize) -> Result<PooledConn, Error> {
        let pool = self
            .inner
            .router
            .replicas
            .get(index)
            .map(|r| &r.pool)
            .ok_or_else(|| {
                Error::Config(crate::error::ConfigError::new(
                    "replica index",
                    index.to_string(),
                    format!(
                        "{} replicas are configured",
                        self.inner.router.replicas.len()
                    ),
                ))
            })?;
        if let Some(p) = &self.inner.pinned {
            return lock_pinned(&p.conn).await;
        }
        Ok(PooledConn {
            inner: Held::Pool(pool.get_owned().await?),
        })
    }

    /// Runs `f` on a pooled primary connection (autocommit; each statement is its
    /// own transaction unless `f` opens one).
    pub async fn with_primary<R, E, F>(&self, f: F) -> Result<R, E>
    where
        F: for<'r> AsyncFnOnce(&'r mut AsyncPgConnection) -> Result<R, E>
            + for<'r> ConnFn<&'r mut AsyncPgConnection, Result<R, E>, Fut: Send>
            + Send,
        E: From<Error> + Send,
        R: Send,
    {
        let mut conn = self.inner.primary.get().await.map_err(E::from)?;
        f(&mut conn).await
    }

    /// Snapshots of the primary pool and each replica pool.
    pub fn pool_status(&self) -> Vec<PoolStatus> {
        std::iter::once(&self.inner.primary)
            .chain(self.inner.router.replicas.iter().map(|r| &r.pool))
            .map(|p| {
                let s = p.pool.state();
                PoolStatus {
                    name: p.name.clone(),
                    connections: s.connections,
                    idle: s.idle_connections,
                    max_size: p.pool.config().max_size,
                    gets: s.statistics.get_direct + s.statistics.get_waited,
                    gets_waited: s.statistics.get_waited,
                    gets_timed_out: s.statistics.get_timed_out,
                    connections_created: s.statistics.connections_created,
                    connections_closed_broken: s.statistics.connections_closed_broken,
                    circuit_open: p.breaker().is_open(),
                }
            })
            .collect()
    }

    /// Probes each replica: reachable, in recovery, streaming, and its lag.
    pub async fn replica_report(&self) -> Vec<ReplicaReport> {
        let primary_lsn = match self.inner.primary.get().await {
            Ok(mut c) => diesel::sql_query("SELECT pg_current_wal_lsn()::text AS lsn")
                .get_result::<Lsn>(&mut **c)
                .await
                .ok()
                .and_then(|l| parse_lsn(&l.lsn)),
            Err(_) => None,
        };
        let mut out = Vec::new();
        for (node, target) in self
            .inner
            .router
            .replicas
            .iter()
            .zip(&self.inner.config.replicas)
        {
            let pool = &node.pool;
            let probe = async {
                let mut c = pool.get().await?;
                let p: ReplicaProbe = diesel::sql_query(
                    "SELECT pg_is_in_recovery() AS in_recovery, pg_last_wal_replay_lsn()::text AS replay_lsn, \
                     (SELECT status FROM pg_stat_wal_receiver LIMIT 1) AS receiver, \
                     extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS delay_secs",
                )
                .get_result(&mut **c)
                .await?;
                Ok::<_, Error>(p)
            };
            out.push(match probe.await {
                Ok(p) => ReplicaReport {
                    target: target.to_string(),
                    reachable: true,
                    role: Some(if p.in_recovery {
                        ServerRole::Standby
                    } else {
                        ServerRole::Primary
                    }),
                    streaming: p.receiver.as_deref() == Some("streaming"),
                    lag_bytes: match (primary_lsn, p.replay_lsn.as_deref().and_then(parse_lsn)) {
                        (Some(a), Some(b)) => Some(a.saturating_sub(b)),
                        _ => None,
                    },
                    replay_delay: p.delay_secs.map(|s| Duration::from_secs_f64(s.max(0.0))),
                    error: None,
                },
                Err(e) => ReplicaReport {
                    target: target.to_string(),
                    reachable: false,
                    role: None,
                    streaming: false,
                    lag_bytes: None,
                    replay_delay: None,
                    error: Some(e.to_string()),
                },
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_parse_to_positions() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374D848));
        assert_eq!(parse_lsn("nonsense"), None);
    }

    fn _handles_are_send_and_sync() {
        fn check<T: Send + Sync + Clone>() {}
        check::<Database>();
    }
}
