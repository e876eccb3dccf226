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
mod attempt;
mod commit;
pub mod contention;
mod deadline;
mod failure;
mod prepared;
pub(crate) mod retry;
mod savepoint;

pub use retry::{RetryBudget, RetryPolicy};

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
use retry::{Retries, retryable};

use attempt::*;
use commit::*;
use deadline::*;
pub use failure::Failed;
pub(crate) use failure::enrich_once;
use failure::*;
pub(crate) use savepoint::in_savepoint;

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
