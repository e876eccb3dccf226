//! The checks of a URL's parts, shared with the environment parser: names,
//! passwords, options, paths, time zones, ports and hosts, and the
//! percent-encoding of the parts.

use super::*;

/// Bytes kept as they are in URL parts: RFC 3986's unreserved set, and `/`.
pub(super) const URL_PART: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

pub(super) fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, URL_PART).to_string()
}

/// Percent-decodes `s`; `field` and `secret` shape the error. The check for
/// malformed escapes is ours: the codec passes them through unchanged, and a
/// password with a stray `%` must be refused, not guessed at. A secret's text
/// is never part of the error.
pub(super) fn decode(s: &str, field: &str, secret: bool) -> Result<String, ConfigError> {
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
pub(super) fn name_like(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether a name has the shape of a URL or of `user:password@host`: it holds
/// `://`, or an `@` together with a `:` or a `/`. Such a name comes from a
/// separator or a reserved character that went wrong, and the server would
/// echo it (password included) in its errors.
pub(super) fn looks_like_credentials(s: &str) -> bool {
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
pub(super) fn check_password(value: &str) -> Result<(), ConfigError> {
    if value.contains('\0') {
        return Err(ConfigError::hidden(
            "password",
            "holds a NUL byte (%00), which a password cannot contain",
        ));
    }
    Ok(())
}

/// Checks the `options` parameter.
pub(super) fn check_options(value: &str) -> Result<(), ConfigError> {
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
pub(super) fn parse_port(p: &str, field: &str, in_body: bool) -> Result<u16, ConfigError> {
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
pub(super) fn check_tcp_host(field: &str, h: &str) -> Result<(), ConfigError> {
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
pub(super) fn is_ipv6(h: &str) -> bool {
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
pub(super) fn host_from(field: &str, h: String) -> Result<Host, ConfigError> {
    if h.starts_with('/') {
        check_path(field, &h)?;
        Ok(Host::Unix(PathBuf::from(h)))
    } else {
        check_tcp_host(field, &h)?;
        Ok(Host::Tcp(h))
    }
}
