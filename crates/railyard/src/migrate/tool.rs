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

/// How much of a tool's error output is kept (its last bytes): outputs are
/// read as they come, so a chatty tool cannot fill the memory.
pub const STDERR_CAP: usize = 64 * 1024;
/// How much of a tool's standard output is kept (its last bytes). Larger
/// than [`STDERR_CAP`]: `pgbackrest info --output=json` is parsed from it
/// (a few KiB per backup); a repository listing past it fails to parse
/// rather than filling the memory.
pub const STDOUT_CAP: usize = 4 * 1024 * 1024;

struct Captured {
    status: std::process::ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// Reads `r` to its end, keeping its last `cap` bytes.
async fn tail(mut r: impl tokio::io::AsyncRead + Unpin, cap: usize) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut kept = std::collections::VecDeque::with_capacity(8192);
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend(&buf[..n]);
                let over = kept.len().saturating_sub(cap);
                kept.drain(..over);
            }
        }
    }
    kept.into()
}

/// What a tool printed, when it succeeded (the last [`STDOUT_CAP`] bytes).
#[derive(Debug)]
#[non_exhaustive]
pub struct Output {
    /// The end of its standard output.
    pub stdout: String,
}

/// Runs `cmd` to its end within `deadline`; on failure or timeout the error
/// names `what`, the program and how it ended, with its error output.
/// Every text in `secrets` is replaced by `***` in what is kept.
// Long by design: spawn, both pipes and the deadline are one state machine; split, each part would need all of it.
pub async fn run(
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
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::io(format!("{what}: starting {tool}"), e))?;
    let stdout = child
        .stdout
        .take()
        .map(|s| tokio::spawn(tail(s, STDOUT_CAP)));
    let stderr = child
        .stderr
        .take()
        .map(|s| tokio::spawn(tail(s, STDERR_CAP)));
    // On timeout the child is dropped, which kills it (kill_on_drop); its
    // pipes then close and the readers end.
    let status = match tokio::time::timeout(deadline, child.wait()).await {
        Ok(r) => r.map_err(|e| Error::io(format!("{what}: waiting for {tool}"), e))?,
        Err(_) => {
            drop(child);
            for t in [stdout, stderr].into_iter().flatten() {
                t.abort();
            }
            return Err(Error::Tool {
                what: what.to_owned(),
                tool,
                outcome: format!("timed out after {deadline:?} and was killed"),
                stderr: String::new(),
            });
        }
    };
    // The child has exited; a grandchild still holding a pipe open must not
    // hold this up past a short grace.
    let collect = |t: Option<tokio::task::JoinHandle<Vec<u8>>>| async move {
        match t {
            Some(t) => {
                let abort = t.abort_handle();
                match tokio::time::timeout(Duration::from_secs(5), t).await {
                    Ok(Ok(v)) => v,
                    _ => {
                        abort.abort();
                        Vec::new()
                    }
                }
            }
            None => Vec::new(),
        }
    };
    let out = Captured {
        status,
        stdout: collect(stdout).await,
        stderr: collect(stderr).await,
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
pub fn find(program: &str) -> Result<PathBuf, Error> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("RAILYARD_PG_BINDIR") {
        dirs.push(PathBuf::from(d));
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.extend(crate::config::versioned_pg_bindirs());
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

/// [`find`] on a blocking thread (it reads directories).
pub async fn find_async(program: &str) -> Result<PathBuf, Error> {
    let program = program.to_owned();
    tokio::task::spawn_blocking(move || find(&program))
        .await
        .map_err(|e| Error::Backup(format!("a blocking task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_tail_of_an_output_is_kept() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let kept = tail(&data[..], 65_536).await;
        assert_eq!(kept.len(), 65_536);
        assert_eq!(kept[..], data[data.len() - 65_536..]);
        assert_eq!(tail(&data[..10], 65_536).await, data[..10]);
    }

    #[tokio::test]
    async fn a_tool_past_its_deadline_is_killed() {
        let mut c = std::process::Command::new("sh");
        c.args(["-c", "head -c 10000000 /dev/zero; sleep 30"]);
        let started = std::time::Instant::now();
        let e = run(c, "testing", Duration::from_millis(500), &[])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("timed out"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
