//! The environment parser's tests.

use super::*;
use crate::config::{Credentials, MAX_DETECT_REPEATS, MIN_WATCHDOG_LIMIT, SslMode};
use proptest::prelude::*;

fn env_err(pairs: &[(&str, &str)]) -> ConfigError {
    let mut vars = vec![("DATABASE_URL", "postgres://u@h/db")];
    vars.extend_from_slice(pairs);
    Config::from_vars(vars).unwrap_err()
}

#[test]
fn env_errors_name_the_variable() {
    let err = env_err(&[("RAILYARD_CONNECT_TIMEOUT", "5")]);
    assert_eq!(err.field, "RAILYARD_CONNECT_TIMEOUT");
    let err = env_err(&[("RAILYARD_POOL_MAX_SIZE", "many")]);
    assert_eq!(err.field, "RAILYARD_POOL_MAX_SIZE");
    let err = Config::from_vars([
        ("RAILYARD_ENV", "production"),
        ("RAILYARD_POOL_MAX_SIZE", "3"),
    ])
    .unwrap_err();
    assert_eq!(err.field, "DATABASE_URL");
    assert!(err.reason.contains("production profile"), "{err}");
    let err = Config::from_vars([("RAILYARD_ENV", "staging")]).unwrap_err();
    assert_eq!(err.field, "RAILYARD_ENV");
    let err = env_err(&[("DATABASE_REPLICA_URLS", "postgres://u@r1/db, http://r2/db")]);
    assert_eq!(err.field, "DATABASE_REPLICA_URLS (url)");
}

#[test]
#[cfg_attr(
    not(feature = "tls"),
    ignore = "validation refuses the modes that need TLS in a build without it"
)]
fn profiles_pick_defaults_and_explicit_values_win() {
    let c = Config::from_vars([
        ("RAILYARD_ENV", "production"),
        ("DATABASE_URL", "postgres://u@h/db"),
    ])
    .unwrap();
    assert_eq!(c.effective_ssl_mode(c.primary()), SslMode::VerifyFull);
    assert_eq!(c.statement_timeout, Some(Duration::from_secs(30)));
    assert!(c.local_database().is_none());
    // Explicit values win over the profile's defaults.
    let c = Config::from_vars([
        ("RAILYARD_ENV", "production"),
        ("DATABASE_URL", "postgres://u@h/db?sslmode=require"),
        ("RAILYARD_STATEMENT_TIMEOUT", "off"),
    ])
    .unwrap();
    assert_eq!(c.effective_ssl_mode(c.primary()), SslMode::Require);
    assert_eq!(c.statement_timeout, None);
    // Development and test stand for the local cluster without DATABASE_URL.
    let c = Config::from_vars([
        ("RAILYARD_ENV", "development"),
        ("RAILYARD_APPLICATION_NAME", "Ledger API"),
    ])
    .unwrap();
    assert_eq!(c.local_database(), Some("ledger_api"));
    let c = Config::from_vars([
        ("RAILYARD_ENV", "test"),
        ("RAILYARD_APPLICATION_NAME", "ledger"),
    ])
    .unwrap();
    assert_eq!(c.local_database(), Some("ledger_test"));
    assert_eq!(c.statement_timeout, Some(Duration::from_secs(60)));
    let err = Config::from_vars([
        ("RAILYARD_ENV", "test"),
        ("DATABASE_REPLICA_URLS", "postgres://u@r/db"),
    ])
    .unwrap_err();
    assert_eq!(err.field, "DATABASE_REPLICA_URLS");
}

#[test]
fn validation_errors_name_the_variable_not_the_field() {
    for (key, value) in [
        ("RAILYARD_POOL_MAX_SIZE", "0"),
        ("RAILYARD_REPLICA_POOL_MAX_SIZE", "0"),
        ("RAILYARD_CONNECT_TIMEOUT", "0s"),
        ("RAILYARD_CHECKOUT_TIMEOUT", "0ms"),
        ("RAILYARD_STATEMENT_TIMEOUT", "500us"),
        ("RAILYARD_STATEMENT_TIMEOUT", "30days"),
        ("RAILYARD_POOL_MIN_IDLE", "11"),
        ("RAILYARD_DETECT_REPEATS", "1"),
    ] {
        let err = env_err(&[(key, value)]);
        assert_eq!(err.field, key, "{key}={value}: {err}");
    }
    let err = env_err(&[
        ("RAILYARD_POOL_MAX_SIZE", "3"),
        ("RAILYARD_POOL_MIN_IDLE", "5"),
    ]);
    assert_eq!(err.field, "RAILYARD_POOL_MIN_IDLE");
    assert!(err.reason.contains("RAILYARD_POOL_MAX_SIZE"), "{err}");
    // A setter called later takes the name over.
    let config = Config::from_vars([
        ("DATABASE_URL", "postgres://u@h/db"),
        ("RAILYARD_POOL_MAX_SIZE", "3"),
    ])
    .unwrap()
    .pool_max_size(0);
    assert_eq!(
        config.validate().unwrap_err().field,
        "Config::pool_max_size"
    );
    let err = Config::from_url("postgres://u@h/db")
        .unwrap()
        .connect_timeout(Duration::ZERO)
        .validate()
        .unwrap_err();
    assert_eq!(err.field, "Config::connect_timeout");
}

#[test]
fn pool_sizes_say_what_is_wrong() {
    let cases = [
        ("4294967295", "too large, at most 10000"),
        ("99999999999", "too large, at most 10000"),
        ("10001", "too large, at most 10000"),
        ("-1", "must not be negative"),
        ("1.5", "expected a whole number"),
        ("1e3", "expected a whole number"),
        ("ten", "expected a whole number"),
    ];
    for key in [
        "RAILYARD_POOL_MAX_SIZE",
        "RAILYARD_REPLICA_POOL_MAX_SIZE",
        "RAILYARD_POOL_MIN_IDLE",
    ] {
        for (value, reason) in cases {
            let err = env_err(&[(key, value)]);
            assert_eq!(err.field, key, "{key}={value}: {err}");
            assert_eq!(err.reason, reason, "{key}={value}: {err}");
        }
    }
    let c = Config::from_vars([
        ("DATABASE_URL", "postgres://u@h/db"),
        ("RAILYARD_POOL_MAX_SIZE", " 10000 "),
        ("RAILYARD_POOL_MIN_IDLE", "0"),
    ])
    .unwrap();
    assert_eq!(c.pool.max_size, 10_000);
    assert_eq!(c.pool.min_idle, Some(0));
    assert!(
        Config::from_url("postgres://u@h/db")
            .unwrap()
            .pool_max_size(u32::MAX)
            .validate()
            .unwrap_err()
            .reason
            .contains("at most 10000")
    );
}

#[test]
fn durations_say_what_is_wrong() {
    let key = "RAILYARD_CHECKOUT_TIMEOUT";
    for (value, reason) in [
        ("-5s", "must not be negative"),
        ("5", "a number without a unit"),
        ("1.5", "a number without a unit"),
        ("5 parsecs", "unknown time unit"),
        ("99999999999999999999999h", "too large"),
        ("11years", "too large"),
    ] {
        let err = env_err(&[(key, value)]);
        assert_eq!(err.field, key, "{value}: {err}");
        assert!(err.reason.contains(reason), "{value}: {err}");
    }
    let c = Config::from_vars([
        ("DATABASE_URL", "postgres://u@h/db"),
        (key, "1.5s"),
        ("RAILYARD_STATEMENT_TIMEOUT", "0s"),
        ("RAILYARD_MAX_LIFETIME", "off"),
    ])
    .unwrap();
    assert_eq!(c.pool.checkout_timeout, Duration::from_millis(1500));
    assert_eq!(c.statement_timeout, None);
    assert_eq!(c.pool.max_lifetime, None);
}

#[test]
fn reconnect_settings_are_read_and_checked() {
    let c = Config::from_vars([("DATABASE_URL", "postgres://u@h/db")]).unwrap();
    assert_eq!(c.pool.ping_after_idle, Duration::from_secs(30));
    assert_eq!(c.pool.max_connecting, 8);
    let c = Config::from_vars([
        ("DATABASE_URL", "postgres://u@h/db"),
        ("RAILYARD_PING_AFTER_IDLE", "0s"),
        ("RAILYARD_MAX_CONNECTING", "2"),
    ])
    .unwrap();
    assert_eq!(
        c.pool.ping_after_idle,
        Duration::ZERO,
        "ping every check-out"
    );
    assert_eq!(c.pool.max_connecting, 2);
    for (key, value, reason) in [
        ("RAILYARD_MAX_CONNECTING", "0", "at least 1"),
        ("RAILYARD_MAX_CONNECTING", "-1", "negative"),
        ("RAILYARD_MAX_CONNECTING", "eight", "whole number"),
        ("RAILYARD_MAX_CONNECTING", "10001", "at most 10000"),
        ("RAILYARD_PING_AFTER_IDLE", "30", "without a unit"),
        ("RAILYARD_PING_AFTER_IDLE", "-5s", "negative"),
    ] {
        let err = env_err(&[(key, value)]);
        assert_eq!(err.field, key, "{key}={value}: {err}");
        assert!(err.reason.contains(reason), "{key}={value}: {err}");
    }
}

#[test]
fn queue_bounds_and_the_shutdown_timeout_are_read_and_checked() {
    let c = Config::from_vars([
        ("DATABASE_URL", "postgres://u@h/db"),
        ("RAILYARD_POOL_MAX_SIZE", "4"),
    ])
    .unwrap();
    assert_eq!(c.pool.max_waiters_for(4), 16, "4 per connection");
    assert_eq!(c.pool.max_wait_or_default(), Duration::from_secs(1));
    assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
    let c = Config::from_vars([
        ("DATABASE_URL", "postgres://u@h/db"),
        ("RAILYARD_CHECKOUT_TIMEOUT", "600ms"),
    ])
    .unwrap();
    assert_eq!(
        c.pool.max_wait_or_default(),
        Duration::from_millis(300),
        "half a short checkout timeout"
    );
    let c = Config::from_vars([
        ("DATABASE_URL", "postgres://u@h/db"),
        ("RAILYARD_POOL_MAX_WAITERS", "50"),
        ("RAILYARD_POOL_MAX_WAIT", "250ms"),
        ("RAILYARD_SHUTDOWN_TIMEOUT", "30s"),
    ])
    .unwrap();
    assert_eq!(c.pool.max_waiters_for(10), 50);
    assert_eq!(c.pool.max_wait_or_default(), Duration::from_millis(250));
    assert_eq!(c.shutdown_deadline(), Duration::from_secs(30));
    for (key, value, reason) in [
        ("RAILYARD_POOL_MAX_WAITERS", "0", "at least 1"),
        ("RAILYARD_POOL_MAX_WAITERS", "100001", "at most 100000"),
        ("RAILYARD_POOL_MAX_WAITERS", "-3", "negative"),
        ("RAILYARD_POOL_MAX_WAITERS", "lots", "whole number"),
        ("RAILYARD_POOL_MAX_WAIT", "0s", "positive"),
        ("RAILYARD_POOL_MAX_WAIT", "2", "without a unit"),
        (
            "RAILYARD_POOL_MAX_WAIT",
            "5s",
            "shorter than the checkout timeout",
        ),
        ("RAILYARD_SHUTDOWN_TIMEOUT", "0s", "positive"),
        ("RAILYARD_SHUTDOWN_TIMEOUT", "soon", "unit"),
        ("RAILYARD_SHUTDOWN_TIMEOUT", "20years", "too large"),
    ] {
        let err = env_err(&[(key, value)]);
        assert_eq!(err.field, key, "{key}={value}: {err}");
        assert!(err.reason.contains(reason), "{key}={value}: {err}");
    }
    let err = env_err(&[
        ("RAILYARD_POOL_MAX_WAIT", "2s"),
        ("RAILYARD_CHECKOUT_TIMEOUT", "1s"),
    ]);
    assert_eq!(err.field, "RAILYARD_POOL_MAX_WAIT");
    assert!(err.reason.contains("RAILYARD_CHECKOUT_TIMEOUT"), "{err}");
    let err = Config::from_url("postgres://u@h/db")
        .unwrap()
        .pool_max_waiters(0)
        .validate()
        .unwrap_err();
    assert_eq!(err.field, "Config::pool_max_waiters");
    let err = Config::from_url("postgres://u@h/db")
        .unwrap()
        .shutdown_timeout(Duration::ZERO)
        .validate()
        .unwrap_err();
    assert_eq!(err.field, "Config::shutdown_timeout");
}

#[test]
#[cfg_attr(
    not(feature = "tls"),
    ignore = "validation refuses the modes that need TLS in a build without it"
)]
fn query_insight_settings_are_read_off_by_default_and_checked() {
    let url = ("DATABASE_URL", "postgres://u@h/db");
    for profile in ["development", "test", "production"] {
        let c = Config::from_vars([url, ("RAILYARD_ENV", profile)]).unwrap();
        assert_eq!(c.watchdog_cancel_after, None, "{profile}");
        assert_eq!(c.capture_plans_slower_than, None, "{profile}");
        assert_eq!(c.detect_repeats, None, "{profile}");
    }
    let c = Config::from_vars([
        url,
        ("RAILYARD_WATCHDOG_CANCEL_AFTER", "30s"),
        ("RAILYARD_CAPTURE_PLANS_SLOWER_THAN", "500ms"),
        ("RAILYARD_DETECT_REPEATS", " 20 "),
    ])
    .unwrap();
    assert_eq!(c.watchdog_cancel_after, Some(Duration::from_secs(30)));
    assert_eq!(
        c.capture_plans_slower_than,
        Some(Duration::from_millis(500))
    );
    assert_eq!(c.detect_repeats, Some(20));
    let c = Config::from_vars([
        url,
        ("RAILYARD_WATCHDOG_CANCEL_AFTER", "10ms"),
        ("RAILYARD_CAPTURE_PLANS_SLOWER_THAN", "1us"),
        ("RAILYARD_DETECT_REPEATS", "2"),
    ])
    .unwrap();
    assert_eq!(c.watchdog_cancel_after, Some(MIN_WATCHDOG_LIMIT));
    assert_eq!(c.capture_plans_slower_than, Some(Duration::from_micros(1)));
    assert_eq!(c.detect_repeats, Some(2));
    let c = Config::from_vars([
        url,
        ("RAILYARD_DETECT_REPEATS", &MAX_DETECT_REPEATS.to_string()),
    ])
    .unwrap();
    assert_eq!(c.detect_repeats, Some(MAX_DETECT_REPEATS));
    for (off, zero) in [("off", "0"), ("none", "0s"), ("off", "0ms")] {
        let c = Config::from_vars([
            url,
            ("RAILYARD_WATCHDOG_CANCEL_AFTER", off),
            ("RAILYARD_CAPTURE_PLANS_SLOWER_THAN", zero),
            ("RAILYARD_DETECT_REPEATS", off),
        ])
        .unwrap();
        assert_eq!(c.watchdog_cancel_after, None);
        assert_eq!(c.capture_plans_slower_than, None);
        assert_eq!(c.detect_repeats, None);
    }
    let durations = [
        ("", "empty"),
        ("abc", "unit"),
        ("5", "without a unit"),
        ("-5s", "must not be negative"),
        ("11years", "too large"),
        ("99999999999999999999h", "too large"),
    ];
    for key in [
        "RAILYARD_WATCHDOG_CANCEL_AFTER",
        "RAILYARD_CAPTURE_PLANS_SLOWER_THAN",
    ] {
        for (value, reason) in durations {
            let err = env_err(&[(key, value)]);
            assert_eq!(err.field, key, "{key}={value}: {err}");
            assert!(err.reason.contains(reason), "{key}={value}: {err}");
        }
    }
    for value in ["5ms", "500us", "9.9ms"] {
        let err = env_err(&[("RAILYARD_WATCHDOG_CANCEL_AFTER", value)]);
        assert_eq!(err.field, "RAILYARD_WATCHDOG_CANCEL_AFTER", "{err}");
        assert_eq!(err.value, value, "{err}");
        assert!(err.reason.contains("shorter than 10ms"), "{err}");
    }
    for (value, reason) in [
        ("", "empty"),
        ("abc", "expected a whole number"),
        ("1", "at least 2"),
        ("0", "at least 2"),
        ("-3", "must not be negative"),
        ("2.5", "expected a whole number"),
        ("5s", "expected a whole number"),
        ("100001", "too large, at most 100000"),
        ("99999999999", "too large, at most 100000"),
        (&"9".repeat(10_000), "too large"),
    ] {
        let err = env_err(&[("RAILYARD_DETECT_REPEATS", value)]);
        assert_eq!(err.field, "RAILYARD_DETECT_REPEATS", "{value:.20}: {err}");
        assert!(err.reason.contains(reason), "{value:.20}: {err}");
    }
    // A setter called later takes the name over.
    let c = Config::from_vars([url, ("RAILYARD_DETECT_REPEATS", "5")]).unwrap();
    for (c, setter) in [
        (c.clone().detect_repeats(Some(1)), "Config::detect_repeats"),
        (
            c.clone().detect_repeats(Some(MAX_DETECT_REPEATS + 1)),
            "Config::detect_repeats",
        ),
        (
            c.clone()
                .watchdog_cancel_after(Some(Duration::from_millis(9))),
            "Config::watchdog_cancel_after",
        ),
        (
            c.clone().watchdog_cancel_after(Some(MAX_DURATION * 2)),
            "Config::watchdog_cancel_after",
        ),
        (
            c.clone().capture_plans_slower_than(Some(Duration::ZERO)),
            "Config::capture_plans_slower_than",
        ),
        (
            c.clone().capture_plans_slower_than(Some(MAX_DURATION * 2)),
            "Config::capture_plans_slower_than",
        ),
    ] {
        assert_eq!(c.validate().unwrap_err().field, setter);
    }
}

#[test]
fn every_variable_refuses_an_empty_value() {
    for s in Setting::ALL {
        let err = env_err(&[(s.env(), " ")]);
        assert_eq!(err.field, s.env(), "{err}");
        assert!(err.reason.starts_with("empty"), "{err}");
    }
    let err = Config::from_vars([("DATABASE_URL", "")]).unwrap_err();
    assert_eq!(err.field, "DATABASE_URL");
    let err = env_err(&[("RAILYARD_SSLROOTCERT", "")]);
    assert_eq!(
        err.to_string(),
        "invalid RAILYARD_SSLROOTCERT: empty; unset it or give a path"
    );
}

#[test]
fn bad_names_time_zones_and_password_sources_are_refused_at_parse_time() {
    for (key, value) in [
        ("RAILYARD_APPLICATION_NAME", "a\0b"),
        ("RAILYARD_APPLICATION_NAME", &"x".repeat(100_000)),
        ("RAILYARD_APPLICATION_NAME", "postgres://u:pw@h/db"),
        ("RAILYARD_TIME_ZONE", "Europe/Paris'; DROP TABLE x; --"),
        ("RAILYARD_TIME_ZONE", "UTC\n"),
        ("RAILYARD_TIME_ZONE", &"A".repeat(300)),
        ("RAILYARD_PASSWORD_ENV", "A=B"),
        ("RAILYARD_PASSWORD_ENV", "1PW"),
        ("RAILYARD_TIME_ZONE", "postgres://u:pw@h/db"),
        ("RAILYARD_SSLROOTCERT", "postgres://u:pw@h/db"),
        ("RAILYARD_PASSWORD_FILE", "u:pw@h"),
        ("RAILYARD_SSLROOTCERT", "/tmp/a\0b"),
        ("RAILYARD_SSLMODE", "sometimes"),
    ] {
        let err = env_err(&[(key, value)]);
        assert_eq!(err.field, key, "{err}");
        assert!(err.value.len() <= 3 * ConfigError::MAX_SHOWN + 3, "{err}");
    }
    let err = env_err(&[
        ("RAILYARD_PASSWORD_FILE", "/run/pw"),
        ("RAILYARD_PASSWORD_ENV", "PW"),
    ]);
    assert_eq!(err.field, "RAILYARD_PASSWORD_FILE");
}

#[test]
fn replica_lists_split_between_urls_but_not_inside_multi_host_ones() {
    assert_eq!(
        split_url_list("postgres://a@r1,r2/db,postgres://a@r3/db postgresql://a@r4/db").unwrap(),
        vec![
            "postgres://a@r1,r2/db".to_owned(),
            "postgres://a@r3/db".to_owned(),
            "postgresql://a@r4/db".to_owned()
        ]
    );
}

#[test]
fn replica_lists_refuse_other_separators_without_showing_the_urls() {
    for list in [
        "postgres://u:hunter2@r1/db;postgres://u:hunter2@r2/db",
        "postgres://u:hunter2@r1/db|postgres://u:hunter2@r2/db",
        "postgres://r1/db;postgres://r2/db",
        "postgres://u:hunter2@r1/db?sslmode=disable;postgres://r2/db",
    ] {
        let err = env_err(&[("DATABASE_REPLICA_URLS", list)]);
        assert!(err.field.starts_with("DATABASE_REPLICA_URLS"), "{err}");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("r2"), "{shown}");
    }
    let c = Config::from_vars([
        ("DATABASE_URL", "postgres://u@h/db"),
        ("DATABASE_REPLICA_URLS", " \n "),
    ])
    .unwrap();
    assert!(c.replicas.is_empty());
}

#[test]
fn a_replica_that_repeats_the_primary_or_another_replica_is_refused() {
    let err = env_err(&[("DATABASE_REPLICA_URLS", "postgres://u@H:5432/db")]);
    assert_eq!(err.field, "DATABASE_REPLICA_URLS");
    assert!(err.reason.contains("the primary itself"), "{err}");
    let err = env_err(&[(
        "DATABASE_REPLICA_URLS",
        "postgres://u@r1/db postgres://v:pw@r1:5432/db?application_name=x",
    )]);
    assert_eq!(err.field, "DATABASE_REPLICA_URLS (URL 2)");
    assert!(err.reason.contains("listed twice"), "{err}");
    // Same servers, another database: a different target.
    Config::from_vars([
        ("DATABASE_URL", "postgres://u@h/db"),
        (
            "DATABASE_REPLICA_URLS",
            "postgres://u@h/other postgres://u@h:5433/db",
        ),
    ])
    .unwrap();
    let err = Config::from_url("postgres://u@h/db")
        .unwrap()
        .replica_url("postgres://u@h/db")
        .unwrap()
        .validate()
        .unwrap_err();
    assert_eq!(err.field, "replica URL 1");
}

#[test]
fn min_idle_may_not_exceed_the_replica_pool_size() {
    let err = env_err(&[
        ("DATABASE_REPLICA_URLS", "postgres://u@r1/db"),
        ("RAILYARD_POOL_MIN_IDLE", "5"),
        ("RAILYARD_REPLICA_POOL_MAX_SIZE", "2"),
    ]);
    assert_eq!(err.field, "RAILYARD_POOL_MIN_IDLE");
    assert!(
        err.reason.contains("RAILYARD_REPLICA_POOL_MAX_SIZE"),
        "{err}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "tls"),
    ignore = "validation refuses the modes that need TLS in a build without it"
)]
fn env_reads_every_setting() {
    let c = Config::from_vars([
        ("DATABASE_URL", "postgres://u:pw@h/db"),
        (
            "DATABASE_REPLICA_URLS",
            "postgres://u:pw@r1/db,postgres://u:pw@r2/db",
        ),
        ("RAILYARD_POOL_MAX_SIZE", "7"),
        ("RAILYARD_POOL_MIN_IDLE", "2"),
        ("RAILYARD_REPLICA_POOL_MAX_SIZE", "3"),
        ("RAILYARD_CONNECT_TIMEOUT", "2s"),
        ("RAILYARD_CHECKOUT_TIMEOUT", "750ms"),
        ("RAILYARD_STATEMENT_TIMEOUT", "30s"),
        ("RAILYARD_IDLE_TIMEOUT", "off"),
        ("RAILYARD_MAX_LIFETIME", "1h"),
        ("RAILYARD_MIGRATION_LOCK_TIMEOUT", "2m"),
        ("RAILYARD_APPLICATION_NAME", "ledger-api"),
        ("RAILYARD_SSLMODE", "verify-ca"),
        ("RAILYARD_SSLROOTCERT", "/etc/ca.pem"),
        ("RAILYARD_PASSWORD_FILE", "/run/secrets/pg"),
        ("RAILYARD_TIME_ZONE", "Europe/Paris"),
        ("RAILYARD_WATCHDOG_CANCEL_AFTER", "45s"),
        ("RAILYARD_CAPTURE_PLANS_SLOWER_THAN", "250ms"),
        ("RAILYARD_DETECT_REPEATS", "10"),
        ("RAILYARD_LOCAL_DIR", "/not/ours"),
        ("PATH", "/usr/bin"),
    ])
    .unwrap();
    assert_eq!(c.replicas.len(), 2);
    assert_eq!(c.pool.max_size, 7);
    assert_eq!(c.pool.min_idle, Some(2));
    assert_eq!(c.replica_pool_max_size, 3);
    assert_eq!(c.connect_timeout, Duration::from_secs(2));
    assert_eq!(c.pool.checkout_timeout, Duration::from_millis(750));
    assert_eq!(c.statement_timeout, Some(Duration::from_secs(30)));
    assert_eq!(c.pool.idle_timeout, None);
    assert_eq!(c.pool.max_lifetime, Some(Duration::from_secs(3600)));
    assert_eq!(c.migration_lock_timeout, Duration::from_secs(120));
    assert_eq!(c.application_name, "ledger-api");
    assert_eq!(c.effective_ssl_mode(&c.primary), SslMode::VerifyCa);
    assert_eq!(c.ssl_root_cert.as_deref(), Some("/etc/ca.pem".as_ref()));
    assert!(matches!(c.credentials, Credentials::File(_)));
    assert_eq!(c.time_zone, "Europe/Paris");
    assert_eq!(c.watchdog_cancel_after, Some(Duration::from_secs(45)));
    assert_eq!(
        c.capture_plans_slower_than,
        Some(Duration::from_millis(250))
    );
    assert_eq!(c.detect_repeats, Some(10));
    let shown = format!("{c:?} {c}");
    assert!(!shown.contains("pw@"), "{shown}");
}

proptest! {
    #[test]
    fn durations_round_trip(ms in 1u64..10_000_000) {
        let d = Duration::from_millis(ms);
        let text = if d.subsec_millis() != 0 || d.as_secs() == 0 {
            format!("{}ms", d.as_millis())
        } else {
            format!("{}s", d.as_secs())
        };
        prop_assert_eq!(parse_duration("x", &text).unwrap(), d);
    }
}

#[test]
#[cfg(not(feature = "tls"))]
fn without_tls_the_production_profile_is_refused_naming_the_variable_and_the_feature() {
    let err = Config::from_vars([
        ("RAILYARD_ENV", "production"),
        ("DATABASE_URL", "postgres://u:hunter2@h/db"),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("RAILYARD_SSLMODE") && err.contains("`tls` feature"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    let err = Config::from_vars([("DATABASE_URL", "postgres://u@h/db?sslmode=require")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("DATABASE_URL") && err.contains("require"),
        "{err}"
    );
    // prefer (the default) runs without TLS, as a libpq built without SSL does.
    Config::from_vars([("DATABASE_URL", "postgres://u@h/db")]).unwrap();
}
