//! The crate's error type.
//!
//! One `#[non_exhaustive]` enum with a variant per failure domain. Messages carry
//! context (the field, host or migration version involved) and never a password;
//! the underlying cause is available through [`std::error::Error::source`].

use std::fmt;
use std::time::Duration;

use tokio_postgres::error::SqlState;

/// Everything that can go wrong in Railyard.
#[derive(Debug, thiserror::Error)]
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
    #[error("query failed: {0}")]
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
    #[error("deadline of {deadline:?} passed after {attempts} attempt(s){}", last.as_ref().map(|l| format!("; last failure: {l}")).unwrap_or_default())]
    Timeout {
        /// The deadline that passed.
        deadline: Duration,
        /// Attempts started.
        attempts: u32,
        /// The last failure before the deadline, if an attempt had failed.
        last: Option<String>,
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
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
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

/// A configuration value that could not be accepted.
///
/// The message names the field (the environment variable, URL part or builder
/// setter the user wrote) and, when it is safe to, the offending value. A value
/// is never shown when it is or may hold a secret: passwords, values of unknown
/// URL parameters, anything containing `@` or `://` (the shapes of credentials
/// and URLs), and any part of a URL whose shape suggests a misplaced password.
/// Shown values are cut to [`ConfigError::MAX_SHOWN`] characters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConfigError {
    /// The field (URL parameter, environment variable or builder setter) at fault.
    pub field: String,
    /// The offending value as given (cut to [`ConfigError::MAX_SHOWN`]
    /// characters), or empty when it is not shown.
    pub value: String,
    /// What is wrong and what to do about it.
    pub reason: String,
}

impl ConfigError {
    /// The most characters of an offending value an error shows.
    pub const MAX_SHOWN: usize = 64;

    /// An error showing `value`, unless it looks like it may hold a secret.
    pub fn new(
        field: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError {
            field: field.into(),
            value: shown(value.into()),
            reason: reason.into(),
        }
    }

    /// An error that shows nothing of the value.
    pub fn hidden(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            value: String::new(),
            reason: reason.into(),
        }
    }

    /// The same error without its value.
    pub(crate) fn without_value(mut self) -> Self {
        self.value.clear();
        self
    }
}

/// What of a value an error may show: nothing when it could hold credentials,
/// else at most [`ConfigError::MAX_SHOWN`] characters.
fn shown(value: String) -> String {
    if value.contains('@') || value.contains("://") {
        return String::new();
    }
    match value.char_indices().nth(ConfigError::MAX_SHOWN) {
        Some((cut, _)) => format!("{}…", &value[..cut]),
        None => value,
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "invalid {}: {}", self.field, self.reason)
        } else {
            write!(
                f,
                "invalid {} {:?}: {}",
                self.field, self.value, self.reason
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// Which bound of a pool's check-out queue refused a check-out (see
/// [`Error::Overloaded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Shed {
    /// This many check-outs were already waiting: the queue's bound.
    QueueFull {
        /// The bound (`RAILYARD_POOL_MAX_WAITERS`, `Config::pool_max_waiters`).
        max_waiters: u32,
    },
    /// The check-out waited its whole budget and every connection was in use.
    WaitBudget {
        /// The budget (`RAILYARD_POOL_MAX_WAIT`, `Config::pool_max_wait`).
        budget: Duration,
    },
}

impl fmt::Display for Shed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shed::QueueFull { max_waiters } => {
                write!(
                    f,
                    "{max_waiters} check-outs were already waiting (the queue's bound)"
                )
            }
            Shed::WaitBudget { budget } => write!(
                f,
                "every connection stayed in use for the whole wait budget of {budget:?}"
            ),
        }
    }
}

/// What stage of connection establishment failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectStage {
    /// Resolving the host name or opening the socket.
    Socket,
    /// The whole attempt exceeded the connect timeout.
    Timeout,
    /// TLS negotiation or certificate verification.
    Tls,
    /// Startup and authentication: the server answered with an error.
    Startup,
    /// Session setup after authentication (application name, timeouts, role probe).
    Setup,
    /// The server was reachable but did not satisfy `target_session_attrs`.
    SessionAttrs,
    /// The password could not be obtained from its provider.
    Credentials,
}

impl fmt::Display for ConnectStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectStage::Socket => "socket",
            ConnectStage::Timeout => "timeout",
            ConnectStage::Tls => "TLS",
            ConnectStage::Startup => "startup",
            ConnectStage::Setup => "session setup",
            ConnectStage::SessionAttrs => "target_session_attrs",
            ConnectStage::Credentials => "credentials",
        })
    }
}

/// A failed attempt to open a connection, with the server's SQLSTATE when it sent one.
#[derive(Debug, thiserror::Error)]
#[error("connecting to {host}{} failed at {stage}{}: {message}", if *port == 0 { String::new() } else { format!(":{port}") }, sqlstate.as_ref().map(|s| format!(" (SQLSTATE {})", s.code())).unwrap_or_default())]
#[non_exhaustive]
pub struct ConnectError {
    /// The host (or socket directory) tried last.
    pub host: String,
    /// The port tried last (0 when the error is about a whole pool).
    pub port: u16,
    /// Where the attempt failed.
    pub stage: ConnectStage,
    /// The server's SQLSTATE, e.g. `28P01` for a refused password.
    pub sqlstate: Option<SqlState>,
    /// A human-readable description (never contains a password).
    pub message: String,
    #[source]
    pub(crate) source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ConnectError {
    /// The server's SQLSTATE, if the failure came from the server.
    pub fn code(&self) -> Option<&SqlState> {
        self.sqlstate.as_ref()
    }
}

/// Why migrations could not be run, verified or reverted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// An applied migration's SQL differs from the one embedded in this binary.
    #[error(
        "migration {version} was edited after it was applied (recorded checksum {recorded}, embedded {embedded}); restore the original file and add a new migration instead"
    )]
    Edited {
        /// The migration version.
        version: String,
        /// Checksum stored when it was applied.
        recorded: String,
        /// Checksum of the embedded migration.
        embedded: String,
    },
    /// The database holds a version that this binary does not know.
    #[error(
        "the database has migration {version} applied, which this binary does not contain; deploy a binary that includes it (the database is ahead of the code)"
    )]
    UnknownVersion {
        /// The version found in the database.
        version: String,
    },
    /// A version is recorded in `railyard_schema_migrations` but not in
    /// diesel's `__diesel_schema_migrations`: the two tables disagree.
    #[error(
        "migration {version} is recorded in railyard_schema_migrations but not in __diesel_schema_migrations; the bookkeeping was edited by hand or a revert was interrupted. Check whether its changes are in the schema, then either insert its version into __diesel_schema_migrations or delete its row from railyard_schema_migrations"
    )]
    Orphaned {
        /// The version found only in Railyard's table.
        version: String,
    },
    /// The connection was lost while a migration ran.
    #[error(
        "the connection was lost while migration {name} was running{}: {source}",
        if *in_transaction { " (its transaction was rolled back by the server unless the loss came during COMMIT: run `migrate status` to see whether it is recorded)" } else { " (it runs outside a transaction and may be partly applied: inspect the schema before running it again)" }
    )]
    Interrupted {
        /// The migration's directory name (version and name).
        name: String,
        /// Whether it ran inside a transaction.
        in_transaction: bool,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A development setting was given where it is not honoured.
    #[error("{setting}: {reason}")]
    Setting {
        /// The variable or setter.
        setting: String,
        /// Why it is refused, and what to do.
        reason: String,
    },
    /// Another instance held the migration lock for longer than the lock timeout.
    #[error(
        "timed out after {} waiting for the migration lock held by {}; another instance is migrating, or a stuck session holds the lock (see pg_locks)",
        humantime::format_duration(Duration::from_millis(waited.as_millis() as u64)),
        holder_pid.map(|p| format!("backend pid {p}")).unwrap_or_else(|| "a backend that could not be identified".into())
    )]
    LockTimeout {
        /// How long this instance waited.
        waited: Duration,
        /// The backend holding the advisory lock, when it could be found.
        holder_pid: Option<i32>,
    },
    /// A migration's SQL failed; its transaction was rolled back.
    #[error("migration {version} failed and was rolled back: {message}")]
    Failed {
        /// The migration version.
        version: String,
        /// The server's SQLSTATE when there was one.
        sqlstate: Option<SqlState>,
        /// The error message.
        message: String,
    },
    /// A migration marked risky was not applied because the backup that must
    /// precede it could not be taken.
    #[error(
        "migration {name} is marked risky and was NOT applied: the backup before it failed: {source}"
    )]
    BackupFailed {
        /// The migration's directory name (version and name).
        name: String,
        /// Why the backup failed.
        #[source]
        source: Box<Error>,
    },
    /// There is nothing to revert, or the migration has no `down.sql`.
    #[error("cannot revert: {0}")]
    CannotRevert(String),
    /// Reading or writing migration bookkeeping failed.
    #[error("migration bookkeeping: {context}: {source}")]
    Bookkeeping {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The class of a bare diesel error, when no tap information is at hand.
fn diesel_class(e: &diesel::result::Error) -> ErrorClass {
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

/// Which integrity rule was broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ViolationKind {
    /// 23505: a unique index or constraint.
    Unique,
    /// 23503: a foreign key.
    ForeignKey,
    /// 23502: a NOT NULL column.
    NotNull,
    /// 23514: a CHECK constraint.
    Check,
    /// 23P01: an exclusion constraint.
    Exclusion,
    /// 23001: a RESTRICT rule.
    Restrict,
    /// Another 23xxx code.
    Other,
}

/// An integrity violation, with the names the server reported.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Violation {
    /// Which kind of rule.
    pub kind: ViolationKind,
    /// The constraint's name (e.g. `users_email_key`).
    pub constraint: Option<String>,
    /// The table.
    pub table: Option<String>,
    /// The column, when the server names one (NOT NULL).
    pub column: Option<String>,
}

/// A failed query with what the protocol tap saw: the exact SQLSTATE (diesel
/// keeps only six), the constraint, table and column, the phase it failed in,
/// and how many attempts were made.
#[derive(Debug)]
#[non_exhaustive]
pub struct DbError {
    /// The class, from the SQLSTATE and the connection's fate.
    pub class: ErrorClass,
    /// The SQLSTATE, when the server sent one.
    pub sqlstate: Option<SqlState>,
    /// The server's error fields, when it sent an error.
    pub server: Option<ServerError>,
    /// Where in the operation it failed.
    pub phase: Phase,
    /// Attempts made (1 when not retried).
    pub attempts: u32,
    /// `host:port` of the server.
    pub host: String,
    /// Set when the failure was of a retryable kind but retrying stopped.
    pub exhausted: Option<RetriesExhausted>,
    /// The error as diesel (or Railyard) reported it.
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Why retrying stopped although the last failure was of a kind that may be
/// retried (see [`Error::retries_exhausted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetriesExhausted {
    /// The retry policy's attempt limit was reached.
    AttemptLimit {
        /// The limit (attempts in all, the first included).
        limit: u32,
    },
    /// The `Database`'s retry budget was spent: retries across all callers
    /// already took their allowed share of recent work.
    Budget,
    /// The `Database` is closing ([`Database::close`](crate::Database::close)):
    /// no new attempt is started.
    Closing,
}

impl fmt::Display for RetriesExhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetriesExhausted::AttemptLimit { limit } => {
                write!(f, "the attempt limit ({limit}) was reached")
            }
            RetriesExhausted::Budget => f.write_str(
                "the retry budget is spent (retries across this Database already took their share of recent work)",
            ),
            RetriesExhausted::Closing => f.write_str(
                "the database handle is shutting down (Database::close was called): no new attempt is started",
            ),
        }
    }
}

impl DbError {
    /// The violated constraint, for 23xxx errors.
    pub fn violation(&self) -> Option<Violation> {
        let server = self.server.as_ref()?;
        if !server.code.starts_with("23") {
            return None;
        }
        let kind = match server.code.as_str() {
            "23505" => ViolationKind::Unique,
            "23503" => ViolationKind::ForeignKey,
            "23502" => ViolationKind::NotNull,
            "23514" => ViolationKind::Check,
            "23P01" => ViolationKind::Exclusion,
            "23001" => ViolationKind::Restrict,
            _ => ViolationKind::Other,
        };
        Some(Violation {
            kind,
            constraint: server.constraint.clone(),
            table: server.table.clone(),
            column: server.column.clone(),
        })
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(code) = &self.sqlstate {
            write!(f, " (SQLSTATE {}", code.code())?;
        } else {
            f.write_str(" (no SQLSTATE")?;
        }
        write!(
            f,
            ", class {}, {:?} on {}",
            self.class, self.phase, self.host
        )?;
        if self.attempts > 1 {
            write!(f, ", after {} attempts", self.attempts)?;
        }
        if let Some(why) = &self.exhausted {
            write!(f, "; retries stopped: {why}")?;
        }
        f.write_str(")")
    }
}

impl std::error::Error for DbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
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
const LOCK_TIMEOUT_ROUTINE: &str = "ProcessInterrupts";
