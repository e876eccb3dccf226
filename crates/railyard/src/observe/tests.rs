//! The observer's tests: the recent window, sanitising, tables, SQLSTATEs
//! and the per-query path's buffers.

use super::instrument::{ConnInstrumentation, UntilBinds};
use super::*;

#[test]
fn the_recent_window_counts_queries_and_errors_by_class() {
    let m = Metrics::default();
    let route = Route::Primary;
    let mut e = QueryEvent::new("SELECT 1", &route, Duration::from_millis(1));
    for _ in 0..5 {
        m.record(&e);
    }
    e.outcome = Outcome::Error;
    e.class = Some(ErrorClass::Timeout);
    m.record(&e);
    let (total, errors) = m.recent();
    assert_eq!(total, 6);
    assert_eq!(errors[ErrorClass::Timeout.index()], 1);
    assert_eq!(errors.iter().sum::<u64>(), 1);
}

#[test]
fn string_literals_are_replaced() {
    assert_eq!(
        sanitize_sql("ALTER ROLE r PASSWORD 'hunter2'"),
        "ALTER ROLE r PASSWORD '?'"
    );
    assert_eq!(
        sanitize_sql("SELECT 'a''b', 'c' FROM t"),
        "SELECT '?', '?' FROM t"
    );
    assert_eq!(sanitize_sql("SELECT $1"), "SELECT $1");
    assert_eq!(sanitize_sql("SELECT 'unterminated"), "SELECT '?'");
}

#[test]
fn operations_and_tables_are_named() {
    assert_eq!(
        operation_and_table("SELECT a FROM accounts WHERE x"),
        ("SELECT", Some("accounts"))
    );
    assert_eq!(
        operation_and_table("insert into \"users\" (a) values ($1)"),
        ("INSERT", Some("users"))
    );
    assert_eq!(
        operation_and_table("UPDATE orders SET"),
        ("UPDATE", Some("orders"))
    );
    assert_eq!(
        operation_and_table("CREATE TABLE IF NOT EXISTS t (a int)"),
        ("CREATE", Some("t"))
    );
    // A FROM among a function's arguments is not the statement's.
    assert_eq!(
        operation_and_table(
            "SELECT extract(epoch FROM taken_at)::float8 AS t, substring(x FROM ?) FROM railyard_migration_backups ORDER BY 1"
        ),
        ("SELECT", Some("railyard_migration_backups"))
    );
    assert_eq!(
        operation_and_table("SELECT count(*) FROM (SELECT 1 FROM t) s"),
        ("SELECT", Some("t"))
    );
    assert_eq!(
        operation_and_table("WITH x AS (SELECT a FROM accounts) SELECT * FROM x"),
        ("WITH", Some("accounts"))
    );
    assert_eq!(
        operation_and_table("INSERT INTO users(a) VALUES (?)"),
        ("INSERT", Some("users"))
    );
    assert_eq!(operation_and_table("SELECT f(((1)) FROM"), ("SELECT", None));
    assert_eq!(operation_and_table("BEGIN"), ("BEGIN", None));
    proptest::proptest!(|(sql in "(SELECT|WITH|INSERT INTO|UPDATE) [a-z()\"ÿ, ;]{0,40}( FROM [a-z()]{0,10})?")| {
        let (_, table) = operation_and_table(&sql);
        if let Some(t) = table {
            proptest::prop_assert!(!t.is_empty() && sql.contains(t));
            proptest::prop_assert!(!t.contains(['(', ')', ' ', ',', ';']), "{t}");
        }
    });
    assert_eq!(operation_and_table("SELECT 1"), ("SELECT", None));
    assert_eq!(operation_and_table("VACUUM"), ("OTHER", None));
}

#[test]
fn the_binds_marker_stops_formatting() {
    struct Q;
    impl fmt::Display for Q {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let value = "secret-value";
            write!(f, "SELECT $1 -- binds: {value}")
        }
    }
    let mut out = String::new();
    let _ = write!(UntilBinds(&mut out, false), "{}", Q);
    assert_eq!(out, "SELECT $1");
}

/// An `ErrorResponse` as the server sends it.
fn error_response(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut m = vec![b'E'];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(&body);
    m
}

fn db_error(kind: DatabaseErrorKind, message: &str) -> DieselError {
    DieselError::DatabaseError(kind, Box::new(message.to_owned()))
}

type Seen = Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>;

fn instrumented() -> (ConnInstrumentation, Arc<WireState>, Seen) {
    let seen: Seen = Arc::default();
    let hook = {
        let seen = seen.clone();
        move |e: &QueryEvent<'_>| {
            seen.lock()
                .unwrap()
                .push((e.sql.to_owned(), e.sqlstate.map(str::to_owned)))
        }
    };
    let observer = Arc::new(Observer {
        hooks: vec![Arc::new(hook), Arc::new(StatementStats::new())],
        metrics: Metrics::default(),
        repeats: None,
        plans: None,
    });
    let labels = Arc::new(ConnLabels {
        host: "h".into(),
        port: 5432,
        database: "d".into(),
        route: Route::Primary,
        attempt: Default::default(),
        operation: Default::default(),
        recording: Default::default(),
        quiet: Default::default(),
    });
    let wire = Arc::new(WireState::default());
    (
        ConnInstrumentation::new(observer, labels, wire.clone()),
        wire,
        seen,
    )
}

fn start(i: &mut ConnInstrumentation, sql: &str) {
    let q = diesel::connection::StrQueryHelper::new(sql);
    i.on_connection_event(InstrumentationEvent::start_query(&q));
}

fn finish(i: &mut ConnInstrumentation, sql: &str, error: Option<&DieselError>) {
    let q = diesel::connection::StrQueryHelper::new(sql);
    i.on_connection_event(InstrumentationEvent::finish_query(&q, error));
}

#[test]
fn each_event_carries_its_own_sqlstate_or_none() {
    let (mut inst, wire, seen) = instrumented();
    let mut tap = crate::conn::wire::Framer::default();
    let div = db_error(DatabaseErrorKind::Unknown, "division by zero");
    let syntax = db_error(DatabaseErrorKind::Unknown, "invalid input syntax");
    let dup = db_error(DatabaseErrorKind::UniqueViolation, "duplicate key value");
    let client = DieselError::SerializationError("overflow".into());

    // A server error during the query: the tap's.
    start(&mut inst, "SELECT 1/0");
    tap.on_read(&error_response("22012", "division by zero"), &wire);
    finish(&mut inst, "SELECT 1/0", Some(&div));
    // A failure in the client after it: not the earlier query's code.
    start(&mut inst, "SELECT $1::interval");
    finish(&mut inst, "SELECT $1::interval", Some(&client));
    // A pipeline whose errors all reached the tap before the first event:
    // the first has none rather than the second's; the second its own; the
    // driver names a unique violation itself.
    for sql in ["SELECT 2/0", "SELECT 'x'::int", "SELECT 1", "INSERT INTO u"] {
        start(&mut inst, sql);
    }
    tap.on_read(&error_response("22012", "division by zero"), &wire);
    tap.on_read(&error_response("22P02", "invalid input syntax"), &wire);
    tap.on_read(&error_response("23505", "duplicate key value"), &wire);
    finish(&mut inst, "SELECT 2/0", Some(&div));
    finish(&mut inst, "SELECT 'x'::int", Some(&syntax));
    finish(&mut inst, "SELECT 1", None);
    finish(&mut inst, "INSERT INTO u", Some(&dup));
    // An error from before the query began, with the same message: not this one's.
    start(&mut inst, "SELECT 3/0");
    finish(&mut inst, "SELECT 3/0", Some(&syntax));

    let code = |c: &str| Some(c.to_owned());
    assert_eq!(
        *seen.lock().unwrap(),
        [
            ("SELECT 1/0".to_owned(), code("22012")),
            ("SELECT $1::interval".to_owned(), None),
            ("SELECT 2/0".to_owned(), None),
            ("SELECT '?'::int".to_owned(), None),
            ("SELECT 1".to_owned(), None),
            ("INSERT INTO u".to_owned(), code("23505")),
            ("SELECT 3/0".to_owned(), None),
        ]
    );
}

#[test]
fn the_per_query_path_reuses_its_buffers() {
    let (mut inst, wire, seen) = instrumented();
    // Only the first hook's copies allocate; drop it.
    Arc::get_mut(&mut inst.observer).unwrap().hooks.remove(0);
    drop(seen);
    let mut tap = crate::conn::wire::Framer::default();
    let err = db_error(DatabaseErrorKind::Unknown, "division by zero");
    let response = error_response("22012", "division by zero");
    let sql = "SELECT balance_cents FROM accounts WHERE id = $1 AND note = 'x'";
    let mut round = |inst: &mut ConnInstrumentation| {
        for _ in 0..6 {
            start(inst, sql);
        }
        for _ in 0..6 {
            tap.on_read(&response, &wire);
            finish(inst, sql, Some(&err));
        }
    };
    round(&mut inst);
    let buffers = |i: &ConnInstrumentation| {
        (
            i.raw.as_ptr(),
            i.raw.capacity(),
            i.sql.as_ptr(),
            i.sql.capacity(),
            i.code.as_ptr(),
            i.code.capacity(),
            i.pending.capacity(),
        )
    };
    let warm = buffers(&inst);
    for _ in 0..100 {
        round(&mut inst);
    }
    assert_eq!(buffers(&inst), warm);
    assert_eq!(inst.code, "22012");
}

#[test]
fn durations_land_in_opentelemetry_buckets() {
    let h = DurationHistogram::default();
    h.record(Duration::from_millis(3));
    h.record(Duration::from_millis(60));
    h.record(Duration::from_secs(30));
    assert_eq!(h.buckets[0].load(Ordering::Relaxed), 1);
    assert_eq!(h.buckets[4].load(Ordering::Relaxed), 1);
    assert_eq!(h.buckets[14].load(Ordering::Relaxed), 1);
    assert_eq!(h.count.load(Ordering::Relaxed), 3);
}
