//! The statements the advisor examines: read from `pg_stat_statements` and
//! [`StatementStats`], merged by identity, filtered to the application's, and
//! made preparable; and the shapes' anti-patterns.

use std::collections::HashMap;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Double, Text};
use diesel_async::RunQueryDsl;
use railyard::conn::Conn;
use railyard::observe::{StatementStats, statement_shape};

use super::MAX_STATEMENTS;
use super::server::bounded;
use crate::error::Error;

/// One statement to examine.
#[derive(Debug, Clone)]
pub(super) struct Statement {
    /// Text that can be prepared (`$n` for every unknown).
    pub(super) sql: String,
    /// What a person sees: constants replaced.
    pub(super) shape: String,
    pub(super) calls: u64,
    pub(super) total_ms: f64,
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
pub(super) fn merge(all: Vec<Statement>) -> Vec<Statement> {
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
pub(super) fn selects_star(shape: &str) -> bool {
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

pub(super) fn has_word(shape: &str, word: &str) -> bool {
    shape
        .to_ascii_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .any(|w| w == word)
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

pub(super) async fn from_pg_stat_statements(
    conn: &mut Conn,
    schema: &str,
) -> Result<Vec<Statement>, Error> {
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

pub(super) fn from_stats(stats: &StatementStats) -> Vec<Statement> {
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
