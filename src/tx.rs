//! Transactions: retried from the top when safe, nested as savepoints that are
//! always released, bounded by deadlines (DESIGN.md D3).
//!
//! [`Database::transaction`] runs a closure inside `BEGIN … COMMIT` on the
//! primary. When it fails with a [`RetryTransaction`](ErrorClass::RetryTransaction)
//! error (serialization failure, deadlock, lock timeout), or the connection is
//! lost before COMMIT was sent, the whole closure runs again on a fresh
//! attempt, after a jittered backoff, within the attempt limit and the
//! `Database`'s retry budget. [`Conn::transaction`] inside it opens a savepoint;
//! nested blocks are never retried on their own.
//!
//! Retry closures are `Clone + AsyncFnOnce`: each attempt runs a fresh clone,
//! which is what lets the returned future be `Send` on stable Rust (the future
//! type of an `AsyncFnMut` cannot be bounded yet). Closures that capture
//! references are `Clone` already.
//!
//! The class of a failure comes from the protocol tap: the SQLSTATE the server
//! sent during this attempt, and whether the connection died, whatever error
//! type the closure returns. When the closure's error type is [`Error`], its
//! diesel error is replaced by an [`Error::Database`] carrying the SQLSTATE, the
//! class, the phase and the attempt count.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use diesel::connection::TransactionManagerStatus;
use diesel_async::{AnsiTransactionManager, SimpleAsyncConnection, TransactionManager};
use tokio::time::Instant;

use crate::database::{ConnFn, Database};
use crate::error::{DbError, Error};
use crate::pool::Conn;
use crate::retry::{ErrorClass, Phase, RetryPolicy, classify, retryable};
use crate::wire::{ServerError, TxStatus, WireState};

/// Transaction isolation levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
    server: Option<ServerError>,
    host: String,
}

impl Failure {
    async fn from_wire(
        wire: &WireState,
        mark: crate::wire::WireMark,
        phase: Phase,
        host: String,
    ) -> Self {
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
            Some(s) => classify(Some(&s.sqlstate()), lost),
            None if lost && phase == Phase::Commit && sent => ErrorClass::Ambiguous,
            None => classify(None, lost),
        };
        Failure {
            class,
            phase,
            sent,
            server,
            host,
        }
    }

    fn connect(e: &Error) -> Self {
        Failure {
            class: e.class(),
            phase: Phase::Connect,
            sent: false,
            server: None,
            host: String::new(),
        }
    }
}

/// Replaces a bare diesel error in `e` (when `E` is [`Error`]) by one that carries
/// what the tap saw.
fn enrich<E: 'static>(mut e: E, f: &Failure, attempts: u32) -> E {
    if let Some(err) = (&mut e as &mut dyn Any).downcast_mut::<Error>() {
        let taken = std::mem::replace(err, Error::Local(String::new()));
        *err = match taken {
            Error::Query(d) => {
                let db = Box::new(DbError {
                    class: f.class,
                    sqlstate: f.server.as_ref().map(ServerError::sqlstate),
                    server: f.server.clone(),
                    phase: f.phase,
                    attempts,
                    host: f.host.clone(),
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
                Error::Database(d)
            }
            other => other,
        };
    }
    e
}

fn host_of(conn: &Conn) -> String {
    format!("{}:{}", conn.info().host, conn.info().port)
}

/// Options for [`Database::build_transaction`].
#[derive(Debug, Clone)]
#[must_use = "a transaction builder does nothing until `run` is called"]
pub struct TransactionBuilder<'a> {
    db: &'a Database,
    isolation: Option<IsolationLevel>,
    read_only: bool,
    deferrable: bool,
    statement_timeout: Option<Duration>,
    deadline: Option<Duration>,
    policy: Option<RetryPolicy>,
}

impl<'a> TransactionBuilder<'a> {
    pub(crate) fn new(db: &'a Database) -> Self {
        TransactionBuilder {
            db,
            isolation: None,
            read_only: false,
            deferrable: false,
            statement_timeout: None,
            deadline: None,
            policy: None,
        }
    }

    /// The isolation level. Defaults to the server's (READ COMMITTED).
    pub fn isolation(mut self, level: IsolationLevel) -> Self {
        self.isolation = Some(level);
        self
    }

    /// Shorthand for `isolation(IsolationLevel::Serializable)`.
    pub fn serializable(self) -> Self {
        self.isolation(IsolationLevel::Serializable)
    }

    /// `READ ONLY`. Defaults to read-write.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// `DEFERRABLE` (meaningful with serializable read-only). Defaults to off.
    pub fn deferrable(mut self) -> Self {
        self.deferrable = true;
        self
    }

    /// `SET LOCAL statement_timeout` for this transaction. Defaults to the session's.
    pub fn statement_timeout(mut self, d: Duration) -> Self {
        self.statement_timeout = Some(d);
        self
    }

    /// A deadline over all attempts and waits. When it passes mid-query, a cancel
    /// request is sent and the connection is not reused until it settles.
    /// Defaults to none.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// Attempts and backoff. Defaults to the `Database`'s policy.
    pub fn retry_policy(mut self, p: RetryPolicy) -> Self {
        self.policy = Some(p);
        self
    }

    fn begin_sql(&self) -> String {
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
        if let Some(t) = self.statement_timeout {
            // One round trip: BEGIN and SET LOCAL travel together.
            sql.push_str(&format!(
                "; SET LOCAL statement_timeout = {}",
                t.as_millis().max(1)
            ));
        }
        sql
    }

    /// Runs `f` in a transaction on the primary, re-running it from the top when
    /// a retry is safe.
    ///
    /// ```no_run
    /// use diesel_async::RunQueryDsl;
    /// # async fn transfer(db: &railyard::Database) -> Result<(), railyard::Error> {
    /// db.build_transaction()
    ///     .serializable()
    ///     .run(async |conn| {
    ///         diesel::sql_query("UPDATE accounts SET balance_cents = balance_cents - 100 WHERE id = 1")
    ///             .execute(conn)
    ///             .await?;
    ///         diesel::sql_query("UPDATE accounts SET balance_cents = balance_cents + 100 WHERE id = 2")
    ///             .execute(conn)
    ///             .await?;
    ///         Ok::<_, railyard::Error>(())
    ///     })
    ///     .await
    /// # }
    /// ```
    pub async fn run<R, E, F>(self, f: F) -> Result<R, E>
    where
        F: for<'r> AsyncFnOnce(&'r mut Conn) -> Result<R, E>
            + for<'r> ConnFn<&'r mut Conn, Result<R, E>, Fut: Send>
            + Clone
            + Send,
        E: From<Error> + Send + 'static,
        R: Send,
    {
        self.execute(f, false).await.map(|(v, _)| v)
    }

    /// Like `run`, and returns the primary's WAL insert position read right
    /// after COMMIT on the same connection (for causal tokens).
    pub(crate) async fn run_recording_lsn<R, E, F>(self, f: F) -> Result<(R, u64), E>
    where
        F: for<'r> AsyncFnOnce(&'r mut Conn) -> Result<R, E>
            + for<'r> ConnFn<&'r mut Conn, Result<R, E>, Fut: Send>
            + Clone
            + Send,
        E: From<Error> + Send + 'static,
        R: Send,
    {
        self.execute(f, true).await
    }

    async fn execute<R, E, F>(self, f: F, record_lsn: bool) -> Result<(R, u64), E>
    where
        F: for<'r> AsyncFnOnce(&'r mut Conn) -> Result<R, E>
            + for<'r> ConnFn<&'r mut Conn, Result<R, E>, Fut: Send>
            + Clone
            + Send,
        E: From<Error> + Send + 'static,
        R: Send,
    {
        if self.db.pinned().is_some() {
            // Inside the test harness: a savepoint in the test's transaction.
            // Isolation level, READ ONLY and DEFERRABLE cannot change inside a
            // transaction, so they are not applied; a statement timeout is
            // (SET LOCAL), and lasts until the test's transaction ends.
            return pinned_scope(self.db, f, record_lsn, self.statement_timeout).await;
        }
        let begin = self.begin_sql();
        let policy = self
            .policy
            .clone()
            .unwrap_or_else(|| self.db.retry_policy().clone());
        let db = self.db;
        let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let cancel = CancelSlot::default();
        let work = retrying(db, policy, false, "transaction", &attempts, |attempt| {
            attempt_transaction(db, &begin, f.clone(), &cancel, record_lsn, attempt)
        });
        let span = tracing::info_span!(target: "railyard::tx", "railyard.transaction", otel.kind = "client", db.system.name = "postgresql");
        tracing::Instrument::instrument(
            with_deadline(self.deadline, work, &attempts, &cancel),
            span,
        )
        .await
    }
}

/// Runs attempts until one succeeds or retrying is not safe, not allowed by the
/// policy, or not affordable from the budget; backs off between attempts.
async fn retrying<T, E, Fut>(
    db: &Database,
    policy: RetryPolicy,
    idempotent: bool,
    what: &'static str,
    attempts: &std::sync::atomic::AtomicU32,
    mut attempt_fn: impl FnMut(u32) -> Fut,
) -> Result<T, E>
where
    Fut: Future<Output = Result<T, (E, Failure)>>,
    E: 'static,
{
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        attempts.store(attempt, std::sync::atomic::Ordering::Relaxed);
        if attempt == 1 {
            db.budget().deposit();
        }
        let (e, failure) = match attempt_fn(attempt).await {
            Ok(v) => return Ok(v),
            Err(failed) => failed,
        };
        let give_up = !retryable(failure.class, failure.phase, idempotent, failure.sent)
            || attempt >= policy.max_attempts
            || !db.budget().withdraw();
        if give_up {
            return Err(enrich(e, &failure, attempt));
        }
        db.note_retry(failure.class);
        if failure.class == ErrorClass::Reroute {
            db.reroute_primary();
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
pub(crate) struct CancelSlot(Arc<std::sync::Mutex<Option<Running>>>);

/// The connection an attempt runs on: how to cancel it, and its wire state.
type Running = (crate::pool::CancelHandle, Arc<WireState>);

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
    deadline: Option<Duration>,
    work: impl Future<Output = Result<R, E>>,
    attempts: &std::sync::atomic::AtomicU32,
    cancel: &CancelSlot,
) -> Result<R, E>
where
    E: From<Error>,
{
    let Some(deadline) = deadline else {
        return work.await;
    };
    match tokio::time::timeout_at(Instant::now() + deadline, work).await {
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
            Err(E::from(Error::Timeout {
                deadline,
                attempts: attempts.load(std::sync::atomic::Ordering::Relaxed),
                last: None,
            }))
        }
    }
}

async fn attempt_transaction<R, E, F>(
    db: &Database,
    begin: &str,
    f: F,
    cancel: &CancelSlot,
    record_lsn: bool,
    attempt: u32,
) -> Result<(R, u64), (E, Failure)>
where
    F: for<'r> AsyncFnOnce(&'r mut Conn) -> Result<R, E>
        + for<'r> ConnFn<&'r mut Conn, Result<R, E>, Fut: Send>
        + Send,
    E: From<Error> + Send,
    R: Send,
{
    let mut conn = match db.checkout_primary().await {
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
    if let Err(e) = AnsiTransactionManager::begin_transaction_sql(&mut **conn, begin).await {
        let failure = Failure::from_wire(&wire, mark, Phase::InFlight, host).await;
        return Err((E::from(Error::Query(e)), failure));
    }
    let result = f(&mut conn).await;
    match result {
        Ok(value) => {
            wire.quiesce(Duration::from_millis(100)).await;
            if wire.tx_status() == TxStatus::Failed {
                // The closure swallowed an error: the server has aborted the
                // transaction, and COMMIT would silently roll it back.
                let failure = Failure::from_wire(&wire, mark, Phase::InFlight, host).await;
                let _ = AnsiTransactionManager::rollback_transaction(&mut **conn).await;
                let e = Error::Database(Box::new(DbError {
                    class: failure.class,
                    sqlstate: failure.server.as_ref().map(ServerError::sqlstate),
                    server: failure.server.clone(),
                    phase: Phase::InFlight,
                    attempts: 1,
                    host: failure.host.clone(),
                    source: "the transaction was aborted by an error that the closure did not return; it was rolled back, not committed".into(),
                }));
                return Err((E::from(e), failure));
            }
            let commit_mark = wire.mark();
            match AnsiTransactionManager::commit_transaction(&mut **conn).await {
                Ok(()) => Ok((
                    value,
                    if record_lsn {
                        lsn_after_commit(&mut conn).await
                    } else {
                        0
                    },
                )),
                Err(e) => {
                    let failure = Failure::from_wire(&wire, commit_mark, Phase::Commit, host).await;
                    Err((E::from(Error::Query(e)), failure))
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

/// The primary's WAL insert position right after a commit on `conn`. When it
/// cannot be read, the session's reads all go to the primary (`u64::MAX`):
/// slower, never stale.
async fn lsn_after_commit(conn: &mut Conn) -> u64 {
    match crate::route::insert_lsn(conn).await {
        Ok(lsn) => lsn,
        Err(e) => {
            tracing::warn!(target: "railyard::route", error = %e, "could not read the commit position; this session reads from the primary");
            u64::MAX
        }
    }
}

/// Options for [`Database::build_write`].
#[derive(Debug, Clone)]
#[must_use = "a write builder does nothing until `run` is called"]
pub struct WriteBuilder<'a> {
    db: &'a Database,
    idempotent: bool,
    deadline: Option<Duration>,
    policy: Option<RetryPolicy>,
}

impl<'a> WriteBuilder<'a> {
    pub(crate) fn new(db: &'a Database) -> Self {
        WriteBuilder {
            db,
            idempotent: false,
            deadline: None,
            policy: None,
        }
    }

    /// Promises that running the work twice is harmless (an upsert, a
    /// `DELETE … WHERE id = …`), so that it is retried even when the connection
    /// died after sending it. Defaults to `false`.
    pub fn idempotent(mut self, yes: bool) -> Self {
        self.idempotent = yes;
        self
    }

    /// A deadline over all attempts. Defaults to none.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.deadline = Some(d);
        self
    }

    /// Attempts and backoff. Defaults to the `Database`'s policy.
    pub fn retry_policy(mut self, p: RetryPolicy) -> Self {
        self.policy = Some(p);
        self
    }

    /// Runs `f` on a primary connection in autocommit mode (each statement commits
    /// on its own), retried only when that is safe: nothing was sent, or the work
    /// is idempotent, or the server rolled the statement back (40001, 40P01).
    pub async fn run<R, E, F>(self, f: F) -> Result<R, E>
    where
        F: for<'r> AsyncFnOnce(&'r mut Conn) -> Result<R, E>
            + for<'r> ConnFn<&'r mut Conn, Result<R, E>, Fut: Send>
            + Clone
            + Send,
        E: From<Error> + Send + 'static,
        R: Send,
    {
        self.execute(f, false).await.map(|(v, _)| v)
    }

    pub(crate) async fn run_recording_lsn<R, E, F>(self, f: F) -> Result<(R, u64), E>
    where
        F: for<'r> AsyncFnOnce(&'r mut Conn) -> Result<R, E>
            + for<'r> ConnFn<&'r mut Conn, Result<R, E>, Fut: Send>
            + Clone
            + Send,
        E: From<Error> + Send + 'static,
        R: Send,
    {
        self.execute(f, true).await
    }

    async fn execute<R, E, F>(self, f: F, record_lsn: bool) -> Result<(R, u64), E>
    where
        F: for<'r> AsyncFnOnce(&'r mut Conn) -> Result<R, E>
            + for<'r> ConnFn<&'r mut Conn, Result<R, E>, Fut: Send>
            + Clone
            + Send,
        E: From<Error> + Send + 'static,
        R: Send,
    {
        if self.db.pinned().is_some() {
            // Inside the test harness, a write runs in a savepoint, so that a
            // failing statement spoils no more than it would in autocommit.
            return pinned_scope(self.db, f, record_lsn, None).await;
        }
        let policy = self
            .policy
            .clone()
            .unwrap_or_else(|| self.db.retry_policy().clone());
        let db = self.db;
        let idempotent = self.idempotent;
        let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let cancel = CancelSlot::default();
        let work = retrying(db, policy, idempotent, "write", &attempts, |attempt| {
            let f = f.clone();
            let cancel = &cancel;
            async move {
                let mut conn = match db.checkout_primary().await {
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
                match f(&mut conn).await {
                    Ok(v) => {
                        let lsn = if record_lsn {
                            lsn_after_commit(&mut conn).await
                        } else {
                            0
                        };
                        Ok((v, lsn))
                    }
                    Err(e) => Err((
                        e,
                        Failure::from_wire(&wire, mark, Phase::Commit, host).await,
                    )),
                }
            }
        });
        let span = tracing::info_span!(target: "railyard::tx", "railyard.write", otel.kind = "client", db.system.name = "postgresql", railyard.idempotent = idempotent);
        tracing::Instrument::instrument(
            with_deadline(self.deadline, work, &attempts, &cancel),
            span,
        )
        .await
    }
}

/// Checks that the test's transaction is still open after code under test ran.
async fn ensure_outer_open(conn: &Conn) -> Result<(), Error> {
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

/// `transaction` and `write` inside the test harness: one savepoint on the
/// test's connection, rolled back and released on error, never retried.
pub(crate) async fn pinned_scope<R, E, F>(
    db: &Database,
    f: F,
    record_lsn: bool,
    statement_timeout: Option<Duration>,
) -> Result<(R, u64), E>
where
    F: for<'r> AsyncFnOnce(&'r mut Conn) -> Result<R, E>
        + for<'r> ConnFn<&'r mut Conn, Result<R, E>, Fut: Send>
        + Send,
    E: From<Error> + Send + 'static,
    R: Send,
{
    let mut conn = db.checkout_primary().await.map_err(E::from)?;
    ensure_outer_open(&conn).await.map_err(E::from)?;
    let wire = conn.wire_arc();
    let host = host_of(&conn);
    AnsiTransactionManager::begin_transaction(conn.pg())
        .await
        .map_err(|e| E::from(Error::Query(e)))?;
    if let Some(t) = statement_timeout {
        conn.pg()
            .batch_execute(&format!(
                "SET LOCAL statement_timeout = {}",
                t.as_millis().max(1)
            ))
            .await
            .map_err(|e| E::from(Error::Query(e)))?;
    }
    let mark = wire.mark();
    let result = f(&mut conn).await;
    wire.quiesce(Duration::from_millis(100)).await;
    let outcome = match result {
        Ok(_) if wire.tx_status() == TxStatus::Failed => {
            let failure = Failure::from_wire(&wire, mark, Phase::InFlight, host).await;
            let _ = conn.rollback_and_release().await;
            Err(E::from(Error::Database(Box::new(DbError {
                class: failure.class,
                sqlstate: failure.server.as_ref().map(ServerError::sqlstate),
                server: failure.server.clone(),
                phase: Phase::InFlight,
                attempts: 1,
                host: failure.host.clone(),
                source: "the transaction was aborted by an error that the closure did not return; it was rolled back, not committed".into(),
            }))))
        }
        Ok(v) => match AnsiTransactionManager::commit_transaction(conn.pg()).await {
            Ok(()) => Ok(v),
            Err(e) => Err(E::from(Error::Query(e))),
        },
        Err(e) => {
            let failure = Failure::from_wire(&wire, mark, Phase::InFlight, host).await;
            let _ = conn.rollback_and_release().await;
            Err(enrich(e, &failure, 1))
        }
    };
    ensure_outer_open(&conn).await.map_err(E::from)?;
    let v = outcome?;
    let lsn = if record_lsn {
        lsn_after_commit(&mut conn).await
    } else {
        0
    };
    Ok((v, lsn))
}

/// `read` inside the test harness: on the test's connection (in a savepoint),
/// or, in stale-replica mode and without a causal token, on a second connection
/// that cannot see the test's uncommitted writes.
pub(crate) async fn pinned_read<R, E, F>(
    db: &Database,
    pinned: &crate::database::Pinned,
    floor: u64,
    f: F,
) -> Result<(R, crate::route::Route, u64), E>
where
    F: for<'r> AsyncFnOnce(&'r mut Conn) -> Result<R, E>
        + for<'r> ConnFn<&'r mut Conn, Result<R, E>, Fut: Send>
        + Send,
    E: From<Error> + Send + 'static,
    R: Send,
{
    if floor == 0
        && let Some(stale) = &pinned.stale
    {
        let mut guard = stale.clone().lock_owned().await;
        let conn = guard.as_mut().ok_or_else(|| {
            E::from(Error::TestIsolation(
                "the test has ended: its connections were handed back".into(),
            ))
        })?;
        let v = f(conn).await?;
        return Ok((v, crate::route::Route::Replica("stale-replica".into()), 0));
    }
    let (v, _) = pinned_scope(db, f, false, None).await?;
    Ok((
        v,
        crate::route::Route::Replica("test-connection".into()),
        floor,
    ))
}

impl Conn {
    /// Runs `f` in a nested transaction: a savepoint when a transaction is open,
    /// else a top-level transaction. On error the savepoint is rolled back *and
    /// released* (diesel-async only rolls back to it, and thousands of dead
    /// savepoints exhaust the server's lock table: DESIGN.md D7). Nested blocks
    /// are never retried on their own: a retryable failure propagates to the
    /// enclosing [`Database::transaction`].
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
    ///             Err(railyard::Error::Local("changed my mind".into()))
    ///         })
    ///         .await;
    ///     assert!(inner.is_err()); // the insert is undone, the outer transaction goes on
    ///     Ok::<_, railyard::Error>(())
    /// })
    /// .await
    /// # }
    /// ```
    pub async fn transaction<R, E, F>(&mut self, f: F) -> Result<R, E>
    where
        F: for<'r> AsyncFnOnce(&'r mut Conn) -> Result<R, E>
            + for<'r> ConnFn<&'r mut Conn, Result<R, E>, Fut: Send>
            + Send,
        E: From<Error> + Send,
        R: Send,
    {
        AnsiTransactionManager::begin_transaction(self.pg())
            .await
            .map_err(|e| E::from(Error::Query(e)))?;
        match f(self).await {
            Ok(v) => {
                AnsiTransactionManager::commit_transaction(self.pg())
                    .await
                    .map_err(|e| E::from(Error::Query(e)))?;
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

    pub(crate) async fn rollback_and_release(&mut self) -> Result<(), Error> {
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
