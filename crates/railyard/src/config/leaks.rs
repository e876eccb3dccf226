//! The property that no outcome of parsing shows a password: for URLs and
//! environments built around a random marker password, placed where mistakes
//! put passwords (reserved characters left unencoded, `password=` and unknown
//! parameters, replica lists with a wrong separator, a second URL glued to a
//! database name), the marker appears in no `Display` or `Debug` of a result
//! or an error, nor in anything traced at trace level while parsing.

use std::io::Write;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use tracing_subscriber::fmt::MakeWriter;

use super::{Config, ConnectTarget};

/// What the subscriber writes, kept for inspection.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Every outcome of every entry point for one input, as printed, with what was
/// traced meanwhile.
fn outcomes(url: &str, replicas: Option<&str>, extra: &[(String, String)]) -> Vec<String> {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(captured.clone())
        .finish();
    let mut shown = Vec::new();
    tracing::subscriber::with_default(subscriber, || {
        tracing::trace!("capture started");
        match url.parse::<ConnectTarget>() {
            Ok(t) => shown.push(format!("{t} {t:?}")),
            Err(e) => shown.push(format!("{e} {e:?}")),
        }
        match Config::from_url(url) {
            Ok(c) => shown.push(format!("{c} {c:?}")),
            Err(e) => shown.push(format!("{e} {e:?}")),
        }
        let mut vars = vec![("DATABASE_URL".to_owned(), url.to_owned())];
        if let Some(r) = replicas {
            vars.push(("DATABASE_REPLICA_URLS".to_owned(), r.to_owned()));
        }
        vars.extend_from_slice(extra);
        match Config::from_vars(vars) {
            Ok(c) => shown.push(format!("{c} {c:?} {:?}", c.validate())),
            Err(e) => shown.push(format!("{e} {e:?}")),
        }
    });
    let traced = captured.text();
    assert!(
        traced.contains("capture started"),
        "the subscriber captures"
    );
    shown.push(traced);
    shown
}

/// A percent-encoding of every byte that is not alphanumeric.
fn encode_all(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn reserved() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "/", "?", "#", "@", ":", "%", ",", "[", "]", "&", "=", ";", " ", "%zz", "%00",
    ])
}

fn separator() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        ";", "|", ";;", " ; ", "\t", ",", " ", "&", "\n", "+", "%20",
    ])
}

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9-]{0,8}(\\.[a-z]{2,4})?",
        Just("127.0.0.1".to_owned()),
        Just("[::1]".to_owned()),
        Just("fe80::1".to_owned()),
        Just("%2Frun%2Fpg".to_owned()),
        Just("häst".to_owned()),
    ]
}

fn port() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        (1u32..70_000).prop_map(|p| format!(":{p}")),
        Just(":-1".to_owned()),
        Just(":abc".to_owned()),
    ]
}

fn tail() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("?sslmode=disable".to_owned()),
        Just("?sslmode=disable&sslmode=require".to_owned()),
        Just("?application_name=x&connect_timeout=3".to_owned()),
        Just("?host=h2".to_owned()),
    ]
}

/// A URL with the marker somewhere a password ends up.
// Long by design: one strategy per place a password is put by mistake, listed together.
fn url_with(marker: String) -> impl Strategy<Value = (String, Option<String>)> {
    let m = marker;
    let user = "[a-z]{1,6}";
    prop_oneof![
        // Well-formed, the password percent-encoded (reserved characters around it).
        (user, reserved(), host(), port(), tail()).prop_map({
            let m = m.clone();
            move |(u, r, h, p, t)| {
                (
                    format!(
                        "postgres://{u}:{}@{h}{p}/db{t}",
                        encode_all(&format!("{r}{m}{r}"))
                    ),
                    None,
                )
            }
        }),
        // A reserved character left unencoded before or after the marker.
        (user, reserved(), any::<bool>(), host(), port(), tail()).prop_map({
            let m = m.clone();
            move |(u, r, before, h, p, t)| {
                let pw = if before {
                    format!("x{r}{m}")
                } else {
                    format!("{m}{r}x")
                };
                (format!("postgres://{u}:{pw}@{h}{p}/db{t}"), None)
            }
        }),
        // The marker as the password of a URL missing its host, or as a port.
        (
            user,
            prop::sample::select(vec!["", "/db", "?sslmode=disable"])
        )
            .prop_map({
                let m = m.clone();
                move |(u, rest)| (format!("postgres://{u}:{m}{rest}"), None)
            }),
        // The marker in a parameter: password=, sslpassword=, an unknown one, twice.
        (
            user,
            host(),
            prop::sample::select(vec![
                "password",
                "sslpassword",
                "passwd",
                "pass",
                "pwd",
                "colour",
                "sslkey",
                "Password"
            ]),
            reserved(),
            any::<bool>(),
        )
            .prop_map({
                let m = m.clone();
                move |(u, h, name, r, twice)| {
                    let first = if twice {
                        format!("{name}=x&")
                    } else {
                        String::new()
                    };
                    (format!("postgres://{u}@{h}/db?{first}{name}={m}{r}"), None)
                }
            }),
        // A second URL, carrying the marker, glued to the database name or a parameter.
        (
            user,
            host(),
            separator(),
            prop::sample::select(vec!["/db", "/db?sslmode=disable", "/", ""])
        )
            .prop_map({
                let m = m.clone();
                move |(u, h, sep, path)| {
                    (
                        format!("postgres://{u}:pw@{h}{path}{sep}postgres://{u}:{m}@r2/db"),
                        None,
                    )
                }
            }),
        // Replica lists with good and bad separators.
        (user, host(), separator(), any::<bool>()).prop_map({
            let m = m.clone();
            move |(u, h, sep, first)| {
                let with = format!("postgres://{u}:{m}@r1/db");
                let other = format!("postgres://{u}:pw@r2/db");
                let list = if first {
                    format!("{with}{sep}{other}")
                } else {
                    format!("{other}{sep}{with}")
                };
                (format!("postgres://{u}:{m}@{h}/db"), Some(list))
            }
        }),
    ]
}

/// Environment variables holding the marker where a URL was pasted by mistake,
/// and ordinary bad values next to it.
fn extra_vars(marker: String) -> impl Strategy<Value = Vec<(String, String)>> {
    let keys = prop::sample::select(vec![
        "RAILYARD_APPLICATION_NAME",
        "RAILYARD_POOL_MAX_SIZE",
        "RAILYARD_CONNECT_TIMEOUT",
        "RAILYARD_SSLMODE",
        "RAILYARD_TIME_ZONE",
        "RAILYARD_SSLROOTCERT",
        "RAILYARD_PASSWORD_FILE",
        "RAILYARD_PASSWORD_ENV",
        "RAILYARD_POOLER",
    ]);
    let value = prop_oneof![
        Just(format!("postgres://u:{marker}@h/db")),
        Just(format!("u:{marker}@h")),
        Just("-1".to_owned()),
        Just(String::new()),
        Just("5".to_owned()),
    ];
    prop::collection::vec((keys, value), 0..3)
        .prop_map(|v| v.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn case() -> impl Strategy<Value = (String, String, Option<String>, Vec<(String, String)>)> {
    "[A-Za-z]{4}[A-Za-z0-9]{12}"
        .prop_map(|m| format!("Mk{m}"))
        .prop_flat_map(|m| {
            (Just(m.clone()), url_with(m.clone()), extra_vars(m))
                .prop_map(|(m, (url, replicas), extra)| (m, url, replicas, extra))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn no_outcome_shows_the_password((marker, url, replicas, extra) in case()) {
        for shown in outcomes(&url, replicas.as_deref(), &extra) {
            prop_assert!(!shown.contains(&marker), "{url} / {replicas:?} / {extra:?} showed the password: {shown}");
        }
    }
}
