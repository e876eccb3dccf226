//! [`Config`] from `DATABASE_URL`, `DATABASE_REPLICA_URLS` and `RAILYARD_*`
//! (the table is in the module docs of [`crate::config`]).

use std::collections::BTreeMap;
use std::time::Duration;

use super::profile::{PROFILE_VAR, Profile, local_database_name};
use super::{Config, ConnectTarget, MAX_DURATION, MAX_POOL_SIZE, Setting, prefix_field};
use crate::error::ConfigError;

mod apply;
#[cfg(test)]
mod tests;

use apply::apply;

impl Config {
    /// Reads `DATABASE_URL`, `DATABASE_REPLICA_URLS` and the `RAILYARD_*` variables
    /// (see the module docs). `RAILYARD_ENV` picks the defaults (see
    /// [`Profile`]); without `DATABASE_URL`, the development and test
    /// profiles stand for the local cluster ([`Config::local_database`]), and
    /// production refuses.
    pub fn from_env() -> Result<Self, ConfigError> {
        // A variable that is not UTF-8 is kept (lossily) so that it is refused
        // by name rather than ignored.
        Config::from_vars(std::env::vars_os().map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        }))
    }

    /// Like [`Config::from_env`], from the given variables instead of the process
    /// environment.
    ///
    /// ```
    /// let config = railyard::Config::from_vars([
    ///     ("DATABASE_URL", "postgres://app@db/ledger"),
    ///     ("RAILYARD_POOL_MAX_SIZE", "4"),
    ///     ("RAILYARD_CONNECT_TIMEOUT", "2s"),
    /// ])?;
    /// assert_eq!(config.pool().max_size, 4);
    /// # Ok::<(), railyard::error::ConfigError>(())
    /// ```
    pub fn from_vars<K, V>(vars: impl IntoIterator<Item = (K, V)>) -> Result<Self, ConfigError>
    where
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let vars: BTreeMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned()))
            .filter(|(k, _)| {
                k == "DATABASE_URL" || k == "DATABASE_REPLICA_URLS" || k.starts_with("RAILYARD_")
            })
            .collect();
        let profile = match vars.get(PROFILE_VAR) {
            None => Profile::of_build(),
            Some(v) => v.trim().parse::<Profile>()?,
        };
        let mut config = primary_from_vars(&vars, profile)?;
        profile.apply_defaults(&mut config);
        replicas_from_vars(&mut config, &vars)?;
        settings_from_vars(&mut config, &vars)?;
        // Other RAILYARD_* variables (RAILYARD_LOCAL_DIR, test settings) are not ours.
        config.validate()?;
        Ok(config)
    }
}

/// The configuration for the primary: `DATABASE_URL`'s, or the local
/// cluster's when the profile lets it stand in.
fn primary_from_vars(
    vars: &BTreeMap<String, String>,
    profile: Profile,
) -> Result<Config, ConfigError> {
    Ok(match vars.get("DATABASE_URL") {
        Some(url) if url.trim().is_empty() => {
            return Err(ConfigError::hidden(
                "DATABASE_URL",
                "empty; set it to postgres://user:password@host:port/dbname",
            ));
        }
        Some(url) => Config::from_url(url).map_err(|e| prefix_field("DATABASE_URL", e))?,
        None if profile.local_cluster_fallback() => {
            if vars.contains_key("DATABASE_REPLICA_URLS") {
                return Err(ConfigError::hidden(
                    "DATABASE_REPLICA_URLS",
                    "set without DATABASE_URL; set both, or neither (the local cluster brings its own replica)",
                ));
            }
            let app = vars
                .get(Setting::ApplicationName.env())
                .map(|a| a.trim())
                .filter(|a| !a.is_empty());
            let name = local_database_name(app, profile);
            let mut c = Config::new(
                format!("postgres://localhost/{name}")
                    .parse()
                    .expect("a sanitised database name makes a valid URL"),
            );
            c.local_database = Some(name);
            c
        }
        None => {
            return Err(ConfigError::new(
                "DATABASE_URL",
                "",
                format!(
                    "not set; set it to postgres://user:password@host:port/dbname (the {profile} profile{} never starts a local cluster)",
                    if vars.contains_key(PROFILE_VAR) {
                        ""
                    } else {
                        ", the default of a release build when RAILYARD_ENV is unset,"
                    }
                ),
            ));
        }
    })
}

/// The replicas of `DATABASE_REPLICA_URLS`.
fn replicas_from_vars(
    config: &mut Config,
    vars: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    if let Some(list) = vars.get("DATABASE_REPLICA_URLS") {
        let urls = split_url_list(list)?;
        let many = urls.len() > 1;
        for (i, url) in urls.iter().enumerate() {
            let t: ConnectTarget = url.parse().map_err(|e: ConfigError| {
                let mut e = prefix_field("DATABASE_REPLICA_URLS", e);
                if many {
                    e.reason = format!("{} (URL {} of the list)", e.reason, i + 1);
                }
                e
            })?;
            config.replicas.push(t);
        }
    }
    config.env_urls = Some(config.replicas.len());
    Ok(())
}

/// Every `RAILYARD_*` setting that is set, and the password's one source.
fn settings_from_vars(
    config: &mut Config,
    vars: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    // Errors about a default name the variable that would change it.
    config.from_env = Setting::ALL.into_iter().collect();
    for setting in Setting::ALL {
        let key = setting.env();
        let Some(value) = vars.get(key) else {
            continue;
        };
        if value.trim().is_empty() {
            return Err(ConfigError::hidden(
                key,
                if setting == Setting::SslRootCert || setting == Setting::PasswordFile {
                    "empty; unset it or give a path"
                } else {
                    "empty; unset it or give a value"
                },
            ));
        }
        apply(config, setting, key, value)?;
    }
    if vars.contains_key(Setting::PasswordFile.env())
        && vars.contains_key(Setting::PasswordEnv.env())
    {
        return Err(ConfigError::hidden(
            "RAILYARD_PASSWORD_FILE",
            "set together with RAILYARD_PASSWORD_ENV; set only one of them",
        ));
    }
    Ok(())
}

/// Whether `s` is a portable environment variable name.
pub(crate) fn env_var_name(s: &str) -> bool {
    s.len() <= 255
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A pool size: a whole number, at most [`MAX_POOL_SIZE`] (the lower bound is
/// the validator's, which knows which sizes may be 0).
fn parse_count(key: &str, v: &str) -> Result<u32, ConfigError> {
    parse_number(key, v, MAX_POOL_SIZE)
}

/// A whole number, at most `max`.
fn parse_number(key: &str, v: &str, max: u32) -> Result<u32, ConfigError> {
    let t = v.trim();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if t.strip_prefix('-').is_some_and(digits) {
        return Err(ConfigError::new(key, v, "must not be negative"));
    }
    if !digits(t) {
        return Err(ConfigError::new(key, v, "expected a whole number"));
    }
    match t.parse::<u32>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(ConfigError::new(
            key,
            v,
            format!("too large, at most {max}"),
        )),
    }
}

/// Parses durations such as `250ms`, `5s`, `1.5s`, `2m`, `1h 30m` (humantime's
/// syntax), at most [`MAX_DURATION`]; a bare number is refused, since its unit
/// would be a guess.
pub(crate) fn parse_duration(field: &str, s: &str) -> Result<Duration, ConfigError> {
    let t = s.trim();
    let with_unit = "write a number with a unit: ms, s, m or h (for example `5s`)";
    if t.starts_with('-') {
        return Err(ConfigError::new(field, s, "must not be negative"));
    }
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(ConfigError::new(
            field,
            s,
            format!("a number without a unit; {with_unit}"),
        ));
    }
    let d = humantime::parse_duration(t).map_err(|e| match e {
        humantime::DurationError::NumberOverflow => {
            ConfigError::new(field, s, "too large, at most ten years")
        }
        e => ConfigError::new(field, s, format!("{e}; {with_unit}")),
    })?;
    if d > MAX_DURATION {
        return Err(ConfigError::new(field, s, "too large, at most ten years"));
    }
    Ok(d)
}

/// A duration where `0`, `off` or `none` (or any zero duration) means "no limit".
fn optional_duration(field: &str, v: &str) -> Result<Option<Duration>, ConfigError> {
    match v.trim() {
        "0" | "off" | "none" => Ok(None),
        _ => parse_duration(field, v).map(|d| (!d.is_zero()).then_some(d)),
    }
}

/// Splits a list of URLs: separated by whitespace, or by commas that start a new
/// `postgres://` URL (commas inside a multi-host URL are kept). Any other
/// separator (`;`, `|`, …) is refused: the second URL would otherwise become
/// part of the first one's database name or parameters.
fn split_url_list(list: &str) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    for word in list.split_whitespace() {
        let mut current = String::new();
        for piece in word.split(',') {
            if piece.is_empty() {
                continue;
            }
            let starts_url = piece.starts_with("postgres://") || piece.starts_with("postgresql://");
            if starts_url && !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            if !current.is_empty() {
                current.push(',');
            }
            current.push_str(piece);
        }
        if !current.is_empty() {
            out.push(current);
        }
    }
    for (i, url) in out.iter().enumerate() {
        if url.match_indices("://").count() > 1 {
            return Err(ConfigError::hidden(
                "DATABASE_REPLICA_URLS",
                format!(
                    "URL {} of the list holds another `://`: separate URLs with whitespace or commas only",
                    i + 1
                ),
            ));
        }
    }
    Ok(out)
}
