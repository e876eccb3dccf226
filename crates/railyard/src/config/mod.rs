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
//! | `RAILYARD_WATCHDOG_CANCEL_AFTER` | runs the long-running statement watchdog ([`crate::observe::Watchdog::cancel_after`]): the statements of this handle's own connections running longer are cancelled (never another program's, whatever its `application_name`). A duration of at least [`MIN_WATCHDOG_LIMIT`] (10 ms); `0`, `off` or `none` (the default) runs none. [`crate::DatabaseBuilder::watchdog`] wins when called |
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
use std::time::Duration;

use crate::error::ConfigError;

mod builder;
mod env;
#[cfg(test)]
mod leaks;
mod modes;
mod profile;
mod secret;
mod setting;
#[cfg(test)]
mod tests;
mod url;
mod validate;

pub use modes::{Host, Pooler, SslMode, TargetSessionAttrs};
pub use profile::{PROFILE_VAR, Profile};
#[cfg(feature = "tls")]
pub(crate) use secret::read_small_file;
pub use secret::{Credentials, MAX_PASSWORD_FILE_LEN, Secret};
pub(crate) use setting::Setting;
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

/// Whether this build has TLS (the `tls` feature). Without it `sslmode=prefer`
/// connects in plain text and the modes that require TLS are refused by
/// [`Config::validate`].
///
/// ```
/// let url = if railyard::config::tls_available() { "sslmode=verify-full" } else { "sslmode=disable" };
/// assert!(url.starts_with("sslmode="));
/// ```
pub const fn tls_available() -> bool {
    cfg!(feature = "tls")
}

/// The longest `statement_timeout`, in milliseconds: the server's limit.
pub(crate) const MAX_STATEMENT_TIMEOUT_MS: u128 = i32::MAX as u128;

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
