//! Lexing SQL text, byte-wise: every byte that matters is ASCII, and the
//! bytes of a multi-byte UTF-8 character are all >= 0x80, which (as in
//! PostgreSQL's own lexer) continue identifiers; so every cut falls on a char
//! boundary. Where identifiers, numbers, quoted runs, strings and comments end,
//! and [`tokens`]: the text as a sequence of [`Token`]s.

/// Byte classes, looked up once per byte (the lexer's inner loops).
pub(super) const SPACE: u8 = 1;
pub(super) const IDENT_START: u8 = 2;
pub(super) const IDENT: u8 = 4;

pub(super) static CLASSES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        let mut class = 0;
        if matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
            class |= SPACE;
        }
        if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            class |= IDENT_START | IDENT;
        }
        if c.is_ascii_digit() || c == b'$' {
            class |= IDENT;
        }
        table[i] = class;
        i += 1;
    }
    table
};

#[inline]
pub(super) fn is_space(c: u8) -> bool {
    CLASSES[usize::from(c)] & SPACE != 0
}

#[inline]
pub(super) fn is_ident_start(c: u8) -> bool {
    CLASSES[usize::from(c)] & IDENT_START != 0
}

#[inline]
pub(super) fn is_ident_char(c: u8) -> bool {
    CLASSES[usize::from(c)] & IDENT != 0
}

#[inline]
pub(super) fn is_digit_at(b: &[u8], i: usize) -> bool {
    b.get(i).is_some_and(u8::is_ascii_digit)
}

/// Whether a numeric constant starts at `i` (`5`, `.5`).
#[inline]
pub(super) fn starts_number(b: &[u8], i: usize) -> bool {
    match b.get(i) {
        Some(c) if c.is_ascii_digit() => true,
        Some(b'.') => is_digit_at(b, i + 1),
        _ => false,
    }
}

#[inline]
pub(super) fn ident_end(b: &[u8], i: usize) -> usize {
    let mut j = i + 1;
    while j < b.len() && is_ident_char(b[j]) {
        j += 1;
    }
    j
}

#[inline]
pub(super) fn digits_end(b: &[u8], mut j: usize) -> usize {
    while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'_') {
        j += 1;
    }
    j
}

/// The end of a numeric constant starting at `i`: integers (with `_`
/// separators, and `0x`/`0o`/`0b` forms), decimals, exponents.
pub(super) fn number_end(b: &[u8], i: usize) -> usize {
    if b[i] == b'0'
        && matches!(b.get(i + 1), Some(b'x' | b'X' | b'o' | b'O' | b'b' | b'B'))
        && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
    {
        let mut j = i + 2;
        while j < b.len() && (b[j].is_ascii_hexdigit() || b[j] == b'_') {
            j += 1;
        }
        return j;
    }
    let mut j = digits_end(b, i);
    if b.get(j) == Some(&b'.') && b.get(j + 1) != Some(&b'.') {
        j = digits_end(b, j + 1);
    }
    if matches!(b.get(j), Some(b'e' | b'E')) {
        let mut k = j + 1;
        if matches!(b.get(k), Some(b'+' | b'-')) {
            k += 1;
        }
        if is_digit_at(b, k) {
            j = digits_end(b, k);
        }
    }
    j
}

/// The end of a run quoted by `q` opening at `i`: after the closing quote
/// (a doubled quote stays inside; with `backslash`, so does `\` and the byte
/// after it), or the end of the text when it is unterminated.
pub(super) fn quoted_end(b: &[u8], i: usize, q: u8, backslash: bool) -> usize {
    let mut j = i + 1;
    while j < b.len() {
        let c = b[j];
        if backslash && c == b'\\' {
            j += 2;
        } else if c == q {
            if b.get(j + 1) == Some(&q) {
                j += 2;
            } else {
                return j + 1;
            }
        } else {
            j += 1;
        }
    }
    b.len()
}

/// The end of a `$tag$` (or `$$`) opening at `i`, when one opens there.
pub(super) fn dollar_tag_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    if b.get(j) == Some(&b'$') {
        return Some(j + 1);
    }
    if !b.get(j).copied().is_some_and(is_ident_start) {
        return None;
    }
    while j < b.len() && (is_ident_start(b[j]) || b[j].is_ascii_digit()) {
        j += 1;
    }
    (b.get(j) == Some(&b'$')).then_some(j + 1)
}

/// After the body of a dollar-quoted string that began at `from` and is closed
/// by `tag`, or the end of the text.
pub(super) fn dollar_body_end(b: &[u8], from: usize, tag: &[u8]) -> usize {
    b.get(from..)
        .and_then(|rest| rest.windows(tag.len()).position(|w| w == tag))
        .map_or(b.len(), |p| from + p + tag.len())
}

/// A string constant at `i`: where it ends, and how many bytes of prefix
/// (`E`, `B`, `X`, `N`, `U&`) precede its opening quote. Plain `'…'` (`''`
/// escapes), `E'…'` (backslash escapes too), `$$…$$` and `$tag$…$tag$`.
#[inline]
pub(super) fn string_at(b: &[u8], i: usize) -> Option<(usize, usize)> {
    match b[i] {
        b'\'' => Some((quoted_end(b, i, b'\'', false), 0)),
        b'$' => {
            let body = dollar_tag_end(b, i)?;
            Some((dollar_body_end(b, body, &b[i..body]), 0))
        }
        c if is_ident_start(c) && (i == 0 || !is_ident_char(b[i - 1])) => {
            let next = b.get(i + 1).copied();
            match (c.to_ascii_uppercase(), next) {
                (b'E', Some(b'\'')) => Some((quoted_end(b, i + 1, b'\'', true), 1)),
                (b'B' | b'X' | b'N', Some(b'\'')) => Some((quoted_end(b, i + 1, b'\'', false), 1)),
                (b'U', Some(b'&')) if b.get(i + 2) == Some(&b'\'') => {
                    Some((quoted_end(b, i + 2, b'\'', false), 2))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// After a `--` comment (the newline is left: it is whitespace).
pub(super) fn line_comment_end(b: &[u8], i: usize) -> usize {
    b[i..]
        .iter()
        .position(|&c| c == b'\n')
        .map_or(b.len(), |p| i + p)
}

/// After a `/* … */` comment (they nest), or the end of the text.
pub(super) fn block_comment_end(b: &[u8], i: usize) -> usize {
    let mut depth = 1;
    let mut j = i + 2;
    while j < b.len() {
        if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
            depth -= 1;
            j += 2;
            if depth == 0 {
                return j;
            }
        } else if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
            depth += 1;
            j += 2;
        } else {
            j += 1;
        }
    }
    b.len()
}

/// The comment starting at `i`, if one does: where it ends.
#[inline]
pub(super) fn comment_at(b: &[u8], i: usize) -> Option<usize> {
    match (b[i], b.get(i + 1)) {
        (b'-', Some(b'-')) => Some(line_comment_end(b, i)),
        (b'/', Some(b'*')) => Some(block_comment_end(b, i)),
        _ => None,
    }
}

/// After whitespace and comments from `i`.
pub(super) fn blank_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() {
        if is_space(b[i]) {
            i += 1;
        } else if let Some(end) = comment_at(b, i) {
            i = end;
        } else {
            break;
        }
    }
    i
}

/// After one constant or placeholder at `i` (a number with its sign, a string,
/// `$n`, `?`, `...`, `NULL`, `TRUE`, `FALSE`), if one is there.
pub(super) fn constant_end(b: &[u8], i: usize) -> Option<usize> {
    let c = *b.get(i)?;
    if let Some((end, _)) = string_at(b, i) {
        return Some(end);
    }
    match c {
        b'$' if is_digit_at(b, i + 1) => Some(digits_end(b, i + 1)),
        b'?' => Some(i + 1),
        b'.' if b[i..].starts_with(b"...") => Some(i + 3),
        b'-' | b'+' if starts_number(b, i + 1) => Some(number_end(b, i + 1)),
        _ if starts_number(b, i) => Some(number_end(b, i)),
        _ if is_ident_start(c) => {
            let end = ident_end(b, i);
            let word = &b[i..end];
            ["NULL", "TRUE", "FALSE"]
                .iter()
                .any(|k| word.eq_ignore_ascii_case(k.as_bytes()))
                .then_some(end)
        }
        _ => None,
    }
}

/// After a list of constants and placeholders `open … close` that follows `i`
/// (past whitespace and comments), if one does.
pub(super) fn constant_list_end(b: &[u8], i: usize, open: u8, close: u8) -> Option<usize> {
    let mut j = blank_end(b, i);
    if b.get(j) != Some(&open) {
        return None;
    }
    j += 1;
    loop {
        j = blank_end(b, j);
        j = constant_end(b, j)?;
        j = blank_end(b, j);
        match b.get(j) {
            Some(&b',') => j += 1,
            Some(&c) if c == close => return Some(j + 1),
            _ => return None,
        }
    }
}

/// What a [`Token`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// A run of whitespace.
    Space,
    /// A `-- …` or `/* … */` comment (block comments nest).
    Comment,
    /// An identifier or keyword (bytes >= 0x80 continue it, as in PostgreSQL).
    Ident,
    /// A `"quoted identifier"` (`""` stays inside).
    QuotedIdent,
    /// A string constant: `'…'`, `E'…'`, `B'…'`, `X'…'`, `N'…'`, `U&'…'`,
    /// `$$…$$` or `$tag$…$tag$`.
    String,
    /// A numeric constant (`42`, `1.5e3`, `0x1F`, `1_000`), without its sign.
    Number,
    /// A positional parameter, `$1`.
    Param,
    /// Any other single (ASCII) byte: operators, parentheses, commas.
    Punct,
}

/// One token of SQL text: its kind and where it is (`sql[span]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// What it is.
    pub kind: TokenKind,
    /// Its bytes in the text; the spans of a text's tokens follow each other
    /// and cover it all, each on char boundaries.
    pub span: std::ops::Range<usize>,
}

/// The tokens of `sql`, whitespace and comments included. Never panics; an
/// unterminated string, quoted identifier or comment runs to the end.
pub fn tokens(sql: &str) -> impl Iterator<Item = Token> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= sql.len() {
            return None;
        }
        let (kind, mut end) = token_at(sql.as_bytes(), i);
        // Every token moves on, to a char boundary.
        end = end.clamp(i + 1, sql.len());
        while !sql.is_char_boundary(end) {
            end += 1;
        }
        let span = i..end;
        i = end;
        Some(Token { kind, span })
    })
}

/// The kind and end of the token starting at `i`.
fn token_at(b: &[u8], i: usize) -> (TokenKind, usize) {
    let c = b[i];
    if is_space(c) {
        let mut j = i;
        while j < b.len() && is_space(b[j]) {
            j += 1;
        }
        return (TokenKind::Space, j);
    }
    if let Some(end) = comment_at(b, i) {
        return (TokenKind::Comment, end);
    }
    if (is_ident_start(c) && matches!(b.get(i + 1), Some(b'\'' | b'&'))
        || matches!(c, b'\'' | b'$'))
        && let Some((end, _)) = string_at(b, i)
    {
        return (TokenKind::String, end);
    }
    if is_ident_start(c) {
        return (TokenKind::Ident, ident_end(b, i));
    }
    if c == b'"' {
        return (TokenKind::QuotedIdent, quoted_end(b, i, b'"', false));
    }
    if starts_number(b, i) {
        return (TokenKind::Number, number_end(b, i));
    }
    if c == b'$' && is_digit_at(b, i + 1) {
        return (TokenKind::Param, digits_end(b, i + 1));
    }
    (TokenKind::Punct, i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kinds(sql: &str) -> Vec<(TokenKind, &str)> {
        tokens(sql).map(|t| (t.kind, &sql[t.span])).collect()
    }

    #[test]
    fn each_kind_of_token_is_named() {
        use TokenKind::*;
        assert_eq!(
            kinds("SELECT \"a b\", E'x\\'y', $t$q$t$, 1.5e3 FROM t1 -- c\nWHERE id = $1"),
            vec![
                (Ident, "SELECT"),
                (Space, " "),
                (QuotedIdent, "\"a b\""),
                (Punct, ","),
                (Space, " "),
                (String, "E'x\\'y'"),
                (Punct, ","),
                (Space, " "),
                (String, "$t$q$t$"),
                (Punct, ","),
                (Space, " "),
                (Number, "1.5e3"),
                (Space, " "),
                (Ident, "FROM"),
                (Space, " "),
                (Ident, "t1"),
                (Space, " "),
                (Comment, "-- c"),
                (Space, "\n"),
                (Ident, "WHERE"),
                (Space, " "),
                (Ident, "id"),
                (Space, " "),
                (Punct, "="),
                (Space, " "),
                (Param, "$1"),
            ]
        );
    }

    fn sqlish() -> impl Strategy<Value = String> {
        let piece = prop::sample::select(vec![
            "'", "''", "\"", "$", "$$", "$a$", "$1", "E'", "U&'", "\\", "--", "/*", "*/", "\n",
            " ", "-", ".", "1", "2.5", "e3", "0x", "(", ")", ",", "x", "é", "€", "SELECT",
        ]);
        prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn the_spans_give_back_the_text(sql in prop_oneof![any::<String>(), sqlish()]) {
            let mut joined = String::new();
            let mut at = 0;
            for t in tokens(&sql) {
                prop_assert_eq!(t.span.start, at);
                prop_assert!(t.span.end > t.span.start);
                joined.push_str(&sql[t.span.clone()]);
                at = t.span.end;
            }
            prop_assert_eq!(joined, sql);
        }
    }
}
