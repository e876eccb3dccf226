//! [`MigrationError`]: why migrations could not be run, verified or reverted.

use super::*;

/// Why migrations could not be run, verified or reverted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// An applied migration's SQL differs from the one embedded in this binary.
    #[error(
        "migration {name} was edited after it was applied (recorded checksum {recorded}, embedded {embedded}); restore the original file and add a new migration instead{}",
        if *newest { "; or, in development, set RAILYARD_MIGRATIONS_ALLOW_EDITED=latest: the newest migration may then be edited, and `migrate redo` applies the edit" } else { "" }
    )]
    Edited {
        /// The migration version.
        version: String,
        /// The migration's directory name (version and name).
        name: String,
        /// It is the newest migration, applied and embedded: the one
        /// development may edit.
        newest: bool,
        /// Checksum stored when it was applied.
        recorded: String,
        /// Checksum of the embedded migration.
        embedded: String,
    },
    /// The database holds a version that this binary does not know.
    #[error(
        "the database has migration {version} applied, which this binary does not contain; deploy a binary that includes it (the database is ahead of the code)"
    )]
    UnknownVersion {
        /// The version found in the database.
        version: String,
    },
    /// A version is recorded in `railyard_schema_migrations` but not in
    /// diesel's `__diesel_schema_migrations`: the two tables disagree.
    #[error(
        "migration {version} is recorded in railyard_schema_migrations but not in __diesel_schema_migrations; the bookkeeping was edited by hand or a revert was interrupted. Check whether its changes are in the schema, then either insert its version into __diesel_schema_migrations or delete its row from railyard_schema_migrations"
    )]
    Orphaned {
        /// The version found only in Railyard's table.
        version: String,
    },
    /// The connection was lost while a migration ran.
    #[error(
        "the connection was lost while migration {name} was running{}",
        if *in_transaction { " (its transaction was rolled back by the server unless the loss came during COMMIT: run `migrate status` to see whether it is recorded)" } else { " (it runs outside a transaction and may be partly applied: inspect the schema before running it again)" }
    )]
    Interrupted {
        /// The migration's directory name (version and name).
        name: String,
        /// Whether it ran inside a transaction.
        in_transaction: bool,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A development setting was given where it is not honoured.
    #[error("{setting}: {reason}")]
    Setting {
        /// The variable or setter.
        setting: String,
        /// Why it is refused, and what to do.
        reason: String,
    },
    /// Another instance held the migration lock for longer than the lock timeout.
    #[error(
        "timed out after {} waiting for the migration lock held by {}; another instance is migrating, or a stuck session holds the lock (see pg_locks)",
        humantime::format_duration(Duration::from_millis(waited.as_millis() as u64)),
        holder_pid.map(|p| format!("backend pid {p}")).unwrap_or_else(|| "a backend that could not be identified".into())
    )]
    LockTimeout {
        /// How long this instance waited.
        waited: Duration,
        /// The backend holding the advisory lock, when it could be found.
        holder_pid: Option<i32>,
    },
    /// A migration's SQL failed; its transaction was rolled back.
    #[error("migration {name} failed and was rolled back: {message}")]
    Failed {
        /// The migration version.
        version: String,
        /// The migration's directory name (version and name).
        name: String,
        /// The server's SQLSTATE when there was one.
        sqlstate: Option<SqlState>,
        /// The error message.
        message: String,
    },
    /// A migration marked risky was not applied because the backup that must
    /// precede it could not be taken.
    #[error("migration {name} is marked risky and was NOT applied: the backup before it failed")]
    BackupFailed {
        /// The migration's directory name (version and name).
        name: String,
        /// Why the backup failed.
        #[source]
        source: Box<Error>,
    },
    /// There is nothing to revert, or the migration has no `down.sql`.
    #[error("cannot revert: {0}")]
    CannotRevert(String),
    /// Reading or writing migration bookkeeping failed.
    #[error("migration bookkeeping: {context}")]
    Bookkeeping {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
