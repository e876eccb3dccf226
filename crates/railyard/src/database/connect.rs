//! Building a [`Database`]: [`DatabaseBuilder`] and `connect`, which opens
//! the pools, checks the replicas at boot and runs the migrations.

use super::*;

/// Builds a [`Database`]: pools, and migrations at boot.
#[must_use = "a builder does nothing until `connect` is called"]
pub struct DatabaseBuilder {
    pub(super) config: Config,
    pub(super) migrator: Option<Migrator>,
    pub(super) policy: RetryPolicy,
    pub(super) budget: RetryBudget,
    pub(super) routing: RoutingConfig,
    pub(super) hooks: Vec<Arc<dyn QueryHook>>,
    pub(super) watchdog: Option<crate::observe::Watchdog>,
    pub(super) repeats: Option<u32>,
    pub(super) plans: Option<crate::observe::PlanCapture>,
    pub(super) on_plan_change: Option<crate::observe::ChangeHook>,
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
        let (replicas, openers) = replica_nodes(&config, &observer, &gate)?;
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
    pub(super) fn insights(&self) -> Insights {
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

/// A node per replica (its pool, and its monitor's opener, which shares the
/// pool's breaker), and the pools' openers for the boot check.
fn replica_nodes(
    config: &Arc<Config>,
    observer: &Arc<Observer>,
    gate: &Arc<Gate>,
) -> Result<(Vec<Arc<ReplicaNode>>, Vec<Opener>), Error> {
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
        let pool = TargetPool::build(route, replica.clone(), config.replica_pool_max_size, config);
        openers.push(replica.clone());
        replicas.push(Arc::new(ReplicaNode::new(name, pool, watching)));
    }
    Ok((replicas, openers))
}

/// The query-insight features a [`DatabaseBuilder`] starts.
#[derive(Debug, PartialEq)]
pub(super) struct Insights {
    pub(super) watchdog: Option<crate::observe::Watchdog>,
    pub(super) repeats: Option<u32>,
    pub(super) plans: Option<crate::observe::PlanCapture>,
}

/// A configuration that stands for the local cluster (no `DATABASE_URL`, in
/// the development or test profile) is refused here: `railyard-local`'s
/// `LocalCluster::resolve` points it at a cluster first.
pub(super) async fn resolve_local(config: Config) -> Result<Config, Error> {
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
pub(super) async fn check_replicas_at_boot(
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
pub(super) async fn server_identity(
    conn: &mut crate::conn::Conn,
) -> Result<(String, String), Error> {
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

pub(super) fn replica_name(t: &ConnectTarget) -> String {
    t.hosts()
        .iter()
        .map(|(h, p)| format!("{h}:{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

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
