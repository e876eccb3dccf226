//! What test runs leave behind, marked with the process that owns it, so that a
//! later run (or `railyard local gc`) can reclaim what a killed run left.
//!
//! An owner is `<boot id>/<pid>/<process start time>`: a process is gone when
//! the machine booted since, or when no process with that pid and start time
//! exists (a reused pid has another start time). An owner recorded on another
//! machine (another boot id) is never judged: its process cannot be looked at.
//!
//! Scratch databases carry their owner in their comment (`COMMENT ON DATABASE
//! … IS 'railyard scratch owner=…'`); private clusters and pg_auto_failover
//! formations ([`super::ha`]) in a file named [`OWNER_FILE`] in their directory.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// The file in a private cluster's directory that names its owner.
pub const OWNER_FILE: &str = "railyard-owner";

/// The comment prefix of a scratch database.
pub const SCRATCH_PREFIX: &str = "railyard scratch owner=";

/// Lists scratch databases as `(name, comment, bytes)`.
pub const SCRATCH_DATABASES_SQL: &str = "SELECT d.datname::text AS name, s.description AS marker, \
     pg_database_size(d.oid) AS bytes FROM pg_database d JOIN pg_shdescription s \
     ON s.objoid = d.oid AND s.classoid = 'pg_database'::regclass \
     WHERE s.description LIKE 'railyard scratch owner=%' ORDER BY 1";

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The start time of a process (field 22 of `/proc/<pid>/stat`), `None` when
/// no such process exists.
pub(super) fn start_time(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19).map(str::to_owned)
}

/// This process, as an owner.
pub fn this_process() -> String {
    let pid = std::process::id();
    format!(
        "{}/{pid}/{}",
        boot_id(),
        start_time(pid).unwrap_or_default()
    )
}

/// The comment that marks a scratch database as this process's.
pub fn scratch_comment() -> String {
    format!("{SCRATCH_PREFIX}{}", this_process())
}

/// Whether `owner` (as [`this_process`] wrote it, or a comment starting with
/// [`SCRATCH_PREFIX`]) names a process of this machine that is gone.
pub fn is_orphaned(owner: &str) -> bool {
    let owner = owner.strip_prefix(SCRATCH_PREFIX).unwrap_or(owner).trim();
    let mut parts = owner.split('/');
    let (Some(boot), Some(pid), Some(started)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    if boot.is_empty() || boot != boot_id() {
        return false;
    }
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    start_time(pid).as_deref() != Some(started)
}

/// Marks `dir` (created when missing) as owned by this process.
pub fn claim_dir(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    fs::write(dir.join(OWNER_FILE), this_process())
        .map_err(|e| Error::io(format!("writing the owner of {}", dir.display()), e))
}

/// Bytes under `dir` (not following links); errors count as zero.
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| dir_size(&e.path())).sum::<u64>())
        .unwrap_or(0)
}

/// Stops and removes the private clusters and formations directly under
/// `parent` whose owner is gone; returns each with the bytes freed.
pub fn reap_private_clusters(parent: &Path) -> Vec<(PathBuf, u64)> {
    let mut reaped = Vec::new();
    let Ok(entries) = fs::read_dir(parent) else {
        return reaped;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(owner) = fs::read_to_string(dir.join(OWNER_FILE)) else {
            continue;
        };
        if !is_orphaned(&owner) {
            continue;
        }
        let bytes = dir_size(&dir);
        let stopped = if super::ha::is_formation(&dir) {
            super::ha::stop_dir(&dir)
        } else {
            super::stop_dir(&dir)
        };
        if let Err(e) = stopped {
            tracing::warn!(target: "railyard::local", dir = %dir.display(), error = %e, "could not stop a dead run's cluster");
        }
        match fs::remove_dir_all(&dir) {
            Ok(()) => reaped.push((dir, bytes)),
            Err(e) => {
                tracing::warn!(target: "railyard::local", dir = %dir.display(), error = %e, "could not remove a dead run's cluster")
            }
        }
    }
    reaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_dead_one_is_not() {
        let me = this_process();
        assert!(!is_orphaned(&me), "{me}");
        assert!(!is_orphaned(&scratch_comment()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let owner = format!(
            "{}/{pid}/{}",
            boot_id(),
            start_time(pid).unwrap_or_default()
        );
        child.wait().unwrap();
        assert!(is_orphaned(&owner), "{owner}");
        // Another machine's process is never judged; nonsense neither.
        assert!(!is_orphaned(&format!("other-boot/{pid}/1")));
        assert!(!is_orphaned("garbage"));
    }
}

/// The advisory lock (taken on the `postgres` database) that serialises the
/// test harness's creation of templates and databases with their removal.
pub const HARNESS_LOCK: i64 = 0x5241_494c_5445_5354; // "RAILTEST"

/// The comment of a harness template once its migrations ran: followed by the
/// Unix time it was last prepared.
pub const TEMPLATE_READY: &str = "railyard template ready";

/// What [`LocalCluster::gc`](super::LocalCluster::gc) removed.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct GcReport {
    /// Scratch databases of processes that are gone, with their sizes.
    pub databases: Vec<(String, u64)>,
    /// Harness templates (and their shared test databases) not prepared
    /// recently and not in use, or left unfinished by a failed migration run.
    pub templates: Vec<(String, u64)>,
    /// Private clusters of processes that are gone, with their sizes.
    pub clusters: Vec<(PathBuf, u64)>,
}

impl GcReport {
    /// Bytes freed in all (database sizes as the server reported them; on a
    /// cluster with a replica, the replica frees as much again).
    pub fn bytes(&self) -> u64 {
        self.databases.iter().map(|d| d.1).sum::<u64>()
            + self.templates.iter().map(|d| d.1).sum::<u64>()
            + self.clusters.iter().map(|d| d.1).sum::<u64>()
    }
}

/// Whether a harness template, by its comment, is stale: unfinished (no
/// comment, or not the ready one), or last prepared before `cutoff` (Unix time).
fn template_stale(comment: Option<&str>, cutoff: u64) -> bool {
    let Some(rest) = comment.and_then(|c| c.strip_prefix(TEMPLATE_READY)) else {
        return true;
    };
    match rest.trim().strip_prefix("; prepared=") {
        Some(t) => t.trim().parse::<u64>().map_or(true, |t| t < cutoff),
        // Ready, from a version that did not record the time: judge by use only.
        None => true,
    }
}

pub(super) async fn gc(
    client: &tokio_postgres::Client,
    template_idle: std::time::Duration,
    parent: &Path,
) -> Result<GcReport, Error> {
    let db_err = |what: &str, e: tokio_postgres::Error| Error::Local(format!("{what}: {e}"));
    let parent = parent.to_owned();
    let mut report = GcReport {
        clusters: tokio::task::spawn_blocking(move || reap_private_clusters(&parent))
            .await
            .unwrap_or_default(),
        ..GcReport::default()
    };
    client
        .batch_execute(&format!("SELECT pg_advisory_lock({HARNESS_LOCK})"))
        .await
        .map_err(|e| db_err("taking the harness lock", e))?;
    let result = async {
        for row in client
            .query(SCRATCH_DATABASES_SQL, &[])
            .await
            .map_err(|e| db_err("listing scratch databases", e))?
        {
            let (name, marker, bytes): (String, String, i64) = (row.get(0), row.get(1), row.get(2));
            if is_orphaned(&marker) {
                drop_database(client, &name).await?;
                report.databases.push((name, bytes.max(0) as u64));
            }
        }
        let cutoff = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(template_idle)
            .as_secs();
        let templates = client
            .query(
                "SELECT d.datname::text, s.description, \
                 pg_database_size(d.oid) + coalesce((SELECT pg_database_size(t.oid) FROM pg_database t \
                   WHERE t.datname = 'railyard_test_' || substr(d.datname, 14)), 0), \
                 EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname IN (d.datname, 'railyard_test_' || substr(d.datname, 14))) \
                 FROM pg_database d LEFT JOIN pg_shdescription s \
                 ON s.objoid = d.oid AND s.classoid = 'pg_database'::regclass \
                 WHERE d.datname LIKE 'railyard\\_tpl\\_%'",
                &[],
            )
            .await
            .map_err(|e| db_err("listing harness templates", e))?;
        for row in templates {
            let (name, comment, bytes, busy): (String, Option<String>, i64, bool) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            if busy || !template_stale(comment.as_deref(), cutoff) {
                continue;
            }
            let shared = format!("railyard_test_{}", &name["railyard_tpl_".len()..]);
            drop_database(client, &shared).await?;
            drop_database(client, &name).await?;
            report.templates.push((name, bytes.max(0) as u64));
        }
        Ok::<_, Error>(())
    }
    .await;
    let _ = client
        .batch_execute(&format!("SELECT pg_advisory_unlock({HARNESS_LOCK})"))
        .await;
    result.map(|()| report)
}

async fn drop_database(client: &tokio_postgres::Client, name: &str) -> Result<(), Error> {
    client
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            name.replace('"', "\"\"")
        ))
        .await
        .map_err(|e| Error::Local(format!("dropping database {name}: {e}")))
}

#[cfg(test)]
mod template_tests {
    use super::*;

    #[test]
    fn templates_are_stale_when_unfinished_or_not_prepared_since_the_cutoff() {
        assert!(template_stale(None, 100));
        assert!(template_stale(Some("something else"), 100));
        assert!(template_stale(
            Some("railyard template ready; prepared=99"),
            100
        ));
        assert!(!template_stale(
            Some("railyard template ready; prepared=100"),
            100
        ));
        assert!(template_stale(
            Some("railyard template ready; prepared=x"),
            100
        ));
    }
}
