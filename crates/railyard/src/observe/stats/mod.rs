//! Per-statement statistics in bounded memory: [`StatementStats`], its
//! per-thread cache of recent statements, and [`StatementStat`]. The
//! statement shapes are in `shape`, the sharded storage in `store`.

use std::cell::RefCell;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{OnceLock, PoisonError, RwLock};
use std::time::Duration;

use super::{QueryEvent, QueryHook};

mod shape;
mod store;
#[cfg(test)]
mod tests;

pub(in crate::observe) use shape::{normalize_into, sanitize_into};
use store::*;

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
