//! Running work on a connection: transactions retried from the top when safe,
//! autocommit writes retried only when safe, nested blocks as savepoints that
//! are always released, deadlines that cancel.
//!
//! A transaction runs a closure inside `BEGIN … COMMIT` on the primary. When
//! it fails with a [`RetryTransaction`](ErrorClass::RetryTransaction) error
//! (serialization failure, deadlock, lock timeout), or the connection is lost
//! before COMMIT was sent, the whole closure runs again on a fresh attempt,
//! after a jittered backoff, within the attempt limit and the `Database`'s
//! retry budget. [`Conn::transaction`] inside it opens a savepoint; nested
//! blocks are never retried on their own.
//!
//! Work is any [`ConnWork`]: an `async |conn| …` closure that is `Clone`
//! (each attempt runs a fresh clone, which is what lets the returned future be
//! `Send` on stable Rust; closures that capture references are `Clone`
//! already).
//!
//! The class of a failure comes from the protocol tap: the SQLSTATE the server
//! sent during this attempt, and whether the connection died, whatever error
//! type the closure returns. When the closure's error type is [`Error`], its
//! diesel error is replaced by an [`Error::Database`] carrying the SQLSTATE, the
//! class, the phase and the attempt count.
//!
//! A connection handed out *enclosed* (inside a transaction its holder does not
//! own: the test harness's) runs the same work in a savepoint, once; or, when
//! it fails on another transaction's locks and the source has a contention
//! policy (the harness's, see `contention`), rolled back to the savepoint and
//! run again within the policy's bound.
//!
//! This layer does not know where connections come from: it asks a `Source`.

#[doc(hidden)]
pub mod contention;
mod prepared;
pub mod retry;

use std::any::Any;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use diesel::connection::{InstrumentationEvent, TransactionDepthChange, TransactionManagerStatus};
use diesel_async::{
    AnsiTransactionManager, AsyncConnection, SimpleAsyncConnection, TransactionManager,
};
use tokio::time::Instant;
use tokio_postgres::types::PgLsn;

use crate::conn::gate::Lifecycle;
use crate::conn::wire::{TxStatus, WireMark, WireState};
use crate::conn::{CancelHandle, Conn, PooledConn, position_of};
use crate::error::{DbError, Error, ErrorClass, Phase, RetriesExhausted, ServerError, classify};
use contention::Contention;
pub use prepared::{Prepared, prepared};
use retry::{Retries, RetryPolicy, retryable};

/// Work on a connection that Railyard may run more than once: an
/// `async |conn| …` closure, `Clone` and `Send`, whose future is `Send`, and
/// whose error type can hold a Railyard [`Error`]. Every closure-taking API
/// (`transaction`, `write`, `read`, `with_primary`, sessions, builders,
/// [`Conn::transaction`]) takes one. It is implemented for every such
/// closure; you never implement it yourself, and closure parameters need no
/// annotation:
///
/// ```no_run
/// use diesel_async::RunQueryDsl;
/// # async fn demo(db: railyard::Database) -> Result<(), railyard::Error> {
/// let n = db
///     .transaction(async |conn| {
///         diesel::sql_query("UPDATE accounts SET balance_cents = 0 WHERE id = 1")
///             .execute(conn)
///             .await
///             .map_err(railyard::Error::from)
///     })
///     .await?;
/// # Ok(()) }
/// ```
pub trait ConnWork:
    Clone
    + Send
    + for<'c> AsyncFnOnce(
        &'c mut Conn,
    ) -> Result<<Self as ConnWork>::Value, <Self as ConnWork>::Error>
    + for<'c> ConnFn<
        &'c mut Conn,
        Result<<Self as ConnWork>::Value, <Self as ConnWork>::Error>,
        Fut: Send,
    >
{
    /// What the work returns on success.
    type Value: Send;
    /// What it returns on failure.
    type Error: From<Error> + Send + 'static;
}

impl<F, R, E> ConnWork for F
where
    F: Clone
        + Send
        + for<'c> AsyncFnOnce(&'c mut Conn) -> Result<R, E>
        + for<'c> ConnFn<&'c mut Conn, Result<R, E>, Fut: Send>,
    R: Send,
    E: From<Error> + Send + 'static,
{
    type Value = R;
    type Error = E;
}

/// Names the future of an async closure, so that [`ConnWork`] can require it
/// to be `Send` (the future type of `AsyncFnOnce` cannot be bounded on stable
/// Rust). Implemented for every closure; an implementation detail.
#[doc(hidden)]
pub trait ConnFn<T, R>: AsyncFnOnce(T) -> R + FnOnce(T) -> <Self as ConnFn<T, R>>::Fut {
    /// The future the closure returns.
    type Fut: Future<Output = R>;
}

impl<F, T, Fut, R> ConnFn<T, R> for F
where
    F: AsyncFnOnce(T) -> R + FnOnce(T) -> Fut,
    Fut: Future<Output = R>,
{
    type Fut = Fut;
}

/// Where the work's connections come from, and what it reports back: the
/// `Database` implements it (its one check-out function is behind it).
pub(crate) trait Source: Sync {
    /// A primary connection (possibly enclosed: see [`PooledConn::enclosed`]).
    fn checkout_primary(&self) -> impl Future<Output = Result<PooledConn, Error>> + Send;
    /// A write reached a standby: find the primary again.
    fn reroute_primary(&self);
    /// Policy, budget and counters.
    fn retries(&self) -> &Retries;
    /// How enclosed work copes with other transactions' locks (the test
    /// harness's policy); `None` runs it once.
    fn contention(&self) -> Option<&Contention> {
        None
    }
    /// A statement timeout every transaction sets for itself (behind a
    /// transaction-mode pooler, where no session setting lasts).
    fn transaction_statement_timeout(&self) -> Option<Duration> {
        None
    }
    /// Whether the source is closing: then no retry starts, and after the
    /// close's deadline, failures of the work it cancelled are reported as
    /// [`Error::Closed`].
    fn lifecycle(&self) -> Lifecycle {
        Lifecycle::Open
    }
}

/// Whether a failure seen after a close's deadline is the close's doing: a
/// query it cancelled (57014), a connection it severed. An ambiguous commit
/// stays [`Error::Ambiguous`]: its caller must still check the outcome.
pub(crate) fn cancelled_by_close(class: ErrorClass) -> bool {
    matches!(class, ErrorClass::Timeout | ErrorClass::Reconnect)
}

/// `e` as [`Error::Closed`] holding it, when `E` is [`Error`] (any other type
/// keeps its own error; `Failed` still says what happened).
pub(crate) fn closed_by<E: 'static>(e: E) -> E {
    let any: Box<dyn Any> = Box::new(e);
    match any.downcast::<Error>() {
        Ok(source) if matches!(*source, Error::Closed { .. }) => {
            let same: Box<dyn Any> = source;
            *same
                .downcast::<E>()
                .expect("E is Error: it was just downcast to it")
        }
        Ok(source) => {
            let closed: Box<dyn Any> = Box::new(Error::Closed {
                source: Some(source),
            });
            *closed
                .downcast::<E>()
                .expect("E is Error: it was just downcast to it")
        }
        Err(any) => *any
            .downcast::<E>()
            .expect("the value boxed just above is an E"),
    }
}

/// Where a committed piece of work left the primary's WAL, for causal tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommitPosition {
    /// Not asked for.
    NotRecorded,
    /// The primary's WAL insert position right after the commit.
    At(PgLsn),
    /// Asked for but unreadable: a session must read from the primary.
    Unknown,
}

/// Transaction isolation levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum IsolationLevel {
    /// PostgreSQL's default.
    #[default]
    ReadCommitted,
    /// Snapshot isolation.
    RepeatableRead,
    /// Full serializability; expect 40001 failures, which are retried.
    Serializable,
}

impl IsolationLevel {
    fn sql(self) -> &'static str {
        match self {
            IsolationLevel::ReadCommitted => "READ COMMITTED",
            IsolationLevel::RepeatableRead => "REPEATABLE READ",
            IsolationLevel::Serializable => "SERIALIZABLE",
        }
    }
}

/// What went wrong in one attempt, as the tap saw it.
#[derive(Debug)]
struct Failure {
    class: ErrorClass,
    phase: Phase,
    sent: bool,
    /// The connection was gone when the failure was judged.
    lost: bool,
    server: Option<ServerError>,
    host: String,
}

impl Failure {
    async fn from_wire(wire: &WireState, mark: WireMark, phase: Phase, host: String) -> Self {
        if wire.error_since(mark).is_none() && !wire.is_closed() && wire.in_flight() > 0 {
            // A request is unanswered and no error came: the connection may be
            // dying, and its driver about to say so. Give it a moment.
            wire.quiesce(Duration::from_millis(100)).await;
        }
        let server = wire.error_since(mark);
        let lost = wire.is_closed();
        let sent = wire.written_since(mark) > 0;
        let class = match &server {
            // A FATAL from a dying backend (57P01) and an ordinary error both count.
            Some(s) => s.class(lost),
            None if lost && phase == Phase::Commit && sent => ErrorClass::Ambiguous,
            None => classify(None, lost),
        };
        Failure {
            class,
            phase,
            sent,
            lost,
            server,
            host,
        }
    }

    fn connect(e: &Error) -> Self {
        Failure {
            class: e.class(),
            phase: Phase::Connect,
            sent: false,
            lost: false,
            server: None,
            host: String::new(),
        }
    }
}

/// A failed transaction or write, with what Railyard learned of the failure,
/// whatever the closure's error type: returned by the builders' `run_detailed`.
///
/// When the closure returns [`Error`], the error itself carries all this
/// ([`Error::sqlstate`], [`Error::class`], [`Error::retries_exhausted`]). An
/// application error type that wraps a Railyard error cannot be looked into,
/// so `run_detailed` hands the facts over beside it:
///
/// ```no_run
/// use diesel_async::RunQueryDsl;
/// #[derive(Debug)]
/// enum AppError { Db(railyard::Error), Overdrawn }
/// impl From<railyard::Error> for AppError {
///     fn from(e: railyard::Error) -> Self { AppError::Db(e) }
/// }
/// # async fn demo(db: railyard::Database) {
/// let r = db
///     .build_transaction()
///     .serializable()
///     .run_detailed(async |conn| {
///         diesel::sql_query("UPDATE accounts SET balance_cents = balance_cents - 5 WHERE id = 1")
///             .execute(conn)
///             .await
///             .map_err(|e| AppError::Db(e.into()))
///     })
///     .await;
/// if let Err(failed) = r {
///     eprintln!(
///         "SQLSTATE {:?} after {} attempt(s), exhausted: {:?}",
///         failed.sqlstate().map(|s| s.code()),
///         failed.attempts(),
///         failed.retries_exhausted(),
///     );
///     let _app_error: AppError = failed.into_error();
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct Failed<E> {
    error: E,
    class: Option<ErrorClass>,
    sqlstate: Option<tokio_postgres::error::SqlState>,
    attempts: u32,
    exhausted: Option<RetriesExhausted>,
}

impl<E> Failed<E> {
    fn bare(error: E, class: Option<ErrorClass>, attempts: u32) -> Self {
        Failed {
            error,
            class,
            sqlstate: None,
            attempts,
            exhausted: None,
        }
    }

    fn of(error: E, f: &Failure, attempts: u32, exhausted: Option<RetriesExhausted>) -> Self {
        Failed {
            error,
            class: Some(f.class),
            sqlstate: f.server.as_ref().map(ServerError::sqlstate),
            attempts,
            exhausted,
        }
    }

    /// The closure's error (enriched as [`Error::Database`] when it is an [`Error`]).
    pub fn error(&self) -> &E {
        &self.error
    }

    /// Takes the error out.
    pub fn into_error(self) -> E {
        self.error
    }

    /// The failure's class, when Railyard saw the failure (it did not for an
    /// error the closure made up without touching the server).
    pub fn class(&self) -> Option<ErrorClass> {
        self.class
    }

    /// The SQLSTATE the server sent during the last attempt, if any.
    pub fn sqlstate(&self) -> Option<&tokio_postgres::error::SqlState> {
        self.sqlstate.as_ref()
    }

    /// Attempts started (1 when not retried; 0 when no attempt could start).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Why retrying stopped, when the failure was retryable.
    pub fn retries_exhausted(&self) -> Option<RetriesExhausted> {
        self.exhausted
    }
}

impl<E: std::fmt::Display> std::fmt::Display for Failed<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)?;
        if let Some(why) = &self.exhausted {
            write!(
                f,
                " (after {} attempts; retries stopped: {why})",
                self.attempts
            )?;
        }
        Ok(())
    }
}

impl<E: std::error::Error + 'static> std::error::Error for Failed<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Replaces a bare diesel error in `e` (when `E` is [`Error`]) by one that carries
/// what the tap saw.
fn enrich<E: 'static>(e: E, f: &Failure, attempts: u32, exhausted: Option<RetriesExhausted>) -> E {
    let any: Box<dyn Any> = Box::new(e);
    match any.downcast::<Error>() {
        Ok(err) => {
            let enriched: Box<dyn Any> = Box::new(enrich_error(*err, f, attempts, exhausted));
            *enriched
                .downcast::<E>()
                .expect("E is Error: it was just downcast to it")
        }
        Err(any) => *any
            .downcast::<E>()
            .expect("the value boxed just above is an E"),
    }
}

fn enrich_error(
    err: Error,
    f: &Failure,
    attempts: u32,
    exhausted: Option<RetriesExhausted>,
) -> Error {
    match err {
        Error::Query(d) => {
            let db = Box::new(DbError {
                class: f.class,
                sqlstate: f.server.as_ref().map(ServerError::sqlstate),
                server: f.server.clone(),
                phase: f.phase,
                attempts,
                host: f.host.clone(),
                exhausted,
                source: Box::new(d),
            });
            if f.class == ErrorClass::Ambiguous {
                Error::Ambiguous(db)
            } else {
                Error::Database(db)
            }
        }
        Error::Database(mut d) => {
            d.attempts = attempts;
            d.exhausted = exhausted;
            Error::Database(d)
        }
        other => other,
    }
}

/// The error of work run once, with no retries (`Database::with_primary`),
/// carrying what the tap saw as transaction and write errors do: the
/// server's SQLSTATE and class, and `Ambiguous` for a connection lost after
/// a statement was sent (an autocommit statement may have committed).
pub(crate) async fn enrich_once<E: 'static>(
    e: E,
    wire: &WireState,
    mark: WireMark,
    host: String,
) -> E {
    let phase = if wire.written_since(mark) > 0 {
        Phase::Commit
    } else {
        Phase::BeforeSend
    };
    let f = Failure::from_wire(wire, mark, phase, host).await;
    enrich(e, &f, 1, None)
}

fn host_of(conn: &Conn) -> String {
    format!("{}:{}", conn.info().host, conn.info().port)
}

/// The options of a transaction (see `TransactionBuilder`).
#[derive(Debug, Clone, Default)]
pub(crate) struct TxOptions {
    pub(crate) isolation: Option<IsolationLevel>,
    pub(crate) read_only: bool,
    pub(crate) deferrable: bool,
    pub(crate) statement_timeout: Option<Duration>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) policy: Option<RetryPolicy>,
}

impl TxOptions {
    /// `BEGIN` with the modes, and `SET LOCAL statement_timeout` when the
    /// options ask for one or the source has a per-transaction default.
    fn begin_sql(&self, default_timeout: Option<Duration>) -> String {
        let mut sql = String::from("BEGIN");
        let mut modes = Vec::new();
        if let Some(level) = self.isolation {
            modes.push(format!("ISOLATION LEVEL {}", level.sql()));
        }
        if self.read_only {
            modes.push("READ ONLY".to_owned());
        }
        if self.deferrable {
            modes.push("DEFERRABLE".to_owned());
        }
        if !modes.is_empty() {
            sql.push_str(" TRANSACTION ");
            sql.push_str(&modes.join(", "));
        }
        if let Some(t) = self.statement_timeout.or(default_timeout) {
            // One round trip: BEGIN and SET LOCAL travel together.
            sql.push_str(&format!(
                "; SET LOCAL statement_timeout = {}",
                t.as_millis().max(1)
            ));
        }
        sql
    }
}

/// The options of an autocommit write (see `WriteBuilder`).
#[derive(Debug, Clone, Default)]
pub(crate) struct WriteOptions {
    pub(crate) idempotent: bool,
    pub(crate) deadline: Option<Duration>,
    pub(crate) policy: Option<RetryPolicy>,
}

/// Runs `f` in a transaction on the source's primary, re-running it from the
/// top when a retry is safe. On an enclosed connection, runs it once in a
/// savepoint instead (isolation level, `READ ONLY` and `DEFERRABLE` cannot
/// change inside a transaction and are not applied there; a statement timeout
/// is, with `SET LOCAL`, and lasts until the enclosing transaction ends).
pub(crate) async fn transaction<S: Source, F: ConnWork>(
    src: &S,
    opts: &TxOptions,
    record: bool,
    f: F,
) -> Result<(F::Value, CommitPosition), Failed<F::Error>> {
    let deadline = Deadline::start(opts.deadline);
    let first = match first_lease(src, deadline).await? {
        First::Enclosed(conn) => {
            return in_savepoint(conn, f, record, opts.statement_timeout, src.contention()).await;
        }
        First::Lease(first) => first,
    };
    let begin = opts.begin_sql(src.transaction_statement_timeout());
    let policy = opts.policy.as_ref().unwrap_or(&src.retries().policy);
    let attempts = AtomicU32::new(0);
    let cancel = CancelSlot::default();
    let first = std::sync::Mutex::new(Some(first));
    let when = RetryWhen::Safe { idempotent: false };
    let work = retrying(src, policy, when, "transaction", &attempts, |attempt| {
        let lease = first.lock().unwrap_or_else(|p| p.into_inner()).take();
        let read_only = opts.read_only;
        let (begin, f, cancel) = (&begin, f.clone(), &cancel);
        async move {
            let begin = Begin {
                sql: begin,
                statement_timeout: opts.statement_timeout,
            };
            let mut r = attempt_transaction(src, lease, begin, f, cancel, record, attempt).await;
            if let Err((_, failure)) = &mut r
                && read_only
                && failure.class == ErrorClass::Reroute
            {
                // 25006 in a transaction we opened READ ONLY is the caller's
                // write, refused as asked: not a standby, nothing to reroute.
                failure.class = ErrorClass::Permanent;
            }
            r
        }
    });
    let span = tracing::info_span!(target: "railyard::tx", "railyard.transaction", otel.kind = "client", db.system.name = "postgresql");
    tracing::Instrument::instrument(with_deadline(deadline, work, &attempts, &cancel), span).await
}

/// Runs `f` on a primary connection in autocommit mode (each statement commits
/// on its own), retried only when that is safe: nothing was sent, or the work
/// is idempotent, or the server rolled the statement back (40001, 40P01). On an
/// enclosed connection, runs it once in a savepoint, so that a failing
/// statement spoils no more than it would in autocommit.
pub(crate) async fn write<S: Source, F: ConnWork>(
    src: &S,
    opts: &WriteOptions,
    record: bool,
    f: F,
) -> Result<(F::Value, CommitPosition), Failed<F::Error>> {
    let deadline = Deadline::start(opts.deadline);
    let first = match first_lease(src, deadline).await? {
        First::Enclosed(conn) => {
            return in_savepoint(conn, f, record, None, src.contention()).await;
        }
        First::Lease(first) => first,
    };
    let policy = opts.policy.as_ref().unwrap_or(&src.retries().policy);
    let idempotent = opts.idempotent;
    let attempts = AtomicU32::new(0);
    let cancel = CancelSlot::default();
    let first = std::sync::Mutex::new(Some(first));
    let when = RetryWhen::Safe { idempotent };
    let work = retrying(src, policy, when, "write", &attempts, |attempt| {
        let lease = first.lock().unwrap_or_else(|p| p.into_inner()).take();
        let f = f.clone();
        let cancel = &cancel;
        async move {
            let Attempt {
                mut conn,
                wire,
                host,
                mark,
            } = start_attempt::<S, F::Error>(src, lease, cancel, attempt).await?;
            match f(&mut conn).await {
                Ok(v) => {
                    // The one round trip a session pays here: autocommit work
                    // commits inside the closure's own statements, and only a
                    // query sent after the last of them is past its commit.
                    // Railyard cannot tell which statement is the last, nor
                    // add a statement to the closure's flights; see
                    // `Session::write`.
                    let at = if record {
                        commit_position(&mut conn).await
                    } else {
                        CommitPosition::NotRecorded
                    };
                    Ok((v, at))
                }
                Err(e) => Err((
                    e,
                    Failure::from_wire(&wire, mark, Phase::Commit, host).await,
                )),
            }
        }
    });
    let span = tracing::info_span!(target: "railyard::tx", "railyard.write", otel.kind = "client", db.system.name = "postgresql", railyard.idempotent = idempotent);
    tracing::Instrument::instrument(with_deadline(deadline, work, &attempts, &cancel), span).await
}

/// Runs a read on `conn`, a primary connection. A read whose connection was
/// lost (reset, closed, given up by the stall watch) changed nothing: it runs
/// again on a new connection, through the retry loop of transactions and
/// writes, within the retry policy's attempts and the budget. Any other
/// failure is the caller's.
pub(crate) async fn read_primary<S: Source, F: ConnWork>(
    src: &S,
    conn: PooledConn,
    f: F,
) -> Result<F::Value, F::Error> {
    let attempts = AtomicU32::new(0);
    let first = std::sync::Mutex::new(Some(conn));
    let policy = &src.retries().policy;
    retrying(src, policy, RetryWhen::Lost, "read", &attempts, |_| {
        let lease = first.lock().unwrap_or_else(|p| p.into_inner()).take();
        let f = f.clone();
        async move {
            let mut conn = match lease {
                Some(c) => c,
                None => src.checkout_primary().await.map_err(|e| {
                    let failure = Failure::connect(&e);
                    (F::Error::from(e), failure)
                })?,
            };
            let wire = conn.wire_arc();
            let mark = wire.mark();
            match f(&mut conn).await {
                Ok(v) => Ok(v),
                Err(e) => {
                    let host = host_of(&conn);
                    drop(conn);
                    let failure = Failure::from_wire(&wire, mark, Phase::InFlight, host).await;
                    Err((e, failure))
                }
            }
        }
    })
    .await
    .map_err(Failed::into_error)
}

/// An operation's deadline: how long it was given, and when it passes.
#[derive(Debug, Clone, Copy)]
struct Deadline(Option<(Duration, Instant)>);

impl Deadline {
    fn start(after: Option<Duration>) -> Self {
        Deadline(after.map(|d| (d, Instant::now() + d)))
    }

    fn passed(self, attempts: u32) -> Error {
        Error::Timeout {
            deadline: self.0.map_or(Duration::ZERO, |(d, _)| d),
            attempts,
            last: None,
        }
    }
}

/// What the first check-out of an operation gave.
enum First {
    /// A connection inside someone else's transaction: run once, in a savepoint.
    Enclosed(PooledConn),
    /// The first attempt's lease, or why there is none (a failure the retry
    /// loop judges like any other attempt's).
    Lease(Result<PooledConn, Error>),
}

/// Checks out the first connection before the retry loop, to learn whether it
/// is enclosed; within the operation's deadline (an exhausted pool must not
/// outwait it).
async fn first_lease<S: Source, E: From<Error>>(
    src: &S,
    deadline: Deadline,
) -> Result<First, Failed<E>> {
    let lease = match deadline.0 {
        None => src.checkout_primary().await,
        Some((_, until)) => match tokio::time::timeout_at(until, src.checkout_primary()).await {
            Ok(lease) => lease,
            Err(_) => {
                return Err(Failed::bare(
                    E::from(deadline.passed(0)),
                    Some(ErrorClass::Timeout),
                    0,
                ));
            }
        },
    };
    Ok(match lease {
        Ok(conn) if conn.enclosed() => First::Enclosed(conn),
        other => First::Lease(other),
    })
}

/// The first attempt's lease (checked out before the loop, to learn whether it
/// is enclosed), or a new one.
async fn checked_out<S: Source>(
    src: &S,
    lease: Option<Result<PooledConn, Error>>,
) -> Result<PooledConn, Error> {
    match lease {
        Some(r) => r,
        None => src.checkout_primary().await,
    }
}

/// One attempt's connection and where its traffic began.
struct Attempt {
    conn: PooledConn,
    wire: Arc<WireState>,
    host: String,
    mark: WireMark,
}

/// Checks out the attempt's connection (or takes the one checked out before the
/// loop), makes it cancellable by the deadline, and marks the wire.
async fn start_attempt<S: Source, E: From<Error>>(
    src: &S,
    lease: Option<Result<PooledConn, Error>>,
    cancel: &CancelSlot,
    attempt: u32,
) -> Result<Attempt, (E, Failure)> {
    let conn = match checked_out(src, lease).await {
        Ok(c) => c,
        Err(e) => {
            let failure = Failure::connect(&e);
            return Err((E::from(e), failure));
        }
    };
    cancel.set(&conn);
    conn.set_attempt(attempt);
    let wire = conn.wire_arc();
    let host = host_of(&conn);
    let mark = wire.mark();
    Ok(Attempt {
        conn,
        wire,
        host,
        mark,
    })
}

/// Which failures an operation runs again after.
#[derive(Debug, Clone, Copy)]
enum RetryWhen {
    /// Those after which running the work again is safe (see `retryable`).
    Safe { idempotent: bool },
    /// Only the loss of the connection: a read on the primary, which changed
    /// nothing, runs again on a new connection; any other failure (a
    /// serialization failure included) is the caller's.
    Lost,
}

impl RetryWhen {
    fn allows(self, f: &Failure) -> bool {
        match self {
            RetryWhen::Safe { idempotent } => retryable(f.class, f.phase, idempotent, f.sent),
            RetryWhen::Lost => f.lost && f.class == ErrorClass::Reconnect,
        }
    }
}

/// The one retry loop: transactions, autocommit writes and primary reads.
/// Runs attempts until one succeeds or retrying is not safe (`when`), not
/// allowed by the policy, or not affordable from the budget; backs off
/// between attempts.
async fn retrying<S: Source, T, E, Fut>(
    src: &S,
    policy: &RetryPolicy,
    when: RetryWhen,
    what: &'static str,
    attempts: &AtomicU32,
    mut attempt_fn: impl FnMut(u32) -> Fut,
) -> Result<T, Failed<E>>
where
    Fut: Future<Output = Result<T, (E, Failure)>>,
    E: 'static,
{
    let retries = src.retries();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        attempts.store(attempt, Ordering::Relaxed);
        if attempt == 1 {
            retries.budget.deposit();
        }
        let (e, failure) = match attempt_fn(attempt).await {
            Ok(v) => return Ok(v),
            Err(failed) => failed,
        };
        let lifecycle = src.lifecycle();
        if lifecycle == Lifecycle::Cancelling && cancelled_by_close(failure.class) {
            let e = closed_by(enrich(e, &failure, attempt, None));
            let mut failed = Failed::of(e, &failure, attempt, None);
            failed.class = Some(ErrorClass::Permanent);
            return Err(failed);
        }
        if !when.allows(&failure) {
            return Err(Failed::of(
                enrich(e, &failure, attempt, None),
                &failure,
                attempt,
                None,
            ));
        }
        let exhausted = if attempt >= policy.attempts() {
            Some(RetriesExhausted::AttemptLimit {
                limit: policy.attempts(),
            })
        } else if lifecycle != Lifecycle::Open {
            Some(RetriesExhausted::Closing)
        } else if !retries.budget.withdraw() {
            Some(RetriesExhausted::Budget)
        } else {
            None
        };
        if let Some(why) = exhausted {
            tracing::warn!(
                target: "railyard::retry",
                class = %failure.class,
                sqlstate = failure.server.as_ref().map(|s| s.code.as_str()).unwrap_or(""),
                attempt,
                what,
                "retries stopped: {why}"
            );
            return Err(Failed::of(
                enrich(e, &failure, attempt, exhausted),
                &failure,
                attempt,
                exhausted,
            ));
        }
        retries.note(failure.class);
        if failure.class == ErrorClass::Reroute {
            src.reroute_primary();
        }
        tracing::info!(
            target: "railyard::retry",
            class = %failure.class,
            sqlstate = failure.server.as_ref().map(|s| s.code.as_str()).unwrap_or(""),
            attempt,
            what,
            "retrying"
        );
        tokio::time::sleep(policy.backoff(attempt)).await;
    }
}

/// The connection an attempt is using, so that a deadline can cancel its query.
#[derive(Clone, Default)]
struct CancelSlot(Arc<std::sync::Mutex<Option<Running>>>);

/// The connection an attempt runs on: how to cancel it, and its wire state.
type Running = (CancelHandle, Arc<WireState>);

impl CancelSlot {
    fn set(&self, conn: &Conn) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((conn.cancel_handle(), conn.wire_arc()));
    }
    fn take(&self) -> Option<Running> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

async fn with_deadline<R, E>(
    deadline: Deadline,
    work: impl Future<Output = Result<R, Failed<E>>>,
    attempts: &AtomicU32,
    cancel: &CancelSlot,
) -> Result<R, Failed<E>>
where
    E: From<Error>,
{
    let Some((_, until)) = deadline.0 else {
        return work.await;
    };
    match tokio::time::timeout_at(until, work).await {
        Ok(r) => r,
        Err(_) => {
            // The attempt's future is gone; its connection goes back to the pool,
            // which refuses it until it is idle again. Cancel what it was running.
            if let Some((handle, wire)) = cancel.take()
                && wire.in_flight() > 0
            {
                tokio::spawn(async move {
                    if let Err(e) = handle.cancel().await {
                        tracing::warn!(target: "railyard::tx", error = %e, "cancel request failed");
                    }
                });
            }
            let attempts = attempts.load(Ordering::Relaxed);
            Err(Failed::bare(
                E::from(deadline.passed(attempts)),
                Some(ErrorClass::Timeout),
                attempts,
            ))
        }
    }
}

/// The error for a closure that swallowed a server error: the server aborted
/// the transaction, and COMMIT would silently have rolled it back.
fn swallowed(failure: &Failure) -> Error {
    Error::Database(Box::new(DbError {
        class: failure.class,
        sqlstate: failure.server.as_ref().map(ServerError::sqlstate),
        server: failure.server.clone(),
        phase: Phase::InFlight,
        attempts: 1,
        host: failure.host.clone(),
        exhausted: None,
        source: "the transaction was aborted by an error that the closure did not return; it was rolled back, not committed".into(),
    }))
}

/// How a transaction begins: its `BEGIN …` and the statement timeout it
/// sets, if it sets its own.
#[derive(Clone, Copy)]
struct Begin<'a> {
    sql: &'a str,
    statement_timeout: Option<Duration>,
}

async fn attempt_transaction<S: Source, F: ConnWork>(
    src: &S,
    lease: Option<Result<PooledConn, Error>>,
    begin: Begin<'_>,
    f: F,
    cancel: &CancelSlot,
    record: bool,
    attempt: u32,
) -> Result<(F::Value, CommitPosition), (F::Error, Failure)> {
    let Attempt {
        mut conn,
        wire,
        host,
        mark,
    } = start_attempt::<S, F::Error>(src, lease, cancel, attempt).await?;
    if let Some(t) = begin.statement_timeout {
        conn.wire()
            .raise_stall_floor(t + crate::conn::open::STALL_GRACE);
    }
    if let Err(e) = AnsiTransactionManager::begin_transaction_sql(&mut **conn, begin.sql).await {
        let failure = Failure::from_wire(&wire, mark, Phase::InFlight, host).await;
        return Err((F::Error::from(Error::Query(e)), failure));
    }
    match f(&mut conn).await {
        Ok(value) => {
            wire.quiesce(Duration::from_millis(100)).await;
            if wire.tx_status() == TxStatus::Failed {
                let failure = Failure::from_wire(&wire, mark, Phase::InFlight, host).await;
                let _ = AnsiTransactionManager::rollback_transaction(&mut **conn).await;
                return Err((F::Error::from(swallowed(&failure)), failure));
            }
            let commit_mark = wire.mark();
            match commit(&mut conn, record).await {
                Ok(at) => Ok((value, at)),
                Err(e) => {
                    let failure = Failure::from_wire(&wire, commit_mark, Phase::Commit, host).await;
                    Err((F::Error::from(Error::Query(e)), failure))
                }
            }
        }
        Err(e) => {
            let failure = Failure::from_wire(&wire, mark, Phase::InFlight, host).await;
            if !wire.is_closed() {
                // A failed rollback leaves the connection broken; the pool drops it.
                let _ = AnsiTransactionManager::rollback_transaction(&mut **conn).await;
            }
            Err((e, failure))
        }
    }
}

/// `COMMIT` and, in the same flight, the primary's WAL insert position after
/// it: one simple query, so one round trip, whose second statement runs only
/// when the first succeeded. See [`commit`].
const COMMIT_AND_POSITION: &str = "COMMIT; SELECT pg_current_wal_insert_lsn()::text";

/// Commits the transaction `attempt_transaction` opened; for a session
/// (`record`), with the commit position.
///
/// A session's commit costs what any commit costs: one round trip. `COMMIT`
/// and the position query travel as one simple query, which the server runs
/// in order and answers with one `ReadyForQuery`; diesel discards its row, the
/// tap keeps it ([`Conn::simple_query_captured`]). The position is read after
/// the commit record was written, so a replica that replayed up to it has the
/// commit (the position cannot be taken before `COMMIT`: the commit record
/// is not written yet).
///
/// diesel's transaction manager is told what happened, as its own
/// `commit_transaction` would have been. It does not see the query (it only
/// sends `COMMIT` alone), so this does its bookkeeping, by what the tap saw:
///
/// - `COMMIT` completed (its `CommandComplete` came): the transaction is
///   over, whether or not the position query then answered (a failed position
///   query leaves the position [`CommitPosition::Unknown`]: the session reads
///   from the primary, never stale);
/// - `COMMIT` failed (40001, a deferred constraint, a lost connection): the
///   server skipped the position query, the error is diesel's error for
///   `COMMIT`, classified from the tap exactly as before; the server ended the
///   transaction (the tap says idle), or, when it cannot be known, diesel
///   rolls back as it would have (a lost connection: the pool drops it).
///
/// A dropped future (a deadline) leaves diesel's manager inside the
/// transaction, and the pool never reuses such a connection.
async fn commit(conn: &mut Conn, record: bool) -> diesel::QueryResult<CommitPosition> {
    if !record {
        AnsiTransactionManager::commit_transaction(conn.pg()).await?;
        return Ok(CommitPosition::NotRecorded);
    }
    let depth = match AnsiTransactionManager::transaction_manager_status_mut(conn.pg()) {
        TransactionManagerStatus::Valid(v) => v.transaction_depth(),
        TransactionManagerStatus::InError => {
            return Err(diesel::result::Error::BrokenTransactionManager);
        }
    };
    let Some(depth) = depth.filter(|d| d.get() == 1) else {
        // Not the top-level transaction this layer opened: diesel's own path.
        AnsiTransactionManager::commit_transaction(conn.pg()).await?;
        return Ok(commit_position(conn).await);
    };
    conn.pg()
        .instrumentation()
        .on_connection_event(InstrumentationEvent::commit_transaction(depth));
    let (result, captured) = match conn.simple_query_captured(COMMIT_AND_POSITION).await {
        Ok(sent) => sent,
        Err(e) => {
            // A request was still in flight: commit alone, then ask.
            tracing::debug!(target: "railyard::route", error = %e, "commit position not taken in the commit's flight");
            AnsiTransactionManager::commit_transaction(conn.pg()).await?;
            return Ok(commit_position(conn).await);
        }
    };
    let committed = captured.first_completed("COMMIT");
    match result {
        Ok(()) => {
            leave_transaction(conn);
            Ok(match position_of(&captured) {
                Ok(lsn) => CommitPosition::At(lsn),
                Err(e) => unknown_position(&e),
            })
        }
        Err(e) if committed => {
            // Committed; only the position query failed.
            leave_transaction(conn);
            Ok(unknown_position(&e))
        }
        Err(e) => {
            after_failed_commit(conn).await;
            Err(e)
        }
    }
}

/// The transaction is over on the server: diesel's manager leaves it too.
fn leave_transaction(conn: &mut Conn) {
    if let TransactionManagerStatus::Valid(v) =
        AnsiTransactionManager::transaction_manager_status_mut(conn.pg())
    {
        // At depth 1, this ends the transaction (and forgets any "requires
        // rollback" mark diesel set on a 40001).
        let _ = v.change_transaction_depth(TransactionDepthChange::DecreaseDepth);
    }
}

/// A `COMMIT` that failed: the server ended the transaction (a failed
/// `COMMIT` always does), unless the connection is gone or the error came
/// from the client; then diesel rolls back, as its own commit would have.
async fn after_failed_commit(conn: &mut Conn) {
    let wire = conn.wire_arc();
    // The error arrives before its ReadyForQuery.
    wire.quiesce(Duration::from_millis(100)).await;
    if !wire.is_closed() && wire.in_flight() == 0 && wire.tx_status() == TxStatus::Idle {
        leave_transaction(conn);
        return;
    }
    if AnsiTransactionManager::rollback_transaction(conn.pg())
        .await
        .is_err()
    {
        AnsiTransactionManager::transaction_manager_status_mut(conn.pg()).set_in_error();
    }
}

fn unknown_position(e: &dyn std::fmt::Display) -> CommitPosition {
    tracing::warn!(target: "railyard::route", error = %e, "could not read the commit position; this session reads from the primary");
    CommitPosition::Unknown
}

/// The primary's WAL insert position right after autocommit work on `conn`
/// (one round trip of its own: see `write`). When it cannot be read, the
/// session's reads all go to the primary: slower, never stale.
async fn commit_position(conn: &mut Conn) -> CommitPosition {
    match conn.wal_insert_lsn().await {
        Ok(lsn) => CommitPosition::At(lsn),
        Err(e) => unknown_position(&e),
    }
}

/// Checks that the enclosing transaction is still open after the work ran.
async fn ensure_enclosure_open(conn: &Conn) -> Result<(), Error> {
    conn.wire().quiesce(Duration::from_millis(200)).await;
    if conn.wire().tx_status() == TxStatus::Idle {
        return Err(Error::TestIsolation(
            "the code under test ended the test's transaction (COMMIT or ROLLBACK on the connection); \
             what it wrote may have been committed to the test database. Use `db.transaction`, or \
             `isolation = \"database\"` for tests that must commit"
                .into(),
        ));
    }
    Ok(())
}

/// Work on an enclosed connection: a savepoint, rolled back and released on
/// error. Not retried, except under a [`Contention`] policy (the test
/// harness's), when it failed on another transaction's locks.
pub(crate) async fn in_savepoint<F: ConnWork>(
    mut conn: PooledConn,
    f: F,
    record: bool,
    statement_timeout: Option<Duration>,
    contention: Option<&Contention>,
) -> Result<(F::Value, CommitPosition), Failed<F::Error>> {
    let plain = |e: Error| {
        let class = e.class();
        Failed::bare(F::Error::from(e), Some(class), 1)
    };
    ensure_enclosure_open(&conn).await.map_err(plain)?;
    if let Some(c) = contention {
        c.blockers.clear();
    }
    let started = Instant::now();
    let mut attempt = 1;
    let v = loop {
        let outcome = savepoint_attempt(&mut conn, f.clone(), statement_timeout, attempt).await;
        ensure_enclosure_open(&conn).await.map_err(plain)?;
        let (failed, conflict) = match outcome {
            Ok(v) => break v,
            Err(e) => e,
        };
        let Some(c) = contention.filter(|_| conflict) else {
            return Err(failed);
        };
        let waited = started.elapsed();
        if attempt >= c.max_attempts || waited >= c.bound {
            return Err(blocked(failed, c, waited, attempt));
        }
        let pause = c.backoff(attempt).min(c.bound - waited);
        tracing::debug!(
            target: "railyard::test",
            sqlstate = failed.sqlstate().map(|s| s.code()),
            attempt,
            blockers = c.blockers.last(),
            "enclosed work met another transaction's locks; rolled back to its savepoint, retrying"
        );
        tokio::time::sleep(pause).await;
        attempt += 1;
    };
    let at = if record {
        commit_position(&mut conn).await
    } else {
        CommitPosition::NotRecorded
    };
    Ok((v, at))
}

/// One savepoint around `f`. On failure, also says whether it failed on
/// another transaction's locks (the savepoint is rolled back and released
/// either way).
async fn savepoint_attempt<F: ConnWork>(
    conn: &mut PooledConn,
    f: F,
    statement_timeout: Option<Duration>,
    attempt: u32,
) -> Result<F::Value, (Failed<F::Error>, bool)> {
    let plain = |e: Error| {
        let class = e.class();
        (Failed::bare(F::Error::from(e), Some(class), attempt), false)
    };
    let wire = conn.wire_arc();
    let host = host_of(conn);
    AnsiTransactionManager::begin_transaction(conn.pg())
        .await
        .map_err(|e| plain(Error::Query(e)))?;
    if let Some(t) = statement_timeout {
        conn.pg()
            .batch_execute(&format!(
                "SET LOCAL statement_timeout = {}",
                t.as_millis().max(1)
            ))
            .await
            .map_err(|e| plain(Error::Query(e)))?;
    }
    let mark = wire.mark();
    let result = f(conn).await;
    wire.quiesce(Duration::from_millis(100)).await;
    let conflict = |failure: &Failure| {
        failure
            .server
            .as_ref()
            .is_some_and(|s| contention::is_lock_conflict(&s.sqlstate()))
    };
    match result {
        Ok(_) if wire.tx_status() == TxStatus::Failed => {
            let failure = Failure::from_wire(&wire, mark, Phase::InFlight, host).await;
            let _ = conn.rollback_and_release().await;
            let error = F::Error::from(swallowed(&failure));
            Err((
                Failed::of(error, &failure, attempt, None),
                conflict(&failure),
            ))
        }
        Ok(v) => match AnsiTransactionManager::commit_transaction(conn.pg()).await {
            Ok(()) => Ok(v),
            Err(e) => Err(plain(Error::Query(e))),
        },
        Err(e) => {
            let failure = Failure::from_wire(&wire, mark, Phase::InFlight, host).await;
            let _ = conn.rollback_and_release().await;
            let error = enrich(e, &failure, attempt, None);
            Err((
                Failed::of(error, &failure, attempt, None),
                conflict(&failure),
            ))
        }
    }
}

/// Enclosed work that gave up on another transaction's locks: an
/// [`Error::Blocked`] naming who held them, when the closure's error type is
/// [`Error`] (any other type keeps its own error, and the facts stay on the
/// [`Failed`]).
fn blocked<E: 'static>(
    failed: Failed<E>,
    c: &Contention,
    waited: Duration,
    attempts: u32,
) -> Failed<E> {
    let blockers = c.blockers.last();
    tracing::warn!(
        target: "railyard::test",
        attempts,
        waited_ms = waited.as_millis() as u64,
        blockers = blockers.as_deref().unwrap_or("unknown"),
        "enclosed work gave up on another transaction's locks"
    );
    let Failed {
        error,
        class,
        sqlstate,
        exhausted,
        ..
    } = failed;
    let any: Box<dyn Any> = Box::new(error);
    let error = match any.downcast::<Error>() {
        Ok(source) => {
            let e: Box<dyn Any> = Box::new(Error::Blocked {
                waited,
                bound: c.bound,
                attempts,
                blockers,
                source,
            });
            *e.downcast::<E>()
                .expect("E is Error: it was just downcast to it")
        }
        Err(any) => *any
            .downcast::<E>()
            .expect("the value boxed just above is an E"),
    };
    Failed {
        error,
        class,
        sqlstate,
        attempts,
        exhausted,
    }
}

impl Conn {
    /// Runs `f` in a nested transaction: a savepoint when a transaction is open,
    /// else a top-level transaction. On error the savepoint is rolled back *and
    /// released* (diesel-async only rolls back to it, and thousands of dead
    /// savepoints exhaust the server's lock table). Nested blocks are never
    /// retried on their own: a retryable failure propagates to the enclosing
    /// [`Database::transaction`](crate::Database::transaction).
    ///
    /// ```no_run
    /// use diesel_async::RunQueryDsl;
    /// # async fn demo(db: &railyard::Database) -> Result<(), railyard::Error> {
    /// db.transaction(async |conn| {
    ///     let inner: Result<(), railyard::Error> = conn
    ///         .transaction(async |conn| {
    ///             diesel::sql_query("INSERT INTO users (email, name) VALUES ('a@x', 'A')")
    ///                 .execute(conn)
    ///                 .await?;
    ///             // diesel's way of saying "undo this block":
    ///             Err(diesel::result::Error::RollbackTransaction.into())
    ///         })
    ///         .await;
    ///     assert!(inner.is_err()); // the insert is undone, the outer transaction goes on
    ///     Ok::<_, railyard::Error>(())
    /// })
    /// .await
    /// # }
    /// ```
    pub async fn transaction<F: ConnWork>(&mut self, f: F) -> Result<F::Value, F::Error> {
        AnsiTransactionManager::begin_transaction(self.pg())
            .await
            .map_err(|e| F::Error::from(Error::Query(e)))?;
        match f(self).await {
            Ok(v) => {
                AnsiTransactionManager::commit_transaction(self.pg())
                    .await
                    .map_err(|e| F::Error::from(Error::Query(e)))?;
                Ok(v)
            }
            Err(e) => {
                if let Err(rb) = self.rollback_and_release().await {
                    tracing::warn!(target: "railyard::tx", error = %rb, "rolling back a nested transaction failed");
                }
                Err(e)
            }
        }
    }

    /// The current transaction depth (0 outside a transaction).
    pub fn transaction_depth(&mut self) -> u32 {
        match AnsiTransactionManager::transaction_manager_status_mut(self.pg()) {
            TransactionManagerStatus::Valid(v) => v.transaction_depth().map_or(0, |d| d.get()),
            TransactionManagerStatus::InError => 0,
        }
    }

    #[doc(hidden)]
    pub async fn rollback_and_release(&mut self) -> Result<(), Error> {
        let depth = self.transaction_depth();
        AnsiTransactionManager::rollback_transaction(self.pg()).await?;
        if depth > 1 && self.transaction_depth() == depth - 1 {
            // diesel names the savepoint of depth d+1 `diesel_savepoint_{d}`.
            self.pg()
                .batch_execute(&format!("RELEASE SAVEPOINT diesel_savepoint_{}", depth - 1))
                .await?;
        }
        Ok(())
    }
}
