//! The URL parser's and printer's tests.

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
