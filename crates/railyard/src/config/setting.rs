//! [`Setting`]: a value that may come from the environment or from a setter,
//! with its variable, its setter and its default.

use super::*;

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
    pub(super) fn setter(self) -> &'static str {
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
