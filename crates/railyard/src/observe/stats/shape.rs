//! A statement's shape: the normaliser that turns a statement's text into its
//! key (see [`StatementStats`](super::StatementStats) for the rules), and the
//! sanitiser that keeps literal values out of the events' text.

use super::super::sql::*;
use super::StatementStats;

/// Replaces the contents of every string literal by `?` (`'…'`, `E'…'`,
/// `$$…$$`, `$tag$…$tag$`, and the `B`/`X`/`N`/`U&` forms), so literal values
/// (a password in `ALTER ROLE`, an email in a hand-written query) never reach a
/// hook. Everything else, comments included, is kept as written.
///
/// `UPDATE users SET name = 'O''Brien' WHERE id = $1` becomes
/// `UPDATE users SET name = '?' WHERE id = $1`.
pub(in crate::observe) fn sanitize_into(sql: &str, out: &mut String) {
    let b = sql.as_bytes();
    let (mut i, mut copied) = (0, 0);
    while i < b.len() {
        let c = b[i];
        if let Some(end) = comment_at(b, i) {
            i = end;
        } else if let Some((end, prefix)) = string_at(b, i) {
            out.push_str(&sql[copied..i + prefix]);
            out.push_str("'?'");
            i = end;
            copied = end;
        } else {
            i = match c {
                b'"' => quoted_end(b, i, b'"', false),
                b'$' => digits_end(b, i + 1),
                _ if is_ident_start(c) => ident_end(b, i),
                _ => i + 1,
            };
        }
    }
    out.push_str(&sql[copied..]);
}

/// Keywords after which a sign belongs to the number that follows (`LIMIT -1`),
/// rather than being a subtraction (`balance -1`).
const SIGN_AFTER: [&str; 28] = [
    "SELECT", "DISTINCT", "WHERE", "AND", "OR", "NOT", "CASE", "WHEN", "THEN", "ELSE", "BY",
    "LIMIT", "OFFSET", "FETCH", "FIRST", "NEXT", "VALUES", "SET", "IS", "BETWEEN", "LIKE", "ILIKE",
    "SIMILAR", "TO", "IN", "ON", "HAVING", "RETURN",
];

/// What came last, for telling a sign from a subtraction.
#[derive(Clone, Copy)]
enum Last {
    /// Nothing, or an operator or punctuation: a sign may follow.
    Operator,
    /// A value: a `-` after it subtracts.
    Operand,
    /// A word (its span): a value unless it is a keyword of [`SIGN_AFTER`].
    Word(usize, usize),
}

/// Where a key is written: tokens separated by at most one space, cut at a
/// token boundary once [`StatementStats::MAX_KEY_LEN`] would be passed.
struct KeyOut<'a> {
    src: &'a str,
    s: &'a mut String,
    start: usize,
    space: bool,
    full: bool,
    /// Whether the key cannot reach the limit (a key is at most twice as long
    /// as its text): then tokens kept as written, and the single spaces between
    /// them, are copied in runs (`span`) rather than one by one.
    short: bool,
    span: (usize, usize),
}

/// Marks a key that was cut short.
const CUT: &str = " …";

impl KeyOut<'_> {
    fn written(&self) -> usize {
        self.s.len() - self.start
    }

    fn flush(&mut self) {
        if self.span.0 < self.span.1 {
            self.s.push_str(&self.src[self.span.0..self.span.1]);
            self.span = (0, 0);
        }
    }

    /// The token `from..to` of the text, kept as written.
    #[inline]
    fn verbatim(&mut self, from: usize, to: usize) {
        if !self.short {
            let src = self.src;
            return self.push(&src[from..to]);
        }
        if self.span.0 < self.span.1 {
            let (_, end) = self.span;
            let joined = if self.space {
                from == end + 1 && self.src.as_bytes()[end] == b' '
            } else {
                from == end
            };
            if joined {
                self.span.1 = to;
                self.space = false;
                return;
            }
            self.flush();
        }
        if self.space && self.written() > 0 {
            self.s.push(' ');
        }
        self.space = false;
        self.span = (from, to);
    }

    fn push2(&mut self, a: &str, b: &str) {
        self.flush();
        if self.full {
            return;
        }
        let space = self.space && self.written() > 0;
        self.space = false;
        if !self.short
            && self.written() + usize::from(space) + a.len() + b.len()
                > StatementStats::MAX_KEY_LEN - CUT.len()
        {
            let cut = if self.written() > 0 {
                CUT
            } else {
                CUT.trim_start()
            };
            self.s.push_str(cut);
            self.full = true;
            return;
        }
        if space {
            self.s.push(' ');
        }
        self.s.push_str(a);
        self.s.push_str(b);
    }

    fn push(&mut self, t: &str) {
        self.push2(t, "");
    }

    fn string(&mut self, prefix: &str) {
        self.flush();
        // Two strings written back to back would read as one with a doubled quote.
        if prefix.is_empty() && self.written() > 0 && self.s.ends_with('\'') {
            self.space = true;
        }
        self.push2(prefix, "'?'");
    }
}

/// A word at `i` (an identifier or keyword, or a prefixed string such as
/// `E'…'`) into the key: where the next token starts, and what came last.
/// `IN (…)` and `ARRAY[…]` of constants and placeholders collapse.
fn word(o: &mut KeyOut<'_>, sql: &str, i: usize) -> (usize, Last) {
    let b = sql.as_bytes();
    if matches!(b.get(i + 1), Some(b'\'' | b'&'))
        && let Some((end, prefix)) = string_at(b, i)
    {
        o.string(&sql[i..i + prefix]);
        return (end, Last::Operand);
    }
    let end = ident_end(b, i);
    let word = &sql[i..end];
    let list = match end - i {
        2 if word.eq_ignore_ascii_case("IN") => {
            constant_list_end(b, end, b'(', b')').map(|e| (e, true, "(...)"))
        }
        5 if word.eq_ignore_ascii_case("ARRAY") => {
            constant_list_end(b, end, b'[', b']').map(|e| (e, false, "[...]"))
        }
        _ => None,
    };
    o.verbatim(i, end);
    match list {
        Some((after, space, collapsed)) => {
            o.space = space;
            o.push(collapsed);
            (after, Last::Operand)
        }
        None => (end, Last::Word(i, end)),
    }
}

/// Writes the key of `sql` to `out`: see [`StatementStats`] for the rules.
pub(in crate::observe) fn normalize_into(sql: &str, out: &mut String) {
    let b = sql.as_bytes();
    let mut o = KeyOut {
        src: sql,
        start: out.len(),
        s: out,
        space: false,
        full: false,
        short: 2 * sql.len() <= StatementStats::MAX_KEY_LEN - CUT.len(),
        span: (0, 0),
    };
    let mut last = Last::Operator;
    let mut i = 0;
    while i < b.len() && !o.full {
        let c = b[i];
        if is_space(c) {
            o.space = true;
            i += 1;
            continue;
        }
        // Most tokens are words: they come first.
        if is_ident_start(c) {
            (i, last) = word(&mut o, sql, i);
            continue;
        }
        if let Some(end) = comment_at(b, i) {
            o.space = true;
            i = end;
            continue;
        }
        if matches!(c, b'\'' | b'$')
            && let Some((end, prefix)) = string_at(b, i)
        {
            o.string(&sql[i..i + prefix]);
            last = Last::Operand;
            i = end;
            continue;
        }
        let sign = matches!(c, b'-' | b'+')
            && starts_number(b, i + 1)
            && match last {
                Last::Operator => true,
                Last::Operand => false,
                Last::Word(s, e) => SIGN_AFTER.iter().any(|k| sql[s..e].eq_ignore_ascii_case(k)),
            };
        if sign || starts_number(b, i) {
            o.push("?");
            last = Last::Operand;
            i = number_end(b, if sign { i + 1 } else { i });
            continue;
        }
        match c {
            b'"' => {
                let end = quoted_end(b, i, b'"', false);
                o.verbatim(i, end);
                last = Last::Operand;
                i = end;
            }
            b'$' if is_digit_at(b, i + 1) => {
                let end = digits_end(b, i + 1);
                o.verbatim(i, end);
                last = Last::Operand;
                i = end;
            }
            _ => {
                // ASCII here: every byte >= 0x80 starts an identifier.
                o.verbatim(i, i + 1);
                last = if matches!(c, b')' | b']' | b'?') {
                    Last::Operand
                } else {
                    Last::Operator
                };
                i += 1;
            }
        }
    }
    o.flush();
}
