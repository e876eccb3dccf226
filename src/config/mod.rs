//! Typed configuration, parsed once at the boundary.
//!
//! A [`Config`] holds the primary's [`ConnectTarget`] (a parsed `postgres://` URL,
//! several hosts allowed), the replicas' targets, pool sizes and timeouts, TLS
//! settings and session defaults. It is built from a URL with [`Config::from_url`],
//! from the environment with [`Config::from_env`], or with the consuming setters.
//!
//! Secrets never leave this module in clear: [`Secret`] prints as `***`, and the
//! `Debug`/`Display` of every type here redact the password.
//!
//! | environment variable | meaning |
//! |---|---|
//! | `DATABASE_URL` | primary URL (several hosts allowed: `postgres://u@h1:5432,h2:5432/db`) |
//! | `DATABASE_REPLICA_URLS` | replica URLs, separated by whitespace or commas |
//! | `RAILYARD_POOL_MAX_SIZE`, `RAILYARD_POOL_MIN_IDLE` | primary pool sizes |
//! | `RAILYARD_REPLICA_POOL_MAX_SIZE` | per-replica pool size |
//! | `RAILYARD_CONNECT_TIMEOUT`, `RAILYARD_CHECKOUT_TIMEOUT`, `RAILYARD_IDLE_TIMEOUT`, `RAILYARD_MAX_LIFETIME` | durations such as `5s`, `250ms`, `10m` |
//! | `RAILYARD_STATEMENT_TIMEOUT` | default `statement_timeout` for every session (`0` or `off` disables) |
//! | `RAILYARD_MIGRATION_LOCK_TIMEOUT` | how long boot waits for another instance's migrations |
//! | `RAILYARD_APPLICATION_NAME` | `application_name` when the URL does not set one |
//! | `RAILYARD_SSLMODE`, `RAILYARD_SSLROOTCERT` | TLS settings when the URL does not set them |
//! | `RAILYARD_PASSWORD_FILE`, `RAILYARD_PASSWORD_ENV` | read the password for every new connection from a file or variable |

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::error::ConfigError;

/// A secret string (a password). Its `Debug` prints `***` and it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself. Call this only where the value goes to the server.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

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

/// Where the password for new connections comes from. It is read again for every
/// new connection, so a rotated password is used without a restart.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum Credentials {
    /// The password in the URL, or none.
    #[default]
    FromUrl,
    /// A fixed password.
    Static(Secret),
    /// The value of an environment variable, read at each connect.
    Env(String),
    /// The contents of a file (trailing newline removed), read at each connect.
    File(PathBuf),
    /// A function called at each connect (a secrets manager, for example).
    Custom(Arc<dyn Fn() -> Result<Secret, String> + Send + Sync>),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::FromUrl => f.write_str("FromUrl"),
            Credentials::Static(_) => f.write_str("Static(***)"),
            Credentials::Env(v) => f.debug_tuple("Env").field(v).finish(),
            Credentials::File(p) => f.debug_tuple("File").field(p).finish(),
            Credentials::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

impl Credentials {
    /// Reads the current password. `url_password` is the one parsed from the URL.
    pub(crate) fn password(&self, url_password: Option<&Secret>) -> Result<Option<Secret>, String> {
        match self {
            Credentials::FromUrl => Ok(url_password.cloned()),
            Credentials::Static(s) => Ok(Some(s.clone())),
            Credentials::Env(var) => match std::env::var(var) {
                Ok(v) => Ok(Some(Secret::new(v))),
                Err(_) => Err(format!(
                    "environment variable {var} (the password source) is not set"
                )),
            },
            Credentials::File(path) => match std::fs::read_to_string(path) {
                Ok(v) => Ok(Some(Secret::new(v.trim_end_matches(['\r', '\n'])))),
                Err(e) => Err(format!("cannot read password file {}: {e}", path.display())),
            },
            Credentials::Custom(f) => f().map(Some),
        }
    }
}

/// A parsed `postgres://` URL: the servers to try and how to log in.
///
/// Several hosts may be given (`postgres://u@h1:5432,h2:5433/db`); they are tried
/// in order, and `target_session_attrs=read-write` skips standbys.
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

/// Bytes kept as they are in URL parts: RFC 3986's unreserved set, and `/`.
const URL_PART: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, URL_PART).to_string()
}

/// Percent-decodes `s`; `field` and `secret` shape the error. The check for
/// malformed escapes is ours: the codec passes them through unchanged, and a
/// password with a stray `%` must be refused, not guessed at.
fn decode(s: &str, field: &str, secret: bool) -> Result<String, ConfigError> {
    let shown = || {
        if secret {
            "***".to_owned()
        } else {
            s.to_owned()
        }
    };
    let bytes = s.as_bytes();
    let malformed = bytes.iter().enumerate().any(|(i, b)| {
        *b == b'%'
            && !bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if malformed {
        return Err(ConfigError::new(
            field,
            shown(),
            "bad percent-encoding: `%` must be followed by two hex digits",
        ));
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ConfigError::new(field, shown(), "percent-decoded text is not UTF-8"))
}

impl FromStr for ConnectTarget {
    type Err = ConfigError;

    fn from_str(url: &str) -> Result<Self, ConfigError> {
        // Only the scheme and the shape are shown in errors: a URL may carry a password.
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| {
                let scheme = url.split("://").next().unwrap_or("").to_owned();
                let shown = if url.contains("://") {
                    format!("{scheme}://…")
                } else {
                    "(no scheme)".to_owned()
                };
                ConfigError::new(
                    "url",
                    shown,
                    "expected a URL starting with postgres:// or postgresql://",
                )
            })?;
        let (before_query, query) = match rest.split_once('?') {
            Some((a, b)) => (a, Some(b)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (before_query, None),
        };
        // userinfo: the last '@' separates it (passwords may contain '@' when encoded only)
        let (userinfo, hostlist) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let mut user = None;
        let mut password = None;
        if let Some(ui) = userinfo {
            let (u, p) = match ui.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (ui, None),
            };
            if !u.is_empty() {
                user = Some(decode(u, "user", false)?);
            }
            if let Some(p) = p {
                password = Some(Secret::new(decode(p, "password", true)?));
            }
        }
        let mut hosts: Vec<(Option<String>, Option<u16>)> = Vec::new();
        if !hostlist.is_empty() {
            for part in hostlist.split(',') {
                hosts.push(parse_host_port(part)?);
            }
        }
        let dbname = match path {
            Some(p) if !p.is_empty() => Some(decode(p, "dbname", false)?),
            _ => None,
        };

        let mut params = Params::default();
        let mut host_param: Option<Vec<String>> = None;
        let mut port_param: Option<Vec<u16>> = None;
        let mut target = ConnectTarget {
            hosts: Vec::new(),
            user,
            password,
            dbname,
            params: Params::default(),
        };
        if let Some(q) = query {
            let mut seen = BTreeMap::new();
            for pair in q.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    ConfigError::new(
                        decode(pair, "url", false).unwrap_or_else(|_| pair.to_owned()),
                        "",
                        "URL parameter has no `=value`",
                    )
                })?;
                let key = decode(k, "url parameter", false)?;
                let secret = key == "password";
                let value = decode(v, &key, secret)?;
                if seen.insert(key.clone(), ()).is_some() {
                    return Err(ConfigError::new(
                        key,
                        if secret { "***".into() } else { value },
                        "parameter given twice",
                    ));
                }
                match key.as_str() {
                    "sslmode" => params.ssl_mode = Some(value.parse()?),
                    "sslrootcert" => {
                        if value.is_empty() {
                            return Err(ConfigError::new("sslrootcert", value, "empty path"));
                        }
                        params.ssl_root_cert = Some(PathBuf::from(value))
                    }
                    "application_name" => params.application_name = Some(value),
                    "connect_timeout" => {
                        let secs: u64 = value.parse().map_err(|_| {
                            ConfigError::new(
                                "connect_timeout",
                                value.clone(),
                                "expected a whole number of seconds",
                            )
                        })?;
                        if secs == 0 {
                            return Err(ConfigError::new(
                                "connect_timeout",
                                value,
                                "must be at least 1 second",
                            ));
                        }
                        params.connect_timeout = Some(Duration::from_secs(secs));
                    }
                    "target_session_attrs" => params.target_session_attrs = Some(value.parse()?),
                    "options" => params.options = Some(value),
                    "host" => host_param = Some(value.split(',').map(str::to_owned).collect()),
                    "port" => {
                        let mut ports = Vec::new();
                        for p in value.split(',') {
                            ports.push(parse_port(p, "port")?);
                        }
                        port_param = Some(ports);
                    }
                    "user" => target.user = Some(value),
                    "password" => target.password = Some(Secret::new(value)),
                    "dbname" => target.dbname = Some(value),
                    other => {
                        return Err(ConfigError::new(
                            other,
                            if secret { "***".into() } else { value },
                            format!(
                                "unknown URL parameter; supported: {}",
                                URL_PARAMS.join(", ")
                            ),
                        ));
                    }
                }
            }
        }
        if let Some(hp) = host_param {
            if !hosts.is_empty() {
                return Err(ConfigError::new(
                    "host",
                    hp.join(","),
                    "hosts given both in the URL authority and as a `host` parameter; use one",
                ));
            }
            hosts = hp.into_iter().map(|h| (Some(h), None)).collect();
        }
        if let Some(ports) = port_param {
            if hosts.is_empty() {
                hosts = vec![(None, None); ports.len()];
            }
            if ports.len() == 1 {
                for h in &mut hosts {
                    h.1.get_or_insert(ports[0]);
                }
            } else if ports.len() == hosts.len() {
                for (h, p) in hosts.iter_mut().zip(ports) {
                    h.1.get_or_insert(p);
                }
            } else {
                return Err(ConfigError::new(
                    "port",
                    ports
                        .iter()
                        .map(u16::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    format!(
                        "{} ports for {} hosts; give one port, or one per host",
                        ports.len(),
                        hosts.len()
                    ),
                ));
            }
        }
        if hosts.is_empty() {
            hosts.push((None, None));
        }
        target.hosts = hosts
            .into_iter()
            .map(|(h, p)| {
                let port = p.unwrap_or(5432);
                let host = match h {
                    None => Host::Tcp("localhost".into()),
                    Some(h) if h.starts_with('/') => Host::Unix(PathBuf::from(h)),
                    Some(h) if h.is_empty() => Host::Tcp("localhost".into()),
                    Some(h) => Host::Tcp(h),
                };
                (host, port)
            })
            .collect();
        target.params = params;
        Ok(target)
    }
}

fn parse_port(p: &str, field: &str) -> Result<u16, ConfigError> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(ConfigError::new(
            field,
            p,
            "expected a port number between 1 and 65535",
        )),
        Ok(n) => Ok(n),
    }
}

fn parse_host_port(part: &str) -> Result<(Option<String>, Option<u16>), ConfigError> {
    if part.is_empty() {
        return Err(ConfigError::new(
            "host",
            part,
            "empty host in a host list (two commas in a row?)",
        ));
    }
    if let Some(rest) = part.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| ConfigError::new("host", part, "IPv6 address has no closing `]`"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(parse_port(p, "port")?),
            None if after.is_empty() => None,
            None => {
                return Err(ConfigError::new("host", part, "unexpected text after `]`"));
            }
        };
        return Ok((Some(h.to_owned()), port));
    }
    match part.rsplit_once(':') {
        Some((h, p)) => Ok((
            if h.is_empty() {
                None
            } else {
                Some(decode(h, "host", false)?)
            },
            Some(parse_port(p, "port")?),
        )),
        None => Ok((Some(decode(part, "host", false)?), None)),
    }
}

/// Parses durations such as `250ms`, `5s`, `2m`, `1h 30m` (humantime's
/// syntax); a bare number is refused, since its unit would be a guess.
pub(crate) fn parse_duration(field: &str, s: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        ConfigError::new(
            field,
            s,
            format!("{e}; write a number with a unit: ms, s, m or h (for example `5s`)"),
        )
    })?;
    if d > Duration::from_secs(10 * 365 * 86400) {
        return Err(ConfigError::new(field, s, "duration out of range"));
    }
    Ok(d)
}

#[cfg(test)]
fn format_duration(d: Duration) -> String {
    if d.subsec_millis() != 0 || d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
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
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_size: 10,
            min_idle: None,
            checkout_timeout: Duration::from_secs(5),
            idle_timeout: Some(Duration::from_secs(600)),
            max_lifetime: Some(Duration::from_secs(1800)),
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
    pub(crate) breaker_threshold: u32,
    pub(crate) breaker_cooldown: Duration,
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
            .field("breaker_threshold", &self.breaker_threshold)
            .field("breaker_cooldown", &self.breaker_cooldown)
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
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(1),
        }
    }

    /// Reads `DATABASE_URL`, `DATABASE_REPLICA_URLS` and the `RAILYARD_*` variables
    /// (see the module docs). `DATABASE_URL` is required.
    pub fn from_env() -> Result<Self, ConfigError> {
        Config::from_vars(std::env::vars())
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
        let url = vars.get("DATABASE_URL").ok_or_else(|| {
            ConfigError::new(
                "DATABASE_URL",
                "",
                "not set; set it to postgres://user:password@host:port/dbname",
            )
        })?;
        let mut config = Config::from_url(url).map_err(|e| prefix_field("DATABASE_URL", e))?;
        if let Some(list) = vars.get("DATABASE_REPLICA_URLS") {
            for url in split_url_list(list) {
                let t: ConnectTarget = url
                    .parse()
                    .map_err(|e| prefix_field("DATABASE_REPLICA_URLS", e))?;
                config.replicas.push(t);
            }
        }
        for (key, value) in &vars {
            let dur = |v: &str| parse_duration(key, v);
            let count = |v: &str| -> Result<u32, ConfigError> {
                v.trim()
                    .parse::<u32>()
                    .map_err(|_| ConfigError::new(key.as_str(), v, "expected a whole number"))
            };
            match key.as_str() {
                "DATABASE_URL" | "DATABASE_REPLICA_URLS" => {}
                "RAILYARD_POOL_MAX_SIZE" => {
                    config.pool.max_size = count(value)?;
                }
                "RAILYARD_POOL_MIN_IDLE" => config.pool.min_idle = Some(count(value)?),
                "RAILYARD_REPLICA_POOL_MAX_SIZE" => config.replica_pool_max_size = count(value)?,
                "RAILYARD_CONNECT_TIMEOUT" => config.connect_timeout = dur(value)?,
                "RAILYARD_CHECKOUT_TIMEOUT" => config.pool.checkout_timeout = dur(value)?,
                "RAILYARD_IDLE_TIMEOUT" => {
                    config.pool.idle_timeout = optional_duration(key, value)?
                }
                "RAILYARD_MAX_LIFETIME" => {
                    config.pool.max_lifetime = optional_duration(key, value)?
                }
                "RAILYARD_STATEMENT_TIMEOUT" => {
                    config.statement_timeout = optional_duration(key, value)?
                }
                "RAILYARD_MIGRATION_LOCK_TIMEOUT" => config.migration_lock_timeout = dur(value)?,
                "RAILYARD_APPLICATION_NAME" => config.application_name = value.clone(),
                "RAILYARD_SSLMODE" => {
                    config.ssl_mode = Some(value.parse().map_err(|e| prefix_field(key, e))?)
                }
                "RAILYARD_SSLROOTCERT" => config.ssl_root_cert = Some(PathBuf::from(value)),
                "RAILYARD_PASSWORD_FILE" => config.credentials = Credentials::File(value.into()),
                "RAILYARD_PASSWORD_ENV" => config.credentials = Credentials::Env(value.clone()),
                "RAILYARD_TIME_ZONE" => config.time_zone = value.clone(),
                // Variables of other tools (RAILYARD_LOCAL_DIR, test settings) are not ours.
                _ => {}
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks cross-field rules. Called by the environment parser and by
    /// [`crate::Database::connect`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.pool.max_size == 0 {
            return Err(ConfigError::new("pool max_size", "0", "must be at least 1"));
        }
        if let Some(min) = self.pool.min_idle
            && min > self.pool.max_size
        {
            return Err(ConfigError::new(
                "pool min_idle",
                min.to_string(),
                format!("larger than max_size {}", self.pool.max_size),
            ));
        }
        if self.replica_pool_max_size == 0 {
            return Err(ConfigError::new(
                "replica pool max_size",
                "0",
                "must be at least 1",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::new("connect_timeout", "0", "must be positive"));
        }
        if self.pool.checkout_timeout.is_zero() {
            return Err(ConfigError::new(
                "checkout_timeout",
                "0",
                "must be positive",
            ));
        }
        for t in std::iter::once(&self.primary).chain(&self.replicas) {
            let mode = self.effective_ssl_mode(t);
            // verify-ca/verify-full without sslrootcert use the platform's web roots
            // (libpq's sslrootcert=system): legal, so nothing to reject here.
            if t.hosts.iter().any(|(h, _)| matches!(h, Host::Unix(_)))
                && matches!(
                    mode,
                    SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
                )
            {
                return Err(ConfigError::new(
                    "sslmode",
                    mode.as_str(),
                    "Unix-socket hosts never use TLS; use sslmode=disable or prefer for them",
                ));
            }
        }
        Ok(())
    }

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

    /// Most connections in the primary pool. Defaults to 10.
    #[must_use]
    pub fn pool_max_size(mut self, n: u32) -> Self {
        self.pool.max_size = n;
        self
    }

    /// Idle connections kept ready in the primary pool. Defaults to none.
    #[must_use]
    pub fn pool_min_idle(mut self, n: Option<u32>) -> Self {
        self.pool.min_idle = n;
        self
    }

    /// Most connections in each replica's pool. Defaults to 10.
    #[must_use]
    pub fn replica_pool_max_size(mut self, n: u32) -> Self {
        self.replica_pool_max_size = n;
        self
    }

    /// How long a checkout waits for a pooled connection. Defaults to 5 s.
    #[must_use]
    pub fn checkout_timeout(mut self, d: Duration) -> Self {
        self.pool.checkout_timeout = d;
        self
    }

    /// Idle connections older than this are closed. Defaults to 10 min.
    #[must_use]
    pub fn idle_timeout(mut self, d: Option<Duration>) -> Self {
        self.pool.idle_timeout = d;
        self
    }

    /// Connections older than this are closed. Defaults to 30 min.
    #[must_use]
    pub fn max_lifetime(mut self, d: Option<Duration>) -> Self {
        self.pool.max_lifetime = d;
        self
    }

    /// Bound on one connection attempt (socket, TLS, authentication, setup), per
    /// host. The URL's `connect_timeout` wins when given. Defaults to 10 s.
    #[must_use]
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// `statement_timeout` set on every new session. Defaults to none (the server's).
    #[must_use]
    pub fn statement_timeout(mut self, d: Option<Duration>) -> Self {
        self.statement_timeout = d;
        self
    }

    /// `application_name` when the URL has none. Defaults to `railyard`.
    #[must_use]
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// TLS mode for targets whose URL does not set `sslmode`. Defaults to `prefer`.
    #[must_use]
    pub fn ssl_mode(mut self, mode: SslMode) -> Self {
        self.ssl_mode = Some(mode);
        self
    }

    /// CA certificate file for targets whose URL has no `sslrootcert`. Defaults to
    /// none (the platform's web roots when verification is on).
    #[must_use]
    pub fn ssl_root_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.ssl_root_cert = Some(path.into());
        self
    }

    /// Where passwords come from. Defaults to [`Credentials::FromUrl`].
    #[must_use]
    pub fn credentials(mut self, c: Credentials) -> Self {
        self.credentials = c;
        self
    }

    /// How long boot waits for another instance's migrations. Defaults to 60 s.
    #[must_use]
    pub fn migration_lock_timeout(mut self, d: Duration) -> Self {
        self.migration_lock_timeout = d;
        self
    }

    /// The circuit breaker of each host: consecutive connect failures that open
    /// it, and the first cooldown (doubled, with jitter, while the server stays
    /// down, up to 30 s). Defaults to 5 failures and 1 s.
    #[must_use]
    pub fn circuit_breaker(mut self, threshold: u32, cooldown: Duration) -> Self {
        self.breaker_threshold = threshold;
        self.breaker_cooldown = cooldown;
        self
    }

    /// Session `TimeZone`. Defaults to `UTC`.
    #[must_use]
    pub fn time_zone(mut self, tz: impl Into<String>) -> Self {
        self.time_zone = tz.into();
        self
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
}

fn optional_duration(field: &str, v: &str) -> Result<Option<Duration>, ConfigError> {
    match v.trim() {
        "0" | "off" | "none" => Ok(None),
        _ => parse_duration(field, v).map(Some),
    }
}

fn prefix_field(prefix: &str, mut e: ConfigError) -> ConfigError {
    if e.field != prefix {
        e.field = format!("{prefix} ({})", e.field);
    }
    e
}

/// Splits a list of URLs: separated by whitespace, or by commas that start a new
/// `postgres://` URL (commas inside a multi-host URL are kept).
fn split_url_list(list: &str) -> Vec<String> {
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
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    #[test]
    fn env_errors_name_the_variable() {
        let err = Config::from_vars([
            ("DATABASE_URL", "postgres://u@h/db"),
            ("RAILYARD_CONNECT_TIMEOUT", "5"),
        ])
        .unwrap_err();
        assert_eq!(err.field, "RAILYARD_CONNECT_TIMEOUT");
        let err = Config::from_vars([
            ("DATABASE_URL", "postgres://u@h/db"),
            ("RAILYARD_POOL_MAX_SIZE", "many"),
        ])
        .unwrap_err();
        assert_eq!(err.field, "RAILYARD_POOL_MAX_SIZE");
        let err = Config::from_vars([
            ("DATABASE_URL", "postgres://u@h/db"),
            ("RAILYARD_POOL_MAX_SIZE", "0"),
        ])
        .unwrap_err();
        assert_eq!(err.field, "pool max_size");
        let err = Config::from_vars([("RAILYARD_POOL_MAX_SIZE", "3")]).unwrap_err();
        assert_eq!(err.field, "DATABASE_URL");
        let err = Config::from_vars([
            ("DATABASE_URL", "postgres://u@h/db"),
            ("DATABASE_REPLICA_URLS", "postgres://u@r1/db, http://r2/db"),
        ])
        .unwrap_err();
        assert_eq!(err.field, "DATABASE_REPLICA_URLS (url)");
    }

    #[test]
    fn replica_lists_split_between_urls_but_not_inside_multi_host_ones() {
        assert_eq!(
            split_url_list("postgres://a@r1,r2/db,postgres://a@r3/db postgresql://a@r4/db"),
            vec![
                "postgres://a@r1,r2/db".to_owned(),
                "postgres://a@r3/db".to_owned(),
                "postgresql://a@r4/db".to_owned()
            ]
        );
    }

    #[test]
    fn env_reads_every_setting() {
        let c = Config::from_vars([
            ("DATABASE_URL", "postgres://u:pw@h/db"),
            (
                "DATABASE_REPLICA_URLS",
                "postgres://u:pw@r1/db,postgres://u:pw@r2/db",
            ),
            ("RAILYARD_POOL_MAX_SIZE", "7"),
            ("RAILYARD_POOL_MIN_IDLE", "2"),
            ("RAILYARD_CHECKOUT_TIMEOUT", "750ms"),
            ("RAILYARD_STATEMENT_TIMEOUT", "30s"),
            ("RAILYARD_IDLE_TIMEOUT", "off"),
            ("RAILYARD_SSLMODE", "verify-ca"),
            ("RAILYARD_PASSWORD_FILE", "/run/secrets/pg"),
            ("PATH", "/usr/bin"),
        ])
        .unwrap();
        assert_eq!(c.replicas.len(), 2);
        assert_eq!(c.pool.max_size, 7);
        assert_eq!(c.pool.min_idle, Some(2));
        assert_eq!(c.pool.checkout_timeout, Duration::from_millis(750));
        assert_eq!(c.statement_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.pool.idle_timeout, None);
        assert_eq!(c.effective_ssl_mode(&c.primary), SslMode::VerifyCa);
        assert!(matches!(c.credentials, Credentials::File(_)));
        let shown = format!("{c:?} {c}");
        assert!(!shown.contains("pw"), "{shown}");
    }

    fn arb_text() -> impl Strategy<Value = String> {
        // Any printable text, including URL metacharacters, to exercise the encoder.
        proptest::string::string_regex("[ -~é€]{1,16}").unwrap()
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
            proptest::option::of(arb_text()),
            mode,
            tsa,
            proptest::option::of(arb_text()),
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

        #[test]
        fn durations_round_trip(ms in 1u64..10_000_000) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(parse_duration("x", &format_duration(d)).unwrap(), d);
        }
    }
}
