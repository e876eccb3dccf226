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
/// password with a stray `%` must be refused, not guessed at. A secret's text
/// is never part of the error.
fn decode(s: &str, field: &str, secret: bool) -> Result<String, ConfigError> {
    let fail = |reason: &str| {
        if secret {
            ConfigError::hidden(field, reason)
        } else {
            ConfigError::new(field, s, reason)
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
        return Err(fail(
            "bad percent-encoding: `%` must be followed by two hex digits",
        ));
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| fail("percent-decoded text is not UTF-8"))
}

/// Whether `s` can be shown as a parameter name: a short run of ASCII letters,
/// digits and `_`. Anything else may be a piece of a misplaced password.
fn name_like(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether a name has the shape of a URL or of `user:password@host`: it holds
/// `://`, or an `@` together with a `:` or a `/`. Such a name comes from a
/// separator or a reserved character that went wrong, and the server would
/// echo it (password included) in its errors.
fn looks_like_credentials(s: &str) -> bool {
    s.contains("://") || (s.contains('@') && s.contains([':', '/']))
}

/// Checks a user, database or application name (see [`ConnectTarget`]).
pub(crate) fn check_name(field: &str, value: &str) -> Result<(), ConfigError> {
    if looks_like_credentials(value) {
        return Err(ConfigError::hidden(
            field,
            "looks like a URL or credentials (it holds `://`, or `@` with `:` or `/`), so it is not shown: separate URLs with whitespace or commas, and percent-encode reserved characters in passwords",
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ConfigError::new(
            field,
            value,
            "holds a control character (such as %00 or a line end), which a PostgreSQL name cannot take",
        ));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(ConfigError::new(
            field,
            value,
            format!(
                "{} bytes, longer than PostgreSQL's limit of {MAX_NAME_LEN} bytes for names (the server would cut it and so use another name)",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// Checks a password: it goes to the server as a C string.
fn check_password(value: &str) -> Result<(), ConfigError> {
    if value.contains('\0') {
        return Err(ConfigError::hidden(
            "password",
            "holds a NUL byte (%00), which a password cannot contain",
        ));
    }
    Ok(())
}

/// Checks the `options` parameter.
fn check_options(value: &str) -> Result<(), ConfigError> {
    if value.chars().any(char::is_control) {
        return Err(ConfigError::new(
            "options",
            value,
            "holds a control character (such as %00 or a line end)",
        ));
    }
    if value.len() > MAX_OPTIONS_LEN {
        return Err(ConfigError::new(
            "options",
            value,
            format!(
                "{} bytes, longer than the limit of {MAX_OPTIONS_LEN}",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// Checks a file path (`sslrootcert`, the password file): not empty, no NUL
/// byte, at most [`MAX_PATH_LEN`] bytes, and not in the shape of a URL or of
/// credentials (`://`, or `@` with `:`).
pub(crate) fn check_path(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() {
        return Err(ConfigError::hidden(field, "empty; unset it or give a path"));
    }
    if value.contains("://") || (value.contains('@') && value.contains(':')) {
        return Err(ConfigError::hidden(
            field,
            "looks like a URL or credentials (it holds `://`, or `@` with `:`), so it is not shown; expected a file path",
        ));
    }
    if value.contains('\0') {
        return Err(ConfigError::new(
            field,
            value,
            "holds a NUL byte, which a path cannot contain",
        ));
    }
    if value.len() > MAX_PATH_LEN {
        return Err(ConfigError::new(
            field,
            value,
            format!(
                "{} bytes, longer than the limit of {MAX_PATH_LEN} for a path",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// Checks a session time zone before it reaches the server: not empty, at most
/// [`MAX_TIME_ZONE_LEN`] bytes, no quote, backslash, control character, `@`
/// or `://`.
/// Whether the server knows the zone is found out at the first connection.
pub(crate) fn check_time_zone(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.contains('@') || value.contains("://") {
        return Err(ConfigError::hidden(
            field,
            "looks like a URL or credentials (it holds `@` or `://`), so it is not shown; expected a time zone such as UTC, Europe/Paris or +02:00",
        ));
    }
    if value.trim().is_empty() {
        return Err(ConfigError::new(
            field,
            value,
            "empty; give a time zone such as UTC, Europe/Paris or +02:00",
        ));
    }
    if value.len() > MAX_TIME_ZONE_LEN {
        return Err(ConfigError::new(
            field,
            value,
            format!(
                "{} bytes, longer than the limit of {MAX_TIME_ZONE_LEN} for a time zone",
                value.len()
            ),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_control() || matches!(c, '\'' | '"' | '\\'))
    {
        return Err(ConfigError::new(
            field,
            value,
            "holds a quote, a backslash or a control character; expected a time zone such as UTC, Europe/Paris or +02:00",
        ));
    }
    Ok(())
}

/// Parses a port: decimal digits only, 1 to 65535. Text that is not a number
/// is shown only in a parameter: in the URL's body it may be a password whose
/// reserved characters were not encoded (`u:pass/word@h` reads `pass` as a port).
fn parse_port(p: &str, field: &str, in_body: bool) -> Result<u16, ConfigError> {
    let range = "expected a port number between 1 and 65535";
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        if let Some(n) = p.strip_prefix('-')
            && !n.is_empty()
            && n.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(ConfigError::new(
                field,
                p,
                format!("must not be negative; {range}"),
            ));
        }
        return Err(if in_body {
            ConfigError::hidden(
                field,
                format!(
                    "{range} (the text after `:` is not shown: if it is part of a password, percent-encode the password's reserved characters, and check that the URL has `@host`)"
                ),
            )
        } else {
            ConfigError::new(field, p, range)
        });
    }
    match p.parse::<u32>() {
        Ok(n @ 1..=65535) => Ok(n as u16),
        Ok(0) => Err(ConfigError::new(field, p, range)),
        _ => Err(ConfigError::new(field, p, format!("too large; {range}"))),
    }
}

/// Checks a TCP host: an IPv4 or IPv6 address (without brackets: brackets
/// are the URL body's syntax), or an ASCII host name.
fn check_tcp_host(field: &str, h: &str) -> Result<(), ConfigError> {
    if h.parse::<Ipv4Addr>().is_ok() || is_ipv6(h) {
        return Ok(());
    }
    if h.len() > MAX_HOST_LEN {
        return Err(ConfigError::new(
            field,
            h,
            format!(
                "{} bytes, longer than the limit of {MAX_HOST_LEN} for a host name",
                h.len()
            ),
        ));
    }
    if !h.is_ascii() {
        return Err(ConfigError::new(
            field,
            h,
            "a non-ASCII host name: write it in its ASCII form (`xn--…`)",
        ));
    }
    if h.contains(':') {
        return Err(ConfigError::new(
            field,
            h,
            "not an IPv6 address, and a host name cannot hold `:`",
        ));
    }
    if !h
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(ConfigError::new(
            field,
            h,
            "not a host name: expected letters, digits, `-`, `.` and `_` (an IPv6 address goes in brackets, a Unix-socket directory starts with `/`)",
        ));
    }
    Ok(())
}

/// An IPv6 address, with an optional zone (`fe80::1%eth0`).
fn is_ipv6(h: &str) -> bool {
    let (addr, zone) = match h.split_once('%') {
        Some((a, z)) => (a, Some(z)),
        None => (h, None),
    };
    addr.parse::<Ipv6Addr>().is_ok()
        && zone.is_none_or(|z| {
            !z.is_empty() && z.len() <= 16 && z.bytes().all(|b| b.is_ascii_alphanumeric())
        })
}

/// A host given as text (decoded): a Unix-socket directory when it starts with
/// `/`, else a TCP host.
fn host_from(field: &str, h: String) -> Result<Host, ConfigError> {
    if h.starts_with('/') {
        check_path(field, &h)?;
        Ok(Host::Unix(PathBuf::from(h)))
    } else {
        check_tcp_host(field, &h)?;
        Ok(Host::Tcp(h))
    }
}

/// One entry of the URL body's host list: `name`, `name:port`, `[ipv6]`,
/// `[ipv6]:port`, `:port` or a percent-encoded socket directory.
fn parse_host_port(part: &str) -> Result<(Option<Host>, Option<u16>), ConfigError> {
    let shape = "a host is written name, name:port, [ipv6] or [ipv6]:port";
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
        if !is_ipv6(h) {
            return Err(ConfigError::new(
                "host",
                part,
                format!("not an IPv6 address inside `[…]`; {shape}"),
            ));
        }
        let port = match after.strip_prefix(':') {
            Some(p) => Some(parse_port(p, "port", true)?),
            None if after.is_empty() => None,
            None => {
                return Err(ConfigError::new(
                    "host",
                    part,
                    format!("unexpected text after `]`; {shape}"),
                ));
            }
        };
        return Ok((Some(Host::Tcp(h.to_owned())), port));
    }
    let (h, port) = match part.split_once(':') {
        Some((_, p)) if p.contains(':') => {
            return Err(ConfigError::new(
                "host",
                part,
                format!(
                    "more than one `:`: an IPv6 address needs brackets (`[::1]:5432`); {shape}"
                ),
            ));
        }
        Some((h, p)) => (h, Some(parse_port(p, "port", true)?)),
        None => (part, None),
    };
    let host = if h.is_empty() {
        None
    } else {
        Some(host_from("host", decode(h, "host", false)?)?)
    };
    Ok((host, port))
}

/// A parameter's decoded value, with the checks its name calls for.
fn known_param(
    key: &str,
    value: String,
    params: &mut Params,
    target: &mut ConnectTarget,
    host_param: &mut Option<Vec<Host>>,
    port_param: &mut Option<Vec<u16>>,
) -> Result<(), ConfigError> {
    let twice = |what: &str| {
        ConfigError::hidden(
            key,
            format!("{what} given both in the URL's body and as a `{key}` parameter; use one"),
        )
    };
    let nonempty = |v: &str| {
        if v.is_empty() {
            Err(ConfigError::new(key, v, "empty; leave the parameter out"))
        } else {
            Ok(())
        }
    };
    match key {
        "sslmode" => params.ssl_mode = Some(value.parse()?),
        "sslrootcert" => {
            check_path("sslrootcert", &value)?;
            params.ssl_root_cert = Some(PathBuf::from(value));
        }
        "application_name" => {
            check_name(key, &value)?;
            params.application_name = Some(value);
        }
        "connect_timeout" => {
            let secs = parse_seconds(key, &value)?;
            params.connect_timeout = Some(Duration::from_secs(secs));
        }
        "target_session_attrs" => params.target_session_attrs = Some(value.parse()?),
        "options" => {
            check_options(&value)?;
            params.options = Some(value);
        }
        "host" => {
            let mut hosts = Vec::new();
            for h in value.split(',') {
                if h.is_empty() {
                    return Err(ConfigError::new(
                        "host",
                        value.as_str(),
                        "empty host in a host list (two commas in a row?)",
                    ));
                }
                hosts.push(host_from("host", h.to_owned())?);
            }
            *host_param = Some(hosts);
        }
        "port" => {
            let mut ports = Vec::new();
            for p in value.split(',') {
                ports.push(parse_port(p, "port", false)?);
            }
            *port_param = Some(ports);
        }
        "user" => {
            if target.user.is_some() {
                return Err(twice("a user"));
            }
            nonempty(&value)?;
            check_name(key, &value)?;
            target.user = Some(value);
        }
        "password" => {
            if target.password.is_some() {
                return Err(twice("a password"));
            }
            check_password(&value)?;
            target.password = Some(Secret::new(value));
        }
        "dbname" => {
            if target.dbname.is_some() {
                return Err(twice("a database name"));
            }
            nonempty(&value)?;
            check_name(key, &value)?;
            target.dbname = Some(value);
        }
        _ => unreachable!("only known parameters come here"),
    }
    Ok(())
}

/// `connect_timeout`: whole seconds, at least 1, at most ten years.
fn parse_seconds(key: &str, value: &str) -> Result<u64, ConfigError> {
    if let Some(n) = value.strip_prefix('-')
        && !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(ConfigError::new(key, value, "must not be negative"));
    }
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConfigError::new(
            key,
            value,
            "expected a whole number of seconds",
        ));
    }
    match value.parse::<u64>() {
        Ok(0) => Err(ConfigError::new(key, value, "must be at least 1 second")),
        Ok(n) if n <= super::MAX_DURATION.as_secs() => Ok(n),
        _ => Err(ConfigError::new(
            key,
            value,
            format!(
                "too large, at most {} seconds (ten years)",
                super::MAX_DURATION.as_secs()
            ),
        )),
    }
}

impl FromStr for ConnectTarget {
    type Err = ConfigError;

    fn from_str(url: &str) -> Result<Self, ConfigError> {
        // Errors show no more of a URL than a field needs: it may carry a password.
        if url.len() > MAX_URL_LEN {
            return Err(ConfigError::hidden(
                "url",
                format!(
                    "{} bytes, longer than the limit of {MAX_URL_LEN}",
                    url.len()
                ),
            ));
        }
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| {
                let expected = "expected a URL starting with postgres:// or postgresql://";
                match url.split_once("://") {
                    Some((scheme, _))
                        if !scheme.is_empty()
                            && scheme.len() <= 16
                            && scheme
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'+') =>
                    {
                        ConfigError::hidden("url", format!("{expected}, not {scheme}://"))
                    }
                    _ => ConfigError::hidden("url", expected),
                }
            })?;
        if let Some(at) = url.find(|c: char| c.is_control()) {
            return Err(ConfigError::hidden(
                "url",
                format!(
                    "holds a control character at byte {at} (a line end read from a file?); remove it, or percent-encode it"
                ),
            ));
        }
        // The body: up to the first `/` (the database) or `?` (the parameters).
        let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        if tail.contains('@') {
            return Err(if authority.contains('@') {
                ConfigError::hidden(
                    "url",
                    "an unencoded `@` after the host: write `@` in a database name or parameter value as %40; if this is a second URL, separate URLs with whitespace or commas",
                )
            } else {
                ConfigError::hidden(
                    "userinfo",
                    "the password (or user) seems to contain a reserved character such as `/` or `?`; percent-encode it (`/` is %2F, `?` is %3F, `@` is %40, `:` is %3A)",
                )
            });
        }
        let (path, query) = match tail.strip_prefix('/') {
            Some(t) => match t.split_once('?') {
                Some((p, q)) => (Some(p), Some(q)),
                None => (Some(t), None),
            },
            None => (None, tail.strip_prefix('?')),
        };
        // The userinfo ends at the body's last `@` (a password's `@` may be left unencoded).
        let (userinfo, hostlist) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let mut target = ConnectTarget {
            hosts: Vec::new(),
            user: None,
            password: None,
            dbname: None,
            params: Params::default(),
        };
        if let Some(ui) = userinfo {
            let (u, p) = match ui.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (ui, None),
            };
            if !u.is_empty() {
                let user = decode(u, "user", false)?;
                check_name("user", &user)?;
                target.user = Some(user);
            }
            if let Some(p) = p {
                let password = decode(p, "password", true)?;
                check_password(&password)?;
                target.password = Some(Secret::new(password));
            }
        }
        let mut hosts: Vec<(Option<Host>, Option<u16>)> = Vec::new();
        if !hostlist.is_empty() {
            for part in hostlist.split(',') {
                hosts.push(parse_host_port(part)?);
            }
        }
        if let Some(p) = path.filter(|p| !p.is_empty()) {
            let dbname = decode(p, "dbname", false)?;
            check_name("dbname", &dbname)?;
            target.dbname = Some(dbname);
        }

        let mut params = Params::default();
        let mut host_param: Option<Vec<Host>> = None;
        let mut port_param: Option<Vec<u16>> = None;
        if let Some(q) = query {
            let mut seen = BTreeSet::new();
            for pair in q.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let key = match decode(k, "url parameter", true) {
                    Ok(key) if name_like(&key) => key,
                    _ => {
                        return Err(ConfigError::hidden(
                            "url parameter",
                            "a parameter name that is not a name (ASCII letters, digits and `_`); it is not shown",
                        ));
                    }
                };
                if !pair.contains('=') {
                    return Err(ConfigError::hidden(key, "URL parameter has no `=value`"));
                }
                if !URL_PARAMS.contains(&key.as_str()) {
                    return Err(ConfigError::hidden(
                        key,
                        format!(
                            "unknown URL parameter (its value is not shown); supported: {}",
                            URL_PARAMS.join(", ")
                        ),
                    ));
                }
                let secret = key == "password";
                let value = decode(v, &key, secret)?;
                if !seen.insert(key.clone()) {
                    let e = ConfigError::new(key.as_str(), value, "parameter given twice");
                    return Err(if secret { e.without_value() } else { e });
                }
                known_param(
                    &key,
                    value,
                    &mut params,
                    &mut target,
                    &mut host_param,
                    &mut port_param,
                )?;
            }
        }
        if let Some(hp) = host_param {
            if !hosts.is_empty() {
                return Err(ConfigError::hidden(
                    "host",
                    "hosts given both in the URL's body and as a `host` parameter; use one",
                ));
            }
            hosts = hp.into_iter().map(|h| (Some(h), None)).collect();
        }
        if let Some(ports) = port_param {
            if hosts.iter().any(|(_, p)| p.is_some()) {
                return Err(ConfigError::hidden(
                    "port",
                    "ports given both after the hosts and as a `port` parameter; use one",
                ));
            }
            if hosts.is_empty() {
                hosts = vec![(None, None); ports.len()];
            }
            if ports.len() == 1 {
                for h in &mut hosts {
                    h.1 = Some(ports[0]);
                }
            } else if ports.len() == hosts.len() {
                for (h, p) in hosts.iter_mut().zip(ports) {
                    h.1 = Some(p);
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
                (
                    h.unwrap_or_else(|| Host::Tcp("localhost".into())),
                    p.unwrap_or(5432),
                )
            })
            .collect();
        target.params = params;
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(url: &str) -> ConfigError {
        match url.parse::<ConnectTarget>() {
            Ok(t) => panic!("{url} parsed as {t}"),
            Err(e) => e,
        }
    }

    /// The error of `url`, checked not to show `secret` anywhere.
    fn err_hiding(url: &str, secret: &str) -> ConfigError {
        let e = err(url);
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains(secret), "{url}: {shown}");
        e
    }

    #[test]
    fn values_of_unknown_and_secret_parameters_are_never_shown() {
        for name in ["sslpassword", "passwd", "pass", "pwd", "secret", "colour"] {
            let e = err_hiding(&format!("postgres://u@h/db?{name}=hunter2"), "hunter2");
            assert_eq!(e.field, name);
            assert!(e.reason.starts_with("unknown URL parameter"), "{e}");
            assert!(e.value.is_empty(), "{e}");
        }
        let e = err_hiding(
            "postgres://u@h/db?password=hunter2&password=hunter2",
            "hunter2",
        );
        assert_eq!(e.field, "password");
        let e = err_hiding("postgres://u:pw@h/db?password=hunter2", "hunter2");
        assert_eq!(e.field, "password");
        err_hiding("postgres://u@h/db?password=hunter2%zz", "hunter2");
        err_hiding("postgres://u@h/db?password=hunter2%00", "hunter2");
        err_hiding("postgres://u:hunter2%00@h/db", "hunter2");
        // A parameter "name" that is not a name may be a piece of a password.
        let e = err_hiding("postgres://u@h/db?hunter2%zz=1", "hunter2");
        assert_eq!(e.field, "url parameter");
        err_hiding("postgres://u@h/db?hunter2!", "hunter2");
    }

    #[test]
    fn a_password_with_an_unencoded_reserved_character_is_named_not_shown() {
        for url in [
            "postgres://u:ab/cdhunter2@h/db",
            "postgres://u:hunter2/cd@h/db",
            "postgres://u:hunter2?cd@h/db",
            "postgres://u:12/hunter2@h/db",
            "postgres://u:12?x=hunter2@h/db",
            "postgres://u:12?application_name=hunter2@h/db",
            "postgres://u:hunter2/x?y@h:5432/db?sslmode=disable",
            "postgres://us/er:hunter2@h/db",
        ] {
            let e = err_hiding(url, "hunter2");
            assert_eq!(e.field, "userinfo", "{url}: {e}");
            assert!(e.reason.contains("percent-encode"), "{e}");
            assert!(e.value.is_empty(), "{e}");
        }
        // The encoded forms parse.
        let t: ConnectTarget = "postgres://u:ab%2Fcd%3Fef@h/db".parse().unwrap();
        assert_eq!(t.password.unwrap().expose(), "ab/cd?ef");
        // An `@` after the host, when the body has its own userinfo: two URLs run together.
        let e = err_hiding("postgres://u:pw@h/db;postgres://u:hunter2@r2/db", "hunter2");
        assert_eq!(e.field, "url");
        // Without `@` at all, text after `:` that is not a port is not shown either.
        let e = err_hiding("postgres://user:hunter2/db", "hunter2");
        assert_eq!(e.field, "port");
    }

    #[test]
    fn names_are_refused_with_nul_bytes_credential_shapes_or_over_the_limit() {
        for (url, field) in [
            ("postgres://u%00x@h/db", "user"),
            ("postgres://u@h/d%00b", "dbname"),
            (
                "postgres://u@h/db?application_name=a%00b",
                "application_name",
            ),
            ("postgres://h/db?user=a%0Ab", "user"),
            ("postgres://h/db?options=-c%00x", "options"),
        ] {
            assert_eq!(err(url).field, field, "{url}");
        }
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert_eq!(err(&format!("postgres://u@h/{long}")).field, "dbname");
        assert_eq!(err(&format!("postgres://{long}@h/db")).field, "user");
        let e = err(&format!("postgres://u@h/db?application_name={long}"));
        assert!(e.reason.contains("63 bytes"), "{e}");
        let exact = "é".repeat(31); // 62 bytes
        let t: ConnectTarget = format!("postgres://u@h/{}", encode(&exact))
            .parse()
            .unwrap();
        assert_eq!(t.dbname(), Some(exact.as_str()));
        let e = err_hiding(
            "postgres://u@h/db?dbname=postgres%3A%2F%2Fu%3Ahunter2%40r2%2Fdb",
            "hunter2",
        );
        assert_eq!(e.field, "dbname");
        let e = err_hiding("postgres://u@h/x%40hunter2%3Ay", "hunter2");
        assert_eq!(e.field, "dbname");
        // `@` alone is a legal name (Azure-style users), when encoded.
        let t: ConnectTarget = "postgres://app%40server:pw@h/db".parse().unwrap();
        assert_eq!(t.user(), Some("app@server"));
        let e = err(&format!(
            "postgres://u@h/db?options={}",
            "x".repeat(MAX_OPTIONS_LEN + 1)
        ));
        assert_eq!(e.field, "options");
        assert!(e.value.chars().count() <= ConfigError::MAX_SHOWN + 1, "{e}");
        assert_eq!(
            err(&format!("postgres://u@h/{}", "x".repeat(MAX_URL_LEN))).field,
            "url"
        );
    }

    #[test]
    fn hosts_follow_libpq_grammar() {
        for (url, field, hint) in [
            ("postgres://u@fe80::1/db", "host", "brackets"),
            ("postgres://u@::1:5432/db", "host", "brackets"),
            (
                "postgres://u@127.0.0.1:5432:5433/db",
                "host",
                "more than one",
            ),
            ("postgres://u@[zz::1]/db", "host", "not an IPv6"),
            ("postgres://u@[]/db", "host", "not an IPv6"),
            ("postgres://u@[::1]x/db", "host", "after `]`"),
            ("postgres://u@[::1]:/db", "port", "port number"),
            ("postgres://u@h:-1/db", "port", "negative"),
            ("postgres://u@h:+5432/db", "port", "port number"),
            ("postgres://u@h:65536/db", "port", "port number"),
            (
                "postgres://u@h:99999999999999999999/db",
                "port",
                "too large",
            ),
            ("postgres://u@h%C3%A4st.example/db", "host", "non-ASCII"),
            ("postgres://u@häst.example/db", "host", "non-ASCII"),
            ("postgres://u@h%00x/db", "host", "not a host name"),
            ("postgres://u@h/db?host=a,,b", "host", "empty host"),
            ("postgres://u@h/db?host=%2Frun%00", "host", "NUL"),
        ] {
            let e = err(url);
            assert_eq!(e.field, field, "{url}: {e}");
            assert!(e.reason.contains(hint), "{url}: {e}");
        }
        let t: ConnectTarget = "postgres://u@[::1]:5433,[fe80::1%25eth0],127.0.0.1:1/db"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.hosts[0], (Host::Tcp("::1".into()), 5433));
        let t: ConnectTarget = "postgres://u@[fe80::1%eth0]/db".parse().unwrap();
        assert_eq!(t.hosts[0], (Host::Tcp("fe80::1%eth0".into()), 5432));
        let t: ConnectTarget = "postgres://u@/db?host=::1&port=5433".parse().unwrap();
        assert_eq!(t.hosts[0], (Host::Tcp("::1".into()), 5433));
    }

    #[test]
    fn duplicate_and_conflicting_parameters_are_refused() {
        for (url, field) in [
            (
                "postgres://u@h/db?sslmode=disable&sslmode=require",
                "sslmode",
            ),
            ("postgres://u@h/db?host=h2", "host"),
            ("postgres://u@h:5432/db?port=5433", "port"),
            ("postgres://u@h/db?user=v", "user"),
            ("postgres://u@h/db?dbname=other", "dbname"),
            ("postgres://u@h/db?user=", "user"),
            ("postgres://u@h/db?connect_timeout=-1", "connect_timeout"),
            ("postgres://u@h/db?connect_timeout=1.5", "connect_timeout"),
            (
                "postgres://u@h/db?connect_timeout=99999999999999999999",
                "connect_timeout",
            ),
            ("postgres://u@h/db?sslrootcert=", "sslrootcert"),
            ("postgres://u@h/db?sslmode", "sslmode"),
        ] {
            assert_eq!(err(url).field, field, "{url}");
        }
    }

    #[test]
    fn pg_auto_failover_formation_uris_parse_as_printed() {
        // What `pg_autoctl show uri --formation default` prints with its own CA
        // (`--ssl-ca-file`), with `--ssl-self-signed` and with `--no-ssl`: no user,
        // two hosts in the monitor's order, read-write.
        let ca = "postgres://127.0.0.1:40719,127.0.0.1:42087/railyard?target_session_attrs=read-write&sslmode=verify-full&sslrootcert=/tmp/railyard-ha-0/ca.crt";
        let t: ConnectTarget = ca.parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            t.hosts(),
            [
                (Host::Tcp("127.0.0.1".into()), 40719),
                (Host::Tcp("127.0.0.1".into()), 42087)
            ]
        );
        assert_eq!(t.user(), None);
        assert_eq!(t.dbname(), Some("railyard"));
        assert_eq!(
            t.target_session_attrs(),
            Some(TargetSessionAttrs::ReadWrite)
        );
        assert_eq!(t.ssl_mode(), Some(SslMode::VerifyFull));
        assert_eq!(
            t.ssl_root_cert(),
            Some(std::path::Path::new("/tmp/railyard-ha-0/ca.crt"))
        );
        for (uri, mode) in [
            (
                "postgres://127.0.0.1:5501,127.0.0.1:5502/railyard?target_session_attrs=read-write&sslmode=require",
                SslMode::Require,
            ),
            (
                "postgres://127.0.0.1:5501,127.0.0.1:5502/railyard?target_session_attrs=read-write&sslmode=prefer",
                SslMode::Prefer,
            ),
        ] {
            let t: ConnectTarget = uri.parse().unwrap_or_else(|e| panic!("{uri}: {e}"));
            assert_eq!(t.ssl_mode(), Some(mode), "{uri}");
            assert_eq!(t.hosts().len(), 2, "{uri}");
        }
        // The application adds its role and password; the URL keeps the rest.
        let with = t
            .with_user("railyard")
            .with_password(Some(Secret::new("pw")));
        assert!(with.check().is_ok());
        let again: ConnectTarget = with.expose_url().parse().unwrap();
        assert_eq!(again, with);
    }

    #[test]
    fn control_characters_and_bad_schemes_show_nothing() {
        let e = err_hiding("postgres://u:hunter2@h/db\n", "hunter2");
        assert_eq!(e.field, "url");
        let e = err_hiding("postgres://u:hunter2@h/d\0b", "hunter2");
        assert_eq!(e.field, "url");
        let e = err_hiding("mysql://u:hunter2@h/db", "hunter2");
        assert!(e.reason.contains("mysql://"), "{e}");
        err_hiding("u:hunter2@h/x://y", "hunter2");
        err_hiding("hunter2", "hunter2");
    }
}
