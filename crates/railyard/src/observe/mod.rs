//! What the data layer sees: per-query timing through diesel's
//! `Instrumentation`, hooks, statement statistics, Railyard's own metrics, the
//! health verdict ([`HealthReport`]) and the Prometheus text (`prometheus`).
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
mod hooks;
mod instrument;
mod metrics;
mod table;
#[cfg(test)]
mod tests;
#[doc(hidden)]
pub use activity::LatencyBuckets;
pub use activity::{Activity, LATENCY_BUCKETS, LatencyCounts};
pub(crate) mod health;
mod hist;
pub use health::{HealthCheck, HealthReport, HealthStatus, PLAN_CHANGE_WINDOW};
// Workspace-internal: the HTTP endpoints and the change streams build checks.
#[doc(hidden)]
pub use health::{shutting_down, slot};
mod plans;
pub(crate) mod prometheus;
// Workspace-internal: railyard-ops' plan advisor lexes SQL with it too.
#[doc(hidden)]
pub mod sql;
mod stats;
mod storage;
pub use storage::{StorageFigures, TableSize};
pub(crate) use storage::{check as storage_check, render as render_storage};
mod watchdog;
pub use hooks::{AuditLog, QuerySpans, SlowQueryLog};
pub(crate) use instrument::Observer;
pub(crate) use metrics::{DURATION_BUCKETS, DurationHistogram, Metrics};
#[doc(hidden)]
pub use plans::explain as explain_generic;
pub use plans::{CapturedPlan, CostNode, MAX_PLAN_CHANGES, MAX_PLANS, PlanCapture, PlanChange};
pub(crate) use plans::{ChangeHook, PlanStore, spawn as spawn_plans};
use stats::sanitize_into;
pub use stats::{StatementStat, StatementStats};
pub(crate) use table::operation_and_table;
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

/// `opener` with its connections' statements recorded (the test harness's
/// query counts) and reported to no hook. Workspace-internal.
#[doc(hidden)]
pub fn recorded(opener: crate::conn::open::Opener) -> crate::conn::open::Opener {
    static OBSERVER: std::sync::OnceLock<Arc<Observer>> = std::sync::OnceLock::new();
    let observer = OBSERVER.get_or_init(Arc::default).clone();
    opener.observed(observer, crate::conn::Route::Primary)
}

#[cfg(test)]
fn sanitize_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    sanitize_into(sql, &mut out);
    out
}
