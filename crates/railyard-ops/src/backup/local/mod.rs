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

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;

use crate::backup::pgbackrest::{BackupSet, BackupType, PgBackRest, RestoreTarget};
use crate::error::Error;
use railyard::config::{Config, ConnectTarget, Secret};
use railyard::migrate::BeforeRisky;
use railyard_local::{
    Binaries, LocalCluster, RunAs, admin_client_port, free_port, pg_ctl, pg_running, write_file,
};

/// The stanza of the local cluster's repository.
pub const STANZA: &str = "railyard";

/// How long a scratch instance may take to start and finish its recovery.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(120);
/// How long the archiver may take to archive a restore point's segment.
const ARCHIVE_DEADLINE: Duration = Duration::from_secs(60);
/// The deadline of one query to the source or a scratch instance (the
/// counts of a restore point and of a drill have `statement_timeout` too).
const QUERY_DEADLINE: Duration = Duration::from_secs(300);
/// How many ports a scratch instance tries when the one it picked was
/// taken before its postmaster could bind it.
const START_ATTEMPTS: usize = 5;
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

/// What a restore drill checks beyond the row counts: given the restored
/// instance's configuration, the application's own invariants (for the
/// reference application, `railyard check`'s). Each outcome is reported.
pub type Checks =
    Box<dyn FnOnce(Config) -> BoxFuture<'static, Result<Vec<CheckOutcome>, Error>> + Send>;

/// One named check of a restored instance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct CheckOutcome {
    /// Its name.
    pub name: String,
    /// Whether it held.
    pub passed: bool,
    /// What was seen.
    pub detail: String,
}

impl CheckOutcome {
    /// An outcome.
    pub fn new(name: impl Into<String>, passed: bool, detail: impl Into<String>) -> Self {
        CheckOutcome {
            name: name.into(),
            passed,
            detail: detail.into(),
        }
    }
}

/// The rows of every table of the application's database at a restore
/// point that was created right after a backup, while writes to those
/// tables were held off (see [`LocalBackups::run`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct CountedPoint {
    /// The backup it follows.
    pub label: String,
    /// The restore point's name (`pg_create_restore_point`).
    pub restore_point: String,
    /// Its WAL position.
    pub lsn: String,
    /// The database counted.
    pub database: String,
    /// When it was made.
    pub taken_at: DateTime<Utc>,
    /// Rows per table (`schema.table`).
    pub counts: BTreeMap<String, i64>,
}

/// What [`LocalBackups::init`] did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct InitReport {
    /// The configuration file written.
    pub config: PathBuf,
    /// The repository.
    pub repo: PathBuf,
    /// Whether the primary was restarted to turn archiving on.
    pub restarted: bool,
    /// How long it took.
    pub took: Duration,
}

/// What [`LocalBackups::run`] did.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RunReport {
    /// The backup taken.
    pub set: BackupSet,
    /// The counted restore point taken after it.
    pub point: CountedPoint,
    /// How long the backup took.
    pub backup_took: Duration,
    /// How long the counted restore point took (counts, archiving of its segment).
    pub point_took: Duration,
}

/// One timed phase of a drill or a restore.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct Phase {
    /// `restore`, `start/recovery`, `check`, `teardown`.
    pub name: &'static str,
    /// How long it took.
    #[serde(serialize_with = "secs")]
    pub took: Duration,
    /// Whether it succeeded.
    pub ok: bool,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// A restore drill's verdict.
#[derive(Debug, Clone, serde::Serialize)]
#[non_exhaustive]
pub struct DrillReport {
    /// The backup restored.
    pub label: Option<String>,
    /// What the restore recovered to.
    pub target: String,
    /// The phases, in order.
    pub phases: Vec<Phase>,
    /// The application's checks and one `rows <table>` check per table.
    pub checks: Vec<CheckOutcome>,
    /// Why the drill failed, when a phase did (the checks say the rest).
    pub error: Option<String>,
}

impl DrillReport {
    /// Every phase ran and every check held.
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.checks.iter().all(|c| c.passed)
    }
}

/// The last transaction a point-in-time restore contains.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PitrReport {
    /// The target asked for.
    pub target: DateTime<Utc>,
    /// `pg_last_committed_xact()`: the id and commit time of the last
    /// transaction replayed (with `track_commit_timestamp` on).
    pub last_xact: Option<(String, DateTime<Utc>)>,
    /// The phases: restore, start/recovery.
    pub phases: Vec<Phase>,
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

    async fn counted_point(&self, label: &str) -> Result<CountedPoint, Error> {
        let w = |what: &str| format!("counted restore point: {what}");
        let mut client = self.source_client(&self.database).await?;
        let name = format!("railyard-{label}");
        let tx = within(&w("BEGIN"), client.transaction()).await?;
        // The server ends a count that runs too long (and its SHARE locks
        // with it); the client's deadline is a little later.
        within(
            &w("SET lock_timeout, statement_timeout"),
            tx.batch_execute(&format!(
                "SET LOCAL lock_timeout = '10s'; SET LOCAL statement_timeout = '{}ms'",
                QUERY_DEADLINE.as_millis() - 5000
            )),
        )
        .await?;
        let tables: Vec<String> = within(&w("listing tables"), tx.query(TABLES_SQL, &[]))
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut counts = BTreeMap::new();
        if !tables.is_empty() {
            within(
                &w("locking the tables (SHARE)"),
                tx.batch_execute(&format!("LOCK TABLE {} IN SHARE MODE", tables.join(", "))),
            )
            .await?;
            for t in &tables {
                let row = within(
                    &w(&format!("counting {t}")),
                    tx.query_one(&format!("SELECT count(*) FROM {t}"), &[]),
                )
                .await?;
                counts.insert(t.clone(), row.get::<_, i64>(0));
            }
        }
        let row = within(
            &w("pg_create_restore_point"),
            tx.query_one(
                "WITH p AS (SELECT pg_create_restore_point($1) AS lsn) SELECT lsn::text, pg_walfile_name(lsn) FROM p",
                &[&name],
            ),
        )
        .await?;
        let lsn: String = row.get(0);
        let segment: String = row.get(1);
        within(&w("COMMIT"), tx.commit()).await?;
        wait_archived(&client, &segment).await?;
        let point = CountedPoint {
            label: label.to_owned(),
            restore_point: name,
            lsn,
            database: self.database.clone(),
            taken_at: Utc::now(),
            counts,
        };
        let path = self.dir.join("points").join(format!("{label}.json"));
        let body = serde_json::to_vec_pretty(&point)
            .map_err(|e| Error::Backup(format!("encoding the restore point: {e}")))?;
        let run_as = self.run_as.clone();
        blocking(move || write_file(&path, &body, 0o644, Some(&run_as)).map_err(Error::from))
            .await?;
        Ok(point)
    }

    async fn point_of(&self, label: &str) -> Option<CountedPoint> {
        let text = tokio::fs::read_to_string(self.dir.join("points").join(format!("{label}.json")))
            .await
            .ok()?;
        serde_json::from_str(&text).ok()
    }

    /// A restore drill: restores a backup (`set`, or the newest) into a
    /// scratch instance on a free loopback port, recovering to the backup's
    /// counted restore point (or, for a backup without one, to the end of
    /// the backup), promotes it, runs `checks` and compares every table's
    /// rows with the counts at the point, then stops and removes the
    /// instance (also when a phase fails). A backup without a counted point
    /// (one taken before a risky migration, or whose point failed) is
    /// restored and checked, but its report fails with [`NOT_VERIFIED`]:
    /// without the counts nothing says the copy holds the right rows. Errors only when the drill cannot
    /// begin (backups not set up); a failed phase is in the report.
    pub async fn verify(&self, set: Option<&str>, checks: Checks) -> Result<DrillReport, Error> {
        self.require_enabled().await?;
        self.write_config().await?;
        let mut report = DrillReport {
            label: set.map(str::to_owned),
            target: String::new(),
            phases: Vec::new(),
            checks: Vec::new(),
            error: None,
        };
        let label = match set {
            Some(l) => Some(l.to_owned()),
            None => match self.pgbackrest().info().await {
                Ok(sets) => sets.last().map(|s| s.label.clone()),
                Err(e) => {
                    report.error = Some(format!("listing the backups: {e}"));
                    return Ok(report);
                }
            },
        };
        let Some(label) = label else {
            report.error = Some("the repository holds no backup; run `railyard backup run`".into());
            return Ok(report);
        };
        report.label = Some(label.clone());
        let point = self.point_of(&label).await;
        let target = match &point {
            Some(p) => RestoreTarget::Name(p.restore_point.clone()),
            None => RestoreTarget::Immediate,
        };
        report.target = match &point {
            Some(p) => format!("restore point {} at {}", p.restore_point, p.lsn),
            None => {
                "the end of the backup (no counted restore point recorded: rows cannot be compared)"
                    .into()
            }
        };
        let mut scratch = match self.scratch("drill").await {
            Ok(s) => s,
            Err(e) => {
                report.error = Some(e.to_string());
                return Ok(report);
            }
        };
        let outcome = self
            .drill_phases(
                &mut scratch,
                &label,
                &target,
                point.as_ref(),
                checks,
                &mut report,
            )
            .await;
        if let Err(e) = outcome {
            report.error = Some(e.to_string());
        }
        if point.is_none() && report.error.is_none() {
            // It restored and the application's checks held, but nothing
            // says which rows the copy should hold: no verdict of "passed".
            report.error = Some(NOT_VERIFIED.into());
        }
        let started = Instant::now();
        let down = scratch.remove().await;
        report.phases.push(Phase {
            name: "teardown",
            took: started.elapsed(),
            ok: down.is_ok(),
        });
        if let Err(e) = down
            && report.error.is_none()
        {
            report.error = Some(format!("teardown: {e}"));
        }
        Ok(report)
    }

    async fn drill_phases(
        &self,
        scratch: &mut Scratch,
        label: &str,
        target: &RestoreTarget,
        point: Option<&CountedPoint>,
        checks: Checks,
        report: &mut DrillReport,
    ) -> Result<(), Error> {
        let timed = |name, started: Instant, ok| Phase {
            name,
            took: started.elapsed(),
            ok,
        };
        let started = Instant::now();
        let r = self
            .pgbackrest()
            .restore(&scratch.data, Some(label), target)
            .await;
        report.phases.push(timed("restore", started, r.is_ok()));
        r?;
        let started = Instant::now();
        let r = scratch.start().await;
        report
            .phases
            .push(timed("start/recovery", started, r.is_ok()));
        r?;
        let started = Instant::now();
        let r = self.check_phase(scratch, point, checks).await;
        let ok = r.as_ref().is_ok_and(|c| c.iter().all(|c| c.passed));
        report.phases.push(timed("check", started, ok));
        report.checks = r?;
        Ok(())
    }

    async fn check_phase(
        &self,
        scratch: &Scratch,
        point: Option<&CountedPoint>,
        checks: Checks,
    ) -> Result<Vec<CheckOutcome>, Error> {
        let mut out = checks(scratch.config(&self.database)).await?;
        if let Some(point) = point {
            let client = scratch.client(&point.database).await?;
            within(
                "SET statement_timeout",
                client.batch_execute(&format!(
                    "SET statement_timeout = '{}ms'",
                    QUERY_DEADLINE.as_millis() - 5000
                )),
            )
            .await?;
            let tables: Vec<String> =
                within("listing the restored tables", client.query(TABLES_SQL, &[]))
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
            for (t, expected) in &point.counts {
                let seen = if tables.contains(t) {
                    within(
                        "counting",
                        client.query_one(&format!("SELECT count(*) FROM {t}"), &[]),
                    )
                    .await
                    .map(|r| r.get::<_, i64>(0))
                    .ok()
                } else {
                    None
                };
                out.push(CheckOutcome::new(
                    format!("rows {t}"),
                    seen == Some(*expected),
                    match seen {
                        Some(n) => format!("{n} restored, {expected} at the restore point"),
                        None => format!("missing from the copy; {expected} at the restore point"),
                    },
                ));
            }
            for t in tables.iter().filter(|t| !point.counts.contains_key(*t)) {
                out.push(CheckOutcome::new(
                    format!("rows {t}"),
                    false,
                    "in the copy but not at the restore point",
                ));
            }
        }
        Ok(out)
    }

    /// Point-in-time recovery into a scratch instance: pgBackRest picks the
    /// newest backup before `to`, recovery replays the archive up to the
    /// last transaction committed at or before `to`, and the instance is
    /// promoted. The returned instance runs until [`Scratch::remove`] (or
    /// [`Scratch::keep`] to leave it running).
    pub async fn restore(&self, to: DateTime<Utc>) -> Result<(Scratch, PitrReport), Error> {
        self.require_enabled().await?;
        self.write_config().await?;
        let client = self.source_client("postgres").await?;
        // The server's clock decides (commit times are the server's).
        let now: f64 = within(
            "reading the primary's clock",
            client.query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[]),
        )
        .await?
        .get(0);
        let now = DateTime::from_timestamp_micros((now * 1e6) as i64).unwrap_or_else(Utc::now);
        if to >= now {
            return Err(Error::Backup(format!(
                "--to-time {} is not in the past by the server's clock (now {} there); give a time that has passed",
                to.format("%Y-%m-%dT%H:%M:%S%.6fZ"),
                now.format("%Y-%m-%dT%H:%M:%S%.6fZ")
            )));
        }
        // Recovery to a time stops at the first commit after it, and fails
        // when the archive holds none ("recovery ended before configured
        // recovery target was reached"), as on a quiet cluster. A transaction
        // with a transaction id, committed now (after `to`), is that commit;
        // then its segment is switched and archived.
        within(
            "committing a marker transaction after the target",
            client.batch_execute("BEGIN; SELECT pg_current_xact_id(); COMMIT"),
        )
        .await?;
        let row = within(
            "reading the primary's WAL position",
            client.query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[]),
        )
        .await?;
        wait_archived(&client, &row.get::<_, String>(0)).await?;
        drop(client);
        let mut scratch = self.scratch("pitr").await?;
        let mut phases = Vec::new();
        let started = Instant::now();
        let r = self
            .pgbackrest()
            .restore(&scratch.data, None, &RestoreTarget::Time(to))
            .await;
        phases.push(Phase {
            name: "restore",
            took: started.elapsed(),
            ok: r.is_ok(),
        });
        if let Err(e) = r {
            let _ = scratch.remove().await;
            return Err(e);
        }
        let started = Instant::now();
        let r = scratch.start().await;
        phases.push(Phase {
            name: "start/recovery",
            took: started.elapsed(),
            ok: r.is_ok(),
        });
        if let Err(e) = r {
            let _ = scratch.remove().await;
            return Err(e);
        }
        let last = async {
            let client = scratch.client("postgres").await?;
            let row = client
                .query_one(
                    "SELECT xid::text, extract(epoch FROM timestamp)::float8 FROM pg_last_committed_xact()",
                    &[],
                )
                .await
                .map_err(|e| Error::Backup(format!("pg_last_committed_xact(): {e}")))?;
            let (mut xid, mut at): (Option<String>, Option<f64>) = (row.get(0), row.get(1));
            if xid.is_none() {
                // Only commits replayed since the start are remembered: when
                // recovery replayed none (the target is before any commit
                // after the backup began), the newest commit timestamp kept
                // in pg_commit_ts (looking back 10,000 transactions) says it.
                let row = client
                    .query_opt(
                        "WITH n AS (SELECT (pg_snapshot_xmax(pg_current_snapshot())::text::bigint % 4294967296) AS next) \
                         SELECT x::text, extract(epoch FROM pg_xact_commit_timestamp(x::text::xid))::float8 \
                         FROM n, generate_series(n.next - 1, greatest(3, n.next - 10000), -1) x \
                         WHERE pg_xact_commit_timestamp(x::text::xid) IS NOT NULL LIMIT 1",
                        &[],
                    )
                    .await
                    .map_err(|e| Error::Backup(format!("reading commit timestamps: {e}")))?;
                if let Some(r) = row {
                    (xid, at) = (r.get(0), r.get(1));
                }
            }
            Ok::<_, Error>(xid.zip(at).and_then(|(x, t)| {
                DateTime::from_timestamp_micros((t * 1e6) as i64).map(|t| (x, t))
            }))
        }
        .await;
        let last_xact = match last {
            Ok(l) => l,
            Err(e) => {
                let _ = scratch.remove().await;
                return Err(e);
            }
        };
        Ok((
            scratch,
            PitrReport {
                target: to,
                last_xact,
                phases,
            },
        ))
    }

    /// Stops and removes a scratch instance left running (`restore --keep`).
    pub async fn discard(&self, name: &str) -> Result<(), Error> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(Error::Backup(format!(
                "scratch instance name {:?}: letters, digits and '-' only (as printed by `railyard backup restore --keep`)",
                name.chars().take(40).collect::<String>()
            )));
        }
        let dir = self.dir.join("scratch").join(name);
        if !dir.is_dir() {
            return Err(Error::Backup(format!(
                "no scratch instance {name} in {}",
                self.dir.join("scratch").display()
            )));
        }
        Scratch {
            name: name.to_owned(),
            data: dir.join("data"),
            dir,
            port: 0,
            password: self.cluster.password().clone(),
            cluster_pg: self.cluster.dir().join("pg"),
            run_as: self.run_as.clone(),
            bins: self.bins.clone(),
            live: true,
        }
        .remove()
        .await
    }

    async fn scratch(&self, kind: &str) -> Result<Scratch, Error> {
        let name = format!("{kind}-{:08x}", rand::random::<u32>());
        let dir = self.dir.join("scratch").join(&name);
        let data = dir.join("data");
        let run_as = self.run_as.clone();
        let (d, dd) = (dir.clone(), data.clone());
        blocking(move || {
            for p in [&d, &dd, &d.join("s")] {
                fs::create_dir_all(p)
                    .map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
                run_as.own(p)?;
            }
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dd, fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(format!("chmod {}", dd.display()), e))
        })
        .await?;
        Ok(Scratch {
            name,
            dir,
            data,
            port: 0,
            password: self.cluster.password().clone(),
            cluster_pg: self.cluster.dir().join("pg"),
            run_as: self.run_as.clone(),
            bins: self.bins.clone(),
            live: true,
        })
    }
}

/// Every table of the database outside the system schemas, quoted for SQL.
const TABLES_SQL: &str = "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
     JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
       AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' \
     ORDER BY 1";

async fn wait_archived(client: &tokio_postgres::Client, segment: &str) -> Result<(), Error> {
    let what = "waiting for the archiver";
    within(what, client.batch_execute("SELECT pg_switch_wal()")).await?;
    let deadline = Instant::now() + ARCHIVE_DEADLINE;
    loop {
        let row = within(
            what,
            client.query_one(
                "SELECT coalesce(last_archived_wal, ''), coalesce(last_failed_wal, ''), failed_count FROM pg_stat_archiver",
                &[],
            ),
        )
        .await?;
        let archived: String = row.get(0);
        // Segment names of one timeline sort in WAL order.
        if archived.len() == segment.len() && archived.as_str() >= segment {
            return Ok(());
        }
        if Instant::now() > deadline {
            let failed: String = row.get(1);
            return Err(Error::Backup(format!(
                "WAL segment {segment} was not archived within {ARCHIVE_DEADLINE:?} (last archived {archived:?}, last failed {failed:?}, {} failures); see the primary's log",
                row.get::<_, i64>(2)
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A scratch instance restored from the repository, under
/// `<cluster dir>/backup/scratch/<name>`: stopped and removed by
/// [`Scratch::remove`], or when dropped unless [`Scratch::keep`] was called.
pub struct Scratch {
    name: String,
    dir: PathBuf,
    data: PathBuf,
    port: u16,
    password: Secret,
    cluster_pg: PathBuf,
    run_as: RunAs,
    bins: Binaries,
    live: bool,
}

impl fmt::Debug for Scratch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scratch")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Scratch {
    /// Its name (what `railyard backup discard` takes).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its port on 127.0.0.1 (0 before it started).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of a database on it, over its Unix socket (the source
    /// cluster's user and password).
    pub fn target(&self, dbname: &str) -> ConnectTarget {
        ConnectTarget::unix_socket(
            self.dir.join("s"),
            self.port,
            "railyard",
            Some(self.password.clone()),
            dbname,
        )
    }

    /// A configuration for a database on it (primary only).
    pub fn config(&self, dbname: &str) -> Config {
        Config::new(self.target(dbname))
    }

    /// A plain client of a database on it.
    pub async fn client(&self, dbname: &str) -> Result<tokio_postgres::Client, Error> {
        let mut c = tokio_postgres::Config::new();
        c.host_path(self.dir.join("s"))
            .port(self.port)
            .user("railyard")
            .password(self.password.expose())
            .dbname(dbname)
            .application_name("railyard-backup")
            .connect_timeout(Duration::from_secs(10));
        let (client, conn) = c.connect(tokio_postgres::NoTls).await.map_err(|e| {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            Error::Backup(format!(
                "connecting to the scratch instance on port {}: {e}{cause}",
                self.port
            ))
        })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Leaves it running after this value is dropped.
    pub fn keep(mut self) {
        self.live = false;
    }

    /// Writes its settings, starts it and waits until recovery has ended
    /// and it was promoted.
    ///
    /// The port is picked free, but another process (a test's cluster, say)
    /// may bind it before the postmaster does: a start that fails on a bind
    /// error is retried on a new port, [`START_ATTEMPTS`] times at most.
    async fn start(&mut self) -> Result<(), Error> {
        let mut attempt = 1;
        loop {
            match self.start_on(free_port()?).await {
                Err(e) if attempt < START_ATTEMPTS && self.bind_failed().await => {
                    tracing::info!(target: "railyard::backup", port = self.port, attempt, error = %e, "the scratch instance's port was taken; trying another");
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    /// Whether the last start failed to bind its port (from its log).
    async fn bind_failed(&self) -> bool {
        tokio::fs::read_to_string(self.dir.join("data.log"))
            .await
            .is_ok_and(|log| {
                let port = format!("port {}", self.port);
                log.lines().rev().take(20).any(|l| {
                    l.contains("could not bind") || (l.contains(&port) && l.contains("in use"))
                })
            })
    }

    async fn start_on(&mut self, port: u16) -> Result<(), Error> {
        self.port = port;
        // The settings hot standby requires to be at least the source's
        // (max_connections, max_wal_senders, max_locks_per_transaction)
        // are the local cluster's.
        let conf = format!(
            "# written by railyard for a scratch instance restored from a backup\n\
             port = {port}\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{sockets}'\n\
             ssl = on\n\
             ssl_cert_file = '{pg}/server.crt'\n\
             ssl_key_file = '{pg}/server.key'\n\
             max_connections = 300\n\
             max_wal_senders = 10\n\
             max_locks_per_transaction = 256\n\
             shared_buffers = 32MB\n\
             wal_level = replica\n\
             hot_standby = on\n\
             archive_mode = off\n\
             track_commit_timestamp = on\n\
             fsync = off\n\
             logging_collector = off\n\
             log_min_messages = warning\n",
            port = self.port,
            sockets = self.dir.join("s").display(),
            pg = self.cluster_pg.display(),
        );
        let (data, dir, run_as, bins) = (
            self.data.clone(),
            self.dir.clone(),
            self.run_as.clone(),
            self.bins.clone(),
        );
        blocking(move || {
            // A failed attempt's log must not be read as this one's.
            let _ = fs::remove_file(dir.join("data.log"));
            write_file(
                &data.join("railyard.conf"),
                conf.as_bytes(),
                0o600,
                Some(&run_as),
            )?;
            let _ = fs::remove_file(data.join("standby.signal"));
            pg_ctl(
                &bins,
                &run_as,
                &dir,
                &["start", "-w", "-t", "120", "-D", "data", "-l", "data.log"],
            )
            .map_err(Error::from)
        })
        .await?;
        let client = self.client("postgres").await?;
        let deadline = Instant::now() + RECOVERY_DEADLINE;
        loop {
            let row = within(
                "waiting for the promotion",
                client.query_one("SELECT pg_is_in_recovery()", &[]),
            )
            .await?;
            if !row.get::<_, bool>(0) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Backup(format!(
                    "the scratch instance was still recovering after {RECOVERY_DEADLINE:?}; see {}",
                    self.dir.join("data.log").display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops it (immediate mode) and removes its directory.
    pub async fn remove(mut self) -> Result<(), Error> {
        self.live = false;
        let (dir, run_as, bins) = (self.dir.clone(), self.run_as.clone(), self.bins.clone());
        blocking(move || remove_blocking(&dir, &run_as, &bins)).await
    }
}

fn remove_blocking(dir: &Path, run_as: &RunAs, bins: &Binaries) -> Result<(), Error> {
    let data = dir.join("data");
    if pg_running(bins, &data) {
        pg_ctl(
            bins,
            run_as,
            dir,
            &["stop", "-m", "immediate", "-w", "-t", "60", "-D", "data"],
        )?;
    }
    fs::remove_dir_all(dir).map_err(|e| Error::io(format!("removing {}", dir.display()), e))
}

impl Drop for Scratch {
    /// Cancelled or failed before [`Scratch::remove`]: the instance is
    /// stopped and removed all the same. `pg_ctl stop` may take up to a
    /// minute, which must not stall a runtime's worker thread: inside a
    /// tokio runtime the work goes to its blocking pool (`spawn_blocking`),
    /// which a runtime being dropped waits for, so a test's or a program's
    /// end does not leave the instance running, as a detached thread killed
    /// by the process's exit could. Outside a runtime it runs here.
    fn drop(&mut self) {
        if !self.live {
            return;
        }
        let (dir, run_as, bins) = (self.dir.clone(), self.run_as.clone(), self.bins.clone());
        let work = move || {
            if let Err(e) = remove_blocking(&dir, &run_as, &bins) {
                tracing::warn!(target: "railyard::backup", error = %e, dir = %dir.display(), "could not remove a scratch instance");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(work);
            }
            Err(_) => work(),
        }
    }
}
