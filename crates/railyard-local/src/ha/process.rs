//! Running `pg_autoctl`: where it and its PostgreSQL are, the environment every
//! call gets, commands with deadlines, the services left running in the
//! background with their pid records, and stopping or killing them.
//!
//! Each `pg_autoctl run` is started in a process group of its own, so that its
//! supervisor, its services and its Postgres (postmaster and backends) can be
//! signalled at once: `kill -9` of the group is a node that crashed.

use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

use super::super::RunAs;
use crate::error::Error;

const INSTALL_HINT: &str = "install pg_auto_failover (`apt-get install postgresql-15-auto-failover pg-auto-failover-cli` on Debian/Ubuntu; the extension's major version must be the server's), or point RAILYARD_PG_AUTOCTL and RAILYARD_PG_BINDIR at them";

/// `pg_autoctl` and the PostgreSQL installation that has the monitor's
/// extension.
#[derive(Debug, Clone)]
pub(super) struct Tools {
    pub(super) bindir: PathBuf,
    pub(super) autoctl: PathBuf,
}

impl Tools {
    /// Finds `pg_autoctl` (`$RAILYARD_PG_AUTOCTL`, else `$PATH`) and the newest
    /// PostgreSQL binaries whose installation holds `pgautofailover.so`
    /// (`$RAILYARD_PG_BINDIR` first).
    pub(super) fn find() -> Result<Tools, Error> {
        let autoctl = std::env::var_os("RAILYARD_PG_AUTOCTL")
            .map(PathBuf::from)
            .filter(|p| p.is_file())
            .or_else(|| {
                std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                    .map(|d| d.join("pg_autoctl"))
                    .find(|p| p.is_file())
            })
            .ok_or_else(|| Error::Local(format!("pg_autoctl was not found; {INSTALL_HINT}")))?;
        let mut candidates: Vec<PathBuf> = std::env::var_os("RAILYARD_PG_BINDIR")
            .map(PathBuf::from)
            .into_iter()
            .collect();
        candidates.extend(railyard::config::versioned_pg_bindirs());
        if let Ok(b) = super::super::Binaries::find() {
            candidates.push(b.dir().to_owned());
        }
        for dir in &candidates {
            let server = ["initdb", "pg_ctl", "postgres", "pg_basebackup", "pg_rewind"]
                .iter()
                .all(|b| dir.join(b).is_file());
            if server && extension_installed(dir) {
                return Ok(Tools {
                    bindir: dir.clone(),
                    autoctl,
                });
            }
        }
        Err(Error::Local(format!(
            "no PostgreSQL installation with the pgautofailover extension (looked in {}); {INSTALL_HINT}",
            candidates
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

fn extension_installed(bindir: &Path) -> bool {
    let libdir = Command::new(bindir.join("pg_config"))
        .arg("--pkglibdir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_else(|| bindir.parent().unwrap_or(bindir).join("lib"));
    libdir.join("pgautofailover.so").is_file()
}

/// A command run as the servers' account, in the formation's private directory
/// `ha`, with an environment of its own: nothing of the caller's `PG*`
/// variables, `HOME` and the XDG directories (pg_autoctl's configuration,
/// state and pid files) inside `ha`, the Unix sockets in `ha/sockets`, and the
/// replication password in `ha/pgpass` (read by libpq in pg_basebackup,
/// pg_rewind and the standby's WAL receiver), never on a command line.
pub(super) fn command(run_as: &RunAs, tools: &Tools, ha: &Path, program: &Path) -> Command {
    let mut c = run_as.command(program, ha);
    let mut path = std::ffi::OsString::from(tools.bindir.as_os_str());
    path.push(":/usr/local/bin:/usr/bin:/bin");
    c.env_clear()
        .env("PATH", path)
        .env("LC_ALL", "C")
        .env("HOME", ha)
        .env("XDG_CONFIG_HOME", ha.join("config"))
        .env("XDG_DATA_HOME", ha.join("data"))
        .env("XDG_RUNTIME_DIR", ha.join("run"))
        // pg_autoctl's own knob for the socket directory; PGHOST for the
        // connections it opens without naming a host.
        .env("PG_REGRESS_SOCK_DIR", ha.join("sockets"))
        .env("PGHOST", ha.join("sockets"))
        .env("PGPASSFILE", ha.join("pgpass"))
        .process_group(0);
    c
}

/// The last `n` lines of a log file, for error messages (pg_autoctl logs
/// connection strings without passwords; passwords live in `pgpass`).
pub(super) fn tail(log: &Path, n: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn open_log(log: &Path) -> Result<fs::File, Error> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::io(format!("opening {}", log.display()), e))
}

/// Runs a command to its end, its output appended to `log`; past `within` its
/// process group is killed and the call fails.
pub(super) fn run_logged(
    mut c: Command,
    what: &str,
    log: &Path,
    within: Duration,
) -> Result<(), Error> {
    let out = open_log(log)?;
    let err = out
        .try_clone()
        .map_err(|e| Error::io(format!("opening {}", log.display()), e))?;
    c.stdout(out).stderr(err);
    let mut child = c
        .spawn()
        .map_err(|e| Error::io(format!("running {what}"), e))?;
    let end = Instant::now() + within;
    loop {
        match child
            .try_wait()
            .map_err(|e| Error::io(format!("waiting for {what}"), e))?
        {
            Some(status) if status.success() => return Ok(()),
            Some(status) => {
                return Err(Error::Local(format!(
                    "{what} failed ({status}); the end of {}:\n{}",
                    log.display(),
                    tail(log, 15)
                )));
            }
            None if Instant::now() >= end => {
                let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                let _ = child.wait();
                return Err(Error::Local(format!(
                    "{what} did not finish within {within:?}; the end of {}:\n{}",
                    log.display(),
                    tail(log, 15)
                )));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Runs a command to its end within `within` and returns its standard output.
pub(super) fn run_output(mut c: Command, what: &str, within: Duration) -> Result<String, Error> {
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .map_err(|e| Error::io(format!("running {what}"), e))?;
    let pid = child.id();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    // The pipes are drained on threads, so a chatty command cannot fill them
    // and stall while we wait for it.
    fn drain(pipe: Option<impl Read>) -> String {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_string(&mut s);
        }
        s
    }
    let (out, err) = std::thread::scope(|scope| {
        let out = scope.spawn(move || drain(stdout));
        let err = scope.spawn(move || drain(stderr));
        let end = Instant::now() + within;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    let _ = child.wait();
                    break None;
                }
            }
        };
        (
            (status, out.join().unwrap_or_default()),
            err.join().unwrap_or_default(),
        )
    });
    match out {
        (Some(s), text) if s.success() => Ok(text),
        (Some(s), _) => Err(Error::Local(format!("{what} failed ({s}): {}", err.trim()))),
        (None, _) => Err(Error::Local(format!(
            "{what} did not finish within {within:?}: {}",
            err.trim()
        ))),
    }
}

fn record(ha: &Path, name: &str) -> PathBuf {
    ha.join(format!("{name}.pid"))
}

/// Starts `pg_autoctl run` for one node (or the monitor) in the background, in
/// a process group of its own, logging to `ha/<name>.log`; records its pid and
/// start time in `ha/<name>.pid` for [`service_pid`] and the reaper.
pub(super) fn spawn_service(
    run_as: &RunAs,
    tools: &Tools,
    ha: &Path,
    name: &str,
) -> Result<(), Error> {
    let log = ha.join(format!("{name}.log"));
    let out = open_log(&log)?;
    let err = out
        .try_clone()
        .map_err(|e| Error::io(format!("opening {}", log.display()), e))?;
    let mut c = command(run_as, tools, ha, &tools.autoctl);
    c.args(["run", "--pgdata"])
        .arg(ha.join(name))
        .stdout(out)
        .stderr(err);
    let child = c
        .spawn()
        .map_err(|e| Error::io(format!("starting pg_autoctl run for {name}"), e))?;
    let pid = child.id();
    let started = super::super::scratch::start_time(pid).unwrap_or_default();
    // The child is not waited for here: it runs on. It is reaped by
    // `service_pid` once it stops, or by init once this process exits.
    drop(child);
    fs::write(record(ha, name), format!("{pid} {started}\n"))
        .map_err(|e| Error::io(format!("recording the pid of {name}'s pg_autoctl"), e))
}

/// Collects an exited child of this process (a pg_autoctl we started), so
/// that it does not linger as a zombie; does nothing for anyone else's.
fn reap(pid: u32) {
    let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
}

/// The state letter of `/proc/<pid>/stat` and the process group, `None` when
/// there is no such process.
fn stat(pid: u32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = rest.next()?.chars().next()?;
    let _ppid = rest.next()?;
    let group = rest.next()?.parse().ok()?;
    Some((state, group))
}

fn alive(pid: u32) -> bool {
    reap(pid);
    stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// The pid of the running `pg_autoctl run` of `name`, by its record: `None`
/// when it is not running (a reused pid has another start time).
pub(super) fn service_pid(ha: &Path, name: &str) -> Option<u32> {
    let text = fs::read_to_string(record(ha, name)).ok()?;
    let mut parts = text.split_whitespace();
    let pid: u32 = parts.next()?.parse().ok()?;
    let started = parts.next()?;
    (alive(pid) && super::super::scratch::start_time(pid).as_deref() == Some(started))
        .then_some(pid)
}

/// Processes of a group, from `/proc` (zombies excluded).
fn group_members(group: u32) -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            stat(p).is_some_and(|(state, g)| g == group as i32 && state != 'Z' && state != 'X')
        })
        .collect()
}

/// The SysV semaphore pg_autoctl's supervisor made for its log lines; its
/// services inherit its id in `PG_AUTOCTL_LOG_SEMAPHORE`. The supervisor
/// removes it when it exits, which a `kill -9` does not let it do.
fn log_semaphore(group: u32) -> Option<String> {
    group_members(group).into_iter().find_map(|p| {
        let env = fs::read(format!("/proc/{p}/environ")).ok()?;
        env.split(|b| *b == 0).find_map(|var| {
            let v = std::str::from_utf8(var).ok()?;
            let id = v.strip_prefix("PG_AUTOCTL_LOG_SEMAPHORE=")?;
            id.chars()
                .all(|c| c.is_ascii_digit())
                .then(|| id.to_owned())
        })
    })
}

/// The postmaster's pid from `postmaster.pid`, when that process is alive.
pub(super) fn postmaster_pid(pgdata: &Path) -> Option<u32> {
    let text = fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    let pid: u32 = text.lines().next()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

/// Sends SIGKILL to one postmaster (its keeper notices and restarts it).
pub(super) fn kill_postmaster(pgdata: &Path) -> Result<u32, Error> {
    let pid = postmaster_pid(pgdata)
        .ok_or_else(|| Error::Local(format!("no postmaster runs in {}", pgdata.display())))?;
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).map_err(|e| {
        Error::io(
            format!("kill -9 of the postmaster {pid}"),
            std::io::Error::from(e),
        )
    })?;
    Ok(pid)
}

/// Sends SIGKILL to a node's whole process group (its pg_autoctl supervisor
/// and services, its postmaster and backends: a crashed machine), waits until
/// none is left (within `within`) and removes the supervisor's log semaphore.
pub(super) fn kill_group(ha: &Path, name: &str, within: Duration) -> Result<(), Error> {
    let pid = service_pid(ha, name)
        .ok_or_else(|| Error::Local(format!("pg_autoctl of {name} is not running")))?;
    let semaphore = log_semaphore(pid);
    killpg(Pid::from_raw(pid as i32), Signal::SIGKILL).map_err(|e| {
        Error::io(
            format!("kill -9 of {name}'s process group"),
            std::io::Error::from(e),
        )
    })?;
    let end = Instant::now() + within;
    while alive(pid) || !group_members(pid).is_empty() {
        if Instant::now() >= end {
            return Err(Error::Local(format!(
                "{name}'s processes were still there {within:?} after kill -9"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some(id) = semaphore {
        remove_semaphore(&id);
    }
    Ok(())
}

fn remove_semaphore(id: &str) {
    let removed = Command::new("ipcrm")
        .args(["-s", id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !removed {
        tracing::warn!(target: "railyard::local", semaphore = id, "could not remove the semaphore of a killed pg_autoctl (ipcrm -s)");
    }
}

/// Stops the services `names`: SIGINT to each pg_autoctl supervisor (a fast
/// shutdown of its Postgres), SIGKILL to the process groups still there after
/// `within`, then `pg_ctl stop -m immediate` for a postmaster left without its
/// keeper (when `tools` are known).
pub(super) fn stop_services(
    ha: &Path,
    names: &[&str],
    run_as: &RunAs,
    tools: Option<&Tools>,
    within: Duration,
) -> Result<(), Error> {
    let running: Vec<(&str, u32)> = names
        .iter()
        .filter_map(|n| service_pid(ha, n).map(|p| (*n, p)))
        .collect();
    for (_, pid) in &running {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGINT);
    }
    let end = Instant::now() + within;
    while running.iter().any(|(_, p)| alive(*p)) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    for (name, pid) in &running {
        if alive(*pid) || !group_members(*pid).is_empty() {
            tracing::warn!(target: "railyard::local", node = name, "pg_autoctl did not stop in time; killing its process group");
            let semaphore = log_semaphore(*pid);
            let _ = killpg(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(100));
            reap(*pid);
            if let Some(id) = semaphore {
                remove_semaphore(&id);
            }
        }
    }
    let mut failed = Vec::new();
    for name in names {
        let pgdata = ha.join(name);
        if postmaster_pid(&pgdata).is_none() {
            continue;
        }
        let Some(tools) = tools else {
            failed.push(format!("{name}: a postmaster runs and pg_ctl is unknown"));
            continue;
        };
        let mut c = command(run_as, tools, ha, &tools.bindir.join("pg_ctl"));
        c.args(["stop", "-m", "immediate", "-w", "-t", "20", "-D"])
            .arg(&pgdata);
        if let Err(e) = run_output(c, "pg_ctl stop", Duration::from_secs(30)) {
            failed.push(format!("{name}: {e}"));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Local(format!(
            "could not stop the formation in {}: {}",
            ha.display(),
            failed.join("; ")
        )))
    }
}
