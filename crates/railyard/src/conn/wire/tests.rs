//! The tap's tests: framing, captures and the rewriter's pass-through.

use super::framer::SSL_REQUEST;
use super::*;
use proptest::prelude::*;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn error_body(code: &str, constraint: Option<&str>) -> Vec<u8> {
    let mut b = Vec::new();
    for (f, v) in [
        (b'S', "ERREUR"),
        (b'V', "ERROR"),
        (b'C', code),
        (b'M', "la valeur viole la contrainte"),
    ] {
        b.push(f);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
    }
    if let Some(c) = constraint {
        for (f, v) in [(b't', "users"), (b'n', c)] {
            b.push(f);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
    }
    b.push(0);
    b
}

#[derive(Debug, Clone)]
enum M {
    Ready(u8),
    Row(Vec<u8>),
    Error(String, Option<String>),
    Standby(bool),
    Other(u8, Vec<u8>),
}

fn encode(ms: &[M]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in ms {
        out.extend(match m {
            M::Ready(s) => msg(b'Z', &[*s]),
            M::Row(b) => msg(b'D', b),
            M::Error(c, n) => msg(b'E', &error_body(c, n.as_deref())),
            M::Standby(on) => msg(
                b'S',
                if *on {
                    b"in_hot_standby\0on\0"
                } else {
                    b"in_hot_standby\0off\0"
                },
            ),
            M::Other(k, b) => msg(*k, b),
        });
    }
    out
}

fn observe(w: &WireState) -> (TxStatus, Option<bool>, Option<ServerError>, u64, u64, u64) {
    (
        w.tx_status(),
        w.in_hot_standby(),
        w.last_error(),
        w.ready_count(),
        w.error_count(),
        w.message_count(),
    )
}

fn arb_message() -> impl Strategy<Value = M> {
    prop_oneof![
        prop_oneof![Just(b'I'), Just(b'T'), Just(b'E')].prop_map(M::Ready),
        proptest::collection::vec(any::<u8>(), 0..400).prop_map(M::Row),
        (
            prop_oneof![Just("23505"), Just("40001"), Just("40P01"), Just("57014")],
            proptest::option::of("[a-z_]{1,20}")
        )
            .prop_map(|(c, n)| M::Error(c.to_owned(), n)),
        any::<bool>().prop_map(M::Standby),
        (
            prop_oneof![Just(b'C'), Just(b'T'), Just(b'1'), Just(b'2'), Just(b'N')],
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(k, b)| M::Other(k, b)),
    ]
}

proptest! {
    #[test]
    fn any_chunking_yields_the_same_observations(
        ms in proptest::collection::vec(arb_message(), 1..60),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..40),
    ) {
        let stream = encode(&ms);
        let whole = WireState::default();
        Framer::default().on_read(&stream, &whole);

        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        points.sort();
        let chunked = WireState::default();
        let mut f = Framer::default();
        let mut at = 0;
        for p in points.into_iter().chain([stream.len()]) {
            f.on_read(&stream[at..p], &chunked);
            at = p;
        }
        prop_assert_eq!(observe(&whole), observe(&chunked));
        prop_assert_eq!(whole.message_count(), ms.len() as u64);
    }
}

#[test]
fn an_error_response_yields_its_code_and_constraint_whatever_the_language() {
    let w = WireState::default();
    let stream = encode(&[
        M::Ready(b'I'),
        M::Error("23505".into(), Some("users_email_key".into())),
        M::Ready(b'E'),
    ]);
    Framer::default().on_read(&stream, &w);
    let e = w.last_error().unwrap();
    assert_eq!(
        e.sqlstate(),
        tokio_postgres::error::SqlState::UNIQUE_VIOLATION
    );
    assert_eq!(e.constraint.as_deref(), Some("users_email_key"));
    assert_eq!(e.table.as_deref(), Some("users"));
    assert_eq!(e.severity, "ERROR");
    assert_eq!(w.tx_status(), TxStatus::Failed);
}

fn data_row(values: &[Option<&str>]) -> Vec<u8> {
    let mut b = (values.len() as i16).to_be_bytes().to_vec();
    for v in values {
        match v {
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v.as_bytes());
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    b
}

/// The replies to `COMMIT; SELECT pg_current_wal_insert_lsn()::text`.
fn commit_and_position(lsn: &str) -> Vec<u8> {
    encode(&[
        M::Other(b'C', b"COMMIT\0".to_vec()),
        M::Other(b'T', vec![0, 1, b'x', 0]),
        M::Row(data_row(&[Some(lsn)])),
        M::Other(b'C', b"SELECT 1\0".to_vec()),
        M::Ready(b'I'),
    ])
}

#[test]
fn an_armed_capture_keeps_the_first_tag_and_row_in_any_chunking() {
    let stream = commit_and_position("16/B374D848");
    for cut in 0..=stream.len() {
        let w = WireState::default();
        let mut f = Framer::default();
        w.capture_replies();
        f.on_read(&stream[..cut], &w);
        f.on_read(&stream[cut..], &w);
        let c = w.take_captured();
        assert!(c.first_completed("COMMIT"), "cut at {cut}: {c:?}");
        assert_eq!(c.one_text_value(), Some("16/B374D848"), "cut at {cut}");
        assert_eq!(w.ready_count(), 1, "one round trip");
    }
}

#[test]
fn rows_are_not_copied_unless_a_capture_is_armed() {
    let w = WireState::default();
    let mut f = Framer::default();
    f.on_read(&commit_and_position("0/1"), &w);
    assert_eq!(w.take_captured(), Captured::default());
    // Disarmed by the take: the next replies are not kept either.
    w.capture_replies();
    let _ = w.take_captured();
    f.on_read(&commit_and_position("0/2"), &w);
    assert_eq!(w.take_captured(), Captured::default());
}

#[test]
fn a_commit_that_fails_leaves_no_tag_and_no_row() {
    let w = WireState::default();
    w.capture_replies();
    Framer::default().on_read(
        &encode(&[M::Error("40001".into(), None), M::Ready(b'I')]),
        &w,
    );
    let c = w.take_captured();
    assert!(!c.first_completed("COMMIT"));
    assert_eq!(c.one_text_value(), None);
}

#[test]
fn only_a_single_non_null_column_is_a_text_value() {
    let of = |row: Vec<u8>| Captured {
        first_tag: None,
        first_row: Some(row),
    };
    assert_eq!(of(data_row(&[Some("0/1")])).one_text_value(), Some("0/1"));
    assert_eq!(of(data_row(&[None])).one_text_value(), None);
    assert_eq!(of(data_row(&[Some("a"), Some("b")])).one_text_value(), None);
    assert_eq!(of(vec![0, 1, 0, 0, 0, 9, b'x']).one_text_value(), None);
    assert_eq!(of(vec![0]).one_text_value(), None);
}

#[test]
fn the_answer_to_an_ssl_request_is_skipped() {
    let w = WireState::default();
    let mut f = Framer::default();
    f.on_write(&SSL_REQUEST, &w);
    let mut stream = vec![b'N'];
    stream.extend(encode(&[M::Standby(true), M::Ready(b'I')]));
    f.on_read(&stream, &w);
    assert_eq!(w.in_hot_standby(), Some(true));
    assert_eq!(w.tx_status(), TxStatus::Idle);
}

#[test]
fn requests_in_flight_are_counted_until_their_ready_for_query() {
    let w = WireState::default();
    let mut f = Framer::default();
    let params = b"user\0u\0\0";
    let mut startup = Vec::new();
    startup.extend_from_slice(&(8 + params.len() as i32).to_be_bytes());
    startup.extend_from_slice(&196608i32.to_be_bytes());
    startup.extend_from_slice(params);
    // written in awkward pieces
    for chunk in startup.chunks(3) {
        f.on_write(chunk, &w);
    }
    assert_eq!(w.in_flight(), 1);
    f.on_read(
        &encode(&[M::Other(b'R', vec![0, 0, 0, 0]), M::Ready(b'I')]),
        &w,
    );
    assert!(w.is_settled_idle());
    let mut extended = msg(b'P', b"\0SELECT 1\0\0\0");
    extended.extend(msg(b'B', &[0; 8]));
    extended.extend(msg(b'E', &[0, 0, 0, 0, 0]));
    extended.extend(msg(b'S', &[]));
    extended.extend(msg(b'Q', b"SELECT 2\0"));
    f.on_write(&extended, &w);
    assert_eq!(w.in_flight(), 2);
    assert!(
        !w.is_settled_idle(),
        "idle status is stale while requests are in flight"
    );
    f.on_read(&encode(&[M::Ready(b'I'), M::Ready(b'I')]), &w);
    assert!(w.is_settled_idle());
}

#[test]
fn a_negative_length_makes_the_status_unknown() {
    let w = WireState::default();
    let mut stream = encode(&[M::Ready(b'I')]);
    stream.extend_from_slice(&[b'D', 0xff, 0xff, 0xff, 0xff]);
    Framer::default().on_read(&stream, &w);
    assert_eq!(w.tx_status(), TxStatus::Unknown);
}

#[tokio::test]
async fn the_tap_passes_bytes_through_unchanged_and_counts_them() {
    let (a, mut b) = tokio::io::duplex(64);
    let wire = Arc::new(WireState::default());
    let mut t = Tapped::new(a, wire.clone(), true);
    t.write_all(b"hello").await.unwrap();
    let mut got = [0u8; 5];
    b.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello");
    b.write_all(b"world!").await.unwrap();
    let mut back = [0u8; 6];
    t.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"world!");
    assert_eq!((wire.bytes_written(), wire.bytes_read()), (5, 6));
    drop(b);
    let mut rest = Vec::new();
    t.read_to_end(&mut rest).await.unwrap();
    assert!(wire.is_closed());
}

#[tokio::test]
async fn a_tap_that_is_switched_off_counts_nothing() {
    let (a, mut b) = tokio::io::duplex(64);
    let wire = Arc::new(WireState::default());
    let mut t = Tapped::new(a, wire.clone(), false);
    t.write_all(b"ciphertext").await.unwrap();
    let mut got = [0u8; 10];
    b.read_exact(&mut got).await.unwrap();
    assert_eq!(wire.bytes_written(), 0);
}
