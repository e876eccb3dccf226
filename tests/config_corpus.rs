//! A corpus of hostile configurations, none of which needs a server: each must
//! be refused by `Config::from_vars` with an error naming the variable or URL
//! part the user typed, showing the value only when it is not secret, and
//! never panicking. A subset goes through the `railyard` binary, which parses
//! its configuration before connecting anywhere: it must exit non-zero, name
//! the variable on stderr, and show no password.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::Command;

use railyard::Config;
use railyard::error::ConfigError;

/// The password of every URL below: no error may show it.
const MARK: &str = "Zx9pWmarkQ7";

/// Port 1 on loopback: should a hostile value get through, the binary fails
/// fast instead of waiting on a network.
fn base() -> String {
    format!("postgres://app:{MARK}@127.0.0.1:1/ledger")
}

/// What an error may show of the value.
#[derive(Debug, Clone)]
enum Shown {
    /// Nothing: the value is or may hold a secret.
    Nothing,
    /// Exactly this.
    Exactly(String),
    /// Whatever, as long as the password is absent.
    Any,
}

#[derive(Debug, Clone)]
struct Case {
    vars: Vec<(String, String)>,
    field: String,
    shown: Shown,
    /// Words the reason must contain.
    reason: Option<&'static str>,
}

fn case(vars: &[(&str, &str)], field: &str) -> Case {
    Case {
        vars: vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        field: field.to_owned(),
        shown: Shown::Any,
        reason: None,
    }
}

impl Case {
    fn hidden(mut self) -> Self {
        self.shown = Shown::Nothing;
        self
    }
    fn shows(mut self, v: &str) -> Self {
        self.shown = Shown::Exactly(v.to_owned());
        self
    }
    fn says(mut self, r: &'static str) -> Self {
        self.reason = Some(r);
        self
    }
}

/// A case with `DATABASE_URL` set to `url`.
fn url(url: &str, field: &str) -> Case {
    case(&[("DATABASE_URL", url)], &format!("DATABASE_URL ({field})"))
}

/// A case with a good `DATABASE_URL` and one more variable.
fn var(key: &str, value: &str) -> Case {
    case(&[("DATABASE_URL", &base()), (key, value)], key)
}

fn corpus() -> Vec<Case> {
    let b = base();
    let m = MARK;
    let big = "x".repeat(100_000);
    let digits = "9".repeat(100_000);
    let mut c = vec![
        // Secrets in parameters: the name is enough.
        url(&format!("{b}?sslpassword={m}"), "sslpassword").hidden(),
        url(&format!("{b}?passwd={m}"), "passwd").hidden(),
        url(&format!("{b}?pass={m}"), "pass").hidden(),
        url(&format!("{b}?pwd={m}&sslmode=disable"), "pwd").hidden(),
        url(&format!("{b}?sslkey={m}"), "sslkey").hidden(),
        url(&format!("{b}?password={m}"), "password")
            .hidden()
            .says("use one"),
        url(
            &format!("postgres://app@127.0.0.1:1/db?password={m}&password={m}"),
            "password",
        )
        .hidden()
        .says("twice"),
        url(
            &format!("postgres://app@127.0.0.1:1/db?password={m}%zz"),
            "password",
        )
        .hidden(),
        url(
            &format!("postgres://app@127.0.0.1:1/db?password={m}%00"),
            "password",
        )
        .hidden(),
        url(&format!("postgres://app:{m}%zz@127.0.0.1:1/db"), "password").hidden(),
        url(&format!("postgres://app:{m}%FF@127.0.0.1:1/db"), "password").hidden(),
        url(&format!("postgres://app:{m}%00@127.0.0.1:1/db"), "password").hidden(),
        // Passwords with unencoded reserved characters.
        url(&format!("postgres://app:ab/{m}@127.0.0.1:1/db"), "userinfo")
            .hidden()
            .says("percent-encode"),
        url(&format!("postgres://app:{m}/cd@127.0.0.1:1/db"), "userinfo").hidden(),
        url(&format!("postgres://app:{m}?cd@127.0.0.1:1/db"), "userinfo").hidden(),
        url(&format!("postgres://app:12/{m}@127.0.0.1:1/db"), "userinfo").hidden(),
        url(
            &format!("postgres://app:12?x={m}@127.0.0.1:1/db"),
            "userinfo",
        )
        .hidden(),
        url(
            &format!("postgres://app:12?application_name={m}@127.0.0.1:1/db"),
            "userinfo",
        )
        .hidden(),
        url(&format!("postgres://app:{m}/db"), "port").hidden(),
        url(&format!("postgres://app:{m}"), "port").hidden(),
        // Two URLs run together, or a URL for a name.
        url(&format!("{b};postgres://app:{m}@r2/db"), "url").hidden(),
        url(&format!("{b}|postgres://app:{m}@r2/db"), "url").hidden(),
        url(
            &format!("{b}?sslmode=disable;postgres://app:{m}@r2/db"),
            "url",
        )
        .hidden(),
        url(
            &format!("postgres://app:{m}@127.0.0.1:1/postgres%3A%2F%2Fu%3Ax%40r2%2Fdb"),
            "dbname",
        )
        .hidden(),
        url(
            &format!("{b}?application_name=u%3Ax%40r2%2Fdb"),
            "application_name",
        )
        .hidden(),
        url(&format!("{b}x;postgres://r2/db"), "dbname").hidden(),
        // Ports.
        url(&format!("postgres://app:{m}@h:0/db"), "port").shows("0"),
        url(&format!("postgres://app:{m}@h:65536/db"), "port").shows("65536"),
        url(&format!("postgres://app:{m}@h:-1/db"), "port")
            .shows("-1")
            .says("negative"),
        url(&format!("postgres://app:{m}@h:abc/db"), "port").hidden(),
        url(
            &format!("postgres://app:{m}@h:99999999999999999999/db"),
            "port",
        )
        .says("too large"),
        url(&format!("postgres://app:{m}@h:/db"), "port").hidden(),
        url(&format!("postgres://app:{m}@h:+5432/db"), "port").hidden(),
        url(&format!("postgres://app:{m}@h:5432:5433/db"), "host").says("brackets"),
        url(&format!("postgres://app:{m}@h/db?port=0"), "port").shows("0"),
        url(&format!("postgres://app:{m}@h/db?port=x"), "port").shows("x"),
        url(&format!("postgres://app:{m}@h1,h2/db?port=1,2,3"), "port"),
        url(
            &format!("postgres://app:{m}@h:{}/db", &digits[..1000]),
            "port",
        ),
        // IPv6.
        url(&format!("postgres://app:{m}@fe80::1/db"), "host").says("brackets"),
        url(&format!("postgres://app:{m}@::1:5432/db"), "host").says("brackets"),
        url(&format!("postgres://app:{m}@[::1/db"), "host"),
        url(&format!("postgres://app:{m}@[zz::1]/db"), "host"),
        url(&format!("postgres://app:{m}@[]/db"), "host"),
        url(&format!("postgres://app:{m}@[::1]x/db"), "host"),
        url(&format!("postgres://app:{m}@[::1]:99999/db"), "port"),
        url(&format!("postgres://app:{m}@[127.0.0.1]/db"), "host"),
        // NUL bytes and control characters.
        url(&format!("postgres://a%00pp:{m}@h/db"), "user").says("control character"),
        url(&format!("postgres://app:{m}@h/le%00dger"), "dbname"),
        url(&format!("{b}?application_name=a%00b"), "application_name"),
        url(&format!("{b}?options=-c%00x"), "options"),
        url(&format!("postgres://app:{m}@h%00x/db"), "host"),
        url(&format!("{b}?sslrootcert=%2Fca%00.pem"), "sslrootcert"),
        url(&format!("postgres://app:{m}@h/le%0Adger"), "dbname"),
        url(&format!("{b}\n"), "url").hidden(),
        url(&format!("{b}\t"), "url").hidden(),
        // 100 KB values.
        url(&format!("postgres://app:{m}@h/{big}"), "url")
            .hidden()
            .says("longer than"),
        url(&format!("postgres://app:{m}@h/{}", &big[..1000]), "dbname").says("63 bytes"),
        url(
            &format!("{b}?application_name={}", &big[..64]),
            "application_name",
        )
        .says("63 bytes"),
        url(&format!("postgres://{}:{m}@h/db", &big[..64]), "user"),
        url(&format!("postgres://app:{m}@{}/db", &big[..300]), "host"),
        url(&format!("{b}?options={}", &big[..9000]), "options"),
        url(&format!("postgres://app:{m}{big}@h/db"), "url").hidden(),
        // Unknown parameters.
        url(&format!("{b}?colour=blue"), "colour").hidden(),
        url(&format!("{b}?sslcert=/x.pem"), "sslcert").hidden(),
        url(&format!("{b}?keepalives=1"), "keepalives").hidden(),
        url(&format!("{b}?SSLMODE=disable"), "SSLMODE").hidden(),
        url(&format!("{b}?sslmode"), "sslmode").says("no `=value`"),
        url(&format!("{b}?%zz=1"), "url parameter").hidden(),
        // Bad percent-encoding.
        url(&format!("postgres://app:{m}@h/db%zz"), "dbname").says("percent"),
        url(&format!("postgres://app:{m}@h/db%C3"), "dbname").says("UTF-8"),
        url(&format!("postgres://a%pp:{m}@h/db"), "user"),
        url(&format!("postgres://app:{m}@h%2/db"), "host"),
        url(&format!("{b}?application_name=%G1"), "application_name"),
        // Unicode hosts.
        url(&format!("postgres://app:{m}@häst.example/db"), "host").says("non-ASCII"),
        url(&format!("postgres://app:{m}@h%C3%A4st/db"), "host").says("non-ASCII"),
        url(&format!("postgres://app:{m}@🐘/db"), "host"),
        // Separators inside the host list.
        url(&format!("postgres://app:{m}@h1,,h2/db"), "host"),
        url(&format!("postgres://app:{m}@h1;h2/db"), "host"),
        url(&format!("postgres://app:{m}@h1 h2/db"), "host"),
        url(&format!("{b}?host=a,,b"), "host"),
        // Duplicate or conflicting parameters.
        url(&format!("{b}?sslmode=disable&sslmode=require"), "sslmode").says("twice"),
        url(&format!("{b}?host=h2"), "host").says("use one"),
        url(&format!("{b}?port=5433"), "port").says("use one"),
        url(&format!("{b}?user=other"), "user").says("use one"),
        url(&format!("{b}?dbname=other"), "dbname").says("use one"),
        url(
            &format!("{b}?connect_timeout=3&connect_timeout=4"),
            "connect_timeout",
        ),
        // Other parameter values.
        url(&format!("{b}?sslmode=allow"), "sslmode"),
        url(&format!("{b}?sslmode=sometimes"), "sslmode").shows("sometimes"),
        url(
            &format!("{b}?target_session_attrs=writable"),
            "target_session_attrs",
        ),
        url(&format!("{b}?connect_timeout=0"), "connect_timeout"),
        url(&format!("{b}?connect_timeout=-1"), "connect_timeout").says("negative"),
        url(&format!("{b}?connect_timeout=1.5"), "connect_timeout"),
        url(
            &format!("{b}?connect_timeout=99999999999999999999"),
            "connect_timeout",
        ),
        url(&format!("{b}?sslrootcert="), "sslrootcert"),
        url(
            &format!("postgres://app:{m}@%2Ftmp/db?sslmode=require"),
            "sslmode",
        ),
        // Schemes.
        case(
            &[("DATABASE_URL", &format!("mysql://app:{m}@h/db"))],
            "DATABASE_URL (url)",
        )
        .hidden(),
        case(
            &[("DATABASE_URL", &format!("postgres:/app:{m}@h/db"))],
            "DATABASE_URL (url)",
        )
        .hidden(),
        case(
            &[("DATABASE_URL", &format!("app:{m}@h/db"))],
            "DATABASE_URL (url)",
        )
        .hidden(),
        case(&[("DATABASE_URL", "")], "DATABASE_URL").hidden(),
        case(&[("DATABASE_URL", "  ")], "DATABASE_URL").hidden(),
        case(
            &[
                ("RAILYARD_ENV", "production"),
                ("RAILYARD_POOL_MAX_SIZE", "3"),
            ],
            "DATABASE_URL",
        )
        .says("not set"),
        case(&[("RAILYARD_ENV", "staging")], "RAILYARD_ENV").shows("staging"),
        case(
            &[("RAILYARD_ENV", &format!("postgres://app:{m}@h/db"))],
            "RAILYARD_ENV",
        ),
        case(
            &[("DATABASE_REPLICA_URLS", &format!("postgres://app:{m}@r/db"))],
            "DATABASE_REPLICA_URLS",
        )
        .says("without DATABASE_URL"),
    ];
    // Replica lists: only whitespace and commas separate URLs.
    let r1 = format!("postgres://app:{m}@r1:5432/ledger");
    let r2 = format!("postgres://app:{m}@r2:5432/ledger");
    for sep in [";", "|", ";;", " ; ", "&", "+", "%20"] {
        let list = format!("{r1}{sep}{r2}");
        let field = if sep == " ; " {
            // A lone `;` between spaces is a word of its own: not a URL.
            "DATABASE_REPLICA_URLS (url)"
        } else {
            "DATABASE_REPLICA_URLS"
        };
        c.push(
            case(
                &[("DATABASE_URL", &b), ("DATABASE_REPLICA_URLS", &list)],
                field,
            )
            .hidden(),
        );
    }
    c.push(
        case(
            &[("DATABASE_URL", &b), ("DATABASE_REPLICA_URLS", &b)],
            "DATABASE_REPLICA_URLS",
        )
        .says("primary itself"),
    );
    c.push(
        case(
            &[
                ("DATABASE_URL", &b),
                ("DATABASE_REPLICA_URLS", &format!("{r1} {r1}")),
            ],
            "DATABASE_REPLICA_URLS (URL 2)",
        )
        .says("listed twice"),
    );
    c.push(case(
        &[
            ("DATABASE_URL", &b),
            (
                "DATABASE_REPLICA_URLS",
                &format!("postgres://app:{m}@r1:0/db"),
            ),
        ],
        "DATABASE_REPLICA_URLS (port)",
    ));
    c.push(
        case(
            &[
                ("DATABASE_URL", &b),
                (
                    "DATABASE_REPLICA_URLS",
                    &format!("{r1},postgres://app:{m}@r3/db?colour=x"),
                ),
            ],
            "DATABASE_REPLICA_URLS (colour)",
        )
        .hidden(),
    );
    // Every RAILYARD_* variable the configuration reads.
    for key in [
        "RAILYARD_POOL_MAX_SIZE",
        "RAILYARD_POOL_MIN_IDLE",
        "RAILYARD_REPLICA_POOL_MAX_SIZE",
    ] {
        for (v, why) in [
            ("-1", "must not be negative"),
            ("4294967295", "too large, at most 10000"),
            ("99999999999", "too large, at most 10000"),
            ("10001", "too large, at most 10000"),
            ("1.5", "expected a whole number"),
            ("ten", "expected a whole number"),
            ("5s", "expected a whole number"),
            ("", "empty"),
        ] {
            let c1 = var(key, v).says(why);
            c.push(if v.is_empty() {
                c1.hidden()
            } else {
                c1.shows(v)
            });
        }
        c.push(var(key, &digits).says("too large"));
    }
    c.push(
        var("RAILYARD_POOL_MAX_SIZE", "0")
            .shows("0")
            .says("at least 1"),
    );
    c.push(
        var("RAILYARD_REPLICA_POOL_MAX_SIZE", "0")
            .shows("0")
            .says("at least 1"),
    );
    c.push(
        var("RAILYARD_POOL_MIN_IDLE", "11")
            .shows("11")
            .says("maximum size 10 (RAILYARD_POOL_MAX_SIZE)"),
    );
    for (v, why) in [
        ("-1", "must not be negative"),
        ("0", "at least 1"),
        ("100001", "too large, at most 100000"),
        ("4294967295", "too large, at most 100000"),
        ("1.5", "expected a whole number"),
        ("many", "expected a whole number"),
    ] {
        c.push(var("RAILYARD_POOL_MAX_WAITERS", v).shows(v).says(why));
    }
    c.push(var("RAILYARD_POOL_MAX_WAITERS", &digits).says("too large"));
    c.push(
        var("RAILYARD_POOL_MAX_WAIT", "5s")
            .says("shorter than the checkout timeout of 5s (RAILYARD_CHECKOUT_TIMEOUT)"),
    );
    c.push(var("RAILYARD_POOL_MAX_WAIT", "0s").says("positive"));
    c.push(var("RAILYARD_SHUTDOWN_TIMEOUT", "0s").says("positive"));
    for key in [
        "RAILYARD_CONNECT_TIMEOUT",
        "RAILYARD_CHECKOUT_TIMEOUT",
        "RAILYARD_MIGRATION_LOCK_TIMEOUT",
        "RAILYARD_IDLE_TIMEOUT",
        "RAILYARD_MAX_LIFETIME",
        "RAILYARD_STATEMENT_TIMEOUT",
        "RAILYARD_POOL_MAX_WAIT",
        "RAILYARD_SHUTDOWN_TIMEOUT",
        "RAILYARD_WATCHDOG_CANCEL_AFTER",
        "RAILYARD_CAPTURE_PLANS_SLOWER_THAN",
    ] {
        for (v, why) in [
            ("-5s", "must not be negative"),
            ("5", "without a unit"),
            ("1.5", "without a unit"),
            ("5 parsecs", "unknown time unit"),
            ("5sec5", "unit"),
            ("99999999999999999999h", "too large"),
            ("11years", "too large"),
            ("", "empty"),
        ] {
            c.push(var(key, v).says(why));
        }
        c.push(var(key, &big).says("unit"));
    }
    c.push(
        var("RAILYARD_WATCHDOG_CANCEL_AFTER", "5ms")
            .shows("5ms")
            .says("shorter than 10ms"),
    );
    for (v, why) in [
        ("-1", "must not be negative"),
        ("0", "at least 2"),
        ("1", "at least 2"),
        ("100001", "too large, at most 100000"),
        ("4294967295", "too large, at most 100000"),
        ("2.5", "expected a whole number"),
        ("many", "expected a whole number"),
        ("", "empty"),
    ] {
        let c1 = var("RAILYARD_DETECT_REPEATS", v).says(why);
        c.push(if v.is_empty() {
            c1.hidden()
        } else {
            c1.shows(v)
        });
    }
    c.push(var("RAILYARD_DETECT_REPEATS", &digits).says("too large"));
    for key in [
        "RAILYARD_WATCHDOG_CANCEL_AFTER",
        "RAILYARD_CAPTURE_PLANS_SLOWER_THAN",
        "RAILYARD_DETECT_REPEATS",
    ] {
        c.push(var(key, &format!("postgres://app:{m}@h/db")).hidden());
    }
    c.push(var("RAILYARD_CONNECT_TIMEOUT", "0s").says("positive"));
    c.push(var("RAILYARD_CHECKOUT_TIMEOUT", "0ms").says("positive"));
    c.push(
        var("RAILYARD_STATEMENT_TIMEOUT", "500us")
            .shows("500us")
            .says("less than 1ms"),
    );
    c.push(
        var("RAILYARD_STATEMENT_TIMEOUT", "30days")
            .shows("30days")
            .says("too large"),
    );
    for v in [
        "",
        "a\u{1}b",
        &big,
        &format!("postgres://app:{m}@h/db"),
        &format!("app:{m}@h"),
    ] {
        c.push(var("RAILYARD_APPLICATION_NAME", v));
    }
    for v in ["", "allow", "verify_full", "REQUIRE"] {
        c.push(var("RAILYARD_SSLMODE", v));
    }
    for v in ["", &format!("postgres://app:{m}@h/db"), &"/x".repeat(3000)] {
        c.push(var("RAILYARD_SSLROOTCERT", v));
    }
    for v in ["", &format!("app:{m}@h")] {
        c.push(var("RAILYARD_PASSWORD_FILE", v));
    }
    for v in ["", "A=B", "1PW", &format!("app:{m}@h")] {
        c.push(var("RAILYARD_PASSWORD_ENV", v));
    }
    c.push(
        case(
            &[
                ("DATABASE_URL", &b),
                ("RAILYARD_PASSWORD_FILE", "/run/pw"),
                ("RAILYARD_PASSWORD_ENV", "PW"),
            ],
            "RAILYARD_PASSWORD_FILE",
        )
        .says("only one"),
    );
    for v in [
        "",
        "Europe/Paris'",
        "UTC\n",
        "\"UTC\"",
        "UTC\\",
        &"A".repeat(300),
        &format!("postgres://app:{m}@h/db"),
    ] {
        c.push(var("RAILYARD_TIME_ZONE", v));
    }
    for v in [
        "",
        "pgbouncer",
        "PgBouncer-Transaction",
        "transaction",
        "pgpool",
        &format!("postgres://app:{m}@h/db"),
    ] {
        c.push(var("RAILYARD_POOLER", v));
    }
    // The `options` startup parameter cannot pass through PgBouncer.
    c.push(
        case(
            &[
                (
                    "DATABASE_URL",
                    &format!("{b}?options=-c%20statement_timeout%3D5s"),
                ),
                ("RAILYARD_POOLER", "pgbouncer-transaction"),
            ],
            "DATABASE_URL (options)",
        )
        .says("PgBouncer refuses"),
    );
    c
}

/// Runs one case through the library.
fn check(case: &Case) -> ConfigError {
    let vars = case.vars.clone();
    let result = catch_unwind(AssertUnwindSafe(|| Config::from_vars(vars)))
        .unwrap_or_else(|_| panic!("parsing panicked: {case:?}"));
    let err = match result {
        Ok(c) => panic!("accepted: {:?} gave {c:?}", case.vars),
        Err(e) => e,
    };
    let shown = format!("{err} {err:?}");
    assert!(
        !shown.contains(MARK),
        "{:?}: showed the password: {shown}",
        case.vars
    );
    assert_eq!(err.field, case.field, "{:?}: {err}", case.vars);
    match &case.shown {
        Shown::Nothing => assert!(err.value.is_empty(), "{:?}: {err}", case.vars),
        Shown::Exactly(v) => assert_eq!(&err.value, v, "{:?}: {err}", case.vars),
        Shown::Any => {}
    }
    assert!(
        err.value.chars().count() <= ConfigError::MAX_SHOWN + 1,
        "{:?}: {err}",
        case.vars
    );
    if let Some(r) = case.reason {
        assert!(err.reason.contains(r), "{:?}: {err}", case.vars);
    }
    err
}

#[test]
fn every_hostile_configuration_is_refused_naming_its_field() {
    let corpus = corpus();
    assert!(corpus.len() >= 100, "{} cases", corpus.len());
    for case in &corpus {
        let err = check(case);
        // `RAILYARD_CORPUS_PRINT=1 … -- --nocapture` prints every message, for review.
        if std::env::var_os("RAILYARD_CORPUS_PRINT").is_some() {
            println!("{err}");
        }
    }
    println!("{} hostile configurations refused", corpus.len());
}

#[test]
fn raw_nul_bytes_are_refused_without_showing_the_url() {
    // The environment cannot carry a NUL byte; the library's callers can.
    for (u, field) in [
        (
            format!("postgres://app:{MARK}@h/le\0dger"),
            "DATABASE_URL (url)",
        ),
        (
            format!("postgres://a\0pp:{MARK}@h/db"),
            "DATABASE_URL (url)",
        ),
    ] {
        check(&case(&[("DATABASE_URL", &u)], field).hidden());
    }
    check(&var("RAILYARD_APPLICATION_NAME", "a\0b"));
    check(&var("RAILYARD_TIME_ZONE", "UTC\0"));
    check(&var("RAILYARD_SSLROOTCERT", "/ca\0.pem"));
}

#[test]
fn the_binary_refuses_hostile_configurations_before_connecting() {
    let corpus = corpus();
    // A spread of kinds: secrets, ports, hosts, sizes, names, lists, durations.
    let picks: Vec<&Case> = corpus
        .iter()
        // Without DATABASE_URL the binary would start a local cluster instead.
        .filter(|c| c.vars.iter().any(|(k, _)| k == "DATABASE_URL"))
        .filter(|c| {
            c.vars
                .iter()
                .all(|(_, v)| !v.contains('\0') && v.len() < 20_000)
        })
        .step_by(9)
        .take(20)
        .collect();
    assert!(picks.len() >= 15, "{} picks", picks.len());
    for case in picks {
        let out = Command::new(env!("CARGO_BIN_EXE_railyard"))
            .args(["migrate", "verify"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", std::env::var_os("HOME").unwrap_or_default())
            .env("RUST_LOG", "trace")
            .envs(case.vars.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let var = case.field.split(' ').next().unwrap();
        assert!(!out.status.success(), "{:?}: {stdout}", case.vars);
        assert!(stderr.contains(var), "{:?}: {stderr}", case.vars);
        assert!(
            !stderr.contains(MARK) && !stdout.contains(MARK),
            "{:?}: {stderr}",
            case.vars
        );
        assert!(!stderr.contains("panicked"), "{:?}: {stderr}", case.vars);
    }
}
