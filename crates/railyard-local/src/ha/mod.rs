//! A pg_auto_failover formation on loopback: a monitor and
//! two PostgreSQL nodes, a primary and its synchronous standby, run by the
//! machine's `pg_autoctl`, for failover tests and demonstrations.
//!
//! [`Formation::builder`] creates it under a directory of its own (default
//! `$RAILYARD_HA_DIR`, else `/tmp/railyard-ha-<uid>`), or starts or joins the
//! one already there:
//!
//! - everything the servers own is in `<dir>/ha`, mode 0700, owned by the
//!   account they run as (`postgres` or `nobody` when we are root, as for
//!   [`LocalCluster`](super::LocalCluster)): the data directories `monitor`,
//!   `node1` and `node2`, their Unix sockets, pg_autoctl's configuration, state
//!   and pid files (its `HOME` and XDG directories point there), the logs;
//! - each of the three servers listens on a free port of 127.0.0.1, with a
//!   certificate signed by the formation's own CA (`<dir>/ca.crt`), and
//!   pg_autoctl's connections use `sslmode=verify-full` against it;
//! - the monitor trusts `autoctl_node` over TLS from 127.0.0.1 (pg_autoctl's
//!   keepers log in as that unprivileged role) and nothing else over TCP;
//! - the data nodes take scram-sha-256 over TLS only: the application role
//!   `railyard` has a generated password ([`Formation::password`]), the
//!   replication role a generated password kept in `ha/pgpass` (libpq reads
//!   it for pg_basebackup, pg_rewind and the WAL receiver; it is never on a
//!   command line nor in pg_autoctl's configuration). Local socket connections
//!   are trusted: only the servers' account can reach the socket directory.
//!
//! pg_autoctl turns synchronous replication on once the standby has caught up
//! (`synchronous_standby_names = 'ANY 1 (…)'`) and off while the standby is
//! unhealthy (the primary is then `wait_primary`): in that window an
//! acknowledged commit exists on the primary only.
//!
//! A formation built with [`FormationBuilder::ephemeral`] is marked with the
//! process that made it ([`scratch::OWNER_FILE`](super::scratch::OWNER_FILE));
//! once that process is gone, [`reap_private_clusters`](super::scratch::reap_private_clusters)
//! (and `railyard local gc`) stops its pg_autoctl services and removes it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), railyard_local::Error> {
//! use railyard_local::ha::Formation;
//! let formation = Formation::builder().start().await?;
//! // pg_autoctl's multi-host read-write URL, with the application's role.
//! let db = railyard::Database::connect(formation.config().await?).await?;
//! formation.perform_failover(std::time::Duration::from_secs(60)).await?;
//! # Ok(()) }
//! ```

mod create;
mod process;
mod tunings;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use self::process::Tools;
pub use self::tunings::Tunings;
use super::{RunAs, StartKind};
use crate::error::Error;
use railyard::config::{Config, ConnectTarget, Secret};

/// The application's role and database on the data nodes.
pub const APP_USER: &str = "railyard";
/// The database pg_autoctl creates on the data nodes.
pub const APP_DB: &str = "railyard";
/// The data nodes' names, in the order they were created.
pub const NODES: [&str; 2] = ["node1", "node2"];
const MONITOR: &str = "monitor";
const REPLICATOR: &str = "pgautofailover_replicator";
const STATE_FILE: &str = "formation";

/// The saved facts about a formation.
#[derive(Clone, PartialEq, Eq)]
struct State {
    monitor_port: u16,
    node_ports: [u16; 2],
    password: Secret,
}

impl State {
    fn render(&self) -> String {
        format!(
            "monitor_port={}\nnode1_port={}\nnode2_port={}\npassword={}\n",
            self.monitor_port,
            self.node_ports[0],
            self.node_ports[1],
            self.password.expose()
        )
    }

    fn read(dir: &Path) -> Option<State> {
        let text = fs::read_to_string(dir.join(STATE_FILE)).ok()?;
        let (mut monitor, mut n1, mut n2, mut password) = (None, None, None, None);
        for line in text.lines() {
            match line.split_once('=') {
                Some(("monitor_port", v)) => monitor = v.parse().ok(),
                Some(("node1_port", v)) => n1 = v.parse().ok(),
                Some(("node2_port", v)) => n2 = v.parse().ok(),
                Some(("password", v)) => password = Some(Secret::new(v)),
                _ => {}
            }
        }
        Some(State {
            monitor_port: monitor?,
            node_ports: [n1?, n2?],
            password: password?,
        })
    }
}

/// Options for a formation.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `start` is called"]
pub struct FormationBuilder {
    dir: PathBuf,
    ephemeral: bool,
    tunings: Tunings,
}

impl FormationBuilder {
    /// The directory holding the formation. Defaults to `$RAILYARD_HA_DIR`,
    /// else `/tmp/railyard-ha-<uid>`.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = dir.into();
        self
    }

    /// Marks the formation as this process's: once the process is gone
    /// (killed, even), the reaper stops it and removes its directory. For
    /// tests. Defaults to `false`.
    pub fn ephemeral(mut self, yes: bool) -> Self {
        self.ephemeral = yes;
        self
    }

    /// Failure detection settings, applied when the formation is created.
    /// Defaults to [`Tunings::fast`].
    pub fn tunings(mut self, t: Tunings) -> Self {
        self.tunings = t;
        self
    }

    /// Creates the formation and waits until its primary has a synchronous
    /// standby; or starts the services of a stopped one; or joins a running
    /// one.
    pub async fn start(self) -> Result<Formation, Error> {
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            if self.ephemeral {
                super::scratch::claim_dir(&self.dir)?;
            }
            create::start_blocking(&self, &handle)
        })
        .await
        .map_err(|e| Error::Local(format!("formation start task failed: {e}")))?
    }
}

/// A node as the monitor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeState {
    /// `node1` or `node2`.
    pub name: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The state its keeper last reported (`primary`, `secondary`,
    /// `wait_primary`, `catchingup`, `demoted`, …).
    pub reported: String,
    /// The state the monitor assigned to it.
    pub assigned: String,
    /// The monitor's last health check: `None` before the first one.
    pub healthy: Option<bool>,
}

impl NodeState {
    /// Whether the node reached the state it was assigned.
    pub fn settled_in(&self, state: &str) -> bool {
        self.reported == state && self.assigned == state
    }
}

/// A running pg_auto_failover formation: a monitor, a primary and a standby.
#[derive(Clone)]
pub struct Formation {
    dir: PathBuf,
    state: State,
    tools: Tools,
    run_as: RunAs,
    started: StartKind,
    start_time: Duration,
}

impl fmt::Debug for Formation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Formation")
            .field("dir", &self.dir)
            .field("monitor_port", &self.state.monitor_port)
            .field("node_ports", &self.state.node_ports)
            .field("started", &self.started)
            .field("start_time", &self.start_time)
            .finish_non_exhaustive()
    }
}

/// The default directory of a formation: `$RAILYARD_HA_DIR`, else
/// `/tmp/railyard-ha-<uid>`.
pub fn default_formation_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RAILYARD_HA_DIR") {
        return PathBuf::from(d);
    }
    let uid = nix::unistd::Uid::effective().as_raw();
    std::env::temp_dir().join(format!("railyard-ha-{uid}"))
}

/// Whether pg_auto_failover can run here: `pg_autoctl`, and a PostgreSQL
/// installation with the monitor's extension. The error says what is missing
/// and how to install it.
pub fn available() -> Result<(), Error> {
    Tools::find().map(|_| ())
}

/// Whether `dir` holds a formation (as opposed to a [`LocalCluster`](super::LocalCluster)).
pub fn is_formation(dir: &Path) -> bool {
    dir.join("ha").is_dir()
}

/// Stops the formation in `dir` (its three pg_autoctl services, and any
/// postmaster one of them left behind). Data is kept.
pub fn stop_dir(dir: &Path) -> Result<(), Error> {
    let run_as = RunAs::detect()?;
    let _lock = super::lock(dir)?;
    stop_locked(dir, &run_as, Tools::find().ok().as_ref())
}

/// Stops the formation in `dir` and removes the directory.
pub fn destroy_dir(dir: &Path) -> Result<(), Error> {
    stop_dir(dir)?;
    fs::remove_dir_all(dir).map_err(|e| Error::io(format!("removing {}", dir.display()), e))
}

fn stop_locked(dir: &Path, run_as: &RunAs, tools: Option<&Tools>) -> Result<(), Error> {
    process::stop_services(
        &dir.join("ha"),
        &[NODES[1], NODES[0], MONITOR],
        run_as,
        tools,
        Duration::from_secs(30),
    )
}

impl Formation {
    /// Options for a formation.
    pub fn builder() -> FormationBuilder {
        FormationBuilder {
            dir: default_formation_dir(),
            ephemeral: false,
            tunings: Tunings::default(),
        }
    }

    /// The formation in `dir` (default directory when `None`) if its monitor
    /// runs; starts nothing.
    pub async fn running(dir: Option<PathBuf>) -> Result<Option<Formation>, Error> {
        let dir = dir.unwrap_or_else(default_formation_dir);
        tokio::task::spawn_blocking(move || {
            let Some(state) = State::read(&dir) else {
                return Ok(None);
            };
            if process::service_pid(&dir.join("ha"), MONITOR).is_none() {
                return Ok(None);
            }
            Ok(Some(Formation {
                state,
                tools: Tools::find()?,
                run_as: RunAs::detect()?,
                started: StartKind::Joined,
                start_time: Duration::ZERO,
                dir,
            }))
        })
        .await
        .map_err(|e| Error::Local(format!("formation status task failed: {e}")))?
    }

    /// The formation's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How this process got the formation running.
    pub fn started(&self) -> StartKind {
        self.started
    }

    /// How long starting (or joining) took.
    pub fn start_time(&self) -> Duration {
        self.start_time
    }

    /// The CA certificate that signed the servers' certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The monitor's port on 127.0.0.1.
    pub fn monitor_port(&self) -> u16 {
        self.state.monitor_port
    }

    /// The data nodes' ports on 127.0.0.1, in [`NODES`] order.
    pub fn node_ports(&self) -> [u16; 2] {
        self.state.node_ports
    }

    /// The password of the application role [`APP_USER`].
    pub fn password(&self) -> &Secret {
        &self.state.password
    }

    /// The log of a node's (or the monitor's) `pg_autoctl run`: what its
    /// keeper did, state by state.
    pub fn log_file(&self, node: &str) -> PathBuf {
        self.ha().join(format!("{node}.log"))
    }

    fn ha(&self) -> PathBuf {
        self.dir.join("ha")
    }

    fn node_index(name: &str) -> Result<usize, Error> {
        NODES.iter().position(|n| *n == name).ok_or_else(|| {
            Error::Local(format!(
                "no node named {name:?} (the nodes are node1 and node2)"
            ))
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(Formation) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(me))
            .await
            .map_err(|e| Error::Local(format!("{what} task failed: {e}")))?
    }

    /// The formation's URL as `pg_autoctl show uri --formation default` prints
    /// it: both nodes, `target_session_attrs=read-write`, TLS verify-full
    /// against [`Formation::ca_cert`]; no user, no password.
    pub async fn uri(&self) -> Result<String, Error> {
        self.blocking("pg_autoctl show uri", |f| {
            let ha = f.ha();
            let mut c = process::command(&f.run_as, &f.tools, &ha, &f.tools.autoctl);
            c.args(["show", "uri", "--formation", "default", "--pgdata"])
                .arg(ha.join(MONITOR));
            Ok(
                process::run_output(c, "pg_autoctl show uri", Duration::from_secs(30))?
                    .trim()
                    .to_owned(),
            )
        })
        .await
    }

    /// [`Formation::uri`], parsed, with the application's role and password.
    pub async fn primary_target(&self) -> Result<ConnectTarget, Error> {
        let uri = self.uri().await?;
        let target: ConnectTarget = uri.parse()?;
        Ok(target
            .with_user(APP_USER)
            .with_password(Some(self.state.password.clone())))
    }

    /// One data node as a replica: `target_session_attrs=standby`, so that it
    /// serves reads only while it is the standby.
    pub fn standby_target(&self, node: &str) -> Result<ConnectTarget, Error> {
        let port = self.state.node_ports[Self::node_index(node)?];
        let url = format!(
            "postgres://{APP_USER}@127.0.0.1:{port}/{APP_DB}?sslmode=verify-full&sslrootcert={}&target_session_attrs=standby",
            self.ca_cert().display()
        );
        Ok(url
            .parse::<ConnectTarget>()?
            .with_password(Some(self.state.password.clone())))
    }

    /// A [`Config`]: [`Formation::primary_target`] as the primary, and each
    /// data node as a replica ([`Formation::standby_target`]).
    pub async fn config(&self) -> Result<Config, Error> {
        let mut config = Config::new(self.primary_target().await?);
        for node in NODES {
            config = config.replica(self.standby_target(node)?);
        }
        Ok(config)
    }

    /// `DATABASE_URL='…'` and `DATABASE_REPLICA_URLS='…'` lines for a shell.
    /// They carry the password: for `eval`, never for logs.
    pub async fn env_lines(&self) -> Result<String, Error> {
        let primary = self.primary_target().await?;
        let replicas: Vec<String> = NODES
            .iter()
            .map(|n| self.standby_target(n).map(|t| t.expose_url()))
            .collect::<Result<_, _>>()?;
        Ok(format!(
            "DATABASE_URL='{}'\nDATABASE_REPLICA_URLS='{}'\n",
            primary.expose_url(),
            replicas.join(",")
        ))
    }

    async fn monitor_client(&self) -> Result<tokio_postgres::Client, Error> {
        connect_socket(
            &self.ha(),
            self.state.monitor_port,
            "autoctl_node",
            "pg_auto_failover",
        )
        .await
    }

    /// The data nodes as the monitor sees them.
    pub async fn nodes(&self) -> Result<Vec<NodeState>, Error> {
        let client = self.monitor_client().await?;
        let rows = client
            .query(
                "SELECT nodename, nodeport, current_group_state::text, assigned_group_state::text, health \
                 FROM pgautofailover.current_state('default') ORDER BY node_id",
                &[],
            )
            .await
            .map_err(|e| {
                Error::Local(format!(
                    "asking the monitor for the nodes' states: {}",
                    pg_error(&e)
                ))
            })?;
        Ok(rows
            .iter()
            .map(|r| {
                let health: i32 = r.get(4);
                NodeState {
                    name: r.get(0),
                    port: u16::try_from(r.get::<_, i32>(1)).unwrap_or(0),
                    reported: r.get(2),
                    assigned: r.get(3),
                    healthy: match health {
                        1 => Some(true),
                        0 => Some(false),
                        _ => None,
                    },
                }
            })
            .collect())
    }

    /// The monitor's latest events, oldest first, one line each: for reports
    /// of what the formation went through.
    pub async fn events(&self, count: i32) -> Result<Vec<String>, Error> {
        let client = self.monitor_client().await?;
        let rows = client
            .query(
                "SELECT to_char(eventtime, 'HH24:MI:SS.MS'), nodename, reportedstate::text, goalstate::text, description \
                 FROM pgautofailover.last_events('default', 0, $1) ORDER BY eventid",
                &[&count],
            )
            .await
            .map_err(|e| Error::Local(format!("asking the monitor for its events: {}", pg_error(&e))))?;
        Ok(rows
            .iter()
            .map(|r| {
                format!(
                    "{} {:<6} {:>18} -> {:<18} {}",
                    r.get::<_, String>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, String>(3),
                    r.get::<_, String>(4)
                )
            })
            .collect())
    }

    /// Waits (up to `within`) until one node is a settled `primary` and the
    /// other a settled `secondary`: synchronous replication is on. Returns the
    /// primary.
    pub async fn wait_stable(&self, within: Duration) -> Result<NodeState, Error> {
        let end = Instant::now() + within;
        loop {
            let last = match self.nodes().await {
                Ok(nodes) => {
                    let primary = nodes.iter().find(|n| n.settled_in("primary"));
                    let secondary = nodes.iter().any(|n| n.settled_in("secondary"));
                    if let (Some(p), true) = (primary, secondary) {
                        // The monitor's states may predate a restart: each
                        // server must also answer, in the role it was given.
                        match self.servers_agree(&nodes).await {
                            Ok(()) => return Ok(p.clone()),
                            Err(e) => e,
                        }
                    } else {
                        nodes
                            .iter()
                            .map(|n| format!("{} {}->{}", n.name, n.reported, n.assigned))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() >= end {
                return Err(Error::Local(format!(
                    "the formation did not settle (primary + secondary) within {within:?}: {last}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether each data node's server answers over its socket, in recovery
    /// exactly when the monitor says it is the secondary.
    async fn servers_agree(&self, nodes: &[NodeState]) -> Result<(), String> {
        for n in nodes {
            let client = connect_socket(&self.ha(), n.port, &self.run_as.name, "postgres")
                .await
                .map_err(|e| format!("{}: {e}", n.name))?;
            let row = client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map_err(|e| format!("{}: {}", n.name, pg_error(&e)))?;
            let standby: bool = row.get(0);
            if standby != (n.reported == "secondary") {
                return Err(format!(
                    "{} is {} but reported {}",
                    n.name,
                    if standby {
                        "in recovery"
                    } else {
                        "not in recovery"
                    },
                    n.reported
                ));
            }
        }
        Ok(())
    }

    /// `pg_autoctl perform failover`: the monitor demotes the primary and
    /// promotes the standby; the command returns once the old primary is back
    /// as a standby, or fails after `within`.
    pub async fn perform_failover(&self, within: Duration) -> Result<(), Error> {
        self.blocking("pg_autoctl perform failover", move |f| {
            let ha = f.ha();
            let mut c = process::command(&f.run_as, &f.tools, &ha, &f.tools.autoctl);
            c.args(["perform", "failover", "--pgdata"])
                .arg(ha.join(MONITOR));
            process::run_logged(
                c,
                "pg_autoctl perform failover",
                &ha.join("perform.log"),
                within,
            )
        })
        .await
    }

    /// `kill -9` of one node's postmaster; its pg_autoctl keeper stays and
    /// restarts it. Returns the pid killed.
    pub async fn kill_postmaster(&self, node: &str) -> Result<u32, Error> {
        let pgdata = self.ha().join(NODES[Self::node_index(node)?]);
        self.blocking("kill -9", move |_| process::kill_postmaster(&pgdata))
            .await
    }

    /// `kill -9` of one node's whole process group (its pg_autoctl supervisor,
    /// keeper and Postgres): the node is gone, as if its machine crashed.
    /// Returns once none of its processes is left.
    pub async fn kill_node(&self, node: &str) -> Result<(), Error> {
        let name = NODES[Self::node_index(node)?];
        self.blocking("kill -9", move |f| {
            process::kill_group(&f.ha(), name, Duration::from_secs(10))
        })
        .await
    }

    /// Starts one node's pg_autoctl service again (after
    /// [`Formation::kill_node`]); its keeper rejoins the formation.
    pub async fn start_node(&self, node: &str) -> Result<(), Error> {
        let name = NODES[Self::node_index(node)?];
        self.blocking("pg_autoctl run", move |f| {
            let ha = f.ha();
            if process::service_pid(&ha, name).is_some() {
                return Ok(());
            }
            process::spawn_service(&f.run_as, &f.tools, &ha, name)
        })
        .await
    }

    /// Stops the formation's services; data is kept, so the next start is warm.
    pub async fn stop(&self) -> Result<(), Error> {
        self.blocking("formation stop", |f| {
            let _lock = super::lock(&f.dir)?;
            stop_locked(&f.dir, &f.run_as, Some(&f.tools))
        })
        .await
    }

    /// Stops the formation and removes its directory.
    pub async fn destroy(&self) -> Result<(), Error> {
        self.blocking("formation destroy", |f| {
            {
                let _lock = super::lock(&f.dir)?;
                stop_locked(&f.dir, &f.run_as, Some(&f.tools))?;
            }
            fs::remove_dir_all(&f.dir)
                .map_err(|e| Error::io(format!("removing {}", f.dir.display()), e))
        })
        .await
    }
}

/// A driver error in words: the server's message when there is one (the
/// driver's own `Display` says only "db error"), else the cause. Never the
/// statement, which may hold a password.
fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} (SQLSTATE {})", d.message(), d.code().code()),
        None => match std::error::Error::source(e) {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        },
    }
}

/// A client over the formation's socket directory (no TLS, trusted there).
async fn connect_socket(
    ha: &Path,
    port: u16,
    user: &str,
    db: &str,
) -> Result<tokio_postgres::Client, Error> {
    let mut c = tokio_postgres::Config::new();
    c.host_path(ha.join("sockets"))
        .port(port)
        .user(user)
        .dbname(db)
        .application_name("railyard-ha")
        .connect_timeout(Duration::from_secs(5));
    let (client, conn) = c.connect(tokio_postgres::NoTls).await.map_err(|e| {
        Error::Local(format!(
            "connecting to port {port} over the formation's socket: {}",
            pg_error(&e)
        ))
    })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}
