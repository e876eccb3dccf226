//! One run: the lock, the partitions made, the partitions archived (or, in a
//! dry run, listed), the sizes before and after; and what it reports.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::QueryableByName;
use diesel::sql_types::{Text, Timestamptz};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use railyard::database::Database;
use railyard::error::ConfigError;
use railyard::observe::StorageFigures;

use super::archive::{Counted, audit_ddl};
use super::partitions::partitions;
use super::sql::{bounded, quote, try_lock, unlock};
use super::{Retention, record_storage};
use crate::error::Error;

impl Retention {
    /// Makes the partitions a run would make (ahead, and for rows in the
    /// default partition), under the lock, without archiving; `None` when
    /// another instance holds the lock.
    pub async fn prepare(&self, db: &Database) -> Result<Option<Vec<String>>, Error> {
        let mut conn = self.open(db).await?;
        if let Some(holder) = try_lock(&mut conn, self.config.statement_timeout).await? {
            tracing::info!(
                holder,
                "retention: another instance holds the lock; skipped"
            );
            return Ok(None);
        }
        let made = self.make_partitions(&mut conn).await;
        unlock(&mut conn).await;
        made.map(Some)
    }

    async fn open(&self, db: &Database) -> Result<railyard::conn::Conn, Error> {
        self.config.validate()?;
        refuse_per_transaction(db.config().pooler_mode())?;
        let mut conn = db.dedicated_primary().await?;
        bounded(
            self.config.statement_timeout,
            conn.batch_execute(&format!(
                "SET lock_timeout = {}; SET statement_timeout = {}",
                self.config.lock_timeout.as_millis().max(1),
                self.config.statement_timeout.as_millis().max(1)
            )),
        )
        .await?;
        Ok(conn)
    }

    /// One run (see the module docs): makes partitions ahead, archives those
    /// past the period, measures before and after, and records the figures
    /// on `db`. With `dry_run`, changes nothing and lists what it would
    /// archive. When another instance holds the lock, returns at once with
    /// [`RetentionRun::skipped`] set.
    pub async fn run(&self, db: &Database, dry_run: bool) -> Result<RetentionRun, Error> {
        let started = Instant::now();
        let mut conn = self.open(db).await?;
        let bound = self.config.statement_timeout;
        let before = self.measure_on(&mut conn).await?;
        let cutoff: Cutoff = bounded(
            bound,
            diesel::sql_query(
                "SELECT now() - make_interval(secs => $1::float8) AS at, \
                 current_setting('application_name') AS app",
            )
            .bind::<diesel::sql_types::Double, _>(self.config.period.as_secs_f64())
            .get_result(&mut *conn),
        )
        .await?;
        let mut run = RetentionRun {
            skipped: None,
            dry_run,
            cutoff: cutoff.at,
            created: Vec::new(),
            archived: Vec::new(),
            before: before.clone(),
            after: before,
            took: Duration::ZERO,
        };
        if let Some(holder) = try_lock(&mut conn, bound).await? {
            let why = format!("another instance holds the retention lock (backend pid {holder})");
            tracing::info!(holder, "retention: {why}; skipped");
            run.skipped = Some(why);
            run.took = started.elapsed();
            return Ok(run);
        }
        let result = self.locked_run(&mut conn, &mut run, &cutoff.app).await;
        unlock(&mut conn).await;
        result?;
        let mut after = self.measure_on(&mut conn).await?;
        after.cannot_free = !dry_run && after.over_threshold();
        if after.cannot_free {
            tracing::warn!(
                live = after.live_bytes(),
                threshold = ?after.threshold_bytes,
                "retention: the live history is still over its size threshold after archiving everything past the retention period"
            );
        }
        record_storage(db, after.clone());
        run.after = after;
        run.took = started.elapsed();
        Ok(run)
    }

    async fn locked_run(
        &self,
        conn: &mut railyard::conn::Conn,
        run: &mut RetentionRun,
        app: &str,
    ) -> Result<(), Error> {
        let bound = self.config.statement_timeout;
        if !run.dry_run {
            bounded(bound, conn.batch_execute(&audit_ddl())).await?;
            run.created = self.make_partitions(conn).await?;
            // Row moves a run that died after archiving left undone.
            for (name, moved, _) in self.finish_moves(conn).await? {
                tracing::info!(partition = %name, moved = ?moved, "retention: finished the row moves of an earlier run");
            }
        }
        for (table, column) in &self.tables {
            let parts = partitions(conn, &format!("public.{table}"), bound).await?;
            for p in parts {
                let (Some(from), Some(to)) = (p.range_from, p.range_to) else {
                    continue;
                };
                if to > run.cutoff {
                    continue;
                }
                if run.dry_run {
                    let c: Counted = bounded(
                        bound,
                        diesel::sql_query(format!(
                            "SELECT count(*)::bigint AS n, pg_total_relation_size('public.{0}')::bigint AS bytes FROM public.{0}",
                            quote(&p.name)
                        ))
                        .get_result(&mut **conn),
                    )
                    .await?;
                    run.archived.push(ArchivedPartition {
                        table: table.clone(),
                        partition: p.name.clone(),
                        range_from: from,
                        range_to: to,
                        rows: c.n,
                        bytes: c.bytes,
                        moved: Vec::new(),
                        exclusive: Duration::ZERO,
                        moves_took: Duration::ZERO,
                    });
                    continue;
                }
                let mut a = self
                    .archive_one(conn, table, column, &p.name, from, to, app)
                    .await?;
                tracing::info!(
                    table = %a.table,
                    partition = %a.partition,
                    rows = a.rows,
                    bytes = a.bytes,
                    exclusive_ms = a.exclusive.as_millis() as u64,
                    "retention: archived"
                );
                for (name, moved, took) in self.finish_moves(conn).await? {
                    if name == a.partition {
                        a.moved = moved;
                        a.moves_took = took;
                    }
                }
                run.archived.push(a);
            }
        }
        Ok(())
    }
}

/// A run holds a session advisory lock and sets `lock_timeout` and
/// `statement_timeout` for its session; behind a transaction-mode pooler a
/// session lasts one transaction, so neither would hold. Refused, naming the
/// setting, rather than run without its exclusion.
fn refuse_per_transaction(pooler: railyard::config::Pooler) -> Result<(), Error> {
    if pooler.per_transaction() {
        return Err(Error::from(ConfigError::new(
            "RAILYARD_POOLER (Config::pooler)",
            pooler.as_str(),
            "retention needs a session of its own (a session advisory lock, session timeouts); \
             run it through a direct connection to PostgreSQL or a session-mode pool \
             (RAILYARD_POOLER=none or pgbouncer-session), for example from one instance or `railyard retain` configured that way",
        )));
    }
    Ok(())
}

#[derive(QueryableByName)]
struct Cutoff {
    #[diesel(sql_type = Timestamptz)]
    at: DateTime<Utc>,
    #[diesel(sql_type = Text)]
    app: String,
}

/// A partition a run archived (or, in a dry run, would archive).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ArchivedPartition {
    /// The managed table.
    pub table: String,
    /// The partition's name (the same in the archive schema).
    pub partition: String,
    /// Its lower bound.
    pub range_from: DateTime<Utc>,
    /// Its upper bound (exclusive).
    pub range_to: DateTime<Utc>,
    /// Its rows.
    pub rows: i64,
    /// Its bytes, indexes included.
    pub bytes: i64,
    /// Rows each row move took along.
    pub moved: Vec<(String, i64)>,
    /// How long the transaction that archived it took: from its DETACH to
    /// its COMMIT, the managed table was locked ACCESS EXCLUSIVE.
    pub exclusive: Duration,
    /// How long its row moves took (a transaction of their own, after).
    pub moves_took: Duration,
}

/// What one run did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetentionRun {
    /// Why it did nothing (another instance held the lock).
    pub skipped: Option<String>,
    /// It only listed what it would archive.
    pub dry_run: bool,
    /// Partitions ending at or before this were archived.
    pub cutoff: DateTime<Utc>,
    /// Partitions made.
    pub created: Vec<String>,
    /// Partitions archived, oldest first.
    pub archived: Vec<ArchivedPartition>,
    /// The sizes before.
    pub before: StorageFigures,
    /// The sizes after.
    pub after: StorageFigures,
    /// How long it took.
    pub took: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transaction_mode_pooler_is_refused() {
        use railyard::config::Pooler;
        let e = refuse_per_transaction(Pooler::PgBouncerTransaction).unwrap_err();
        let Error::Core(railyard::Error::Config(c)) = &e else {
            panic!("{e:?}")
        };
        assert!(c.field.contains("RAILYARD_POOLER"), "{e}");
        assert!(refuse_per_transaction(Pooler::PgBouncerSession).is_ok());
        assert!(refuse_per_transaction(Pooler::None).is_ok());
    }
}
