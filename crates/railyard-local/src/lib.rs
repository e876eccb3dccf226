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
use std::path::{Path, PathBuf};
use std::time::Duration;

use railyard::config::{Config, ConnectTarget, Secret};

mod account;
mod admin;
mod binaries;
mod certs;
mod conf;
pub mod error;
pub mod ha;
pub mod pgbouncer;
mod process;
#[doc(hidden)]
pub mod scratch;
mod start;

pub use account::RunAs;
#[doc(hidden)]
pub use admin::admin_client_port;
pub use binaries::Binaries;
pub use error::Error;
#[doc(hidden)]
pub use process::{free_port, pg_ctl, pg_running, write_file};

use admin::{admin_client, replica_streams};
// At the root for the formation's modules (`crate::lock`, `crate::generate_certs`).
use certs::generate_certs;
use conf::{ARCHIVE_CONF, primary_conf};
use process::lock;
use start::start_blocking;

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
        // The cluster takes passwords over TCP only with TLS: a core built
        // without its `tls` feature reaches it through the Unix socket.
        if !railyard::config::tls_available() {
            return ConnectTarget::unix_socket(
                self.socket_dir(),
                port,
                USER,
                Some(self.state.password.clone()),
                dbname,
            );
        }
        let url = format!(
            "postgres://{USER}@localhost:{port}/{dbname}?sslmode=verify-full&sslrootcert={}",
            self.ca_cert().display()
        );
        url.parse::<ConnectTarget>()
            .expect("the local cluster's URL is well formed")
            .with_password(Some(self.state.password.clone()))
    }

    /// The primary's URL (TLS verify-full against the cluster's CA) for a
    /// database; its Unix socket when the core is built without TLS.
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
