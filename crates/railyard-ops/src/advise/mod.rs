//! Index advice, proved with hypothetical indexes, and a report on the
//! indexes and scans the database already has.
//!
//! [`Advisor`] reads the statements the application ran (from the crate's
//! own [`StatementStats`], and from `pg_stat_statements` when that extension
//! is installed in the database, which sees every client), explains a
//! generic plan of each (parameters unknown, as `PREPARE` plans them), and
//! looks for what an index would fix: a sequential scan of a large table
//! with filter columns, a sort of a large input by a table's own columns, the
//! scanned side of a hash or merge join. It proposes column lists from those
//! (equality columns first, then one range or the sort columns) and, when
//! the `hypopg` extension is installed, **proves** each: the statement is
//! explained again with the index created hypothetically (in this session
//! only; nothing is built, no lock is taken), and the index is kept only when
//! the estimated cost falls by at least [`Advisor::min_cost_factor`] (2×
//! unless set). Without hypopg the candidates are reported as unverified.
//!
//! Estimated costs are the planner's, not time: the advice says which index
//! the planner would use and how much cheaper it thinks the plan becomes; a
//! test in this crate applies advice and measures the statement's p50.
//!
//! The report also lists indexes never scanned since the statistics were
//! reset (on the primary and on every replica: an index only replicas read
//! is not unused), duplicate and prefix-redundant indexes, tables read mostly
//! by sequential scans, and two anti-patterns: `SELECT *` on wide tables and
//! `OFFSET` paging over large inputs.
//!
//! Nothing in a report carries a value: statements are shown by their shape
//! (constants replaced), and plans are reduced to costs.
//!
//! ```no_run
//! # async fn demo(db: railyard::Database, stats: railyard::StatementStats) -> Result<(), railyard_ops::Error> {
//! let advice = railyard_ops::advise::Advisor::new(&db).statements(&stats).run().await?;
//! print!("{advice}");
//! for index in &advice.indexes {
//!     println!("{}", index.create);
//! }
//! # Ok(()) }
//! ```

mod advice;
mod catalog;
mod migration;
mod plan;
mod report;
mod server;
mod statements;

use std::time::Duration;

pub use advice::{Advice, Helped, IndexAdvice, Pattern, PatternFlag, Skipped};
pub use catalog::{RedundantIndex, SeqScanTable, UnusedIndex};

use crate::error::Error;
use advice::add;
use railyard::conn::Conn;
use railyard::database::Database;
use railyard::observe::StatementStats;
use server::{Relations, explain, extensions, hypothetical_cost, load, replica_scans, stats_since};
use statements::{Statement, from_pg_stat_statements, from_stats, has_word, merge, selects_star};

/// How many statements are examined at most (the costliest first).
pub const MAX_STATEMENTS: usize = 200;
/// How many skipped statements a report lists.
const MAX_SKIPPED: usize = 50;
/// How many relations' columns are remembered during one run.
const MAX_RELATIONS: usize = 1000;
/// The bound on each catalog read and each explain.
const STEP: Duration = Duration::from_secs(10);

/// Runs the index advisor on a [`Database`]. See the [module](self).
#[derive(Debug)]
#[must_use = "an advisor does nothing until `run` is called"]
pub struct Advisor<'a> {
    db: &'a Database,
    stats: Option<StatementStats>,
    min_cost_factor: f64,
    min_rows: f64,
    seq_scan_share: f64,
    min_seq_scans: i64,
    wide_columns: usize,
    large_offset: f64,
}

impl<'a> Advisor<'a> {
    /// An advisor with the defaults: indexes that cut estimated cost 2× or
    /// more, on tables of 10,000 rows or more.
    pub fn new(db: &'a Database) -> Self {
        Advisor {
            db,
            stats: None,
            min_cost_factor: 2.0,
            min_rows: 10_000.0,
            seq_scan_share: 0.5,
            min_seq_scans: 100,
            wide_columns: 12,
            large_offset: 1000.0,
        }
    }

    /// Also examines the statements these statistics recorded (the crate's
    /// own, of this process).
    pub fn statements(mut self, stats: &StatementStats) -> Self {
        self.stats = Some(stats.clone());
        self
    }

    /// Keeps an index only when the statement's estimated cost with it is at
    /// most `1 / factor` of the cost without (default 2.0; at least 1.0).
    pub fn min_cost_factor(mut self, factor: f64) -> Self {
        self.min_cost_factor = if factor.is_finite() {
            factor.max(1.0)
        } else {
            2.0
        };
        self
    }

    /// Tables with fewer estimated rows are not worth an index (default
    /// 10,000): a sequential scan of them is cheap.
    pub fn min_table_rows(mut self, rows: u64) -> Self {
        self.min_rows = rows as f64;
        self
    }

    /// A table is reported as read mostly whole when this share of its scans
    /// or more were sequential (default 0.5), out of at least `min_scans`
    /// (default 100).
    pub fn seq_scan_share(mut self, share: f64, min_scans: u64) -> Self {
        self.seq_scan_share = share.clamp(0.0, 1.0);
        self.min_seq_scans = min_scans.min(i64::MAX as u64) as i64;
        self
    }

    /// `SELECT *` is flagged on tables of at least this many columns
    /// (default 12).
    pub fn wide_columns(mut self, columns: usize) -> Self {
        self.wide_columns = columns;
        self
    }

    /// `OFFSET` paging is flagged when the rows it pages through may number
    /// this many or more (default 1,000).
    pub fn large_offset(mut self, rows: u64) -> Self {
        self.large_offset = rows as f64;
        self
    }

    /// Reads the statistics and the catalog, explains the statements and
    /// proves the candidates; one dedicated connection to the primary (and a
    /// pooled one per replica, for its scan counts).
    pub async fn run(self) -> Result<Advice, Error> {
        let mut conn = self.db.dedicated_primary().await?;
        let mut advice = Advice::default();
        let ext = extensions(&mut conn).await?;
        let hypopg = ext.get("hypopg").cloned();
        let statements_ext = ext.get("pg_stat_statements").cloned();
        advice.verified = hypopg.is_some();
        if hypopg.is_none() {
            advice.notes.push(
                "hypopg is not installed in this database (CREATE EXTENSION hypopg, by a superuser): \
                 index advice is unverified"
                    .to_owned(),
            );
        }

        let indexes = self.read_catalog(&mut conn, &mut advice).await?;
        let sources = self
            .gather_statements(&mut conn, &mut advice, statements_ext.as_deref())
            .await?;

        let mut relations = Relations::default();
        let mut found: Vec<IndexAdvice> = Vec::new();
        for s in &sources {
            advice.statements_examined += 1;
            let plan = match explain(&mut conn, &s.sql).await {
                Ok(p) => p,
                Err(e) => {
                    advice.skip(&s.shape, e);
                    continue;
                }
            };
            let Some(before) = plan::total_cost(&plan) else {
                advice.skip(&s.shape, "the plan has no cost".into());
                continue;
            };
            relations.learn(&mut conn, &plan::relations(&plan)).await?;
            self.patterns(&mut advice, s, &plan, &relations);
            let wants = plan::wants(&plan, &relations.columns, &relations.rows, self.min_rows);
            tracing::debug!(target: "railyard::advise", statement = %s.shape, cost = before, wants = ?wants, "explained");
            for w in wants {
                let candidates: Vec<Vec<String>> = w
                    .candidates()
                    .into_iter()
                    .filter(|c| !catalog::covered(&indexes, &w.relation, c))
                    .collect();
                let Some(first) = <[Vec<String>]>::first(&candidates).cloned() else {
                    continue;
                };
                let helped = |after| Helped {
                    statement: s.shape.clone(),
                    calls: s.calls,
                    total_ms: s.total_ms,
                    cost_before: before,
                    cost_after: after,
                };
                match &hypopg {
                    None => add(&mut found, &w.relation, first, helped(None), false),
                    Some(schema) => {
                        let best =
                            best_candidate(&mut conn, schema, &w.relation, candidates, &s.sql)
                                .await?;
                        if let Some((after, cols)) = best
                            && after * self.min_cost_factor <= before
                        {
                            add(&mut found, &w.relation, cols, helped(Some(after)), true);
                        }
                    }
                }
            }
        }
        found.sort_by(|a, b| b.weight().total_cmp(&a.weight()));
        advice.indexes = found;
        Ok(advice)
    }

    /// The catalog's indexes and tables, with the replicas' scans added:
    /// unused and redundant indexes, tables read mostly by sequential scans.
    async fn read_catalog(
        &self,
        conn: &mut Conn,
        advice: &mut Advice,
    ) -> Result<Vec<catalog::IndexRow>, Error> {
        let mut indexes: Vec<catalog::IndexRow> = load(conn, catalog::INDEXES).await?;
        let mut tables: Vec<catalog::TableRow> = load(conn, catalog::TABLES).await?;
        advice.stats_since = stats_since(conn).await?;
        for i in 0..self.db.replica_count() {
            match replica_scans(self.db, i).await {
                Ok((ri, rt)) => catalog::add_scans(&mut indexes, &mut tables, (&ri, &rt)),
                Err(e) => advice.notes.push(format!(
                    "replica {i} did not answer ({e}): its index and table scans are not counted"
                )),
            }
        }
        advice.unused = catalog::unused(&indexes);
        advice.redundant = catalog::redundant(&indexes);
        advice.seq_scans = catalog::seq_scans(
            &tables,
            self.min_rows,
            self.min_seq_scans,
            self.seq_scan_share,
        );
        Ok(indexes)
    }

    /// The statements to examine: from `pg_stat_statements` (in schema
    /// `statements_ext`, when installed) and this process's statistics,
    /// merged.
    async fn gather_statements(
        &self,
        conn: &mut Conn,
        advice: &mut Advice,
        statements_ext: Option<&str>,
    ) -> Result<Vec<Statement>, Error> {
        let mut sources = Vec::new();
        match statements_ext {
            Some(schema) => {
                advice.sources.push("pg_stat_statements".to_owned());
                sources.extend(from_pg_stat_statements(conn, schema).await?);
            }
            None => advice.notes.push(
                "pg_stat_statements is not installed in this database: only this process's \
                 statements are examined"
                    .to_owned(),
            ),
        }
        if let Some(stats) = &self.stats {
            advice.sources.push("StatementStats".to_owned());
            sources.extend(from_stats(stats));
        }
        Ok(merge(sources))
    }

    fn patterns(
        &self,
        advice: &mut Advice,
        s: &Statement,
        plan: &serde_json::Value,
        rel: &Relations,
    ) {
        if selects_star(&s.shape) {
            for r in plan::relations(plan) {
                let n = rel.columns.get(&r).map_or(0, Vec::len);
                if n >= self.wide_columns {
                    advice.patterns.push(PatternFlag {
                        statement: s.shape.clone(),
                        pattern: Pattern::SelectStar {
                            table: r,
                            columns: n,
                        },
                    });
                }
            }
        }
        if has_word(&s.shape, "offset")
            && let Some(rows) = plan::limit_input_rows(plan)
            && rows >= self.large_offset
        {
            advice.patterns.push(PatternFlag {
                statement: s.shape.clone(),
                pattern: Pattern::DeepOffset { rows },
            });
        }
    }
}

/// Of `candidates` (column lists for an index on `table`), the one that makes
/// `sql` cheapest with a hypothetical index, and that cost.
async fn best_candidate(
    conn: &mut Conn,
    schema: &str,
    table: &str,
    candidates: Vec<Vec<String>>,
    sql: &str,
) -> Result<Option<(f64, Vec<String>)>, Error> {
    let mut best: Option<(f64, Vec<String>)> = None;
    for c in candidates {
        let after = hypothetical_cost(conn, schema, table, &c, sql).await?;
        if let Some(after) = after
            && best.as_ref().is_none_or(|(b, _)| after < *b)
        {
            best = Some((after, c));
        }
    }
    Ok(best)
}
