//! One `RAILYARD_*` variable's value into its setting: [`apply`], with the
//! checks that name the value as typed.

use std::path::PathBuf;
use std::time::Duration;

use super::super::url::{check_name, check_path, check_time_zone};
use super::super::{
    Config, Credentials, MAX_DETECT_REPEATS, MAX_POOL_WAITERS, MAX_STATEMENT_TIMEOUT_MS,
    MIN_WATCHDOG_LIMIT, Setting,
};
use super::{env_var_name, optional_duration, parse_count, parse_duration, parse_number};
use crate::error::ConfigError;

/// Sets one setting from its variable's (non-empty) value.
pub(super) fn apply(
    config: &mut Config,
    setting: Setting,
    key: &str,
    value: &str,
) -> Result<(), ConfigError> {
    match setting {
        Setting::PoolMaxSize => config.pool.max_size = parse_count(key, value)?,
        Setting::PoolMinIdle => config.pool.min_idle = Some(parse_count(key, value)?),
        Setting::ReplicaPoolMaxSize => config.replica_pool_max_size = parse_count(key, value)?,
        Setting::PoolMaxWaiters => {
            config.pool.max_waiters = Some(parse_number(key, value, MAX_POOL_WAITERS)?)
        }
        Setting::PoolMaxWait => config.pool.max_wait = Some(parse_duration(key, value)?),
        Setting::ShutdownTimeout => config.shutdown_timeout = parse_duration(key, value)?,
        Setting::PingAfterIdle => config.pool.ping_after_idle = parse_duration(key, value)?,
        Setting::MaxConnecting => config.pool.max_connecting = max_connecting(key, value)?,
        Setting::ConnectTimeout => config.connect_timeout = parse_duration(key, value)?,
        Setting::CheckoutTimeout => config.pool.checkout_timeout = parse_duration(key, value)?,
        Setting::IdleTimeout => config.pool.idle_timeout = optional_duration(key, value)?,
        Setting::MaxLifetime => config.pool.max_lifetime = optional_duration(key, value)?,
        Setting::StatementTimeout => config.statement_timeout = statement_timeout(key, value)?,
        Setting::MigrationLockTimeout => {
            config.migration_lock_timeout = parse_duration(key, value)?
        }
        Setting::ApplicationName => {
            check_name(key, value)?;
            config.application_name = value.to_owned();
        }
        Setting::SslMode => {
            config.ssl_mode = Some(value.trim().parse().map_err(|mut e: ConfigError| {
                e.field = key.to_owned();
                e
            })?)
        }
        Setting::SslRootCert => {
            check_path(key, value)?;
            config.ssl_root_cert = Some(PathBuf::from(value));
        }
        Setting::PasswordFile => {
            check_path(key, value)?;
            config.credentials = Credentials::File(value.into());
        }
        Setting::PasswordEnv => config.credentials = password_env(key, value)?,
        Setting::TimeZone => {
            check_time_zone(key, value)?;
            config.time_zone = value.to_owned();
        }
        Setting::Pooler => {
            config.pooler = value.trim().parse().map_err(|mut e: ConfigError| {
                e.field = key.to_owned();
                e
            })?
        }
        Setting::WatchdogCancelAfter => config.watchdog_cancel_after = watchdog_limit(key, value)?,
        Setting::CapturePlansSlowerThan => {
            config.capture_plans_slower_than = optional_duration(key, value)?
        }
        Setting::DetectRepeats => {
            // At least 2 is the validator's rule, which names the variable.
            config.detect_repeats = match value.trim() {
                "off" | "none" => None,
                _ => Some(parse_number(key, value, MAX_DETECT_REPEATS)?),
            }
        }
    }
    Ok(())
}

/// `RAILYARD_MAX_CONNECTING`: at least 1.
fn max_connecting(key: &str, value: &str) -> Result<u32, ConfigError> {
    let n = parse_count(key, value)?;
    if n == 0 {
        return Err(ConfigError::new(
            key,
            value,
            "at least 1 (one connection attempt at a time per target)",
        ));
    }
    Ok(n)
}

/// `RAILYARD_STATEMENT_TIMEOUT`: off, or 1 ms to the server's limit.
fn statement_timeout(key: &str, value: &str) -> Result<Option<Duration>, ConfigError> {
    let d = optional_duration(key, value)?;
    if let Some(d) = d {
        // The server takes whole milliseconds up to i32::MAX; said here
        // with the value as typed (the validator says it for setters).
        if d < Duration::from_millis(1) {
            return Err(ConfigError::new(
                key,
                value,
                "less than 1ms (which the server would read as no limit); use 0 or off to disable it",
            ));
        }
        if d.as_millis() > MAX_STATEMENT_TIMEOUT_MS {
            return Err(ConfigError::new(
                key,
                value,
                format!(
                    "too large, at most {}ms (about 24.8 days, the server's limit)",
                    MAX_STATEMENT_TIMEOUT_MS
                ),
            ));
        }
    }
    Ok(d)
}

/// `RAILYARD_PASSWORD_ENV`: a variable's name.
fn password_env(key: &str, value: &str) -> Result<Credentials, ConfigError> {
    if !env_var_name(value) {
        return Err(ConfigError::new(
            key,
            value,
            "not an environment variable name (ASCII letters, digits and `_`, not starting with a digit)",
        ));
    }
    Ok(Credentials::Env(value.to_owned()))
}

/// `RAILYARD_WATCHDOG_CANCEL_AFTER`: off, or at least the shortest limit.
fn watchdog_limit(key: &str, value: &str) -> Result<Option<Duration>, ConfigError> {
    let d = optional_duration(key, value)?;
    // Said here with the value as typed (the validator says it for
    // the setter).
    if d.is_some_and(|d| d < MIN_WATCHDOG_LIMIT) {
        return Err(ConfigError::new(
            key,
            value,
            format!(
                "shorter than {}ms, the watchdog's shortest limit; use 0 or off to run no watchdog",
                MIN_WATCHDOG_LIMIT.as_millis()
            ),
        ));
    }
    Ok(d)
}
