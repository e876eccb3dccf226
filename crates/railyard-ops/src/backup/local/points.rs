//! The counted restore point taken after each backup: the rows of every
//! table at a restore point, saved beside the repository, and the wait for
//! its WAL segment to be archived.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use railyard_local::write_file;

use super::{CountedPoint, LocalBackups, QUERY_DEADLINE, blocking, within};
use crate::error::Error;

/// How long the archiver may take to archive a restore point's segment.
const ARCHIVE_DEADLINE: Duration = Duration::from_secs(60);

impl LocalBackups {
    pub(super) async fn counted_point(&self, label: &str) -> Result<CountedPoint, Error> {
        let w = |what: &str| format!("counted restore point: {what}");
        let mut client = self.source_client(&self.database).await?;
        let name = format!("railyard-{label}");
        let tx = within(&w("BEGIN"), client.transaction()).await?;
        // The server ends a count that runs too long (and its SHARE locks
        // with it); the client's deadline is a little later.
        within(
            &w("SET lock_timeout, statement_timeout"),
            tx.batch_execute(&format!(
                "SET LOCAL lock_timeout = '10s'; SET LOCAL statement_timeout = '{}ms'",
                QUERY_DEADLINE.as_millis() - 5000
            )),
        )
        .await?;
        let tables: Vec<String> = within(&w("listing tables"), tx.query(TABLES_SQL, &[]))
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut counts = BTreeMap::new();
        if !tables.is_empty() {
            within(
                &w("locking the tables (SHARE)"),
                tx.batch_execute(&format!("LOCK TABLE {} IN SHARE MODE", tables.join(", "))),
            )
            .await?;
            for t in &tables {
                let row = within(
                    &w(&format!("counting {t}")),
                    tx.query_one(&format!("SELECT count(*) FROM {t}"), &[]),
                )
                .await?;
                counts.insert(t.clone(), row.get::<_, i64>(0));
            }
        }
        let row = within(
            &w("pg_create_restore_point"),
            tx.query_one(
                "WITH p AS (SELECT pg_create_restore_point($1) AS lsn) SELECT lsn::text, pg_walfile_name(lsn) FROM p",
                &[&name],
            ),
        )
        .await?;
        let lsn: String = row.get(0);
        let segment: String = row.get(1);
        within(&w("COMMIT"), tx.commit()).await?;
        wait_archived(&client, &segment).await?;
        let point = CountedPoint {
            label: label.to_owned(),
            restore_point: name,
            lsn,
            database: self.database.clone(),
            taken_at: Utc::now(),
            counts,
        };
        let path = self.dir.join("points").join(format!("{label}.json"));
        let body = serde_json::to_vec_pretty(&point)
            .map_err(|e| Error::Backup(format!("encoding the restore point: {e}")))?;
        let run_as = self.run_as.clone();
        blocking(move || write_file(&path, &body, 0o644, Some(&run_as)).map_err(Error::from))
            .await?;
        Ok(point)
    }

    pub(super) async fn point_of(&self, label: &str) -> Option<CountedPoint> {
        let text = tokio::fs::read_to_string(self.dir.join("points").join(format!("{label}.json")))
            .await
            .ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// Every table of the database outside the system schemas, quoted for SQL.
pub(super) const TABLES_SQL: &str = "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
     JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
       AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%' \
     ORDER BY 1";

pub(super) async fn wait_archived(
    client: &tokio_postgres::Client,
    segment: &str,
) -> Result<(), Error> {
    let what = "waiting for the archiver";
    within(what, client.batch_execute("SELECT pg_switch_wal()")).await?;
    let deadline = Instant::now() + ARCHIVE_DEADLINE;
    loop {
        let row = within(
            what,
            client.query_one(
                "SELECT coalesce(last_archived_wal, ''), coalesce(last_failed_wal, ''), failed_count FROM pg_stat_archiver",
                &[],
            ),
        )
        .await?;
        let archived: String = row.get(0);
        // Segment names of one timeline sort in WAL order.
        if archived.len() == segment.len() && archived.as_str() >= segment {
            return Ok(());
        }
        if Instant::now() > deadline {
            let failed: String = row.get(1);
            return Err(Error::Backup(format!(
                "WAL segment {segment} was not archived within {ARCHIVE_DEADLINE:?} (last archived {archived:?}, last failed {failed:?}, {} failures); see the primary's log",
                row.get::<_, i64>(2)
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
