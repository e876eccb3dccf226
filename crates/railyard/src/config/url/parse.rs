//! Parsing a `postgres://` URL into a [`ConnectTarget`], as named steps:
//! split the URL, read the userinfo, the hosts, the database and the
//! parameters, then merge the `host` and `port` parameters into the hosts.

use super::check::*;
use super::*;

/// One entry of the URL body's host list: `name`, `name:port`, `[ipv6]`,
/// `[ipv6]:port`, `:port` or a percent-encoded socket directory.
pub(super) fn parse_host_port(part: &str) -> Result<(Option<Host>, Option<u16>), ConfigError> {
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
// Over 80 lines: one arm per URL parameter, the grammar in one place.
// Long by design: one arm per connection parameter.
pub(super) fn known_param(
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
pub(super) fn parse_seconds(key: &str, value: &str) -> Result<u64, ConfigError> {
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
        Ok(n) if n <= super::super::MAX_DURATION.as_secs() => Ok(n),
        _ => Err(ConfigError::new(
            key,
            value,
            format!(
                "too large, at most {} seconds (ten years)",
                super::super::MAX_DURATION.as_secs()
            ),
        )),
    }
}

/// The hosts of the URL's body, each with its port when one was given.
type HostList = Vec<(Option<Host>, Option<u16>)>;

/// The URL's parts: the body (userinfo and host list), the path (the
/// database) and the query (the parameters). Refuses a URL that is too long,
/// has another scheme, holds a control character, or an `@` after the body.
fn split_url(url: &str) -> Result<(&str, Option<&str>, Option<&str>), ConfigError> {
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
    let rest = strip_scheme(url)?;
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
    Ok((authority, path, query))
}

/// The URL after `postgres://` or `postgresql://`; another scheme is named
/// when it looks like one.
fn strip_scheme(url: &str) -> Result<&str, ConfigError> {
    url.strip_prefix("postgres://")
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
        })
}

/// The user and password of the userinfo (`user:password`).
fn parse_userinfo(ui: &str, target: &mut ConnectTarget) -> Result<(), ConfigError> {
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
    Ok(())
}

/// The query's parameters: each a known name, given once, with a value.
fn parse_query(
    q: &str,
    params: &mut Params,
    target: &mut ConnectTarget,
    host_param: &mut Option<Vec<Host>>,
    port_param: &mut Option<Vec<u16>>,
) -> Result<(), ConfigError> {
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
        known_param(&key, value, params, target, host_param, port_param)?;
    }
    Ok(())
}

/// The body's hosts with the `host` and `port` parameters: hosts from one
/// place, ports from one place (one for all, or one per host).
fn merge_host_params(
    mut hosts: HostList,
    host_param: Option<Vec<Host>>,
    port_param: Option<Vec<u16>>,
) -> Result<HostList, ConfigError> {
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
    Ok(hosts)
}

impl FromStr for ConnectTarget {
    type Err = ConfigError;

    fn from_str(url: &str) -> Result<Self, ConfigError> {
        let (authority, path, query) = split_url(url)?;
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
            parse_userinfo(ui, &mut target)?;
        }
        let mut hosts: HostList = Vec::new();
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
            parse_query(
                q,
                &mut params,
                &mut target,
                &mut host_param,
                &mut port_param,
            )?;
        }
        let mut hosts = merge_host_params(hosts, host_param, port_param)?;
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
