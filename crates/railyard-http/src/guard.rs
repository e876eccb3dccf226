//! Who may reach the endpoints.
//!
//! - **A Host allow-list**, against DNS rebinding: a page on another site
//!   can make a browser send requests to a loopback or private address under
//!   the attacker's own name, so a request naming a host that is not an IP
//!   address, `localhost` (or a `*.localhost` name) or a name listed in
//!   `RAILYARD_HTTP_HOSTS` (comma-separated) is answered 421 before any
//!   route runs. Probes that name the address (a load balancer, Kubernetes)
//!   pass; a service reached by a public name lists it.
//! - **A bearer token for what changes state** ([`ControlToken`]): the alert
//!   controls answer 401 without `Authorization: Bearer <token>`, compared in
//!   constant time (`subtle`, the comparison rustls's stack already uses),
//!   and 403 when no token is configured.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use railyard::config::Secret;
use railyard::error::ConfigError;

/// The variable naming the extra host names requests may carry.
pub const HOSTS_VAR: &str = "RAILYARD_HTTP_HOSTS";
/// The variable naming the file that holds the control token.
pub const TOKEN_FILE_VAR: &str = "RAILYARD_HTTP_TOKEN_FILE";
/// The shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// The host names (beyond IP addresses and `localhost`) requests may name.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hosts(Arc<Vec<String>>);

impl Hosts {
    /// From `RAILYARD_HTTP_HOSTS`, read once when a router is built.
    pub(crate) fn from_env() -> Self {
        let names = std::env::var(HOSTS_VAR)
            .unwrap_or_default()
            .split(',')
            .map(|n| n.trim().to_ascii_lowercase())
            .filter(|n| !n.is_empty())
            .take(64)
            .collect();
        Hosts(Arc::new(names))
    }

    fn allows(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        // Strip a port: `name:8080`, `[::1]:8080`, `1.2.3.4:80`.
        let name = if let Some(rest) = host.strip_prefix('[') {
            rest.split(']').next().unwrap_or("")
        } else if host.matches(':').count() == 1 {
            host.split(':').next().unwrap_or("")
        } else {
            host.as_str()
        };
        name.parse::<IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || self.0.iter().any(|n| n == name)
    }
}

/// Answers 421 to a request whose `Host` is a name not allowed.
pub(crate) async fn check_host(
    State(hosts): State<Hosts>,
    request: Request,
    next: Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().host().map(str::to_owned));
    match host {
        Some(h) if !hosts.allows(&h) => (
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "this server answers to IP addresses, localhost and the names in {HOSTS_VAR}\n"
            ),
        )
            .into_response(),
        _ => next.run(request).await,
    }
}

/// The bearer token the state-changing endpoints require.
///
/// ```
/// use railyard::config::Secret;
/// let token = railyard_http::ControlToken::new(Secret::new("a-long-random-token-1234")).unwrap();
/// assert!(!format!("{token:?}").contains("a-long"));
/// assert!(railyard_http::ControlToken::new(Secret::new("short")).is_err());
/// ```
#[derive(Clone)]
pub struct ControlToken(Arc<Secret>);

impl std::fmt::Debug for ControlToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlToken(***)")
    }
}

impl ControlToken {
    /// A token of at least [`MIN_TOKEN_LEN`] bytes, no whitespace.
    pub fn new(token: Secret) -> Result<Self, ConfigError> {
        let t = token.expose();
        if t.len() < MIN_TOKEN_LEN || t.chars().any(char::is_whitespace) {
            return Err(ConfigError::new(
                "ControlToken::new",
                "",
                format!("use at least {MIN_TOKEN_LEN} characters and no whitespace"),
            ));
        }
        Ok(ControlToken(Arc::new(token)))
    }

    /// The token in the file `RAILYARD_HTTP_TOKEN_FILE` names (its first
    /// line); `None` when the variable is unset or empty.
    pub fn from_env() -> Result<Option<Self>, ConfigError> {
        match std::env::var_os(TOKEN_FILE_VAR) {
            Some(p) if !p.is_empty() => Self::from_file(Path::new(&p)).map(Some),
            _ => Ok(None),
        }
    }

    fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::new(TOKEN_FILE_VAR, "", why);
        let meta = std::fs::metadata(path)
            .map_err(|e| bad(format!("cannot read the token file: {}", e.kind())))?;
        if !meta.is_file() || meta.len() > 4096 {
            return Err(bad(
                "the token file must be a regular file of at most 4 KiB".into(),
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("cannot read the token file: {}", e.kind())))?;
        let line = text.lines().next().unwrap_or("").trim().to_owned();
        Self::new(Secret::new(line)).map_err(|e| bad(e.reason))
    }

    fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.expose().as_bytes().ct_eq(presented).into()
    }
}

/// Lets a request through only with the control token.
pub(crate) async fn require_token(
    State(token): State<Option<ControlToken>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = token else {
        return (
            StatusCode::FORBIDDEN,
            format!("the alert controls are off: start the server with {TOKEN_FILE_VAR} naming a token file\n"),
        )
            .into_response();
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        // The scheme's name is case-insensitive (RFC 9110 §11.1).
        .and_then(|h| {
            h.get(..7)
                .filter(|s| s.eq_ignore_ascii_case("bearer "))
                .map(|_| &h[7..])
        })
        .map(str::trim);
    match presented {
        Some(p) if token.matches(p.as_bytes()) => next.run(request).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "this endpoint needs Authorization: Bearer <the control token>\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_localhost_pass_other_names_only_when_listed() {
        let hosts = Hosts(Arc::new(vec!["ops.example".into()]));
        for ok in [
            "127.0.0.1:9187",
            "10.0.0.5",
            "[::1]:80",
            "::1",
            "localhost:9187",
            "app.localhost",
            "OPS.example:443",
        ] {
            assert!(hosts.allows(ok), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:9187",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "",
        ] {
            assert!(!hosts.allows(refused), "{refused}");
        }
    }
}
