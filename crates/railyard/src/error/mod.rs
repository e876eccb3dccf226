//! The crate's error type.
//!
//! One `#[non_exhaustive]` enum with a variant per failure domain. Messages carry
//! context (the field, host or migration version involved) and never a password;
//! the underlying cause is available through [`std::error::Error::source`].

use std::fmt;
use std::time::Duration;

use tokio_postgres::error::SqlState;

mod class;
mod config;
mod connect;
mod db;
mod migration;

pub(crate) use class::classify;
use class::diesel_class;
pub use class::{ErrorClass, Phase, ServerError};
pub use config::ConfigError;
pub use connect::{ConnectError, ConnectStage, Shed};
pub use db::{DbError, RetriesExhausted, Violation, ViolationKind};
pub use migration::MigrationError;

/// Everything that can go wrong in Railyard.
///
/// Its `Debug` is what `main` prints when it returns one: the message, then
/// each cause on a line of its own, never a struct dump. Match the variants
/// to look inside.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is missing or malformed. Returned by [`crate::Config`]
    /// parsing and validation, before any connection is attempted.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// TLS could not be configured (unreadable or invalid `sslrootcert`, for example).
    #[error("TLS configuration: {message}")]
    Tls {
        /// What could not be configured, and what to do about it.
        message: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// A new connection could not be established.
    #[error(transparent)]
    Connect(#[from] ConnectError),

    /// No pooled connection became available within the checkout timeout.
    /// Since check-out queues are bounded, a pool whose connections are all in
    /// use sheds its waiters with [`Error::Overloaded`] after the (shorter)
    /// wait budget; this error remains for a check-out that waited for a
    /// connection being opened.
    #[error(
        "no {pool} connection became available within {waited:?}; raise the pool size or the checkout timeout, or look for connections held too long"
    )]
    PoolTimeout {
        /// Which pool ("primary" or a replica's host).
        pool: String,
        /// How long the caller waited.
        waited: Duration,
    },

    /// The pool's check-out queue was full, or a check-out waited its whole wait
    /// budget while every connection of the pool was in use: it was refused at
    /// once instead of queueing until the checkout timeout (load shedding).
    /// Class [`ErrorClass::Overloaded`], never retried: more work arrives than
    /// the pool serves, and a retry would only add to it. Answer "busy" (HTTP
    /// 503 with `Retry-After`). [`Error::PoolTimeout`] remains for a pool that
    /// had room but could not open a connection in time.
    #[error(
        "the {pool} pool is overloaded: {why}; the check-out was shed instead of queued (raise the pool size or its queue bounds, or send less work at once)"
    )]
    Overloaded {
        /// Which pool ("primary" or a replica's host).
        pool: String,
        /// Which bound refused it.
        why: Shed,
    },

    /// The `Database` handle is shutting down: [`Database::close`](crate::Database::close)
    /// was called on it or on a clone. New check-outs are refused at once
    /// (`source` is `None`); work still running at the close's deadline was
    /// cancelled, or its connection closed, and fails with this error holding
    /// what the work saw (`source`: the cancelled query's 57014, the closed
    /// connection). Class [`ErrorClass::Permanent`]: never retried.
    #[error("{}", if source.is_some() {
        "the database handle is shutting down: the operation was still running at the close's deadline and was cancelled"
    } else {
        "the database handle is shutting down (Database::close was called): no new work is accepted"
    })]
    Closed {
        /// What the cancelled work saw, when it was cancelled; `None` for work
        /// refused before it started.
        #[source]
        source: Option<Box<Error>>,
    },

    /// A query failed, as diesel reported it. Inside Railyard's `transaction` and
    /// `write`, such errors are replaced by [`Error::Database`], which adds what
    /// the protocol tap saw.
    #[error(transparent)]
    Query(#[from] diesel::result::Error),

    /// A query failed; the SQLSTATE and fields come from the protocol tap.
    #[error(transparent)]
    Database(Box<DbError>),

    /// The connection was lost while COMMIT (or an autocommit statement) was in
    /// flight: the work may or may not have been applied. Never retried silently;
    /// check the outcome (or make the work idempotent) before trying again.
    #[error("outcome unknown: {0}")]
    Ambiguous(Box<DbError>),

    /// The operation's deadline passed (all attempts and waits included).
    #[error("deadline of {deadline:?} passed after {attempts} attempt(s)")]
    Timeout {
        /// The deadline that passed.
        deadline: Duration,
        /// Attempts started.
        attempts: u32,
        /// The last failure before the deadline, if an attempt had failed.
        #[source]
        last: Option<Box<Error>>,
    },

    /// The circuit breaker for a host is open after repeated connect failures;
    /// calls fail fast until a probe succeeds.
    #[error(
        "circuit open for {host}: {failures} consecutive connect failures; next probe in {retry_in:?} (last: {last})"
    )]
    CircuitOpen {
        /// The host whose circuit is open.
        host: String,
        /// Consecutive failures that opened it.
        failures: u32,
        /// When the next probe is allowed.
        retry_in: Duration,
        /// The last connect error.
        last: String,
    },

    /// Booting or managing migrations failed.
    #[error(transparent)]
    Migration(#[from] MigrationError),

    /// The test harness's isolation was broken: the code under test ended the
    /// test's transaction, a deferred constraint failed at the end of the test,
    /// or the test's one connection stayed busy.
    #[error("test isolation: {0}")]
    TestIsolation(String),

    /// Work inside a `#[railyard_test::test]` kept meeting locks held by another
    /// transaction (usually another test sharing the database) for longer than
    /// the harness's lock bound. `blockers` names who held them, when the
    /// harness saw it (their `application_name` is the test's name); `source`
    /// is the last lock failure (40P01, 40001 or 55P03).
    #[error(
        "blocked for {waited:.1?} by locks held by {} ({attempts} attempt(s); the harness gives up after {bound:?}: set RAILYARD_TEST_LOCK_TIMEOUT or `lock_timeout = \"…\"` on the test to change it)",
        blockers.as_deref().unwrap_or("another transaction")
    )]
    Blocked {
        /// How long the work kept trying.
        waited: Duration,
        /// The harness's bound.
        bound: Duration,
        /// Attempts made (each rolled back to its savepoint).
        attempts: u32,
        /// Who was seen holding the lock.
        blockers: Option<String>,
        /// The last lock failure.
        #[source]
        source: Box<Error>,
    },

    /// An external tool (pgBackRest, pg_dump, pg_restore, pg_ctl) failed or
    /// ran past its deadline; `stderr` is its error output (its tail), with
    /// any password the tool was given removed.
    #[error("{what}: {tool} {outcome}{}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Tool {
        /// What was being done.
        what: String,
        /// The program.
        tool: String,
        /// How it ended: `exited with status 1`, `timed out after 60s`, …
        outcome: String,
        /// Its error output (the last lines), secrets removed.
        stderr: String,
    },

    /// A backup, restore or restore drill could not be done as asked (no
    /// backup to restore, a bad target time, a repository that is not set
    /// up); the message says what to do.
    #[error("backup: {0}")]
    Backup(String),

    /// A backup tool another crate drives (see
    /// `migrate::RiskyBackup`) failed; the cause is its
    /// own error.
    #[error("backup tool failed")]
    BackupTool(#[source] Box<dyn std::error::Error + Send + Sync>),

    /// An I/O error outside a connection (files, processes).
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        let mut source = std::error::Error::source(self);
        if source.is_some() {
            f.write_str("\n\nCaused by:")?;
        }
        while let Some(s) = source {
            write!(f, "\n    {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

impl Error {
    /// The SQLSTATE behind this error, when the server sent one.
    ///
    /// For connect errors this is the server's code (28P01 bad password, 53300 too
    /// many connections, 57P03 starting up, 3D000 unknown database, …).
    ///
    /// # Example
    /// ```
    /// # fn check(err: railyard::Error) {
    /// use tokio_postgres::error::SqlState;
    /// if err.sqlstate() == Some(&SqlState::INVALID_PASSWORD) {
    ///     eprintln!("the password was refused");
    /// }
    /// # }
    /// ```
    pub fn sqlstate(&self) -> Option<&SqlState> {
        match self {
            Error::Connect(e) => e.sqlstate.as_ref(),
            Error::Database(d) | Error::Ambiguous(d) => d.sqlstate.as_ref(),
            Error::Migration(MigrationError::Failed { sqlstate, .. }) => sqlstate.as_ref(),
            Error::Blocked { source, .. } => source.sqlstate(),
            Error::Closed {
                source: Some(source),
            } => source.sqlstate(),
            _ => None,
        }
    }

    /// Why retrying stopped, when this error is of a retryable kind but the
    /// attempts ran out or the retry budget was spent. `None` for errors that
    /// were not retryable, and for operations that were not retried by Railyard.
    ///
    /// ```
    /// # fn check(err: railyard::Error) {
    /// if let Some(why) = err.retries_exhausted() {
    ///     eprintln!("gave up: {why}; the system is overloaded, shed load");
    /// }
    /// # }
    /// ```
    pub fn retries_exhausted(&self) -> Option<RetriesExhausted> {
        match self {
            Error::Database(d) | Error::Ambiguous(d) => d.exhausted,
            _ => None,
        }
    }

    /// What kind of failure this is (see [`ErrorClass`] and the table in the
    /// `retry` module docs).
    ///
    /// ```
    /// # fn check(err: railyard::Error) {
    /// use railyard::ErrorClass;
    /// match err.class() {
    ///     ErrorClass::Constraint => { /* answer 409 */ }
    ///     ErrorClass::Timeout => { /* answer 504 */ }
    ///     _ => { /* answer 500 */ }
    /// }
    /// # }
    /// ```
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Config(_)
            | Error::Tls { .. }
            | Error::Migration(_)
            | Error::BackupTool(_)
            | Error::TestIsolation(_)
            | Error::Tool { .. }
            | Error::Backup(_)
            | Error::Closed { .. }
            | Error::Io { .. } => ErrorClass::Permanent,
            Error::Overloaded { .. } => ErrorClass::Overloaded,
            Error::Connect(e) => match e.stage {
                crate::error::ConnectStage::Socket | crate::error::ConnectStage::Timeout => {
                    ErrorClass::Reconnect
                }
                _ => match &e.sqlstate {
                    Some(code) => classify(Some(code), false),
                    None => ErrorClass::Permanent,
                },
            },
            Error::PoolTimeout { .. } | Error::Timeout { .. } => ErrorClass::Timeout,
            Error::CircuitOpen { .. } => ErrorClass::Reconnect,
            Error::Database(d) => d.class,
            Error::Ambiguous(_) => ErrorClass::Ambiguous,
            Error::Query(d) => diesel_class(d),
            Error::Blocked { source, .. } => source.class(),
        }
    }

    /// The violated constraint, for integrity errors (23xxx): what an HTTP layer
    /// maps to 409 Conflict or 422.
    pub fn violation(&self) -> Option<Violation> {
        match self {
            Error::Database(d) => d.violation(),
            Error::Query(diesel::result::Error::DatabaseError(kind, info)) => {
                use diesel::result::DatabaseErrorKind as K;
                let kind = match kind {
                    K::UniqueViolation => ViolationKind::Unique,
                    K::ForeignKeyViolation => ViolationKind::ForeignKey,
                    K::NotNullViolation => ViolationKind::NotNull,
                    K::CheckViolation => ViolationKind::Check,
                    K::ExclusionViolation => ViolationKind::Exclusion,
                    K::RestrictViolation => ViolationKind::Restrict,
                    _ => return None,
                };
                Some(Violation {
                    kind,
                    constraint: info.constraint_name().map(str::to_owned),
                    table: info.table_name().map(str::to_owned),
                    column: info.column_name().map(str::to_owned),
                })
            }
            _ => None,
        }
    }

    pub(crate) fn tls(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Tls {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    pub(crate) fn bookkeeping(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Migration(MigrationError::Bookkeeping {
            context: context.into(),
            source: source.into(),
        })
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Implements `From` for the core's error and its parts (configuration,
/// connection, migration and diesel errors) on another crate's error enum
/// that wraps the core's as `Core(railyard::Error)`, so that `?` works on
/// all of them there. Workspace-internal: the product crates' errors use it.
#[doc(hidden)]
#[macro_export]
macro_rules! wraps_core_errors {
    ($error:ident) => {
        impl From<$crate::error::ConfigError> for $error {
            fn from(e: $crate::error::ConfigError) -> Self {
                $error::Core(e.into())
            }
        }
        impl From<$crate::error::ConnectError> for $error {
            fn from(e: $crate::error::ConnectError) -> Self {
                $error::Core(e.into())
            }
        }
        impl From<$crate::error::MigrationError> for $error {
            fn from(e: $crate::error::MigrationError) -> Self {
                $error::Core(e.into())
            }
        }
        impl From<diesel::result::Error> for $error {
            fn from(e: diesel::result::Error) -> Self {
                $error::Core(e.into())
            }
        }
    };
}

#[cfg(test)]
mod debug_tests {
    use super::*;

    #[test]
    fn debug_prints_the_message_and_each_cause_once_never_a_struct() {
        let e = Error::Io {
            context: "reading the dump directory".into(),
            source: std::io::Error::other("permission denied"),
        };
        assert_eq!(e.to_string(), "reading the dump directory");
        assert_eq!(
            format!("{e:?}"),
            "reading the dump directory\n\nCaused by:\n    permission denied"
        );
        let closed = Error::Closed { source: None };
        assert!(!format!("{closed:?}").contains("Caused by"));
        assert!(!format!("{closed:?}").contains("Closed {"));
    }
}
