//! What the data layer sees: per-query timing through diesel's
//! `Instrumentation`, hooks, statement statistics, Railyard's own metrics, the
//! health verdict ([`health`]) and the Prometheus text (`prometheus`).
//!
//! Every connection gets an instrumentation that pairs `StartQuery` with
//! `FinishQuery` in order (a FIFO, since pipelined queries interleave), and hands
//! each finished query to the hooks as a [`QueryEvent`]: the statement text
//! (parameterised; the contents of string literals, in every quoting form,
//! replaced by `?`; never bind values), its duration, host, route, transaction
//! depth, retry attempt, outcome, and for failures the query's own SQLSTATE
//! (from the protocol tap) and [`ErrorClass`]. The per-query path reuses its
//! buffers: once warm, it allocates nothing of its own.
//!
//! Hooks run synchronously on the connection's task, so they must be cheap: no
//! I/O, no blocking locks held for long. The built-in ones are:
//!
//! - [`SlowQueryLog`]: a `tracing` warning on target `railyard::slow` above a threshold;
//! - [`StatementStats`]: calls, errors, total and mean time and p50/p95/p99 per
//!   statement (statements differing only in constants share one entry), in
//!   bounded memory, as a snapshot sorted by total time;
//! - [`QuerySpans`]: a `tracing` span per query named and attributed per
//!   OpenTelemetry's database conventions (`db.system.name`, `db.namespace`,
//!   `db.operation.name`, `db.collection.name`, `db.query.text`,
//!   `db.response.status_code`, `server.address`, `server.port`);
//! - [`AuditLog`]: data-changing statements (INSERT, UPDATE, DELETE, DDL) on
//!   target `railyard::audit`, without values.
//!
//! Railyard's own metrics (durations per route in OpenTelemetry's buckets, errors
//! by class) are always collected; they feed [`crate::Database::health`] and the
//! Prometheus endpoint.
//!
//! This layer sits above connections, routing and migrations: it reads their
//! state and never drives them. The connection layer calls into it only through
//! the `Instrument` seam.

mod activity;
#[doc(hidden)]
pub use activity::LatencyBuckets;
pub use activity::{Activity, LATENCY_BUCKETS, LatencyCounts};
pub mod health;
mod hist;
pub use health::{HealthCheck, HealthReport, HealthStatus};
mod plans;
pub(crate) mod prometheus;
mod stats;
mod storage;
pub use storage::{StorageFigures, TableSize};
pub(crate) use storage::{check as storage_check, render as render_storage};
mod watchdog;
#[doc(hidden)]
pub use plans::explain as explain_generic;
pub use plans::{CapturedPlan, CostNode, MAX_PLAN_CHANGES, MAX_PLANS, PlanCapture, PlanChange};
pub(crate) use plans::{ChangeHook, PlanStore, spawn as spawn_plans};
use stats::sanitize_into;
pub use stats::{StatementStat, StatementStats};
pub use watchdog::Watchdog;

/// A statement's shape: string and numeric constants replaced by `?`, as
/// statement statistics group it. Bind parameters (`$1`) stay placeholders;
/// no value survives.
///
/// ```
/// let shape = railyard::observe::statement_shape("SELECT * FROM users WHERE email = 'a@b.c' AND id > 42");
/// assert!(!shape.contains("a@b.c") && !shape.contains("42"), "{shape}");
/// ```
pub fn statement_shape(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    stats::normalize_into(sql, &mut out);
    out
}
pub(crate) use watchdog::{Running as RunningWatchdog, spawn as spawn_watchdog};

use std::collections::VecDeque;
use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::{Instrumentation, InstrumentationEvent};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::AsyncPgConnection;
use tokio_postgres::error::SqlState;

use crate::conn::wire::{WireMark, WireState};
use crate::conn::{ConnLabels, Instrument, Route};
use crate::error::{ErrorClass, classify};

/// Whether a query succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// It succeeded.
    Ok,
    /// It failed.
    Error,
}

/// One finished query.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct QueryEvent<'a> {
    /// The statement text: parameterised, the contents of string literals
    /// (`'…'`, `E'…'`, `$$…$$`, `$tag$…$tag$`, …) replaced by `?`.
    pub sql: &'a str,
    /// The operation (`SELECT`, `INSERT`, `BEGIN`, …).
    pub operation: &'a str,
    /// The table the statement names first, when it names one.
    pub table: Option<&'a str>,
    /// From the query's send to its result.
    pub duration: Duration,
    /// Host (or socket directory) of the server.
    pub host: &'a str,
    /// Port of the server.
    pub port: u16,
    /// Database name.
    pub database: &'a str,
    /// Primary or which replica.
    pub route: &'a Route,
    /// Transaction depth when the query ran (0: autocommit).
    pub depth: u32,
    /// The attempt of the enclosing operation (1 unless retried).
    pub attempt: u32,
    /// Success or failure.
    pub outcome: Outcome,
    /// The class of the failure.
    pub class: Option<ErrorClass>,
    /// The SQLSTATE of this query's failure, from the protocol tap (or from the
    /// driver's error kind). `None` when the failure was not the server's (a
    /// value that did not serialise, a lost connection), and for the rare
    /// pipelined query whose error the tap had already seen replaced by a later
    /// query's before this event: never another query's code.
    pub sqlstate: Option<&'a str>,
}

impl<'a> QueryEvent<'a> {
    /// A successful event for `sql` on `route` (operation and table read from
    /// the text; no host, port or database): for testing your own hooks.
    ///
    /// ```
    /// use std::time::Duration;
    /// use railyard::{QueryEvent, QueryHook, Route, StatementStats};
    /// let stats = StatementStats::new();
    /// let route = Route::Primary;
    /// stats.on_query(&QueryEvent::new("SELECT 1", &route, Duration::from_millis(2)));
    /// assert_eq!(stats.snapshot()[0].calls, 1);
    /// ```
    pub fn new(sql: &'a str, route: &'a Route, duration: Duration) -> Self {
        let (operation, table) = operation_and_table(sql);
        QueryEvent {
            sql,
            operation,
            table,
            duration,
            host: "",
            port: 0,
            database: "",
            route,
            depth: 0,
            attempt: 1,
            outcome: Outcome::Ok,
            class: None,
            sqlstate: None,
        }
    }
}

/// Receives every finished query. Runs synchronously on the connection's task:
/// keep it cheap (no I/O, no long locks).
///
/// Closures implement it:
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// static SLOW: AtomicU64 = AtomicU64::new(0);
/// let hook = |e: &railyard::QueryEvent<'_>| {
///     if e.duration.as_millis() > 100 {
///         SLOW.fetch_add(1, Ordering::Relaxed);
///     }
/// };
/// # let _ = railyard::Database::builder(railyard::Config::from_url("postgres://u@h/d").unwrap()).hook(hook);
/// ```
pub trait QueryHook: Send + Sync + 'static {
    /// Called once per finished query.
    fn on_query(&self, event: &QueryEvent<'_>);
}

impl<F> QueryHook for F
where
    F: Fn(&QueryEvent<'_>) + Send + Sync + 'static,
{
    fn on_query(&self, event: &QueryEvent<'_>) {
        self(event)
    }
}

/// A `tracing` warning on target `railyard::slow` for queries slower than a threshold.
#[derive(Debug, Clone)]
pub struct SlowQueryLog {
    threshold: Duration,
}

impl SlowQueryLog {
    /// Logs queries that take `threshold` or longer.
    pub fn new(threshold: Duration) -> Self {
        SlowQueryLog { threshold }
    }
}

impl QueryHook for SlowQueryLog {
    fn on_query(&self, e: &QueryEvent<'_>) {
        if e.duration >= self.threshold {
            tracing::warn!(
                target: "railyard::slow",
                statement = e.sql,
                duration_ms = e.duration.as_secs_f64() * 1000.0,
                route = %e.route,
                host = e.host,
                port = e.port,
                outcome = ?e.outcome,
                "slow query"
            );
        }
    }
}

/// Data-changing statements on target `railyard::audit`, without values.
#[derive(Debug, Clone, Default)]
pub struct AuditLog;

impl QueryHook for AuditLog {
    fn on_query(&self, e: &QueryEvent<'_>) {
        let changes = matches!(
            e.operation,
            "INSERT"
                | "UPDATE"
                | "DELETE"
                | "MERGE"
                | "TRUNCATE"
                | "CREATE"
                | "ALTER"
                | "DROP"
                | "GRANT"
                | "REVOKE"
                | "COPY"
        );
        if changes {
            tracing::info!(
                target: "railyard::audit",
                operation = e.operation,
                table = e.table.unwrap_or(""),
                statement = e.sql,
                outcome = ?e.outcome,
                sqlstate = e.sqlstate.unwrap_or(""),
                host = e.host,
                database = e.database,
                "data change"
            );
        }
    }
}

/// A `tracing` span per query, named `<operation> <table>` and attributed per
/// OpenTelemetry's database semantic conventions. Inside Railyard's
/// `transaction`, `write` and `read`, the spans are children of the operation's
/// span, whose events record the retries.
#[derive(Debug, Clone, Default)]
pub struct QuerySpans;

impl QueryHook for QuerySpans {
    fn on_query(&self, e: &QueryEvent<'_>) {
        let name = match e.table {
            Some(t) => format!("{} {t}", e.operation),
            None => e.operation.to_owned(),
        };
        let span = tracing::info_span!(
            target: "railyard::query",
            "db.query",
            otel.name = %name,
            otel.kind = "client",
            db.system.name = "postgresql",
            db.namespace = e.database,
            db.operation.name = e.operation,
            db.collection.name = e.table,
            db.query.text = e.sql,
            db.response.status_code = e.sqlstate,
            error.type = e.class.map(ErrorClass::as_str),
            server.address = e.host,
            server.port = e.port,
            db.client.operation.duration = e.duration.as_secs_f64(),
            railyard.route = %e.route,
            railyard.attempt = e.attempt,
        );
        // The span covers the query's result; its duration is recorded as the
        // attribute above (the query began before this hook ran).
        drop(span.enter());
    }
}

/// OpenTelemetry's recommended bucket bounds for `db.client.operation.duration`, in seconds.
pub(crate) const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// A duration histogram with OpenTelemetry's buckets.
#[derive(Debug, Default)]
pub(crate) struct DurationHistogram {
    pub(crate) buckets: [AtomicU64; 15],
    pub(crate) sum_ns: AtomicU64,
    pub(crate) count: AtomicU64,
}

impl DurationHistogram {
    fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = DURATION_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(DURATION_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Railyard's own always-on figures: durations per route, errors by class, and
/// a sliding window of recent outcomes for the health report.
#[derive(Debug)]
pub(crate) struct Metrics {
    pub(crate) primary: DurationHistogram,
    pub(crate) replica: DurationHistogram,
    pub(crate) errors: [AtomicU64; CLASS_COUNT],
    /// Every query's latency, in fine buckets (for samplers).
    pub(crate) latency: activity::LatencyBuckets,
    /// Per-second buckets of the last minute, indexed by second modulo 60:
    /// bounded, and lock-free (a query records with atomics only).
    window: [Second; WINDOW],
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            primary: DurationHistogram::default(),
            replica: DurationHistogram::default(),
            errors: Default::default(),
            latency: Default::default(),
            window: std::array::from_fn(|_| Second::default()),
        }
    }
}

/// Seconds kept for the recent error rate.
const WINDOW: usize = 60;

/// Queries and errors by class in one second.
#[derive(Debug, Default)]
struct Second {
    /// Which second (since the process's first query) the counts are for.
    at: AtomicU64,
    total: AtomicU64,
    errors: [AtomicU64; CLASS_COUNT],
}

const CLASS_COUNT: usize = ErrorClass::ALL.len();

fn epoch_secs() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

impl Metrics {
    fn record(&self, e: &QueryEvent<'_>) {
        match e.route {
            Route::Primary => self.primary.record(e.duration),
            Route::Replica(_) => self.replica.record(e.duration),
        }
        self.latency.record(e.duration);
        self.count(e.class);
    }

    /// A check-out that failed (no connection could be opened, the pool timed
    /// out, the circuit is open): an operation that failed before its query,
    /// counted with the queries in the error rate.
    pub(crate) fn record_failed_checkout(&self, class: ErrorClass) {
        self.count(Some(class));
    }

    fn count(&self, class: Option<ErrorClass>) {
        let class = class.map(ErrorClass::index);
        if let Some(i) = class {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
        let now = epoch_secs();
        let slot = &self.window[(now % WINDOW as u64) as usize];
        let at = slot.at.load(Ordering::Acquire);
        // A bucket last used a minute (or more) ago is taken over by the first
        // query of this second; counts from another thread racing the takeover
        // may land before the reset and be lost: an approximation of a second's
        // worth at most, which the health rate can afford.
        if at != now
            && slot
                .at
                .compare_exchange(at, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.total.store(0, Ordering::Relaxed);
            for e in &slot.errors {
                e.store(0, Ordering::Relaxed);
            }
        }
        slot.total.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = class {
            slot.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The cumulative figures a sampler diffs.
    pub(crate) fn activity(&self, retries: Vec<(ErrorClass, u64)>) -> Activity {
        Activity {
            queries: self.primary.count.load(Ordering::Relaxed)
                + self.replica.count.load(Ordering::Relaxed),
            latency: self.latency.counts(),
            errors: ErrorClass::ALL
                .iter()
                .map(|c| (*c, self.errors[c.index()].load(Ordering::Relaxed)))
                .collect(),
            retries,
        }
    }

    /// Queries and errors by class over the last minute.
    pub(crate) fn recent(&self) -> (u64, [u64; CLASS_COUNT]) {
        let now = epoch_secs();
        let mut total = 0;
        let mut errors = [0; CLASS_COUNT];
        for slot in &self.window {
            let at = slot.at.load(Ordering::Acquire);
            // Slot 0 starts at second 0 with nothing in it: harmless.
            if now.saturating_sub(at) < WINDOW as u64 {
                total += slot.total.load(Ordering::Relaxed);
                for (sum, e) in errors.iter_mut().zip(&slot.errors) {
                    *sum += e.load(Ordering::Relaxed);
                }
            }
        }
        (total, errors)
    }
}

/// `opener` with its connections' statements recorded (the test harness's
/// query counts) and reported to no hook. Workspace-internal.
#[doc(hidden)]
pub fn recorded(opener: crate::conn::open::Opener) -> crate::conn::open::Opener {
    static OBSERVER: std::sync::OnceLock<Arc<Observer>> = std::sync::OnceLock::new();
    let observer = OBSERVER.get_or_init(Arc::default).clone();
    opener.observed(observer, crate::conn::Route::Primary)
}

/// The hooks and metrics of one `Database`.
#[derive(Default)]
pub(crate) struct Observer {
    pub(crate) hooks: Vec<Arc<dyn QueryHook>>,
    pub(crate) metrics: Metrics,
    /// Warn when one statement runs this many times in one operation.
    pub(crate) repeats: Option<u32>,
    /// Where slow statements are offered for their plans.
    pub(crate) plans: Option<Arc<PlanStore>>,
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Observer({} hooks)", self.hooks.len())
    }
}

impl Instrument for Observer {
    fn install(
        self: Arc<Self>,
        pg: &mut AsyncPgConnection,
        labels: Arc<ConnLabels>,
        wire: Arc<WireState>,
    ) {
        diesel_async::AsyncConnection::set_instrumentation(
            pg,
            ConnInstrumentation::new(self, labels, wire),
        );
    }
}

/// The instrumentation installed on every connection.
pub(crate) struct ConnInstrumentation {
    observer: Arc<Observer>,
    labels: Arc<ConnLabels>,
    wire: Arc<WireState>,
    /// Queries started and not finished, oldest first: when each started, and
    /// where the connection's traffic stood then (pipelined queries finish in
    /// the order they started). Reused: it grows to the deepest pipeline once.
    pending: VecDeque<(Instant, WireMark)>,
    depth: u32,
    /// The statement as diesel displays it, up to the binds (reused buffer).
    raw: String,
    /// The statement with its literals replaced (reused buffer).
    sql: String,
    /// The SQLSTATE of the query being reported (reused buffer).
    code: String,
    /// Repeated statements of the current operation (see [`Repeats`]).
    repeats: Repeats,
}

impl ConnInstrumentation {
    pub(crate) fn new(
        observer: Arc<Observer>,
        labels: Arc<ConnLabels>,
        wire: Arc<WireState>,
    ) -> Self {
        ConnInstrumentation {
            observer,
            labels,
            wire,
            pending: VecDeque::with_capacity(8),
            depth: 0,
            raw: String::with_capacity(256),
            sql: String::with_capacity(256),
            code: String::with_capacity(8),
            repeats: Repeats::default(),
        }
    }
}

/// The most distinct statements one operation's repeat count keeps.
const REPEATS_BOUND: usize = 256;

/// Counts each normalised statement of one operation (a lease, or a
/// top-level transaction within it, or one attempt of a retried one), to warn
/// once when one of them reaches the threshold: the N+1 pattern, a query per
/// row of an earlier result where one query would do.
#[derive(Debug, Default)]
struct Repeats {
    operation: u64,
    attempt: u32,
    counts: std::collections::HashMap<String, u32>,
    shape: String,
}

impl Repeats {
    fn reset(&mut self) {
        self.counts.clear();
    }

    /// Counts `sql` (already literal-free); returns the count when it just
    /// reached `threshold`.
    fn count(&mut self, sql: &str, operation: u64, attempt: u32, threshold: u32) -> Option<u32> {
        if operation != self.operation || attempt != self.attempt {
            self.operation = operation;
            self.attempt = attempt;
            self.reset();
        }
        self.shape.clear();
        stats::normalize_into(sql, &mut self.shape);
        if !self.counts.contains_key(self.shape.as_str()) {
            if self.counts.len() >= REPEATS_BOUND {
                return None;
            }
            self.counts.insert(self.shape.clone(), 0);
        }
        let n = self.counts.get_mut(self.shape.as_str())?;
        *n += 1;
        (*n == threshold).then_some(*n)
    }
}

/// Writes a query's Display up to diesel's " -- binds: " marker and then stops
/// the formatting, so bind values are never even formatted.
struct UntilBinds<'a>(&'a mut String, bool);

const BINDS_MARKER: &str = " -- binds: ";

impl fmt::Write for UntilBinds<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.1 {
            return Err(fmt::Error);
        }
        match s.find(BINDS_MARKER) {
            Some(i) => {
                self.0.push_str(&s[..i]);
                self.1 = true;
                Err(fmt::Error)
            }
            None => {
                self.0.push_str(s);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
fn sanitize_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    sanitize_into(sql, &mut out);
    out
}

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
fn words_outside_calls(s: &str) -> impl Iterator<Item = &str> {
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

/// The SQLSTATE of a query that failed with `error` and began at `mark`, into
/// `out` (whether there is one).
///
/// The tap keeps only the latest `ErrorResponse`. It is this query's when it
/// arrived after the query began *and* is the one the driver reports (same
/// message): in a pipeline, the tap may already have read the errors of later
/// queries, and a query can fail in the client after an earlier one failed on
/// the server. Otherwise the driver's own kind names the SQLSTATE for the few
/// kinds it keeps; for the rest there is none rather than another query's.
/// Writes the SQLSTATE of `error` into `out` and returns whether it has one,
/// with the class the tap's full error gives (55P03 needs more than the code).
fn sqlstate_of(
    wire: &WireState,
    mark: WireMark,
    error: &DieselError,
    out: &mut String,
    class: &mut Option<ErrorClass>,
) -> bool {
    let DieselError::DatabaseError(kind, info) = error else {
        return false;
    };
    let lost = wire.is_closed();
    let from_tap = wire.with_error_since(mark, |server| {
        let ours = server.message == info.message();
        if ours {
            out.push_str(&server.code);
            *class = Some(server.class(lost));
        }
        ours
    });
    if from_tap == Some(true) {
        return true;
    }
    let code = match kind {
        DatabaseErrorKind::UniqueViolation => "23505",
        DatabaseErrorKind::ForeignKeyViolation => "23503",
        DatabaseErrorKind::NotNullViolation => "23502",
        DatabaseErrorKind::CheckViolation => "23514",
        DatabaseErrorKind::RestrictViolation => "23001",
        DatabaseErrorKind::ExclusionViolation => "23P01",
        DatabaseErrorKind::SerializationFailure => "40001",
        DatabaseErrorKind::ReadOnlyTransaction => "25006",
        _ => return false,
    };
    out.push_str(code);
    true
}

impl Instrumentation for ConnInstrumentation {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        match event {
            InstrumentationEvent::StartQuery { .. } => {
                self.pending.push_back((Instant::now(), self.wire.mark()))
            }
            InstrumentationEvent::FinishQuery { query, error, .. } => {
                let Some((start, mark)) = self.pending.pop_front() else {
                    return;
                };
                if self.labels.quiet.load(Ordering::Relaxed) {
                    return;
                }
                let duration = start.elapsed();
                // The statement's text is for hooks; Railyard's own metrics
                // need only the route, the duration and the class. Without
                // hooks, the text is never formatted.
                let repeats = self.observer.repeats;
                let recording = self.labels.recording.armed();
                let slow_plan = self
                    .observer
                    .plans
                    .as_ref()
                    .filter(|p| duration >= p.settings.threshold());
                let hooked = !self.observer.hooks.is_empty()
                    || repeats.is_some()
                    || recording
                    || slow_plan.is_some();
                self.raw.clear();
                self.sql.clear();
                if hooked {
                    let _ = write!(UntilBinds(&mut self.raw, false), "{query}");
                    sanitize_into(self.raw.trim(), &mut self.sql);
                }
                let (operation, table) = if hooked {
                    operation_and_table(&self.sql)
                } else {
                    ("", None)
                };
                self.code.clear();
                let (class, coded) = match error {
                    None => (None, false),
                    Some(error) => {
                        let mut tap_class = None;
                        let coded =
                            sqlstate_of(&self.wire, mark, error, &mut self.code, &mut tap_class);
                        // A known code is a constant: no allocation.
                        let state = coded.then(|| SqlState::from_code(&self.code));
                        let class = tap_class
                            .unwrap_or_else(|| classify(state.as_ref(), self.wire.is_closed()));
                        (Some(class), coded)
                    }
                };
                let event = QueryEvent {
                    sql: &self.sql,
                    operation,
                    table,
                    duration,
                    host: &self.labels.host,
                    port: self.labels.port,
                    database: &self.labels.database,
                    route: &self.labels.route,
                    depth: self.depth,
                    attempt: self.labels.attempt.load(Ordering::Relaxed).max(1),
                    outcome: if error.is_some() {
                        Outcome::Error
                    } else {
                        Outcome::Ok
                    },
                    class,
                    sqlstate: coded.then_some(self.code.as_str()),
                };
                self.observer.metrics.record(&event);
                if let Some(store) = slow_plan
                    && error.is_none()
                    && plans::explainable(operation, &self.sql)
                {
                    let mut shape = String::with_capacity(self.sql.len());
                    stats::normalize_into(&self.sql, &mut shape);
                    store.offer(&self.sql, &shape, duration);
                }
                if recording
                    && !matches!(
                        operation,
                        "BEGIN" | "COMMIT" | "ROLLBACK" | "SAVEPOINT" | "RELEASE" | "SET"
                    )
                {
                    self.labels.recording.record(&self.sql);
                }
                if let Some(threshold) = repeats
                    && !matches!(
                        operation,
                        "BEGIN" | "COMMIT" | "ROLLBACK" | "SAVEPOINT" | "RELEASE" | "SET"
                    )
                    && let Some(n) = self.repeats.count(
                        &self.sql,
                        self.labels.operation.load(Ordering::Relaxed),
                        event.attempt,
                        threshold,
                    )
                {
                    tracing::warn!(
                        target: "railyard::n_plus_one",
                        statement = %self.repeats.shape,
                        count = n,
                        route = %self.labels.route,
                        "the same statement ran {n} times in one operation (an N+1 pattern?): fetch the rows in one query"
                    );
                }
                for hook in &self.observer.hooks {
                    hook.on_query(&event);
                }
            }
            InstrumentationEvent::BeginTransaction { depth, .. } => {
                self.depth = depth.get();
                // Each top-level transaction counts on its own.
                if self.depth == 1 {
                    self.repeats.reset();
                }
            }
            InstrumentationEvent::CommitTransaction { depth, .. }
            | InstrumentationEvent::RollbackTransaction { depth, .. } => {
                self.depth = depth.get() - 1
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recent_window_counts_queries_and_errors_by_class() {
        let m = Metrics::default();
        let route = Route::Primary;
        let mut e = QueryEvent::new("SELECT 1", &route, Duration::from_millis(1));
        for _ in 0..5 {
            m.record(&e);
        }
        e.outcome = Outcome::Error;
        e.class = Some(ErrorClass::Timeout);
        m.record(&e);
        let (total, errors) = m.recent();
        assert_eq!(total, 6);
        assert_eq!(errors[ErrorClass::Timeout.index()], 1);
        assert_eq!(errors.iter().sum::<u64>(), 1);
    }

    #[test]
    fn string_literals_are_replaced() {
        assert_eq!(
            sanitize_sql("ALTER ROLE r PASSWORD 'hunter2'"),
            "ALTER ROLE r PASSWORD '?'"
        );
        assert_eq!(
            sanitize_sql("SELECT 'a''b', 'c' FROM t"),
            "SELECT '?', '?' FROM t"
        );
        assert_eq!(sanitize_sql("SELECT $1"), "SELECT $1");
        assert_eq!(sanitize_sql("SELECT 'unterminated"), "SELECT '?'");
    }

    #[test]
    fn operations_and_tables_are_named() {
        assert_eq!(
            operation_and_table("SELECT a FROM accounts WHERE x"),
            ("SELECT", Some("accounts"))
        );
        assert_eq!(
            operation_and_table("insert into \"users\" (a) values ($1)"),
            ("INSERT", Some("users"))
        );
        assert_eq!(
            operation_and_table("UPDATE orders SET"),
            ("UPDATE", Some("orders"))
        );
        assert_eq!(
            operation_and_table("CREATE TABLE IF NOT EXISTS t (a int)"),
            ("CREATE", Some("t"))
        );
        // A FROM among a function's arguments is not the statement's.
        assert_eq!(
            operation_and_table(
                "SELECT extract(epoch FROM taken_at)::float8 AS t, substring(x FROM ?) FROM railyard_migration_backups ORDER BY 1"
            ),
            ("SELECT", Some("railyard_migration_backups"))
        );
        assert_eq!(
            operation_and_table("SELECT count(*) FROM (SELECT 1 FROM t) s"),
            ("SELECT", Some("t"))
        );
        assert_eq!(
            operation_and_table("WITH x AS (SELECT a FROM accounts) SELECT * FROM x"),
            ("WITH", Some("accounts"))
        );
        assert_eq!(
            operation_and_table("INSERT INTO users(a) VALUES (?)"),
            ("INSERT", Some("users"))
        );
        assert_eq!(operation_and_table("SELECT f(((1)) FROM"), ("SELECT", None));
        assert_eq!(operation_and_table("BEGIN"), ("BEGIN", None));
        proptest::proptest!(|(sql in "(SELECT|WITH|INSERT INTO|UPDATE) [a-z()\"ÿ, ;]{0,40}( FROM [a-z()]{0,10})?")| {
            let (_, table) = operation_and_table(&sql);
            if let Some(t) = table {
                proptest::prop_assert!(!t.is_empty() && sql.contains(t));
                proptest::prop_assert!(!t.contains(['(', ')', ' ', ',', ';']), "{t}");
            }
        });
        assert_eq!(operation_and_table("SELECT 1"), ("SELECT", None));
        assert_eq!(operation_and_table("VACUUM"), ("OTHER", None));
    }

    #[test]
    fn the_binds_marker_stops_formatting() {
        struct Q;
        impl fmt::Display for Q {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let value = "secret-value";
                write!(f, "SELECT $1 -- binds: {value}")
            }
        }
        let mut out = String::new();
        let _ = write!(UntilBinds(&mut out, false), "{}", Q);
        assert_eq!(out, "SELECT $1");
    }

    /// An `ErrorResponse` as the server sends it.
    fn error_response(code: &str, message: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for (field, value) in [
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', code),
            (b'M', message),
        ] {
            body.push(field);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut m = vec![b'E'];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(&body);
        m
    }

    fn db_error(kind: DatabaseErrorKind, message: &str) -> DieselError {
        DieselError::DatabaseError(kind, Box::new(message.to_owned()))
    }

    type Seen = Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>;

    fn instrumented() -> (ConnInstrumentation, Arc<WireState>, Seen) {
        let seen: Seen = Arc::default();
        let hook = {
            let seen = seen.clone();
            move |e: &QueryEvent<'_>| {
                seen.lock()
                    .unwrap()
                    .push((e.sql.to_owned(), e.sqlstate.map(str::to_owned)))
            }
        };
        let observer = Arc::new(Observer {
            hooks: vec![Arc::new(hook), Arc::new(StatementStats::new())],
            metrics: Metrics::default(),
            repeats: None,
            plans: None,
        });
        let labels = Arc::new(ConnLabels {
            host: "h".into(),
            port: 5432,
            database: "d".into(),
            route: Route::Primary,
            attempt: Default::default(),
            operation: Default::default(),
            recording: Default::default(),
            quiet: Default::default(),
        });
        let wire = Arc::new(WireState::default());
        (
            ConnInstrumentation::new(observer, labels, wire.clone()),
            wire,
            seen,
        )
    }

    fn start(i: &mut ConnInstrumentation, sql: &str) {
        let q = diesel::connection::StrQueryHelper::new(sql);
        i.on_connection_event(InstrumentationEvent::start_query(&q));
    }

    fn finish(i: &mut ConnInstrumentation, sql: &str, error: Option<&DieselError>) {
        let q = diesel::connection::StrQueryHelper::new(sql);
        i.on_connection_event(InstrumentationEvent::finish_query(&q, error));
    }

    #[test]
    fn each_event_carries_its_own_sqlstate_or_none() {
        let (mut inst, wire, seen) = instrumented();
        let mut tap = crate::conn::wire::Framer::default();
        let div = db_error(DatabaseErrorKind::Unknown, "division by zero");
        let syntax = db_error(DatabaseErrorKind::Unknown, "invalid input syntax");
        let dup = db_error(DatabaseErrorKind::UniqueViolation, "duplicate key value");
        let client = DieselError::SerializationError("overflow".into());

        // A server error during the query: the tap's.
        start(&mut inst, "SELECT 1/0");
        tap.on_read(&error_response("22012", "division by zero"), &wire);
        finish(&mut inst, "SELECT 1/0", Some(&div));
        // A failure in the client after it: not the earlier query's code.
        start(&mut inst, "SELECT $1::interval");
        finish(&mut inst, "SELECT $1::interval", Some(&client));
        // A pipeline whose errors all reached the tap before the first event:
        // the first has none rather than the second's; the second its own; the
        // driver names a unique violation itself.
        for sql in ["SELECT 2/0", "SELECT 'x'::int", "SELECT 1", "INSERT INTO u"] {
            start(&mut inst, sql);
        }
        tap.on_read(&error_response("22012", "division by zero"), &wire);
        tap.on_read(&error_response("22P02", "invalid input syntax"), &wire);
        tap.on_read(&error_response("23505", "duplicate key value"), &wire);
        finish(&mut inst, "SELECT 2/0", Some(&div));
        finish(&mut inst, "SELECT 'x'::int", Some(&syntax));
        finish(&mut inst, "SELECT 1", None);
        finish(&mut inst, "INSERT INTO u", Some(&dup));
        // An error from before the query began, with the same message: not this one's.
        start(&mut inst, "SELECT 3/0");
        finish(&mut inst, "SELECT 3/0", Some(&syntax));

        let code = |c: &str| Some(c.to_owned());
        assert_eq!(
            *seen.lock().unwrap(),
            [
                ("SELECT 1/0".to_owned(), code("22012")),
                ("SELECT $1::interval".to_owned(), None),
                ("SELECT 2/0".to_owned(), None),
                ("SELECT '?'::int".to_owned(), None),
                ("SELECT 1".to_owned(), None),
                ("INSERT INTO u".to_owned(), code("23505")),
                ("SELECT 3/0".to_owned(), None),
            ]
        );
    }

    #[test]
    fn the_per_query_path_reuses_its_buffers() {
        let (mut inst, wire, seen) = instrumented();
        // Only the first hook's copies allocate; drop it.
        Arc::get_mut(&mut inst.observer).unwrap().hooks.remove(0);
        drop(seen);
        let mut tap = crate::conn::wire::Framer::default();
        let err = db_error(DatabaseErrorKind::Unknown, "division by zero");
        let response = error_response("22012", "division by zero");
        let sql = "SELECT balance_cents FROM accounts WHERE id = $1 AND note = 'x'";
        let mut round = |inst: &mut ConnInstrumentation| {
            for _ in 0..6 {
                start(inst, sql);
            }
            for _ in 0..6 {
                tap.on_read(&response, &wire);
                finish(inst, sql, Some(&err));
            }
        };
        round(&mut inst);
        let buffers = |i: &ConnInstrumentation| {
            (
                i.raw.as_ptr(),
                i.raw.capacity(),
                i.sql.as_ptr(),
                i.sql.capacity(),
                i.code.as_ptr(),
                i.code.capacity(),
                i.pending.capacity(),
            )
        };
        let warm = buffers(&inst);
        for _ in 0..100 {
            round(&mut inst);
        }
        assert_eq!(buffers(&inst), warm);
        assert_eq!(inst.code, "22012");
    }

    #[test]
    fn durations_land_in_opentelemetry_buckets() {
        let h = DurationHistogram::default();
        h.record(Duration::from_millis(3));
        h.record(Duration::from_millis(60));
        h.record(Duration::from_secs(30));
        assert_eq!(h.buckets[0].load(Ordering::Relaxed), 1);
        assert_eq!(h.buckets[4].load(Ordering::Relaxed), 1);
        assert_eq!(h.buckets[14].load(Ordering::Relaxed), 1);
        assert_eq!(h.count.load(Ordering::Relaxed), 3);
    }
}
