//! The enumerations a configuration is made of: [`SslMode`], [`Pooler`],
//! [`TargetSessionAttrs`] and [`Host`], with their parsers and printers.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::ConfigError;

/// TLS mode, with libpq's meanings.
///
/// | mode | encrypts | verifies chain | verifies host name |
/// |---|---|---|---|
/// | `disable` | no | – | – |
/// | `prefer` | if the server offers it | no | no |
/// | `require` | yes | only when `sslrootcert` is given (as libpq) | no |
/// | `verify-ca` | yes | yes | no |
/// | `verify-full` | yes | yes | yes |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, without verification. libpq's default.
    #[default]
    Prefer,
    /// TLS required; certificates are not checked unless `sslrootcert` is set.
    Require,
    /// TLS with the certificate chain checked against `sslrootcert`.
    VerifyCa,
    /// TLS with the chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    /// The name used in URLs (`verify-full`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(ConfigError::new(
                    "sslmode",
                    s,
                    "`allow` is not supported; use disable, prefer, require, verify-ca or verify-full",
                ));
            }
            _ => {
                return Err(ConfigError::new(
                    "sslmode",
                    s,
                    "expected one of disable, prefer, require, verify-ca, verify-full",
                ));
            }
        })
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The connection pooler between the application and PostgreSQL, if any
/// (`RAILYARD_POOLER`). It decides which session features Railyard may use.
///
/// | | `None` | `PgBouncerSession` | `PgBouncerTransaction` |
/// |---|---|---|---|
/// | default `statement_timeout` | startup parameter | `SET` at connect | `SET LOCAL` in each transaction Railyard opens |
/// | prepared statements | named, cached | named, cached | rewritten to the unnamed statement, parsed in the round trip that runs it |
/// | migration lock | session advisory lock | session advisory lock | transaction advisory lock, one migration per transaction |
///
/// ```
/// use railyard::{Config, config::Pooler};
/// let config = Config::from_url("postgres://app@localhost:6432/ledger")?
///     .pooler(Pooler::PgBouncerTransaction);
/// assert_eq!("pgbouncer-transaction".parse::<Pooler>()?, Pooler::PgBouncerTransaction);
/// # Ok::<(), railyard::error::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Pooler {
    /// Railyard talks to PostgreSQL itself.
    #[default]
    None,
    /// PgBouncer with `pool_mode = session`: a server connection per client
    /// connection, reset (`DISCARD ALL`) when the client leaves.
    PgBouncerSession,
    /// PgBouncer with `pool_mode = transaction`: a server connection per
    /// transaction; outside a transaction, each round trip may reach another.
    PgBouncerTransaction,
}

impl Pooler {
    /// The name used in `RAILYARD_POOLER`.
    pub fn as_str(self) -> &'static str {
        match self {
            Pooler::None => "none",
            Pooler::PgBouncerSession => "pgbouncer-session",
            Pooler::PgBouncerTransaction => "pgbouncer-transaction",
        }
    }

    /// Whether startup parameters beyond the basic ones are refused (PgBouncer
    /// refuses `options`).
    pub(crate) fn plain_startup(self) -> bool {
        self != Pooler::None
    }

    /// Whether a server connection lasts only one transaction.
    /// Whether a server session lasts only one transaction behind this
    /// pooler (so session state cannot be kept).
    pub fn per_transaction(self) -> bool {
        self == Pooler::PgBouncerTransaction
    }
}

impl FromStr for Pooler {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        Ok(match s {
            "none" => Pooler::None,
            "pgbouncer-session" => Pooler::PgBouncerSession,
            "pgbouncer-transaction" => Pooler::PgBouncerTransaction,
            _ => {
                return Err(ConfigError::new(
                    "pooler",
                    s,
                    "expected one of none, pgbouncer-session, pgbouncer-transaction (the pool_mode of your PgBouncer)",
                ));
            }
        })
    }
}

impl fmt::Display for Pooler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which servers a connection may land on (libpq's `target_session_attrs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum TargetSessionAttrs {
    /// Any server that accepts the connection.
    #[default]
    Any,
    /// Only a server that accepts writes (a primary). Hosts are tried in order.
    ReadWrite,
    /// Only a server in recovery (a standby).
    Standby,
}

impl TargetSessionAttrs {
    /// The name used in URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::Standby => "standby",
        }
    }
}

impl FromStr for TargetSessionAttrs {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "any" => Ok(TargetSessionAttrs::Any),
            "read-write" | "primary" => Ok(TargetSessionAttrs::ReadWrite),
            "standby" | "read-only" => Ok(TargetSessionAttrs::Standby),
            _ => Err(ConfigError::new(
                "target_session_attrs",
                s,
                "expected any, read-write (primary) or standby (read-only)",
            )),
        }
    }
}

/// One host of a target: a TCP host name or address, or a Unix-socket directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Host {
    /// A host name or IP address reached over TCP.
    Tcp(String),
    /// A directory holding the server's Unix socket (`.s.PGSQL.<port>`).
    Unix(PathBuf),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(h) => f.write_str(h),
            Host::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}
