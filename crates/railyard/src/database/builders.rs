//! The option builders of transactions and writes, for a `Database` or a
//! `Session`.

use std::time::Duration;

use super::{Database, Session};
use crate::exec::retry::RetryPolicy;
use crate::exec::{self, ConnWork, Failed, IsolationLevel, TxOptions, WriteOptions};

/// Options for [`Database::build_transaction`] and
/// [`Session::build_transaction`].
#[derive(Debug, Clone)]
#[must_use = "a transaction builder does nothing until `run` is called"]
pub struct TransactionBuilder<'a> {
    db: &'a Database,
    session: Option<&'a Session>,
    opts: TxOptions,
}

impl<'a> TransactionBuilder<'a> {
    pub(crate) fn new(db: &'a Database, session: Option<&'a Session>) -> Self {
        TransactionBuilder {
            db,
            session,
            opts: TxOptions::default(),
        }
    }

    /// The isolation level. Defaults to the server's (READ COMMITTED).
    pub fn isolation(mut self, level: IsolationLevel) -> Self {
        self.opts.isolation = Some(level);
        self
    }

    /// Shorthand for `isolation(IsolationLevel::Serializable)`.
    pub fn serializable(self) -> Self {
        self.isolation(IsolationLevel::Serializable)
    }

    /// `READ ONLY`. Defaults to read-write.
    pub fn read_only(mut self) -> Self {
        self.opts.read_only = true;
        self
    }

    /// `DEFERRABLE` (meaningful with serializable read-only). Defaults to off.
    pub fn deferrable(mut self) -> Self {
        self.opts.deferrable = true;
        self
    }

    /// `SET LOCAL statement_timeout` for this transaction. Defaults to the session's.
    pub fn statement_timeout(mut self, d: Duration) -> Self {
        self.opts.statement_timeout = Some(d);
        self
    }

    /// A deadline over all attempts and waits. When it passes mid-query, a cancel
    /// request is sent and the connection is not reused until it settles.
    /// Defaults to none.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.opts.deadline = Some(d);
        self
    }

    /// Attempts and backoff. Defaults to the `Database`'s policy.
    pub fn retry_policy(mut self, p: RetryPolicy) -> Self {
        self.opts.policy = Some(p);
        self
    }

    /// Runs `f` in a transaction on the primary, re-running it from the top when
    /// a retry is safe. For a session, the commit position becomes its token.
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
    pub async fn run<F: ConnWork>(self, f: F) -> Result<F::Value, F::Error> {
        self.run_detailed(f).await.map_err(Failed::into_error)
    }

    /// As [`run`](Self::run), with what Railyard learned of a failure (class,
    /// SQLSTATE, attempts, why retries stopped) beside the closure's error:
    /// for closures whose error type is not [`crate::Error`].
    pub async fn run_detailed<F: ConnWork>(self, f: F) -> Result<F::Value, Failed<F::Error>> {
        let (v, at) = exec::transaction(self.db, &self.opts, self.session.is_some(), f).await?;
        if let Some(s) = self.session {
            s.advance(at.floor());
        }
        Ok(v)
    }
}

/// Options for [`Database::build_write`] and [`Session::build_write`].
#[derive(Debug, Clone)]
#[must_use = "a write builder does nothing until `run` is called"]
pub struct WriteBuilder<'a> {
    db: &'a Database,
    session: Option<&'a Session>,
    opts: WriteOptions,
}

impl<'a> WriteBuilder<'a> {
    pub(crate) fn new(db: &'a Database, session: Option<&'a Session>) -> Self {
        WriteBuilder {
            db,
            session,
            opts: WriteOptions::default(),
        }
    }

    /// Promises that running the work twice is harmless (an upsert, a
    /// `DELETE … WHERE id = …`), so that it is retried even when the connection
    /// died after sending it. Defaults to `false`.
    pub fn idempotent(mut self, yes: bool) -> Self {
        self.opts.idempotent = yes;
        self
    }

    /// A deadline over all attempts. Defaults to none.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.opts.deadline = Some(d);
        self
    }

    /// Attempts and backoff. Defaults to the `Database`'s policy.
    pub fn retry_policy(mut self, p: RetryPolicy) -> Self {
        self.opts.policy = Some(p);
        self
    }

    /// Runs `f` on a primary connection in autocommit mode (each statement commits
    /// on its own), retried only when that is safe: nothing was sent, or the work
    /// is idempotent, or the server rolled the statement back (40001, 40P01).
    /// For a session, the commit position becomes its token.
    pub async fn run<F: ConnWork>(self, f: F) -> Result<F::Value, F::Error> {
        self.run_detailed(f).await.map_err(Failed::into_error)
    }

    /// As [`run`](Self::run), with what Railyard learned of a failure beside
    /// the closure's error (see [`Failed`]).
    pub async fn run_detailed<F: ConnWork>(self, f: F) -> Result<F::Value, Failed<F::Error>> {
        let (v, at) = exec::write(self.db, &self.opts, self.session.is_some(), f).await?;
        if let Some(s) = self.session {
            s.advance(at.floor());
        }
        Ok(v)
    }
}
