//! What the catalog says about existing indexes and table scans: unused,
//! duplicate and prefix-redundant indexes, and tables read mostly by
//! sequential scans. The rules are pure functions over rows the advisor
//! reads; the SQL that reads them is here too.

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Bool, Double, Nullable, Text};
use serde::Serialize;

/// One index of the database's user tables, as the advisor reads it.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct IndexRow {
    #[diesel(sql_type = Text)]
    pub(crate) table: String,
    #[diesel(sql_type = Text)]
    pub(crate) index: String,
    #[diesel(sql_type = Text)]
    pub(crate) definition: String,
    /// Column names, in key order (`None` for expression keys).
    #[diesel(sql_type = Array<Nullable<Text>>)]
    pub(crate) columns: Vec<Option<String>>,
    /// Operator classes, in key order.
    #[diesel(sql_type = Text)]
    pub(crate) opclasses: String,
    #[diesel(sql_type = Text)]
    pub(crate) method: String,
    #[diesel(sql_type = Bool)]
    pub(crate) unique: bool,
    #[diesel(sql_type = Bool)]
    pub(crate) primary: bool,
    /// Backs a constraint (unique, exclusion, primary key).
    #[diesel(sql_type = Bool)]
    pub(crate) constraint: bool,
    #[diesel(sql_type = Nullable<Text>)]
    pub(crate) predicate: Option<String>,
    #[diesel(sql_type = Bool)]
    pub(crate) valid: bool,
    #[diesel(sql_type = BigInt)]
    pub(crate) bytes: i64,
    #[diesel(sql_type = BigInt)]
    pub(crate) scans: i64,
}

/// Every index on a user table, with its scans on this server.
pub(crate) const INDEXES: &str = "\
SELECT s.relname::text AS table, s.indexrelname::text AS index,
       pg_get_indexdef(i.indexrelid) AS definition,
       ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, n)
             LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum AND k.attnum > 0
             ORDER BY k.n) AS columns,
       i.indclass::text AS opclasses, am.amname::text AS method,
       i.indisunique AS unique, i.indisprimary AS primary,
       EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid) AS constraint,
       pg_get_expr(i.indpred, i.indrelid) AS predicate, i.indisvalid AS valid,
       pg_relation_size(i.indexrelid) AS bytes, s.idx_scan AS scans
FROM pg_stat_user_indexes s
JOIN pg_index i ON i.indexrelid = s.indexrelid
JOIN pg_class c ON c.oid = i.indexrelid
JOIN pg_am am ON am.oid = c.relam
ORDER BY s.relname, s.indexrelname";

/// One user table's scan counts on one server.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct TableRow {
    #[diesel(sql_type = Text)]
    pub(crate) table: String,
    #[diesel(sql_type = BigInt)]
    pub(crate) seq_scans: i64,
    #[diesel(sql_type = BigInt)]
    pub(crate) idx_scans: i64,
    #[diesel(sql_type = Double)]
    pub(crate) rows: f64,
}

/// Every user table's scans.
pub(crate) const TABLES: &str = "\
SELECT relname::text AS table, coalesce(seq_scan, 0) AS seq_scans,
       coalesce(idx_scan, 0) AS idx_scans, n_live_tup::float8 AS rows
FROM pg_stat_user_tables ORDER BY relname";

/// An index no statement used since the statistics were reset (on the
/// primary or on any replica that answered).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct UnusedIndex {
    /// The table.
    pub table: String,
    /// The index.
    pub index: String,
    /// Its size on disk.
    pub bytes: i64,
    /// `CREATE INDEX …` as the server prints it.
    pub definition: String,
}

/// An index another one makes unnecessary.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct RedundantIndex {
    /// The table.
    pub table: String,
    /// The index that could go.
    pub index: String,
    /// The index that serves its lookups.
    pub covered_by: String,
    /// Same columns, method, operator classes and predicate (otherwise its
    /// columns are a leading prefix of the other's).
    pub duplicate: bool,
    /// Its size on disk.
    pub bytes: i64,
    /// `CREATE INDEX …` as the server prints it.
    pub definition: String,
}

/// A table most of whose scans read it whole.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct SeqScanTable {
    /// The table.
    pub table: String,
    /// Its estimated live rows.
    pub rows: f64,
    /// Sequential scans since the statistics were reset.
    pub seq_scans: i64,
    /// Index scans since then.
    pub idx_scans: i64,
    /// `seq_scans / (seq_scans + idx_scans)`.
    pub share: f64,
}

/// The plain column names of an index's key, or `None` when a key is an
/// expression.
fn plain(i: &IndexRow) -> Option<Vec<&str>> {
    i.columns.iter().map(|c| c.as_deref()).collect()
}

/// Indexes with no scans, excluding those behind constraints (unique,
/// primary key, exclusion), which enforce rules whether read or not.
pub(crate) fn unused(indexes: &[IndexRow]) -> Vec<UnusedIndex> {
    indexes
        .iter()
        .filter(|i| i.scans == 0 && !i.unique && !i.primary && !i.constraint && i.valid)
        .map(|i| UnusedIndex {
            table: i.table.clone(),
            index: i.index.clone(),
            bytes: i.bytes,
            definition: i.definition.clone(),
        })
        .collect()
}

/// Duplicate indexes, and indexes whose columns are a leading prefix of
/// another B-tree index's on the same table with the same operator classes.
/// An index behind a constraint is never the one that could go; of two
/// duplicates, the later by name goes.
pub(crate) fn redundant(indexes: &[IndexRow]) -> Vec<RedundantIndex> {
    let mut out: Vec<RedundantIndex> = Vec::new();
    for a in indexes {
        if a.unique || a.primary || a.constraint || !a.valid {
            continue;
        }
        let Some(cols_a) = plain(a) else { continue };
        let classes_a: Vec<&str> = a.opclasses.split(' ').collect();
        // A duplicate is the stronger finding: look for one first.
        let mut found: Option<(&IndexRow, bool)> = None;
        for b in indexes {
            if std::ptr::eq(a, b) || a.table != b.table || !b.valid || a.method != b.method {
                continue;
            }
            let Some(cols_b) = plain(b) else { continue };
            let classes_b: Vec<&str> = b.opclasses.split(' ').collect();
            let duplicate =
                cols_a == cols_b && classes_a == classes_b && a.predicate == b.predicate;
            let prefix = a.method == "btree"
                && b.predicate.is_none()
                && a.predicate.is_none()
                && cols_a.len() < cols_b.len()
                && cols_b.starts_with(&cols_a)
                && classes_b.starts_with(&classes_a);
            // Of two plain duplicates, keep the one behind a constraint, else
            // the first by name.
            let b_keeps = b.unique || b.primary || b.constraint || b.index < a.index;
            if duplicate && b_keeps {
                found = Some((b, true));
                break;
            }
            if prefix && found.is_none() {
                found = Some((b, false));
            }
        }
        if let Some((b, duplicate)) = found {
            out.push(RedundantIndex {
                table: a.table.clone(),
                index: a.index.clone(),
                covered_by: b.index.clone(),
                duplicate,
                bytes: a.bytes,
                definition: a.definition.clone(),
            });
        }
    }
    out
}

/// Tables of at least `min_rows` rows with at least `min_scans` scans, of
/// which a share of at least `share` were sequential, worst first.
pub(crate) fn seq_scans(
    tables: &[TableRow],
    min_rows: f64,
    min_scans: i64,
    share: f64,
) -> Vec<SeqScanTable> {
    let mut out: Vec<SeqScanTable> = tables
        .iter()
        .filter_map(|t| {
            let all = t.seq_scans + t.idx_scans;
            let s = if all == 0 {
                0.0
            } else {
                t.seq_scans as f64 / all as f64
            };
            (t.rows >= min_rows && t.seq_scans >= min_scans && s >= share).then(|| SeqScanTable {
                table: t.table.clone(),
                rows: t.rows,
                seq_scans: t.seq_scans,
                idx_scans: t.idx_scans,
                share: s,
            })
        })
        .collect();
    out.sort_by(|a, b| b.share.total_cmp(&a.share));
    out
}

/// Adds the scans other servers (replicas) saw to the primary's figures.
pub(crate) fn add_scans(
    indexes: &mut [IndexRow],
    tables: &mut [TableRow],
    other: (&[IndexRow], &[TableRow]),
) {
    for i in indexes.iter_mut() {
        if let Some(o) = other
            .0
            .iter()
            .find(|o| o.table == i.table && o.index == i.index)
        {
            i.scans += o.scans;
        }
    }
    for t in tables.iter_mut() {
        if let Some(o) = other.1.iter().find(|o| o.table == t.table) {
            t.seq_scans += o.seq_scans;
            t.idx_scans += o.idx_scans;
        }
    }
}

/// Whether an index whose key starts with `columns` exists on `table`
/// (a candidate the planner already has).
pub(crate) fn covered(indexes: &[IndexRow], table: &str, columns: &[String]) -> bool {
    indexes.iter().any(|i| {
        i.table == table
            && i.valid
            && i.predicate.is_none()
            && i.method == "btree"
            && plain(i).is_some_and(|c| {
                c.len() >= columns.len() && c.iter().zip(columns).all(|(a, b)| *a == b.as_str())
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(name: &str, cols: &[&str], unique: bool, scans: i64) -> IndexRow {
        IndexRow {
            table: "t".into(),
            index: name.into(),
            definition: format!("CREATE INDEX {name} ON t"),
            columns: cols.iter().map(|c| Some(c.to_string())).collect(),
            opclasses: vec!["3124"; cols.len()].join(" "),
            method: "btree".into(),
            unique,
            primary: false,
            constraint: unique,
            predicate: None,
            valid: true,
            bytes: 8192,
            scans,
        }
    }

    #[test]
    fn duplicates_prefixes_and_unused_indexes_are_found_and_constraints_kept() {
        let all = [
            index("t_pkey", &["id"], true, 10),
            index("t_a_idx", &["a"], false, 5),
            index("t_a_b_idx", &["a", "b"], false, 5),
            index("t_b_idx", &["b"], false, 0),
            index("t_b_idx2", &["b"], false, 3),
            index("t_id_idx", &["id"], false, 0),
        ];
        let r = redundant(&all);
        let pairs: Vec<(&str, &str, bool)> = r
            .iter()
            .map(|r| (r.index.as_str(), r.covered_by.as_str(), r.duplicate))
            .collect();
        assert_eq!(
            pairs,
            [
                ("t_a_idx", "t_a_b_idx", false),
                ("t_b_idx2", "t_b_idx", true),
                ("t_id_idx", "t_pkey", true)
            ]
        );
        let u: Vec<String> = unused(&all).into_iter().map(|u| u.index).collect();
        assert_eq!(u, ["t_b_idx", "t_id_idx"]);
        assert!(covered(&all, "t", &["a".into()]));
        assert!(!covered(&all, "t", &["b".into(), "a".into()]));
    }

    #[test]
    fn tables_read_mostly_whole_are_reported_when_large_and_busy() {
        let t = |name: &str, seq, idx, rows| TableRow {
            table: name.into(),
            seq_scans: seq,
            idx_scans: idx,
            rows,
        };
        let r = seq_scans(
            &[
                t("big", 900, 100, 1e6),
                t("small", 900, 0, 10.0),
                t("indexed", 10, 990, 1e6),
            ],
            10_000.0,
            50,
            0.5,
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].table, "big");
        assert!((r[0].share - 0.9).abs() < 1e-9);
    }
}
