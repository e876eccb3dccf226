//! Backups: pgBackRest driven from the application's side, and before risky
//! migrations.
//!
//! - [`pgbackrest`]: one stanza of a pgBackRest repository, on any server:
//!   `stanza-create`, `check`, `backup` (full, incremental, differential),
//!   `info` (parsed) and `restore` into a directory Railyard names. It
//!   never edits a server's configuration or restarts it.
//! - [`local`]: backups of the local cluster, which
//!   Railyard owns: WAL archiving turned on, the repository in the
//!   cluster's directory, counted restore points, restore drills and
//!   point-in-time restores into scratch instances.
//! - [`PgBackRestBefore`]: a pgBackRest backup before a migration marked
//!   risky, through the core's [`RiskyBackup`] seam (the core's own
//!   fallback is `pg_dump`: see [`railyard::migrate`]).
//!
//! Every tool runs with a deadline and is killed past it; its error output
//! is kept in the error, without the passwords it was given, which it gets
//! in its environment and never on its command line.

pub mod local;
pub mod pgbackrest;

use std::future::Future;
use std::pin::Pin;

use railyard::migrate::{BackupError, BackupTaken, BeforeRisky, RiskyBackup};

use crate::backup::pgbackrest::{BackupType, PgBackRest};

/// A pgBackRest backup taken before a migration marked risky.
///
/// ```no_run
/// use railyard_ops::backup::PgBackRestBefore;
/// use railyard_ops::backup::pgbackrest::{BackupType, PgBackRest};
/// let repo = PgBackRest::new("/etc/pgbackrest/pgbackrest.conf", "main");
/// // Give it to `Migrator::backup_before_risky`.
/// let how = PgBackRestBefore::new(repo, BackupType::Incr).before_risky();
/// ```
#[derive(Debug, Clone)]
pub struct PgBackRestBefore {
    repo: PgBackRest,
    kind: BackupType,
}

impl PgBackRestBefore {
    /// A backup of `kind` into `repo`'s stanza.
    pub fn new(repo: PgBackRest, kind: BackupType) -> Self {
        PgBackRestBefore { repo, kind }
    }

    /// What `Migrator::backup_before_risky` takes.
    pub fn before_risky(self) -> BeforeRisky {
        BeforeRisky::tool(self)
    }
}

impl RiskyBackup for PgBackRestBefore {
    fn take(&self) -> Pin<Box<dyn Future<Output = Result<BackupTaken, BackupError>> + Send + '_>> {
        Box::pin(async move {
            self.repo.backup(self.kind).await?;
            let set = self.repo.info().await?.pop().ok_or_else(|| {
                crate::Error::Backup("pgBackRest lists no backup after taking one".into())
            })?;
            Ok(BackupTaken::new(
                "pgbackrest",
                set.label,
                Some(set.repo_delta),
            ))
        })
    }
}
