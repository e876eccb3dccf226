//! A real PgBouncer in front of one of the local cluster's servers, for tests
//! and for trying the crate behind a pooler (`apt-get install pgbouncer`).
//!
//! It runs the machine's `pgbouncer` with PgBouncer's defaults, except what
//! placing it needs: a free loopback port, SCRAM authentication with the
//! cluster's password, TLS on both sides (the cluster's certificate, so
//! `sslmode=verify-full` against the cluster's CA works through it), the pool
//! mode asked for, and no Unix socket. Like the cluster it runs as an
//! unprivileged user, in a directory of its own under the system's temporary
//! directory, marked with the process that made it: dropped, it stops and
//! removes itself; after a `kill -9` of its owner, the next run's reaper does
//! (see [`super::stop_dir`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{LocalCluster, RunAs, USER, free_port, scratch, write_file};
use crate::error::Error;
use railyard::config::{ConnectTarget, Pooler};

/// The file PgBouncer writes its pid to, in its directory.
pub(crate) const PID_FILE: &str = "pgbouncer.pid";

/// A running PgBouncer (see the module documentation).
#[derive(Debug)]
pub struct LocalPgBouncer {
    dir: PathBuf,
    port: u16,
    mode: Pooler,
    ca: PathBuf,
    password: railyard::config::Secret,
}

/// Finds `pgbouncer`: `RAILYARD_PGBOUNCER`, `$PATH`, or Debian's `/usr/sbin`.
fn binary() -> Result<PathBuf, Error> {
    if let Ok(p) = std::env::var("RAILYARD_PGBOUNCER") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("pgbouncer"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Local(
                "pgbouncer not found in $PATH or /usr/sbin: install it (`apt-get install pgbouncer`) or set RAILYARD_PGBOUNCER".into(),
            )
        })
}

impl LocalPgBouncer {
    /// Starts PgBouncer in `mode` (session or transaction) in front of the
    /// cluster's server listening on `backend_port` (its primary or replica).
    pub async fn start(
        cluster: &LocalCluster,
        backend_port: u16,
        mode: Pooler,
    ) -> Result<Self, Error> {
        let pool_mode = match mode {
            Pooler::PgBouncerSession => "session",
            Pooler::PgBouncerTransaction => "transaction",
            _ => {
                return Err(Error::Local(format!(
                    "a PgBouncer needs a pgbouncer pool mode, not {mode}"
                )));
            }
        };
        let cluster_dir = cluster.dir().to_owned();
        let password = cluster.password().clone();
        let ca = cluster.ca_cert();
        tokio::task::spawn_blocking(move || {
            let bin = binary()?;
            let run_as = RunAs::detect()?;
            let dir = std::env::temp_dir().join(format!(
                "railyard-pgbouncer-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            scratch::claim_dir(&dir)?;
            run_as.own(&dir)?;
            let started = Self::spawn(
                &bin,
                &run_as,
                &dir,
                &cluster_dir,
                backend_port,
                pool_mode,
                password.expose(),
            );
            match started {
                Ok(port) => Ok(LocalPgBouncer {
                    dir,
                    port,
                    mode,
                    ca,
                    password,
                }),
                Err(e) => {
                    let _ = stop(&dir);
                    let _ = std::fs::remove_dir_all(&dir);
                    Err(e)
                }
            }
        })
        .await
        .map_err(|e| Error::Local(format!("the PgBouncer start task failed: {e}")))?
    }

    fn spawn(
        bin: &Path,
        run_as: &RunAs,
        dir: &Path,
        cluster_dir: &Path,
        backend_port: u16,
        pool_mode: &str,
        password: &str,
    ) -> Result<u16, Error> {
        let pg = cluster_dir.join("pg");
        for f in ["server.crt", "server.key"] {
            let bytes = std::fs::read(pg.join(f))
                .map_err(|e| Error::io(format!("reading the cluster's {f}"), e))?;
            write_file(&dir.join(f), &bytes, 0o600, Some(run_as))?;
        }
        let users = format!("\"{USER}\" \"{}\"\n", password.replace('"', "\"\""));
        write_file(
            &dir.join("users.txt"),
            users.as_bytes(),
            0o600,
            Some(run_as),
        )?;
        let port = free_port()?;
        let d = dir.display();
        let ini = format!(
            "[databases]\n\
             * = host=127.0.0.1 port={backend_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             pool_mode = {pool_mode}\n\
             auth_type = scram-sha-256\n\
             auth_file = {d}/users.txt\n\
             logfile = {d}/pgbouncer.log\n\
             pidfile = {d}/{PID_FILE}\n\
             client_tls_sslmode = require\n\
             client_tls_cert_file = {d}/server.crt\n\
             client_tls_key_file = {d}/server.key\n\
             server_tls_sslmode = require\n"
        );
        write_file(
            &dir.join("pgbouncer.ini"),
            ini.as_bytes(),
            0o600,
            Some(run_as),
        )?;
        let out = run_as
            .command(bin, dir)
            .args(["-d", "pgbouncer.ini"])
            .output()
            .map_err(|e| Error::io(format!("running {}", bin.display()), e))?;
        if !out.status.success() {
            return Err(Error::Local(format!(
                "pgbouncer did not start ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(Error::Local(format!(
                    "pgbouncer did not listen on 127.0.0.1:{port} within 10 s; its log ends: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its pool mode.
    pub fn mode(&self) -> Pooler {
        self.mode
    }

    /// Its directory (configuration, log, pid file).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A URL of `dbname` through it: TLS `verify-full` against the cluster's
    /// CA, the cluster's user and password.
    pub fn target(&self, dbname: &str) -> ConnectTarget {
        let url = format!(
            "postgres://{USER}@localhost:{}/{dbname}?sslmode=verify-full&sslrootcert={}",
            self.port,
            self.ca.display()
        );
        url.parse::<ConnectTarget>()
            .expect("the PgBouncer URL is well formed")
            .with_password(Some(self.password.clone()))
    }
}

impl Drop for LocalPgBouncer {
    fn drop(&mut self) {
        if let Err(e) = stop(&self.dir) {
            tracing::warn!(target: "railyard::local", dir = %self.dir.display(), error = %e, "could not stop PgBouncer");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Stops the PgBouncer whose pid file is in `dir`, if it runs: SIGTERM
/// (immediate shutdown), then SIGKILL after 5 s.
pub(crate) fn stop(dir: &Path) -> Result<(), Error> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let Ok(text) = std::fs::read_to_string(dir.join(PID_FILE)) else {
        return Ok(());
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return Ok(());
    };
    // Only a pgbouncer: a stale pid file may name a recycled pid.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "pgbouncer" {
        return Ok(());
    }
    // Exited, or a zombie waiting for a parent that may never reap it (the
    // daemon's parent is init, which in a container may not reap).
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.trim_start().chars().next())
            })
            .is_some_and(|state| state != 'Z' && state != 'X')
    };
    let raw = pid;
    let pid = Pid::from_raw(pid);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(raw) {
        if Instant::now() > deadline {
            kill(pid, Signal::SIGKILL)
                .map_err(|e| Error::io("killing pgbouncer", std::io::Error::from(e)))?;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
