//! `postgres://` URLs: [`ConnectTarget`], its parser and its printer, and the
//! checks shared with the environment parser (names, paths, time zones).

use std::collections::BTreeSet;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::{Host, Secret, SslMode, TargetSessionAttrs};
use crate::error::ConfigError;

mod check;
mod parse;
#[cfg(test)]
mod tests;

pub(crate) use check::{check_name, check_path, check_time_zone};
use check::{check_options, check_password, encode};

/// The longest URL accepted, in bytes (64 KiB).
pub const MAX_URL_LEN: usize = 65_536;
/// The longest user, database or application name, in bytes: PostgreSQL's
/// `NAMEDATALEN - 1`. The server would cut a longer name and so use another
/// one; Railyard refuses it instead.
pub const MAX_NAME_LEN: usize = 63;
/// The longest `options` parameter, in bytes. The whole startup packet is
/// limited to 10,000 bytes by the server; names and settings take the rest.
pub const MAX_OPTIONS_LEN: usize = 8_000;
/// The longest host name, in bytes (DNS allows 253).
pub const MAX_HOST_LEN: usize = 253;
/// The longest file or socket-directory path, in bytes.
pub const MAX_PATH_LEN: usize = 4_096;
/// The longest time zone, in bytes (PostgreSQL's `TZ_STRLEN_MAX`).
pub const MAX_TIME_ZONE_LEN: usize = 255;

/// A parsed `postgres://` URL: the servers to try and how to log in.
///
/// Several hosts may be given (`postgres://u@h1:5432,h2:5433/db`); they are tried
/// in order, and `target_session_attrs=read-write` skips standbys.
///
/// The grammar is libpq's:
/// `postgres[ql]://[user[:password]@][host[:port][,…]][/dbname][?name=value[&…]]`.
/// A host is a name (ASCII letters, digits, `-`, `.`, `_`; a non-ASCII name is
/// written in its `xn--` form), an IPv4 address, an IPv6 address in brackets
/// (`[::1]:5432`), or a percent-encoded Unix-socket directory (`%2Frun%2Fpg`).
/// The parser is strict where a mistake could leak a secret or reach another
/// server than meant:
///
/// - an unencoded `@` is allowed only before the host (a password's `@` may be
///   left unencoded there); anywhere after it is refused, since it is the sign
///   of a password holding `/` or `?` that was not percent-encoded, or of two
///   URLs run together. Write it `%40` in names and parameter values;
/// - a user, database or application name is refused when it holds a control
///   character (`%00` included), is longer than [`MAX_NAME_LEN`] bytes, or
///   looks like a URL or credentials (it contains `://`, or an `@` together
///   with a `:` or `/`);
/// - a parameter given twice, or a host, port, user, password or database
///   given both in the URL's body and as a parameter, is refused;
/// - unknown parameters are refused by name; their values are never shown.
///
/// ```
/// use railyard::SslMode;
/// use railyard::config::ConnectTarget;
/// let t: ConnectTarget = "postgres://app:s3cret@db1:5432,db2:5433/ledger?sslmode=verify-full"
///     .parse()?;
/// assert_eq!(t.hosts().len(), 2);
/// assert_eq!(t.ssl_mode(), Some(SslMode::VerifyFull));
/// assert!(!t.to_string().contains("s3cret"));
/// # Ok::<(), railyard::error::ConfigError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectTarget {
    pub(crate) hosts: Vec<(Host, u16)>,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<Secret>,
    pub(crate) dbname: Option<String>,
    pub(crate) params: Params,
}

/// The URL query parameters Railyard understands.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Params {
    pub(crate) ssl_mode: Option<SslMode>,
    pub(crate) ssl_root_cert: Option<PathBuf>,
    pub(crate) application_name: Option<String>,
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) target_session_attrs: Option<TargetSessionAttrs>,
    pub(crate) options: Option<String>,
}

const URL_PARAMS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "application_name",
    "connect_timeout",
    "target_session_attrs",
    "options",
    "host",
    "port",
    "user",
    "password",
    "dbname",
];

impl ConnectTarget {
    /// A target on a Unix socket in `dir` (no TLS: the socket is local),
    /// for `user` with `password`, to `dbname`.
    ///
    /// ```
    /// use railyard::config::{ConnectTarget, Host};
    /// let t = ConnectTarget::unix_socket("/run/postgresql", 5432, "app", None, "app");
    /// assert!(matches!(t.hosts()[0], (Host::Unix(_), 5432)));
    /// ```
    pub fn unix_socket(
        dir: impl Into<PathBuf>,
        port: u16,
        user: &str,
        password: Option<Secret>,
        dbname: &str,
    ) -> Self {
        ConnectTarget {
            hosts: vec![(Host::Unix(dir.into()), port)],
            user: Some(user.into()),
            password,
            dbname: Some(dbname.into()),
            params: Params {
                ssl_mode: Some(SslMode::Disable),
                ..Default::default()
            },
        }
    }

    /// The hosts and ports, in the order they are tried.
    pub fn hosts(&self) -> &[(Host, u16)] {
        &self.hosts
    }
    /// The user name, if given.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }
    /// The database name, if given (the server defaults it to the user name).
    pub fn dbname(&self) -> Option<&str> {
        self.dbname.as_deref()
    }
    /// The `sslmode` parameter, if given.
    pub fn ssl_mode(&self) -> Option<SslMode> {
        self.params.ssl_mode
    }
    /// The `sslrootcert` parameter, if given.
    pub fn ssl_root_cert(&self) -> Option<&std::path::Path> {
        self.params.ssl_root_cert.as_deref()
    }
    /// The `target_session_attrs` parameter, if given.
    pub fn target_session_attrs(&self) -> Option<TargetSessionAttrs> {
        self.params.target_session_attrs
    }
    /// The `application_name` parameter, if given.
    pub fn application_name(&self) -> Option<&str> {
        self.params.application_name.as_deref()
    }
    /// Whether the URL carries a password.
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    /// The URL's password, for handing to a tool or client that needs it (the
    /// load command's raw baseline, `pgbench`). [`Secret`]'s `Debug` hides it;
    /// never log [`Secret::expose`].
    pub fn password(&self) -> Option<&Secret> {
        self.password.as_ref()
    }

    /// Returns a copy connecting to another database on the same servers.
    ///
    /// ```
    /// let t: railyard::config::ConnectTarget = "postgres://u@localhost/app".parse()?;
    /// assert_eq!(t.with_dbname("postgres").dbname(), Some("postgres"));
    /// # Ok::<(), railyard::error::ConfigError>(())
    /// ```
    #[must_use]
    pub fn with_dbname(&self, dbname: &str) -> Self {
        let mut t = self.clone();
        t.dbname = Some(dbname.to_owned());
        t
    }

    /// Returns a copy with another password.
    #[must_use]
    pub fn with_password(&self, password: Option<Secret>) -> Self {
        let mut t = self.clone();
        t.password = password;
        t
    }

    /// Returns a copy with another user name.
    #[must_use]
    pub fn with_user(&self, user: &str) -> Self {
        let mut t = self.clone();
        t.user = Some(user.to_owned());
        t
    }

    /// The URL with its password in clear, for handing to tools that need it
    /// (`DATABASE_URL` for the diesel CLI, say). Never log the result.
    pub fn expose_url(&self) -> String {
        self.render(true)
    }

    /// Checks what the setters (`with_dbname`, …) may have put in unchecked:
    /// the same rules as the parser's for names, passwords and options.
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        if let Some(u) = &self.user {
            check_name("user", u)?;
        }
        if let Some(p) = &self.password {
            check_password(p.expose())?;
        }
        if let Some(d) = &self.dbname {
            check_name("dbname", d)?;
        }
        if let Some(a) = &self.params.application_name {
            check_name("application_name", a)?;
        }
        if let Some(o) = &self.params.options {
            check_options(o)?;
        }
        if let Some(c) = &self.params.ssl_root_cert {
            check_path("sslrootcert", &c.to_string_lossy())?;
        }
        Ok(())
    }

    // Over 80 lines: the URL part by part, in the order the parser reads it.
    // Long by design: each parameter written back in the order libpq documents them.
    fn render(&self, with_password: bool) -> String {
        let mut s = String::from("postgres://");
        if let Some(user) = &self.user {
            s.push_str(&encode(user).replace('/', "%2F"));
            if let Some(p) = &self.password {
                s.push(':');
                if with_password {
                    s.push_str(&encode(p.expose()).replace('/', "%2F"));
                } else {
                    s.push_str("***");
                }
            }
            s.push('@');
        }
        let mut unix = Vec::new();
        let mut first = true;
        for (host, port) in &self.hosts {
            match host {
                Host::Tcp(h) => {
                    if !first {
                        s.push(',');
                    }
                    first = false;
                    if h.contains(':') {
                        s.push('[');
                        s.push_str(h);
                        s.push(']');
                    } else {
                        s.push_str(&encode(h));
                    }
                    s.push(':');
                    s.push_str(&port.to_string());
                }
                Host::Unix(p) => unix.push((p.clone(), *port)),
            }
        }
        s.push('/');
        if let Some(db) = &self.dbname {
            s.push_str(&encode(db));
        }
        let mut q: Vec<(String, String)> = Vec::new();
        if !unix.is_empty() {
            q.push((
                "host".into(),
                unix.iter()
                    .map(|(p, _)| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ));
            q.push((
                "port".into(),
                unix.iter()
                    .map(|(_, p)| p.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ));
        }
        let p = &self.params;
        if let Some(m) = p.ssl_mode {
            q.push(("sslmode".into(), m.as_str().into()));
        }
        if let Some(c) = &p.ssl_root_cert {
            q.push(("sslrootcert".into(), c.display().to_string()));
        }
        if let Some(a) = &p.application_name {
            q.push(("application_name".into(), a.clone()));
        }
        if let Some(t) = p.connect_timeout {
            q.push(("connect_timeout".into(), t.as_secs().to_string()));
        }
        if let Some(t) = p.target_session_attrs {
            q.push(("target_session_attrs".into(), t.as_str().into()));
        }
        if let Some(o) = &p.options {
            q.push(("options".into(), o.clone()));
        }
        for (i, (k, v)) in q.iter().enumerate() {
            s.push(if i == 0 { '?' } else { '&' });
            s.push_str(k);
            s.push('=');
            s.push_str(&encode(v));
        }
        s
    }
}

impl fmt::Display for ConnectTarget {
    /// The URL with the password replaced by `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(false))
    }
}

impl fmt::Debug for ConnectTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnectTarget({})", self.render(false))
    }
}
