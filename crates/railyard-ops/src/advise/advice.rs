//! What the advisor reports: [`Advice`], its [`IndexAdvice`] (each with the
//! statements it [helps](Helped)), the [`Skipped`] statements and the
//! [`PatternFlag`]s.

use serde::Serialize;

use super::{MAX_SKIPPED, RedundantIndex, SeqScanTable, UnusedIndex, migration, report};
use crate::error::Error;
use railyard::observe::statement_shape;

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
    pub(super) fn skip(&mut self, statement: &str, reason: String) {
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

    pub(super) fn weight(&self) -> f64 {
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

pub(super) fn add(
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
