//! Backups of the local cluster: the pgBackRest
//! configuration and repository inside the cluster's directory, WAL
//! archiving turned on by the cluster, counted restore points after each
//! backup, restore drills and point-in-time restores into scratch instances.
//!
//! Everything lives under `<cluster dir>/backup/`:
//!
//! ```text
//! pgbackrest.conf        written by Railyard at each command (the port may change)
//! repo/                  the repository (one stanza, `railyard`)
//! log/ lock/             pgBackRest's logs and locks
//! points/<label>.json    the counted restore point taken after each backup
//! dumps/                 pg_dumps before risky migrations, until `init` was run
//! scratch/<name>/        restored instances (drills, PITR), removed after use
//! ```

use std::fmt;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::backup::pgbackrest::{BackupSet, BackupType, PgBackRest};
use crate::error::Error;
use railyard::migrate::BeforeRisky;
use railyard_local::{Binaries, LocalCluster, RunAs, admin_client_port, write_file};

mod drill;
mod points;
mod reports;
mod restore;
mod scratch;

pub use reports::{
    CheckOutcome, Checks, CountedPoint, DrillReport, InitReport, Phase, PitrReport, RunReport,
};
pub use scratch::Scratch;

/// The stanza of the local cluster's repository.
pub const STANZA: &str = "railyard";

/// The deadline of one query to the source or a scratch instance (the
/// counts of a restore point and of a drill have `statement_timeout` too).
const QUERY_DEADLINE: Duration = Duration::from_secs(300);
/// The drill's verdict on a backup without a counted restore point.
pub const NOT_VERIFIED: &str = "not verified: no counted restore point for this backup";

/// `fut` within [`QUERY_DEADLINE`]; the error names `what`.
async fn within<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(QUERY_DEADLINE, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::Backup(format!("{what}: {e}"))),
        Err(_) => Err(Error::Backup(format!(
            "{what}: no answer within {QUERY_DEADLINE:?}"
        ))),
    }
}

/// The backups of a local cluster.
///
/// ```no_run
/// # async fn demo() -> Result<(), railyard_ops::Error> {
/// use railyard_ops::backup::local::LocalBackups;
/// use railyard_ops::backup::pgbackrest::BackupType;
/// let cluster = railyard_local::LocalCluster::shared().await?;
/// let backups = LocalBackups::new(&cluster, "railyard")?;
/// backups.init().await?;
/// let run = backups.run(BackupType::Full).await?;
/// println!("{} in {:?}", run.set.label, run.backup_took);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LocalBackups {
    cluster: LocalCluster,
    dir: PathBuf,
    database: String,
    run_as: RunAs,
    bins: Binaries,
}

impl fmt::Debug for LocalBackups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalBackups")
            .field("dir", &self.dir)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Backup(format!("a blocking task failed: {e}")))?
}

impl LocalBackups {
    /// The backups of `cluster`; `database` is the one counted at each
    /// restore point and checked by drills. Touches nothing yet.
    pub fn new(cluster: &LocalCluster, database: &str) -> Result<Self, Error> {
        Ok(LocalBackups {
            cluster: cluster.clone(),
            dir: cluster.dir().join("backup"),
            database: database.to_owned(),
            run_as: RunAs::detect()?,
            bins: Binaries::find()?,
        })
    }

    /// The configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("pgbackrest.conf")
    }

    /// The repository's directory.
    pub fn repo_path(&self) -> PathBuf {
        self.dir.join("repo")
    }

    /// Whether `init` was run (the configuration exists).
    pub fn enabled(&self) -> bool {
        self.config_path().is_file()
    }

    /// The pgBackRest stanza, run as the servers' account.
    pub fn pgbackrest(&self) -> PgBackRest {
        let mut p = PgBackRest::new(self.config_path(), STANZA)
            .password(Some(self.cluster.password().clone()))
            .cwd(&self.dir);
        if let Some((uid, gid)) = self.run_as.ids() {
            p = p.run_as(uid, gid);
        }
        p
    }

    async fn archive_command(&self) -> Result<String, Error> {
        let program = railyard::migrate::tool::find_async("pgbackrest").await?;
        Ok(format!(
            "{} --config={} --stanza={STANZA} archive-push %p",
            program.display(),
            self.config_path().display()
        ))
    }

    fn config_text(&self) -> String {
        let d = self.dir.display();
        format!(
            "# written by railyard at each backup command: edits are lost\n\
             [global]\n\
             repo1-path={d}/repo\n\
             repo1-retention-full=2\n\
             log-path={d}/log\n\
             lock-path={d}/lock\n\
             log-level-console=warn\n\
             log-level-stderr=error\n\
             log-level-file=info\n\
             compress-type=lz4\n\
             start-fast=y\n\
             archive-timeout=60\n\
             \n\
             [{STANZA}]\n\
             pg1-path={primary}\n\
             pg1-port={port}\n\
             pg1-socket-path={sockets}\n\
             pg1-user=railyard\n",
            primary = self.cluster.dir().join("pg/primary").display(),
            port = self.cluster.primary_port(),
            sockets = self.cluster.socket_dir().display(),
        )
    }

    /// Writes the configuration (the primary's port may have changed since
    /// the last command) and the directories, owned by the servers' account.
    async fn write_config(&self) -> Result<(), Error> {
        let me = self.clone();
        blocking(move || {
            for sub in ["", "repo", "log", "lock", "points", "scratch"] {
                let d = me.dir.join(sub);
                fs::create_dir_all(&d)
                    .map_err(|e| Error::io(format!("creating {}", d.display()), e))?;
                me.run_as.own(&d)?;
            }
            write_file(
                &me.config_path(),
                me.config_text().as_bytes(),
                0o600,
                Some(&me.run_as),
            )
            .map_err(Error::from)
        })
        .await
    }

    async fn require_enabled(&self) -> Result<(), Error> {
        let enabled = tokio::fs::metadata(self.config_path())
            .await
            .is_ok_and(|m| m.is_file());
        if enabled {
            Ok(())
        } else {
            Err(Error::Backup(format!(
                "backups are not set up for the local cluster in {}; run `railyard backup init` first",
                self.cluster.dir().display()
            )))
        }
    }

    /// Sets backups up: the configuration and repository, WAL archiving on
    /// the primary (a restart when it was off; the replica streams again
    /// before this returns), `stanza-create`, then `check` (a WAL segment
    /// reaches the repository).
    pub async fn init(&self) -> Result<InitReport, Error> {
        let started = Instant::now();
        self.write_config().await?;
        let command = self.archive_command().await?;
        let cluster = self.cluster.clone();
        let restarted =
            blocking(move || cluster.set_archiving(Some(&command)).map_err(Error::from)).await?;
        let repo = self.pgbackrest();
        repo.stanza_create().await?;
        repo.check().await?;
        Ok(InitReport {
            config: self.config_path(),
            repo: self.repo_path(),
            restarted,
            took: started.elapsed(),
        })
    }

    /// The directory of the `pg_dump`s taken before risky migrations when
    /// backups are not set up: `<cluster dir>/backup/dumps`.
    pub fn dumps_path(&self) -> PathBuf {
        self.dir.join("dumps")
    }

    /// How to back up before a risky migration on this cluster (what the
    /// `railyard` binary configures its migrator with): an incremental
    /// pgBackRest backup (a full one when the repository holds none) once
    /// `init` was run — the configuration is rewritten first, as the
    /// primary's port may have changed — else a `pg_dump` into
    /// [`LocalBackups::dumps_path`], so that a risky migration never stops a
    /// fresh local cluster from booting.
    pub async fn before_risky(&self) -> Result<BeforeRisky, Error> {
        if self.require_enabled().await.is_ok() {
            self.write_config().await?;
            Ok(super::PgBackRestBefore::new(self.pgbackrest(), BackupType::Incr).before_risky())
        } else {
            Ok(BeforeRisky::pg_dump(self.dumps_path()))
        }
    }

    /// The backups in the repository, oldest first.
    pub async fn list(&self) -> Result<Vec<BackupSet>, Error> {
        self.require_enabled().await?;
        self.write_config().await?;
        self.pgbackrest().info().await
    }

    /// Takes a backup, then a counted restore point: in one transaction,
    /// every table of the database is locked in SHARE mode (writers wait,
    /// readers do not; the lock waits for writers in flight to finish), its
    /// rows are counted, and `pg_create_restore_point` is called. Every
    /// write to those tables committed before the point is counted and none
    /// after it, so a copy recovered to that point must hold exactly those
    /// counts. The point's WAL segment is then switched and archived, and
    /// the counts saved beside the repository.
    pub async fn run(&self, kind: BackupType) -> Result<RunReport, Error> {
        self.require_enabled().await?;
        self.write_config().await?;
        let repo = self.pgbackrest();
        let started = Instant::now();
        repo.backup(kind).await?;
        let backup_took = started.elapsed();
        let set = repo.info().await?.pop().ok_or_else(|| {
            Error::Backup("pgBackRest reported success but lists no backup".into())
        })?;
        let started = Instant::now();
        let point = self.counted_point(&set.label).await?;
        let point_took = started.elapsed();
        Ok(RunReport {
            set,
            point,
            backup_took,
            point_took,
        })
    }

    async fn source_client(&self, db: &str) -> Result<tokio_postgres::Client, Error> {
        admin_client_port(
            self.cluster.dir(),
            self.cluster.primary_port(),
            self.cluster.password(),
            db,
        )
        .await
        .map_err(Error::from)
    }
}
