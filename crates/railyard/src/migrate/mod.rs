//! Boot-time migrations that are safe with many instances.
//!
//! [`Migrator::run`] opens a dedicated connection to the primary and:
//!
//! 1. takes a session advisory lock with `pg_try_advisory_lock`, polled until the
//!    lock timeout (a blocking waiter would deadlock with `CREATE INDEX
//!    CONCURRENTLY`); on timeout the error names the holder's backend pid;
//! 2. re-reads the applied set *after* taking the lock;
//! 3. refuses to go on when an applied migration's SHA-256 (of its up and down
//!    SQL) differs from the embedded one, or when the database holds a version the
//!    binary does not know — naming the version;
//! 4. runs each pending migration through diesel's [`Migration`] trait in its own
//!    transaction, together with its rows in diesel's `__diesel_schema_migrations`
//!    and in Railyard's `railyard_schema_migrations` (checksums, duration), so a
//!    failing migration leaves nothing behind;
//! 5. releases the lock, also on failure.
//!
//! diesel's harness is synchronous: the work runs on a blocking thread through
//! diesel-async's `AsyncConnectionWrapper`, which works on both runtime flavours.
//!
//! Migrations applied earlier by the diesel CLI have no checksum row; the first
//! boot records the embedded checksum for them ("adopted"). A version recorded
//! in Railyard's table but missing from diesel's is refused, like an unknown one.
//!
//! # Editing the newest migration while developing
//!
//! An edited migration is refused at boot. While a migration is still being
//! written (`diesel migration redo` after each edit), set
//! `RAILYARD_MIGRATIONS_ALLOW_EDITED=latest` (or call
//! [`Migrator::allow_edited_latest`]): the newest migration, and only it, may
//! differ from what was applied; boot logs a warning and records the new
//! checksum. Its SQL is not run again: redo it with `diesel migration redo` or
//! `railyard migrate redo`. The setting is refused in release builds.
//! [`Migrator::redo_last`] and [`Migrator::repair_last`] are the same tools as
//! functions (the reference CLI's `migrate redo` and `migrate repair`).
//!
//! # Risky migrations: a backup first
//!
//! A migration whose `up.sql` begins with the line
//!
//! ```sql
//! -- railyard: risky tables=orders,trades
//! ```
//!
//! (or only `-- railyard: risky`) is applied only after a backup was taken,
//! under the migration lock: with pgBackRest when
//! [`Migrator::backup_before_risky`] says so, otherwise with `pg_dump`
//! (custom format, compressed) of the listed tables — of the whole database,
//! schema and data, when none is listed — into the directory given there or
//! in `RAILYARD_MIGRATION_BACKUP_DIR`. The backup is recorded in
//! `railyard_migration_backups` (version, kind, file or label, time), which
//! [`Migrator::status`] reports. The partitions of a partitioned table in
//! `tables=` are dumped with it. Behind a transaction-mode pooler the backup
//! is taken between the locked transactions, with none open, and its record
//! committed before the migration's transaction begins. When the backup fails, or none is
//! configured, the migration is not applied and the run fails with
//! [`MigrationError::BackupFailed`] naming it. The header is an SQL comment:
//! diesel and the server ignore it, and it is part of the checksum.
//!
//! # Picking up new migrations in incremental builds
//!
//! `embed_migrations!` reads the directory at compile time, and cargo does not
//! know that: a migration added after the last build is missing from the next
//! binary unless the package has a `build.rs` that says
//! `println!("cargo:rerun-if-changed=migrations");` (this crate's does).

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::{BoxableConnection, Connection, SimpleConnection};
use diesel::migration::{Migration, MigrationSource};
use diesel::pg::Pg;
use diesel::sql_types::{Double, Nullable, Text};
use diesel::{QueryableByName, RunQueryDsl};
use diesel_async::AsyncPgConnection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use sha2::{Digest, Sha256};

use crate::config::{Config, ConnectTarget, TargetSessionAttrs};
use crate::conn::open::Opener;
use crate::error::{Error, MigrationError};

mod before;
pub mod dump;
#[doc(hidden)]
pub mod tool;

pub use before::{BackupError, BackupTaken, BeforeRisky, RiskyBackup};
pub use dump::Dump;

type Source = Arc<dyn MigrationSource<Pg> + Send + Sync>;
type SyncConn = AsyncConnectionWrapper<AsyncPgConnection>;

/// Runs, checks and reverts a set of migrations (usually
/// `diesel_migrations::embed_migrations!()`).
///
/// # Example
/// ```no_run
/// use diesel_migrations::{embed_migrations, EmbeddedMigrations};
/// # const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations");
/// # /*
/// const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");
/// # */
///
/// # async fn boot() -> Result<(), railyard::Error> {
/// let config = railyard::Config::from_env()?;
/// let report = railyard::Migrator::new(MIGRATIONS).run(&config).await?;
/// println!("applied {} migrations", report.applied.len());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Migrator {
    source: Source,
    lock_timeout: Option<Duration>,
    allow_edited_latest: bool,
    before_risky: Option<BeforeRisky>,
    backup_env: bool,
}

/// The environment variable naming the directory of the `pg_dump` taken
/// before a risky migration, when [`Migrator::backup_before_risky`] is not
/// called.
pub const BACKUP_DIR_VAR: &str = "RAILYARD_MIGRATION_BACKUP_DIR";

/// The backup taken before a risky migration, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationBackup {
    /// `pg_dump` or `pgbackrest`.
    pub kind: String,
    /// The dump's path, or the pgBackRest backup's label.
    pub location: String,
    /// When it was taken.
    pub taken_at: std::time::SystemTime,
    /// Its size in bytes, when known.
    pub bytes: Option<i64>,
}

/// The environment variable of the development override for edited migrations.
pub const ALLOW_EDITED_VAR: &str = "RAILYARD_MIGRATIONS_ALLOW_EDITED";

impl fmt::Debug for Migrator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Migrator")
            .field("lock_timeout", &self.lock_timeout)
            .finish_non_exhaustive()
    }
}

/// One migration applied by a run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AppliedMigration {
    /// The migration version (digits of its directory name's prefix).
    pub version: String,
    /// The directory name.
    pub name: String,
    /// How long its SQL took.
    pub duration: Duration,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct MigrationReport {
    /// Migrations applied by this run, in order.
    pub applied: Vec<AppliedMigration>,
    /// How many were already applied.
    pub already_applied: usize,
    /// Versions applied earlier without a checksum (by the diesel CLI) whose
    /// checksum this run recorded.
    pub adopted: Vec<String>,
    /// The newest migration, edited after it was applied, whose new checksum
    /// this run recorded under the development override (see the module docs).
    pub accepted_edits: Vec<String>,
    /// Time spent waiting for the lock.
    pub lock_wait: Duration,
    /// Wall time of the whole run, connection included.
    pub total: Duration,
}

/// Whether an applied migration still matches the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChecksumState {
    /// The recorded checksum equals the embedded one.
    Verified,
    /// The embedded SQL differs from what was applied.
    Edited,
    /// Applied without a checksum (by the diesel CLI); recorded at the next boot.
    Unrecorded,
}

/// The state of one version.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum MigrationState {
    /// Applied to the database.
    Applied {
        /// Checksum comparison with the embedded SQL.
        checksum: ChecksumState,
        /// Recorded duration, when Railyard applied it.
        duration: Option<Duration>,
    },
    /// Embedded but not applied yet.
    Pending,
    /// Applied to the database but unknown to this binary.
    Unknown,
    /// Recorded in `railyard_schema_migrations` but not in diesel's table.
    Orphaned,
}

/// One row of [`Migrator::status`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MigrationStatus {
    /// The version.
    pub version: String,
    /// The directory name (empty for unknown versions).
    pub name: String,
    /// Applied, pending or unknown.
    pub state: MigrationState,
    /// Whether `up.sql` is marked risky (see the module docs).
    pub risky: bool,
    /// The newest backup taken before it (risky migrations).
    pub backup: Option<MigrationBackup>,
}

struct Known {
    version: String,
    name: String,
    up_sha: String,
    down_sha: String,
    /// `Some(tables)` when `up.sql` is marked risky (no tables: all of them).
    risky: Option<Vec<String>>,
    migration: Box<dyn Migration<Pg>>,
}

/// A connection that records the SQL a migration sends instead of running it:
/// how the checksums of embedded migrations are computed without access to
/// their private fields.
struct Recorder(Vec<String>);

impl SimpleConnection for Recorder {
    fn batch_execute(&mut self, query: &str) -> diesel::QueryResult<()> {
        self.0.push(query.to_owned());
        Ok(())
    }
}

impl BoxableConnection<Pg> for Recorder {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The first 12 characters of a checksum, for messages (a recorded value may have
/// been tampered with: never slice blindly).
fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

fn sha_hex(parts: &[String]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    h.finalize()
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            use std::fmt::Write;
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[derive(QueryableByName)]
struct AppliedRow {
    #[diesel(sql_type = Text)]
    version: String,
    #[diesel(sql_type = Nullable<Text>)]
    up_sha256: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    down_sha256: Option<String>,
    #[diesel(sql_type = Nullable<Double>)]
    duration_ms: Option<f64>,
}

#[derive(QueryableByName)]
struct Flag {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    ok: bool,
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
}

const CREATE_OURS: &str = "CREATE TABLE IF NOT EXISTS railyard_schema_migrations (
    version VARCHAR(50) PRIMARY KEY,
    name TEXT NOT NULL,
    up_sha256 TEXT NOT NULL,
    down_sha256 TEXT NOT NULL,
    duration_ms DOUBLE PRECISION,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)";

fn q(e: diesel::result::Error) -> Error {
    Error::bookkeeping("reading or writing the migration tables", e)
}

impl Migrator {
    /// The session advisory lock key that serialises migration runs: the bytes of
    /// "RAILYARD" in ASCII. Operators can find a holder with
    /// `SELECT pid FROM pg_locks WHERE locktype = 'advisory'`.
    pub const LOCK_KEY: i64 = 0x5241_494c_5941_5244;

    /// A migrator for a migration source, usually the constant produced by
    /// `diesel_migrations::embed_migrations!()`.
    pub fn new(source: impl MigrationSource<Pg> + Send + Sync + 'static) -> Self {
        Migrator {
            source: Arc::new(source),
            lock_timeout: None,
            allow_edited_latest: false,
            before_risky: None,
            backup_env: true,
        }
    }

    /// How to back up before a migration marked risky (see the module
    /// docs). Without it, `pg_dump` into `RAILYARD_MIGRATION_BACKUP_DIR`;
    /// without that either, a risky migration is refused.
    #[must_use]
    pub fn backup_before_risky(mut self, how: BeforeRisky) -> Self {
        self.before_risky = Some(how);
        self
    }

    /// Whether `RAILYARD_MIGRATION_BACKUP_DIR` is read when
    /// [`Migrator::backup_before_risky`] was not called (the default). With
    /// `false` and no backup configured, a risky migration is refused
    /// whatever the environment says.
    #[must_use]
    pub fn backup_dir_from_env(mut self, read: bool) -> Self {
        self.backup_env = read;
        self
    }

    /// The configured backup, or the environment's.
    fn before_risky(&self) -> Option<BeforeRisky> {
        self.before_risky.clone().or_else(|| {
            if !self.backup_env {
                return None;
            }
            std::env::var_os(BACKUP_DIR_VAR)
                .filter(|v| !v.is_empty())
                .map(BeforeRisky::pg_dump)
        })
    }

    /// Development only: accept an edit of the newest migration after it was
    /// applied, recording its new checksum (see the module docs). Also turned
    /// on by `RAILYARD_MIGRATIONS_ALLOW_EDITED=latest`. A run fails when this
    /// is on in a release build.
    #[must_use]
    pub fn allow_edited_latest(mut self, yes: bool) -> Self {
        self.allow_edited_latest = yes;
        self
    }

    /// Whether an edit of the newest migration is accepted: the setter or the
    /// variable, in a debug build only.
    fn edits_allowed(&self) -> Result<bool, Error> {
        let from_env = match std::env::var(ALLOW_EDITED_VAR) {
            Err(_) => false,
            Ok(v) if v.is_empty() => false,
            Ok(v) if v == "latest" => true,
            Ok(v) => {
                return Err(Error::Migration(MigrationError::Setting {
                    setting: ALLOW_EDITED_VAR.into(),
                    reason: format!(
                        "{:?} is not understood; the only value is `latest` (or unset it)",
                        v.chars().take(40).collect::<String>()
                    ),
                }));
            }
        };
        let allowed = from_env || self.allow_edited_latest;
        if allowed && !cfg!(debug_assertions) {
            return Err(Error::Migration(MigrationError::Setting {
                setting: if from_env {
                    ALLOW_EDITED_VAR.into()
                } else {
                    "Migrator::allow_edited_latest".into()
                },
                reason: "accepting edited migrations is a development setting, and this is a release build; unset it and add a new migration instead".into(),
            }));
        }
        Ok(allowed)
    }

    /// How long to wait for another instance's lock. Defaults to the config's
    /// `migration_lock_timeout` (60 s).
    #[must_use]
    pub fn lock_timeout(mut self, d: Duration) -> Self {
        self.lock_timeout = Some(d);
        self
    }

    /// A short digest of every migration's version and checksums: equal for
    /// equal migration sets (the test harness names its template database by it).
    pub fn fingerprint(&self) -> Result<String, Error> {
        let parts: Vec<String> = self
            .load()?
            .iter()
            .map(|k| format!("{}:{}:{}", k.version, k.up_sha, k.down_sha))
            .collect();
        Ok(sha_hex(&parts)[..12].to_owned())
    }

    /// Versions and names of the embedded migrations, in order.
    pub fn versions(&self) -> Result<Vec<(String, String)>, Error> {
        Ok(self
            .load()?
            .into_iter()
            .map(|k| (k.version, k.name))
            .collect())
    }

    fn load(&self) -> Result<Vec<Known>, Error> {
        load(&self.source)
    }

    async fn connect(config: &Config) -> Result<AsyncPgConnection, Error> {
        let opener = Opener::new(
            config.primary.clone(),
            Arc::new(config.clone()),
            TargetSessionAttrs::ReadWrite,
        )?;
        Ok(opener.open().await?.into_inner())
    }

    /// Connects to the primary and applies pending migrations under the lock.
    pub async fn run(&self, config: &Config) -> Result<MigrationReport, Error> {
        let started = Instant::now();
        let conn = Self::connect(config).await?;
        let lock_timeout = self.lock_timeout.unwrap_or(config.migration_lock_timeout);
        if config.profile() == crate::config::Profile::Production && self.edits_allowed()? {
            return Err(Error::Migration(MigrationError::Setting {
                setting: ALLOW_EDITED_VAR.into(),
                reason: "the production profile (RAILYARD_ENV=production) never accepts edited migrations; unset it and add a new migration instead".into(),
            }));
        }
        let mut report = self
            .run_with(
                conn,
                lock_timeout,
                config.pooler.per_transaction(),
                Some(config.primary.clone()),
            )
            .await?;
        report.total = started.elapsed();
        Ok(report)
    }

    /// Applies pending migrations on the given connection (it is closed afterwards).
    pub async fn run_on(
        &self,
        conn: AsyncPgConnection,
        lock_timeout: Duration,
    ) -> Result<MigrationReport, Error> {
        self.run_with(conn, lock_timeout, false, None).await
    }

    /// Applies pending migrations under the session lock, or, behind a
    /// transaction-mode pooler (where a session lock can be taken on one
    /// server connection and released on another, or taken twice through one
    /// shared server connection), one migration per transaction under a
    /// transaction-scoped lock.
    async fn run_with(
        &self,
        conn: AsyncPgConnection,
        lock_timeout: Duration,
        per_transaction: bool,
        target: Option<ConnectTarget>,
    ) -> Result<MigrationReport, Error> {
        let started = Instant::now();
        let source = self.source.clone();
        let allow = self.edits_allowed()?;
        let backup = Backup {
            how: self.before_risky(),
            target,
            per_transaction,
            handle: tokio::runtime::Handle::current(),
        };
        let mut report = blocking(conn, move |c| {
            let known = load(&source)?;
            // The common boot: everything applied and unchanged. Checking that
            // needs no lock (only committed history is read) and writes nothing.
            let applied = read_applied(c)?;
            if applied.recorded
                && check_history(&applied, &known, allow)?.is_empty()
                && known
                    .iter()
                    .all(|k| applied.rows.iter().any(|a| a.version == k.version))
            {
                return Ok(MigrationReport {
                    already_applied: applied.rows.len(),
                    ..MigrationReport::default()
                });
            }
            if per_transaction {
                return apply_in_transactions(c, &known, allow, lock_timeout, &backup);
            }
            with_lock(c, lock_timeout, |c, lock_wait| {
                let mut report = apply_pending(c, &known, allow, &backup)?;
                report.lock_wait = lock_wait;
                Ok(report)
            })
        })
        .await?;
        report.total = started.elapsed();
        Ok(report)
    }

    /// Lists every version: applied (with its checksum state), pending or unknown.
    /// Reads only; takes no lock.
    pub async fn status(&self, config: &Config) -> Result<Vec<MigrationStatus>, Error> {
        let conn = Self::connect(config).await?;
        let source = self.source.clone();
        blocking(conn, move |c| {
            let known = load(&source)?;
            status(c, &known)
        })
        .await
    }

    /// As [`status`](Self::status), on a connection the caller has (a pooled
    /// one: health probes use this, so they open no connection of their own).
    pub async fn status_on(
        &self,
        conn: &mut AsyncPgConnection,
    ) -> Result<Vec<MigrationStatus>, Error> {
        use diesel_async::RunQueryDsl as Async;
        let tables: Tables = Async::get_result(diesel::sql_query(TABLES_SQL), conn)
            .await
            .map_err(q)?;
        let orphans: Vec<VersionRow> = match orphans_sql(&tables) {
            Some(sql) => Async::load(diesel::sql_query(sql), conn).await.map_err(q)?,
            None => Vec::new(),
        };
        let rows: Vec<AppliedRow> = match applied_sql(&tables) {
            Some(sql) => Async::load(diesel::sql_query(sql), conn).await.map_err(q)?,
            None => Vec::new(),
        };
        let backups: Vec<BackupRow> = if tables.backups {
            Async::load(diesel::sql_query(BACKUPS_SQL), conn)
                .await
                .map_err(q)?
        } else {
            Vec::new()
        };
        let applied = Applied {
            rows,
            recorded: tables.ours,
            orphans: orphans.into_iter().map(|r| r.version).collect(),
        };
        // Loaded after the queries: embedded migrations are not `Send`.
        let known = load(&self.source)?;
        Ok(with_backups(status_of(applied, &known), backups))
    }

    /// Checks without running anything: errors when an applied migration was
    /// edited or is unknown; returns the pending versions otherwise.
    pub async fn verify(&self, config: &Config) -> Result<Vec<String>, Error> {
        let conn = Self::connect(config).await?;
        let source = self.source.clone();
        blocking(conn, move |c| {
            let known = load(&source)?;
            let applied = read_applied(c)?;
            check_history(&applied, &known, false)?;
            Ok(known
                .iter()
                .filter(|k| !applied.rows.iter().any(|a| a.version == k.version))
                .map(|k| k.version.clone())
                .collect())
        })
        .await
    }

    /// Reverts the most recently applied migration under the lock; returns its
    /// version, or `None` when nothing is applied.
    pub async fn revert_last(&self, config: &Config) -> Result<Option<String>, Error> {
        let conn = Self::connect(config).await?;
        let source = self.source.clone();
        let lock_timeout = self.lock_timeout.unwrap_or(config.migration_lock_timeout);
        blocking(conn, move |c| {
            let known = load(&source)?;
            with_lock(c, lock_timeout, |c, _| revert_last(c, &known))
        })
        .await
    }

    /// Reverts the newest applied migration with this binary's `down.sql` and
    /// applies it again with its `up.sql`, recording the new checksum: for the
    /// author of a migration that is still being written (it works when that
    /// migration was edited). Returns the version, or `None` when nothing is
    /// applied. Data the migration's tables held is gone afterwards.
    pub async fn redo_last(&self, config: &Config) -> Result<Option<String>, Error> {
        let conn = Self::connect(config).await?;
        let source = self.source.clone();
        let lock_timeout = self.lock_timeout.unwrap_or(config.migration_lock_timeout);
        blocking(conn, move |c| {
            let known = load(&source)?;
            with_lock(c, lock_timeout, |c, _| redo_last(c, &known))
        })
        .await
    }

    /// Records this binary's checksums for the newest applied migration when
    /// it was edited, without running any SQL: for when it was redone by other
    /// means (`diesel migration redo`). Older edited migrations are still
    /// refused. Returns the version repaired, or `None` when it matched.
    pub async fn repair_last(&self, config: &Config) -> Result<Option<String>, Error> {
        let conn = Self::connect(config).await?;
        let source = self.source.clone();
        let lock_timeout = self.lock_timeout.unwrap_or(config.migration_lock_timeout);
        blocking(conn, move |c| {
            let known = load(&source)?;
            with_lock(c, lock_timeout, |c, _| {
                let applied = read_applied(c)?;
                let to_record = check_history(&applied, &known, true)?;
                let Some(last) = applied.rows.last() else {
                    return Ok(None);
                };
                match to_record.iter().find(|k| k.version == last.version) {
                    Some(k) if last.up_sha256.is_some() => {
                        ensure_tables(c)?;
                        record(c, k, None)?;
                        Ok(Some(k.version.clone()))
                    }
                    _ => Ok(None),
                }
            })
        })
        .await
    }
}

fn load(source: &Source) -> Result<Vec<Known>, Error> {
    let list = source
        .migrations()
        .map_err(|e| Error::bookkeeping("listing the embedded migrations", e))?;
    let mut known = Vec::with_capacity(list.len());
    for m in list {
        let mut up = Recorder(Vec::new());
        m.run(&mut up)
            .map_err(|e| Error::bookkeeping("reading a migration's SQL", e))?;
        let mut down = Recorder(Vec::new());
        // A migration without down.sql reports an error here: its checksum is of "no SQL".
        let _ = m.revert(&mut down);
        let name = m.name().to_string();
        let risky = risky_header(&name, up.0.first().map(String::as_str).unwrap_or(""))?;
        known.push(Known {
            version: m.name().version().to_string(),
            name,
            up_sha: sha_hex(&up.0),
            down_sha: sha_hex(&down.0),
            risky,
            migration: m,
        });
    }
    known.sort_by(|a, b| a.version.cmp(&b.version));
    Ok(known)
}

/// Runs `f` with a synchronous diesel connection on a blocking thread.
async fn blocking<T: Send + 'static>(
    conn: AsyncPgConnection,
    f: impl FnOnce(&mut SyncConn) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(move || {
        // Created here, so the wrapper uses this runtime's handle from a thread
        // where blocking is allowed.
        let mut c: SyncConn = AsyncConnectionWrapper::from(conn);
        f(&mut c)
    })
    .await
    .map_err(|e| Error::bookkeeping("the migration task", e))?
}

fn with_lock<T>(
    c: &mut SyncConn,
    timeout: Duration,
    f: impl FnOnce(&mut SyncConn, Duration) -> Result<T, Error>,
) -> Result<T, Error> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(20);
    loop {
        let got: Flag = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS ok")
            .bind::<diesel::sql_types::BigInt, _>(Migrator::LOCK_KEY)
            .get_result(c)
            .map_err(q)?;
        if got.ok {
            break;
        }
        if started.elapsed() >= timeout {
            let holder: Option<Pid> = diesel::sql_query(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND classid = ($1 >> 32)::bigint::oid AND objid = ($1 & 4294967295)::bigint::oid AND objsubid = 1 LIMIT 1",
            )
            .bind::<diesel::sql_types::BigInt, _>(Migrator::LOCK_KEY)
            .get_result(c)
            .ok();
            return Err(Error::Migration(MigrationError::LockTimeout {
                waited: started.elapsed(),
                holder_pid: holder.map(|h| h.pid),
            }));
        }
        std::thread::sleep(delay.min(timeout.saturating_sub(started.elapsed())));
        delay = (delay * 2).min(Duration::from_millis(250));
    }
    let lock_wait = started.elapsed();
    let result = f(c, lock_wait);
    let unlock = diesel::sql_query("SELECT pg_advisory_unlock($1) AS ok")
        .bind::<diesel::sql_types::BigInt, _>(Migrator::LOCK_KEY)
        .get_result::<Flag>(c);
    if let Err(e) = unlock {
        // The connection is dropped right after, which releases the lock anyway.
        tracing::warn!(error = %e, "could not release the migration lock explicitly");
    }
    result
}

fn ensure_tables(c: &mut SyncConn) -> Result<(), Error> {
    c.batch_execute(diesel::migration::CREATE_MIGRATIONS_TABLE)
        .map_err(q)?;
    c.batch_execute(CREATE_OURS).map_err(q)?;
    c.batch_execute(CREATE_BACKUPS).map_err(q)
}

const CREATE_BACKUPS: &str = "CREATE TABLE IF NOT EXISTS railyard_migration_backups (
    id BIGSERIAL PRIMARY KEY,
    version VARCHAR(50) NOT NULL,
    kind TEXT NOT NULL,
    location TEXT NOT NULL,
    bytes BIGINT,
    duration_ms DOUBLE PRECISION NOT NULL,
    taken_at TIMESTAMPTZ NOT NULL DEFAULT now()
)";

/// The newest backup of each version.
const BACKUPS_SQL: &str = "SELECT DISTINCT ON (version) version::text AS version, kind, location, bytes, \
     extract(epoch FROM taken_at)::float8 AS taken_at FROM railyard_migration_backups \
     ORDER BY version, taken_at DESC, id DESC";

#[derive(QueryableByName)]
struct BackupRow {
    #[diesel(sql_type = Text)]
    version: String,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = Text)]
    location: String,
    #[diesel(sql_type = Nullable<diesel::sql_types::BigInt>)]
    bytes: Option<i64>,
    #[diesel(sql_type = Double)]
    taken_at: f64,
}

fn with_backups(mut rows: Vec<MigrationStatus>, backups: Vec<BackupRow>) -> Vec<MigrationStatus> {
    for b in backups {
        if let Some(r) = rows.iter_mut().find(|r| r.version == b.version) {
            r.backup = Some(MigrationBackup {
                kind: b.kind,
                location: b.location,
                taken_at: std::time::UNIX_EPOCH
                    + Duration::from_micros((b.taken_at.max(0.0) * 1e6) as u64),
                bytes: b.bytes,
            });
        }
    }
    rows
}

fn read_backups(c: &mut SyncConn) -> Result<Vec<BackupRow>, Error> {
    let tables: Tables = diesel::sql_query(TABLES_SQL).get_result(c).map_err(q)?;
    if !tables.backups {
        return Ok(Vec::new());
    }
    diesel::sql_query(BACKUPS_SQL).load(c).map_err(q)
}

/// The marker of a risky migration: the first line of `up.sql`,
/// `-- railyard: risky` with an optional `tables=a,b`. `None` when the
/// line is no marker; an error when it starts like one but says something
/// else.
fn risky_header(name: &str, up: &str) -> Result<Option<Vec<String>>, Error> {
    let first = up.lines().next().unwrap_or("").trim();
    let Some(rest) = first
        .strip_prefix("--")
        .map(str::trim_start)
        .and_then(|r| r.strip_prefix("railyard:"))
    else {
        return Ok(None);
    };
    let bad = |why: String| {
        Error::Migration(MigrationError::Setting {
            setting: format!("{name}/up.sql, first line"),
            reason: format!(
                "{why}; the header is `-- railyard: risky` or `-- railyard: risky tables=schema.table,other`"
            ),
        })
    };
    let mut words = rest.split_whitespace();
    if words.next() != Some("risky") {
        return Err(bad("a `-- railyard:` header must say `risky`".into()));
    }
    let mut tables = Vec::new();
    for w in words {
        let Some(list) = w.strip_prefix("tables=") else {
            return Err(bad(format!(
                "{:?} is not understood",
                w.chars().take(40).collect::<String>()
            )));
        };
        for t in list.split(',').filter(|t| !t.is_empty()) {
            if !dump::valid_table(t) {
                return Err(bad(format!(
                    "table {:?} is not a plain name",
                    t.chars().take(60).collect::<String>()
                )));
            }
            tables.push(t.to_owned());
        }
    }
    Ok(Some(tables))
}

/// What a run needs to back up before a risky migration.
struct Backup {
    how: Option<BeforeRisky>,
    target: Option<ConnectTarget>,
    /// Behind a transaction-mode pooler.
    per_transaction: bool,
    handle: tokio::runtime::Handle,
}

/// A backup taken before a risky migration, to be recorded.
struct Taken {
    kind: &'static str,
    location: String,
    bytes: Option<i64>,
    took: Duration,
}

#[derive(QueryableByName)]
struct PartitionRow {
    #[diesel(sql_type = Text)]
    schema: String,
    #[diesel(sql_type = Text)]
    name: String,
}

/// The leaf partitions (with rows of their own) of the partitioned tables
/// among `tables`: `pg_dump --table` of a partitioned table dumps only its
/// definition, so they are named too.
const PARTITIONS_SQL: &str = "SELECT n.nspname::text AS schema, c.relname::text AS name \
     FROM unnest($1::text[]) AS t(name) \
     CROSS JOIN LATERAL pg_partition_tree(to_regclass(t.name)) p \
     JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE p.relid <> to_regclass(t.name) AND c.relkind = 'r' ORDER BY 1, 2";

impl Backup {
    /// Takes the backup before `k` and records it (the session-lock path:
    /// under the lock, outside any transaction, so the record is committed
    /// before the migration begins).
    fn before(&self, c: &mut SyncConn, k: &Known) -> Result<(), Error> {
        match self.take(c, k)? {
            Some(t) => record_backup(c, k, &t),
            None => Ok(()),
        }
    }

    /// Takes the backup before `k` when it is risky (`None` otherwise). Runs
    /// on the migration's blocking thread, with no transaction open on `c`.
    fn take(&self, c: &mut SyncConn, k: &Known) -> Result<Option<Taken>, Error> {
        let Some(tables) = &k.risky else {
            return Ok(None);
        };
        let fail = |source: Error| {
            Error::Migration(MigrationError::BackupFailed {
                name: k.name.clone(),
                source: Box::new(source),
            })
        };
        let started = Instant::now();
        let (kind, location, bytes) = match &self.how {
            None => {
                return Err(fail(Error::Backup(format!(
                    "no backup is configured: call Migrator::backup_before_risky or set {BACKUP_DIR_VAR} to a directory for pg_dump"
                ))));
            }
            Some(BeforeRisky::PgDump {
                dir,
                timeout,
                direct,
            }) => {
                if self.per_transaction && direct.is_none() {
                    return Err(fail(Error::Backup(
                        "pg_dump does not run through a transaction-mode pooler: its session settings (search_path = '', statement_timeout = 0, …) would stay on the pooled server connections other clients then get. Give it a direct connection to the primary (BeforeRisky::pg_dump(dir).direct(target)), or back up with pgBackRest".into(),
                    )));
                }
                let Some(target) = direct.as_deref().or(self.target.as_ref()) else {
                    return Err(fail(Error::Backup(
                        "Migrator::run_on has no connection parameters for pg_dump; use Migrator::run, or pgBackRest".into(),
                    )));
                };
                let partitions: Vec<(String, String)> = if tables.is_empty() {
                    Vec::new()
                } else {
                    diesel::sql_query(PARTITIONS_SQL)
                        .bind::<diesel::sql_types::Array<Text>, _>(tables)
                        .load::<PartitionRow>(c)
                        .map_err(|e| fail(q(e)))?
                        .into_iter()
                        .map(|r| (r.schema, r.name))
                        .collect()
                };
                let stem = format!(
                    "{}-{}-{}",
                    target.dbname.as_deref().unwrap_or("db"),
                    k.version,
                    dump::utc_stamp(std::time::SystemTime::now())
                );
                let dump = self
                    .handle
                    .block_on(dump::pg_dump_with(
                        target,
                        dir,
                        &stem,
                        tables,
                        &partitions,
                        *timeout,
                    ))
                    .map_err(fail)?;
                (
                    "pg_dump",
                    dump.path.display().to_string(),
                    i64::try_from(dump.bytes).ok(),
                )
            }
            Some(BeforeRisky::Tool(tool)) => {
                let taken = self
                    .handle
                    .block_on(tool.take())
                    .map_err(|e| fail(Error::BackupTool(e)))?;
                (
                    taken.kind,
                    taken.location,
                    taken.bytes.and_then(|b| i64::try_from(b).ok()),
                )
            }
        };
        tracing::info!(target: "railyard::migrate", version = %k.version, kind, location = %location, "backup taken before a risky migration");
        Ok(Some(Taken {
            kind,
            location,
            bytes,
            took: started.elapsed(),
        }))
    }
}

/// Records a backup taken before `k`.
fn record_backup(c: &mut SyncConn, k: &Known, t: &Taken) -> Result<(), Error> {
    diesel::sql_query(
        "INSERT INTO railyard_migration_backups (version, kind, location, bytes, duration_ms) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind::<Text, _>(&k.version)
    .bind::<Text, _>(t.kind)
    .bind::<Text, _>(&t.location)
    .bind::<Nullable<diesel::sql_types::BigInt>, _>(t.bytes)
    .bind::<Double, _>(t.took.as_secs_f64() * 1000.0)
    .execute(c)
    .map_err(q)?;
    Ok(())
}

#[derive(QueryableByName)]
struct Tables {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    diesel: bool,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    ours: bool,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    backups: bool,
}

/// What the bookkeeping tables say.
struct Applied {
    /// diesel's applied versions, with Railyard's checksums when recorded.
    rows: Vec<AppliedRow>,
    /// Whether Railyard's table exists.
    recorded: bool,
    /// Versions in Railyard's table that diesel's lacks.
    orphans: Vec<String>,
}

#[derive(QueryableByName)]
struct VersionRow {
    #[diesel(sql_type = Text)]
    version: String,
}

const TABLES_SQL: &str = "SELECT to_regclass('__diesel_schema_migrations') IS NOT NULL AS diesel, \
     to_regclass('railyard_schema_migrations') IS NOT NULL AS ours, \
     to_regclass('railyard_migration_backups') IS NOT NULL AS backups";

/// The query for versions only Railyard's table has, when it exists.
fn orphans_sql(tables: &Tables) -> Option<&'static str> {
    match (tables.ours, tables.diesel) {
        (false, _) => None,
        (true, true) => Some(
            "SELECT r.version::text AS version FROM railyard_schema_migrations r \
             WHERE NOT EXISTS (SELECT 1 FROM __diesel_schema_migrations d WHERE d.version = r.version) \
             ORDER BY r.version",
        ),
        (true, false) => {
            Some("SELECT version::text AS version FROM railyard_schema_migrations ORDER BY version")
        }
    }
}

/// The query for diesel's applied versions with Railyard's checksums, when
/// diesel's table exists.
fn applied_sql(tables: &Tables) -> Option<&'static str> {
    match (tables.diesel, tables.ours) {
        (false, _) => None,
        (true, true) => Some(
            "SELECT d.version::text AS version, r.up_sha256, r.down_sha256, r.duration_ms \
             FROM __diesel_schema_migrations d LEFT JOIN railyard_schema_migrations r USING (version) ORDER BY d.version",
        ),
        (true, false) => Some(
            "SELECT version::text AS version, NULL::text AS up_sha256, NULL::text AS down_sha256, NULL::float8 AS duration_ms \
             FROM __diesel_schema_migrations ORDER BY version",
        ),
    }
}

/// The applied versions with their recorded checksums, whether both
/// bookkeeping tables exist, and the versions only Railyard's table has.
fn read_applied(c: &mut SyncConn) -> Result<Applied, Error> {
    let tables: Tables = diesel::sql_query(TABLES_SQL).get_result(c).map_err(q)?;
    let orphans: Vec<VersionRow> = match orphans_sql(&tables) {
        Some(sql) => diesel::sql_query(sql).load(c).map_err(q)?,
        None => Vec::new(),
    };
    let rows = match applied_sql(&tables) {
        Some(sql) => diesel::sql_query(sql).load(c).map_err(q)?,
        None => Vec::new(),
    };
    Ok(Applied {
        rows,
        recorded: tables.ours,
        orphans: orphans.into_iter().map(|r| r.version).collect(),
    })
}

/// Checks the applied history against the binary: an unknown or orphaned
/// version or an edited migration is an error; returns the applied migrations
/// whose checksum is to be recorded: those applied by the diesel CLI, and,
/// when `allow_latest`, the newest migration if it was edited.
fn check_history<'k>(
    applied: &Applied,
    known: &'k [Known],
    allow_latest: bool,
) -> Result<Vec<&'k Known>, Error> {
    if let Some(version) = applied.orphans.first() {
        return Err(Error::Migration(MigrationError::Orphaned {
            version: version.clone(),
        }));
    }
    let newest_applied = applied.rows.last().map(|a| a.version.as_str());
    let newest_known = known.last().map(|k| k.version.as_str());
    let mut unrecorded = Vec::new();
    for a in &applied.rows {
        let Some(k) = known.iter().find(|k| k.version == a.version) else {
            return Err(Error::Migration(MigrationError::UnknownVersion {
                version: a.version.clone(),
            }));
        };
        match (&a.up_sha256, &a.down_sha256) {
            (Some(up), Some(down)) => {
                let (which, recorded, embedded) = if *up != k.up_sha {
                    ("up", up, &k.up_sha)
                } else if *down != k.down_sha {
                    ("down", down, &k.down_sha)
                } else {
                    continue;
                };
                if allow_latest
                    && newest_applied == Some(a.version.as_str())
                    && newest_known == Some(a.version.as_str())
                {
                    unrecorded.push(k);
                    continue;
                }
                return Err(Error::Migration(MigrationError::Edited {
                    version: a.version.clone(),
                    recorded: format!("{which}.sql {}", short(recorded)),
                    embedded: format!("{which}.sql {}", short(embedded)),
                }));
            }
            _ => unrecorded.push(k),
        }
    }
    Ok(unrecorded)
}

fn status(c: &mut SyncConn, known: &[Known]) -> Result<Vec<MigrationStatus>, Error> {
    let rows = status_of(read_applied(c)?, known);
    Ok(with_backups(rows, read_backups(c)?))
}

fn status_of(applied: Applied, known: &[Known]) -> Vec<MigrationStatus> {
    let Applied {
        rows: applied,
        orphans,
        ..
    } = applied;
    let mut out = Vec::new();
    for k in known {
        let state = match applied.iter().find(|a| a.version == k.version) {
            None if orphans.contains(&k.version) => MigrationState::Orphaned,
            None => MigrationState::Pending,
            Some(a) => MigrationState::Applied {
                checksum: match (&a.up_sha256, &a.down_sha256) {
                    (Some(up), Some(down)) if *up == k.up_sha && *down == k.down_sha => {
                        ChecksumState::Verified
                    }
                    (Some(_), _) => ChecksumState::Edited,
                    (None, _) => ChecksumState::Unrecorded,
                },
                duration: a.duration_ms.map(|ms| Duration::from_secs_f64(ms / 1000.0)),
            },
        };
        out.push(MigrationStatus {
            version: k.version.clone(),
            name: k.name.clone(),
            state,
            risky: k.risky.is_some(),
            backup: None,
        });
    }
    for a in &applied {
        if !known.iter().any(|k| k.version == a.version) {
            out.push(MigrationStatus {
                version: a.version.clone(),
                name: String::new(),
                state: MigrationState::Unknown,
                risky: false,
                backup: None,
            });
        }
    }
    for o in &orphans {
        if !known.iter().any(|k| k.version == *o) {
            out.push(MigrationStatus {
                version: o.clone(),
                name: String::new(),
                state: MigrationState::Orphaned,
                risky: false,
                backup: None,
            });
        }
    }
    out.sort_by(|a, b| a.version.cmp(&b.version));
    out
}

/// Checks the applied history against the known migrations and records the
/// checksums of those applied without one (adopted from diesel's table) or
/// accepted as edited (the development override), noting each in `report`.
fn adopt_history(
    c: &mut SyncConn,
    applied: &Applied,
    known: &[Known],
    allow_latest: bool,
    report: &mut MigrationReport,
) -> Result<(), Error> {
    for k in check_history(applied, known, allow_latest)? {
        let edited = applied
            .rows
            .iter()
            .any(|a| a.version == k.version && a.up_sha256.is_some());
        if edited {
            tracing::warn!(
                target: "railyard::migrate",
                version = %k.version,
                "migration {} was edited after it was applied; {ALLOW_EDITED_VAR}=latest accepts it and records the new checksum, \
                 but its SQL is NOT run again (redo it: `diesel migration redo` or `railyard migrate redo`). Never set this in production",
                k.name
            );
            report.accepted_edits.push(k.version.clone());
        } else {
            report.adopted.push(k.version.clone());
        }
        record(c, k, None)?;
    }
    Ok(())
}

fn apply_pending(
    c: &mut SyncConn,
    known: &[Known],
    allow_latest: bool,
    backup: &Backup,
) -> Result<MigrationReport, Error> {
    ensure_tables(c)?;
    // Re-read under the lock: another instance may have just migrated.
    let applied = read_applied(c)?;
    let mut report = MigrationReport::default();
    adopt_history(c, &applied, known, allow_latest, &mut report)?;
    report.already_applied = applied.rows.len();
    for k in known {
        if applied.rows.iter().any(|a| a.version == k.version) {
            continue;
        }
        backup.before(c, k)?;
        let duration = apply_one(c, k)?;
        tracing::info!(target: "railyard::migrate", version = %k.version, name = %k.name, ?duration, "applied migration");
        report.applied.push(AppliedMigration {
            version: k.version.clone(),
            name: k.name.clone(),
            duration,
        });
    }
    Ok(report)
}

/// What one locked transaction of [`apply_in_transactions`] did.
enum Step {
    Applied(AppliedMigration),
    /// The next pending migration is risky and this run has not backed it
    /// up yet.
    Backup(usize),
    Done {
        already_applied: usize,
    },
}

/// Behind a transaction-mode pooler: each pending migration in a transaction
/// of its own that first takes the migration lock with
/// `pg_advisory_xact_lock` (released at COMMIT or ROLLBACK, so it cannot
/// leak onto a server connection another client gets) and re-reads the
/// history, so concurrent boots apply each migration once. A migration that
/// opts out of transactions is refused: nothing could hold the lock around it.
///
/// A risky migration's backup is taken between transactions: the locked
/// transaction that finds it pending ends first, the backup runs with no
/// transaction open (none sits idle through a long dump, and the pooler's
/// server connection is free), its record is committed in a locked
/// transaction of its own (kept even when the migration then fails), and
/// the next locked transaction applies the migration if it is still pending.
/// Two instances may both back up before one of them applies it; the
/// migration itself is still applied once, after a backup of its own run.
fn apply_in_transactions(
    c: &mut SyncConn,
    known: &[Known],
    allow_latest: bool,
    lock_timeout: Duration,
    backup: &Backup,
) -> Result<MigrationReport, Error> {
    let mut report = MigrationReport::default();
    let mut backed_up: Vec<usize> = Vec::new();
    loop {
        let (step, wait) = c.transaction::<_, Error, _>(|c| {
            let wait = xact_lock(c, lock_timeout)?;
            ensure_tables(c)?;
            let applied = read_applied(c)?;
            adopt_history(c, &applied, known, allow_latest, &mut report)?;
            let Some((i, k)) = known
                .iter()
                .enumerate()
                .find(|(_, k)| !applied.rows.iter().any(|a| a.version == k.version))
            else {
                return Ok((
                    Step::Done {
                        already_applied: applied.rows.len(),
                    },
                    wait,
                ));
            };
            if !k.migration.metadata().run_in_transaction() {
                return Err(Error::Migration(MigrationError::Setting {
                    setting: "RAILYARD_POOLER".into(),
                    reason: format!(
                        "migration {} runs outside a transaction (run_in_transaction = false), and behind a transaction-mode pooler no lock can be held around it; apply it with a direct connection to the server (`railyard migrate run` with DATABASE_URL pointing at PostgreSQL, or RAILYARD_POOLER=pgbouncer-session through a session-mode pool)",
                        k.name
                    ),
                }));
            }
            if k.risky.is_some() && !backed_up.contains(&i) {
                return Ok((Step::Backup(i), wait));
            }
            let duration = apply_one(c, k)?;
            Ok((
                Step::Applied(AppliedMigration {
                    version: k.version.clone(),
                    name: k.name.clone(),
                    duration,
                }),
                wait,
            ))
        })?;
        report.lock_wait += wait;
        match step {
            Step::Applied(m) => {
                tracing::info!(target: "railyard::migrate", version = %m.version, name = %m.name, duration = ?m.duration, "applied migration (transaction-scoped lock)");
                report.applied.push(m);
            }
            Step::Backup(i) => {
                let k = &known[i];
                // No lock is held during the backup (no transaction sits
                // open through a pooler): another instance may apply the
                // migration meanwhile, after its own backup, and a dump
                // racing its DDL can fail. That failure is moot once the
                // migration is applied; any other stops the boot.
                let taken = match backup.take(c, k) {
                    Ok(t) => t,
                    Err(e) => {
                        let applied_meanwhile = c.transaction::<_, Error, _>(|c| {
                            xact_lock(c, lock_timeout)?;
                            ensure_tables(c)?;
                            Ok(read_applied(c)?.rows.iter().any(|a| a.version == k.version))
                        })?;
                        if !applied_meanwhile {
                            return Err(e);
                        }
                        tracing::info!(target: "railyard::migrate", version = %k.version, name = %k.name, error = %e, "another instance applied the risky migration while this one was backing up; this backup is not needed");
                        None
                    }
                };
                if let Some(t) = taken {
                    let wait = c.transaction::<_, Error, _>(|c| {
                        let wait = xact_lock(c, lock_timeout)?;
                        ensure_tables(c)?;
                        record_backup(c, k, &t)?;
                        Ok(wait)
                    })?;
                    report.lock_wait += wait;
                }
                backed_up.push(i);
            }
            Step::Done { already_applied } => {
                report.already_applied = already_applied - report.applied.len();
                return Ok(report);
            }
        }
    }
}

/// Takes the migration lock for the current transaction, waiting at most
/// `timeout`; returns how long it waited.
fn xact_lock(c: &mut SyncConn, timeout: Duration) -> Result<Duration, Error> {
    let started = Instant::now();
    c.batch_execute(&format!(
        "SET LOCAL lock_timeout = {}",
        timeout.as_millis().clamp(1, i32::MAX as u128)
    ))
    .map_err(q)?;
    let locked = diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
        .bind::<diesel::sql_types::BigInt, _>(Migrator::LOCK_KEY)
        .execute(c);
    if let Err(e) = locked {
        if started.elapsed() >= timeout {
            return Err(Error::Migration(MigrationError::LockTimeout {
                waited: started.elapsed(),
                holder_pid: None,
            }));
        }
        return Err(q(e));
    }
    c.batch_execute("SET LOCAL lock_timeout = DEFAULT")
        .map_err(q)?;
    Ok(started.elapsed())
}

/// Runs one migration's `up.sql` with its bookkeeping rows, in one
/// transaction unless the migration opts out.
fn apply_one(c: &mut SyncConn, k: &Known) -> Result<Duration, Error> {
    let started = Instant::now();
    let in_tx = k.migration.metadata().run_in_transaction();
    let run = |c: &mut SyncConn| -> Result<(), Error> {
        k.migration
            .run(c)
            .map_err(|e| failed(k, diesel_sqlstate(&*e), e.to_string()))?;
        diesel::sql_query("INSERT INTO __diesel_schema_migrations (version) VALUES ($1)")
            .bind::<Text, _>(&k.version)
            .execute(c)
            .map_err(q)?;
        record(c, k, Some(started.elapsed()))
    };
    let outcome = if in_tx {
        c.transaction::<_, Error, _>(|c| run(c))
    } else {
        run(c)
    };
    outcome.map_err(|e| name_failure(c, k, in_tx, e))?;
    Ok(started.elapsed())
}

fn failed(k: &Known, sqlstate: Option<tokio_postgres::error::SqlState>, message: String) -> Error {
    Error::Migration(MigrationError::Failed {
        version: k.version.clone(),
        sqlstate,
        message,
    })
}

/// The SQLSTATE of a diesel error boxed by the migration harness.
fn diesel_sqlstate(
    e: &(dyn std::error::Error + Send + Sync + 'static),
) -> Option<tokio_postgres::error::SqlState> {
    let source: &(dyn std::error::Error + 'static) = e;
    let mut cur = Some(source);
    while let Some(err) = cur {
        if let Some(pg) = err.downcast_ref::<tokio_postgres::Error>() {
            return pg.code().cloned();
        }
        cur = err.source();
    }
    None
}

/// An error met while migration `k` ran, named after it: `Interrupted` when
/// the connection is gone, `Failed` otherwise.
fn name_failure(c: &mut SyncConn, k: &Known, in_tx: bool, e: Error) -> Error {
    let alive = c.batch_execute("SELECT 1").is_ok();
    if !alive {
        return Error::Migration(MigrationError::Interrupted {
            name: k.name.clone(),
            in_transaction: in_tx,
            source: Box::new(e),
        });
    }
    match e {
        e @ Error::Migration(MigrationError::Failed { .. }) => e,
        other => {
            let sqlstate = other.sqlstate().cloned();
            failed(k, sqlstate, other.to_string())
        }
    }
}

fn record(c: &mut SyncConn, k: &Known, duration: Option<Duration>) -> Result<(), Error> {
    diesel::sql_query(
        "INSERT INTO railyard_schema_migrations (version, name, up_sha256, down_sha256, duration_ms) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (version) DO UPDATE SET up_sha256 = EXCLUDED.up_sha256, \
         down_sha256 = EXCLUDED.down_sha256, name = EXCLUDED.name",
    )
    .bind::<Text, _>(&k.version)
    .bind::<Text, _>(&k.name)
    .bind::<Text, _>(&k.up_sha)
    .bind::<Text, _>(&k.down_sha)
    .bind::<Nullable<Double>, _>(duration.map(|d| d.as_secs_f64() * 1000.0))
    .execute(c)
    .map_err(q)?;
    Ok(())
}

/// The newest applied migration, which this binary must know.
fn newest<'k>(
    c: &mut SyncConn,
    known: &'k [Known],
) -> Result<Option<(AppliedRow, &'k Known)>, Error> {
    let applied = read_applied(c)?;
    if let Some(version) = applied.orphans.first() {
        return Err(Error::Migration(MigrationError::Orphaned {
            version: version.clone(),
        }));
    }
    let Some(last) = applied.rows.into_iter().last() else {
        return Ok(None);
    };
    let k = known
        .iter()
        .find(|k| k.version == last.version)
        .ok_or_else(|| {
            Error::Migration(MigrationError::CannotRevert(format!(
                "the latest applied migration {} is not in this binary",
                last.version
            )))
        })?;
    Ok(Some((last, k)))
}

fn revert_last(c: &mut SyncConn, known: &[Known]) -> Result<Option<String>, Error> {
    let Some((last, k)) = newest(c, known)? else {
        return Ok(None);
    };
    if let Some(up) = &last.up_sha256
        && *up != k.up_sha
    {
        return Err(Error::Migration(MigrationError::Edited {
            version: k.version.clone(),
            recorded: short(up).to_owned(),
            embedded: short(&k.up_sha).to_owned(),
        }));
    }
    revert_one(c, k)?;
    Ok(Some(k.version.clone()))
}

fn redo_last(c: &mut SyncConn, known: &[Known]) -> Result<Option<String>, Error> {
    let Some((_, k)) = newest(c, known)? else {
        return Ok(None);
    };
    ensure_tables(c)?;
    revert_one(c, k)?;
    apply_one(c, k)?;
    tracing::warn!(target: "railyard::migrate", version = %k.version, "redid migration {}: reverted and applied again", k.name);
    Ok(Some(k.version.clone()))
}

/// Runs one migration's `down.sql` and deletes its bookkeeping rows, in one
/// transaction unless the migration opts out.
fn revert_one(c: &mut SyncConn, k: &Known) -> Result<(), Error> {
    let revert = |c: &mut SyncConn| -> Result<(), Error> {
        k.migration.revert(c).map_err(|e| {
            Error::Migration(MigrationError::CannotRevert(format!("{}: {e}", k.version)))
        })?;
        diesel::sql_query("DELETE FROM __diesel_schema_migrations WHERE version = $1")
            .bind::<Text, _>(&k.version)
            .execute(c)
            .map_err(q)?;
        diesel::sql_query("DELETE FROM railyard_schema_migrations WHERE version = $1")
            .bind::<Text, _>(&k.version)
            .execute(c)
            .map_err(q)?;
        Ok(())
    };
    let in_tx = k.migration.metadata().run_in_transaction();
    let outcome = if in_tx {
        c.transaction::<_, Error, _>(|c| revert(c))
    } else {
        revert(c)
    };
    outcome.map_err(|e| match e {
        e @ Error::Migration(MigrationError::CannotRevert(_)) => e,
        other => name_failure(c, k, in_tx, other),
    })
}
