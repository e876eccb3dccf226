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
    #[error("TLS configuration: {0}")]
    Tls(String),

    /// A new connection could not be established.
    #[error(transparent)]
    Connect(#[from] ConnectError),

    /// No pooled connection became available within the checkout timeout.
    #[error(
        "no {pool} connection became available within {waited:?}; raise the pool size or the checkout timeout, or look for connections held too long"
    )]
    PoolTimeout {
        /// Which pool ("primary" or a replica's host).
        pool: String,
        /// How long the caller waited.
        waited: Duration,
    },

    /// A query failed. The diesel error is kept as is.
    #[error("query failed: {0}")]
    Query(#[from] diesel::result::Error),

    /// Booting or managing migrations failed.
    #[error(transparent)]
    Migration(#[from] MigrationError),

    /// The embedded local PostgreSQL cluster could not be started or joined.
    #[error("local PostgreSQL cluster: {0}")]
    Local(String),

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
            Error::Migration(MigrationError::Failed { sqlstate, .. }) => sqlstate.as_ref(),
            _ => None,
        }
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
/// The message names the field and the offending value; when the field holds a
/// secret, the value is replaced by `***`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {value:?}: {reason}")]
pub struct ConfigError {
    /// The field (URL parameter, environment variable or builder setter) at fault.
    pub field: String,
    /// The offending value, redacted when it is a secret.
    pub value: String,
    /// What is wrong and what to do about it.
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(
        field: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError {
            field: field.into(),
            value: value.into(),
            reason: reason.into(),
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
#[error("connecting to {host}:{port} failed at {stage}{}: {message}", sqlstate.as_ref().map(|s| format!(" (SQLSTATE {})", s.code())).unwrap_or_default())]
pub struct ConnectError {
    /// The host (or socket directory) tried last.
    pub host: String,
    /// The port tried last.
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
    /// Another instance held the migration lock for longer than the lock timeout.
    #[error(
        "timed out after {waited:?} waiting for the migration lock held by backend pid {holder_pid:?}; another instance is migrating, or a stuck session holds the lock (see pg_locks)"
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
    /// There is nothing to revert, or the migration has no `down.sql`.
    #[error("cannot revert: {0}")]
    CannotRevert(String),
    /// Reading or writing migration bookkeeping failed.
    #[error("migration bookkeeping: {0}")]
    Bookkeeping(String),
}
