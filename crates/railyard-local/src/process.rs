//! Process control: the cluster's lock file, `pg_ctl` and other commands run
//! as the servers' account, loopback ports, and files written whole.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::error::Error;
use crate::{Binaries, RunAs};

pub(crate) fn lock(dir: &Path) -> Result<fs::File, Error> {
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

pub(crate) fn run(mut c: Command, what: &str) -> Result<(), Error> {
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

pub(crate) fn port_free(port: u16) -> bool {
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
