//! Backups: pgBackRest driven from the application's side, and `pg_dump`
//! before risky migrations.
//!
//! - [`pgbackrest`]: one stanza of a pgBackRest repository, on any server:
//!   `stanza-create`, `check`, `backup` (full, incremental, differential),
//!   `info` (parsed) and `restore` into a directory Railyard names. It
//!   never edits a server's configuration or restarts it.
//! - [`local`] (feature `local`): backups of the local cluster, which
//!   Railyard owns: WAL archiving turned on, the repository in the
//!   cluster's directory, counted restore points, restore drills and
//!   point-in-time restores into scratch instances.
//! - [`dump`]: `pg_dump` in the custom format, the fallback backup before a
//!   migration marked risky (see [`crate::migrate`]).
//!
//! Every tool runs with a deadline and is killed past it; its error output
//! is kept in the error, without the passwords it was given, which it gets
//! in its environment and never on its command line.

pub mod dump;
#[cfg(feature = "local")]
pub mod local;
pub mod pgbackrest;
pub(crate) mod tool;

use std::path::PathBuf;
use std::time::Duration;

use crate::backup::pgbackrest::{BackupType, PgBackRest};

/// How Railyard takes the backup before a migration marked risky.
///
/// ```no_run
/// use railyard::backup::BeforeRisky;
/// use railyard::backup::pgbackrest::{BackupType, PgBackRest};
/// let dump = BeforeRisky::pg_dump("/var/backups/app");
/// let repo = BeforeRisky::pgbackrest(
///     PgBackRest::new("/etc/pgbackrest/pgbackrest.conf", "main"),
///     BackupType::Incr,
/// );
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
        /// `pg_dump`'s session settings (`search_path = ''`,
        /// `statement_timeout = 0`, …) would stay on the pooled server
        /// connections other clients then get.
        direct: Option<crate::config::ConnectTarget>,
    },
    /// A pgBackRest backup of this kind.
    PgBackRest {
        /// The stanza.
        repo: PgBackRest,
        /// The kind of backup.
        kind: BackupType,
    },
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
    /// No effect on a pgBackRest backup.
    ///
    /// ```
    /// use railyard::backup::BeforeRisky;
    /// let direct = railyard::Config::from_url("postgres://app@db.internal:5432/app")?
    ///     .primary()
    ///     .clone();
    /// let dump = BeforeRisky::pg_dump("/var/backups/app").direct(direct);
    /// # Ok::<(), railyard::error::ConfigError>(())
    /// ```
    #[must_use]
    pub fn direct(self, target: crate::config::ConnectTarget) -> Self {
        match self {
            BeforeRisky::PgDump { dir, timeout, .. } => BeforeRisky::PgDump {
                dir,
                timeout,
                direct: Some(target),
            },
            other => other,
        }
    }

    /// A pgBackRest backup of this kind.
    pub fn pgbackrest(repo: PgBackRest, kind: BackupType) -> Self {
        BeforeRisky::PgBackRest { repo, kind }
    }
}
