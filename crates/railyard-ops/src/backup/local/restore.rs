//! Point-in-time recovery into a scratch instance, and the scratch
//! instances' making and discarding.

use std::fs;
use std::time::Instant;

use chrono::{DateTime, Utc};

use super::points::wait_archived;
use super::{LocalBackups, Phase, PitrReport, Scratch, blocking, within};
use crate::backup::pgbackrest::RestoreTarget;
use crate::error::Error;

impl LocalBackups {
    /// Point-in-time recovery into a scratch instance: pgBackRest picks the
    /// newest backup before `to`, recovery replays the archive up to the
    /// last transaction committed at or before `to`, and the instance is
    /// promoted. The returned instance runs until [`Scratch::remove`] (or
    /// [`Scratch::keep`] to leave it running).
    pub async fn restore(&self, to: DateTime<Utc>) -> Result<(Scratch, PitrReport), Error> {
        self.require_enabled().await?;
        self.write_config().await?;
        self.commit_after(to).await?;
        let mut scratch = self.scratch("pitr").await?;
        let mut phases = Vec::new();
        let started = Instant::now();
        let r = self
            .pgbackrest()
            .restore(&scratch.data, None, &RestoreTarget::Time(to))
            .await;
        phases.push(Phase {
            name: "restore",
            took: started.elapsed(),
            ok: r.is_ok(),
        });
        if let Err(e) = r {
            let _ = scratch.remove().await;
            return Err(e);
        }
        let started = Instant::now();
        let r = scratch.start().await;
        phases.push(Phase {
            name: "start/recovery",
            took: started.elapsed(),
            ok: r.is_ok(),
        });
        if let Err(e) = r {
            let _ = scratch.remove().await;
            return Err(e);
        }
        let last = last_committed(&scratch).await;
        let last_xact = match last {
            Ok(l) => l,
            Err(e) => {
                let _ = scratch.remove().await;
                return Err(e);
            }
        };
        Ok((
            scratch,
            PitrReport {
                target: to,
                last_xact,
                phases,
            },
        ))
    }

    /// Refuses a target `to` that is not in the past by the primary's clock,
    /// then commits a transaction after it and waits until its WAL segment
    /// is archived: recovery to `to` needs a commit after it.
    async fn commit_after(&self, to: DateTime<Utc>) -> Result<(), Error> {
        let client = self.source_client("postgres").await?;
        // The server's clock decides (commit times are the server's).
        let now: f64 = within(
            "reading the primary's clock",
            client.query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[]),
        )
        .await?
        .get(0);
        let now = DateTime::from_timestamp_micros((now * 1e6) as i64).unwrap_or_else(Utc::now);
        if to >= now {
            return Err(Error::Backup(format!(
                "--to-time {} is not in the past by the server's clock (now {} there); give a time that has passed",
                to.format("%Y-%m-%dT%H:%M:%S%.6fZ"),
                now.format("%Y-%m-%dT%H:%M:%S%.6fZ")
            )));
        }
        // Recovery to a time stops at the first commit after it, and fails
        // when the archive holds none ("recovery ended before configured
        // recovery target was reached"), as on a quiet cluster. A transaction
        // with a transaction id, committed now (after `to`), is that commit;
        // then its segment is switched and archived.
        within(
            "committing a marker transaction after the target",
            client.batch_execute("BEGIN; SELECT pg_current_xact_id(); COMMIT"),
        )
        .await?;
        let row = within(
            "reading the primary's WAL position",
            client.query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[]),
        )
        .await?;
        wait_archived(&client, &row.get::<_, String>(0)).await?;
        drop(client);
        Ok(())
    }

    /// Stops and removes a scratch instance left running (`restore --keep`).
    pub async fn discard(&self, name: &str) -> Result<(), Error> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(Error::Backup(format!(
                "scratch instance name {:?}: letters, digits and '-' only (as printed by `railyard backup restore --keep`)",
                name.chars().take(40).collect::<String>()
            )));
        }
        let dir = self.dir.join("scratch").join(name);
        if !dir.is_dir() {
            return Err(Error::Backup(format!(
                "no scratch instance {name} in {}",
                self.dir.join("scratch").display()
            )));
        }
        Scratch {
            name: name.to_owned(),
            data: dir.join("data"),
            dir,
            port: 0,
            password: self.cluster.password().clone(),
            cluster_pg: self.cluster.dir().join("pg"),
            run_as: self.run_as.clone(),
            bins: self.bins.clone(),
            live: true,
        }
        .remove()
        .await
    }

    pub(super) async fn scratch(&self, kind: &str) -> Result<Scratch, Error> {
        let name = format!("{kind}-{:08x}", rand::random::<u32>());
        let dir = self.dir.join("scratch").join(&name);
        let data = dir.join("data");
        let run_as = self.run_as.clone();
        let (d, dd) = (dir.clone(), data.clone());
        blocking(move || {
            for p in [&d, &dd, &d.join("s")] {
                fs::create_dir_all(p)
                    .map_err(|e| Error::io(format!("creating {}", p.display()), e))?;
                run_as.own(p)?;
            }
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dd, fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(format!("chmod {}", dd.display()), e))
        })
        .await?;
        Ok(Scratch {
            name,
            dir,
            data,
            port: 0,
            password: self.cluster.password().clone(),
            cluster_pg: self.cluster.dir().join("pg"),
            run_as: self.run_as.clone(),
            bins: self.bins.clone(),
            live: true,
        })
    }
}

/// The last transaction a restored instance holds, and when it committed
/// (`None` when no commit timestamp says it).
async fn last_committed(scratch: &Scratch) -> Result<Option<(String, DateTime<Utc>)>, Error> {
    let client = scratch.client("postgres").await?;
    let row = client
        .query_one(
            "SELECT xid::text, extract(epoch FROM timestamp)::float8 FROM pg_last_committed_xact()",
            &[],
        )
        .await
        .map_err(|e| Error::Backup(format!("pg_last_committed_xact(): {e}")))?;
    let (mut xid, mut at): (Option<String>, Option<f64>) = (row.get(0), row.get(1));
    if xid.is_none() {
        // Only commits replayed since the start are remembered: when
        // recovery replayed none (the target is before any commit
        // after the backup began), the newest commit timestamp kept
        // in pg_commit_ts (looking back 10,000 transactions) says it.
        let row = client
            .query_opt(
                "WITH n AS (SELECT (pg_snapshot_xmax(pg_current_snapshot())::text::bigint % 4294967296) AS next) \
                 SELECT x::text, extract(epoch FROM pg_xact_commit_timestamp(x::text::xid))::float8 \
                 FROM n, generate_series(n.next - 1, greatest(3, n.next - 10000), -1) x \
                 WHERE pg_xact_commit_timestamp(x::text::xid) IS NOT NULL LIMIT 1",
                &[],
            )
            .await
            .map_err(|e| Error::Backup(format!("reading commit timestamps: {e}")))?;
        if let Some(r) = row {
            (xid, at) = (r.get(0), r.get(1));
        }
    }
    Ok(xid
        .zip(at)
        .and_then(|(x, t)| DateTime::from_timestamp_micros((t * 1e6) as i64).map(|t| (x, t))))
}
