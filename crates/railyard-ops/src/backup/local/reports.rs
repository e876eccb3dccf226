//! What the backup commands report: [`InitReport`], [`RunReport`], a drill's
//! [`DrillReport`] with its [`Phase`]s and [`CheckOutcome`]s, a restore's
//! [`PitrReport`]; the counted restore point ([`CountedPoint`]) and the
//! drill's [`Checks`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use railyard::config::Config;

use crate::backup::pgbackrest::BackupSet;
use crate::error::Error;

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
/// tables were held off (see [`LocalBackups::run`](super::LocalBackups::run)).
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

/// What [`LocalBackups::init`](super::LocalBackups::init) did.
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

/// What [`LocalBackups::run`](super::LocalBackups::run) did.
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
