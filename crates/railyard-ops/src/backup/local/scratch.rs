//! A scratch instance restored from the repository ([`Scratch`]): its
//! settings, its start (retried on a port taken meanwhile), its clients and
//! its removal.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use railyard::config::{Config, ConnectTarget, Secret};
use railyard_local::{Binaries, RunAs, free_port, pg_ctl, pg_running, write_file};

use super::{blocking, within};
use crate::error::Error;

/// How long a scratch instance may take to start and finish its recovery.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(120);
/// How many ports a scratch instance tries when the one it picked was
/// taken before its postmaster could bind it.
const START_ATTEMPTS: usize = 5;

/// A scratch instance restored from the repository, under
/// `<cluster dir>/backup/scratch/<name>`: stopped and removed by
/// [`Scratch::remove`], or when dropped unless [`Scratch::keep`] was called.
pub struct Scratch {
    pub(super) name: String,
    pub(super) dir: PathBuf,
    pub(super) data: PathBuf,
    pub(super) port: u16,
    pub(super) password: Secret,
    pub(super) cluster_pg: PathBuf,
    pub(super) run_as: RunAs,
    pub(super) bins: Binaries,
    pub(super) live: bool,
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
    pub(super) async fn start(&mut self) -> Result<(), Error> {
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
