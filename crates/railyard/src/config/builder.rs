//! The consuming setters of [`Config`]: each sets one value and forgets that
//! the value came from the environment, so errors name the setter.

use std::path::PathBuf;
use std::time::Duration;

use super::{Config, ConnectTarget, Credentials, Pooler, Setting, SslMode};
// Only the docs' links name these.
#[cfg(doc)]
use super::{
    DEFAULT_POOL_MAX_WAIT, DEFAULT_SHUTDOWN_TIMEOUT, DEFAULT_WAITERS_PER_CONNECTION,
    MAX_DETECT_REPEATS, MAX_NAME_LEN, MAX_POOL_SIZE, MAX_POOL_WAITERS, MIN_WATCHDOG_LIMIT,
    PoolConfig,
};
use crate::error::ConfigError;

impl Config {
    /// Adds a replica URL.
    pub fn replica_url(mut self, url: &str) -> Result<Self, ConfigError> {
        self.replicas.push(url.parse()?);
        Ok(self)
    }

    /// Adds a parsed replica target.
    #[must_use]
    pub fn replica(mut self, target: ConnectTarget) -> Self {
        self.replicas.push(target);
        self
    }

    /// Most connections in the primary pool, 1 to [`MAX_POOL_SIZE`]. Defaults to 10.
    #[must_use]
    pub fn pool_max_size(mut self, n: u32) -> Self {
        self.from_env.remove(&Setting::PoolMaxSize);
        self.pool.max_size = n;
        self
    }

    /// Idle connections kept ready in the primary pool (and in each replica's).
    /// Defaults to none.
    #[must_use]
    pub fn pool_min_idle(mut self, n: Option<u32>) -> Self {
        self.from_env.remove(&Setting::PoolMinIdle);
        self.pool.min_idle = n;
        self
    }

    /// Most connections in each replica's pool, 1 to [`MAX_POOL_SIZE`]. Defaults to 10.
    #[must_use]
    pub fn replica_pool_max_size(mut self, n: u32) -> Self {
        self.from_env.remove(&Setting::ReplicaPoolMaxSize);
        self.replica_pool_max_size = n;
        self
    }

    /// How long a checkout waits for a pooled connection. Defaults to 5 s.
    #[must_use]
    pub fn checkout_timeout(mut self, d: Duration) -> Self {
        self.from_env.remove(&Setting::CheckoutTimeout);
        self.pool.checkout_timeout = d;
        self
    }

    /// How long a connection may sit idle in the pool before a check-out
    /// pings it (see [`PoolConfig::ping_after_idle`]). Defaults to 30 s.
    ///
    /// ```
    /// use std::time::Duration;
    /// let c = railyard::Config::from_url("postgres://u@h/db")?
    ///     .ping_after_idle(Duration::from_secs(5));
    /// assert_eq!(c.pool().ping_after_idle, Duration::from_secs(5));
    /// # Ok::<(), railyard::error::ConfigError>(())
    /// ```
    #[must_use]
    pub fn ping_after_idle(mut self, d: Duration) -> Self {
        self.from_env.remove(&Setting::PingAfterIdle);
        self.pool.ping_after_idle = d;
        self
    }

    /// How many connection attempts one target may have under way at once
    /// (see [`PoolConfig::max_connecting`]); at least 1. Defaults to 8.
    ///
    /// ```
    /// let c = railyard::Config::from_url("postgres://u@h/db")?.max_connecting(8);
    /// assert_eq!(c.pool().max_connecting, 8);
    /// # Ok::<(), railyard::error::ConfigError>(())
    /// ```
    #[must_use]
    pub fn max_connecting(mut self, n: u32) -> Self {
        self.from_env.remove(&Setting::MaxConnecting);
        self.pool.max_connecting = n.max(1);
        self
    }

    /// How many check-outs may wait for a connection at once, per pool
    /// (primary and each replica), 1 to [`MAX_POOL_WAITERS`]; one more is
    /// shed at once with [`crate::Error::Overloaded`]. Defaults to
    /// [`DEFAULT_WAITERS_PER_CONNECTION`] × the pool's size.
    ///
    /// ```
    /// use std::time::Duration;
    /// let c = railyard::Config::from_url("postgres://u@h/db")?
    ///     .pool_max_size(8)
    ///     .pool_max_waiters(64)
    ///     .pool_max_wait(Duration::from_millis(250));
    /// c.validate()?;
    /// assert_eq!(c.pool().max_waiters_for(8), 64);
    /// # Ok::<(), railyard::error::ConfigError>(())
    /// ```
    #[must_use]
    pub fn pool_max_waiters(mut self, n: u32) -> Self {
        self.from_env.remove(&Setting::PoolMaxWaiters);
        self.pool.max_waiters = Some(n);
        self
    }

    /// How long a check-out waits while every connection of its pool is in
    /// use before it is shed with [`crate::Error::Overloaded`]; shorter than
    /// the checkout timeout (which still bounds a check-out waiting for a
    /// connection being opened). Defaults to [`DEFAULT_POOL_MAX_WAIT`], or
    /// half the checkout timeout when that is shorter.
    #[must_use]
    pub fn pool_max_wait(mut self, d: Duration) -> Self {
        self.from_env.remove(&Setting::PoolMaxWait);
        self.pool.max_wait = Some(d);
        self
    }

    /// The deadline to give [`crate::Database::close`] when the application
    /// stops: work in flight may finish until then, and is cancelled after.
    /// Defaults to [`DEFAULT_SHUTDOWN_TIMEOUT`] (10 s).
    #[must_use]
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.from_env.remove(&Setting::ShutdownTimeout);
        self.shutdown_timeout = d;
        self
    }

    /// Idle connections older than this are closed (`None`: never). Defaults to 10 min.
    #[must_use]
    pub fn idle_timeout(mut self, d: Option<Duration>) -> Self {
        self.from_env.remove(&Setting::IdleTimeout);
        self.pool.idle_timeout = d;
        self
    }

    /// Connections older than this are closed (`None`: never). Defaults to 30 min.
    #[must_use]
    pub fn max_lifetime(mut self, d: Option<Duration>) -> Self {
        self.from_env.remove(&Setting::MaxLifetime);
        self.pool.max_lifetime = d;
        self
    }

    /// Bound on one connection attempt (socket, TLS, authentication, setup), per
    /// host. The URL's `connect_timeout` wins when given. Defaults to 10 s.
    #[must_use]
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.from_env.remove(&Setting::ConnectTimeout);
        self.connect_timeout = d;
        self
    }

    /// `statement_timeout` set on every new session, 1 ms to 2147483647 ms.
    /// Defaults to none (the server's).
    #[must_use]
    pub fn statement_timeout(mut self, d: Option<Duration>) -> Self {
        self.from_env.remove(&Setting::StatementTimeout);
        self.statement_timeout = d;
        self
    }

    /// `application_name` when the URL has none, at most [`MAX_NAME_LEN`]
    /// bytes. Defaults to `railyard`.
    #[must_use]
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.from_env.remove(&Setting::ApplicationName);
        self.application_name = name.into();
        self
    }

    /// TLS mode for targets whose URL does not set `sslmode`. Defaults to `prefer`.
    #[must_use]
    pub fn ssl_mode(mut self, mode: SslMode) -> Self {
        self.from_env.remove(&Setting::SslMode);
        self.ssl_mode = Some(mode);
        self
    }

    /// CA certificate file for targets whose URL has no `sslrootcert`. Defaults to
    /// none (the platform's web roots when verification is on). Read only for
    /// targets whose effective `sslmode` is not `disable`.
    #[must_use]
    pub fn ssl_root_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.from_env.remove(&Setting::SslRootCert);
        self.ssl_root_cert = Some(path.into());
        self
    }

    /// Where passwords come from. Defaults to [`Credentials::FromUrl`].
    #[must_use]
    pub fn credentials(mut self, c: Credentials) -> Self {
        self.from_env.remove(&Setting::PasswordFile);
        self.from_env.remove(&Setting::PasswordEnv);
        self.credentials = c;
        self
    }

    /// How long boot waits for another instance's migrations. Defaults to 60 s.
    #[must_use]
    pub fn migration_lock_timeout(mut self, d: Duration) -> Self {
        self.from_env.remove(&Setting::MigrationLockTimeout);
        self.migration_lock_timeout = d;
        self
    }

    /// The circuit breaker of each host: consecutive connect failures that open
    /// it, and the first cooldown (doubled, with jitter, while the server stays
    /// down, up to 10 s). Defaults to 5 failures and 250 ms: a probe is one
    /// connection attempt, cheap enough that a server back from a short outage
    /// is noticed within a second or two.
    #[must_use]
    pub fn circuit_breaker(mut self, threshold: u32, cooldown: Duration) -> Self {
        self.breaker_threshold = threshold;
        self.breaker_cooldown = cooldown;
        self
    }

    /// Session `TimeZone`. Defaults to `UTC`. A zone the server does not know
    /// fails the first connection, naming the zone.
    #[must_use]
    pub fn time_zone(mut self, tz: impl Into<String>) -> Self {
        self.from_env.remove(&Setting::TimeZone);
        self.time_zone = tz.into();
        self
    }

    /// The pooler in front of the servers (see [`Pooler`]). Defaults to none.
    #[must_use]
    pub fn pooler(mut self, pooler: Pooler) -> Self {
        self.from_env.remove(&Setting::Pooler);
        self.pooler = pooler;
        self
    }

    /// Runs the long-running statement watchdog with this limit (`None`: no
    /// watchdog), as [`crate::DatabaseBuilder::watchdog`] with
    /// [`crate::observe::Watchdog::cancel_after`] would; the builder's call
    /// wins when made. At least [`MIN_WATCHDOG_LIMIT`] (10 ms). Defaults to
    /// none (`RAILYARD_WATCHDOG_CANCEL_AFTER`).
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = railyard::Config::from_url("postgres://app@localhost/ledger")?
    ///     .watchdog_cancel_after(Some(Duration::from_secs(30)));
    /// config.validate()?;
    /// let err = config
    ///     .watchdog_cancel_after(Some(Duration::from_millis(1)))
    ///     .validate()
    ///     .unwrap_err();
    /// assert_eq!(err.field, "Config::watchdog_cancel_after");
    /// # Ok::<(), railyard::error::ConfigError>(())
    /// ```
    #[must_use]
    pub fn watchdog_cancel_after(mut self, limit: Option<Duration>) -> Self {
        self.from_env.remove(&Setting::WatchdogCancelAfter);
        self.watchdog_cancel_after = limit;
        self
    }

    /// Captures the plans of statements slower than this (`None`: none), as
    /// [`crate::DatabaseBuilder::capture_plans`] with
    /// [`crate::observe::PlanCapture::slower_than`] would; the builder's call
    /// wins when made. Positive. Defaults to none
    /// (`RAILYARD_CAPTURE_PLANS_SLOWER_THAN`).
    ///
    /// ```
    /// use std::time::Duration;
    /// let config = railyard::Config::from_url("postgres://app@localhost/ledger")?
    ///     .capture_plans_slower_than(Some(Duration::from_millis(200)));
    /// config.validate()?;
    /// let err = config
    ///     .capture_plans_slower_than(Some(Duration::ZERO))
    ///     .validate()
    ///     .unwrap_err();
    /// assert_eq!(err.field, "Config::capture_plans_slower_than");
    /// # Ok::<(), railyard::error::ConfigError>(())
    /// ```
    #[must_use]
    pub fn capture_plans_slower_than(mut self, threshold: Option<Duration>) -> Self {
        self.from_env.remove(&Setting::CapturePlansSlowerThan);
        self.capture_plans_slower_than = threshold;
        self
    }

    /// Warns (target `railyard::n_plus_one`) when one statement runs this
    /// many times in one operation (`None`: no detection), as
    /// [`crate::DatabaseBuilder::detect_repeats`] would; the builder's call
    /// wins when made. 2 to [`MAX_DETECT_REPEATS`]. Defaults to none
    /// (`RAILYARD_DETECT_REPEATS`).
    ///
    /// ```
    /// let config = railyard::Config::from_url("postgres://app@localhost/ledger")?
    ///     .detect_repeats(Some(20));
    /// config.validate()?;
    /// let err = config.detect_repeats(Some(1)).validate().unwrap_err();
    /// assert_eq!(err.field, "Config::detect_repeats");
    /// # Ok::<(), railyard::error::ConfigError>(())
    /// ```
    #[must_use]
    pub fn detect_repeats(mut self, threshold: Option<u32>) -> Self {
        self.from_env.remove(&Setting::DetectRepeats);
        self.detect_repeats = threshold;
        self
    }
}
