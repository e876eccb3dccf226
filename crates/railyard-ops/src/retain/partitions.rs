//! The monthly partitions: those a run makes (ahead, and for rows waiting in
//! the default partition), and the partitions of a table with their bounds.

use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use diesel::QueryableByName;
use diesel::sql_types::{Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

use super::sql::{Named, bounded, quote};
use super::{ARCHIVE_SCHEMA, Retention};
use crate::error::Error;

impl Retention {
    /// Makes the missing monthly partitions: this month and `premake` ahead,
    /// and the months of rows waiting in the default partition.
    pub(super) async fn make_partitions(
        &self,
        conn: &mut railyard::conn::Conn,
    ) -> Result<Vec<String>, Error> {
        let bound = self.config.statement_timeout;
        let mut made = Vec::new();
        let now = Utc::now();
        for (table, column) in &self.tables {
            let parent = format!("public.{table}");
            let existing = partitions(conn, &parent, bound).await?;
            let archived = partitions(conn, &format!("{ARCHIVE_SCHEMA}.{table}"), bound).await?;
            let default = default_partition(conn, &parent, bound).await?;
            let mut months: Vec<DateTime<Utc>> = (0..=self.config.premake)
                .map(|k| month_start(now, k as i32))
                .collect();
            if let Some(d) = &default {
                let waiting: Vec<At> = bounded(
                    bound,
                    diesel::sql_query(format!(
                        "SELECT DISTINCT date_trunc('month', {c} AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS at FROM public.{d}",
                        c = quote(column),
                        d = quote(&d.name)
                    ))
                    .load(&mut **conn),
                )
                .await?;
                months.extend(waiting.into_iter().map(|w| w.at));
            }
            months.sort();
            months.dedup();
            for m in months {
                let covered = |ps: &[Part]| {
                    ps.iter().any(|p| {
                        matches!((p.range_from, p.range_to), (Some(f), Some(t)) if f <= m && m < t)
                    })
                };
                if covered(&existing) {
                    continue;
                }
                let name = format!("{table}_p{:04}_{:02}", m.year(), m.month());
                if covered(&archived) || archived.iter().any(|p| p.name == name) {
                    tracing::warn!(
                        partition = %name,
                        "retention: rows for a month already archived wait in the default partition; move them by hand"
                    );
                    continue;
                }
                let ddl = month_ddl(table, column, &name, m, default.as_ref());
                if let Err(e) = bounded(bound, conn.batch_execute(&ddl)).await {
                    let _ = tokio::time::timeout(bound, conn.batch_execute("ROLLBACK")).await;
                    return Err(Error::Retention(format!(
                        "making partition {name} of {table} failed and was rolled back (the next run tries again): {e}"
                    )));
                }
                tracing::info!(partition = %name, "retention: partition made");
                made.push(name);
            }
        }
        Ok(made)
    }
}

/// The first instant (UTC) of the month `k` months after `t`'s.
/// The default partition of `parent`, if it has one.
async fn default_partition(
    conn: &mut AsyncPgConnection,
    parent: &str,
    bound: Duration,
) -> Result<Option<Named>, Error> {
    bounded(
        bound,
        diesel::sql_query(
            "SELECT c.relname::text AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = to_regclass($1) AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT'",
        )
        .bind::<Text, _>(parent)
        .get_result(conn),
    )
    .await
    .map(Some)
    .or_else(|e| match e {
        Error::Core(railyard::Error::Query(diesel::result::Error::NotFound)) => Ok(None),
        e => Err(e),
    })
}

/// The DDL that makes partition `name` of `table` for the month starting at
/// `m`, moving the month's rows out of the `default` partition when there is
/// one.
fn month_ddl(
    table: &str,
    column: &str,
    name: &str,
    m: DateTime<Utc>,
    default: Option<&Named>,
) -> String {
    let next = month_start(m, 1);
    let (t, p, c) = (quote(table), quote(name), quote(column));
    let (f, u) = (literal(m), literal(next));
    match default {
        // Rows of the month may wait in the default partition:
        // move them into a table of their own, then attach it.
        Some(d) => format!(
            "BEGIN;\
             CREATE TABLE public.{p} (LIKE public.{t} INCLUDING DEFAULTS INCLUDING CONSTRAINTS);\
             WITH moved AS (DELETE FROM public.{d} WHERE {c} >= '{f}' AND {c} < '{u}' RETURNING *) \
               INSERT INTO public.{p} SELECT * FROM moved;\
             ALTER TABLE public.{t} ATTACH PARTITION public.{p} FOR VALUES FROM ('{f}') TO ('{u}');\
             COMMIT;",
            d = quote(&d.name)
        ),
        None => format!(
            "CREATE TABLE public.{p} PARTITION OF public.{t} FOR VALUES FROM ('{f}') TO ('{u}')"
        ),
    }
}

pub(super) fn month_start(t: DateTime<Utc>, k: i32) -> DateTime<Utc> {
    let total = t.year() * 12 + t.month0() as i32 + k;
    Utc.with_ymd_and_hms(
        total.div_euclid(12),
        total.rem_euclid(12) as u32 + 1,
        1,
        0,
        0,
        0,
    )
    .single()
    .expect("the first of a month at midnight UTC exists")
}

pub(super) fn literal(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

pub(super) async fn partitions(
    conn: &mut AsyncPgConnection,
    parent: &str,
    bound: Duration,
) -> Result<Vec<Part>, Error> {
    bounded(
        bound,
        diesel::sql_query(
            "SELECT c.relname::text AS name, \
               (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\) TO \\(''([^'']+)''\\)'))[1]::timestamptz AS range_from, \
               (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']+)''\\) TO \\(''([^'']+)''\\)'))[2]::timestamptz AS range_to \
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = to_regclass($1) AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT' \
             ORDER BY 2, 1",
        )
        .bind::<Text, _>(parent)
        .load(conn),
    )
    .await
}

#[derive(QueryableByName)]
struct At {
    #[diesel(sql_type = Timestamptz)]
    at: DateTime<Utc>,
}

#[derive(QueryableByName)]
pub(super) struct Part {
    #[diesel(sql_type = Text)]
    pub(super) name: String,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub(super) range_from: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub(super) range_to: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months() {
        let t = Utc.with_ymd_and_hms(2026, 11, 24, 3, 0, 0).unwrap();
        assert_eq!(literal(month_start(t, 0)), "2026-11-01 00:00:00.000000+00");
        assert_eq!(literal(month_start(t, 2)), "2027-01-01 00:00:00.000000+00");
        assert_eq!(
            literal(month_start(t, -11)),
            "2025-12-01 00:00:00.000000+00"
        );
    }
}
