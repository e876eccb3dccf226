//! The operation keyword and the first table a statement names, for the
//! events a hook sees.

/// The operation keyword and the first table a statement names.
pub(crate) fn operation_and_table(sql: &str) -> (&'static str, Option<&str>) {
    let mut words = sql
        .split(|c: char| c.is_whitespace() || c == '(' || c == ',' || c == ';')
        .filter(|w| !w.is_empty());
    let first = words.next().unwrap_or("");
    const OPS: [&str; 20] = [
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "WITH",
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "SAVEPOINT",
        "RELEASE",
        "SET",
        "SHOW",
        "CREATE",
        "ALTER",
        "DROP",
        "TRUNCATE",
        "MERGE",
        "COPY",
        "GRANT",
        "REVOKE",
    ];
    let op = OPS
        .iter()
        .find(|o| first.eq_ignore_ascii_case(o))
        .copied()
        .unwrap_or("OTHER");
    let after = match op {
        "SELECT" | "DELETE" | "WITH" => "FROM",
        "INSERT" | "MERGE" | "COPY" => "INTO",
        "UPDATE" => "",
        "CREATE" | "ALTER" | "DROP" | "TRUNCATE" => "TABLE",
        _ => return (op, None),
    };
    let rest = &sql[first.len()..];
    let mut it = words_outside_calls(rest);
    let table = if after.is_empty() || op == "COPY" {
        it.next()
    } else {
        let mut found = None;
        while let Some(w) = it.next() {
            if w.eq_ignore_ascii_case(after) {
                let mut t = it.next();
                while let Some(x) = t {
                    if ["IF", "NOT", "EXISTS", "ONLY"]
                        .iter()
                        .any(|k| x.eq_ignore_ascii_case(k))
                    {
                        t = it.next();
                    } else {
                        break;
                    }
                }
                // `FROM (SELECT …`: the subquery's own FROM names the table.
                if t.is_some_and(|x| x.eq_ignore_ascii_case("SELECT")) {
                    continue;
                }
                found = t;
                break;
            }
        }
        found
    };
    (
        op,
        table
            .map(|t| t.trim_matches('"'))
            .filter(|t| !t.is_empty() && !t.starts_with('$')),
    )
}

/// The words of `s` (split at whitespace, parentheses, `,` and `;`), leaving out the
/// arguments of function calls, so that `extract(epoch FROM taken_at)` is not
/// read as a `FROM`: a `(` right after a word opens a call, skipped to its
/// matching `)`. A `(` after a space (a subquery, a column list) is not.
pub(super) fn words_outside_calls(s: &str) -> impl Iterator<Item = &str> {
    let b = s.as_bytes();
    let sep = |c: u8| c.is_ascii_whitespace() || matches!(c, b'(' | b')' | b',' | b';');
    let word = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'"');
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < b.len() && sep(b[i]) {
            if b[i] == b'(' && i > 0 && word(b[i - 1]) {
                let mut depth = 0usize;
                while i < b.len() {
                    match b[i] {
                        b'(' => depth += 1,
                        b')' => depth -= 1,
                        _ => {}
                    }
                    i += 1;
                    if depth == 0 {
                        break;
                    }
                }
            } else {
                i += 1;
            }
        }
        if i >= b.len() {
            return None;
        }
        let start = i;
        while i < b.len() && !sep(b[i]) {
            i += 1;
        }
        Some(&s[start..i])
    })
}
