//! What the handle reports about itself: health and readiness (answers
//! reused for a short time), the Prometheus text and the storage figures.

use super::*;
use crate::observe::health;

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
pub(super) struct Probes {
    /// Probes that went to the server (`railyard_health_probes_total`), each
    /// one to a few statements: Railyard's own, not the application's
    /// traffic, so the query metrics do not count them.
    pub(super) ran: std::sync::atomic::AtomicU64,
    pub(super) primary: tokio::sync::Mutex<Option<(Instant, health::HealthCheck)>>,
    pub(super) migrations: tokio::sync::Mutex<Option<(Instant, Option<health::HealthCheck>)>>,
    pub(super) sizes: tokio::sync::Mutex<Option<(Instant, Option<crate::observe::StorageFigures>)>>,
}

/// How long a measurement of the database's size and its largest tables is
/// reused ([`Database::storage_figures`], `/health`, `/metrics`): sizes change
/// slowly, and measuring costs a catalog scan on the primary.
pub const SIZES_PROBE_TTL: Duration = Duration::from_secs(60);

/// How many of the largest tables a size measurement reports (partitioned
/// tables counted with their partitions).
pub const SIZES_TOP_TABLES: i64 = 10;

#[derive(QueryableByName)]
pub(super) struct MeasuredTable {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub(super) name: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(super) bytes: i64,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub(super) archived: bool,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(super) database: i64,
}

/// The database's size and its largest tables (a partitioned table with its
/// partitions; `railyard_archive` counts as archive).
pub(super) const MEASURE_SIZES: &str = "SELECT n.nspname || '.' || c.relname AS name, \
       (SELECT coalesce(sum(pg_total_relation_size(t.relid)), 0) FROM pg_partition_tree(c.oid) t)::bigint AS bytes, \
       n.nspname = 'railyard_archive' AS archived, \
       pg_database_size(current_database())::bigint AS database \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
       AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%' \
     ORDER BY bytes DESC, name LIMIT $1";

pub(super) async fn cached<T: Clone>(
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

impl Database {
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

    pub(super) async fn primary_check(&self) -> health::HealthCheck {
        cached(&self.inner.probes.primary, PRIMARY_PROBE_TTL, async {
            health::primary(self.probe_primary().await)
        })
        .await
    }

    pub(super) async fn probe_primary(&self) -> PrimaryProbe {
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
    pub(super) async fn probe_checkout(&self) -> Result<PooledConn, Error> {
        let conn = self.checkout(Want::Primary).await?;
        self.inner
            .probes
            .ran
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(conn)
    }

    pub(super) async fn migration_check(&self) -> Option<health::HealthCheck> {
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
    pub(super) fn measured_sizes(&self) -> Option<crate::observe::StorageFigures> {
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
}
