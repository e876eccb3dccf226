//! Per-statement statistics in bounded memory: the normaliser that turns a
//! statement's text into its key (and the sanitiser that keeps literal values
//! out of the events' text), and [`StatementStats`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use super::{Outcome, QueryEvent, QueryHook};

// ---------------------------------------------------------------------------
// Lexing. Byte-wise: every byte that matters is ASCII, and the bytes of a
// multi-byte UTF-8 character are all >= 0x80, which (as in PostgreSQL's own
// lexer) continue identifiers; so every cut below falls on a char boundary.

/// Byte classes, looked up once per byte (the lexer's inner loops).
const SPACE: u8 = 1;
const IDENT_START: u8 = 2;
const IDENT: u8 = 4;

static CLASSES: [u8; 256] = {
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
fn is_space(c: u8) -> bool {
    CLASSES[usize::from(c)] & SPACE != 0
}

#[inline]
fn is_ident_start(c: u8) -> bool {
    CLASSES[usize::from(c)] & IDENT_START != 0
}

#[inline]
fn is_ident_char(c: u8) -> bool {
    CLASSES[usize::from(c)] & IDENT != 0
}

#[inline]
fn is_digit_at(b: &[u8], i: usize) -> bool {
    b.get(i).is_some_and(u8::is_ascii_digit)
}

/// Whether a numeric constant starts at `i` (`5`, `.5`).
#[inline]
fn starts_number(b: &[u8], i: usize) -> bool {
    match b.get(i) {
        Some(c) if c.is_ascii_digit() => true,
        Some(b'.') => is_digit_at(b, i + 1),
        _ => false,
    }
}

#[inline]
fn ident_end(b: &[u8], i: usize) -> usize {
    let mut j = i + 1;
    while j < b.len() && is_ident_char(b[j]) {
        j += 1;
    }
    j
}

#[inline]
fn digits_end(b: &[u8], mut j: usize) -> usize {
    while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'_') {
        j += 1;
    }
    j
}

/// The end of a numeric constant starting at `i`: integers (with `_`
/// separators, and `0x`/`0o`/`0b` forms), decimals, exponents.
fn number_end(b: &[u8], i: usize) -> usize {
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
fn quoted_end(b: &[u8], i: usize, q: u8, backslash: bool) -> usize {
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
fn dollar_tag_end(b: &[u8], i: usize) -> Option<usize> {
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
fn dollar_body_end(b: &[u8], from: usize, tag: &[u8]) -> usize {
    b.get(from..)
        .and_then(|rest| rest.windows(tag.len()).position(|w| w == tag))
        .map_or(b.len(), |p| from + p + tag.len())
}

/// A string constant at `i`: where it ends, and how many bytes of prefix
/// (`E`, `B`, `X`, `N`, `U&`) precede its opening quote. Plain `'…'` (`''`
/// escapes), `E'…'` (backslash escapes too), `$$…$$` and `$tag$…$tag$`.
#[inline]
fn string_at(b: &[u8], i: usize) -> Option<(usize, usize)> {
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
fn line_comment_end(b: &[u8], i: usize) -> usize {
    b[i..]
        .iter()
        .position(|&c| c == b'\n')
        .map_or(b.len(), |p| i + p)
}

/// After a `/* … */` comment (they nest), or the end of the text.
fn block_comment_end(b: &[u8], i: usize) -> usize {
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
fn comment_at(b: &[u8], i: usize) -> Option<usize> {
    match (b[i], b.get(i + 1)) {
        (b'-', Some(b'-')) => Some(line_comment_end(b, i)),
        (b'/', Some(b'*')) => Some(block_comment_end(b, i)),
        _ => None,
    }
}

/// After whitespace and comments from `i`.
fn blank_end(b: &[u8], mut i: usize) -> usize {
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
fn constant_end(b: &[u8], i: usize) -> Option<usize> {
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
fn constant_list_end(b: &[u8], i: usize, open: u8, close: u8) -> Option<usize> {
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

/// Replaces the contents of every string literal by `?` (`'…'`, `E'…'`,
/// `$$…$$`, `$tag$…$tag$`, and the `B`/`X`/`N`/`U&` forms), so literal values
/// (a password in `ALTER ROLE`, an email in a hand-written query) never reach a
/// hook. Everything else, comments included, is kept as written.
///
/// `UPDATE users SET name = 'O''Brien' WHERE id = $1` becomes
/// `UPDATE users SET name = '?' WHERE id = $1`.
pub(super) fn sanitize_into(sql: &str, out: &mut String) {
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

/// Writes the key of `sql` to `out`: see [`StatementStats`] for the rules.
pub(super) fn normalize_into(sql: &str, out: &mut String) {
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
            if matches!(b.get(i + 1), Some(b'\'' | b'&'))
                && let Some((end, prefix)) = string_at(b, i)
            {
                o.string(&sql[i..i + prefix]);
                last = Last::Operand;
                i = end;
                continue;
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
                    last = Last::Operand;
                    i = after;
                }
                None => {
                    last = Last::Word(i, end);
                    i = end;
                }
            }
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

// ---------------------------------------------------------------------------
// Counting distinct statements beyond the cap, in fixed memory.

const DISTINCT_BITS: u32 = 10;
const DISTINCT_REGISTERS: usize = 1 << DISTINCT_BITS;

/// A HyperLogLog estimate of distinct hashes: 1 KiB, a standard error of about
/// 3 % (1.04 / √1024), lock-free.
struct Distinct {
    registers: [AtomicU8; DISTINCT_REGISTERS],
}

impl Distinct {
    fn new() -> Self {
        Distinct {
            registers: std::array::from_fn(|_| AtomicU8::new(0)),
        }
    }

    fn add(&self, hash: u64) {
        let register = &self.registers[(hash >> (64 - DISTINCT_BITS)) as usize];
        // The position of the first one bit among the remaining bits (the
        // guard bit caps it).
        let rank = ((hash << DISTINCT_BITS) | (1 << (DISTINCT_BITS - 1))).leading_zeros() as u8 + 1;
        if register.load(Ordering::Relaxed) < rank {
            register.fetch_max(rank, Ordering::Relaxed);
        }
    }

    fn estimate(&self) -> u64 {
        let m = DISTINCT_REGISTERS as f64;
        let (mut sum, mut zeros) = (0.0, 0u32);
        for r in &self.registers {
            let rank = r.load(Ordering::Relaxed);
            sum += (-f64::from(rank)).exp2();
            zeros += u32::from(rank == 0);
        }
        if zeros as usize == DISTINCT_REGISTERS {
            return 0;
        }
        let raw = 0.7213 / (1.0 + 1.079 / m) * m * m / sum;
        let estimate = if raw <= 2.5 * m && zeros > 0 {
            // Few values: count the empty registers instead.
            m * (m / f64::from(zeros)).ln()
        } else {
            raw
        };
        estimate.round() as u64
    }

    fn clear(&self) {
        for r in &self.registers {
            r.store(0, Ordering::Relaxed);
        }
    }
}

// ---------------------------------------------------------------------------
// The statistics.

/// Statistics of one statement.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StatementStat {
    /// The statement's key (see [`StatementStats`]), or
    /// [`StatementStats::OTHER`] for the statements beyond the cap.
    pub sql: String,
    /// Executions.
    pub calls: u64,
    /// Failed executions.
    pub errors: u64,
    /// Sum of durations.
    pub total: Duration,
    /// Mean duration.
    pub mean: Duration,
    /// Median.
    pub p50: Duration,
    /// 95th percentile.
    pub p95: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

/// The smallest duration counted, in microseconds (the histogram's unit).
const HIST_LOW_US: u64 = 1;

/// The figures of one statement (or of the statements beyond the cap).
struct Figures {
    calls: u64,
    errors: u64,
    total_ns: u64,
    /// Counts saturate at `u32::MAX` per bucket (over four billion calls of one
    /// statement within 1 % of one duration); calls, errors and totals do not.
    hist: super::hist::Histogram,
}

impl Figures {
    fn new() -> Self {
        Figures {
            calls: 0,
            errors: 0,
            total_ns: 0,
            hist: super::hist::Histogram::default(),
        }
    }

    fn record(&mut self, e: &QueryEvent<'_>) {
        self.calls += 1;
        self.errors += u64::from(e.outcome == Outcome::Error);
        let ns = u64::try_from(e.duration.as_nanos()).unwrap_or(u64::MAX);
        self.total_ns = self.total_ns.saturating_add(ns);
        // Values past the histogram's range count as its last bucket; none is lost.
        self.hist.record((ns / 1_000).max(HIST_LOW_US));
    }

    fn clear(&mut self) {
        self.calls = 0;
        self.errors = 0;
        self.total_ns = 0;
        self.hist.reset();
    }

    fn stat(&self, sql: &str) -> StatementStat {
        let q = |p: f64| Duration::from_micros(self.hist.value_at_quantile(p));
        StatementStat {
            sql: sql.to_owned(),
            calls: self.calls,
            errors: self.errors,
            total: Duration::from_nanos(self.total_ns),
            mean: Duration::from_nanos(self.total_ns / self.calls.max(1)),
            p50: q(0.5),
            p95: q(0.95),
            p99: q(0.99),
        }
    }
}

/// Hashes a `u64` key as itself (keys are already hashes).
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The statements of one shard by the hash of their key; a hash shared by
/// several keys holds them all.
type ShardMap = HashMap<u64, Vec<(Box<str>, Mutex<Figures>)>, BuildHasherDefault<KeyHasher>>;

/// Shards: statements whose keys hash to different shards never share a lock.
const SHARDS: usize = 16;

/// One shard, alone on its cache lines.
#[repr(align(128))]
struct Shard {
    map: RwLock<ShardMap>,
    /// This shard's part of the statements beyond the cap (merged in snapshots):
    /// a shard of its own so that an overflowing workload has no global lock either.
    other: OnceLock<Mutex<Figures>>,
}

struct Inner {
    shards: [Shard; SHARDS],
    hasher: RandomState,
    /// This instance, for the per-thread caches of keys and hashes.
    id: u64,
    capacity: usize,
    /// Statements held (at most `capacity`).
    len: AtomicUsize,
    /// Distinct statements that went to `<other>`.
    overflowed: Distinct,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    /// Records `e` under `key`, whose hash by `self.hasher` is `hash`.
    fn record(&self, key: &str, hash: u64, e: &QueryEvent<'_>) {
        // Bits the map's own layout (low bits, top seven) does not use.
        let shard = &self.shards[(hash >> 32) as usize % SHARDS];
        {
            let map = shard.map.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(entries) = map.get(&hash)
                && let Some((_, figures)) = entries.iter().find(|(k, _)| **k == *key)
            {
                return lock(figures).record(e);
            }
        }
        if self.len.load(Ordering::Relaxed) < self.capacity {
            let mut map = shard.map.write().unwrap_or_else(PoisonError::into_inner);
            let entries = map.entry(hash).or_default();
            if let Some((_, figures)) = entries.iter().find(|(k, _)| **k == *key) {
                // Another thread added it meanwhile.
                return lock(figures).record(e);
            }
            let reserved = self
                .len
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < self.capacity).then_some(n + 1)
                })
                .is_ok();
            if reserved {
                let mut figures = Figures::new();
                figures.record(e);
                entries.push((key.into(), Mutex::new(figures)));
                return;
            }
            if entries.is_empty() {
                map.remove(&hash);
            }
        }
        self.overflowed.add(hash);
        lock(shard.other.get_or_init(|| Mutex::new(Figures::new()))).record(e);
    }
}

/// Per-statement statistics, the client-side view `pg_stat_statements` gives
/// server-side: calls, errors, total and mean time, p50/p95/p99. Clone it
/// before registering to keep a handle for snapshots.
///
/// ```no_run
/// # async fn demo(config: railyard::Config) -> Result<(), railyard::Error> {
/// let stats = railyard::StatementStats::new();
/// let db = railyard::Database::builder(config).hook(stats.clone()).connect().await?;
/// // … work …
/// for s in stats.snapshot().iter().take(5) {
///     println!("{:>8.1} ms total  {:>6} calls  p99 {:?}  {}", s.total.as_secs_f64() * 1e3, s.calls, s.p99, s.sql);
/// }
/// # Ok(()) }
/// ```
///
/// # Keys
///
/// Statements that differ only in their constants share one entry. The key
/// ([`StatementStats::key`]) is the text with:
///
/// - every numeric constant (`42`, `-1.5`, `6.02e23`, `0x1F`, `1_000`) replaced by
///   `?`; digits inside names (`t1`) and placeholders (`$1`) are kept;
/// - every string constant (`'…'` with `''` escapes, `E'…'` with backslash
///   escapes, `$$…$$`, `$tag$…$tag$`, and the `B`, `X`, `N`, `U&` forms)
///   replaced by `'?'` (a prefix is kept: `E'?'`);
/// - `IN (…)` lists and `ARRAY[…]` of constants and placeholders collapsed to
///   `IN (...)` and `ARRAY[...]`, whatever their length;
/// - comments dropped and runs of whitespace turned into one space;
/// - at most [`StatementStats::MAX_KEY_LEN`] bytes: a longer key is cut at a
///   token boundary and ends in ` …`.
///
/// Quoted identifiers are kept as written, as are keywords' case and everything
/// else. Normalising a key gives the same key.
///
/// # Bounded memory
///
/// At most [`capacity`](StatementStats::capacity) statements are kept
/// ([`DEFAULT_CAPACITY`](StatementStats::DEFAULT_CAPACITY) unless built with
/// [`with_capacity`](StatementStats::with_capacity)): the first ones seen (since
/// the last [`reset`](StatementStats::reset)). Queries of any further statement
/// are counted in one entry named [`OTHER`](StatementStats::OTHER), so the
/// totals stay right, and [`overflowed`](StatementStats::overflowed) estimates
/// how many distinct statements went there.
///
/// Durations go into a histogram of 1 µs to 1 h at two significant digits
/// (each recorded value within 1 %; longer queries count as one hour): 3,328
/// 32-bit counters, so a statement takes about 13.5 KiB with its key and
/// entry, and the default capacity about 13 MiB at most. Up to 16 further
/// histograms hold the `<other>` entry's durations, once there are any.
///
/// # Cost per query
///
/// A statement text seen recently on the same thread finds its key and hash
/// in a small per-thread cache (64 slots, texts up to 1 KiB, a few KiB of
/// memory per thread); any other text is normalised into a reused buffer and
/// hashed. Then a read lock on one of 16 shards (chosen by the hash) and the
/// statement's own lock: statements in different shards never contend, and a
/// statement already known costs no allocation.
#[derive(Clone)]
pub struct StatementStats {
    inner: std::sync::Arc<Inner>,
}

impl fmt::Debug for StatementStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "StatementStats({} of {} statements)",
            self.len(),
            self.capacity()
        )
    }
}

impl Default for StatementStats {
    fn default() -> Self {
        StatementStats::new()
    }
}

/// A thread's recent statements, so that a text seen again is neither
/// normalised nor hashed again: slots chosen by a cheap hash of the text,
/// checked by comparing the whole text. Reused buffers: a statement already
/// known costs no allocation.
struct Recent {
    slots: Vec<RecentSlot>,
}

#[derive(Default)]
struct RecentSlot {
    /// The [`StatementStats`] (its `id`) the key's hash is for; 0 for none.
    owner: u64,
    sql: String,
    key: String,
    hash: u64,
}

/// Slots per thread (a power of two).
const RECENT_SLOTS: usize = 64;
/// Longer texts are normalised every time. A thread's slots hold at most
/// 64 × (1 KiB + a 4 KiB key), typically a few KiB.
const RECENT_MAX_SQL: usize = 1_024;

thread_local! {
    static RECENT: RefCell<Recent> = const { RefCell::new(Recent { slots: Vec::new() }) };
}

/// A slot for `sql` from its length and three 8-byte windows: constant time.
fn recent_slot(sql: &[u8]) -> usize {
    let n = sql.len();
    let word = |at: usize| {
        let mut w = [0u8; 8];
        let end = (at + 8).min(n);
        w[..end - at].copy_from_slice(&sql[at..end]);
        u64::from_le_bytes(w)
    };
    let h = (n as u64)
        ^ word(0)
        ^ word(n.saturating_sub(8)).rotate_left(21)
        ^ word(n / 2).rotate_left(42);
    (h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - RECENT_SLOTS.trailing_zeros())) as usize
}

/// Gives each [`StatementStats`] an identity for the thread caches.
static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl StatementStats {
    /// Statements kept by [`StatementStats::new`].
    pub const DEFAULT_CAPACITY: usize = 1_000;

    /// The longest key, in bytes.
    pub const MAX_KEY_LEN: usize = 4_096;

    /// The name of the entry that counts the statements beyond the capacity.
    pub const OTHER: &'static str = "<other>";

    /// Empty statistics that keep up to [`StatementStats::DEFAULT_CAPACITY`] statements.
    pub fn new() -> Self {
        StatementStats::with_capacity(StatementStats::DEFAULT_CAPACITY)
    }

    /// Empty statistics that keep up to `statements` distinct statements; the
    /// queries of any further one count under [`StatementStats::OTHER`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use railyard::{QueryEvent, QueryHook, Route, StatementStats};
    /// let stats = StatementStats::with_capacity(2);
    /// let route = Route::Primary;
    /// for table in ["a", "b", "c", "d"] {
    ///     let sql = format!("SELECT * FROM {table} WHERE id = 7");
    ///     stats.on_query(&QueryEvent::new(&sql, &route, Duration::from_millis(1)));
    /// }
    /// let snap = stats.snapshot();
    /// assert_eq!(snap.len(), 3);
    /// let other = snap.iter().find(|s| s.sql == StatementStats::OTHER).unwrap();
    /// assert_eq!(other.calls, 2);
    /// // An estimate, close for large numbers (here, 2 or perhaps 1).
    /// assert!((1..=2).contains(&stats.overflowed()));
    /// ```
    pub fn with_capacity(statements: usize) -> Self {
        StatementStats {
            inner: std::sync::Arc::new(Inner {
                shards: std::array::from_fn(|_| Shard {
                    map: RwLock::new(ShardMap::default()),
                    other: OnceLock::new(),
                }),
                hasher: RandomState::new(),
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                capacity: statements,
                len: AtomicUsize::new(0),
                overflowed: Distinct::new(),
            }),
        }
    }

    /// The most statements kept.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Statements kept now (the `<other>` entry aside).
    pub fn len(&self) -> usize {
        self.inner.len.load(Ordering::Relaxed)
    }

    /// Whether no statement is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An estimate (within a few per cent) of how many distinct statements were
    /// counted under [`StatementStats::OTHER`] because the capacity was reached.
    pub fn overflowed(&self) -> u64 {
        self.inner.overflowed.estimate()
    }

    /// The key a statement is counted under (see [Keys](StatementStats#keys)).
    ///
    /// ```
    /// use railyard::StatementStats;
    /// assert_eq!(
    ///     StatementStats::key("SELECT * FROM t1 WHERE id IN (1, 2, 3) AND name = E'O\\'Brien' -- x"),
    ///     "SELECT * FROM t1 WHERE id IN (...) AND name = E'?'"
    /// );
    /// assert_eq!(StatementStats::key("UPDATE t SET n = n - 1 WHERE id = $1"), "UPDATE t SET n = n - ? WHERE id = $1");
    /// ```
    pub fn key(sql: &str) -> String {
        let mut out = String::new();
        normalize_into(sql, &mut out);
        out
    }

    /// All statements, and the `<other>` entry when it counted anything,
    /// sorted by total time, largest first.
    pub fn snapshot(&self) -> Vec<StatementStat> {
        let mut out = Vec::with_capacity(self.len() + 1);
        let mut other: Option<Figures> = None;
        for shard in &self.inner.shards {
            let map = shard.map.read().unwrap_or_else(PoisonError::into_inner);
            for (sql, figures) in map.values().flatten() {
                out.push(lock(figures).stat(sql));
            }
            drop(map);
            if let Some(part) = shard.other.get() {
                let part = lock(part);
                let sum = other.get_or_insert_with(Figures::new);
                sum.calls += part.calls;
                sum.errors += part.errors;
                sum.total_ns = sum.total_ns.saturating_add(part.total_ns);
                sum.hist.add(&part.hist);
            }
        }
        if let Some(other) = other.filter(|o| o.calls > 0) {
            out.push(other.stat(StatementStats::OTHER));
        }
        out.sort_by_key(|s| std::cmp::Reverse(s.total));
        out
    }

    /// Forgets everything (the capacity is free again).
    pub fn reset(&self) {
        for shard in &self.inner.shards {
            let mut map = shard.map.write().unwrap_or_else(PoisonError::into_inner);
            let held = map.values().map(Vec::len).sum::<usize>();
            map.clear();
            self.inner.len.fetch_sub(held, Ordering::Relaxed);
            drop(map);
            if let Some(other) = shard.other.get() {
                lock(other).clear();
            }
        }
        self.inner.overflowed.clear();
    }
}

impl QueryHook for StatementStats {
    fn on_query(&self, e: &QueryEvent<'_>) {
        let inner = &*self.inner;
        let fresh = |key: &mut String, sql: &str| {
            key.clear();
            normalize_into(sql, key);
            inner.hasher.hash_one(key.as_str())
        };
        RECENT.with(|recent| match recent.try_borrow_mut() {
            Ok(mut recent) => {
                if recent.slots.is_empty() {
                    recent.slots.resize_with(RECENT_SLOTS, RecentSlot::default);
                }
                let slot = &mut recent.slots[recent_slot(e.sql.as_bytes())];
                if slot.owner != inner.id || slot.sql != e.sql {
                    slot.hash = fresh(&mut slot.key, e.sql);
                    slot.sql.clear();
                    if e.sql.len() <= RECENT_MAX_SQL {
                        slot.sql.push_str(e.sql);
                        slot.owner = inner.id;
                    } else {
                        slot.owner = 0;
                    }
                }
                inner.record(&slot.key, slot.hash, e);
            }
            // Only if a hook re-entered on this thread.
            Err(_) => {
                let mut key = String::new();
                let hash = fresh(&mut key, e.sql);
                inner.record(&key, hash, e);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use proptest::prelude::*;

    use super::*;
    use crate::conn::Route;

    fn key(sql: &str) -> String {
        StatementStats::key(sql)
    }

    fn sanitize(sql: &str) -> String {
        let mut out = String::new();
        sanitize_into(sql, &mut out);
        out
    }

    fn event<'a>(sql: &'a str, route: &'a Route, micros: u64) -> QueryEvent<'a> {
        QueryEvent::new(sql, route, Duration::from_micros(micros))
    }

    /// Held by the tests that measure the process's memory, so that they do not
    /// measure each other.
    static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// The process's resident set, in KiB.
    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }

    #[test]
    fn constants_are_replaced_and_names_kept() {
        for (sql, want) in [
            (
                "SELECT * FROM t1 WHERE id = 42",
                "SELECT * FROM t1 WHERE id = ?",
            ),
            (
                "SELECT 1.5, .5, 6.02e23, 1e-3, 0x1F, 1_000",
                "SELECT ?, ?, ?, ?, ?, ?",
            ),
            (
                "SELECT a FROM t WHERE x = -5 AND y > +2",
                "SELECT a FROM t WHERE x = ? AND y > ?",
            ),
            ("SELECT -1, (-2)", "SELECT ?, (?)"),
            (
                "UPDATE t SET n = n -1 WHERE id = $1",
                "UPDATE t SET n = n -? WHERE id = $1",
            ),
            (
                "SELECT col2, t3.c4, \"Weird 5\", a$6 FROM s7.t8",
                "SELECT col2, t3.c4, \"Weird 5\", a$6 FROM s7.t8",
            ),
            ("SELECT $1, $22", "SELECT $1, $22"),
            ("SELECT 'it''s', 'x'", "SELECT '?', '?'"),
            ("SELECT E'it\\'s \\\\', e'x'", "SELECT E'?', e'?'"),
            ("SELECT $$a 'b' $c$$, $fn$ x $$ y $fn$", "SELECT '?', '?'"),
            (
                "SELECT B'101', X'1F', N'n', U&'d\\0061'",
                "SELECT B'?', X'?', N'?', U&'?'",
            ),
            ("SELECT 'a' 'b'", "SELECT '?' '?'"),
            ("SELECT 'a'$$b$$", "SELECT '?' '?'"),
            (
                "SELECT * FROM t WHERE id IN (1, 2, 3)",
                "SELECT * FROM t WHERE id IN (...)",
            ),
            (
                "SELECT * FROM t WHERE id in($1,$2) OR x IN ('a', NULL, -1.5)",
                "SELECT * FROM t WHERE id in (...) OR x IN (...)",
            ),
            (
                "SELECT * FROM t WHERE id IN (SELECT 1)",
                "SELECT * FROM t WHERE id IN (SELECT ?)",
            ),
            (
                "SELECT ARRAY[1, 2, 3], ARRAY [$1]",
                "SELECT ARRAY[...], ARRAY[...]",
            ),
            (
                "SELECT 1 -- trailing 5\nFROM /* a /* nested */ 'x' */ t",
                "SELECT ? FROM t",
            ),
            ("  SELECT\n\t1  ", "SELECT ?"),
            ("SELECT 'unterminated", "SELECT '?'"),
            ("SELECT $tag$ unterminated", "SELECT '?'"),
            ("SELECT \"unterminated", "SELECT \"unterminated"),
            (
                "SELECT 'é€' AS \"ünï\", ünï2",
                "SELECT '?' AS \"ünï\", ünï2",
            ),
            ("", ""),
        ] {
            assert_eq!(key(sql), want, "{sql}");
        }
    }

    #[test]
    fn the_event_text_hides_every_string_form_and_nothing_else() {
        for (sql, want) in [
            (
                "ALTER ROLE r PASSWORD 'hunter2'",
                "ALTER ROLE r PASSWORD '?'",
            ),
            ("SELECT E'it\\'s secret'", "SELECT E'?'"),
            ("DO $$ BEGIN PERFORM 'secret'; END $$", "DO '?'"),
            ("SELECT $k$secret$k$, $1, 42", "SELECT '?', $1, 42"),
            ("SELECT 1 -- don't\n, 'secret'", "SELECT 1 -- don't\n, '?'"),
            ("SELECT \"it's\" FROM t", "SELECT \"it's\" FROM t"),
            ("SELECT U&'x', X'1F'", "SELECT U&'?', X'?'"),
        ] {
            assert_eq!(sanitize(sql), want, "{sql}");
        }
    }

    #[test]
    fn long_keys_are_cut_at_a_token_boundary() {
        let mut sql = String::from("SELECT ");
        for i in 0..2_000 {
            write!(sql, "column_{i}, ").unwrap();
        }
        sql.push_str("1 FROM t");
        let k = key(&sql);
        assert!(k.len() <= StatementStats::MAX_KEY_LEN, "{}", k.len());
        assert!(
            k.ends_with(",  …") || k.ends_with(" …"),
            "{}",
            &k[k.len() - 20..]
        );
        assert!(k.starts_with("SELECT column_0, column_1,"));
        assert_eq!(key(&k), k);
        // One token longer than the limit.
        let giant = format!("SELECT {}", "x".repeat(10_000));
        assert_eq!(key(&giant), "SELECT …");
        assert_eq!(key(&"y".repeat(10_000)), "…");
    }

    /// A constant, rendered with one value or another.
    #[derive(Debug, Clone)]
    enum Constant {
        Int(i64),
        Float(f64),
        Str(String),
        EStr(String),
        Dollar(String),
        Tagged(String),
        List(Vec<Constant>),
    }

    impl Constant {
        fn render(&self, out: &mut String) {
            match self {
                Constant::Int(n) => write!(out, "{n}").unwrap(),
                Constant::Float(f) => write!(out, "{f:?}").unwrap(),
                Constant::Str(s) => write!(out, "'{}'", s.replace('\'', "''")).unwrap(),
                Constant::EStr(s) => {
                    write!(out, "E'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")).unwrap()
                }
                Constant::Dollar(s) => write!(out, "$${}$$", s.replace('$', "S")).unwrap(),
                Constant::Tagged(s) => write!(out, "$q1$ {} $q1$", s.replace("$q1$", "")).unwrap(),
                Constant::List(items) => {
                    out.push_str("IN (");
                    for (i, c) in items.iter().enumerate() {
                        if i > 0 {
                            out.push_str(", ");
                        }
                        c.render(out);
                    }
                    out.push(')');
                }
            }
        }

        /// The same kind with another value.
        fn other_value(&self) -> BoxedStrategy<Constant> {
            let text = ".{0,12}";
            match self {
                Constant::Int(_) => any::<i64>().prop_map(Constant::Int).boxed(),
                Constant::Float(_) => (-1e300f64..1e300).prop_map(Constant::Float).boxed(),
                Constant::Str(_) => text.prop_map(Constant::Str).boxed(),
                Constant::EStr(_) => text.prop_map(Constant::EStr).boxed(),
                Constant::Dollar(_) => text.prop_map(Constant::Dollar).boxed(),
                Constant::Tagged(_) => text.prop_map(Constant::Tagged).boxed(),
                // Any length: lists collapse.
                Constant::List(_) => prop::collection::vec(scalar(), 1..6)
                    .prop_map(Constant::List)
                    .boxed(),
            }
        }
    }

    fn scalar() -> impl Strategy<Value = Constant> {
        let text = ".{0,12}";
        prop_oneof![
            any::<i64>().prop_map(Constant::Int),
            (-1e300f64..1e300).prop_map(Constant::Float),
            text.prop_map(Constant::Str),
            text.prop_map(Constant::EStr),
            text.prop_map(Constant::Dollar),
            text.prop_map(Constant::Tagged),
        ]
    }

    fn constant() -> impl Strategy<Value = Constant> {
        prop_oneof![
            4 => scalar(),
            1 => prop::collection::vec(scalar(), 1..6).prop_map(Constant::List),
        ]
    }

    /// Words between the constants: names with digits, quoted names,
    /// placeholders, comments, keywords, operators.
    const WORDS: [&str; 16] = [
        "SELECT",
        "t1",
        "a_2",
        "x$3",
        "\"Col 4\"",
        "$1",
        "AND",
        "(",
        ")",
        ",",
        "::int4",
        "/* 5 */",
        "-- 6\n",
        "E",
        "IN",
        "+",
    ];

    /// Where a constant goes: after an operator, so that its sign is its own.
    const BEFORE: [&str; 5] = ["=", "(", ",", "<", "LIMIT"];

    fn statement() -> impl Strategy<Value = Vec<(usize, usize, Constant)>> {
        prop::collection::vec((0..WORDS.len(), 0..BEFORE.len(), constant()), 1..8)
    }

    fn render(parts: &[(usize, usize, Constant)]) -> String {
        let mut out = String::new();
        for (word, before, c) in parts {
            write!(out, "{} {} ", WORDS[*word], BEFORE[*before]).unwrap();
            c.render(&mut out);
            out.push(' ');
        }
        out
    }

    fn two_renderings() -> impl Strategy<Value = (String, String)> {
        statement()
            .prop_flat_map(|parts| {
                let others: Vec<_> = parts.iter().map(|(_, _, c)| c.other_value()).collect();
                (Just(parts), others)
            })
            .prop_map(|(parts, values)| {
                let other: Vec<_> = parts
                    .iter()
                    .zip(values)
                    .map(|((w, b, _), c)| (*w, *b, c))
                    .collect();
                (render(&parts), render(&other))
            })
    }

    /// Text heavy in the characters the lexer cares about.
    fn sqlish() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "[-+ .,()\\[\\]'\"$eEuUxX&\\\\/*\n0-9a-zIiNnéü€?;:]{0,60}",
            prop::collection::vec(
                prop::sample::select(vec![
                    "'", "''", "\"", "$", "$$", "$a$", "$1", "E'", "e'", "U&'", "\\", "--", "/*",
                    "*/", "\n", " ", "-", "+", ".", "...", "1", "2.5", "e3", "IN", "in", "(", ")",
                    "ARRAY", "[", "]", ",", "NULL", "?", "x", "t1", "é", "€", "SELECT", "LIMIT",
                ]),
                0..40,
            )
            .prop_map(|parts| parts.concat()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn statements_differing_only_in_constants_share_a_key((a, b) in two_renderings()) {
            prop_assert_eq!(key(&a), key(&b), "{:?} / {:?}", a, b);
        }

        #[test]
        fn normalising_a_key_gives_the_same_key(sql in sqlish()) {
            let k = key(&sql);
            prop_assert!(k.len() <= StatementStats::MAX_KEY_LEN);
            prop_assert_eq!(key(&k), k.clone(), "from {:?}", sql);
            // The event text: no panic either, and literals never survive it.
            let _ = sanitize(&sql);
        }

        #[test]
        fn long_text_is_cut_idempotently(parts in prop::collection::vec(sqlish(), 60..120)) {
            let sql = parts.concat();
            let k = key(&sql);
            prop_assert!(k.len() <= StatementStats::MAX_KEY_LEN);
            prop_assert_eq!(key(&k), k);
        }
    }

    #[test]
    fn statements_beyond_the_cap_count_as_other() {
        let stats = StatementStats::with_capacity(3);
        let route = Route::Primary;
        for round in 0..2 {
            for t in 0..10 {
                let sql = format!("SELECT * FROM table_{t} WHERE id = {round}");
                let mut e = event(&sql, &route, 100 + t);
                if t == 9 {
                    e.outcome = Outcome::Error;
                }
                stats.on_query(&e);
            }
        }
        assert_eq!(stats.len(), 3);
        let snap = stats.snapshot();
        assert_eq!(snap.len(), 4);
        assert_eq!(snap.iter().map(|s| s.calls).sum::<u64>(), 20);
        let other = snap
            .iter()
            .find(|s| s.sql == StatementStats::OTHER)
            .unwrap();
        assert_eq!((other.calls, other.errors), (14, 2));
        // An estimate: two of the seven may share a register.
        assert!(
            (6..=7).contains(&stats.overflowed()),
            "{}",
            stats.overflowed()
        );
        let kept = snap
            .iter()
            .find(|s| s.sql == "SELECT * FROM table_0 WHERE id = ?")
            .unwrap();
        assert_eq!((kept.calls, kept.total), (2, Duration::from_micros(200)));
        assert_eq!(kept.p50, Duration::from_micros(100));

        stats.reset();
        assert!(stats.is_empty() && stats.snapshot().is_empty());
        assert_eq!(stats.overflowed(), 0);
        stats.on_query(&event("SELECT 9", &route, 5));
        assert_eq!(stats.snapshot()[0].sql, "SELECT ?");
    }

    #[test]
    fn concurrent_threads_fill_the_cap_exactly_and_lose_no_call() {
        let stats = StatementStats::with_capacity(500);
        let threads = 8;
        let per_thread = 400;
        std::thread::scope(|s| {
            for t in 0..threads {
                let stats = stats.clone();
                s.spawn(move || {
                    let route = Route::Primary;
                    for i in 0..per_thread {
                        // Half shared between threads, half each thread's own.
                        let sql = if i % 2 == 0 {
                            format!("SELECT * FROM shared_{i}")
                        } else {
                            format!("SELECT * FROM own_{t}_{i}")
                        };
                        stats.on_query(&event(&sql, &route, 10));
                    }
                });
            }
        });
        assert_eq!(stats.len(), 500);
        let snap = stats.snapshot();
        assert_eq!(snap.len(), 501);
        assert_eq!(
            snap.iter().map(|s| s.calls).sum::<u64>(),
            (threads * per_thread) as u64
        );
        // 200 shared and 1,600 own statements: 1,300 beyond the cap.
        let overflowed = stats.overflowed() as f64;
        assert!((overflowed - 1_300.0).abs() < 130.0, "{overflowed}");
    }

    #[test]
    fn a_statement_takes_about_thirteen_kib() {
        assert_eq!(super::super::hist::BUCKETS, 3_328);
        let _measuring = MEASURING.lock().unwrap_or_else(PoisonError::into_inner);
        let n = 5_000;
        let stats = StatementStats::with_capacity(n);
        let route = Route::Primary;
        let mut sql = String::new();
        let before = rss_kib();
        for i in 0..n {
            sql.clear();
            write!(sql, "SELECT balance_cents FROM accounts_{i} WHERE id = $1").unwrap();
            stats.on_query(&event(&sql, &route, 100));
        }
        let per_statement = (rss_kib() - before) * 1024 / n as u64;
        eprintln!("{per_statement} bytes per statement (RSS over {n} statements)");
        assert_eq!(stats.len(), n);
        assert!(per_statement < 16 * 1024, "{per_statement}");
    }

    /// Statements in the flood test: `RAILYARD_STATS_FLOOD` overrides.
    fn flood_size() -> usize {
        std::env::var("RAILYARD_STATS_FLOOD")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000)
    }

    #[test]
    fn a_flood_of_distinct_statements_keeps_memory_flat_and_the_hot_ones_intact() {
        let _measuring = MEASURING.lock().unwrap_or_else(PoisonError::into_inner);
        let stats = StatementStats::new();
        let route = Route::Primary;
        let hot = [
            "SELECT balance_cents FROM accounts WHERE id = $1",
            "UPDATE accounts SET balance_cents = balance_cents - $1 WHERE id = $2",
            "INSERT INTO transfers (from_id, to_id, cents) VALUES ($1, $2, $3)",
            "SELECT * FROM users WHERE email = $1",
            "BEGIN",
            "COMMIT",
        ];
        let mut sent = 0u64;
        for (h, sql) in hot.iter().enumerate() {
            for i in 0..300u64 {
                let mut e = event(sql, &route, 50 + (i * 37 + h as u64 * 11) % 5_000);
                if i % 17 == 0 {
                    e.outcome = Outcome::Error;
                }
                stats.on_query(&e);
                sent += 1;
            }
        }
        let hot_figures = |stats: &StatementStats| {
            stats
                .snapshot()
                .into_iter()
                .filter(|s| hot.contains(&s.sql.as_str()))
                .collect::<Vec<_>>()
        };
        let before = hot_figures(&stats);
        assert_eq!(before.len(), hot.len());

        let n = flood_size();
        let started = std::time::Instant::now();
        let rss_start = rss_kib();
        let mut rss_half = rss_start;
        let mut sql = String::with_capacity(128);
        for i in 0..n {
            sql.clear();
            match i % 5 {
                0 => write!(sql, "SELECT * FROM t WHERE id = {i}"),
                1 => write!(sql, "SELECT * FROM t WHERE name = '{i}' AND score > {i}.5"),
                2 => write!(sql, "SELECT * FROM t WHERE body = $${i}$$ LIMIT {i}"),
                3 => write!(
                    sql,
                    "SELECT * FROM t WHERE note = E'{i}\\'s' AND id IN ({i}, {i}, 7)"
                ),
                // Distinct statements: the first ones fill the cap, the rest overflow.
                _ => write!(sql, "SELECT * FROM flood_{i} WHERE id = $1"),
            }
            .unwrap();
            stats.on_query(&event(&sql, &route, 1 + (i as u64 % 10_000)));
            sent += 1;
            if i == n / 2 {
                rss_half = rss_kib();
            }
        }
        let rss_end = rss_kib();
        eprintln!(
            "flood of {n} statements in {:?}: RSS {} KiB at the start, +{} KiB at half, +{} KiB at the end",
            started.elapsed(),
            rss_start,
            rss_half.saturating_sub(rss_start),
            rss_end.saturating_sub(rss_start),
        );
        assert!(
            rss_end.saturating_sub(rss_start) < 64 * 1024,
            "RSS grew by {} KiB",
            rss_end - rss_start
        );
        assert!(
            rss_end.saturating_sub(rss_half) < 8 * 1024,
            "RSS grew by {} KiB in the second half",
            rss_end - rss_half
        );

        assert_eq!(
            hot_figures(&stats),
            before,
            "the hot statements are untouched"
        );
        assert_eq!(stats.len(), stats.capacity());
        let snap = stats.snapshot();
        assert_eq!(snap.iter().map(|s| s.calls).sum::<u64>(), sent);
        // Four literal-bearing shapes share four keys.
        for shape in [
            "SELECT * FROM t WHERE id = ?",
            "SELECT * FROM t WHERE name = '?' AND score > ?",
            "SELECT * FROM t WHERE body = '?' LIMIT ?",
            "SELECT * FROM t WHERE note = E'?' AND id IN (...)",
        ] {
            let s = snap.iter().find(|s| s.sql == shape).expect(shape);
            assert!(s.calls >= (n / 5) as u64, "{shape}: {}", s.calls);
        }
        if n >= 10 * StatementStats::DEFAULT_CAPACITY {
            let distinct = n / 5;
            let kept = StatementStats::DEFAULT_CAPACITY - hot.len() - 4;
            let other = snap
                .iter()
                .find(|s| s.sql == StatementStats::OTHER)
                .unwrap();
            assert_eq!(other.calls, (distinct - kept) as u64);
            let estimate = stats.overflowed() as f64;
            let exact = (distinct - kept) as f64;
            assert!(
                (estimate - exact).abs() < exact * 0.1,
                "{estimate} vs {exact}"
            );
        }
    }
}
