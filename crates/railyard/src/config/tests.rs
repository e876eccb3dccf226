//! The configuration's tests: Debian's program directories, URLs and
//! their printing.

use super::url::Params;
use super::*;
use proptest::prelude::*;

#[test]
fn postgresql_versions_are_ordered_by_number_newest_first() {
    let dirs =
        ["9.6", "15", "common", "16", "10"].map(|v| PathBuf::from("/usr/lib/postgresql").join(v));
    let bins: Vec<String> = newest_first(dirs.into_iter())
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    assert_eq!(
        bins,
        ["16", "15", "10", "9.6"].map(|v| format!("/usr/lib/postgresql/{v}/bin"))
    );
}

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

fn arb_text() -> impl Strategy<Value = String> {
    // Any printable text, including URL metacharacters, to exercise the encoder.
    proptest::string::string_regex("[ -~é€]{1,16}").unwrap()
}

fn arb_name() -> impl Strategy<Value = String> {
    // Names the parser accepts: no control character, no credential shape.
    arb_text().prop_filter("not credential-shaped", |s| {
        !(s.contains("://") || (s.contains('@') && s.contains([':', '/'])))
    })
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
        proptest::option::of(arb_name()),
        mode,
        tsa,
        proptest::option::of(arb_name()),
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
}
