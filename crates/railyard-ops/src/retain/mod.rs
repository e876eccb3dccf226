//! Retention and archival of time-partitioned history.
//!
//! A [`Retention`] names the tables it manages: range-partitioned by a
//! timestamp column, one partition per UTC month (`{table}_pYYYY_MM`), with a
//! default partition as the safety net. A run ([`Retention::run`]), under a
//! session advisory lock that only one instance at a time holds (the others
//! skip it, and say so):
//!
//! 1. makes the partitions of the current month and the
//!    [`premake`](RetentionConfig::premake) months after it, and of any month
//!    whose rows sit in the default partition (moving them into it);
//! 2. archives every partition whose upper bound is older than
//!    [`period`](RetentionConfig::new): one short transaction per partition
//!    detaches it, counts its rows (exactly: detached, nothing reaches it),
//!    drops its foreign keys, moves it to the archive schema
//!    (`railyard_archive`), attaches it to the archive's partitioned twin of
//!    the table and writes a row of `railyard_retention_audit` (partition,
//!    range, rows, bytes, when, and which instance). That transaction holds
//!    ACCESS EXCLUSIVE on the table, so it does DDL and nothing else; the
//!    [row moves](Retention::move_rows) follow in a second transaction, with
//!    ordinary row locks, which also marks the audit row done
//!    (`moves_done_at`). A run that dies between the two leaves the audit
//!    row pending, and the next run makes the moves first;
//! 3. measures the database and the managed tables, and records the figures
//!    on the [`Database`] (`/health` gains a `storage` check, `/metrics` the
//!    sizes).
//!
//! Behind a transaction-mode pooler (`RAILYARD_POOLER=pgbouncer-transaction`)
//! a run is refused with an error naming the setting: its session lock and
//! session timeouts would not outlive one transaction.
//!
//! Every DDL statement runs with the configured `lock_timeout`, so a run never
//! queues behind the workload for long: it fails, and the next run tries
//! again. [`RetentionJob::spawn`] runs it on a schedule inside the
//! application, and early when the live bytes pass the
//! [size threshold](RetentionConfig::size_threshold); a run that leaves them
//! over the threshold degrades the `storage` check (alert metric
//! `storage_cannot_free`).
//!
//! The archive stays in the same database: archival is cheap (no row is
//! copied), transactional, and archived rows stay readable (the application
//! reads `live UNION ALL archive` views). It frees the live tables, their
//! indexes and the cache they need, not the database's disk; dump or drop
//! archived partitions for that.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, TimeZone, Utc};
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Bool, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

use crate::error::Error;
use railyard::database::Database;
use railyard::error::ConfigError;
use railyard::observe::{StorageFigures, TableSize};

/// The schema archived partitions and rows go to.
pub const ARCHIVE_SCHEMA: &str = "railyard_archive";

/// The audit table (in the database's default schema; never archived).
pub const AUDIT_TABLE: &str = "railyard_retention_audit";

/// The session advisory lock key one run holds: the bytes of "RYRETAIN".
pub const LOCK_KEY: i64 = 0x5259_5245_5441_494e;

/// The retention period's variable (`90d`, `12w`, …); unset: no retention.
pub const ENV_PERIOD: &str = "RAILYARD_RETENTION";
/// How often the job runs (default 1 h).
pub const ENV_EVERY: &str = "RAILYARD_RETENTION_EVERY";
/// Months of partitions made ahead (default 3).
pub const ENV_PREMAKE: &str = "RAILYARD_RETENTION_PREMAKE";
/// Live bytes over which the job runs early and health degrades if it
/// cannot free enough (`500MB`, `10GB`, bytes; `off` by default).
pub const ENV_SIZE_THRESHOLD: &str = "RAILYARD_RETENTION_SIZE_THRESHOLD";
/// How often the job measures sizes between runs (default 1 min).
pub const ENV_CHECK_EVERY: &str = "RAILYARD_RETENTION_CHECK_EVERY";
/// The `lock_timeout` of its DDL (default 5 s).
pub const ENV_LOCK_TIMEOUT: &str = "RAILYARD_RETENTION_LOCK_TIMEOUT";

/// The most months made ahead.
pub const MAX_PREMAKE: u32 = 36;

/// When and how much a [`Retention`] keeps live.
///
/// ```
/// use std::time::Duration;
/// use railyard_ops::retain::RetentionConfig;
/// let config = RetentionConfig::new(Duration::from_secs(90 * 86_400))
///     .every(Duration::from_secs(3600))
///     .premake(3)
///     .size_threshold(Some(10 << 30));
/// config.validate()?;
/// # Ok::<(), railyard::error::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetentionConfig {
    /// Partitions wholly older than this are archived.
    pub period: Duration,
    /// How often the job runs.
    pub every: Duration,
    /// Months of partitions made ahead of the current one.
    pub premake: u32,
    /// Live bytes over which the job runs early.
    pub size_threshold: Option<u64>,
    /// How often the job measures sizes between runs.
    pub check_every: Duration,
    /// The `lock_timeout` of each DDL statement.
    pub lock_timeout: Duration,
    /// The `statement_timeout` of each statement (moving a month's rows out
    /// of the default partition, counting a partition).
    pub statement_timeout: Duration,
}

impl RetentionConfig {
    /// A period with the defaults: every hour, three months ahead, no size
    /// threshold, sizes measured every minute, DDL waiting at most 5 s for a
    /// lock, statements at most 5 min.
    pub fn new(period: Duration) -> Self {
        RetentionConfig {
            period,
            every: Duration::from_secs(3600),
            premake: 3,
            size_threshold: None,
            check_every: Duration::from_secs(60),
            lock_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(300),
        }
    }

    /// How often the job runs.
    #[must_use]
    pub fn every(mut self, d: Duration) -> Self {
        self.every = d;
        self
    }

    /// Months of partitions made ahead.
    #[must_use]
    pub fn premake(mut self, months: u32) -> Self {
        self.premake = months;
        self
    }

    /// Live bytes over which the job runs early (`None`: no threshold).
    #[must_use]
    pub fn size_threshold(mut self, bytes: Option<u64>) -> Self {
        self.size_threshold = bytes;
        self
    }

    /// How often the job measures sizes between runs.
    #[must_use]
    pub fn check_every(mut self, d: Duration) -> Self {
        self.check_every = d;
        self
    }

    /// The `lock_timeout` of each DDL statement.
    #[must_use]
    pub fn lock_timeout(mut self, d: Duration) -> Self {
        self.lock_timeout = d;
        self
    }

    /// The `statement_timeout` of each statement.
    #[must_use]
    pub fn statement_timeout(mut self, d: Duration) -> Self {
        self.statement_timeout = d;
        self
    }

    /// Refuses values that cannot work, naming the setter.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let at_least = |field: &str, d: Duration, min: Duration, what: &str| {
            if d < min {
                Err(ConfigError::new(
                    field,
                    format!("{d:?}"),
                    format!("too short, at least {what}"),
                ))
            } else {
                Ok(())
            }
        };
        at_least(
            "RetentionConfig::new (period)",
            self.period,
            Duration::from_secs(3600),
            "1h",
        )?;
        at_least(
            "RetentionConfig::every",
            self.every,
            Duration::from_secs(1),
            "1s",
        )?;
        at_least(
            "RetentionConfig::check_every",
            self.check_every,
            Duration::from_millis(100),
            "100ms",
        )?;
        at_least(
            "RetentionConfig::lock_timeout",
            self.lock_timeout,
            Duration::from_millis(1),
            "1ms",
        )?;
        at_least(
            "RetentionConfig::statement_timeout",
            self.statement_timeout,
            Duration::from_millis(1),
            "1ms",
        )?;
        if self.premake > MAX_PREMAKE {
            return Err(ConfigError::new(
                "RetentionConfig::premake",
                self.premake.to_string(),
                format!("too large, at most {MAX_PREMAKE} months"),
            ));
        }
        if self.size_threshold == Some(0) {
            return Err(ConfigError::new(
                "RetentionConfig::size_threshold",
                "0",
                "must be positive; use None for no threshold",
            ));
        }
        Ok(())
    }

    /// From the process environment; `None` when `RAILYARD_RETENTION` is
    /// unset (no retention).
    pub fn from_env() -> Result<Option<Self>, ConfigError> {
        RetentionConfig::from_vars(std::env::vars_os().map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        }))
    }

    /// Like [`RetentionConfig::from_env`], from the given variables.
    ///
    /// ```
    /// use railyard_ops::retain::RetentionConfig;
    /// let c = RetentionConfig::from_vars([
    ///     ("RAILYARD_RETENTION", "90d"),
    ///     ("RAILYARD_RETENTION_SIZE_THRESHOLD", "2GB"),
    /// ])?
    /// .expect("retention is on");
    /// assert_eq!(c.period.as_secs(), 90 * 86_400);
    /// assert_eq!(c.size_threshold, Some(2 << 30));
    /// let e = RetentionConfig::from_vars([("RAILYARD_RETENTION", "soon")]).unwrap_err();
    /// assert_eq!(e.field, "RAILYARD_RETENTION");
    /// # Ok::<(), railyard::error::ConfigError>(())
    /// ```
    pub fn from_vars<K, V>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Option<Self>, ConfigError>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let vars: std::collections::BTreeMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned()))
            .filter(|(k, _)| k.starts_with("RAILYARD_RETENTION"))
            .collect();
        let get = |k: &str| -> Result<Option<&str>, ConfigError> {
            match vars.get(k) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => {
                    Err(ConfigError::hidden(k, "empty; unset it or give a value"))
                }
                Some(v) => Ok(Some(v.trim())),
            }
        };
        let Some(period) = get(ENV_PERIOD)? else {
            if let Some(k) = vars.keys().find(|k| k.as_str() != ENV_PERIOD) {
                return Err(ConfigError::hidden(
                    k.clone(),
                    format!("set without {ENV_PERIOD}; set the retention period too, or unset it"),
                ));
            }
            return Ok(None);
        };
        let mut c = RetentionConfig::new(parse_duration(ENV_PERIOD, period)?);
        if let Some(v) = get(ENV_EVERY)? {
            c.every = parse_duration(ENV_EVERY, v)?;
        }
        if let Some(v) = get(ENV_CHECK_EVERY)? {
            c.check_every = parse_duration(ENV_CHECK_EVERY, v)?;
        }
        if let Some(v) = get(ENV_LOCK_TIMEOUT)? {
            c.lock_timeout = parse_duration(ENV_LOCK_TIMEOUT, v)?;
        }
        if let Some(v) = get(ENV_PREMAKE)? {
            c.premake = v
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= MAX_PREMAKE)
                .ok_or_else(|| {
                    ConfigError::new(
                        ENV_PREMAKE,
                        v,
                        format!("expected a whole number of months, 0 to {MAX_PREMAKE}"),
                    )
                })?;
        }
        if let Some(v) = get(ENV_SIZE_THRESHOLD)? {
            c.size_threshold = parse_size(ENV_SIZE_THRESHOLD, v)?;
        }
        c.validate().map_err(|mut e| {
            // Name the variable rather than the setter.
            e.field = match e.field.as_str() {
                "RetentionConfig::new (period)" => ENV_PERIOD,
                "RetentionConfig::every" => ENV_EVERY,
                "RetentionConfig::check_every" => ENV_CHECK_EVERY,
                "RetentionConfig::lock_timeout" => ENV_LOCK_TIMEOUT,
                "RetentionConfig::premake" => ENV_PREMAKE,
                "RetentionConfig::size_threshold" => ENV_SIZE_THRESHOLD,
                other => other,
            }
            .to_owned();
            e
        })?;
        Ok(Some(c))
    }
}

fn parse_duration(field: &str, v: &str) -> Result<Duration, ConfigError> {
    if v.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(ConfigError::new(
            field,
            v,
            "a number without a unit; write it with one: d, h, m or s (for example `90d`)",
        ));
    }
    humantime::parse_duration(v).map_err(|e| {
        ConfigError::new(
            field,
            v,
            format!("{e}; write a number with a unit: d, h, m or s (for example `90d`)"),
        )
    })
}

/// Bytes with an optional unit (kB, MB, GB, TB: powers of 1024, as
/// PostgreSQL counts them); `off`, `none` or `0`: no threshold.
fn parse_size(field: &str, v: &str) -> Result<Option<u64>, ConfigError> {
    if matches!(v, "off" | "none" | "0") {
        return Ok(None);
    }
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        "tb" => 1 << 40,
        _ => {
            return Err(ConfigError::new(
                field,
                v,
                "unknown unit; write bytes, or a whole number with kB, MB, GB or TB (for example `10GB`), or `off`",
            ));
        }
    };
    n.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|b| *b > 0)
        .map(Some)
        .ok_or_else(|| {
            ConfigError::new(
                field,
                v,
                "expected a positive whole number of bytes, with kB, MB, GB or TB (for example `10GB`), or `off`",
            )
        })
}

/// A statement run after each archival transaction, in its own:
/// `$1` (timestamptz) is the upper bound of the archived partition. Its row
/// count is recorded in the audit row under `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RowMove {
    name: String,
    sql: String,
}

/// The tables a retention job manages, and how (see the module docs).
///
/// ```no_run
/// # async fn demo(db: railyard::Database) -> Result<(), railyard_ops::Error> {
/// use std::time::Duration;
/// use railyard_ops::retain::{Retention, RetentionConfig};
/// let retention = Retention::new(RetentionConfig::new(Duration::from_secs(90 * 86_400)))
///     .partitioned("trades", "executed_at")?;
/// let run = retention.run(&db, false).await?;
/// println!("archived {} partition(s)", run.archived.len());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Retention {
    config: RetentionConfig,
    tables: Vec<(String, String)>,
    moves: Vec<RowMove>,
    watched: Vec<String>,
}

fn identifier(field: &str, s: &str) -> Result<(), Error> {
    let ok = !s.is_empty()
        && s.len() <= 50
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::from(ConfigError::new(
            field,
            s,
            "expected a lowercase SQL identifier (letters, digits, _; at most 50 characters)",
        )))
    }
}

impl Retention {
    /// A retention with no tables yet.
    pub fn new(config: RetentionConfig) -> Self {
        Retention {
            config,
            tables: Vec::new(),
            moves: Vec::new(),
            watched: Vec::new(),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &RetentionConfig {
        &self.config
    }

    /// Manages `table` (in `public`), range-partitioned by `column` into UTC
    /// months, with its archive twin `railyard_archive.{table}`.
    pub fn partitioned(mut self, table: &str, column: &str) -> Result<Self, Error> {
        identifier("Retention::partitioned (table)", table)?;
        identifier("Retention::partitioned (column)", column)?;
        self.tables.push((table.to_owned(), column.to_owned()));
        Ok(self)
    }

    /// A statement run after each partition is archived, in a transaction
    /// of its own right after the archiving one (or, if the process died in
    /// between, at the start of the next run), with `$1` the partition's
    /// upper bound (for rows that leave with it, such as closed orders no
    /// live trade references). It commits together with the audit row's
    /// mark, so it runs once per archived partition.
    #[must_use]
    pub fn move_rows(mut self, name: impl Into<String>, sql: impl Into<String>) -> Self {
        self.moves.push(RowMove {
            name: name.into(),
            sql: sql.into(),
        });
        self
    }

    /// Also measures `table` (`schema.table` or `table`); it counts as
    /// archive when its schema is [`ARCHIVE_SCHEMA`], as live otherwise.
    pub fn watch(mut self, table: &str) -> Result<Self, Error> {
        for part in table.split('.') {
            identifier("Retention::watch", part)?;
        }
        self.watched.push(table.to_owned());
        Ok(self)
    }

    /// Measures the database and the managed tables.
    pub async fn measure(&self, db: &Database) -> Result<StorageFigures, Error> {
        let mut conn = db.primary().await?;
        self.measure_on(&mut conn).await
    }

    async fn measure_on(&self, conn: &mut AsyncPgConnection) -> Result<StorageFigures, Error> {
        let bound = self.config.statement_timeout;
        let database = bounded(
            bound,
            diesel::sql_query("SELECT pg_database_size(current_database())::bigint AS n")
                .get_result::<N>(conn),
        )
        .await?
        .n;
        let mut names: Vec<(String, bool)> = Vec::new();
        for (t, _) in &self.tables {
            names.push((format!("public.{t}"), false));
            names.push((format!("{ARCHIVE_SCHEMA}.{t}"), true));
        }
        for w in &self.watched {
            let archived = w.split_once('.').is_some_and(|(s, _)| s == ARCHIVE_SCHEMA);
            let name = if w.contains('.') {
                w.clone()
            } else {
                format!("public.{w}")
            };
            names.push((name, archived));
        }
        let mut tables = Vec::with_capacity(names.len());
        for (name, archived) in names {
            let n = bounded(
                bound,
                diesel::sql_query(
                    "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint AS n FROM pg_class c \
                     WHERE c.oid = to_regclass($1) \
                        OR c.oid IN (SELECT relid FROM pg_partition_tree(to_regclass($1)))",
                )
                .bind::<Text, _>(&name)
                .get_result::<N>(conn),
            )
            .await?
            .n;
            tables.push(TableSize::new(
                name,
                u64::try_from(n).unwrap_or(0),
                archived,
            ));
        }
        Ok(StorageFigures::new(
            u64::try_from(database).unwrap_or(0),
            tables,
            self.config.size_threshold,
        ))
    }

    /// Makes the partitions a run would make (ahead, and for rows in the
    /// default partition), under the lock, without archiving; `None` when
    /// another instance holds the lock.
    pub async fn prepare(&self, db: &Database) -> Result<Option<Vec<String>>, Error> {
        let mut conn = self.open(db).await?;
        if let Some(holder) = try_lock(&mut conn, self.config.statement_timeout).await? {
            tracing::info!(
                holder,
                "retention: another instance holds the lock; skipped"
            );
            return Ok(None);
        }
        let made = self.make_partitions(&mut conn).await;
        unlock(&mut conn).await;
        made.map(Some)
    }

    async fn open(&self, db: &Database) -> Result<railyard::conn::Conn, Error> {
        self.config.validate()?;
        refuse_per_transaction(db.config().pooler_mode())?;
        let mut conn = db.dedicated_primary().await?;
        bounded(
            self.config.statement_timeout,
            conn.batch_execute(&format!(
                "SET lock_timeout = {}; SET statement_timeout = {}",
                self.config.lock_timeout.as_millis().max(1),
                self.config.statement_timeout.as_millis().max(1)
            )),
        )
        .await?;
        Ok(conn)
    }

    /// One run (see the module docs): makes partitions ahead, archives those
    /// past the period, measures before and after, and records the figures
    /// on `db`. With `dry_run`, changes nothing and lists what it would
    /// archive. When another instance holds the lock, returns at once with
    /// [`RetentionRun::skipped`] set.
    pub async fn run(&self, db: &Database, dry_run: bool) -> Result<RetentionRun, Error> {
        let started = Instant::now();
        let mut conn = self.open(db).await?;
        let bound = self.config.statement_timeout;
        let before = self.measure_on(&mut conn).await?;
        let cutoff: Cutoff = bounded(
            bound,
            diesel::sql_query(
                "SELECT now() - make_interval(secs => $1::float8) AS at, \
                 current_setting('application_name') AS app",
            )
            .bind::<diesel::sql_types::Double, _>(self.config.period.as_secs_f64())
            .get_result(&mut *conn),
        )
        .await?;
        let mut run = RetentionRun {
            skipped: None,
            dry_run,
            cutoff: cutoff.at,
            created: Vec::new(),
            archived: Vec::new(),
            before: before.clone(),
            after: before,
            took: Duration::ZERO,
        };
        if let Some(holder) = try_lock(&mut conn, bound).await? {
            let why = format!("another instance holds the retention lock (backend pid {holder})");
            tracing::info!(holder, "retention: {why}; skipped");
            run.skipped = Some(why);
            run.took = started.elapsed();
            return Ok(run);
        }
        let result = self.locked_run(&mut conn, &mut run, &cutoff.app).await;
        unlock(&mut conn).await;
        result?;
        let mut after = self.measure_on(&mut conn).await?;
        after.cannot_free = !dry_run && after.over_threshold();
        if after.cannot_free {
            tracing::warn!(
                live = after.live_bytes(),
                threshold = ?after.threshold_bytes,
                "retention: the live history is still over its size threshold after archiving everything past the retention period"
            );
        }
        record_storage(db, after.clone());
        run.after = after;
        run.took = started.elapsed();
        Ok(run)
    }

    async fn locked_run(
        &self,
        conn: &mut railyard::conn::Conn,
        run: &mut RetentionRun,
        app: &str,
    ) -> Result<(), Error> {
        let bound = self.config.statement_timeout;
        if !run.dry_run {
            bounded(bound, conn.batch_execute(&audit_ddl())).await?;
            run.created = self.make_partitions(conn).await?;
            // Row moves a run that died after archiving left undone.
            for (name, moved, _) in self.finish_moves(conn).await? {
                tracing::info!(partition = %name, moved = ?moved, "retention: finished the row moves of an earlier run");
            }
        }
        for (table, column) in &self.tables {
            let parts = partitions(conn, &format!("public.{table}"), bound).await?;
            for p in parts {
                let (Some(from), Some(to)) = (p.range_from, p.range_to) else {
                    continue;
                };
                if to > run.cutoff {
                    continue;
                }
                if run.dry_run {
                    let c: Counted = bounded(
                        bound,
                        diesel::sql_query(format!(
                            "SELECT count(*)::bigint AS n, pg_total_relation_size('public.{0}')::bigint AS bytes FROM public.{0}",
                            quote(&p.name)
                        ))
                        .get_result(&mut **conn),
                    )
                    .await?;
                    run.archived.push(ArchivedPartition {
                        table: table.clone(),
                        partition: p.name.clone(),
                        range_from: from,
                        range_to: to,
                        rows: c.n,
                        bytes: c.bytes,
                        moved: Vec::new(),
                        exclusive: Duration::ZERO,
                        moves_took: Duration::ZERO,
                    });
                    continue;
                }
                let mut a = self
                    .archive_one(conn, table, column, &p.name, from, to, app)
                    .await?;
                tracing::info!(
                    table = %a.table,
                    partition = %a.partition,
                    rows = a.rows,
                    bytes = a.bytes,
                    exclusive_ms = a.exclusive.as_millis() as u64,
                    "retention: archived"
                );
                for (name, moved, took) in self.finish_moves(conn).await? {
                    if name == a.partition {
                        a.moved = moved;
                        a.moves_took = took;
                    }
                }
                run.archived.push(a);
            }
        }
        Ok(())
    }

    /// Archives one partition in a transaction of its own, which holds
    /// ACCESS EXCLUSIVE on the managed table from its DETACH to its COMMIT:
    /// DDL, an exact count of the detached rows and the audit row, nothing
    /// that scans other tables. The [row moves](Retention::move_rows)
    /// follow in [`Retention::finish_moves`].
    #[allow(clippy::too_many_arguments)]
    async fn archive_one(
        &self,
        conn: &mut railyard::conn::Conn,
        table: &str,
        column: &str,
        part: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        app: &str,
    ) -> Result<ArchivedPartition, Error> {
        let bound = self.config.statement_timeout;
        let (t, p, c) = (quote(table), quote(part), quote(column));
        let a = quote(ARCHIVE_SCHEMA);
        let started = Instant::now();
        bounded(bound, conn.batch_execute("BEGIN")).await?;
        let work = async {
            bounded(
                bound,
                conn.batch_execute(&format!(
                    "ALTER TABLE public.{t} DETACH PARTITION public.{p}"
                )),
            )
            .await?;
            // Detached: no row can arrive or leave until COMMIT, so the
            // count is the partition's exact content.
            let counted: Counted = bounded(
                bound,
                diesel::sql_query(format!(
                    "SELECT count(*)::bigint AS n, pg_total_relation_size('public.{p}')::bigint AS bytes FROM public.{p}"
                ))
                .get_result(&mut **conn),
            )
            .await?;
            let fks: Vec<Named> = bounded(
                bound,
                diesel::sql_query(
                    "SELECT conname::text AS name FROM pg_constraint \
                     WHERE conrelid = $1::regclass AND contype = 'f'",
                )
                .bind::<Text, _>(format!("public.{p}"))
                .load(&mut **conn),
            )
            .await?;
            let mut ddl = String::new();
            for fk in fks {
                ddl.push_str(&format!(
                    "ALTER TABLE public.{p} DROP CONSTRAINT {};",
                    quote(&fk.name)
                ));
            }
            ddl.push_str(&format!(
                "CREATE SCHEMA IF NOT EXISTS {a};\
                 CREATE TABLE IF NOT EXISTS {a}.{t} (LIKE public.{t}) PARTITION BY RANGE ({c});\
                 ALTER TABLE public.{p} SET SCHEMA {a};\
                 ALTER TABLE {a}.{t} ATTACH PARTITION {a}.{p} FOR VALUES FROM ('{}') TO ('{}');",
                literal(from),
                literal(to)
            ));
            bounded(bound, conn.batch_execute(&ddl)).await?;
            // With row moves to make, the row is pending until
            // finish_moves records them.
            bounded(
                bound,
                diesel::sql_query(format!(
                    "INSERT INTO {AUDIT_TABLE} (source_table, partition_name, archived_as, range_from, range_to, \
                       row_count, bytes, rows_moved, application_name, instance, backend_pid, client_addr, moves_done_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, '{{}}'::jsonb, $8, $9, pg_backend_pid(), inet_client_addr()::text, \
                       CASE WHEN $10 THEN NULL ELSE now() END)"
                ))
                .bind::<Text, _>(format!("public.{table}"))
                .bind::<Text, _>(part)
                .bind::<Text, _>(format!("{ARCHIVE_SCHEMA}.{part}"))
                .bind::<Timestamptz, _>(from)
                .bind::<Timestamptz, _>(to)
                .bind::<BigInt, _>(counted.n)
                .bind::<BigInt, _>(counted.bytes)
                .bind::<Text, _>(app)
                .bind::<Text, _>(instance())
                .bind::<Bool, _>(!self.moves.is_empty())
                .execute(&mut **conn),
            )
            .await?;
            Ok::<_, Error>(counted)
        };
        match work.await {
            Ok(counted) => {
                bounded(bound, conn.batch_execute("COMMIT")).await?;
                Ok(ArchivedPartition {
                    table: table.to_owned(),
                    partition: part.to_owned(),
                    range_from: from,
                    range_to: to,
                    rows: counted.n,
                    bytes: counted.bytes,
                    moved: Vec::new(),
                    exclusive: started.elapsed(),
                    moves_took: Duration::ZERO,
                })
            }
            Err(e) => {
                let _ = tokio::time::timeout(bound, conn.batch_execute("ROLLBACK")).await;
                Err(Error::Retention(format!(
                    "archiving {part} of {table} failed and was rolled back (the next run tries again): {e}"
                )))
            }
        }
    }

    /// Makes the [row moves](Retention::move_rows) of every archived
    /// partition whose audit row says they are pending (`moves_done_at`
    /// unset), oldest first, one transaction per partition that also marks
    /// its audit row done: a run that died between archiving a partition
    /// and moving its rows is finished by the next. No ACCESS EXCLUSIVE
    /// lock is taken: the moves are DML, each statement bounded by the
    /// `statement_timeout`. Returns each partition's moves and their time.
    async fn finish_moves(
        &self,
        conn: &mut railyard::conn::Conn,
    ) -> Result<Vec<(String, Vec<(String, i64)>, Duration)>, Error> {
        let bound = self.config.statement_timeout;
        let tables: Vec<String> = self
            .tables
            .iter()
            .map(|(t, _)| format!("public.{t}"))
            .collect();
        let pending: Vec<Pending> = bounded(
            bound,
            diesel::sql_query(format!(
                "SELECT id, partition_name AS name, range_to AS at FROM {AUDIT_TABLE} \
                 WHERE moves_done_at IS NULL AND source_table = ANY($1) ORDER BY range_to, id"
            ))
            .bind::<diesel::sql_types::Array<Text>, _>(&tables)
            .load(&mut **conn),
        )
        .await?;
        let mut done = Vec::with_capacity(pending.len());
        for row in pending {
            let started = Instant::now();
            bounded(bound, conn.batch_execute("BEGIN")).await?;
            let work = async {
                let mut moved = Vec::new();
                for m in &self.moves {
                    let n = bounded(
                        bound,
                        diesel::sql_query(&m.sql)
                            .bind::<Timestamptz, _>(row.at)
                            .execute(&mut **conn),
                    )
                    .await?;
                    moved.push((m.name.clone(), n as i64));
                }
                let json = serde_json::to_string(
                    &moved
                        .iter()
                        .cloned()
                        .collect::<std::collections::BTreeMap<String, i64>>(),
                )
                .unwrap_or_else(|_| "{}".into());
                bounded(
                    bound,
                    diesel::sql_query(format!(
                        "UPDATE {AUDIT_TABLE} SET rows_moved = rows_moved || $1::jsonb, moves_done_at = now() WHERE id = $2"
                    ))
                    .bind::<Text, _>(json)
                    .bind::<BigInt, _>(row.id)
                    .execute(&mut **conn),
                )
                .await?;
                Ok::<_, Error>(moved)
            };
            match work.await {
                Ok(moved) => {
                    bounded(bound, conn.batch_execute("COMMIT")).await?;
                    tracing::info!(partition = %row.name, moved = ?moved, "retention: rows moved after their partition");
                    done.push((row.name, moved, started.elapsed()));
                }
                Err(e) => {
                    let _ = tokio::time::timeout(bound, conn.batch_execute("ROLLBACK")).await;
                    return Err(Error::Retention(format!(
                        "moving the rows that follow archived partition {} failed and was rolled back (the partition stays archived; the next run moves them): {e}",
                        row.name
                    )));
                }
            }
        }
        Ok(done)
    }

    /// Makes the missing monthly partitions: this month and `premake` ahead,
    /// and the months of rows waiting in the default partition.
    async fn make_partitions(&self, conn: &mut railyard::conn::Conn) -> Result<Vec<String>, Error> {
        let bound = self.config.statement_timeout;
        let mut made = Vec::new();
        let now = Utc::now();
        for (table, column) in &self.tables {
            let parent = format!("public.{table}");
            let existing = partitions(conn, &parent, bound).await?;
            let archived = partitions(conn, &format!("{ARCHIVE_SCHEMA}.{table}"), bound).await?;
            let default: Option<Named> = bounded(
                bound,
                diesel::sql_query(
                    "SELECT c.relname::text AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                     WHERE i.inhparent = to_regclass($1) AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT'",
                )
                .bind::<Text, _>(&parent)
                .get_result(&mut **conn),
            )
            .await
            .map(Some)
            .or_else(|e| match e {
                Error::Core(railyard::Error::Query(diesel::result::Error::NotFound)) => Ok(None),
                e => Err(e),
            })?;
            let mut months: Vec<DateTime<Utc>> = (0..=self.config.premake)
                .map(|k| month_start(now, k as i32))
                .collect();
            if let Some(d) = &default {
                let waiting: Vec<At> = bounded(
                    bound,
                    diesel::sql_query(format!(
                        "SELECT DISTINCT date_trunc('month', {c} AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS at FROM public.{d}",
                        c = quote(column),
                        d = quote(&d.name)
                    ))
                    .load(&mut **conn),
                )
                .await?;
                months.extend(waiting.into_iter().map(|w| w.at));
            }
            months.sort();
            months.dedup();
            for m in months {
                let covered = |ps: &[Part]| {
                    ps.iter().any(|p| {
                        matches!((p.range_from, p.range_to), (Some(f), Some(t)) if f <= m && m < t)
                    })
                };
                if covered(&existing) {
                    continue;
                }
                let name = format!("{table}_p{:04}_{:02}", m.year(), m.month());
                if covered(&archived) || archived.iter().any(|p| p.name == name) {
                    tracing::warn!(
                        partition = %name,
                        "retention: rows for a month already archived wait in the default partition; move them by hand"
                    );
                    continue;
                }
                let next = month_start(m, 1);
                let (t, p, c) = (quote(table), quote(&name), quote(column));
                let (f, u) = (literal(m), literal(next));
                let ddl = match &default {
                    // Rows of the month may wait in the default partition:
                    // move them into a table of their own, then attach it.
                    Some(d) => format!(
                        "BEGIN;\
                         CREATE TABLE public.{p} (LIKE public.{t} INCLUDING DEFAULTS INCLUDING CONSTRAINTS);\
                         WITH moved AS (DELETE FROM public.{d} WHERE {c} >= '{f}' AND {c} < '{u}' RETURNING *) \
                           INSERT INTO public.{p} SELECT * FROM moved;\
                         ALTER TABLE public.{t} ATTACH PARTITION public.{p} FOR VALUES FROM ('{f}') TO ('{u}');\
                         COMMIT;",
                        d = quote(&d.name)
                    ),
                    None => format!(
                        "CREATE TABLE public.{p} PARTITION OF public.{t} FOR VALUES FROM ('{f}') TO ('{u}')"
                    ),
                };
                if let Err(e) = bounded(bound, conn.batch_execute(&ddl)).await {
                    let _ = tokio::time::timeout(bound, conn.batch_execute("ROLLBACK")).await;
                    return Err(Error::Retention(format!(
                        "making partition {name} of {table} failed and was rolled back (the next run tries again): {e}"
                    )));
                }
                tracing::info!(partition = %name, "retention: partition made");
                made.push(name);
            }
        }
        Ok(made)
    }
}

/// The first instant (UTC) of the month `k` months after `t`'s.
fn month_start(t: DateTime<Utc>, k: i32) -> DateTime<Utc> {
    let total = t.year() * 12 + t.month0() as i32 + k;
    Utc.with_ymd_and_hms(
        total.div_euclid(12),
        total.rem_euclid(12) as u32 + 1,
        1,
        0,
        0,
        0,
    )
    .single()
    .expect("the first of a month at midnight UTC exists")
}

fn literal(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{host}:{}", std::process::id())
}

/// A run holds a session advisory lock and sets `lock_timeout` and
/// `statement_timeout` for its session; behind a transaction-mode pooler a
/// session lasts one transaction, so neither would hold. Refused, naming the
/// setting, rather than run without its exclusion.
fn refuse_per_transaction(pooler: railyard::config::Pooler) -> Result<(), Error> {
    if pooler.per_transaction() {
        return Err(Error::from(ConfigError::new(
            "RAILYARD_POOLER (Config::pooler)",
            pooler.as_str(),
            "retention needs a session of its own (a session advisory lock, session timeouts); \
             run it through a direct connection to PostgreSQL or a session-mode pool \
             (RAILYARD_POOLER=none or pgbouncer-session), for example from one instance or `railyard retain` configured that way",
        )));
    }
    Ok(())
}

fn audit_ddl() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {AUDIT_TABLE} (\
           id BIGSERIAL PRIMARY KEY,\
           archived_at TIMESTAMPTZ NOT NULL DEFAULT now(),\
           source_table TEXT NOT NULL,\
           partition_name TEXT NOT NULL,\
           archived_as TEXT NOT NULL,\
           range_from TIMESTAMPTZ NOT NULL,\
           range_to TIMESTAMPTZ NOT NULL,\
           row_count BIGINT NOT NULL,\
           bytes BIGINT NOT NULL,\
           rows_moved JSONB NOT NULL DEFAULT '{{}}',\
           application_name TEXT NOT NULL,\
           instance TEXT NOT NULL,\
           backend_pid INT NOT NULL,\
           client_addr TEXT,\
           moves_done_at TIMESTAMPTZ,\
           UNIQUE (source_table, partition_name));\
         ALTER TABLE {AUDIT_TABLE} ADD COLUMN IF NOT EXISTS moves_done_at TIMESTAMPTZ DEFAULT now();\
         ALTER TABLE {AUDIT_TABLE} ALTER COLUMN moves_done_at DROP DEFAULT;"
    )
}

async fn try_lock(conn: &mut AsyncPgConnection, bound: Duration) -> Result<Option<i32>, Error> {
    let got: Flag = bounded(
        bound,
        diesel::sql_query("SELECT pg_try_advisory_lock($1) AS ok")
            .bind::<BigInt, _>(LOCK_KEY)
            .get_result(conn),
    )
    .await?;
    if got.ok {
        return Ok(None);
    }
    let holder: Option<Pid> = bounded(
        bound,
        diesel::sql_query(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND classid = ($1 >> 32)::bigint::oid AND objid = ($1 & 4294967295)::bigint::oid AND objsubid = 1 LIMIT 1",
        )
        .bind::<BigInt, _>(LOCK_KEY)
        .get_result(conn),
    )
    .await
    .ok();
    Ok(Some(holder.map(|h| h.pid).unwrap_or(0)))
}

async fn unlock(conn: &mut AsyncPgConnection) {
    // The connection is dedicated and dropped after the run, which releases
    // the lock anyway.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        diesel::sql_query("SELECT pg_advisory_unlock($1) AS ok")
            .bind::<BigInt, _>(LOCK_KEY)
            .get_result::<Flag>(conn),
    )
    .await;
}

async fn partitions(
    conn: &mut AsyncPgConnection,
    parent: &str,
    bound: Duration,
) -> Result<Vec<Part>, Error> {
    bounded(
        bound,
        diesel::sql_query(
            "SELECT c.relname::text AS name, \
               (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\) TO \\(''([^'']+)''\\)'))[1]::timestamptz AS range_from, \
               (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\) TO \\(''([^'']+)''\\)'))[2]::timestamptz AS range_to \
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = to_regclass($1) AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT' \
             ORDER BY 2, 1",
        )
        .bind::<Text, _>(parent)
        .load(conn),
    )
    .await
}

async fn bounded<T>(
    bound: Duration,
    f: impl Future<Output = diesel::QueryResult<T>>,
) -> Result<T, Error> {
    // The server's statement_timeout fires first; this is the backstop for
    // a server that does not answer at all.
    let limit = bound + Duration::from_secs(5);
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(Error::from),
        Err(_) => Err(Error::timeout(
            limit,
            "a retention statement did not finish",
        )),
    }
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Counted {
    #[diesel(sql_type = BigInt)]
    n: i64,
    #[diesel(sql_type = BigInt)]
    bytes: i64,
}

#[derive(QueryableByName)]
struct Named {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName)]
struct At {
    #[diesel(sql_type = Timestamptz)]
    at: DateTime<Utc>,
}

#[derive(QueryableByName)]
struct Cutoff {
    #[diesel(sql_type = Timestamptz)]
    at: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    app: String,
}

#[derive(QueryableByName)]
struct Pending {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Timestamptz)]
    at: DateTime<Utc>,
}

#[derive(QueryableByName)]
struct Flag {
    #[diesel(sql_type = Bool)]
    ok: bool,
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
}

#[derive(QueryableByName)]
struct Part {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    range_from: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    range_to: Option<DateTime<Utc>>,
}

/// A partition a run archived (or, in a dry run, would archive).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ArchivedPartition {
    /// The managed table.
    pub table: String,
    /// The partition's name (the same in the archive schema).
    pub partition: String,
    /// Its lower bound.
    pub range_from: DateTime<Utc>,
    /// Its upper bound (exclusive).
    pub range_to: DateTime<Utc>,
    /// Its rows.
    pub rows: i64,
    /// Its bytes, indexes included.
    pub bytes: i64,
    /// Rows each row move took along.
    pub moved: Vec<(String, i64)>,
    /// How long the transaction that archived it took: from its DETACH to
    /// its COMMIT, the managed table was locked ACCESS EXCLUSIVE.
    pub exclusive: Duration,
    /// How long its row moves took (a transaction of their own, after).
    pub moves_took: Duration,
}

/// What one run did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetentionRun {
    /// Why it did nothing (another instance held the lock).
    pub skipped: Option<String>,
    /// It only listed what it would archive.
    pub dry_run: bool,
    /// Partitions ending at or before this were archived.
    pub cutoff: DateTime<Utc>,
    /// Partitions made.
    pub created: Vec<String>,
    /// Partitions archived, oldest first.
    pub archived: Vec<ArchivedPartition>,
    /// The sizes before.
    pub before: StorageFigures,
    /// The sizes after.
    pub after: StorageFigures,
    /// How long it took.
    pub took: Duration,
}

struct JobState {
    last: Mutex<Option<Result<RetentionRun, String>>>,
    runs: AtomicU64,
    early: AtomicU64,
    wake: tokio::sync::Notify,
}

/// The retention job: runs a [`Retention`] on its schedule, and early when
/// the live bytes pass the threshold. Dropping the handle stops it;
/// [`RetentionJob::shutdown`] waits for a run in progress (bounded).
///
/// ```no_run
/// # async fn demo(db: railyard::Database, retention: railyard_ops::retain::Retention) {
/// use std::time::Duration;
/// let job = railyard_ops::retain::RetentionJob::spawn(db, retention);
/// // … serve …
/// job.shutdown(Duration::from_secs(5)).await;
/// # }
/// ```
pub struct RetentionJob {
    state: Arc<JobState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for RetentionJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetentionJob")
            .field("runs", &self.runs())
            .finish_non_exhaustive()
    }
}

impl RetentionJob {
    /// Starts the job on the current runtime: a run at once, then every
    /// [`RetentionConfig::every`]; sizes measured every
    /// [`RetentionConfig::check_every`], with an early run when the live
    /// bytes are over the threshold (unless the last run already found it
    /// could not free enough).
    pub fn spawn(db: Database, retention: Retention) -> Self {
        let state = Arc::new(JobState {
            last: Mutex::new(None),
            runs: AtomicU64::new(0),
            early: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
        });
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let s = state.clone();
        let task = tokio::spawn(async move {
            let config = retention.config.clone();
            let mut next_run = tokio::time::Instant::now();
            let mut cannot_free = false;
            loop {
                let next_check = tokio::time::Instant::now() + config.check_every;
                let forced = tokio::select! {
                    _ = &mut stopped => break,
                    () = s.wake.notified() => true,
                    () = tokio::time::sleep_until(next_run.min(next_check)) => false,
                };
                let now = tokio::time::Instant::now();
                let mut due = forced || now >= next_run;
                if !due {
                    match retention.measure(&db).await {
                        Ok(mut f) => {
                            f.cannot_free = cannot_free && f.over_threshold();
                            let over = f.over_threshold();
                            record_storage(&db, f);
                            if over && !cannot_free {
                                tracing::info!(
                                    "retention: live history over its size threshold; running early"
                                );
                                s.early.fetch_add(1, Ordering::Relaxed);
                                due = true;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "retention: cannot measure sizes"),
                    }
                }
                if !due {
                    continue;
                }
                let outcome = retention.run(&db, false).await;
                match &outcome {
                    Ok(r) if r.skipped.is_none() => cannot_free = r.after.cannot_free,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "retention: run failed; the next run tries again")
                    }
                }
                // The report first, then the count: whoever sees `runs`
                // change finds this run's report in `last_run`.
                *s.last.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(outcome.map_err(|e| e.to_string()));
                s.runs.fetch_add(1, Ordering::Release);
                next_run = tokio::time::Instant::now() + config.every;
            }
        });
        RetentionJob {
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Asks for a run now (it starts when the current one, if any, ends).
    pub fn run_now(&self) {
        self.state.wake.notify_one();
    }

    /// Runs finished (done, skipped or failed).
    pub fn runs(&self) -> u64 {
        AtomicU64::load(&self.state.runs, Ordering::Acquire)
    }

    /// Runs started early because the live bytes were over the threshold.
    pub fn early_runs(&self) -> u64 {
        AtomicU64::load(&self.state.early, Ordering::Relaxed)
    }

    /// The last run's report, or its error.
    pub fn last_run(&self) -> Option<Result<RetentionRun, String>> {
        self.state
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops the job, waiting at most `within` for a run in progress (then
    /// aborting it: its transaction rolls back with its connection).
    pub async fn shutdown(mut self, within: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(within, &mut task).await.is_err()
        {
            task.abort();
        }
    }
}

impl Drop for RetentionJob {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_named_in_errors() {
        let e = RetentionConfig::from_vars([("RAILYARD_RETENTION", "90")]).unwrap_err();
        assert_eq!(e.field, ENV_PERIOD);
        let e = RetentionConfig::from_vars([
            ("RAILYARD_RETENTION", "90d"),
            ("RAILYARD_RETENTION_SIZE_THRESHOLD", "10 parsecs"),
        ])
        .unwrap_err();
        assert_eq!(e.field, ENV_SIZE_THRESHOLD);
        let e = RetentionConfig::from_vars([("RAILYARD_RETENTION_PREMAKE", "3")]).unwrap_err();
        assert_eq!(e.field, ENV_PREMAKE);
        let e = RetentionConfig::from_vars([
            ("RAILYARD_RETENTION", "90d"),
            ("RAILYARD_RETENTION_PREMAKE", "99"),
        ])
        .unwrap_err();
        assert_eq!(e.field, ENV_PREMAKE);
        let e = RetentionConfig::from_vars([("RAILYARD_RETENTION", "5m")]).unwrap_err();
        assert_eq!(e.field, ENV_PERIOD);
        assert!(RetentionConfig::from_vars([("X", "1")]).unwrap().is_none());
        let c = RetentionConfig::from_vars([
            ("RAILYARD_RETENTION", "90d"),
            ("RAILYARD_RETENTION_SIZE_THRESHOLD", "off"),
            ("RAILYARD_RETENTION_EVERY", "10m"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.size_threshold, None);
        assert_eq!(c.every, Duration::from_secs(600));
    }

    #[test]
    fn a_transaction_mode_pooler_is_refused() {
        use railyard::config::Pooler;
        let e = refuse_per_transaction(Pooler::PgBouncerTransaction).unwrap_err();
        let Error::Core(railyard::Error::Config(c)) = &e else {
            panic!("{e:?}")
        };
        assert!(c.field.contains("RAILYARD_POOLER"), "{e}");
        assert!(refuse_per_transaction(Pooler::PgBouncerSession).is_ok());
        assert!(refuse_per_transaction(Pooler::None).is_ok());
    }

    #[test]
    fn months() {
        let t = Utc.with_ymd_and_hms(2026, 11, 24, 3, 0, 0).unwrap();
        assert_eq!(literal(month_start(t, 0)), "2026-11-01 00:00:00.000000+00");
        assert_eq!(literal(month_start(t, 2)), "2027-01-01 00:00:00.000000+00");
        assert_eq!(
            literal(month_start(t, -11)),
            "2025-12-01 00:00:00.000000+00"
        );
    }
}

/// What a retention job last measured, kept on the handle so that its
/// health and metrics show the job's figures (with its threshold and
/// verdict) instead of the core's own measurement.
#[derive(Default)]
struct RecordedStorage(std::sync::Mutex<Option<railyard::observe::StorageFigures>>);

impl railyard::database::Attachment for RecordedStorage {
    fn storage(&self) -> Option<railyard::observe::StorageFigures> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Records what a storage measurement found on `db`: `/health` gains a
/// `storage` check and `/metrics` the sizes from then on.
pub fn record_storage(db: &Database, figures: railyard::observe::StorageFigures) {
    *db.attachment::<RecordedStorage>()
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(figures);
}
