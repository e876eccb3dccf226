//! How a backup is taken before a migration marked risky: `pg_dump`, which
//! the core runs itself, or a backup tool another crate drives through the
//! [`RiskyBackup`] seam (pgBackRest, in `railyard-ops`).

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::config::ConnectTarget;

/// The error a [`RiskyBackup`] returns; kept whole as the migration error's
/// cause.
pub type BackupError = Box<dyn std::error::Error + Send + Sync>;

/// A backup tool the migrator calls before a risky migration, on its own
/// blocking thread's runtime handle. `railyard-ops` implements it for a
/// pgBackRest stanza.
pub trait RiskyBackup: fmt::Debug + Send + Sync {
    /// Takes one backup and says what it took.
    fn take(&self) -> Pin<Box<dyn Future<Output = Result<BackupTaken, BackupError>> + Send + '_>>;
}

/// What a [`RiskyBackup`] took, as the migrations ledger records it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackupTaken {
    /// The tool (`pgbackrest`), recorded in `railyard_migration_backups.kind`.
    pub kind: &'static str,
    /// Where the backup is: a file, or the tool's label for it.
    pub location: String,
    /// Its size, when the tool says.
    pub bytes: Option<u64>,
}

impl BackupTaken {
    /// A backup by `kind`, found at `location`.
    pub fn new(kind: &'static str, location: impl Into<String>, bytes: Option<u64>) -> Self {
        BackupTaken {
            kind,
            location: location.into(),
            bytes,
        }
    }
}

/// How Railyard takes the backup before a migration marked risky.
///
/// ```no_run
/// use railyard::migrate::BeforeRisky;
/// let dump = BeforeRisky::pg_dump("/var/backups/app");
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum BeforeRisky {
    /// `pg_dump` (custom format, compressed) of the migration's tables, or
    /// of the whole database, into this directory.
    PgDump {
        /// Where dumps are written (created when missing).
        dir: PathBuf,
        /// The dump's deadline.
        timeout: Duration,
        /// The server to dump from, when it is not the application's
        /// primary target: required behind a transaction-mode pooler, where
        /// `pg_dump`'s session settings would stay on the pooled server
        /// connections other clients then get.
        direct: Option<Box<ConnectTarget>>,
    },
    /// A backup tool driven by another crate.
    Tool(Arc<dyn RiskyBackup>),
}

impl BeforeRisky {
    /// `pg_dump` into `dir`, with a 30-minute deadline.
    pub fn pg_dump(dir: impl Into<PathBuf>) -> Self {
        BeforeRisky::PgDump {
            dir: dir.into(),
            timeout: Duration::from_secs(30 * 60),
            direct: None,
        }
    }

    /// For `pg_dump`: dump from `target` (a direct connection to the
    /// primary, not through a pooler) instead of the application's primary
    /// target. Behind a transaction-mode pooler, `pg_dump` runs only so.
    /// No effect on a tool's backup.
    ///
    /// ```
    /// use railyard::migrate::BeforeRisky;
    /// let direct = railyard::Config::from_url("postgres://app@db.internal:5432/app")?
    ///     .primary()
    ///     .clone();
    /// let dump = BeforeRisky::pg_dump("/var/backups/app").direct(direct);
    /// # Ok::<(), railyard::error::ConfigError>(())
    /// ```
    #[must_use]
    pub fn direct(self, target: ConnectTarget) -> Self {
        match self {
            BeforeRisky::PgDump { dir, timeout, .. } => BeforeRisky::PgDump {
                dir,
                timeout,
                direct: Some(Box::new(target)),
            },
            other => other,
        }
    }

    /// A backup by `tool` (see [`RiskyBackup`]).
    pub fn tool(tool: impl RiskyBackup + 'static) -> Self {
        BeforeRisky::Tool(Arc::new(tool))
    }
}
