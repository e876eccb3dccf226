//! A private PostgreSQL cluster from the server binaries on this machine
//! for the railyard CLI, the tests and local development.
//!
//! [`LocalCluster::shared`] starts, or joins, one primary and one streaming replica
//! under `$RAILYARD_LOCAL_DIR` (default `/tmp/railyard-local-<uid>`): `initdb`
//! with scram-sha-256 and a generated password, TLS with a CA and a server
//! certificate generated at first start, `pg_basebackup -R` with a replication slot,
//! both servers on free loopback ports. Concurrent processes share it through a
//! lock file; the servers outlive the process that started them (stop them with
//! `scripts/local stop`). As root, the servers run as the `postgres` user (or
//! `nobody`), since PostgreSQL refuses to run as root.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let cluster = railyard_local::LocalCluster::shared().await?;
//! let config = cluster.config(); // verify-full TLS, primary + replica
//! let db = railyard::Database::connect(config).await?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::RngExt;
use rand::distr::Alphanumeric;

use railyard::config::{Config, ConnectTarget, Secret};

pub mod error;
pub mod ha;
pub mod pgbouncer;
#[doc(hidden)]
pub mod scratch;

pub use error::Error;

const USER: &str = "railyard";
const DBNAME: &str = "railyard";
const SLOT: &str = "railyard_replica";

/// `config` as it is, or, when it stands for the local cluster (no
/// `DATABASE_URL` in the development or test profile), pointed at the shared
/// local cluster, which is started or joined.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let config = railyard_local::resolve(railyard::Config::from_env()?).await?;
/// let db = railyard::Database::connect(config).await?;
/// # Ok(()) }
/// ```
pub async fn resolve(config: Config) -> Result<Config, Error> {
    if config.local_database().is_none() {
        return Ok(config);
    }
    LocalCluster::shared().await?.resolve(config).await
}

/// How a cluster came to be running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartKind {
    /// Another process had it running; this one joined.
    Joined,
    /// The data directories existed; the servers were started.
    Warm,
    /// Created from scratch: initdb, certificates, base backup.
    Cold,
}

/// Where the PostgreSQL server binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// Finds `initdb`, `pg_ctl` and `pg_basebackup`: in `$PATH`, in
    /// `pg_config --bindir`, or in the newest `/usr/lib/postgresql/<version>/bin`.
    pub fn find() -> Result<Self, Error> {
        let has_all = |d: &Path| {
            ["initdb", "pg_ctl", "pg_basebackup", "postgres"]
                .iter()
                .all(|b| d.join(b).is_file())
        };
        if let Ok(dir) = std::env::var("RAILYARD_PG_BINDIR") {
            let d = PathBuf::from(dir);
            if has_all(&d) {
                return Ok(Binaries { dir: d });
            }
        }
        if let Some(path) = std::env::var_os("PATH") {
            for d in std::env::split_paths(&path) {
                if has_all(&d) {
                    return Ok(Binaries { dir: d });
                }
            }
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
            && out.status.success()
        {
            let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_all(&d) {
                return Ok(Binaries { dir: d });
            }
        }
        if let Some(dir) = railyard::config::versioned_pg_bindirs()
            .into_iter()
            .find(|d| has_all(d))
        {
            return Ok(Binaries { dir });
        }
        Err(Error::Local(
            "no PostgreSQL server binaries found (looked for initdb, pg_ctl, pg_basebackup and postgres in $PATH, `pg_config --bindir` and /usr/lib/postgresql/*/bin). Install them: `apt-get install postgresql` on Debian/Ubuntu, `dnf install postgresql-server` on Fedora, `brew install postgresql` on macOS; or set RAILYARD_PG_BINDIR, or point DATABASE_URL / TEST_DATABASE_URL at a running server".into(),
        ))
    }

    /// Whether the server can load the shared library `name` (for example
    /// `pg_stat_statements`): it is in `pg_config --pkglibdir`, or in the
    /// `lib` directory beside the binaries (Debian's layout).
    pub fn has_library(&self, name: &str) -> bool {
        let file = format!("{name}.so");
        let pg_config = self.dir.join("pg_config");
        if let Ok(out) = Command::new(&pg_config).arg("--pkglibdir").output()
            && out.status.success()
        {
            let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if d.join(&file).is_file() {
                return true;
            }
        }
        self.dir
            .parent()
            .is_some_and(|p| p.join("lib").join(&file).is_file())
    }

    /// The directory holding the binaries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn bin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The unprivileged account the servers run as.
#[derive(Debug, Clone)]
#[doc(hidden)]
pub struct RunAs {
    ids: Option<(u32, u32)>,
    /// The account's name: what `initdb` names the superuser by default.
    name: String,
}

impl RunAs {
    /// Workspace-internal.
    pub fn detect() -> Result<Self, Error> {
        let me = nix::unistd::Uid::effective();
        if !me.is_root() {
            let name = nix::unistd::User::from_uid(me)
                .ok()
                .flatten()
                .map(|u| u.name)
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_default();
            return Ok(RunAs { ids: None, name });
        }
        for wanted in ["postgres", "nobody"] {
            let user = nix::unistd::User::from_name(wanted).map_err(|e| {
                Error::io(
                    format!("looking up the user {wanted:?} to run the servers as"),
                    std::io::Error::from(e),
                )
            })?;
            if let Some(u) = user {
                tracing::debug!(target: "railyard::local", user = wanted, "running the servers as an unprivileged user");
                return Ok(RunAs {
                    ids: Some((u.uid.as_raw(), u.gid.as_raw())),
                    name: wanted.to_owned(),
                });
            }
        }
        Err(Error::Local(
            "running as root, and neither a `postgres` nor a `nobody` user exists to run the servers as (PostgreSQL refuses to run as root); create one with `useradd --system postgres`".into(),
        ))
    }

    /// The account's user and group ids, when the servers run as another
    /// account than this process's.
    /// Workspace-internal.
    pub fn ids(&self) -> Option<(u32, u32)> {
        self.ids
    }

    /// Workspace-internal.
    pub fn command(&self, program: &Path, cwd: &Path) -> Command {
        let mut c = Command::new(program);
        c.current_dir(cwd).stdin(Stdio::null());
        // LANG/LC_* of the caller may name locales the server does not have.
        c.env("LC_ALL", "C");
        if let Some((uid, gid)) = self.ids {
            c.uid(uid).gid(gid);
            c.env("HOME", cwd);
        }
        c
    }

    /// Workspace-internal.
    pub fn own(&self, path: &Path) -> Result<(), Error> {
        if let Some((uid, gid)) = self.ids {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(|e| Error::io(format!("chown {}", path.display()), e))?;
        }
        Ok(())
    }
}

/// The saved facts about a cluster, shared by every process that joins it.
#[derive(Clone, PartialEq, Eq)]
struct State {
    primary_port: u16,
    replica_port: Option<u16>,
    password: Secret,
}

impl State {
    fn render(&self) -> String {
        format!(
            "primary_port={}\nreplica_port={}\npassword={}\n",
            self.primary_port,
            self.replica_port.map(|p| p.to_string()).unwrap_or_default(),
            self.password.expose()
        )
    }

    fn parse(s: &str) -> Option<State> {
        let mut primary_port = None;
        let mut replica_port = None;
        let mut password = None;
        for line in s.lines() {
            match line.split_once('=') {
                Some(("primary_port", v)) => primary_port = v.parse().ok(),
                Some(("replica_port", v)) => replica_port = v.parse().ok(),
                Some(("password", v)) => password = Some(Secret::new(v)),
                _ => {}
            }
        }
        Some(State {
            primary_port: primary_port?,
            replica_port,
            password: password?,
        })
    }
}

/// Options for starting a cluster.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `start` is called"]
pub struct LocalClusterBuilder {
    dir: PathBuf,
    replica: bool,
    ephemeral: bool,
}

impl LocalClusterBuilder {
    /// The directory holding the cluster. Defaults to `$RAILYARD_LOCAL_DIR`, else
    /// `/tmp/railyard-local-<uid>`.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = dir.into();
        self
    }

    /// Marks the cluster as this process's: once the process is gone (killed,
    /// even), [`scratch::reap_private_clusters`] and `railyard local gc` stop
    /// it and remove its directory. For private clusters of tests. Defaults
    /// to `false`.
    pub fn ephemeral(mut self, yes: bool) -> Self {
        self.ephemeral = yes;
        self
    }

    /// Whether to run a streaming replica beside the primary. Defaults to `true`.
    pub fn replica(mut self, on: bool) -> Self {
        self.replica = on;
        self
    }

    /// Starts the cluster, or joins it when another process already runs it.
    pub async fn start(self) -> Result<LocalCluster, Error> {
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            if self.ephemeral {
                scratch::claim_dir(&self.dir)?;
            }
            start_blocking(&self, &handle)
        })
        .await
        .map_err(|e| Error::Local(format!("start task failed: {e}")))?
    }
}

/// A running local cluster: a primary and, usually, one streaming replica.
#[derive(Clone)]
pub struct LocalCluster {
    dir: PathBuf,
    state: State,
    started: StartKind,
    start_time: Duration,
    bindir: PathBuf,
}

impl fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCluster")
            .field("dir", &self.dir)
            .field("primary_port", &self.state.primary_port)
            .field("replica_port", &self.state.replica_port)
            .field("started", &self.started)
            .field("start_time", &self.start_time)
            .finish()
    }
}

fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RAILYARD_LOCAL_DIR") {
        return PathBuf::from(d);
    }
    let uid = nix::unistd::Uid::effective().as_raw();
    std::env::temp_dir().join(format!("railyard-local-{uid}"))
}

impl LocalCluster {
    /// Options for a cluster; use this for a private cluster in its own directory
    /// (tests that stop or promote servers must not touch the shared one).
    pub fn builder() -> LocalClusterBuilder {
        LocalClusterBuilder {
            dir: default_dir(),
            replica: true,
            ephemeral: false,
        }
    }

    /// Starts or joins the shared cluster (primary + replica) in the default directory.
    pub async fn shared() -> Result<LocalCluster, Error> {
        LocalCluster::builder().start().await
    }

    /// Reads the state of a cluster without starting anything; `None` when it is
    /// not running.
    pub async fn running(dir: Option<PathBuf>) -> Result<Option<LocalCluster>, Error> {
        let dir = dir.unwrap_or_else(default_dir);
        // Files and `pg_ctl status`: off the async runtime.
        tokio::task::spawn_blocking(move || Self::running_blocking(dir))
            .await
            .map_err(|e| Error::Local(format!("status task failed: {e}")))?
    }

    fn running_blocking(dir: PathBuf) -> Result<Option<LocalCluster>, Error> {
        let Ok(text) = fs::read_to_string(dir.join("state")) else {
            return Ok(None);
        };
        let Some(state) = State::parse(&text) else {
            return Ok(None);
        };
        let bins = Binaries::find()?;
        let primary_up = pg_running(&bins, &dir.join("pg/primary"));
        if !primary_up {
            return Ok(None);
        }
        Ok(Some(LocalCluster {
            dir,
            state,
            started: StartKind::Joined,
            start_time: Duration::ZERO,
            bindir: bins.dir,
        }))
    }

    /// How this process got the cluster running.
    pub fn started(&self) -> StartKind {
        self.started
    }

    /// How long starting (or joining) took.
    pub fn start_time(&self) -> Duration {
        self.start_time
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate that signed the servers' certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The directory of the servers' Unix sockets.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("pg/sockets")
    }

    /// The primary's port on 127.0.0.1.
    pub fn primary_port(&self) -> u16 {
        self.state.primary_port
    }

    /// The replica's port, when there is a replica.
    pub fn replica_port(&self) -> Option<u16> {
        self.state.replica_port
    }

    /// The superuser's password.
    pub fn password(&self) -> &Secret {
        &self.state.password
    }

    /// The server binaries in use.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    fn target(&self, port: u16, dbname: &str) -> ConnectTarget {
        let url = format!(
            "postgres://{USER}@localhost:{port}/{dbname}?sslmode=verify-full&sslrootcert={}",
            self.ca_cert().display()
        );
        url.parse::<ConnectTarget>()
            .expect("the local cluster's URL is well formed")
            .with_password(Some(self.state.password.clone()))
    }

    /// The primary's URL (TLS verify-full against the cluster's CA) for a database.
    pub fn primary_target(&self, dbname: &str) -> ConnectTarget {
        self.target(self.state.primary_port, dbname)
    }

    /// The replica's URL for a database.
    pub fn replica_target(&self, dbname: &str) -> Option<ConnectTarget> {
        self.state.replica_port.map(|p| self.target(p, dbname))
    }

    /// A Unix-socket URL for the primary (no TLS on sockets).
    pub fn primary_socket_target(&self, dbname: &str) -> ConnectTarget {
        ConnectTarget::unix_socket(
            self.socket_dir(),
            self.state.primary_port,
            USER,
            Some(self.state.password.clone()),
            dbname,
        )
    }

    /// A Unix-socket URL for the replica.
    pub fn replica_socket_target(&self, dbname: &str) -> Option<ConnectTarget> {
        let port = self.state.replica_port?;
        Some(ConnectTarget::unix_socket(
            self.socket_dir(),
            port,
            USER,
            Some(self.state.password.clone()),
            dbname,
        ))
    }

    /// A [`Config`] for the `railyard` database: primary and replica.
    pub fn config(&self) -> Config {
        self.config_for(DBNAME)
    }

    /// A [`Config`] for another database of this cluster.
    pub fn config_for(&self, dbname: &str) -> Config {
        let mut c = Config::new(self.primary_target(dbname));
        if let Some(r) = self.replica_target(dbname) {
            c = c.replica(r);
        }
        c
    }

    /// Points a configuration that stands for the local cluster
    /// ([`Config::local_database`]) at this cluster: creates the database and
    /// sets the primary and replica URLs, keeping every other setting. Any
    /// other configuration is returned as it is.
    pub async fn resolve(&self, config: Config) -> Result<Config, Error> {
        let Some(db) = config.local_database().map(str::to_owned) else {
            return Ok(config);
        };
        self.create_database(&db).await?;
        tracing::info!(target: "railyard::local", database = %db, profile = %config.profile(), "DATABASE_URL is unset: using the local cluster");
        let replicas = self.replica_target(&db).into_iter().collect();
        Ok(config.with_targets(self.primary_target(&db), replicas))
    }

    /// `DATABASE_URL='…'` and `DATABASE_REPLICA_URLS='…'` lines, single-quoted for
    /// the shell (URLs are percent-encoded, so they hold no quote). They carry the
    /// password: for `eval` in a shell or a `.env` file, never for logs.
    pub fn env_lines(&self) -> String {
        self.env_lines_for(DBNAME)
    }

    /// As [`LocalCluster::env_lines`], for another database of the cluster
    /// (which must exist: see [`LocalCluster::create_database`]).
    pub fn env_lines_for(&self, dbname: &str) -> String {
        let mut s = format!(
            "DATABASE_URL='{}'\n",
            self.primary_target(dbname).expose_url()
        );
        if let Some(r) = self.replica_target(dbname) {
            s.push_str(&format!("DATABASE_REPLICA_URLS='{}'\n", r.expose_url()));
        }
        s
    }

    /// Creates a database (owned by the cluster's user) if it does not exist.
    pub async fn create_database(&self, name: &str) -> Result<(), Error> {
        let client = admin_client(self, "postgres").await?;
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .await
            .map_err(|e| Error::Local(format!("checking database {name}: {e}")))?;
        if exists.is_none() {
            let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
            if let Err(e) = client.batch_execute(&sql).await {
                // Another process may have created it in between.
                if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) {
                    return Err(Error::Local(format!("creating database {name}: {e}")));
                }
            }
        }
        Ok(())
    }

    /// Reclaims what test runs left behind: scratch databases and private
    /// clusters (in the system's temporary directory) of processes that are
    /// gone, and harness templates not prepared within `template_idle` and not
    /// in use (or left unfinished by a failed migration run). Dropping is
    /// serialised with the harness's creation of databases.
    pub async fn gc(&self, template_idle: Duration) -> Result<scratch::GcReport, Error> {
        let client = admin_client(self, "postgres").await?;
        let parent = std::env::temp_dir();
        scratch::gc(&client, template_idle, &parent).await
    }

    /// Stops the servers (replica first). The data directories are kept, so the
    /// next start is warm.
    pub fn stop(&self) -> Result<(), Error> {
        stop_dir(&self.dir)
    }

    /// Runs `pg_ctl` on this cluster's servers, as the account that owns them.
    fn ctl(&self, args: &[&str]) -> Result<(), Error> {
        pg_ctl(
            &Binaries::find()?,
            &RunAs::detect()?,
            &self.dir.join("pg"),
            args,
        )
    }

    /// Stops only the replica (for tests of replica failure).
    pub fn stop_replica(&self) -> Result<(), Error> {
        self.ctl(&["stop", "-m", "fast", "-w", "-D", "replica"])
    }

    /// Starts the replica again after [`LocalCluster::stop_replica`].
    pub fn start_replica(&self) -> Result<(), Error> {
        self.ctl(&[
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            "replica",
            "-l",
            "replica.log",
        ])
    }

    /// Stops only the primary (fast shutdown: the replica receives all WAL first).
    pub fn stop_primary(&self) -> Result<(), Error> {
        self.ctl(&["stop", "-m", "fast", "-w", "-D", "primary"])
    }

    /// Restarts the primary the hard way: `pg_ctl restart -m immediate` (every
    /// backend is killed without a checkpoint, as after a crash; the server
    /// runs crash recovery when it starts), waiting until it accepts
    /// connections again. The replica reconnects to it on its own.
    pub fn restart_primary(&self) -> Result<(), Error> {
        self.ctl(&[
            "restart",
            "-m",
            "immediate",
            "-w",
            "-t",
            "60",
            "-D",
            "primary",
            "-l",
            "primary.log",
        ])
    }

    /// Promotes the replica to a primary (`pg_ctl promote`), waiting until it
    /// accepts writes.
    pub fn promote_replica(&self) -> Result<(), Error> {
        self.ctl(&["promote", "-w", "-t", "60", "-D", "replica"])
    }

    /// Turns WAL archiving on for the primary with this `archive_command`
    /// (`%p` is the segment's path), or off with `None`, and turns
    /// `track_commit_timestamp` on with it (a restored copy can then say when
    /// its last transaction committed). The settings are kept in the
    /// cluster's directory and written at every start. When they change, the
    /// primary is restarted (fast shutdown; `archive_mode` needs it) and this
    /// waits until the replica streams from it again. Returns whether the
    /// primary was restarted. Blocks: call it from a blocking thread.
    pub fn set_archiving(&self, archive_command: Option<&str>) -> Result<bool, Error> {
        let bins = Binaries::find()?;
        let run_as = RunAs::detect()?;
        let pg = self.dir.join("pg");
        let file = pg.join(ARCHIVE_CONF);
        let wanted = archive_command.map(|cmd| {
            format!(
                "# written by railyard: backups are enabled\n\
                 archive_mode = on\n\
                 archive_command = '{}'\n\
                 archive_timeout = 60\n\
                 track_commit_timestamp = on\n",
                cmd.replace('\'', "''")
            )
        });
        let current = fs::read_to_string(&file).ok();
        if current == wanted {
            return Ok(false);
        }
        let _lock = lock(&self.dir)?;
        match &wanted {
            Some(text) => write_file(&file, text.as_bytes(), 0o600, Some(&run_as))?,
            None => fs::remove_file(&file)
                .map_err(|e| Error::io(format!("removing {}", file.display()), e))?,
        }
        write_file(
            &pg.join("primary/railyard.conf"),
            primary_conf(&pg, self.state.primary_port, &bins).as_bytes(),
            0o600,
            Some(&run_as),
        )?;
        pg_ctl(
            &bins,
            &run_as,
            &pg,
            &[
                "restart",
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "-D",
                "primary",
                "-l",
                "primary.log",
            ],
        )?;
        if self.state.replica_port.is_some() {
            let handle = tokio::runtime::Handle::current();
            handle.block_on(async {
                let client = admin_client(self, "postgres").await?;
                replica_streams(&client, "again after the primary's restart").await
            })?;
        }
        Ok(true)
    }

    /// Removes the cluster's directory after stopping it.
    pub fn destroy(&self) -> Result<(), Error> {
        let _ = self.stop();
        fs::remove_dir_all(&self.dir)
            .map_err(|e| Error::io(format!("removing {}", self.dir.display()), e))
    }
}

/// Stops the cluster in `dir` (default directory when `None`).
pub fn stop_dir(dir: &Path) -> Result<(), Error> {
    // A PgBouncer's directory holds no servers, only its pid file.
    pgbouncer::stop(dir)?;
    if !dir.join("pg").exists() {
        return Ok(());
    }
    let bins = Binaries::find()?;
    let run_as = RunAs::detect()?;
    let pg = dir.join("pg");
    let _lock = lock(dir)?;
    for d in ["replica", "primary"] {
        if pg_running(&bins, &pg.join(d)) {
            pg_ctl(&bins, &run_as, &pg, &["stop", "-m", "fast", "-w", "-D", d])?;
        }
    }
    Ok(())
}

/// The default directory of the shared cluster.
pub fn default_cluster_dir() -> PathBuf {
    default_dir()
}

fn lock(dir: &Path) -> Result<fs::File, Error> {
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(|e| Error::io("opening the cluster lock file", e))?;
    f.lock()
        .map_err(|e| Error::io("locking the cluster lock file", e))?;
    Ok(f)
}

#[doc(hidden)]
pub fn pg_running(bins: &Binaries, data: &Path) -> bool {
    if !data.join("PG_VERSION").exists() {
        return false;
    }
    // pg_ctl refuses to run as root, even for `status`.
    let Ok(run_as) = RunAs::detect() else {
        return false;
    };
    let cwd = data.parent().unwrap_or(data);
    run_as
        .command(&bins.bin("pg_ctl"), cwd)
        .args(["status", "-D"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn run(mut c: Command, what: &str) -> Result<(), Error> {
    let out = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| Error::io(format!("running {what}"), e))?;
    if !out.status.success() {
        return Err(Error::Local(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        )));
    }
    Ok(())
}

#[doc(hidden)]
pub fn pg_ctl(bins: &Binaries, run_as: &RunAs, pg: &Path, args: &[&str]) -> Result<(), Error> {
    let mut c = run_as.command(&bins.bin("pg_ctl"), pg);
    c.args(args);
    let out = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| Error::io("running pg_ctl", e))?;
    if !out.status.success() {
        let log = args
            .windows(2)
            .find(|w| w[0] == "-D")
            .map(|w| pg.join(format!("{}.log", w[1])))
            .and_then(|p| fs::read_to_string(p).ok())
            .map(|l| {
                let lines: Vec<&str> = l.lines().collect();
                lines[lines.len().saturating_sub(15)..].join("\n")
            })
            .unwrap_or_default();
        return Err(Error::Local(format!(
            "pg_ctl {} failed: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            log
        )));
    }
    Ok(())
}

#[doc(hidden)]
pub fn free_port() -> Result<u16, Error> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::io("finding a free loopback port", e))?;
    Ok(l.local_addr()
        .map_err(|e| Error::io("finding a free loopback port", e))?
        .port())
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[doc(hidden)]
pub fn write_file(
    path: &Path,
    contents: &[u8],
    mode: u32,
    run_as: Option<&RunAs>,
) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(format!("chmod {}", tmp.display()), e))?;
        f.write_all(contents)
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    }
    if let Some(r) = run_as {
        r.own(&tmp)?;
    }
    fs::rename(&tmp, path).map_err(|e| Error::io(format!("renaming to {}", path.display()), e))
}

fn generate_certs(dir: &Path, pg: &Path, run_as: &RunAs) -> Result<(), Error> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let err = |e: rcgen::Error| Error::Local(format!("generating certificates: {e}"));
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "railyard local CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).map_err(err)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .map_err(err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server = params.signed_by(&server_key, &issuer).map_err(err)?;

    write_file(&dir.join("ca.crt"), ca.pem().as_bytes(), 0o644, None)?;
    write_file(
        &pg.join("server.crt"),
        server.pem().as_bytes(),
        0o644,
        Some(run_as),
    )?;
    write_file(
        &pg.join("server.key"),
        server_key.serialize_pem().as_bytes(),
        0o600,
        Some(run_as),
    )?;
    Ok(())
}

/// `CREATE EXTENSION` for query insight's extensions the server has:
/// `pg_stat_statements` (statement statistics of every client) and `hypopg`
/// (hypothetical indexes, which prove index advice).
fn query_insight_extensions(bins: &Binaries) -> String {
    ["pg_stat_statements", "hypopg"]
        .iter()
        .filter(|e| bins.has_library(e))
        .map(|e| format!("CREATE EXTENSION IF NOT EXISTS {e};"))
        .collect()
}

/// Settings for a disposable test cluster: durability is off (`fsync`,
/// `full_page_writes`), but `synchronous_commit` stays on, which with `fsync`
/// off costs nothing and hands each commit to the walsender at once (so the
/// replica replays within a millisecond, as on a healthy production pair).
fn server_conf(pg: &Path, port: u16, bins: &Binaries) -> String {
    // Statement statistics of every client, for query insight, when the
    // server has the module (it ships with PostgreSQL's contrib).
    let statements = if bins.has_library("pg_stat_statements") {
        "shared_preload_libraries = 'pg_stat_statements'\n\
         compute_query_id = on\n\
         pg_stat_statements.max = 5000\n"
    } else {
        ""
    };
    format!(
        "# written by railyard at every start\n\
         port = {port}\n\
         listen_addresses = '127.0.0.1'\n\
         unix_socket_directories = '{sockets}'\n\
         ssl = on\n\
         ssl_cert_file = '{pg}/server.crt'\n\
         ssl_key_file = '{pg}/server.key'\n\
         password_encryption = 'scram-sha-256'\n\
         max_connections = 300\n\
         shared_buffers = 64MB\n\
         wal_level = logical\n\
         max_wal_senders = 10\n\
         max_replication_slots = 10\n\
         hot_standby = on\n\
         hot_standby_feedback = on\n\
         wal_keep_size = 64MB\n\
         max_wal_size = 256MB\n\
         min_wal_size = 32MB\n\
         checkpoint_timeout = 60s\n\
         fsync = off\n\
         synchronous_commit = on\n\
         full_page_writes = off\n\
         max_locks_per_transaction = 256\n\
         deadlock_timeout = 100ms\n\
         logging_collector = off\n\
         log_min_messages = warning\n\
         {statements}",
        sockets = pg.join("sockets").display(),
        pg = pg.display(),
    )
}

/// The file holding the primary's WAL archiving settings, written by
/// [`LocalCluster::set_archiving`] when backups are enabled.
const ARCHIVE_CONF: &str = "archive.conf";

/// The primary's settings: [`server_conf`], plus the WAL archiving settings
/// when backups are enabled (`pg/archive.conf` exists).
fn primary_conf(pg: &Path, port: u16, bins: &Binaries) -> String {
    let mut conf = server_conf(pg, port, bins);
    if let Ok(archive) = fs::read_to_string(pg.join(ARCHIVE_CONF)) {
        conf.push_str(&archive);
    }
    conf
}

const HBA: &str = "# written by railyard: TLS + scram over TCP, scram over the Unix socket\n\
local   all          all                 scram-sha-256\n\
local   replication  all                 scram-sha-256\n\
hostssl all          all   127.0.0.1/32  scram-sha-256\n\
hostssl replication  all   127.0.0.1/32  scram-sha-256\n";

async fn admin_client(cluster: &LocalCluster, db: &str) -> Result<tokio_postgres::Client, Error> {
    admin_client_port(
        &cluster.dir,
        cluster.state.primary_port,
        &cluster.state.password,
        db,
    )
    .await
}

#[doc(hidden)]
pub async fn admin_client_port(
    dir: &Path,
    port: u16,
    password: &Secret,
    db: &str,
) -> Result<tokio_postgres::Client, Error> {
    let mut c = tokio_postgres::Config::new();
    c.host_path(dir.join("pg/sockets"))
        .port(port)
        .user(USER)
        .password(password.expose())
        .dbname(db)
        .application_name("railyard-local");
    let (client, conn) = c.connect(tokio_postgres::NoTls).await.map_err(|e| {
        Error::Local(format!(
            "connecting to the local server on port {port}: {e}"
        ))
    })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn start_blocking(
    b: &LocalClusterBuilder,
    handle: &tokio::runtime::Handle,
) -> Result<LocalCluster, Error> {
    let started = Instant::now();
    let bins = Binaries::find()?;
    let run_as = RunAs::detect()?;
    let dir = &b.dir;
    let _lock = lock(dir)?;
    let pg = dir.join("pg");
    let primary = pg.join("primary");
    let replica = pg.join("replica");
    let saved = fs::read_to_string(dir.join("state"))
        .ok()
        .and_then(|s| State::parse(&s));

    let primary_up = pg_running(&bins, &primary);
    let replica_up = !b.replica || pg_running(&bins, &replica);
    if let Some(state) = &saved
        && primary_up
        && replica_up
        && (state.replica_port.is_some() || !b.replica)
    {
        return Ok(LocalCluster {
            dir: dir.clone(),
            state: state.clone(),
            started: StartKind::Joined,
            start_time: started.elapsed(),
            bindir: bins.dir,
        });
    }

    let cold = saved.is_none() || !primary.join("PG_VERSION").exists();
    let kind = if cold {
        StartKind::Cold
    } else {
        StartKind::Warm
    };
    if cold {
        // Start over: a half-made directory from a failed start is of no use.
        if pg.exists() {
            for d in ["replica", "primary"] {
                if pg_running(&bins, &pg.join(d)) {
                    let _ = pg_ctl(
                        &bins,
                        &run_as,
                        &pg,
                        &["stop", "-m", "immediate", "-w", "-D", d],
                    );
                }
            }
            fs::remove_dir_all(&pg)
                .map_err(|e| Error::io(format!("clearing {}", pg.display()), e))?;
        }
        let _ = fs::remove_file(dir.join("state"));
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .map_err(|e| Error::io(format!("chmod {}", dir.display()), e))?;
    fs::create_dir_all(pg.join("sockets"))
        .map_err(|e| Error::io(format!("creating {}", pg.display()), e))?;
    run_as.own(&pg)?;
    run_as.own(&pg.join("sockets"))?;

    let mut state = match (&saved, cold) {
        (Some(s), false) => s.clone(),
        _ => State {
            primary_port: 0,
            replica_port: None,
            password: Secret::new(
                rand::rng()
                    .sample_iter(&Alphanumeric)
                    .take(32)
                    .map(char::from)
                    .collect::<String>(),
            ),
        },
    };

    if cold {
        generate_certs(dir, &pg, &run_as)?;
        let pwfile = pg.join("pwfile");
        write_file(
            &pwfile,
            state.password.expose().as_bytes(),
            0o600,
            Some(&run_as),
        )?;
        let mut c = run_as.command(&bins.bin("initdb"), &pg);
        c.arg("-D")
            .arg(&primary)
            .args([
                "-U",
                USER,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        let r = run(c, "initdb");
        let _ = fs::remove_file(&pwfile);
        r?;
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(primary.join("postgresql.conf"))
            .map_err(|e| Error::io("opening postgresql.conf", e))?;
        conf.write_all(b"\ninclude_if_exists = 'railyard.conf'\n")
            .map_err(|e| Error::io("writing postgresql.conf", e))?;
        write_file(
            &primary.join("pg_hba.conf"),
            HBA.as_bytes(),
            0o600,
            Some(&run_as),
        )?;
    }

    // The primary: reuse its port when still free.
    if !primary_up {
        if state.primary_port == 0 || !port_free(state.primary_port) {
            state.primary_port = free_port()?;
        }
        write_file(
            &primary.join("railyard.conf"),
            primary_conf(&pg, state.primary_port, &bins).as_bytes(),
            0o600,
            Some(&run_as),
        )?;
        pg_ctl(
            &bins,
            &run_as,
            &pg,
            &[
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                "primary",
                "-l",
                "primary.log",
            ],
        )?;
    }

    let password = state.password.clone();
    let primary_port = state.primary_port;
    let extensions = query_insight_extensions(&bins);
    if cold {
        handle.block_on(async {
            // In template1 first, so that every database created later has them.
            let template = admin_client_port(dir, primary_port, &password, "template1").await?;
            if let Err(e) = template.batch_execute(&extensions).await {
                // Query insight degrades without them; the cluster still serves.
                tracing::warn!(target: "railyard::local", error = %e, "could not create the query-insight extensions");
            }
            drop(template);
            let client = admin_client_port(dir, primary_port, &password, "postgres").await?;
            client
                .batch_execute(&format!("CREATE DATABASE {DBNAME}"))
                .await
                .map_err(|e| Error::Local(format!("creating database {DBNAME}: {e}")))
        })?;
    } else if !extensions.is_empty() {
        // A cluster made before the extensions were: its application
        // database gets them (two starts racing may both try; one wins).
        let _ = handle.block_on(async {
            let client = admin_client_port(dir, primary_port, &password, DBNAME).await?;
            client
                .batch_execute(&extensions)
                .await
                .map_err(|e| Error::Local(e.to_string()))
        });
    }

    if b.replica {
        let needs_backup = !replica.join("PG_VERSION").exists();
        if needs_backup {
            let _ = fs::remove_dir_all(&replica);
            // The slot may be left from an earlier, failed backup.
            let _ = handle.block_on(async {
                let client = admin_client_port(dir, primary_port, &password, "postgres").await?;
                client
                    .batch_execute(&format!(
                        "SELECT pg_drop_replication_slot('{SLOT}') FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
                    ))
                    .await
                    .map_err(|e| Error::Local(e.to_string()))
            });
            let mut c = run_as.command(&bins.bin("pg_basebackup"), &pg);
            c.arg("-D")
                .arg(&replica)
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &primary_port.to_string(),
                    "-U",
                    USER,
                ])
                .args([
                    "-R",
                    "-X",
                    "stream",
                    "-C",
                    "-S",
                    SLOT,
                    "--no-sync",
                    "-c",
                    "fast",
                ])
                .env("PGPASSWORD", password.expose())
                .env("PGSSLMODE", "verify-full")
                .env("PGSSLROOTCERT", dir.join("ca.crt"))
                .env("PGAPPNAME", "railyard_replica");
            run(c, "pg_basebackup")?;
            // -R wrote primary_conninfo into postgresql.auto.conf; we keep it in
            // railyard.conf instead, rewritten with the primary's port at each start.
            let auto = replica.join("postgresql.auto.conf");
            let text = fs::read_to_string(&auto).unwrap_or_default();
            let kept: String = text
                .lines()
                .filter(|l| {
                    !l.starts_with("primary_conninfo") && !l.starts_with("primary_slot_name")
                })
                .map(|l| format!("{l}\n"))
                .collect();
            write_file(&auto, kept.as_bytes(), 0o600, Some(&run_as))?;
        }
        if !pg_running(&bins, &replica) {
            if state
                .replica_port
                .is_none_or(|p| !port_free(p) || p == primary_port)
            {
                state.replica_port = Some(free_port()?);
            }
            let port = state.replica_port.expect("set just above");
            let conninfo = format!(
                "host=127.0.0.1 port={primary_port} user={USER} password={} sslmode=verify-full sslrootcert={} application_name=railyard_replica",
                password.expose(),
                dir.join("ca.crt").display()
            );
            let conf = format!(
                "{}primary_conninfo = '{}'\nprimary_slot_name = '{SLOT}'\n",
                server_conf(&pg, port, &bins),
                conninfo.replace('\'', "''")
            );
            write_file(
                &replica.join("railyard.conf"),
                conf.as_bytes(),
                0o600,
                Some(&run_as),
            )?;
            pg_ctl(
                &bins,
                &run_as,
                &pg,
                &[
                    "start",
                    "-w",
                    "-t",
                    "60",
                    "-D",
                    "replica",
                    "-l",
                    "replica.log",
                ],
            )?;
        }
        // Wait until the replica streams.
        handle.block_on(async {
            let client = admin_client_port(dir, primary_port, &password, "postgres").await?;
            replica_streams(&client, "after its start").await
        })?;
    } else {
        state.replica_port = None;
    }

    write_file(&dir.join("state"), state.render().as_bytes(), 0o600, None)?;
    let elapsed = started.elapsed();
    tracing::info!(target: "railyard::local", ?kind, ?elapsed, dir = %dir.display(), "local cluster running");
    Ok(LocalCluster {
        dir: dir.clone(),
        state,
        started: kind,
        start_time: elapsed,
        bindir: bins.dir,
    })
}

/// Waits, up to 60 s, until the primary behind `client` streams to the
/// local replica; `when` says which start the error is about.
async fn replica_streams(client: &tokio_postgres::Client, when: &str) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'railyard_replica' AND state = 'streaming'",
                &[],
            )
            .await
            .map_err(|e| Error::Local(format!("checking replication: {e}")))?;
        if row.get::<_, i64>(0) > 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Local(format!(
                "the replica did not stream {when} within 60 s; see pg/replica.log"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
