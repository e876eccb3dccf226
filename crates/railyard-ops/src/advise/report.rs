//! The advice as a person reads it, and SQL names written safely.

use std::fmt;

use super::{Advice, Pattern};

/// Words PostgreSQL reserves as names: a column or table called so must be
/// quoted.
const RESERVED: &[&str] = &[
    "all",
    "analyse",
    "analyze",
    "and",
    "any",
    "array",
    "as",
    "asc",
    "asymmetric",
    "both",
    "case",
    "cast",
    "check",
    "collate",
    "column",
    "constraint",
    "create",
    "current_catalog",
    "current_date",
    "current_role",
    "current_time",
    "current_timestamp",
    "current_user",
    "default",
    "deferrable",
    "desc",
    "distinct",
    "do",
    "else",
    "end",
    "except",
    "false",
    "fetch",
    "for",
    "foreign",
    "from",
    "grant",
    "group",
    "having",
    "in",
    "initially",
    "intersect",
    "into",
    "lateral",
    "leading",
    "limit",
    "localtime",
    "localtimestamp",
    "not",
    "null",
    "offset",
    "on",
    "only",
    "or",
    "order",
    "placing",
    "primary",
    "references",
    "returning",
    "select",
    "session_user",
    "some",
    "symmetric",
    "table",
    "then",
    "to",
    "trailing",
    "true",
    "union",
    "unique",
    "user",
    "using",
    "variadic",
    "when",
    "where",
    "window",
    "with",
];

/// A name as SQL needs it: bare when it is lowercase letters, digits and
/// `_` (not first a digit) and not reserved, else double-quoted.
pub(crate) fn ident(name: &str) -> String {
    let bare = name
        .bytes()
        .enumerate()
        .all(|(i, b)| b.is_ascii_lowercase() || b == b'_' || (i > 0 && b.is_ascii_digit()))
        && !name.is_empty()
        && !RESERVED.contains(&name);
    if bare {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// `table_col1_col2_idx`, cut to PostgreSQL's 63 bytes.
pub(crate) fn index_name(table: &str, columns: &[String]) -> String {
    let mut name = format!("{table}_{}_idx", columns.join("_"));
    if name.len() > 63 {
        let mut cut = 59;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
        name.push_str("_idx");
    }
    name
}

fn bytes(n: i64) -> String {
    let n = n.max(0) as f64;
    if n >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / 1024.0 / 1024.0)
    } else {
        format!("{:.0} KiB", n / 1024.0)
    }
}

impl fmt::Display for Advice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_header(f)?;
        self.fmt_indexes(f)?;
        self.fmt_findings(f)?;
        self.fmt_patterns(f)?;
        if !self.skipped.is_empty() {
            writeln!(f, "Not explained ({}):", self.skipped.len())?;
            for s in &self.skipped {
                writeln!(f, "  {}: {}", s.statement, s.reason)?;
            }
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

/// A section's heading, with ` none` when it has nothing under it.
fn heading(f: &mut fmt::Formatter<'_>, title: &str, empty: bool) -> fmt::Result {
    writeln!(f, "{title}:{}", if empty { " none" } else { "" })
}

impl Advice {
    fn fmt_header(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sources = if self.sources.is_empty() {
            "no statement source".to_owned()
        } else {
            self.sources.join(" and ")
        };
        writeln!(
            f,
            "{} statements examined (from {sources}); {}",
            self.statements_examined,
            if self.verified {
                "candidates proved with hypothetical indexes (hypopg)"
            } else {
                "candidates NOT verified (no hypopg)"
            }
        )?;
        writeln!(f)
    }

    fn fmt_indexes(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.indexes.is_empty() {
            writeln!(f, "Indexes to create: none")?;
        } else {
            writeln!(f, "Indexes to create (estimated plan cost, generic plans):")?;
        }
        for i in &self.indexes {
            writeln!(f, "  {}", i.create)?;
            for h in &i.helps {
                match h.cost_after {
                    Some(after) => writeln!(
                        f,
                        "    cost {:.1} -> {:.1} ({:.1}x cheaper), {} calls, {:.1} ms total: {}",
                        h.cost_before,
                        after,
                        h.cost_before / after.max(f64::MIN_POSITIVE),
                        h.calls,
                        h.total_ms,
                        h.statement
                    )?,
                    None => writeln!(
                        f,
                        "    cost {:.1} now, unverified, {} calls, {:.1} ms total: {}",
                        h.cost_before, h.calls, h.total_ms, h.statement
                    )?,
                }
            }
        }
        Ok(())
    }

    /// Unused and redundant indexes, and tables read by sequential scans.
    fn fmt_findings(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since = self.stats_since.as_deref().map_or_else(
            || "since the statistics began".to_owned(),
            |s| format!("since {s}"),
        );
        writeln!(f)?;
        heading(
            f,
            &format!(
                "Unused indexes (no scans {since}, replicas included; unique and primary keys excepted)"
            ),
            self.unused.is_empty(),
        )?;
        for u in &self.unused {
            writeln!(f, "  {} on {} ({})", u.index, u.table, bytes(u.bytes))?;
        }
        heading(f, "Redundant indexes", self.redundant.is_empty())?;
        for r in &self.redundant {
            let how = if r.duplicate {
                "duplicates"
            } else {
                "is a leading prefix of"
            };
            writeln!(
                f,
                "  {} on {} ({}): {how} {}",
                r.index,
                r.table,
                bytes(r.bytes),
                r.covered_by
            )?;
        }
        heading(
            f,
            "Tables read mostly by sequential scans",
            self.seq_scans.is_empty(),
        )?;
        for t in &self.seq_scans {
            writeln!(
                f,
                "  {} (~{:.0} rows): {:.0} % of {} scans sequential",
                t.table,
                t.rows,
                t.share * 100.0,
                t.seq_scans + t.idx_scans
            )?;
        }
        Ok(())
    }

    fn fmt_patterns(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        heading(f, "Anti-patterns", self.patterns.is_empty())?;
        for p in &self.patterns {
            match &p.pattern {
                Pattern::SelectStar { table, columns } => writeln!(
                    f,
                    "  SELECT * on {table} ({columns} columns): name the columns you use: {}",
                    p.statement
                )?,
                Pattern::DeepOffset { rows } => writeln!(
                    f,
                    "  OFFSET paging over ~{rows:.0} rows: a deep page reads and discards every row before it; page by key: {}",
                    p.statement
                )?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_only_when_they_must_be() {
        assert_eq!(ident("orders"), "orders");
        assert_eq!(ident("order"), "\"order\"");
        assert_eq!(ident("Orders"), "\"Orders\"");
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(ident("1a"), "\"1a\"");
        let long = index_name(&"t".repeat(40), &["c".repeat(40)]);
        assert!(long.len() <= 63 && long.ends_with("_idx"), "{long}");
    }
}
