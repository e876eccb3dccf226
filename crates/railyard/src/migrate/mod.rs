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

mod backup;
mod before;
pub(crate) mod dump;
#[doc(hidden)]
pub mod tool;

pub use before::{BackupError, BackupTaken, BeforeRisky, RiskyBackup};
pub use dump::Dump;
mod run;
mod status;

use backup::*;
use run::*;
use status::*;
pub use status::{
    AppliedMigration, ChecksumState, MigrationReport, MigrationState, MigrationStatus,
};

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
    /// `pg_dump`, `pgbackrest`, or `none` when every table the migration
    /// names was empty or absent (a first boot: nothing to back up).
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
