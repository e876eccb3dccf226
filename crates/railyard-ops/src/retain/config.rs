//! The retention's configuration: [`RetentionConfig`], from code or from the
//! `RAILYARD_RETENTION*` variables.

use std::time::Duration;

use railyard::error::ConfigError;

/// The retention period's variable (`90d`, `12w`, …); unset: no retention.
pub const ENV_PERIOD: &str = "RAILYARD_RETENTION";
/// How often the job runs (default 1 h).
pub const ENV_EVERY: &str = "RAILYARD_RETENTION_EVERY";
/// Months of partitions made ahead (default 3).
pub const ENV_PREMAKE: &str = "RAILYARD_RETENTION_PREMAKE";
/// Live bytes over which the job runs early and health degrades if it
/// cannot free enough (`500MB`, `10GB`, bytes; `off` by default).
pub const ENV_SIZE_THRESHOLD: &str = "RAILYARD_RETENTION_SIZE_THRESHOLD";
/// How often the job measures sizes between runs (default 1 min).
pub const ENV_CHECK_EVERY: &str = "RAILYARD_RETENTION_CHECK_EVERY";
/// The `lock_timeout` of its DDL (default 5 s).
pub const ENV_LOCK_TIMEOUT: &str = "RAILYARD_RETENTION_LOCK_TIMEOUT";

/// The most months made ahead.
pub const MAX_PREMAKE: u32 = 36;

/// When and how much a [`Retention`](super::Retention) keeps live.
///
/// ```
/// use std::time::Duration;
/// use railyard_ops::retain::RetentionConfig;
/// let config = RetentionConfig::new(Duration::from_secs(90 * 86_400))
///     .every(Duration::from_secs(3600))
///     .premake(3)
///     .size_threshold(Some(10 << 30));
/// config.validate()?;
/// # Ok::<(), railyard::error::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetentionConfig {
    /// Partitions wholly older than this are archived.
    pub period: Duration,
    /// How often the job runs.
    pub every: Duration,
    /// Months of partitions made ahead of the current one.
    pub premake: u32,
    /// Live bytes over which the job runs early.
    pub size_threshold: Option<u64>,
    /// How often the job measures sizes between runs.
    pub check_every: Duration,
    /// The `lock_timeout` of each DDL statement.
    pub lock_timeout: Duration,
    /// The `statement_timeout` of each statement (moving a month's rows out
    /// of the default partition, counting a partition).
    pub statement_timeout: Duration,
}

impl RetentionConfig {
    /// A period with the defaults: every hour, three months ahead, no size
    /// threshold, sizes measured every minute, DDL waiting at most 5 s for a
    /// lock, statements at most 5 min.
    pub fn new(period: Duration) -> Self {
        RetentionConfig {
            period,
            every: Duration::from_secs(3600),
            premake: 3,
            size_threshold: None,
            check_every: Duration::from_secs(60),
            lock_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(300),
        }
    }

    /// How often the job runs.
    #[must_use]
    pub fn every(mut self, d: Duration) -> Self {
        self.every = d;
        self
    }

    /// Months of partitions made ahead.
    #[must_use]
    pub fn premake(mut self, months: u32) -> Self {
        self.premake = months;
        self
    }

    /// Live bytes over which the job runs early (`None`: no threshold).
    #[must_use]
    pub fn size_threshold(mut self, bytes: Option<u64>) -> Self {
        self.size_threshold = bytes;
        self
    }

    /// How often the job measures sizes between runs.
    #[must_use]
    pub fn check_every(mut self, d: Duration) -> Self {
        self.check_every = d;
        self
    }

    /// The `lock_timeout` of each DDL statement.
    #[must_use]
    pub fn lock_timeout(mut self, d: Duration) -> Self {
        self.lock_timeout = d;
        self
    }

    /// The `statement_timeout` of each statement.
    #[must_use]
    pub fn statement_timeout(mut self, d: Duration) -> Self {
        self.statement_timeout = d;
        self
    }

    /// Refuses values that cannot work, naming the setter.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let at_least = |field: &str, d: Duration, min: Duration, what: &str| {
            if d < min {
                Err(ConfigError::new(
                    field,
                    format!("{d:?}"),
                    format!("too short, at least {what}"),
                ))
            } else {
                Ok(())
            }
        };
        at_least(
            "RetentionConfig::new (period)",
            self.period,
            Duration::from_secs(3600),
            "1h",
        )?;
        at_least(
            "RetentionConfig::every",
            self.every,
            Duration::from_secs(1),
            "1s",
        )?;
        at_least(
            "RetentionConfig::check_every",
            self.check_every,
            Duration::from_millis(100),
            "100ms",
        )?;
        at_least(
            "RetentionConfig::lock_timeout",
            self.lock_timeout,
            Duration::from_millis(1),
            "1ms",
        )?;
        at_least(
            "RetentionConfig::statement_timeout",
            self.statement_timeout,
            Duration::from_millis(1),
            "1ms",
        )?;
        if self.premake > MAX_PREMAKE {
            return Err(ConfigError::new(
                "RetentionConfig::premake",
                self.premake.to_string(),
                format!("too large, at most {MAX_PREMAKE} months"),
            ));
        }
        if self.size_threshold == Some(0) {
            return Err(ConfigError::new(
                "RetentionConfig::size_threshold",
                "0",
                "must be positive; use None for no threshold",
            ));
        }
        Ok(())
    }

    /// From the process environment; `None` when `RAILYARD_RETENTION` is
    /// unset (no retention).
    pub fn from_env() -> Result<Option<Self>, ConfigError> {
        RetentionConfig::from_vars(std::env::vars_os().map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        }))
    }

    /// Like [`RetentionConfig::from_env`], from the given variables.
    ///
    /// ```
    /// use railyard_ops::retain::RetentionConfig;
    /// let c = RetentionConfig::from_vars([
    ///     ("RAILYARD_RETENTION", "90d"),
    ///     ("RAILYARD_RETENTION_SIZE_THRESHOLD", "2GB"),
    /// ])?
    /// .expect("retention is on");
    /// assert_eq!(c.period.as_secs(), 90 * 86_400);
    /// assert_eq!(c.size_threshold, Some(2 << 30));
    /// let e = RetentionConfig::from_vars([("RAILYARD_RETENTION", "soon")]).unwrap_err();
    /// assert_eq!(e.field, "RAILYARD_RETENTION");
    /// # Ok::<(), railyard::error::ConfigError>(())
    /// ```
    pub fn from_vars<K, V>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Option<Self>, ConfigError>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let vars: std::collections::BTreeMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned()))
            .filter(|(k, _)| k.starts_with("RAILYARD_RETENTION"))
            .collect();
        let get = |k: &str| -> Result<Option<&str>, ConfigError> {
            match vars.get(k) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => {
                    Err(ConfigError::hidden(k, "empty; unset it or give a value"))
                }
                Some(v) => Ok(Some(v.trim())),
            }
        };
        let Some(period) = get(ENV_PERIOD)? else {
            if let Some(k) = vars.keys().find(|k| k.as_str() != ENV_PERIOD) {
                return Err(ConfigError::hidden(
                    k.clone(),
                    format!("set without {ENV_PERIOD}; set the retention period too, or unset it"),
                ));
            }
            return Ok(None);
        };
        let mut c = RetentionConfig::new(parse_duration(ENV_PERIOD, period)?);
        if let Some(v) = get(ENV_EVERY)? {
            c.every = parse_duration(ENV_EVERY, v)?;
        }
        if let Some(v) = get(ENV_CHECK_EVERY)? {
            c.check_every = parse_duration(ENV_CHECK_EVERY, v)?;
        }
        if let Some(v) = get(ENV_LOCK_TIMEOUT)? {
            c.lock_timeout = parse_duration(ENV_LOCK_TIMEOUT, v)?;
        }
        if let Some(v) = get(ENV_PREMAKE)? {
            c.premake = v
                .parse::<u32>()
                .ok()
                .filter(|n| *n <= MAX_PREMAKE)
                .ok_or_else(|| {
                    ConfigError::new(
                        ENV_PREMAKE,
                        v,
                        format!("expected a whole number of months, 0 to {MAX_PREMAKE}"),
                    )
                })?;
        }
        if let Some(v) = get(ENV_SIZE_THRESHOLD)? {
            c.size_threshold = parse_size(ENV_SIZE_THRESHOLD, v)?;
        }
        c.validate().map_err(|mut e| {
            // Name the variable rather than the setter.
            e.field = match e.field.as_str() {
                "RetentionConfig::new (period)" => ENV_PERIOD,
                "RetentionConfig::every" => ENV_EVERY,
                "RetentionConfig::check_every" => ENV_CHECK_EVERY,
                "RetentionConfig::lock_timeout" => ENV_LOCK_TIMEOUT,
                "RetentionConfig::premake" => ENV_PREMAKE,
                "RetentionConfig::size_threshold" => ENV_SIZE_THRESHOLD,
                other => other,
            }
            .to_owned();
            e
        })?;
        Ok(Some(c))
    }
}

fn parse_duration(field: &str, v: &str) -> Result<Duration, ConfigError> {
    if v.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(ConfigError::new(
            field,
            v,
            "a number without a unit; write it with one: d, h, m or s (for example `90d`)",
        ));
    }
    humantime::parse_duration(v).map_err(|e| {
        ConfigError::new(
            field,
            v,
            format!("{e}; write a number with a unit: d, h, m or s (for example `90d`)"),
        )
    })
}

/// Bytes with an optional unit (kB, MB, GB, TB: powers of 1024, as
/// PostgreSQL counts them); `off`, `none` or `0`: no threshold.
fn parse_size(field: &str, v: &str) -> Result<Option<u64>, ConfigError> {
    if matches!(v, "off" | "none" | "0") {
        return Ok(None);
    }
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        "tb" => 1 << 40,
        _ => {
            return Err(ConfigError::new(
                field,
                v,
                "unknown unit; write bytes, or a whole number with kB, MB, GB or TB (for example `10GB`), or `off`",
            ));
        }
    };
    n.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|b| *b > 0)
        .map(Some)
        .ok_or_else(|| {
            ConfigError::new(
                field,
                v,
                "expected a positive whole number of bytes, with kB, MB, GB or TB (for example `10GB`), or `off`",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_named_in_errors() {
        let e = RetentionConfig::from_vars([("RAILYARD_RETENTION", "90")]).unwrap_err();
        assert_eq!(e.field, ENV_PERIOD);
        let e = RetentionConfig::from_vars([
            ("RAILYARD_RETENTION", "90d"),
            ("RAILYARD_RETENTION_SIZE_THRESHOLD", "10 parsecs"),
        ])
        .unwrap_err();
        assert_eq!(e.field, ENV_SIZE_THRESHOLD);
        let e = RetentionConfig::from_vars([("RAILYARD_RETENTION_PREMAKE", "3")]).unwrap_err();
        assert_eq!(e.field, ENV_PREMAKE);
        let e = RetentionConfig::from_vars([
            ("RAILYARD_RETENTION", "90d"),
            ("RAILYARD_RETENTION_PREMAKE", "99"),
        ])
        .unwrap_err();
        assert_eq!(e.field, ENV_PREMAKE);
        let e = RetentionConfig::from_vars([("RAILYARD_RETENTION", "5m")]).unwrap_err();
        assert_eq!(e.field, ENV_PERIOD);
        assert!(RetentionConfig::from_vars([("X", "1")]).unwrap().is_none());
        let c = RetentionConfig::from_vars([
            ("RAILYARD_RETENTION", "90d"),
            ("RAILYARD_RETENTION_SIZE_THRESHOLD", "off"),
            ("RAILYARD_RETENTION_EVERY", "10m"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.size_threshold, None);
        assert_eq!(c.every, Duration::from_secs(600));
    }
}
