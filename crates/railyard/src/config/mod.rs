//! Typed configuration, parsed once at the boundary.
//!
//! A [`Config`] holds the primary's [`ConnectTarget`] (a parsed `postgres://` URL,
//! several hosts allowed), the replicas' targets, pool sizes and timeouts, TLS
//! settings and session defaults. It is built from a URL with [`Config::from_url`],
//! from the environment with [`Config::from_env`], or with the consuming setters.
//!
//! Secrets never leave this module in clear: [`Secret`] prints as `***`, the
//! `Debug`/`Display` of every type here redact the password, and a
//! [`ConfigError`] never shows a value that is or may hold a secret (see its
//! docs, and [`ConnectTarget`] for the URL grammar and what it refuses).
//!
//! | environment variable | meaning |
//! |---|---|
//! | `RAILYARD_ENV` | `development`, `test` or `production`: the [`Profile`] whose defaults apply (unset: development in debug builds, production in release builds) |
//! | `DATABASE_URL` | primary URL (several hosts allowed: `postgres://u@h1:5432,h2:5432/db`); at most [`MAX_URL_LEN`] bytes |
//! | `DATABASE_REPLICA_URLS` | replica URLs, separated by whitespace or commas (no other separator); empty means none. A replica may not repeat the primary or another replica (same hosts, ports and database) |
//! | `RAILYARD_POOL_MAX_SIZE`, `RAILYARD_POOL_MIN_IDLE` | primary pool sizes: whole numbers, at most [`MAX_POOL_SIZE`]; the maximum is at least 1, the minimum idle at most the maximum (and at most the replica pool's size when there are replicas) |
//! | `RAILYARD_REPLICA_POOL_MAX_SIZE` | per-replica pool size, 1 to [`MAX_POOL_SIZE`] |
//! | `RAILYARD_POOL_MAX_WAITERS` | check-outs that may wait for a connection at once, per pool (primary and each replica), 1 to [`MAX_POOL_WAITERS`]; beyond it a check-out is shed at once ([`crate::Error::Overloaded`]). Default: [`DEFAULT_WAITERS_PER_CONNECTION`] × the pool's size |
//! | `RAILYARD_POOL_MAX_WAIT` | how long a check-out waits while every connection is in use before it is shed: a positive duration below the checkout timeout. Default: 1 s, or half the checkout timeout when that is shorter |
//! | `RAILYARD_PING_AFTER_IDLE` | a connection idle in the pool this long is pinged at check-out ([`PoolConfig::ping_after_idle`]): a duration, `0s` pings every check-out; default 30 s |
//! | `RAILYARD_MAX_CONNECTING` | connection attempts one target may have under way at once, per `Database` ([`PoolConfig::max_connecting`]): 1 to [`MAX_POOL_SIZE`], default 8 |
//! | `RAILYARD_CONNECT_TIMEOUT`, `RAILYARD_CHECKOUT_TIMEOUT`, `RAILYARD_MIGRATION_LOCK_TIMEOUT` | positive durations with a unit, such as `5s`, `250ms`, `1.5s`, `10m`; at most ten years |
//! | `RAILYARD_SHUTDOWN_TIMEOUT` | the deadline an application gives [`crate::Database::close`] when it stops (the reference binary's `serve` exits within it): a positive duration, default 10 s |
//! | `RAILYARD_IDLE_TIMEOUT`, `RAILYARD_MAX_LIFETIME` | durations; `0`, `off` or `none` means no limit |
//! | `RAILYARD_STATEMENT_TIMEOUT` | default `statement_timeout` for every session, 1 ms to 2147483647 ms (the server's limit); `0`, `off` or `none` disables |
//! | `RAILYARD_APPLICATION_NAME` | `application_name` when the URL does not set one; at most [`MAX_NAME_LEN`] bytes |
//! | `RAILYARD_SSLMODE`, `RAILYARD_SSLROOTCERT` | TLS settings when the URL does not set them; the CA file is read only when the effective `sslmode` is not `disable` |
//! | `RAILYARD_PASSWORD_FILE`, `RAILYARD_PASSWORD_ENV` | read the password for every new connection from a file (a regular file of at most [`MAX_PASSWORD_FILE_LEN`] bytes) or a variable; set one of them, not both |
//! | `RAILYARD_TIME_ZONE` | session `TimeZone` (default `UTC`); checked by the server at the first connection |
//! | `RAILYARD_POOLER` | `none` (default), `pgbouncer-session` or `pgbouncer-transaction`: the [`Pooler`] in front of the servers |
//! | `RAILYARD_WATCHDOG_CANCEL_AFTER` | runs the long-running statement watchdog ([`crate::observe::Watchdog::cancel_after`]): this application's statements running longer are cancelled. A duration of at least [`MIN_WATCHDOG_LIMIT`] (10 ms); `0`, `off` or `none` (the default) runs none. [`crate::DatabaseBuilder::watchdog`] wins when called |
//! | `RAILYARD_CAPTURE_PLANS_SLOWER_THAN` | captures the plans of statements slower than this ([`crate::observe::PlanCapture::slower_than`]): a positive duration; `0`, `off` or `none` (the default) captures none. [`crate::DatabaseBuilder::capture_plans`] wins when called |
//! | `RAILYARD_DETECT_REPEATS` | warns when one statement runs this many times in one operation ([`crate::DatabaseBuilder::detect_repeats`]): 2 to [`MAX_DETECT_REPEATS`]; `off` or `none` (the default) disables. The builder's call wins when made |
//!
//! Every `RAILYARD_*` variable above, when set, must not be empty: unset it to
//! get the default. Errors name the variable (`RAILYARD_CONNECT_TIMEOUT`,
//! `DATABASE_URL (port)`); errors of a configuration built with the setters
//! name the setter (`Config::pool_max_size`).
//!
//! Three more are read where they are used, not by [`Config::from_env`]; for
//! these, an empty value counts as unset:
//!
//! | environment variable | meaning |
//! |---|---|
//! | `RAILYARD_MIGRATIONS_ALLOW_EDITED` | `latest` (the only value) lets the newest migration differ from what was applied; boot records its new checksum without running it again (see [`crate::migrate`]). Honoured in debug builds only: a release build refuses to boot with it, and it is meant for the development and test profiles |
//! | `RAILYARD_MIGRATION_BACKUP_DIR` | the directory where `pg_dump` writes the backup taken before a migration marked risky, when [`crate::Migrator::backup_before_risky`] was not called (ignored after [`crate::Migrator::backup_dir_from_env`]`(false)`); with neither, a risky migration is refused |
//! | `RAILYARD_PG_BINDIR` | the directory searched first for PostgreSQL's programs: `pg_dump` and `pg_restore` here, the server binaries in `railyard-local`; then `$PATH`, then the newest `/usr/lib/postgresql/<version>/bin` |

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::error::ConfigError;

mod builder;
mod env;
#[cfg(test)]
mod leaks;
mod profile;
mod secret;
mod url;
mod validate;

pub use profile::{PROFILE_VAR, Profile};
pub(crate) use secret::read_small_file;
pub use secret::{Credentials, MAX_PASSWORD_FILE_LEN, Secret};
pub use url::{
    ConnectTarget, MAX_HOST_LEN, MAX_NAME_LEN, MAX_OPTIONS_LEN, MAX_PATH_LEN, MAX_TIME_ZONE_LEN,
    MAX_URL_LEN,
};
use validate::prefix_field;

/// The largest pool size accepted (primary or per replica).
pub const MAX_POOL_SIZE: u32 = 10_000;

/// Debian's PostgreSQL program directories, `/usr/lib/postgresql/<major>/bin`,
/// newest major version first (by number: 16 before 9.6). The one list that
/// every search for PostgreSQL's programs (the server, its clients,
/// pg_autoctl's extension, pgbench) falls back on.
#[doc(hidden)]
pub fn versioned_pg_bindirs() -> Vec<PathBuf> {
    newest_first(
        std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path()),
    )
}

/// The `bin` directories of the version directories among `dirs`, newest
/// first; names that are not versions are left out.
fn newest_first(dirs: impl Iterator<Item = PathBuf>) -> Vec<PathBuf> {
    let mut versions: Vec<(Vec<u32>, PathBuf)> = dirs
        .filter_map(|d| {
            let v: Vec<u32> = d
                .file_name()?
                .to_str()?
                .split('.')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            Some((v, d.join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, d)| d).collect()
}

/// The largest bound on a pool's waiting check-outs
/// (`RAILYARD_POOL_MAX_WAITERS`): each waiter is a suspended task and its
/// caller's memory, so the queue stays bounded even when configured large.
pub const MAX_POOL_WAITERS: u32 = 100_000;

/// A pool's default bound on waiting check-outs, per connection of its size.
///
/// Within the wait budget `B`, `N` connections serve about `N × B / w`
/// check-outs whose work takes `w`. With the default budget of 1 s and
/// work of up to a quarter of a second, that is `4 × N`: the waiters a full
/// pool can still serve in time. Check-outs beyond them would only wait out
/// the budget before being shed; refusing them at once tells their callers
/// sooner and keeps the memory of a burst bounded.
pub const DEFAULT_WAITERS_PER_CONNECTION: u32 = 4;

/// The default wait budget of a check-out when every connection is in use,
/// unless half the checkout timeout is shorter.
pub const DEFAULT_POOL_MAX_WAIT: Duration = Duration::from_secs(1);

/// The default deadline of [`crate::Database::close`] when an application
/// stops (`RAILYARD_SHUTDOWN_TIMEOUT`).
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest duration accepted for a timeout (ten years): longer ones are
/// typing mistakes, and would overflow clocks.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

/// The largest CA certificate file (`sslrootcert`) read, in bytes (1 MiB).
pub const MAX_ROOT_CERT_LEN: u64 = 1 << 20;

/// The shortest limit of the long-running statement watchdog
/// (`RAILYARD_WATCHDOG_CANCEL_AFTER`): [`crate::observe::Watchdog::cancel_after`]
/// raises shorter ones to it, the configuration refuses them.
pub const MIN_WATCHDOG_LIMIT: Duration = Duration::from_millis(10);

/// The largest repeat threshold accepted (`RAILYARD_DETECT_REPEATS`): one
/// operation running a statement that many times is far past any N+1 worth
/// naming, and a larger value is a typing mistake.
pub const MAX_DETECT_REPEATS: u32 = 100_000;

/// The longest `statement_timeout`, in milliseconds: the server's limit.
pub(crate) const MAX_STATEMENT_TIMEOUT_MS: u128 = i32::MAX as u128;

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

/// Pool sizes and timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolConfig {
    /// Most connections the pool opens. Defaults to 10.
    pub max_size: u32,
    /// Idle connections the pool keeps ready. Defaults to none.
    pub min_idle: Option<u32>,
    /// How long a checkout waits for a connection. Defaults to 5 s.
    pub checkout_timeout: Duration,
    /// Idle connections older than this are closed. Defaults to 10 min.
    pub idle_timeout: Option<Duration>,
    /// Connections older than this are closed. Defaults to 30 min.
    pub max_lifetime: Option<Duration>,
    /// Check-outs that may wait for a connection at once, per pool; beyond
    /// it, check-outs are shed at once. `None`: [`DEFAULT_WAITERS_PER_CONNECTION`]
    /// × the pool's size (see [`PoolConfig::max_waiters_for`]).
    pub max_waiters: Option<u32>,
    /// How long a check-out waits while every connection is in use before it
    /// is shed. `None`: [`DEFAULT_POOL_MAX_WAIT`], or half the checkout
    /// timeout when that is shorter (see [`PoolConfig::max_wait_or_default`]).
    pub max_wait: Option<Duration>,
    /// A connection idle in the pool for this long is pinged (an empty
    /// query) at check-out; a younger one is checked from the protocol tap,
    /// without a round trip. The ping is bounded by the connect timeout: a
    /// connection that does not answer in time (a dead link) is discarded
    /// and the check-out goes on with another. Defaults to 30 s.
    pub ping_after_idle: Duration,
    /// Connection attempts one target (the primary, or one replica) may
    /// have under way at once, per `Database`. When many connections must
    /// be replaced at once (a network cut, a restarted server), an attempt
    /// beyond this bound first waits a random part of a spread that grows
    /// with the number under way (2 ms each, up to 100 ms), then its turn:
    /// the pool refills in a stream, not a herd. Defaults to 8.
    pub max_connecting: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_size: 10,
            min_idle: None,
            checkout_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
            max_waiters: None,
            max_wait: None,
            ping_after_idle: Duration::from_secs(30),
            max_connecting: 8,
        }
    }
}

impl PoolConfig {
    /// The bound on waiting check-outs of a pool of `size` connections.
    ///
    /// ```
    /// let c = railyard::Config::from_url("postgres://u@h/db")?.pool_max_size(4);
    /// assert_eq!(c.pool().max_waiters_for(4), 16);
    /// assert_eq!(c.pool_max_waiters(3).pool().max_waiters_for(4), 3);
    /// # Ok::<(), railyard::error::ConfigError>(())
    /// ```
    pub fn max_waiters_for(&self, size: u32) -> u32 {
        self.max_waiters.unwrap_or_else(|| {
            size.saturating_mul(DEFAULT_WAITERS_PER_CONNECTION)
                .clamp(1, MAX_POOL_WAITERS)
        })
    }

    /// The wait budget of a check-out while every connection is in use.
    pub fn max_wait_or_default(&self) -> Duration {
        self.max_wait
            .unwrap_or_else(|| DEFAULT_POOL_MAX_WAIT.min(self.checkout_timeout / 2))
    }
}

/// A setting that may come from the environment or from a setter: errors name
/// whichever the user wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Setting {
    PoolMaxSize,
    PoolMinIdle,
    ReplicaPoolMaxSize,
    ConnectTimeout,
    CheckoutTimeout,
    IdleTimeout,
    MaxLifetime,
    StatementTimeout,
    MigrationLockTimeout,
    ApplicationName,
    SslMode,
    SslRootCert,
    PasswordFile,
    PasswordEnv,
    TimeZone,
    Pooler,
    PoolMaxWaiters,
    PoolMaxWait,
    ShutdownTimeout,
    WatchdogCancelAfter,
    CapturePlansSlowerThan,
    DetectRepeats,
    PingAfterIdle,
    MaxConnecting,
}

impl Setting {
    /// Every setting, for the environment parser.
    pub(crate) const ALL: [Setting; 24] = [
        Setting::PoolMaxSize,
        Setting::PoolMinIdle,
        Setting::ReplicaPoolMaxSize,
        Setting::PoolMaxWaiters,
        Setting::PoolMaxWait,
        Setting::PingAfterIdle,
        Setting::MaxConnecting,
        Setting::ShutdownTimeout,
        Setting::ConnectTimeout,
        Setting::CheckoutTimeout,
        Setting::IdleTimeout,
        Setting::MaxLifetime,
        Setting::StatementTimeout,
        Setting::MigrationLockTimeout,
        Setting::ApplicationName,
        Setting::SslMode,
        Setting::SslRootCert,
        Setting::PasswordFile,
        Setting::PasswordEnv,
        Setting::TimeZone,
        Setting::Pooler,
        Setting::WatchdogCancelAfter,
        Setting::CapturePlansSlowerThan,
        Setting::DetectRepeats,
    ];

    /// The environment variable.
    pub(crate) fn env(self) -> &'static str {
        match self {
            Setting::PoolMaxSize => "RAILYARD_POOL_MAX_SIZE",
            Setting::PoolMinIdle => "RAILYARD_POOL_MIN_IDLE",
            Setting::ReplicaPoolMaxSize => "RAILYARD_REPLICA_POOL_MAX_SIZE",
            Setting::ConnectTimeout => "RAILYARD_CONNECT_TIMEOUT",
            Setting::CheckoutTimeout => "RAILYARD_CHECKOUT_TIMEOUT",
            Setting::IdleTimeout => "RAILYARD_IDLE_TIMEOUT",
            Setting::MaxLifetime => "RAILYARD_MAX_LIFETIME",
            Setting::StatementTimeout => "RAILYARD_STATEMENT_TIMEOUT",
            Setting::MigrationLockTimeout => "RAILYARD_MIGRATION_LOCK_TIMEOUT",
            Setting::ApplicationName => "RAILYARD_APPLICATION_NAME",
            Setting::SslMode => "RAILYARD_SSLMODE",
            Setting::SslRootCert => "RAILYARD_SSLROOTCERT",
            Setting::PasswordFile => "RAILYARD_PASSWORD_FILE",
            Setting::PasswordEnv => "RAILYARD_PASSWORD_ENV",
            Setting::TimeZone => "RAILYARD_TIME_ZONE",
            Setting::Pooler => "RAILYARD_POOLER",
            Setting::PoolMaxWaiters => "RAILYARD_POOL_MAX_WAITERS",
            Setting::PoolMaxWait => "RAILYARD_POOL_MAX_WAIT",
            Setting::ShutdownTimeout => "RAILYARD_SHUTDOWN_TIMEOUT",
            Setting::WatchdogCancelAfter => "RAILYARD_WATCHDOG_CANCEL_AFTER",
            Setting::CapturePlansSlowerThan => "RAILYARD_CAPTURE_PLANS_SLOWER_THAN",
            Setting::DetectRepeats => "RAILYARD_DETECT_REPEATS",
            Setting::PingAfterIdle => "RAILYARD_PING_AFTER_IDLE",
            Setting::MaxConnecting => "RAILYARD_MAX_CONNECTING",
        }
    }

    /// How this setting's value in `c` reads in the documentation's table.
    pub(crate) fn default_in(self, c: &Config) -> String {
        let d = |d: Duration| format!("`{}`", humantime::format_duration(d));
        let off = |v: Option<Duration>| v.map_or_else(|| "off".to_owned(), d);
        match self {
            Setting::PoolMaxSize => c.pool.max_size.to_string(),
            Setting::PoolMinIdle => c
                .pool
                .min_idle
                .map_or_else(|| "none".to_owned(), |n| n.to_string()),
            Setting::ReplicaPoolMaxSize => c.replica_pool_max_size.to_string(),
            Setting::ConnectTimeout => d(c.connect_timeout),
            Setting::CheckoutTimeout => d(c.pool.checkout_timeout),
            Setting::IdleTimeout => off(c.pool.idle_timeout),
            Setting::MaxLifetime => off(c.pool.max_lifetime),
            Setting::StatementTimeout => off(c.statement_timeout),
            Setting::MigrationLockTimeout => d(c.migration_lock_timeout),
            Setting::ApplicationName => format!("`{}`", c.application_name),
            Setting::SslMode => format!("`{}`", c.ssl_mode.unwrap_or_default()),
            Setting::SslRootCert => "the system's roots".to_owned(),
            Setting::PasswordFile | Setting::PasswordEnv => "unset: the URL's password".to_owned(),
            Setting::TimeZone => format!("`{}`", c.time_zone),
            Setting::Pooler => format!("`{}`", c.pooler),
            Setting::PoolMaxWaiters => format!(
                "{} × the pool's size",
                crate::config::DEFAULT_WAITERS_PER_CONNECTION
            ),
            Setting::PoolMaxWait => d(c.pool.max_wait_or_default()),
            Setting::ShutdownTimeout => d(c.shutdown_deadline()),
            Setting::WatchdogCancelAfter => off(c.watchdog_cancel_after),
            Setting::CapturePlansSlowerThan => off(c.capture_plans_slower_than),
            Setting::DetectRepeats => c
                .detect_repeats
                .map_or_else(|| "off".to_owned(), |n| n.to_string()),
            Setting::PingAfterIdle => d(c.pool.ping_after_idle),
            Setting::MaxConnecting => c.pool.max_connecting.to_string(),
        }
    }

    /// The setter of [`Config`].
    fn setter(self) -> &'static str {
        match self {
            Setting::PoolMaxSize => "Config::pool_max_size",
            Setting::PoolMinIdle => "Config::pool_min_idle",
            Setting::ReplicaPoolMaxSize => "Config::replica_pool_max_size",
            Setting::ConnectTimeout => "Config::connect_timeout",
            Setting::CheckoutTimeout => "Config::checkout_timeout",
            Setting::IdleTimeout => "Config::idle_timeout",
            Setting::MaxLifetime => "Config::max_lifetime",
            Setting::StatementTimeout => "Config::statement_timeout",
            Setting::MigrationLockTimeout => "Config::migration_lock_timeout",
            Setting::ApplicationName => "Config::application_name",
            Setting::SslMode => "Config::ssl_mode",
            Setting::SslRootCert => "Config::ssl_root_cert",
            Setting::PasswordFile | Setting::PasswordEnv => "Config::credentials",
            Setting::TimeZone => "Config::time_zone",
            Setting::Pooler => "Config::pooler",
            Setting::PoolMaxWaiters => "Config::pool_max_waiters",
            Setting::PoolMaxWait => "Config::pool_max_wait",
            Setting::ShutdownTimeout => "Config::shutdown_timeout",
            Setting::WatchdogCancelAfter => "Config::watchdog_cancel_after",
            Setting::CapturePlansSlowerThan => "Config::capture_plans_slower_than",
            Setting::DetectRepeats => "Config::detect_repeats",
            Setting::PingAfterIdle => "Config::ping_after_idle",
            Setting::MaxConnecting => "Config::max_connecting",
        }
    }
}

/// Everything needed to build a [`crate::Database`].
///
/// ```
/// use std::time::Duration;
/// use railyard::{Config, SslMode};
/// let config = Config::from_url("postgres://app:pw@localhost:5432/ledger")?
///     .replica_url("postgres://app:pw@localhost:5433/ledger")?
///     .ssl_mode(SslMode::VerifyFull)
///     .pool_max_size(20)
///     .statement_timeout(Some(Duration::from_secs(30)));
/// assert_eq!(config.replicas().len(), 1);
/// assert!(!format!("{config:?}").contains("pw@"));
/// # Ok::<(), railyard::error::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct Config {
    pub(crate) primary: ConnectTarget,
    pub(crate) replicas: Vec<ConnectTarget>,
    pub(crate) pool: PoolConfig,
    pub(crate) replica_pool_max_size: u32,
    pub(crate) connect_timeout: Duration,
    pub(crate) statement_timeout: Option<Duration>,
    pub(crate) application_name: String,
    pub(crate) ssl_mode: Option<SslMode>,
    pub(crate) ssl_root_cert: Option<PathBuf>,
    pub(crate) credentials: Credentials,
    pub(crate) migration_lock_timeout: Duration,
    pub(crate) time_zone: String,
    pub(crate) pooler: Pooler,
    pub(crate) profile: Profile,
    /// Set when no `DATABASE_URL` was given and the profile lets the local
    /// cluster stand in: the database to use there (the primary is a
    /// placeholder until [`crate::Database`] resolves it).
    pub(crate) local_database: Option<String>,
    pub(crate) breaker_threshold: u32,
    pub(crate) breaker_cooldown: Duration,
    pub(crate) shutdown_timeout: Duration,
    /// The long-running statement watchdog's limit, when it should run.
    pub(crate) watchdog_cancel_after: Option<Duration>,
    /// The plan-capture threshold, when plans should be captured.
    pub(crate) capture_plans_slower_than: Option<Duration>,
    /// The repeat threshold of N+1 detection, when it should run.
    pub(crate) detect_repeats: Option<u32>,
    /// The settings named by their environment variable in errors: all of them
    /// for a configuration read from the environment (a default is changed
    /// there too), less those a setter changed later.
    pub(crate) from_env: BTreeSet<Setting>,
    /// Whether the primary came from `DATABASE_URL`, and how many of the first
    /// replicas from `DATABASE_REPLICA_URLS`.
    pub(crate) env_urls: Option<usize>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("primary", &self.primary)
            .field("replicas", &self.replicas)
            .field("pool", &self.pool)
            .field("replica_pool_max_size", &self.replica_pool_max_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("application_name", &self.application_name)
            .field("ssl_mode", &self.ssl_mode)
            .field("ssl_root_cert", &self.ssl_root_cert)
            .field("credentials", &self.credentials)
            .field("migration_lock_timeout", &self.migration_lock_timeout)
            .field("time_zone", &self.time_zone)
            .field("pooler", &self.pooler)
            .field("profile", &self.profile)
            .field("local_database", &self.local_database)
            .field("breaker_threshold", &self.breaker_threshold)
            .field("breaker_cooldown", &self.breaker_cooldown)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("watchdog_cancel_after", &self.watchdog_cancel_after)
            .field("capture_plans_slower_than", &self.capture_plans_slower_than)
            .field("detect_repeats", &self.detect_repeats)
            .finish()
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "primary {}", self.primary)?;
        for r in &self.replicas {
            write!(f, ", replica {r}")?;
        }
        write!(
            f,
            " (pool {}, sslmode {})",
            self.pool.max_size,
            self.effective_ssl_mode(&self.primary)
        )
    }
}

impl Config {
    /// A configuration for the given primary URL, with defaults for everything else.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        Ok(Config::new(url.parse()?))
    }

    /// A configuration for an already parsed primary target.
    pub fn new(primary: ConnectTarget) -> Self {
        Config {
            primary,
            replicas: Vec::new(),
            pool: PoolConfig::default(),
            replica_pool_max_size: 10,
            connect_timeout: Duration::from_secs(10),
            statement_timeout: None,
            application_name: "railyard".to_owned(),
            ssl_mode: None,
            ssl_root_cert: None,
            credentials: Credentials::FromUrl,
            migration_lock_timeout: Duration::from_secs(60),
            time_zone: "UTC".to_owned(),
            pooler: Pooler::None,
            profile: Profile::Development,
            local_database: None,
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_millis(250),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            watchdog_cancel_after: None,
            capture_plans_slower_than: None,
            detect_repeats: None,
            from_env: BTreeSet::new(),
            env_urls: None,
        }
    }

    /// The name of a setting in errors: its environment variable when the value
    /// came from there, else its setter.
    pub(crate) fn field(&self, s: Setting) -> &'static str {
        if self.from_env.contains(&s) {
            s.env()
        } else {
            s.setter()
        }
    }

    /// The name of a target in errors: index 0 is the primary, `i` the
    /// replica `i - 1`.
    pub(crate) fn target_field(&self, i: usize) -> String {
        match (i, self.env_urls) {
            (0, Some(_)) => "DATABASE_URL".to_owned(),
            (0, None) => "primary URL".to_owned(),
            (i, Some(n)) if i <= n => {
                if n == 1 {
                    "DATABASE_REPLICA_URLS".to_owned()
                } else {
                    format!("DATABASE_REPLICA_URLS (URL {i})")
                }
            }
            (i, _) => format!("replica URL {i}"),
        }
    }

    /// The environment profile the defaults came from (see [`Profile`]);
    /// development for a configuration built with [`Config::new`].
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// The pooler the application connects through (`RAILYARD_POOLER`).
    pub fn pooler_mode(&self) -> Pooler {
        self.pooler
    }

    /// The local cluster's database this configuration stands for, when no
    /// `DATABASE_URL` was set and the profile lets the local cluster stand in
    /// ([`crate::Database`] refuses it at connect: `railyard-local`'s
    /// `LocalCluster::resolve` points it at a cluster first).
    pub fn local_database(&self) -> Option<&str> {
        self.local_database.as_deref()
    }

    /// This configuration pointed at `primary` and `replicas` (what
    /// `railyard-local` does with one that stands for the local cluster),
    /// every other setting kept.
    ///
    /// ```
    /// let c = railyard::Config::from_url("postgres://app@db1/app")?;
    /// let other = "postgres://app@db2/app".parse()?;
    /// assert_eq!(c.with_targets(other, vec![]).primary().hosts().len(), 1);
    /// # Ok::<(), railyard::error::ConfigError>(())
    /// ```
    pub fn with_targets(mut self, primary: ConnectTarget, replicas: Vec<ConnectTarget>) -> Self {
        self.local_database = None;
        self.primary = primary;
        self.replicas = replicas;
        self.env_urls = None;
        self
    }

    /// The `application_name` the primary's connections carry: the URL's,
    /// else [`Config::application_name`]'s (default `railyard`). The
    /// watchdog and `railyard queries` find the application's backends by it.
    pub fn effective_application_name(&self) -> &str {
        self.primary
            .application_name()
            .unwrap_or(&self.application_name)
    }

    /// The primary's target.
    pub fn primary(&self) -> &ConnectTarget {
        &self.primary
    }
    /// The replicas' targets.
    pub fn replicas(&self) -> &[ConnectTarget] {
        &self.replicas
    }
    /// Pool settings of the primary.
    pub fn pool(&self) -> &PoolConfig {
        &self.pool
    }
    /// The per-replica pool size.
    pub fn replica_pool_size(&self) -> u32 {
        self.replica_pool_max_size
    }
    /// The migration lock timeout.
    pub fn migration_lock_wait(&self) -> Duration {
        self.migration_lock_timeout
    }
    /// The session statement timeout.
    pub fn session_statement_timeout(&self) -> Option<Duration> {
        self.statement_timeout
    }
    /// The deadline to give [`crate::Database::close`] when the application
    /// stops (`RAILYARD_SHUTDOWN_TIMEOUT`).
    pub fn shutdown_deadline(&self) -> Duration {
        self.shutdown_timeout
    }

    pub(crate) fn effective_ssl_mode(&self, t: &ConnectTarget) -> SslMode {
        t.params.ssl_mode.or(self.ssl_mode).unwrap_or_default()
    }

    pub(crate) fn effective_root_cert<'a>(&'a self, t: &'a ConnectTarget) -> Option<&'a PathBuf> {
        t.params
            .ssl_root_cert
            .as_ref()
            .or(self.ssl_root_cert.as_ref())
    }

    pub(crate) fn effective_connect_timeout(&self, t: &ConnectTarget) -> Duration {
        t.params.connect_timeout.unwrap_or(self.connect_timeout)
    }

    pub(crate) fn statement_timeout_setting(&self) -> Option<String> {
        self.statement_timeout
            .map(|d| format!("{}ms", d.as_millis()))
    }

    /// The name of the time zone setting, for errors the server reports.
    pub(crate) fn time_zone_field(&self) -> &'static str {
        self.field(Setting::TimeZone)
    }
}

#[cfg(test)]
mod tests {
    use super::url::Params;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn postgresql_versions_are_ordered_by_number_newest_first() {
        let dirs = ["9.6", "15", "common", "16", "10"]
            .map(|v| PathBuf::from("/usr/lib/postgresql").join(v));
        let bins: Vec<String> = newest_first(dirs.into_iter())
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        assert_eq!(
            bins,
            ["16", "15", "10", "9.6"].map(|v| format!("/usr/lib/postgresql/{v}/bin"))
        );
    }

    #[test]
    fn parses_a_multi_host_url_with_parameters() {
        let t: ConnectTarget = "postgresql://app:p%40ss@h1:5432,[::1]:5433,h3/ledger?sslmode=verify-full&sslrootcert=/tmp/ca.crt&target_session_attrs=read-write&application_name=api&connect_timeout=3"
            .parse()
            .unwrap();
        assert_eq!(
            t.hosts,
            vec![
                (Host::Tcp("h1".into()), 5432),
                (Host::Tcp("::1".into()), 5433),
                (Host::Tcp("h3".into()), 5432)
            ]
        );
        assert_eq!(t.password.as_ref().unwrap().expose(), "p@ss");
        assert_eq!(t.dbname(), Some("ledger"));
        assert_eq!(t.ssl_mode(), Some(SslMode::VerifyFull));
        assert_eq!(
            t.target_session_attrs(),
            Some(TargetSessionAttrs::ReadWrite)
        );
        assert_eq!(t.params.connect_timeout, Some(Duration::from_secs(3)));
    }

    #[test]
    fn parses_unix_socket_hosts() {
        let t: ConnectTarget = "postgres://app@/db?host=/run/pg&port=5433".parse().unwrap();
        assert_eq!(t.hosts, vec![(Host::Unix("/run/pg".into()), 5433)]);
        let t: ConnectTarget = "postgres://app@%2Frun%2Fpg:5434/db".parse().unwrap();
        assert_eq!(t.hosts, vec![(Host::Unix("/run/pg".into()), 5434)]);
    }

    #[test]
    fn each_malformed_url_names_its_field() {
        let cases = [
            ("mysql://u@h/db", "url"),
            ("postgres://u@h:99999/db", "port"),
            ("postgres://u@h:0/db", "port"),
            ("postgres://u@h/db?sslmode=sometimes", "sslmode"),
            ("postgres://u@h/db?connect_timeout=soon", "connect_timeout"),
            (
                "postgres://u@h/db?target_session_attrs=writable",
                "target_session_attrs",
            ),
            ("postgres://u@h/db?colour=blue", "colour"),
            (
                "postgres://u@h/db?sslmode=require&sslmode=disable",
                "sslmode",
            ),
            ("postgres://u@[::1/db", "host"),
            ("postgres://u@h1,,h2/db", "host"),
            ("postgres://u:p%zz@h/db", "password"),
            ("postgres://u@h1,h2/db?port=1,2,3", "port"),
        ];
        for (url, field) in cases {
            let err = url.parse::<ConnectTarget>().unwrap_err();
            assert_eq!(err.field, field, "{url}: {err}");
        }
    }

    #[test]
    fn a_bad_password_encoding_never_shows_the_password() {
        let err = "postgres://u:hunter2%zz@h/db"
            .parse::<ConnectTarget>()
            .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    fn arb_text() -> impl Strategy<Value = String> {
        // Any printable text, including URL metacharacters, to exercise the encoder.
        proptest::string::string_regex("[ -~é€]{1,16}").unwrap()
    }

    fn arb_name() -> impl Strategy<Value = String> {
        // Names the parser accepts: no control character, no credential shape.
        arb_text().prop_filter("not credential-shaped", |s| {
            !(s.contains("://") || (s.contains('@') && s.contains([':', '/'])))
        })
    }

    fn arb_target() -> impl Strategy<Value = ConnectTarget> {
        let host = prop_oneof![
            "[a-z][a-z0-9-]{0,10}(\\.[a-z]{2,5})?".prop_map(Host::Tcp),
            Just(Host::Tcp("::1".into())),
            Just(Host::Tcp("127.0.0.1".into())),
        ];
        let unix = "/[a-z]{1,8}(/[a-z]{1,8})?".prop_map(|p| Host::Unix(PathBuf::from(p)));
        let hosts = prop_oneof![
            proptest::collection::vec((host, 1u16..), 1..4),
            proptest::collection::vec((unix, 1u16..), 1..2),
        ];
        let mode = prop_oneof![
            Just(None),
            Just(Some(SslMode::Disable)),
            Just(Some(SslMode::Prefer)),
            Just(Some(SslMode::Require)),
            Just(Some(SslMode::VerifyCa)),
            Just(Some(SslMode::VerifyFull)),
        ];
        let tsa = prop_oneof![
            Just(None),
            Just(Some(TargetSessionAttrs::Any)),
            Just(Some(TargetSessionAttrs::ReadWrite)),
            Just(Some(TargetSessionAttrs::Standby)),
        ];
        (
            hosts,
            proptest::option::of("[a-z_][a-z0-9_]{0,10}"),
            proptest::option::of(arb_text()),
            proptest::option::of(arb_name()),
            mode,
            tsa,
            proptest::option::of(arb_name()),
            proptest::option::of(1u64..600),
        )
            .prop_map(
                |(hosts, user, password, dbname, ssl_mode, tsa, app, timeout)| {
                    let password = if user.is_some() {
                        password.map(Secret::new)
                    } else {
                        None
                    };
                    ConnectTarget {
                        hosts,
                        user,
                        password,
                        dbname,
                        params: Params {
                            ssl_mode,
                            ssl_root_cert: None,
                            application_name: app,
                            connect_timeout: timeout.map(Duration::from_secs),
                            target_session_attrs: tsa,
                            options: None,
                        },
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn urls_round_trip(t in arb_target()) {
            let url = t.expose_url();
            let back: ConnectTarget = url.parse().map_err(|e| TestCaseError::fail(format!("{url}: {e}")))?;
            prop_assert_eq!(back, t);
        }

        #[test]
        fn passwords_never_show_in_debug_or_display(t in arb_target(), pw in "[A-Za-z0-9]{12,20}") {
            let t = if t.user.is_some() { t.with_password(Some(Secret::new(pw.clone()))) } else { t.with_user("u").with_password(Some(Secret::new(pw.clone()))) };
            let config = Config::new(t.clone()).replica(t.clone()).credentials(Credentials::Static(Secret::new(pw.clone())));
            for shown in [format!("{t}"), format!("{t:?}"), format!("{config}"), format!("{config:?}")] {
                prop_assert!(!shown.contains(&pw), "{}", shown);
            }
        }

        #[test]
        fn passwords_never_show_in_parse_errors(pw in "[A-Za-z0-9]{12,20}", junk in prop_oneof![Just("?sslmode=x"), Just("?bogus=1"), Just(":70000"), Just("?port=0")]) {
            let url = format!("postgres://u:{pw}@h{junk}");
            let url = url.replacen("@h:70000", "@h:70000/db", 1);
            if let Err(e) = url.parse::<ConnectTarget>() {
                prop_assert!(!e.to_string().contains(&pw), "{}", e);
                let debug = format!("{:?}", e);
                prop_assert!(!debug.contains(&pw));
            } else {
                prop_assert!(false, "{} should not parse", url);
            }
        }
    }
}
