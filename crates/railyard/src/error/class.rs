//! What kind of failure an error is ([`ErrorClass`], [`classify`]), the
//! phase it happened in, and the server's report of it ([`ServerError`]).

use super::*;

/// The class of a bare diesel error, when no tap information is at hand.
pub(super) fn diesel_class(e: &diesel::result::Error) -> ErrorClass {
    use diesel::result::DatabaseErrorKind as K;
    use diesel::result::Error as D;
    match e {
        D::DatabaseError(K::SerializationFailure, _) => ErrorClass::RetryTransaction,
        D::DatabaseError(K::ReadOnlyTransaction, _) => ErrorClass::Reroute,
        D::DatabaseError(K::ClosedConnection | K::UnableToSendCommand, _) => ErrorClass::Reconnect,
        D::DatabaseError(
            K::UniqueViolation
            | K::ForeignKeyViolation
            | K::NotNullViolation
            | K::CheckViolation
            | K::ExclusionViolation
            | K::RestrictViolation,
            _,
        ) => ErrorClass::Constraint,
        _ => ErrorClass::Permanent,
    }
}

/// What kind of failure an error is, for deciding what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// The transaction lost a race (serialization failure, deadlock, lock
    /// timeout): re-run it from the top.
    RetryTransaction,
    /// The connection failed or the server refused connections for now.
    Reconnect,
    /// A write reached a server in recovery: find the primary again.
    Reroute,
    /// The connection died while the outcome was being decided (COMMIT in
    /// flight): it may or may not have committed.
    Ambiguous,
    /// A timeout or cancellation (57014, or Railyard's deadline).
    Timeout,
    /// An integrity constraint was violated (23xxx).
    Constraint,
    /// A lock asked for with `NOWAIT` is held by someone else (55P03 raised by
    /// the lock request itself, not by `lock_timeout`). The caller said not to
    /// wait, so it is never retried: answer "busy, try again later".
    LockNotAvailable,
    /// A pool shed the check-out: its queue was full, or its wait budget passed
    /// with every connection in use ([`Error::Overloaded`]). Never retried: a
    /// retry adds to the overload. Answer "busy, try again later".
    Overloaded,
    /// Anything else: retrying cannot help.
    Permanent,
}

impl ErrorClass {
    /// Every class, in a fixed order (the order of metrics and reports).
    pub const ALL: [ErrorClass; 9] = [
        ErrorClass::RetryTransaction,
        ErrorClass::Reconnect,
        ErrorClass::Reroute,
        ErrorClass::Ambiguous,
        ErrorClass::Timeout,
        ErrorClass::Constraint,
        ErrorClass::LockNotAvailable,
        ErrorClass::Overloaded,
        ErrorClass::Permanent,
    ];

    /// This class's position in [`ErrorClass::ALL`], for per-class counters.
    pub(crate) fn index(self) -> usize {
        // Exhaustive inside the crate: a new class fails to compile here until
        // it is given a slot (and `ALL` grows with it).
        match self {
            ErrorClass::RetryTransaction => 0,
            ErrorClass::Reconnect => 1,
            ErrorClass::Reroute => 2,
            ErrorClass::Ambiguous => 3,
            ErrorClass::Timeout => 4,
            ErrorClass::Constraint => 5,
            ErrorClass::LockNotAvailable => 6,
            ErrorClass::Overloaded => 7,
            ErrorClass::Permanent => 8,
        }
    }

    /// A short lowercase name, for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::RetryTransaction => "retry_transaction",
            ErrorClass::Reconnect => "reconnect",
            ErrorClass::Reroute => "reroute",
            ErrorClass::Ambiguous => "ambiguous",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Constraint => "constraint",
            ErrorClass::LockNotAvailable => "lock_not_available",
            ErrorClass::Overloaded => "overloaded",
            ErrorClass::Permanent => "permanent",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where in an operation a failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Opening or checking out a connection.
    Connect,
    /// Before any byte of the operation reached the server.
    BeforeSend,
    /// While statements were running (inside a transaction, before COMMIT).
    InFlight,
    /// While COMMIT (or an autocommit statement) was being decided.
    Commit,
}

/// The class of a failure, from the server's SQLSTATE when it sent one and from
/// whether the connection is gone. The one place SQLSTATEs are interpreted.
///
pub(crate) fn classify(sqlstate: Option<&SqlState>, connection_lost: bool) -> ErrorClass {
    let Some(code) = sqlstate else {
        return if connection_lost {
            ErrorClass::Reconnect
        } else {
            ErrorClass::Permanent
        };
    };
    match code {
        c if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED => {
            ErrorClass::RetryTransaction
        }
        // Without the error's routine, a 55P03 is taken for NOWAIT's: not
        // retrying a lock timeout costs less than retrying a NOWAIT.
        c if *c == SqlState::LOCK_NOT_AVAILABLE => ErrorClass::LockNotAvailable,
        c if *c == SqlState::T_R_STATEMENT_COMPLETION_UNKNOWN => ErrorClass::Ambiguous,
        c if *c == SqlState::READ_ONLY_SQL_TRANSACTION => ErrorClass::Reroute,
        c if *c == SqlState::QUERY_CANCELED => ErrorClass::Timeout,
        c if *c == SqlState::ADMIN_SHUTDOWN
            || *c == SqlState::CRASH_SHUTDOWN
            || *c == SqlState::CANNOT_CONNECT_NOW
            || *c == SqlState::TOO_MANY_CONNECTIONS
            || c.code().starts_with("08") =>
        {
            ErrorClass::Reconnect
        }
        c if c.code().starts_with("23") => ErrorClass::Constraint,
        _ => ErrorClass::Permanent,
    }
}

/// The fields of a server `ErrorResponse` that classification needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ServerError {
    /// The SQLSTATE (field `C`).
    pub code: String,
    /// The non-localised severity (field `V`), e.g. `ERROR` or `FATAL`.
    pub severity: String,
    /// The constraint name (field `n`), for integrity violations.
    pub constraint: Option<String>,
    /// The column name (field `c`).
    pub column: Option<String>,
    /// The table name (field `t`).
    pub table: Option<String>,
    /// The schema name (field `s`).
    pub schema: Option<String>,
    /// The (possibly localised) message (field `M`): for people, never for decisions.
    pub message: String,
    /// The server function that raised the error (field `R`, never localised).
    pub routine: Option<String>,
}

impl ServerError {
    /// The SQLSTATE as tokio-postgres' typed code.
    pub fn sqlstate(&self) -> tokio_postgres::error::SqlState {
        tokio_postgres::error::SqlState::from_code(&self.code)
    }

    /// The class of this error; `connection_lost` says whether the connection
    /// died with it.
    ///
    /// 55P03 has two causes that call for opposite answers: a `lock_timeout`
    /// that expired (the wait was bounded; another attempt may find the lock
    /// free: [`ErrorClass::RetryTransaction`]) and a `NOWAIT` request that found
    /// the lock taken (the caller asked not to wait:
    /// [`ErrorClass::LockNotAvailable`]). The server raises the first from its
    /// interrupt handler and the second from the lock request, and says which
    /// in the routine field, which, unlike the message, is never translated.
    pub fn class(&self, connection_lost: bool) -> ErrorClass {
        let code = self.sqlstate();
        if code == SqlState::LOCK_NOT_AVAILABLE
            && self.routine.as_deref() == Some(LOCK_TIMEOUT_ROUTINE)
        {
            return ErrorClass::RetryTransaction;
        }
        classify(Some(&code), connection_lost)
    }
}

/// The server function that raises `lock_timeout`'s 55P03 (PostgreSQL's
/// interrupt handler, in `postgres.c`); NOWAIT's come from the lock managers.
pub(super) const LOCK_TIMEOUT_ROUTINE: &str = "ProcessInterrupts";
