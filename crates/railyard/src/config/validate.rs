//! [`Config::validate`]: the rules a value alone, or values together, must
//! follow, as one named check per topic (pool sizes, timeouts, observers,
//! names and paths, targets), run in a fixed order.

use std::time::Duration;

use super::url::{check_name, check_path, check_time_zone};
use super::{
    Config, ConnectTarget, Credentials, Host, MAX_DETECT_REPEATS, MAX_DURATION, MAX_POOL_SIZE,
    MAX_POOL_WAITERS, MAX_STATEMENT_TIMEOUT_MS, MIN_WATCHDOG_LIMIT, Setting, SslMode, env,
};
use crate::error::ConfigError;

use Setting as S;

/// What identifies a server and database: two targets with the same key are
/// the same place.
fn server_key(t: &ConnectTarget) -> (Vec<(String, u16)>, String) {
    let hosts = t
        .hosts
        .iter()
        .map(|(h, p)| {
            let h = match h {
                Host::Tcp(name) => name.to_ascii_lowercase(),
                Host::Unix(dir) => dir.display().to_string(),
            };
            (h, *p)
        })
        .collect();
    let db = t
        .dbname
        .clone()
        .or_else(|| t.user.clone())
        .unwrap_or_default();
    (hosts, db)
}

pub(super) fn prefix_field(prefix: &str, mut e: ConfigError) -> ConfigError {
    if e.field != prefix {
        e.field = format!("{prefix} ({})", e.field);
    }
    e
}

impl Config {
    /// Checks every rule that a value alone, or values together, must follow.
    /// Called by the environment parser and by [`crate::Database::connect`].
    /// Errors name the environment variable a value came from, else the
    /// setter that set it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_size(S::PoolMaxSize, self.pool.max_size)?;
        self.check_size(S::ReplicaPoolMaxSize, self.replica_pool_max_size)?;
        self.check_pooler_options()?;
        self.check_min_idle()?;
        self.check_duration(S::ConnectTimeout, self.connect_timeout, false)?;
        self.check_duration(S::CheckoutTimeout, self.pool.checkout_timeout, false)?;
        self.check_duration(S::ShutdownTimeout, self.shutdown_timeout, false)?;
        self.check_waiters()?;
        self.check_lifetimes()?;
        self.check_statement_timeout()?;
        self.check_observers()?;
        self.check_names_and_paths()?;
        self.check_targets()
    }

    /// A pool size: 1 to [`MAX_POOL_SIZE`].
    fn check_size(&self, s: Setting, n: u32) -> Result<(), ConfigError> {
        if n == 0 {
            Err(ConfigError::new(self.field(s), "0", "must be at least 1"))
        } else if n > MAX_POOL_SIZE {
            Err(ConfigError::new(
                self.field(s),
                n.to_string(),
                format!("too large, at most {MAX_POOL_SIZE}"),
            ))
        } else {
            Ok(())
        }
    }

    /// A duration: positive unless `zero_ok`, at most [`MAX_DURATION`].
    fn check_duration(&self, s: Setting, d: Duration, zero_ok: bool) -> Result<(), ConfigError> {
        if d.is_zero() && !zero_ok {
            let hint = match s {
                S::IdleTimeout | S::MaxLifetime => "must be positive (no value means no limit)",
                S::CapturePlansSlowerThan => "must be positive (no value captures no plans)",
                _ => "must be positive",
            };
            Err(ConfigError::new(self.field(s), "0", hint))
        } else if d > MAX_DURATION {
            Err(ConfigError::new(
                self.field(s),
                format!("{d:?}"),
                "too large, at most ten years",
            ))
        } else {
            Ok(())
        }
    }

    /// PgBouncer refuses the `options` startup parameter.
    fn check_pooler_options(&self) -> Result<(), ConfigError> {
        if !self.pooler.plain_startup() {
            return Ok(());
        }
        let targets = std::iter::once(&self.primary).chain(&self.replicas);
        if let Some(i) = targets
            .enumerate()
            .find_map(|(i, t)| t.params.options.is_some().then_some(i))
        {
            return Err(ConfigError::hidden(
                format!("{} (options)", self.target_field(i)),
                format!(
                    "PgBouncer refuses the `options` startup parameter ({} is {}): remove it, and set the statement timeout with RAILYARD_STATEMENT_TIMEOUT, other settings with `ALTER ROLE … SET`",
                    self.field(S::Pooler),
                    self.pooler
                ),
            ));
        }
        Ok(())
    }

    /// The minimum idle fits in the primary's pool and in each replica's.
    fn check_min_idle(&self) -> Result<(), ConfigError> {
        let Some(min) = self.pool.min_idle else {
            return Ok(());
        };
        if min > self.pool.max_size {
            return Err(ConfigError::new(
                self.field(S::PoolMinIdle),
                min.to_string(),
                format!(
                    "larger than the pool's maximum size {} ({})",
                    self.pool.max_size,
                    self.field(S::PoolMaxSize)
                ),
            ));
        }
        // Replica pools keep the same number of idle connections.
        if !self.replicas.is_empty() && min > self.replica_pool_max_size {
            return Err(ConfigError::new(
                self.field(S::PoolMinIdle),
                min.to_string(),
                format!(
                    "larger than the replica pools' maximum size {} ({}); replica pools keep the same number of idle connections",
                    self.replica_pool_max_size,
                    self.field(S::ReplicaPoolMaxSize)
                ),
            ));
        }
        Ok(())
    }

    /// The queue of check-outs: its length and how long a place in it waits.
    fn check_waiters(&self) -> Result<(), ConfigError> {
        if let Some(n) = self.pool.max_waiters {
            if n == 0 {
                return Err(ConfigError::new(
                    self.field(S::PoolMaxWaiters),
                    "0",
                    "must be at least 1 (a check-out waits only while it holds a place in the queue)",
                ));
            }
            if n > MAX_POOL_WAITERS {
                return Err(ConfigError::new(
                    self.field(S::PoolMaxWaiters),
                    n.to_string(),
                    format!("too large, at most {MAX_POOL_WAITERS}"),
                ));
            }
        }
        if let Some(d) = self.pool.max_wait {
            self.check_duration(S::PoolMaxWait, d, false)?;
            if d >= self.pool.checkout_timeout {
                return Err(ConfigError::new(
                    self.field(S::PoolMaxWait),
                    format!("{d:?}"),
                    format!(
                        "must be shorter than the checkout timeout of {:?} ({}), which bounds the whole check-out",
                        self.pool.checkout_timeout,
                        self.field(S::CheckoutTimeout)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The migration lock's wait, the connections' idle and total lifetimes
    /// and the circuit breaker's cooldown.
    fn check_lifetimes(&self) -> Result<(), ConfigError> {
        self.check_duration(S::MigrationLockTimeout, self.migration_lock_timeout, true)?;
        if let Some(d) = self.pool.idle_timeout {
            self.check_duration(S::IdleTimeout, d, false)?;
        }
        if let Some(d) = self.pool.max_lifetime {
            self.check_duration(S::MaxLifetime, d, false)?;
        }
        if self.breaker_cooldown > MAX_DURATION {
            return Err(ConfigError::new(
                "Config::circuit_breaker",
                format!("{:?}", self.breaker_cooldown),
                "cooldown too large, at most ten years",
            ));
        }
        Ok(())
    }

    /// The session's `statement_timeout`, in the server's range.
    fn check_statement_timeout(&self) -> Result<(), ConfigError> {
        let Some(d) = self.statement_timeout else {
            return Ok(());
        };
        // The server takes whole milliseconds, up to i32::MAX; 0 would mean "off".
        if d < Duration::from_millis(1) {
            return Err(ConfigError::new(
                self.field(S::StatementTimeout),
                format!("{d:?}"),
                "less than 1ms (which the server would read as no limit); use none/off to disable it",
            ));
        }
        if d.as_millis() > MAX_STATEMENT_TIMEOUT_MS {
            return Err(ConfigError::new(
                self.field(S::StatementTimeout),
                format!("{d:?}"),
                format!(
                    "too large, at most {MAX_STATEMENT_TIMEOUT_MS}ms (about 24.8 days, the server's limit)"
                ),
            ));
        }
        Ok(())
    }

    /// The watchdog's limit, the plan capture's threshold and the repeat
    /// detector's.
    fn check_observers(&self) -> Result<(), ConfigError> {
        if let Some(d) = self.watchdog_cancel_after {
            self.check_duration(S::WatchdogCancelAfter, d, false)?;
            if d < MIN_WATCHDOG_LIMIT {
                return Err(ConfigError::new(
                    self.field(S::WatchdogCancelAfter),
                    format!("{d:?}"),
                    format!(
                        "shorter than {}ms, the watchdog's shortest limit; use none/off to run no watchdog",
                        MIN_WATCHDOG_LIMIT.as_millis()
                    ),
                ));
            }
        }
        if let Some(d) = self.capture_plans_slower_than {
            self.check_duration(S::CapturePlansSlowerThan, d, false)?;
        }
        if let Some(n) = self.detect_repeats {
            if n < 2 {
                return Err(ConfigError::new(
                    self.field(S::DetectRepeats),
                    n.to_string(),
                    "must be at least 2 (a statement that runs once is not repeated); use none/off to disable it",
                ));
            }
            if n > MAX_DETECT_REPEATS {
                return Err(ConfigError::new(
                    self.field(S::DetectRepeats),
                    n.to_string(),
                    format!("too large, at most {MAX_DETECT_REPEATS}"),
                ));
            }
        }
        Ok(())
    }

    /// The application name, the time zone, the CA file and where the
    /// password comes from.
    fn check_names_and_paths(&self) -> Result<(), ConfigError> {
        check_name(self.field(S::ApplicationName), &self.application_name)?;
        check_time_zone(self.field(S::TimeZone), &self.time_zone)?;
        if let Some(c) = &self.ssl_root_cert {
            check_path(self.field(S::SslRootCert), &c.to_string_lossy())?;
        }
        match &self.credentials {
            Credentials::File(p) => check_path(self.field(S::PasswordFile), &p.to_string_lossy())?,
            Credentials::Env(v) if !env::env_var_name(v) => {
                return Err(ConfigError::new(
                    self.field(S::PasswordEnv),
                    v.as_str(),
                    "not an environment variable name",
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// Each target alone, none repeating another, and no TLS on a Unix socket.
    fn check_targets(&self) -> Result<(), ConfigError> {
        let targets: Vec<&ConnectTarget> = std::iter::once(&self.primary)
            .chain(&self.replicas)
            .collect();
        for (i, t) in targets.iter().enumerate() {
            t.check()
                .map_err(|e| prefix_field(&self.target_field(i), e))?;
            self.check_not_repeated(&targets, i)?;
            self.check_socket_tls(t, i)?;
            self.check_tls_built(t, i)?;
        }
        Ok(())
    }

    /// A target over TCP that requires TLS needs a build with the `tls` feature.
    fn check_tls_built(&self, t: &ConnectTarget, i: usize) -> Result<(), ConfigError> {
        let mode = self.effective_ssl_mode(t);
        if super::tls_available()
            || matches!(mode, SslMode::Disable | SslMode::Prefer)
            || !t.hosts.iter().any(|(h, _)| matches!(h, Host::Tcp(_)))
        {
            return Ok(());
        }
        let field = if t.params.ssl_mode.is_some() {
            format!("{} (sslmode)", self.target_field(i))
        } else {
            self.field(S::SslMode).to_owned()
        };
        Err(ConfigError::new(
            field,
            mode.as_str(),
            "this build of railyard has no TLS: enable its `tls` feature (railyard = { version = \"…\", features = [\"tls\"] }), or use sslmode=disable or prefer",
        ))
    }

    /// Target `i` is not the same place as a target before it.
    fn check_not_repeated(&self, targets: &[&ConnectTarget], i: usize) -> Result<(), ConfigError> {
        let t = targets[i];
        let Some(j) = targets[..i]
            .iter()
            .position(|o| server_key(o) == server_key(t))
        else {
            return Ok(());
        };
        let (hosts, db) = server_key(t);
        let place = format!(
            "{}/{db}",
            hosts
                .iter()
                .map(|(h, p)| format!("{h}:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        Err(ConfigError::hidden(
            self.target_field(i),
            if j == 0 {
                format!(
                    "{place} is the primary itself; list the replicas' servers (same hosts, ports and database as the primary)"
                )
            } else {
                format!(
                    "{place} is listed twice (same hosts, ports and database as {})",
                    self.target_field(j)
                )
            },
        ))
    }

    /// A target with a Unix-socket host does not require TLS.
    fn check_socket_tls(&self, t: &ConnectTarget, i: usize) -> Result<(), ConfigError> {
        let mode = self.effective_ssl_mode(t);
        // verify-ca/verify-full without sslrootcert use the platform's web roots
        // (libpq's sslrootcert=system): legal, so nothing to reject here.
        if t.hosts.iter().any(|(h, _)| matches!(h, Host::Unix(_)))
            && matches!(
                mode,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
            )
        {
            let field = if t.params.ssl_mode.is_some() {
                format!("{} (sslmode)", self.target_field(i))
            } else {
                self.field(S::SslMode).to_owned()
            };
            return Err(ConfigError::new(
                field,
                mode.as_str(),
                "Unix-socket hosts never use TLS; use sslmode=disable or prefer for them",
            ));
        }
        Ok(())
    }
}
