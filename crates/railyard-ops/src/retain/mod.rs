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
//!    on the [`Database`](railyard::Database) (`/health` gains a `storage`
//!    check, `/metrics` the sizes).
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

use crate::error::Error;
use railyard::error::ConfigError;

mod archive;
mod config;
mod job;
mod partitions;
mod run;
mod sql;
mod storage;

pub use config::{
    ENV_CHECK_EVERY, ENV_EVERY, ENV_LOCK_TIMEOUT, ENV_PERIOD, ENV_PREMAKE, ENV_SIZE_THRESHOLD,
    MAX_PREMAKE, RetentionConfig,
};
pub use job::RetentionJob;
pub use run::{ArchivedPartition, RetentionRun};
pub use storage::record_storage;

/// The schema archived partitions and rows go to.
pub const ARCHIVE_SCHEMA: &str = "railyard_archive";

/// The audit table (in the database's default schema; never archived).
pub const AUDIT_TABLE: &str = "railyard_retention_audit";

/// The session advisory lock key one run holds: the bytes of "RYRETAIN".
pub const LOCK_KEY: i64 = 0x5259_5245_5441_494e;

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
}
