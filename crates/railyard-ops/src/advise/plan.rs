//! Reading a generic plan for index candidates: which large relations it
//! scans sequentially, with which filter columns, and which large inputs it
//! sorts, by which columns. Pure: the plan is `EXPLAIN (FORMAT JSON)` output
//! and the relations' columns come from the caller.

use railyard::observe::sql::{self, TokenKind as K};
use std::collections::HashMap;

use serde_json::Value;

/// How a column is used in a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    /// `col = …`, `col = ANY (…)`, `col IS NULL`.
    Equality,
    /// `col < …`, `col >= …`, `BETWEEN` (planned as two ranges).
    Range,
    /// Anything else (`LIKE`, a function of the column, …).
    Other,
}

/// What a plan asks of one relation.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Wants {
    /// The relation as the plan names it.
    pub(crate) relation: String,
    /// Filter columns compared for equality, in the order they appear.
    pub(crate) equality: Vec<String>,
    /// Filter columns compared by range.
    pub(crate) range: Vec<String>,
    /// Columns a large input is sorted by (the relation's own).
    pub(crate) sort: Vec<String>,
    /// Columns the relation is joined on while it is scanned whole.
    pub(crate) join: Vec<String>,
    /// Rows the plan expects the scan to read (the sort's input, for a sort).
    pub(crate) rows: f64,
}

impl Wants {
    /// Candidate column lists, best guess first, without repeats: equality
    /// columns (then one range column), equality then sort columns, the join
    /// columns, and each filter column alone.
    pub(crate) fn candidates(&self) -> Vec<Vec<String>> {
        let mut out: Vec<Vec<String>> = Vec::new();
        let mut push = |cols: Vec<String>| {
            let mut seen = Vec::new();
            for c in cols {
                if !seen.contains(&c) {
                    seen.push(c);
                }
            }
            seen.truncate(4);
            if !seen.is_empty() && !out.contains(&seen) {
                out.push(seen);
            }
        };
        let eq: Vec<String> = self.equality.iter().take(3).cloned().collect();
        if !self.sort.is_empty() {
            push(eq.iter().chain(&self.sort).cloned().collect());
        }
        if let Some(r) = self.range.first() {
            push(eq.iter().chain(std::iter::once(r)).cloned().collect());
        }
        push(eq.clone());
        for j in &self.join {
            push(eq.iter().chain(std::iter::once(j)).cloned().collect());
            push(vec![j.clone()]);
        }
        for c in self.equality.iter().chain(&self.range) {
            push(vec![c.clone()]);
        }
        out.truncate(6);
        out
    }
}

/// The root node of `EXPLAIN (FORMAT JSON)` output.
pub(crate) fn root(plan: &Value) -> Option<&Value> {
    plan.get(0)?.get("Plan")
}

/// The root's estimated total cost.
pub(crate) fn total_cost(plan: &Value) -> Option<f64> {
    root(plan)?.get("Total Cost")?.as_f64()
}

fn text<'a>(node: &'a Value, key: &str) -> Option<&'a str> {
    node.get(key).and_then(Value::as_str)
}

fn rows(node: &Value) -> f64 {
    node.get("Plan Rows").and_then(Value::as_f64).unwrap_or(0.0)
}

fn children(node: &Value) -> impl Iterator<Item = &Value> {
    node.get("Plans")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// Every relation the plan reads, as it names them.
pub(crate) fn relations(plan: &Value) -> Vec<String> {
    fn go(node: &Value, out: &mut Vec<String>) {
        if let Some(r) = text(node, "Relation Name")
            && !out.iter().any(|o| o == r)
        {
            out.push(r.to_owned());
        }
        children(node).for_each(|c| go(c, out));
    }
    let mut out = Vec::new();
    if let Some(r) = root(plan) {
        go(r, &mut out);
    }
    out
}

/// The largest input a `Limit` node skips over or reads from, when the plan
/// has one: what an `OFFSET` page may read and discard.
pub(crate) fn limit_input_rows(plan: &Value) -> Option<f64> {
    fn go(node: &Value, best: &mut Option<f64>) {
        if text(node, "Node Type") == Some("Limit") {
            let input = children(node).map(rows).fold(0.0, f64::max);
            *best = Some(best.map_or(input, |b: f64| b.max(input)));
        }
        children(node).for_each(|c| go(c, best));
    }
    let mut best = None;
    go(root(plan)?, &mut best);
    best
}

/// What the plan asks of each relation it scans sequentially with at least
/// `min_rows` rows (by `size`, the relation's row estimate), or whose rows it
/// sorts, `min_rows` or more of them. `columns` gives each relation's columns.
pub(crate) fn wants(
    plan: &Value,
    columns: &HashMap<String, Vec<String>>,
    size: &HashMap<String, f64>,
    min_rows: f64,
) -> Vec<Wants> {
    let mut out: Vec<Wants> = Vec::new();
    if let Some(r) = root(plan) {
        visit(r, columns, size, min_rows, &mut out);
    }
    out
}

fn entry<'a>(out: &'a mut Vec<Wants>, relation: &str) -> &'a mut Wants {
    if let Some(i) = out.iter().position(|w| w.relation == relation) {
        &mut out[i]
    } else {
        out.push(Wants {
            relation: relation.to_owned(),
            ..Wants::default()
        });
        out.last_mut().expect("just pushed")
    }
}

/// The single relation scanned under `node` through nodes with one child
/// (a sort of a join's output names no one relation), with its alias.
fn scanned_alone(node: &Value) -> Option<(&str, &str)> {
    let mut n = node;
    loop {
        if let Some(r) = text(n, "Relation Name") {
            return Some((r, text(n, "Alias").unwrap_or(r)));
        }
        let mut kids = children(n);
        let only = kids.next()?;
        if kids.next().is_some() {
            return None;
        }
        n = only;
    }
}

fn visit(
    node: &Value,
    columns: &HashMap<String, Vec<String>>,
    size: &HashMap<String, f64>,
    min_rows: f64,
    out: &mut Vec<Wants>,
) {
    let kind = text(node, "Node Type").unwrap_or_default();
    if kind == "Seq Scan"
        && let Some(rel) = text(node, "Relation Name")
        && size.get(rel).copied().unwrap_or(0.0) >= min_rows
        && let Some(cols) = columns.get(rel)
    {
        let alias = text(node, "Alias").unwrap_or(rel);
        let w = entry(out, rel);
        w.rows = w.rows.max(size.get(rel).copied().unwrap_or(0.0));
        if let Some(filter) = text(node, "Filter") {
            for (col, u) in column_uses(filter, alias, cols) {
                let list = match u {
                    Use::Equality => &mut w.equality,
                    Use::Range => &mut w.range,
                    Use::Other => continue,
                };
                if !list.contains(&col) {
                    list.push(col);
                }
            }
        }
    }
    if kind == "Sort"
        && rows_in(node) >= min_rows
        && let Some(input) = children(node).next()
        && let Some((rel, alias)) = scanned_alone(input)
        && let Some(cols) = columns.get(rel)
        && let Some(keys) = node.get("Sort Key").and_then(Value::as_array)
    {
        let keys: Vec<String> = keys
            .iter()
            .filter_map(Value::as_str)
            .map_while(|k| sort_column(k, alias, cols))
            .collect();
        if !keys.is_empty() {
            let w = entry(out, rel);
            w.rows = w.rows.max(rows_in(node));
            w.sort = keys;
        }
    }
    if matches!(kind, "Hash Join" | "Merge Join")
        && let Some(cond) = text(node, "Hash Cond").or_else(|| text(node, "Merge Cond"))
    {
        for child in children(node) {
            // A hash join's inner side is under a Hash node.
            let Some((rel, alias)) = scanned_alone(child) else {
                continue;
            };
            if size.get(rel).copied().unwrap_or(0.0) < min_rows || !seq_scanned(child) {
                continue;
            }
            let Some(cols) = columns.get(rel) else {
                continue;
            };
            let uses = column_uses(cond, alias, cols);
            let w = entry(out, rel);
            w.rows = w.rows.max(size.get(rel).copied().unwrap_or(0.0));
            for (col, _) in uses {
                if !w.join.contains(&col) {
                    w.join.push(col);
                }
            }
        }
    }
    children(node).for_each(|c| visit(c, columns, size, min_rows, out));
}

fn rows_in(sort: &Value) -> f64 {
    children(sort).map(rows).fold(rows(sort), f64::max)
}

fn seq_scanned(node: &Value) -> bool {
    text(node, "Node Type") == Some("Seq Scan") || children(node).any(seq_scanned)
}

/// A sort key that is a plain column of the relation (`created_at`,
/// `o.created_at DESC`), or `None`.
fn sort_column(key: &str, alias: &str, cols: &[String]) -> Option<String> {
    let name = key
        .trim()
        .trim_end_matches(" NULLS FIRST")
        .trim_end_matches(" NULLS LAST")
        .trim_end_matches(" DESC")
        .trim_end_matches(" ASC");
    let name = name
        .strip_prefix(alias)
        .and_then(|r| r.strip_prefix('.'))
        .unwrap_or(name);
    let name = unquote(name)?;
    cols.contains(&name).then_some(name)
}

fn unquote(s: &str) -> Option<String> {
    if let Some(inner) = s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        return Some(inner.replace("\"\"", "\""));
    }
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
        .then(|| s.to_owned())
}

#[derive(Debug, PartialEq)]
enum Token {
    Name(String),
    Dot,
    Op(String),
    Open,
    Close,
    Other,
}

/// Splits a plan condition into names, operators and the rest, on the core's
/// SQL lexer; constants are `Other`, and a cast's type name is skipped.
fn tokens(expr: &str) -> Vec<Token> {
    let all: Vec<sql::Token> = sql::tokens(expr).collect();
    let text = |t: &sql::Token| &expr[t.span.clone()];
    let is_op = |s: &str| matches!(s, "=" | "<" | ">" | "!" | "~");
    let mut out = Vec::new();
    let mut i = 0;
    while i < all.len() {
        let t = &all[i];
        let s = text(t);
        i += 1;
        match t.kind {
            K::Space | K::Comment => {}
            K::Ident => out.push(Token::Name(s.to_owned())),
            K::QuotedIdent => {
                let inner = s.strip_prefix('"').unwrap_or(s);
                let inner = inner.strip_suffix('"').unwrap_or(inner);
                out.push(Token::Name(inner.replace("\"\"", "\"")));
            }
            K::String | K::Number | K::Param => out.push(Token::Other),
            K::Punct => match s {
                "," => {}
                "." => out.push(Token::Dot),
                "(" | "[" => out.push(Token::Open),
                ")" | "]" => out.push(Token::Close),
                ":" if all.get(i).is_some_and(|n| text(n) == ":") => {
                    i = skip_cast(expr, &all, i + 1);
                }
                _ if is_op(s) => {
                    let mut op = s.to_owned();
                    while let Some(n) = all.get(i).filter(|n| is_op(text(n))) {
                        op.push_str(text(n));
                        i += 1;
                    }
                    out.push(Token::Op(op));
                }
                _ => out.push(Token::Other),
            },
        }
    }
    out
}

/// Skips the type name of a cast whose `::` ends before `i` (`text[]`,
/// `double precision`, `timestamp with time zone`): the index after it.
fn skip_cast(expr: &str, all: &[sql::Token], mut i: usize) -> usize {
    const WORDS: [&str; 6] = ["precision", "varying", "with", "without", "time", "zone"];
    let text = |t: &sql::Token| &expr[t.span.clone()];
    loop {
        match all.get(i) {
            Some(t) if matches!(t.kind, K::Ident | K::QuotedIdent) => i += 1,
            Some(t) if matches!(text(t), "[" | "]") => i += 1,
            Some(t)
                if t.kind == K::Space
                    && all.get(i + 1).is_some_and(|n| {
                        n.kind == K::Ident && WORDS.contains(&text(n).to_ascii_lowercase().as_str())
                    }) =>
            {
                i += 2
            }
            _ => return i,
        }
    }
}

/// The relation's columns a condition compares, with how. A column is a name
/// of `cols`, bare or qualified by `alias`; how is read from the operator
/// after it (casts and closing parentheses skipped) or, failing that, before
/// it.
pub(crate) fn column_uses(expr: &str, alias: &str, cols: &[String]) -> Vec<(String, Use)> {
    let t = tokens(expr);
    let mut out: Vec<(String, Use)> = Vec::new();
    let mut i = 0;
    while i < t.len() {
        let Token::Name(name) = &t[i] else {
            i += 1;
            continue;
        };
        // `alias.col`, or a bare column not followed by a dot.
        let (col, at) = if t.get(i + 1) == Some(&Token::Dot) {
            match (name == alias, t.get(i + 2)) {
                (true, Some(Token::Name(c))) => (c.clone(), i + 2),
                _ => {
                    i += 3;
                    continue;
                }
            }
        } else if i > 0 && t[i - 1] == Token::Dot {
            i += 1;
            continue;
        } else {
            (name.clone(), i)
        };
        // A function call's name is not a column.
        if t.get(at + 1) == Some(&Token::Open) || !cols.contains(&col) {
            i = at + 1;
            continue;
        }
        // A column inside a function call (`lower(email)`) is not one an
        // index on the column serves.
        let in_call = i >= 2
            && t[i - 1] == Token::Open
            && matches!(&t[i - 2], Token::Name(f)
                if !["AND", "OR", "NOT", "ANY", "ALL", "SOME", "IN"].iter().any(|k| f.eq_ignore_ascii_case(k)));
        let mut j = at + 1;
        while t.get(j) == Some(&Token::Close) {
            j += 1;
        }
        let after = match t.get(j) {
            Some(Token::Op(op)) => Some(op.as_str()),
            Some(Token::Name(n)) if n.eq_ignore_ascii_case("IS") => Some("="),
            Some(Token::Name(n)) if n.eq_ignore_ascii_case("ANY") => Some("="),
            _ => None,
        };
        let before = match at.checked_sub(1).and_then(|k| t.get(k)) {
            Some(Token::Op(op)) => Some(op.as_str()),
            _ => None,
        };
        let u = match after.or(before) {
            _ if in_call => Use::Other,
            Some("=") => Use::Equality,
            Some("<" | ">" | "<=" | ">=") => Use::Range,
            _ => Use::Other,
        };
        if let Some(existing) = out.iter_mut().find(|(c, _)| *c == col) {
            if existing.1 == Use::Other {
                existing.1 = u;
            }
        } else {
            out.push((col, u));
        }
        i = at + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn conditions_give_their_columns_and_how_they_are_compared() {
        let c = cols(&["account_id", "symbol", "price", "status", "email"]);
        assert_eq!(
            column_uses(
                "((symbol = $1) AND (price > $2) AND (status = ANY ('{open,partial}'::text[])))",
                "orders",
                &c
            ),
            [
                ("symbol".into(), Use::Equality),
                ("price".into(), Use::Range),
                ("status".into(), Use::Equality)
            ]
        );
        assert_eq!(
            column_uses("((o.account_id)::bigint = a.id)", "o", &c),
            [("account_id".into(), Use::Equality)]
        );
        assert_eq!(
            column_uses("(lower(email) = '?'::text)", "u", &c),
            [("email".into(), Use::Other)]
        );
        assert_eq!(
            column_uses("(email ~~ 'a%'::text)", "u", &c),
            [("email".into(), Use::Other)]
        );
        assert_eq!(column_uses("(other.symbol = $1)", "o", &c), []);
        assert_eq!(
            column_uses("((\"Symbol\")::text = $1)", "o", &cols(&["Symbol"])),
            [("Symbol".into(), Use::Equality)]
        );
    }

    #[test]
    fn a_large_sequential_scan_and_a_sort_give_candidates() {
        let plan: Value = serde_json::from_str(
            r#"[{"Plan": {"Node Type": "Limit", "Plan Rows": 10, "Total Cost": 900,
                "Plans": [{"Node Type": "Sort", "Plan Rows": 50000, "Total Cost": 890,
                   "Sort Key": ["t.created_at DESC"],
                   "Plans": [{"Node Type": "Seq Scan", "Relation Name": "t", "Alias": "t",
                      "Plan Rows": 50000, "Total Cost": 500,
                      "Filter": "((k = $1) AND (n >= $2))"}]}]}}]"#,
        )
        .unwrap();
        let columns = HashMap::from([("t".to_owned(), cols(&["id", "k", "n", "created_at"]))]);
        let size = HashMap::from([("t".to_owned(), 100_000.0)]);
        let w = wants(&plan, &columns, &size, 10_000.0);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].equality, ["k"]);
        assert_eq!(w[0].range, ["n"]);
        assert_eq!(w[0].sort, ["created_at"]);
        assert_eq!(
            w[0].candidates(),
            [
                cols(&["k", "created_at"]),
                cols(&["k", "n"]),
                cols(&["k"]),
                cols(&["n"])
            ]
        );
        assert_eq!(limit_input_rows(&plan), Some(50000.0));
        // The same table, too small: nothing.
        let small = HashMap::from([("t".to_owned(), 500.0)]);
        let w = wants(&plan, &columns, &small, 10_000.0);
        assert!(w.iter().all(|w| w.equality.is_empty()), "{w:?}");
    }

    #[test]
    fn the_scanned_side_of_a_hash_join_gives_its_join_column() {
        let plan: Value = serde_json::from_str(
            r#"[{"Plan": {"Node Type": "Hash Join", "Hash Cond": "(f.order_id = o.id)", "Plan Rows": 5,
                "Plans": [{"Node Type": "Seq Scan", "Relation Name": "fills", "Alias": "f", "Plan Rows": 90000},
                          {"Node Type": "Hash", "Plan Rows": 1, "Plans": [
                             {"Node Type": "Index Scan", "Relation Name": "orders", "Alias": "o", "Plan Rows": 1}]}]}}]"#,
        )
        .unwrap();
        let columns = HashMap::from([
            ("fills".to_owned(), cols(&["id", "order_id"])),
            ("orders".to_owned(), cols(&["id"])),
        ]);
        let size = HashMap::from([
            ("fills".to_owned(), 90_000.0),
            ("orders".to_owned(), 90_000.0),
        ]);
        let w = wants(&plan, &columns, &size, 10_000.0);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].relation, "fills");
        assert_eq!(w[0].join, ["order_id"]);
        assert_eq!(relations(&plan), ["fills", "orders"]);
    }
}
