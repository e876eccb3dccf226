//! Archiving one partition (its transaction under ACCESS EXCLUSIVE), the
//! row moves that follow it, and the audit table that records both.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Bool, Text, Timestamptz};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};

use super::partitions::literal;
use super::sql::{Named, bounded, quote};
use super::{ARCHIVE_SCHEMA, AUDIT_TABLE, ArchivedPartition, Retention};
use crate::error::Error;

impl Retention {
    /// Archives one partition in a transaction of its own, which holds
    /// ACCESS EXCLUSIVE on the managed table from its DETACH to its COMMIT:
    /// DDL, an exact count of the detached rows and the audit row, nothing
    /// that scans other tables. The [row moves](Retention::move_rows)
    /// follow in [`Retention::finish_moves`].
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn archive_one(
        &self,
        conn: &mut railyard::conn::Conn,
        table: &str,
        column: &str,
        part: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        app: &str,
    ) -> Result<ArchivedPartition, Error> {
        let bound = self.config.statement_timeout;
        let (t, p) = (quote(table), quote(part));
        let started = Instant::now();
        bounded(bound, conn.batch_execute("BEGIN")).await?;
        let work = async {
            let counted = detach_and_count(conn, bound, &t, &p).await?;
            move_to_archive(conn, bound, &t, &p, &quote(column), from, to).await?;
            // With row moves to make, the row is pending until
            // finish_moves records them.
            bounded(
                bound,
                diesel::sql_query(format!(
                    "INSERT INTO {AUDIT_TABLE} (source_table, partition_name, archived_as, range_from, range_to, \
                       row_count, bytes, rows_moved, application_name, instance, backend_pid, client_addr, moves_done_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, '{{}}'::jsonb, $8, $9, pg_backend_pid(), inet_client_addr()::text, \
                       CASE WHEN $10 THEN NULL ELSE now() END)"
                ))
                .bind::<Text, _>(format!("public.{table}"))
                .bind::<Text, _>(part)
                .bind::<Text, _>(format!("{ARCHIVE_SCHEMA}.{part}"))
                .bind::<Timestamptz, _>(from)
                .bind::<Timestamptz, _>(to)
                .bind::<BigInt, _>(counted.n)
                .bind::<BigInt, _>(counted.bytes)
                .bind::<Text, _>(app)
                .bind::<Text, _>(instance())
                .bind::<Bool, _>(!self.moves.is_empty())
                .execute(&mut **conn),
            )
            .await?;
            Ok::<_, Error>(counted)
        };
        match work.await {
            Ok(counted) => {
                bounded(bound, conn.batch_execute("COMMIT")).await?;
                Ok(ArchivedPartition {
                    table: table.to_owned(),
                    partition: part.to_owned(),
                    range_from: from,
                    range_to: to,
                    rows: counted.n,
                    bytes: counted.bytes,
                    moved: Vec::new(),
                    exclusive: started.elapsed(),
                    moves_took: Duration::ZERO,
                })
            }
            Err(e) => {
                let _ = tokio::time::timeout(bound, conn.batch_execute("ROLLBACK")).await;
                Err(Error::Retention(format!(
                    "archiving {part} of {table} failed and was rolled back (the next run tries again): {e}"
                )))
            }
        }
    }

    /// Makes the [row moves](Retention::move_rows) of every archived
    /// partition whose audit row says they are pending (`moves_done_at`
    /// unset), oldest first, one transaction per partition that also marks
    /// its audit row done: a run that died between archiving a partition
    /// and moving its rows is finished by the next. No ACCESS EXCLUSIVE
    /// lock is taken: the moves are DML, each statement bounded by the
    /// `statement_timeout`. Returns each partition's moves and their time.
    pub(super) async fn finish_moves(
        &self,
        conn: &mut railyard::conn::Conn,
    ) -> Result<Vec<(String, Vec<(String, i64)>, Duration)>, Error> {
        let bound = self.config.statement_timeout;
        let tables: Vec<String> = self
            .tables
            .iter()
            .map(|(t, _)| format!("public.{t}"))
            .collect();
        let pending: Vec<Pending> = bounded(
            bound,
            diesel::sql_query(format!(
                "SELECT id, partition_name AS name, range_to AS at FROM {AUDIT_TABLE} \
                 WHERE moves_done_at IS NULL AND source_table = ANY($1) ORDER BY range_to, id"
            ))
            .bind::<diesel::sql_types::Array<Text>, _>(&tables)
            .load(&mut **conn),
        )
        .await?;
        let mut done = Vec::with_capacity(pending.len());
        for row in pending {
            let started = Instant::now();
            bounded(bound, conn.batch_execute("BEGIN")).await?;
            let work = async {
                let mut moved = Vec::new();
                for m in &self.moves {
                    let n = bounded(
                        bound,
                        diesel::sql_query(&m.sql)
                            .bind::<Timestamptz, _>(row.at)
                            .execute(&mut **conn),
                    )
                    .await?;
                    moved.push((m.name.clone(), n as i64));
                }
                let json = serde_json::to_string(
                    &moved
                        .iter()
                        .cloned()
                        .collect::<std::collections::BTreeMap<String, i64>>(),
                )
                .unwrap_or_else(|_| "{}".into());
                bounded(
                    bound,
                    diesel::sql_query(format!(
                        "UPDATE {AUDIT_TABLE} SET rows_moved = rows_moved || $1::jsonb, moves_done_at = now() WHERE id = $2"
                    ))
                    .bind::<Text, _>(json)
                    .bind::<BigInt, _>(row.id)
                    .execute(&mut **conn),
                )
                .await?;
                Ok::<_, Error>(moved)
            };
            match work.await {
                Ok(moved) => {
                    bounded(bound, conn.batch_execute("COMMIT")).await?;
                    tracing::info!(partition = %row.name, moved = ?moved, "retention: rows moved after their partition");
                    done.push((row.name, moved, started.elapsed()));
                }
                Err(e) => {
                    let _ = tokio::time::timeout(bound, conn.batch_execute("ROLLBACK")).await;
                    return Err(Error::Retention(format!(
                        "moving the rows that follow archived partition {} failed and was rolled back (the partition stays archived; the next run moves them): {e}",
                        row.name
                    )));
                }
            }
        }
        Ok(done)
    }
}

/// Detaches partition `p` from table `t` and counts its rows and bytes.
async fn detach_and_count(
    conn: &mut railyard::conn::Conn,
    bound: Duration,
    t: &str,
    p: &str,
) -> Result<Counted, Error> {
    bounded(
        bound,
        conn.batch_execute(&format!(
            "ALTER TABLE public.{t} DETACH PARTITION public.{p}"
        )),
    )
    .await?;
    // Detached: no row can arrive or leave until COMMIT, so the
    // count is the partition's exact content.
    bounded(
        bound,
        diesel::sql_query(format!(
            "SELECT count(*)::bigint AS n, pg_total_relation_size('public.{p}')::bigint AS bytes FROM public.{p}"
        ))
        .get_result(&mut **conn),
    )
    .await
}

/// Drops the detached partition `p`'s foreign keys, moves it to the archive
/// schema and attaches it to the archive's twin of table `t` (partitioned by
/// column `c`).
async fn move_to_archive(
    conn: &mut railyard::conn::Conn,
    bound: Duration,
    t: &str,
    p: &str,
    c: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<(), Error> {
    let a = quote(ARCHIVE_SCHEMA);
    let fks: Vec<Named> = bounded(
        bound,
        diesel::sql_query(
            "SELECT conname::text AS name FROM pg_constraint \
             WHERE conrelid = $1::regclass AND contype = 'f'",
        )
        .bind::<Text, _>(format!("public.{p}"))
        .load(&mut **conn),
    )
    .await?;
    let mut ddl = String::new();
    for fk in fks {
        ddl.push_str(&format!(
            "ALTER TABLE public.{p} DROP CONSTRAINT {};",
            quote(&fk.name)
        ));
    }
    ddl.push_str(&format!(
        "CREATE SCHEMA IF NOT EXISTS {a};\
         CREATE TABLE IF NOT EXISTS {a}.{t} (LIKE public.{t}) PARTITION BY RANGE ({c});\
         ALTER TABLE public.{p} SET SCHEMA {a};\
         ALTER TABLE {a}.{t} ATTACH PARTITION {a}.{p} FOR VALUES FROM ('{}') TO ('{}');",
        literal(from),
        literal(to)
    ));
    bounded(bound, conn.batch_execute(&ddl)).await?;
    Ok(())
}

fn instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into());
    format!("{host}:{}", std::process::id())
}

pub(super) fn audit_ddl() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {AUDIT_TABLE} (\
           id BIGSERIAL PRIMARY KEY,\
           archived_at TIMESTAMPTZ NOT NULL DEFAULT now(),\
           source_table TEXT NOT NULL,\
           partition_name TEXT NOT NULL,\
           archived_as TEXT NOT NULL,\
           range_from TIMESTAMPTZ NOT NULL,\
           range_to TIMESTAMPTZ NOT NULL,\
           row_count BIGINT NOT NULL,\
           bytes BIGINT NOT NULL,\
           rows_moved JSONB NOT NULL DEFAULT '{{}}',\
           application_name TEXT NOT NULL,\
           instance TEXT NOT NULL,\
           backend_pid INT NOT NULL,\
           client_addr TEXT,\
           moves_done_at TIMESTAMPTZ,\
           UNIQUE (source_table, partition_name));\
         ALTER TABLE {AUDIT_TABLE} ADD COLUMN IF NOT EXISTS moves_done_at TIMESTAMPTZ DEFAULT now();\
         ALTER TABLE {AUDIT_TABLE} ALTER COLUMN moves_done_at DROP DEFAULT;"
    )
}

#[derive(QueryableByName)]
pub(super) struct Counted {
    #[diesel(sql_type = BigInt)]
    pub(super) n: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) bytes: i64,
}

#[derive(QueryableByName)]
struct Pending {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Timestamptz)]
    at: DateTime<Utc>,
}
