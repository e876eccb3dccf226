//! Environment profiles: `RAILYARD_ENV=development|test|production` picks the
//! defaults a configuration read from the environment starts from.
//!
//! A profile only changes *defaults*: anything the URL or a `RAILYARD_*`
//! variable says explicitly wins. Unset, the profile is `development` in a
//! debug build and `production` in a release build, so a release binary never
//! quietly starts a local cluster or talks without TLS verification.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::{Config, Setting, SslMode};
use crate::error::ConfigError;

/// The environment the application runs in (`RAILYARD_ENV`).
///
/// ```
/// use railyard::config::Profile;
/// assert_eq!("production".parse::<Profile>()?, Profile::Production);
/// let config = railyard::Config::from_vars([
///     ("RAILYARD_ENV", "production"),
///     // production defaults to sslmode=verify-full, which needs the `tls`
///     // feature; a build without it must say what it runs instead.
///     ("RAILYARD_SSLMODE", if railyard::config::tls_available() { "verify-full" } else { "disable" }),
///     ("DATABASE_URL", "postgres://app@db.internal/ledger"),
/// ])?;
/// assert_eq!(config.profile(), Profile::Production);
/// # Ok::<(), railyard::error::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Profile {
    /// A developer's machine: with no `DATABASE_URL`, Railyard starts (or
    /// joins) the local cluster; the newest migration may be
    /// edited (`RAILYARD_MIGRATIONS_ALLOW_EDITED=latest`).
    Development,
    /// An application's own test run: like development, on a database of its
    /// own (`<application>_test`), with a statement timeout so that a hung
    /// query fails the test instead of hanging it.
    Test,
    /// A deployment: `DATABASE_URL` is required, TLS defaults to
    /// `verify-full`, statements time out after 30 s by default, and edited
    /// migrations are refused whatever the override says.
    Production,
}

/// The variable that names the profile.
pub const PROFILE_VAR: &str = "RAILYARD_ENV";

impl Profile {
    /// Every profile, in the order of the documentation's table.
    pub const ALL: [Profile; 3] = [Profile::Development, Profile::Test, Profile::Production];

    /// The profile of a build when `RAILYARD_ENV` is unset.
    pub fn of_build() -> Profile {
        if cfg!(debug_assertions) {
            Profile::Development
        } else {
            Profile::Production
        }
    }

    /// The name used in `RAILYARD_ENV`.
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Development => "development",
            Profile::Test => "test",
            Profile::Production => "production",
        }
    }

    /// Whether, with no `DATABASE_URL`, the local cluster stands in.
    pub fn local_cluster_fallback(self) -> bool {
        self != Profile::Production
    }

    /// Whether `RAILYARD_MIGRATIONS_ALLOW_EDITED` may be honoured.
    pub fn allows_edited_migrations(self) -> bool {
        self != Profile::Production
    }

    /// A configuration holding this profile's defaults.
    pub(crate) fn apply_defaults(self, config: &mut Config) {
        config.profile = self;
        match self {
            Profile::Development => {}
            Profile::Test => {
                config.statement_timeout = Some(Duration::from_secs(60));
                config.connect_timeout = Duration::from_secs(5);
            }
            Profile::Production => {
                config.ssl_mode = Some(SslMode::VerifyFull);
                config.statement_timeout = Some(Duration::from_secs(30));
            }
        }
    }

    /// The README's table: every setting read from the environment, with its
    /// default in each profile, as the code has it.
    pub fn defaults_table() -> String {
        let configs: Vec<Config> = Profile::ALL
            .iter()
            .map(|p| {
                let mut c = Config::new(
                    "postgres://localhost/db"
                        .parse()
                        .expect("a constant URL parses"),
                );
                p.apply_defaults(&mut c);
                c
            })
            .collect();
        let mut s =
            String::from("| variable | development | test | production |\n|---|---|---|---|\n");
        let row = |s: &mut String, name: &str, cells: Vec<String>| {
            s.push_str(&format!("| `{name}` | {} |\n", cells.join(" | ")));
        };
        row(
            &mut s,
            "DATABASE_URL",
            Profile::ALL
                .iter()
                .map(|p| match p {
                    Profile::Development => "the local cluster, database `<application>`".into(),
                    Profile::Test => "the local cluster, database `<application>_test`".into(),
                    Profile::Production => "required".into(),
                })
                .collect(),
        );
        for setting in Setting::ALL {
            row(
                &mut s,
                setting.env(),
                configs.iter().map(|c| setting.default_in(c)).collect(),
            );
        }
        row(
            &mut s,
            "RAILYARD_MIGRATIONS_ALLOW_EDITED",
            Profile::ALL
                .iter()
                .map(|p| {
                    if p.allows_edited_migrations() {
                        "honoured (debug builds)".into()
                    } else {
                        "refused".into()
                    }
                })
                .collect(),
        );
        s
    }
}

impl FromStr for Profile {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        Ok(match s {
            "development" => Profile::Development,
            "test" => Profile::Test,
            "production" => Profile::Production,
            _ => {
                return Err(ConfigError::new(
                    PROFILE_VAR,
                    s,
                    "expected one of development, test, production",
                ));
            }
        })
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name of the local database for an application: `application_name`
/// when it was set, else the running program's name, reduced to what a
/// database name may hold without quoting.
pub(crate) fn local_database_name(application: Option<&str>, profile: Profile) -> String {
    let program = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()));
    let raw = application
        .map(str::to_owned)
        .or(program)
        .unwrap_or_else(|| "app".into());
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert_str(0, "app_");
    }
    name.truncate(50);
    if profile == Profile::Test {
        name.push_str("_test");
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_table_is_the_codes() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
            .expect("README.md");
        let table = Profile::defaults_table();
        assert!(
            readme.contains(&table),
            "README.md's profile table differs from the code's; replace it with:\n{table}"
        );
    }

    #[test]
    fn names_and_database_names() {
        for p in Profile::ALL {
            assert_eq!(p.as_str().parse::<Profile>().unwrap(), p);
        }
        let e = "prod".parse::<Profile>().unwrap_err();
        assert!(e.to_string().contains(PROFILE_VAR), "{e}");
        assert_eq!(
            local_database_name(Some("Ledger-API"), Profile::Development),
            "ledger_api"
        );
        assert_eq!(
            local_database_name(Some("9lives"), Profile::Test),
            "app_9lives_test"
        );
    }
}
