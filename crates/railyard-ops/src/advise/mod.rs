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

mod catalog;
mod migration;
mod plan;
mod report;

use std::collections::HashMap;
use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Double, Nullable, Text};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use serde::Serialize;

pub use catalog::{RedundantIndex, SeqScanTable, UnusedIndex};

use crate::error::Error;
use railyard::conn::Conn;
use railyard::database::Database;
use railyard::observe::{StatementStats, statement_shape};

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

        // The catalog, with the replicas' scans added.
        let mut indexes: Vec<catalog::IndexRow> = load(&mut conn, catalog::INDEXES).await?;
        let mut tables: Vec<catalog::TableRow> = load(&mut conn, catalog::TABLES).await?;
        advice.stats_since = stats_since(&mut conn).await?;
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

        // The statements.
        let mut sources = Vec::new();
        match &statements_ext {
            Some(schema) => {
                advice.sources.push("pg_stat_statements".to_owned());
                sources.extend(from_pg_stat_statements(&mut conn, schema).await?);
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
        let sources = merge(sources);

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
                        let mut best: Option<(f64, Vec<String>)> = None;
                        for c in candidates {
                            let after =
                                hypothetical_cost(&mut conn, schema, &w.relation, &c, &s.sql)
                                    .await?;
                            if let Some(after) = after
                                && best.as_ref().is_none_or(|(b, _)| after < *b)
                            {
                                best = Some((after, c));
                            }
                        }
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

/// What the advisor found. `Display` prints it for a person; it serialises
/// to JSON.
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct Advice {
    /// Whether candidates were proved with hypopg.
    pub verified: bool,
    /// Where the statements came from (`pg_stat_statements`, `StatementStats`).
    pub sources: Vec<String>,
    /// Statements explained.
    pub statements_examined: usize,
    /// Indexes to create, most valuable first.
    pub indexes: Vec<IndexAdvice>,
    /// Indexes never scanned since the statistics were reset.
    pub unused: Vec<UnusedIndex>,
    /// Duplicate and prefix-redundant indexes.
    pub redundant: Vec<RedundantIndex>,
    /// Tables read mostly by sequential scans.
    pub seq_scans: Vec<SeqScanTable>,
    /// `SELECT *` on wide tables, `OFFSET` over large inputs.
    pub patterns: Vec<PatternFlag>,
    /// Statements that could not be explained, with why (at most 50).
    pub skipped: Vec<Skipped>,
    /// When the server's statistics were last reset, when it says.
    pub stats_since: Option<String>,
    /// What limited the advice (a missing extension, a silent replica).
    pub notes: Vec<String>,
}

impl Advice {
    fn skip(&mut self, statement: &str, reason: String) {
        if self.skipped.len() < MAX_SKIPPED {
            self.skipped.push(Skipped {
                statement: statement.to_owned(),
                reason: statement_shape(&reason),
            });
        }
    }

    /// The advice as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// Writes the verified index advice as diesel migrations under `dir`
    /// (the migrations directory): one migration per index, because
    /// `CREATE INDEX CONCURRENTLY` must run alone and outside a transaction
    /// (`run_in_transaction = false` in each `metadata.toml`). `name` is the
    /// migrations' name (lowercase letters, digits and `_`). Returns the
    /// directories written; refuses when there is nothing verified to write.
    ///
    /// ```no_run
    /// # fn demo(advice: railyard_ops::advise::Advice) -> Result<(), railyard_ops::Error> {
    /// let written = advice.write_migrations(std::path::Path::new("migrations"), "add_advised_indexes")?;
    /// # Ok(()) }
    /// ```
    pub fn write_migrations(
        &self,
        dir: &std::path::Path,
        name: &str,
    ) -> Result<Vec<std::path::PathBuf>, Error> {
        migration::write(self, dir, name)
    }
}

/// One index to create, with the statements it helps.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct IndexAdvice {
    /// The table.
    pub table: String,
    /// Its key columns, in order.
    pub columns: Vec<String>,
    /// The index's name.
    pub name: String,
    /// `CREATE INDEX CONCURRENTLY IF NOT EXISTS …;`
    pub create: String,
    /// `DROP INDEX CONCURRENTLY IF EXISTS …;`
    pub drop: String,
    /// Proved with a hypothetical index.
    pub verified: bool,
    /// The statements it helps.
    pub helps: Vec<Helped>,
}

impl IndexAdvice {
    /// The best cost factor among the statements it helps (`None` unverified).
    pub fn factor(&self) -> Option<f64> {
        self.helps
            .iter()
            .filter_map(|h| {
                h.cost_after
                    .map(|a| h.cost_before / a.max(f64::MIN_POSITIVE))
            })
            .max_by(f64::total_cmp)
    }

    fn weight(&self) -> f64 {
        self.helps
            .iter()
            .map(|h| {
                h.total_ms.max(1.0) * (1.0 - h.cost_after.unwrap_or(0.0) / h.cost_before.max(1e-9))
            })
            .sum()
    }
}

/// A statement an index helps, with the planner's cost estimates.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Helped {
    /// Its shape (constants replaced).
    pub statement: String,
    /// Executions counted.
    pub calls: u64,
    /// Their total time, ms.
    pub total_ms: f64,
    /// Estimated cost of its generic plan now.
    pub cost_before: f64,
    /// With the index (`None` when unverified).
    pub cost_after: Option<f64>,
}

/// A statement that could not be explained.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Skipped {
    /// Its shape.
    pub statement: String,
    /// Why (the server's message, constants replaced).
    pub reason: String,
}

/// A statement written in a way that costs more than it needs to.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct PatternFlag {
    /// Its shape.
    pub statement: String,
    /// What was seen.
    pub pattern: Pattern,
}

/// The anti-patterns the advisor flags.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Pattern {
    /// `SELECT *` from a table this wide: every column is read, sent and
    /// decoded, and the statement breaks or silently changes when one is added.
    SelectStar {
        /// The table.
        table: String,
        /// Its columns.
        columns: usize,
    },
    /// `OFFSET` paging over an input of about this many rows: a deep page
    /// reads and discards every row before it; page by key instead
    /// (`WHERE (k) > (last) ORDER BY k LIMIT n`).
    DeepOffset {
        /// The rows the plan expects under the `LIMIT`.
        rows: f64,
    },
}

/// One statement to examine.
#[derive(Debug, Clone)]
struct Statement {
    /// Text that can be prepared (`$n` for every unknown).
    sql: String,
    /// What a person sees: constants replaced.
    shape: String,
    calls: u64,
    total_ms: f64,
}

/// The identity of a statement across sources: its shape with every
/// placeholder and constant the same.
fn identity(shape: &str) -> String {
    let mut out = String::with_capacity(shape.len());
    let b = shape.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            out.push('?');
            i += 1;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
        } else {
            let ch = shape[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out.to_ascii_lowercase()
}

/// Statements from both sources, one entry per identity (figures summed),
/// costliest first, at most [`MAX_STATEMENTS`].
fn merge(all: Vec<Statement>) -> Vec<Statement> {
    let mut by: HashMap<String, Statement> = HashMap::new();
    for s in all {
        by.entry(identity(&s.shape))
            .and_modify(|e| {
                e.calls = e.calls.max(s.calls);
                e.total_ms = e.total_ms.max(s.total_ms);
            })
            .or_insert(s);
    }
    let mut v: Vec<Statement> = by.into_values().collect();
    v.sort_by(|a, b| {
        b.total_ms
            .total_cmp(&a.total_ms)
            .then(a.shape.cmp(&b.shape))
    });
    v.truncate(MAX_STATEMENTS);
    v
}

/// Whether a statement is one the advisor explains: a query or data change
/// on the application's tables.
fn examinable(shape: &str) -> bool {
    // `(SELECT …) UNION ALL (SELECT …)` starts with a parenthesis.
    let lower = shape
        .trim_start_matches(|c: char| c == '(' || c.is_whitespace())
        .to_ascii_lowercase();
    let kind = lower
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("");
    /// Statements on the catalog and the crate's own bookkeeping.
    const NOT_OURS: [&str; 9] = [
        "pg_catalog",
        "pg_stat",
        "hypopg",
        "information_schema",
        "railyard_",
        "__diesel",
        "pg_current_wal",
        "pg_last_wal",
        "pg_is_in_recovery",
    ];
    // INSERT … VALUES has no plan worth indexing.
    let planned = kind != "insert" || lower.contains("select");
    matches!(kind, "select" | "with" | "update" | "delete" | "insert")
        && planned
        && !shape.ends_with(" …")
        && !NOT_OURS.iter().any(|n| lower.contains(n))
}

/// A statement shape made preparable: each `?` (a replaced constant) and
/// each collapsed `IN (...)` / `ARRAY[...]` becomes a fresh `$n`.
fn preparable(shape: &str) -> String {
    let mut next = max_placeholder(shape) + 1;
    let mut out = String::with_capacity(shape.len() + 8);
    let mut rest = shape;
    let mut in_str = false;
    while let Some(ch) = rest.chars().next() {
        if ch == '\'' {
            in_str = !in_str;
        }
        if !in_str {
            if let Some(r) = rest.strip_prefix("(...)") {
                out.push_str(&format!("(${next})"));
                next += 1;
                rest = r;
                continue;
            }
            if let Some(r) = rest.strip_prefix("[...]") {
                out.push_str(&format!("[${next}]"));
                next += 1;
                rest = r;
                continue;
            }
            if ch == '?' {
                out.push_str(&format!("${next}"));
                next += 1;
                rest = &rest[1..];
                continue;
            }
        }
        out.push(ch);
        rest = &rest[ch.len_utf8()..];
    }
    out
}

fn max_placeholder(sql: &str) -> usize {
    let b = sql.as_bytes();
    let mut max = 0;
    for (i, _) in sql.match_indices('$') {
        let digits: String = b[i + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .map(|c| *c as char)
            .collect();
        if let Ok(n) = digits.parse::<usize>() {
            max = max.max(n);
        }
    }
    max
}

/// Whether a shape selects `*` (or `t.*`) rather than named columns.
fn selects_star(shape: &str) -> bool {
    let b = shape.as_bytes();
    let mut in_str = false;
    for (i, &c) in b.iter().enumerate() {
        if c == b'\'' {
            in_str = !in_str;
        }
        if in_str || c != b'*' {
            continue;
        }
        let before = shape[..i].trim_end();
        let after = shape[i + 1..].trim_start().to_ascii_lowercase();
        let lead = before.to_ascii_lowercase();
        let starts = lead.ends_with("select") || lead.ends_with(',') || lead.ends_with('.');
        if starts && (after.starts_with("from") || after.starts_with(',')) {
            return true;
        }
    }
    false
}

fn has_word(shape: &str, word: &str) -> bool {
    shape
        .to_ascii_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .any(|w| w == word)
}

fn add(
    found: &mut Vec<IndexAdvice>,
    table: &str,
    columns: Vec<String>,
    helped: Helped,
    verified: bool,
) {
    if let Some(e) = found
        .iter_mut()
        .find(|e| e.table == table && e.columns == columns)
    {
        if !e.helps.iter().any(|h| h.statement == helped.statement) {
            e.helps.push(helped);
        }
        return;
    }
    let name = report::index_name(table, &columns);
    let on = format!(
        "{} ({})",
        report::ident(table),
        columns
            .iter()
            .map(|c| report::ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    );
    found.push(IndexAdvice {
        table: table.to_owned(),
        create: format!(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS {} ON {on};",
            report::ident(&name)
        ),
        drop: format!(
            "DROP INDEX CONCURRENTLY IF EXISTS {};",
            report::ident(&name)
        ),
        name,
        columns,
        verified,
        helps: vec![helped],
    });
}

// ---- Reading the server ------------------------------------------------------

async fn load<T>(conn: &mut Conn, sql: &'static str) -> Result<Vec<T>, Error>
where
    T: QueryableByName<diesel::pg::Pg> + Send + 'static,
{
    bounded(diesel::sql_query(sql).load::<T>(conn)).await
}

async fn bounded<T>(f: impl Future<Output = diesel::QueryResult<T>>) -> Result<T, Error> {
    match tokio::time::timeout(STEP, f).await {
        Ok(r) => r.map_err(Error::from),
        Err(_) => Err(Error::timeout(STEP, "an advisor step did not finish")),
    }
}

#[derive(QueryableByName)]
struct Ext {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    schema: String,
}

/// The schemas of the extensions the advisor uses, by name.
async fn extensions(conn: &mut Conn) -> Result<HashMap<String, String>, Error> {
    let rows: Vec<Ext> = load(
        conn,
        "SELECT e.extname::text AS name, n.nspname::text AS schema FROM pg_extension e \
         JOIN pg_namespace n ON n.oid = e.extnamespace \
         WHERE e.extname IN ('hypopg', 'pg_stat_statements')",
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(|e| (e.name, report::ident(&e.schema)))
        .collect())
}

#[derive(QueryableByName)]
struct Since {
    #[diesel(sql_type = Nullable<Text>)]
    since: Option<String>,
}

async fn stats_since(conn: &mut Conn) -> Result<Option<String>, Error> {
    let rows: Vec<Since> = load(
        conn,
        "SELECT date_trunc('second', stats_reset)::text AS since FROM pg_stat_database \
         WHERE datname = current_database()",
    )
    .await?;
    Ok(rows.into_iter().next().and_then(|r| r.since))
}

async fn replica_scans(
    db: &Database,
    index: usize,
) -> Result<(Vec<catalog::IndexRow>, Vec<catalog::TableRow>), Error> {
    let mut conn = tokio::time::timeout(STEP, db.replica(index))
        .await
        .map_err(|_| Error::timeout(STEP, "no replica connection"))??;
    let i = load(&mut conn, catalog::INDEXES).await?;
    let t = load(&mut conn, catalog::TABLES).await?;
    Ok((i, t))
}

#[derive(QueryableByName)]
struct StatRow {
    #[diesel(sql_type = Text)]
    query: String,
    #[diesel(sql_type = BigInt)]
    calls: i64,
    #[diesel(sql_type = Double)]
    total_ms: f64,
}

async fn from_pg_stat_statements(conn: &mut Conn, schema: &str) -> Result<Vec<Statement>, Error> {
    let sql = format!(
        "SELECT s.query, s.calls, s.total_exec_time AS total_ms \
         FROM {schema}.pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
         WHERE d.datname = current_database() AND s.toplevel \
           AND s.query ~* '^[\\s(]*(select|with|update|delete|insert)\\M' \
         ORDER BY s.total_exec_time DESC LIMIT {}",
        4 * MAX_STATEMENTS
    );
    let rows: Vec<StatRow> = bounded(diesel::sql_query(sql).load(conn)).await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let shape = statement_shape(&r.query);
            examinable(&shape).then(|| Statement {
                sql: preparable(&shape),
                shape,
                calls: r.calls.max(0) as u64,
                total_ms: r.total_ms,
            })
        })
        .collect())
}

fn from_stats(stats: &StatementStats) -> Vec<Statement> {
    stats
        .snapshot()
        .into_iter()
        .filter(|s| s.sql != StatementStats::OTHER && examinable(&s.sql))
        .map(|s| Statement {
            sql: preparable(&s.sql),
            shape: s.sql,
            calls: s.calls,
            total_ms: s.total.as_secs_f64() * 1000.0,
        })
        .collect()
}

/// Explains a generic plan of `sql`; a statement left prepared by a failure
/// is deallocated.
async fn explain(conn: &mut Conn, sql: &str) -> Result<serde_json::Value, String> {
    let result =
        match tokio::time::timeout(STEP, railyard::observe::explain_generic(conn, sql)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no plan within {STEP:?}")),
        };
    match result {
        Ok(json) => serde_json::from_str(&json).map_err(|e| e.to_string()),
        Err(e) => {
            let _ =
                tokio::time::timeout(STEP, conn.batch_execute("ROLLBACK; DEALLOCATE ALL")).await;
            Err(e)
        }
    }
}

#[derive(QueryableByName)]
struct RelationRow {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Array<Text>)]
    columns: Vec<String>,
    #[diesel(sql_type = Double)]
    rows: f64,
}

/// The columns and row estimates of the relations plans name (bounded).
#[derive(Debug, Default)]
struct Relations {
    columns: HashMap<String, Vec<String>>,
    rows: HashMap<String, f64>,
}

impl Relations {
    async fn learn(&mut self, conn: &mut Conn, names: &[String]) -> Result<(), Error> {
        let new: Vec<&String> = names
            .iter()
            .filter(|n| !self.columns.contains_key(*n))
            .collect();
        if new.is_empty() || self.columns.len() >= MAX_RELATIONS {
            return Ok(());
        }
        let rows: Vec<RelationRow> = bounded(
            diesel::sql_query(
                "SELECT n.name, \
                   ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid \
                         AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum) AS columns, \
                   GREATEST(c.reltuples, coalesce(s.n_live_tup, 0), 0)::float8 AS rows \
                 FROM unnest($1::text[]) n(name) \
                 JOIN pg_class c ON c.oid = to_regclass(quote_ident(n.name)) \
                 LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid",
            )
            .bind::<Array<Text>, _>(new.iter().map(|s| s.as_str()).collect::<Vec<_>>())
            .load(conn),
        )
        .await?;
        for r in rows {
            self.rows.insert(r.name.clone(), r.rows);
            self.columns.insert(r.name, r.columns);
        }
        Ok(())
    }
}

#[derive(QueryableByName)]
struct Created {
    #[diesel(sql_type = Text)]
    #[allow(dead_code)]
    name: String,
}

/// The estimated cost of `sql` with a hypothetical index on `table (columns)`,
/// or `None` when hypopg refused the index or the statement did not explain.
async fn hypothetical_cost(
    conn: &mut Conn,
    schema: &str,
    table: &str,
    columns: &[String],
    sql: &str,
) -> Result<Option<f64>, Error> {
    let ddl = format!(
        "CREATE INDEX ON {} ({})",
        report::ident(table),
        columns
            .iter()
            .map(|c| report::ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let reset = format!("SELECT {schema}.hypopg_reset()");
    bounded(conn.batch_execute(&reset)).await?;
    let created: Result<Vec<Created>, Error> = bounded(
        diesel::sql_query(format!(
            "SELECT indexname::text AS name FROM {schema}.hypopg_create_index($1)"
        ))
        .bind::<Text, _>(&ddl)
        .load(conn),
    )
    .await;
    let cost = match created {
        Ok(_) => explain(conn, sql)
            .await
            .ok()
            .and_then(|p| plan::total_cost(&p)),
        Err(_) => None,
    };
    bounded(conn.batch_execute(&reset)).await?;
    Ok(cost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_become_preparable_with_fresh_placeholders() {
        assert_eq!(
            preparable("SELECT a FROM t WHERE b = $1 AND c = ? AND d IN (...) AND e = '?' LIMIT ?"),
            "SELECT a FROM t WHERE b = $1 AND c = $2 AND d IN ($3) AND e = '?' LIMIT $4"
        );
        assert_eq!(
            preparable("SELECT x = ARRAY[...] FROM t"),
            "SELECT x = ARRAY[$1] FROM t"
        );
        assert_eq!(
            identity("SELECT a FROM t WHERE b = $12"),
            identity("select a from t where b = ?")
        );
    }

    #[test]
    fn statements_are_examined_when_they_touch_application_tables() {
        assert!(examinable("SELECT a FROM t WHERE b = $1"));
        assert!(examinable("WITH x AS (SELECT 1) SELECT * FROM x"));
        assert!(examinable(
            "(SELECT a FROM t WHERE b = $1) UNION ALL (SELECT a FROM u)"
        ));
        assert!(examinable("INSERT INTO t SELECT * FROM u WHERE k = $1"));
        assert!(!examinable("INSERT INTO t (a) VALUES ($1)"));
        assert!(!examinable("SELECT * FROM pg_stat_activity"));
        assert!(!examinable("SELECT a FROM t WHERE b = ? …"));
        assert!(!examinable("BEGIN"));
        assert!(!examinable("SET statement_timeout = ?"));
    }

    #[test]
    fn select_star_and_offset_are_recognised() {
        assert!(selects_star("SELECT * FROM t WHERE a = $1"));
        assert!(selects_star("SELECT t.* FROM t"));
        assert!(selects_star("SELECT a, * FROM t"));
        assert!(!selects_star("SELECT count(*) FROM t"));
        assert!(!selects_star("SELECT a * b FROM t"));
        assert!(has_word(
            "SELECT a FROM t ORDER BY a LIMIT $1 OFFSET $2",
            "offset"
        ));
        assert!(!has_word("SELECT offset_cents FROM t", "offset"));
    }
}
