//! Running the external tools (pgBackRest, pg_dump, pg_restore, pg_ctl): a
//! deadline on every run (the child is killed when it passes), the error
//! output kept for the error (its tail, with the secrets it was given
//! removed), nothing run through a shell.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::config::Secret;
use crate::error::Error;

/// How many bytes of a tool's error output an error keeps (the end of it).
const STDERR_KEPT: usize = 2000;

/// What a tool printed, when it succeeded.
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) stdout: String,
}

/// Runs `cmd` to its end within `deadline`; on failure or timeout the error
/// names `what`, the program and how it ended, with its error output.
/// Every text in `secrets` is replaced by `***` in what is kept.
pub(crate) async fn run(
    cmd: std::process::Command,
    what: &str,
    deadline: Duration,
    secrets: &[&Secret],
) -> Result<Output, Error> {
    let tool = Path::new(cmd.get_program())
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("{what}: starting {tool}"), e))?;
    // On timeout the future is dropped with the child, which kills it.
    let out = match tokio::time::timeout(deadline, child.wait_with_output()).await {
        Ok(r) => r.map_err(|e| Error::io(format!("{what}: waiting for {tool}"), e))?,
        Err(_) => {
            return Err(Error::Tool {
                what: what.to_owned(),
                tool,
                outcome: format!("timed out after {deadline:?} and was killed"),
                stderr: String::new(),
            });
        }
    };
    let clean = |bytes: &[u8]| {
        let mut s = String::from_utf8_lossy(bytes).into_owned();
        for secret in secrets {
            if !secret.expose().is_empty() {
                s = s.replace(secret.expose(), "***");
            }
        }
        s
    };
    if !out.status.success() {
        let mut stderr = clean(&out.stderr).trim().to_owned();
        if stderr.is_empty() {
            // pgBackRest reports its errors on stdout at its console level.
            stderr = clean(&out.stdout).trim().to_owned();
        }
        if stderr.len() > STDERR_KEPT {
            let mut cut = stderr.len() - STDERR_KEPT;
            while !stderr.is_char_boundary(cut) {
                cut += 1;
            }
            stderr = format!("…{}", &stderr[cut..]);
        }
        return Err(Error::Tool {
            what: what.to_owned(),
            tool,
            outcome: match out.status.code() {
                Some(c) => format!("exited with status {c}"),
                None => format!("ended by a signal ({})", out.status),
            },
            stderr,
        });
    }
    Ok(Output {
        stdout: clean(&out.stdout),
    })
}

/// Finds a PostgreSQL client program (`pg_dump`, `pg_restore`): beside the
/// server binaries when `RAILYARD_PG_BINDIR` is set, in `$PATH`, else in the
/// newest `/usr/lib/postgresql/<version>/bin`.
pub(crate) fn find(program: &str) -> Result<PathBuf, Error> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("RAILYARD_PG_BINDIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    dirs.extend(versions.into_iter().rev().map(|(_, d)| d));
    dirs.push(PathBuf::from("/usr/bin"));
    dirs.into_iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Backup(format!(
                "{program} was not found in $PATH or /usr/lib/postgresql/*/bin; install it (`apt-get install {}` on Debian/Ubuntu) or set RAILYARD_PG_BINDIR",
                if program == "pgbackrest" {
                    "pgbackrest"
                } else {
                    "postgresql-client"
                }
            ))
        })
}
