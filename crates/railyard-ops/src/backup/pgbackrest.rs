//! Driving pgBackRest: one stanza of one repository, described by its
//! configuration file. Railyard runs `stanza-create`, `check`, `backup`,
//! `info` and `restore` (into a directory it names), each with a deadline;
//! it never edits the configuration of a server it does not own.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};

use crate::error::Error;
use railyard::config::Secret;
use railyard::migrate::tool;

/// The kind of a pgBackRest backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackupType {
    /// Every file of the cluster.
    Full,
    /// The files changed since the last backup of any kind.
    Incr,
    /// The files changed since the last full backup.
    Diff,
}

impl BackupType {
    /// The name pgBackRest uses (`full`, `incr`, `diff`).
    pub fn as_str(self) -> &'static str {
        match self {
            BackupType::Full => "full",
            BackupType::Incr => "incr",
            BackupType::Diff => "diff",
        }
    }
}

impl std::str::FromStr for BackupType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "full" => Ok(BackupType::Full),
            "incr" => Ok(BackupType::Incr),
            "diff" => Ok(BackupType::Diff),
            other => Err(Error::Backup(format!(
                "--type: {:?} is not a backup type; use full, incr or diff",
                other.chars().take(20).collect::<String>()
            ))),
        }
    }
}

/// One backup of the repository, as `pgbackrest info --output=json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct BackupSet {
    /// Its label (`20250101-120000F`, `…_20250101-121500I`): what `--set` names.
    pub label: String,
    /// `full`, `incr` or `diff`.
    pub kind: String,
    /// The backup it depends on (incremental and differential backups).
    pub prior: Option<String>,
    /// When it started.
    pub start: DateTime<Utc>,
    /// When it stopped.
    pub stop: DateTime<Utc>,
    /// The cluster's size when it was taken, in bytes.
    pub size: u64,
    /// The bytes this backup copied (its delta).
    pub delta: u64,
    /// Its size in the repository (compressed), in bytes.
    pub repo_size: u64,
    /// What it added to the repository (compressed), in bytes.
    pub repo_delta: u64,
    /// The first WAL segment it needs.
    pub wal_start: String,
    /// The last WAL segment it needs (consistent from there on).
    pub wal_stop: String,
    /// The WAL position where it is consistent.
    pub lsn_stop: String,
}

/// Where a restore's recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RestoreTarget {
    /// As soon as the backup is consistent (its end).
    Immediate,
    /// At a restore point made with `pg_create_restore_point(name)`.
    Name(String),
    /// After the last transaction committed at or before this time.
    Time(DateTime<Utc>),
    /// At the end of the archived WAL.
    Latest,
}

/// A pgBackRest stanza to drive: its configuration file and name, the
/// account to run it as, and the password of the database user in its
/// configuration (`pg1-user`), passed in the environment (`PGPASSWORD`),
/// never on a command line.
///
/// ```no_run
/// # async fn demo() -> Result<(), railyard_ops::Error> {
/// use railyard_ops::backup::pgbackrest::{BackupType, PgBackRest};
/// let repo = PgBackRest::new("/etc/pgbackrest/pgbackrest.conf", "main");
/// repo.backup(BackupType::Incr).await?;
/// for set in repo.info().await? {
///     println!("{} {} {} bytes", set.label, set.kind, set.repo_size);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgBackRest {
    program: Option<PathBuf>,
    config: PathBuf,
    stanza: String,
    ids: Option<(u32, u32)>,
    cwd: Option<PathBuf>,
    password: Option<Secret>,
    timeout: Duration,
}

impl fmt::Debug for PgBackRest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgBackRest")
            .field("config", &self.config)
            .field("stanza", &self.stanza)
            .field("ids", &self.ids)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl PgBackRest {
    /// The stanza `stanza` of the configuration file `config`.
    pub fn new(config: impl Into<PathBuf>, stanza: impl Into<String>) -> Self {
        PgBackRest {
            program: None,
            config: config.into(),
            stanza: stanza.into(),
            ids: None,
            cwd: None,
            password: None,
            timeout: Duration::from_secs(30 * 60),
        }
    }

    /// The `pgbackrest` program. Defaults to the one in `$PATH` (or `/usr/bin`).
    #[must_use]
    pub fn program(mut self, path: impl Into<PathBuf>) -> Self {
        self.program = Some(path.into());
        self
    }

    /// Runs pgBackRest as this account (user and group ids): the owner of
    /// the data directory, as pgBackRest requires. Needs the process to be
    /// root. Defaults to the process's own account.
    #[must_use]
    pub fn run_as(mut self, uid: u32, gid: u32) -> Self {
        self.ids = Some((uid, gid));
        self
    }

    /// The password of the configuration's `pg1-user`, when the server asks
    /// for one (passed as `PGPASSWORD`, removed from any error output).
    #[must_use]
    pub fn password(mut self, password: Option<Secret>) -> Self {
        self.password = password;
        self
    }

    /// The deadline of each pgBackRest command; the process is killed past
    /// it. Defaults to 30 minutes.
    #[must_use]
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// The configuration file.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The stanza.
    pub fn stanza(&self) -> &str {
        &self.stanza
    }

    pub(crate) fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    async fn command(
        &self,
        command: &str,
        options: &[String],
    ) -> Result<std::process::Command, Error> {
        use std::os::unix::process::CommandExt;
        let program = match &self.program {
            Some(p) => p.clone(),
            None => tool::find_async("pgbackrest").await?,
        };
        let mut c = std::process::Command::new(program);
        c.arg(format!("--config={}", self.config.display()))
            .arg(format!("--stanza={}", self.stanza))
            .args(options)
            .arg(command)
            .env("LC_ALL", "C");
        if let Some(dir) = &self.cwd {
            c.current_dir(dir).env("HOME", dir);
        }
        if let Some((uid, gid)) = self.ids {
            c.uid(uid).gid(gid);
        }
        if let Some(p) = &self.password {
            c.env("PGPASSWORD", p.expose());
        }
        Ok(c)
    }

    async fn run(&self, command: &str, options: &[String], what: &str) -> Result<String, Error> {
        let c = self.command(command, options).await?;
        let secrets: Vec<&Secret> = self.password.iter().collect();
        Ok(tool::run(c, what, self.timeout, &secrets).await?.stdout)
    }

    /// `stanza-create`: initialises the stanza in the repository (again
    /// when it exists and matches: harmless).
    pub async fn stanza_create(&self) -> Result<(), Error> {
        self.run("stanza-create", &[], "creating the pgBackRest stanza")
            .await
            .map(drop)
    }

    /// `check`: the server archives WAL into the repository and the
    /// configuration is usable.
    pub async fn check(&self) -> Result<(), Error> {
        self.run("check", &[], "checking the pgBackRest stanza")
            .await
            .map(drop)
    }

    /// Takes a backup of this kind (an incremental or differential one with
    /// no full backup before it becomes full: pgBackRest's rule).
    pub async fn backup(&self, kind: BackupType) -> Result<(), Error> {
        self.run(
            "backup",
            &[format!("--type={}", kind.as_str())],
            &format!("taking a {} backup", kind.as_str()),
        )
        .await
        .map(drop)
    }

    /// The backups in the repository, oldest first.
    pub async fn info(&self) -> Result<Vec<BackupSet>, Error> {
        let out = self
            .run(
                "info",
                &["--output=json".into()],
                "listing the backups (pgbackrest info)",
            )
            .await?;
        parse_info(&out, &self.stanza)
    }

    /// Restores a backup (`set`, or the one pgBackRest picks: the latest, or
    /// for a time target the latest before it) into the empty directory
    /// `into`, recovering to `target` and then promoting. Archiving is off
    /// in the copy, so it never writes into the repository.
    pub async fn restore(
        &self,
        into: &Path,
        set: Option<&str>,
        target: &RestoreTarget,
    ) -> Result<(), Error> {
        let mut options = vec![
            format!("--pg1-path={}", into.display()),
            "--archive-mode=off".into(),
        ];
        if let Some(set) = set {
            options.push(format!("--set={set}"));
        }
        match target {
            RestoreTarget::Immediate => {
                options.push("--type=immediate".into());
                options.push("--target-action=promote".into());
            }
            RestoreTarget::Name(name) => {
                options.push("--type=name".into());
                options.push(format!("--target={name}"));
                options.push("--target-action=promote".into());
            }
            RestoreTarget::Time(t) => {
                options.push("--type=time".into());
                options.push(format!("--target={}", t.format("%Y-%m-%d %H:%M:%S%.6f+00")));
                options.push("--target-action=promote".into());
            }
            RestoreTarget::Latest => {}
        }
        self.run("restore", &options, "restoring a backup")
            .await
            .map(drop)
    }
}

fn parse_info(json: &str, stanza: &str) -> Result<Vec<BackupSet>, Error> {
    let bad = |what: &str| Error::Backup(format!("pgbackrest info --output=json: {what}"));
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| bad(&format!("not JSON ({e})")))?;
    let stanzas = v.as_array().ok_or_else(|| bad("not a list of stanzas"))?;
    let Some(st) = stanzas.iter().find(|s| s["name"] == stanza) else {
        return Err(Error::Backup(format!(
            "the repository has no stanza {stanza:?}; run `railyard backup init` (or pgbackrest stanza-create)"
        )));
    };
    let status = st["status"]["code"].as_i64().unwrap_or(-1);
    // 0 ok, 2 no backup yet: both have a list (maybe empty). Others are errors.
    if status != 0 && status != 2 {
        return Err(Error::Backup(format!(
            "stanza {stanza:?}: {} (pgbackrest status code {status})",
            st["status"]["message"].as_str().unwrap_or("unknown status")
        )));
    }
    let ts = |x: &serde_json::Value| -> Result<DateTime<Utc>, Error> {
        x.as_i64()
            .and_then(|s| Utc.timestamp_opt(s, 0).single())
            .ok_or_else(|| bad("a backup without a timestamp"))
    };
    let text = |x: &serde_json::Value| x.as_str().unwrap_or_default().to_owned();
    let mut out = Vec::new();
    for b in st["backup"].as_array().into_iter().flatten() {
        out.push(BackupSet {
            label: b["label"]
                .as_str()
                .ok_or_else(|| bad("a backup without a label"))?
                .to_owned(),
            kind: text(&b["type"]),
            prior: b["prior"].as_str().map(str::to_owned),
            start: ts(&b["timestamp"]["start"])?,
            stop: ts(&b["timestamp"]["stop"])?,
            size: b["info"]["size"].as_u64().unwrap_or(0),
            delta: b["info"]["delta"].as_u64().unwrap_or(0),
            repo_size: b["info"]["repository"]["size"].as_u64().unwrap_or(0),
            repo_delta: b["info"]["repository"]["delta"].as_u64().unwrap_or(0),
            wal_start: text(&b["archive"]["start"]),
            wal_stop: text(&b["archive"]["stop"]),
            lsn_stop: text(&b["lsn"]["stop"]),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_json_is_read() {
        let json = r#"[{"name":"railyard","status":{"code":0,"message":"ok"},
          "backup":[{"label":"20250101-120000F","type":"full","prior":null,
            "timestamp":{"start":1735732800,"stop":1735732805},
            "info":{"size":100,"delta":100,"repository":{"size":40,"delta":40}},
            "archive":{"start":"000000010000000000000003","stop":"000000010000000000000004"},
            "lsn":{"start":"0/3000028","stop":"0/4000100"}}]}]"#;
        let sets = parse_info(json, "railyard").unwrap();
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].label, "20250101-120000F");
        assert_eq!(sets[0].repo_size, 40);
        assert_eq!(sets[0].wal_stop, "000000010000000000000004");
        assert!(parse_info(json, "other").is_err());
        assert!(parse_info("nope", "railyard").is_err());
    }
}
