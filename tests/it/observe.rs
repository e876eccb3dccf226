//! Timing hooks, statistics, logs that leak nothing, health and metrics.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::sql_types::Text;
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use railyard::observe::Outcome;
use railyard::{
    Config, Database, Error, ErrorClass, HealthStatus, QueryEvent, Route, StatementStats,
};
use railyard_local::LocalCluster;

use crate::support;

#[derive(Debug, Clone)]
struct Seen {
    sql: String,
    duration: Duration,
    outcome: Outcome,
    class: Option<ErrorClass>,
    sqlstate: Option<String>,
    route: Route,
    table: Option<String>,
    operation: String,
}

fn recorder() -> (
    Arc<Mutex<Vec<Seen>>>,
    impl Fn(&QueryEvent<'_>) + Send + Sync + 'static,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook = {
        let seen = seen.clone();
        move |e: &QueryEvent<'_>| {
            seen.lock().unwrap().push(Seen {
                sql: e.sql.to_owned(),
                duration: e.duration,
                outcome: e.outcome,
                class: e.class,
                sqlstate: e.sqlstate.map(str::to_owned),
                route: e.route.clone(),
                table: e.table.map(str::to_owned),
                operation: e.operation.to_owned(),
            })
        }
    };
    (seen, hook)
}

async fn ledger_with(
    hooks: impl FnOnce(railyard::DatabaseBuilder) -> railyard::DatabaseBuilder,
) -> Database {
    let base = support::ledger(|c| c).await;
    hooks(Database::builder(base.config().clone()))
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn durations_are_measured_and_pipelined_queries_keep_their_own() {
    let (seen, hook) = recorder();
    let db = ledger_with(|b| b.hook(hook)).await;
    let mut conn = db.primary().await.unwrap();
    diesel::sql_query("SELECT pg_sleep(0.05)")
        .execute(&mut conn)
        .await
        .unwrap();
    {
        let e = seen
            .lock()
            .unwrap()
            .iter()
            .find(|e| e.sql.contains("pg_sleep(0.05)"))
            .cloned()
            .unwrap();
        assert!(e.duration >= Duration::from_millis(50), "{:?}", e.duration);
        assert_eq!(e.route, Route::Primary);
        assert_eq!(e.outcome, Outcome::Ok);
    }

    // Two queries pipelined on one connection: their events interleave
    // (start, start, finish, finish) and are paired in order.
    let pg: &diesel_async::AsyncPgConnection = &conn;
    let slow = diesel::sql_query("SELECT pg_sleep(0.12) AS slow_one");
    let quick = diesel::sql_query("SELECT pg_sleep(0.03) AS quick_one");
    let (a, b) =
        futures_util::future::join(slow.execute(&mut &*pg), quick.execute(&mut &*pg)).await;
    a.unwrap();
    b.unwrap();
    let events = seen.lock().unwrap().clone();
    let slow = events.iter().find(|e| e.sql.contains("slow_one")).unwrap();
    let quick = events.iter().find(|e| e.sql.contains("quick_one")).unwrap();
    assert!(
        slow.duration >= Duration::from_millis(120),
        "{:?}",
        slow.duration
    );
    // The server runs them one after the other: the quick one waited for the slow one.
    assert!(
        quick.duration >= Duration::from_millis(150),
        "{:?}",
        quick.duration
    );
    assert!(quick.duration > slow.duration);
}

#[tokio::test]
async fn failed_queries_carry_their_sqlstate_and_class() {
    let (seen, hook) = recorder();
    let db = ledger_with(|b| b.hook(hook)).await;
    let _ = db
        .write(async |c| {
            diesel::sql_query("SELECT 1 / 0 AS boom").execute(c).await?;
            Ok::<_, Error>(())
        })
        .await;
    let email = format!("{}@example.test", support::unique("obs"));
    for _ in 0..2 {
        let _ = db
            .write(async |c| {
                diesel::sql_query("INSERT INTO users (email, name) VALUES ($1, 'o')")
                    .bind::<Text, _>(&email)
                    .execute(c)
                    .await?;
                Ok::<_, Error>(())
            })
            .await;
    }
    let events = seen.lock().unwrap().clone();
    let boom = events.iter().find(|e| e.sql.contains("boom")).unwrap();
    assert_eq!(
        (boom.outcome, boom.sqlstate.as_deref(), boom.class),
        (Outcome::Error, Some("22012"), Some(ErrorClass::Permanent))
    );
    let dup = events
        .iter()
        .rev()
        .find(|e| e.operation == "INSERT")
        .unwrap();
    assert_eq!(dup.sqlstate.as_deref(), Some("23505"));
    assert_eq!(dup.class, Some(ErrorClass::Constraint));
    assert_eq!(dup.table.as_deref(), Some("users"));
    assert!(!dup.sql.contains(&email), "bind values never appear");
}

#[tokio::test]
async fn statement_statistics_rank_by_total_time() {
    let stats = StatementStats::new();
    let db = ledger_with(|b| b.hook(stats.clone())).await;
    let mut conn = db.primary().await.unwrap();
    for _ in 0..20 {
        diesel::sql_query("SELECT pg_sleep(0.002) AS many")
            .execute(&mut conn)
            .await
            .unwrap();
    }
    diesel::sql_query("SELECT pg_sleep(0.08) AS once")
        .execute(&mut conn)
        .await
        .unwrap();
    let snap = stats.snapshot();
    let many = snap.iter().find(|s| s.sql.contains("many")).unwrap();
    let once = snap.iter().find(|s| s.sql.contains("once")).unwrap();
    assert_eq!((many.calls, once.calls), (20, 1));
    assert!(many.p50 >= Duration::from_millis(2) && many.p99 >= many.p50);
    assert!(once.total >= Duration::from_millis(80));
    let pos = |needle: &str| snap.iter().position(|s| s.sql.contains(needle)).unwrap();
    assert!(
        snap.windows(2).all(|w| w[0].total >= w[1].total),
        "sorted by total time"
    );
    assert!(pos("once") < snap.len() && pos("many") < snap.len());
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn no_password_or_bind_value_reaches_the_logs() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(capture.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let base = support::ledger(|c| c).await;
    let password = base.config().primary().expose_url();
    let db = Database::builder(base.config().clone())
        .hook(railyard::SlowQueryLog::new(Duration::ZERO))
        .hook(railyard::AuditLog)
        .hook(railyard::QuerySpans)
        .connect()
        .await
        .unwrap();
    let secret = "hunter2-bind-value-7f3a";
    for _ in 0..2 {
        let _ = db
            .transaction(async |c| {
                diesel::sql_query("INSERT INTO users (email, name) VALUES ($1, $1)")
                    .bind::<Text, _>(secret)
                    .execute(c)
                    .await?;
                Ok::<_, Error>(())
            })
            .await;
    }
    let mut conn = db.primary().await.unwrap();
    conn.batch_execute("SELECT 'hunter2-literal-value' AS lit")
        .await
        .unwrap();
    let role = support::unique("leak");
    support::admin_sql(&format!("CREATE ROLE {role} LOGIN PASSWORD 'role-pw-9c2e'")).await;
    let bad = Config::new(
        base.config()
            .primary()
            .with_user(&role)
            .with_password(Some(railyard::Secret::new("wrong-pw-5d1b"))),
    );
    let _ = Database::connect(bad).await;
    drop(conn);
    drop(db);

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("railyard::audit"), "the audit log ran");
    assert!(logs.contains("slow query"), "the slow-query log ran");
    assert!(logs.contains("db.system.name"), "spans were recorded");
    assert!(
        logs.contains("23505"),
        "the failure was logged with its SQLSTATE"
    );
    let cluster_password = password
        .split(':')
        .nth(2)
        .unwrap()
        .split('@')
        .next()
        .unwrap()
        .to_owned();
    for needle in [
        secret,
        "hunter2-literal-value",
        "role-pw-9c2e",
        "wrong-pw-5d1b",
        cluster_password.as_str(),
    ] {
        assert!(!logs.contains(needle), "{needle:?} leaked into the logs");
    }
}

#[tokio::test]
async fn health_degrades_without_the_replica_and_readiness_fails_without_the_primary() {
    support::server().await;
    let dir = std::env::temp_dir().join(support::unique("health"));
    let cluster = LocalCluster::builder()
        .dir(&dir)
        .ephemeral(true)
        .start()
        .await
        .unwrap();
    let config = Config::new(cluster.primary_socket_target("railyard"))
        .replica(cluster.replica_socket_target("railyard").unwrap())
        .checkout_timeout(Duration::from_millis(500));
    let dumps = support::Dumps::new();
    let db = Database::builder(config)
        .migrations(dumps.migrator())
        .routing(railyard::RoutingConfig::default().check_interval(Duration::from_millis(30)))
        .connect()
        .await
        .unwrap();
    let settle = async |want: HealthStatus| {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let r = db.health().await;
            if r.status == want {
                return r;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "health never became {want:?}: {r:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let report = settle(HealthStatus::Healthy).await;
    assert!(
        report
            .checks
            .iter()
            .any(|c| c.name == "migrations" && c.status == HealthStatus::Healthy)
    );
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["status"], "healthy");

    cluster.stop_replica().unwrap();
    let report = settle(HealthStatus::Degraded).await;
    let replica = report
        .checks
        .iter()
        .find(|c| c.name.starts_with("replica"))
        .unwrap();
    assert_eq!(replica.status, HealthStatus::Degraded, "{}", replica.reason);
    cluster.start_replica().unwrap();
    settle(HealthStatus::Healthy).await;

    // A query on each route, so that each route's histogram has counts (the
    // replica's monitor polls on connections of its own, not counted).
    db.read(async |c| {
        c.batch_execute("SELECT 1").await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    db.with_primary(async |c| {
        c.batch_execute("SELECT 1").await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();

    // The HTTP endpoints, over a real socket.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, railyard_http::router(db.clone())).into_future());
    assert_eq!(http_get(addr, "/readyz").await.0, 200);
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    let (code, body) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text");
    let hist = scrape
        .samples
        .iter()
        .find(|s| s.metric == "db_client_operation_duration_seconds")
        .expect("the duration histogram");
    match &hist.value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert_eq!(buckets.len(), 15, "OpenTelemetry's 14 bounds and +Inf");
            assert!(buckets.last().unwrap().count > 0.0);
        }
        other => panic!("not a histogram: {other:?}"),
    }
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "railyard_replica_lag_bytes")
    );
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "railyard_pool_connections")
    );

    cluster.stop_primary().unwrap();
    // Answers are reused for at most railyard::database::PRIMARY_PROBE_TTL.
    let stopped = std::time::Instant::now();
    let (code, body) = loop {
        let (code, body) = http_get(addr, "/readyz").await;
        if code != 200 || stopped.elapsed() > Duration::from_secs(5) {
            break (code, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("unreachable") || body.contains("no answer"),
        "{body}"
    );
    assert_eq!(
        http_get(addr, "/healthz").await.0,
        200,
        "the process itself is alive"
    );
    drop(db);
    cluster.destroy().unwrap();
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// The events of one statement (by a marker in its text).
fn events_of(seen: &Arc<Mutex<Vec<Seen>>>, marker: &str) -> Vec<Seen> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|e| e.sql.contains(marker))
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_failure_the_server_did_not_report_carries_no_earlier_sqlstate() {
    let (seen, hook) = recorder();
    let db = ledger_with(|b| b.hook(hook)).await;
    let email = format!("{}@example.test", support::unique("obs_stale"));
    let mut conn = db.primary().await.unwrap();
    let insert = || {
        diesel::sql_query(
            "INSERT INTO users (email, name) VALUES ($1, 'o') RETURNING id AS stale_dup",
        )
        .bind::<Text, _>(email.clone())
    };
    insert().execute(&mut conn).await.unwrap();
    insert().execute(&mut conn).await.unwrap_err();
    // Fails in the client (the bind value does not serialise): nothing reaches
    // the server, so no SQLSTATE is this query's.
    diesel::sql_query("SELECT $1::interval AS client_side")
        .bind::<diesel::sql_types::Interval, _>(chrono::TimeDelta::MAX)
        .execute(&mut conn)
        .await
        .unwrap_err();
    diesel::sql_query("SELECT 1 AS after_both")
        .execute(&mut conn)
        .await
        .unwrap();
    let dup = events_of(&seen, "stale_dup");
    assert_eq!(dup.len(), 2);
    assert_eq!(dup[1].sqlstate.as_deref(), Some("23505"));
    let client = events_of(&seen, "client_side");
    assert_eq!(client.len(), 1);
    assert_eq!(
        (
            client[0].outcome,
            client[0].sqlstate.as_deref(),
            client[0].class
        ),
        (Outcome::Error, None, Some(ErrorClass::Permanent)),
        "the unique violation of the query before is not this one's"
    );
    let after = events_of(&seen, "after_both");
    assert_eq!(
        (after[0].outcome, after[0].sqlstate.as_deref()),
        (Outcome::Ok, None)
    );
}

mod pipe {
    diesel::table! {
        users (id) {
            id -> BigInt,
            email -> Text,
            name -> Text,
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn pipelined_failures_carry_only_their_own_sqlstate() {
    use diesel::dsl::{now, select};
    use diesel::sql_types::Integer;
    use diesel::{ExpressionMethods, IntoSql};

    let (seen, record) = recorder();
    // The hook holds the (only) runtime thread after the pipeline's first
    // query: meanwhile the server answers the rest, and the connection's task
    // then reads every answer (three errors among them) before the next event.
    let hook = move |e: &QueryEvent<'_>| {
        record(e);
        if e.sql.contains("CURRENT_TIMESTAMP") {
            std::thread::sleep(Duration::from_millis(30));
        }
    };
    let db = ledger_with(|b| b.hook(hook)).await;
    let email = format!("{}@example.test", support::unique("obs_pipe"));
    let conn = db.primary().await.unwrap();
    let pg: &diesel_async::AsyncPgConnection = &conn;
    let dup = || {
        diesel::insert_into(pipe::users::table).values((
            pipe::users::email.eq(email.clone()),
            pipe::users::name.eq("p"),
        ))
    };
    dup().execute(&mut &*pg).await.unwrap();
    let int = |n: i32| n.into_sql::<Integer>();
    const ROUNDS: usize = 10;
    // Round 0 prepares each statement, one at a time; later rounds find them
    // in the statement cache and send all six at once.
    for _ in 0..=ROUNDS {
        seen.lock().unwrap().clear();
        // One pipeline: each query has its own Sync, so a failure does not
        // abort the ones after it.
        let (pause, div, ok_a, dup, ok_b, overflow) = futures_util::join!(
            select(now).execute(&mut &*pg),
            select(int(1) / int(0)).execute(&mut &*pg),
            select(int(1)).execute(&mut &*pg),
            dup().execute(&mut &*pg),
            select(int(1) * int(2)).execute(&mut &*pg),
            select(int(i32::MAX) + int(1)).execute(&mut &*pg),
        );
        assert!(div.is_err() && dup.is_err() && overflow.is_err());
        assert!(pause.is_ok() && ok_a.is_ok() && ok_b.is_ok());
        let events = seen.lock().unwrap().clone();
        assert_eq!(events.len(), 6);
        let got: Vec<_> = events
            .iter()
            .map(|e| (e.outcome, e.sqlstate.as_deref()))
            .collect();
        use Outcome::{Error, Ok};
        // Never another statement's SQLSTATE. The unique violation is named
        // by the driver too and the overflow is the last error the tap saw:
        // both always exact. The division by zero is exact unless the tap had
        // moved on to a later error before its event (then it has none).
        assert!(
            matches!(
                got.as_slice(),
                [
                    (Ok, None),
                    (Error, None | Some("22012")),
                    (Ok, None),
                    (Error, Some("23505")),
                    (Ok, None),
                    (Error, Some("22003")),
                ]
            ),
            "{got:?} for {:#?}",
            events.iter().map(|e| &e.sql).collect::<Vec<_>>()
        );
    }
}

/// Counts each thread's allocations, for the tests that check a path allocates
/// nothing; otherwise the system allocator, unchanged.
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Counting;

    thread_local! {
        // Const-initialised and without a destructor: usable inside the allocator.
        static COUNT: Cell<u64> = const { Cell::new(0) };
    }

    fn note() {
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
    }

    // SAFETY: every call is passed unchanged to the system allocator.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note();
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note();
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note();
            unsafe { System.realloc(ptr, layout, new_size) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    /// Allocations this thread has made.
    pub fn allocations() -> u64 {
        COUNT.with(Cell::get)
    }
}

#[test]
fn statement_statistics_allocate_nothing_for_known_or_overflowing_statements() {
    use railyard::QueryHook;
    let route = Route::Primary;
    let known = [
        "SELECT * FROM accounts WHERE id = 42",
        "SELECT * FROM users WHERE email = E'a\\'b' AND id IN (1, 2, 3)",
        "UPDATE accounts SET balance_cents = balance_cents - $1 WHERE id = $2",
    ];
    let stats = StatementStats::with_capacity(known.len());
    let beyond: Vec<String> = (0..100)
        .map(|i| format!("SELECT * FROM table_{i} WHERE id = $$x$$"))
        .collect();
    let mut events: Vec<QueryEvent<'_>> = known
        .iter()
        .copied()
        .chain(beyond.iter().map(String::as_str))
        .map(|sql| QueryEvent::new(sql, &route, Duration::from_micros(120)))
        .collect();
    events[1].outcome = Outcome::Error;
    for e in &events {
        stats.on_query(e);
    }
    let before = counting::allocations();
    for round in 0..100u64 {
        for e in &mut events {
            e.duration = Duration::from_micros(100 + round);
            stats.on_query(e);
        }
    }
    assert_eq!(counting::allocations() - before, 0);
    let snap = stats.snapshot();
    assert_eq!(snap.len(), known.len() + 1);
    assert_eq!(snap.iter().map(|s| s.calls).sum::<u64>(), 101 * 103);
}

#[tokio::test(flavor = "current_thread")]
async fn hooks_add_no_allocation_to_a_failing_query() {
    let stats = StatementStats::new();
    let plain = ledger_with(|b| b).await;
    let hooked = ledger_with(|b| b.hook(stats.clone()).hook(|_: &QueryEvent<'_>| {})).await;
    let email = format!("{}@example.test", support::unique("obs_alloc"));
    let per_query = async |db: &Database| {
        let mut conn = db.primary().await.unwrap();
        let mut run = async |n: u64| {
            let before = counting::allocations();
            for _ in 0..n {
                diesel::sql_query("INSERT INTO users (email, name) VALUES ($1, 'a')")
                    .bind::<Text, _>(&email)
                    .execute(&mut conn)
                    .await
                    .ok();
            }
            counting::allocations() - before
        };
        run(20).await;
        run(200).await as f64 / 200.0
    };
    let plain = per_query(&plain).await;
    let hooked = per_query(&hooked).await;
    eprintln!("allocations per failing query: {plain} without hooks, {hooked} with them");
    assert!(hooked <= plain + 0.1, "{hooked} > {plain}");
    assert!(stats.snapshot()[0].errors >= 200);
}

#[tokio::test]
async fn a_probe_storm_rides_the_pool_and_costs_a_few_queries() {
    let (seen, hook) = recorder();
    let app = support::unique("probes");
    let base = support::ledger(|c| c).await;
    let dumps = support::Dumps::new();
    let db = Database::builder(
        base.config()
            .clone()
            .pool_max_size(4)
            .application_name(&app),
    )
    .migrations(dumps.migrator())
    .hook(hook)
    .connect()
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, railyard_http::router(db.clone())).into_future());
    seen.lock().unwrap().clear();
    let started = std::time::Instant::now();
    let backends = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let watcher = {
        let (backends, app) = (backends.clone(), app.clone());
        tokio::spawn(async move {
            loop {
                let n = support::count_admin(&format!(
                    "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = '{app}'"
                ))
                .await;
                backends.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // 5,000 requests from 50 clients.
    let clients: Vec<_> = (0..50)
        .map(|_| {
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(100);
                for _ in 0..100 {
                    let t = std::time::Instant::now();
                    let (code, body) = http_get(addr, "/readyz").await;
                    times.push(t.elapsed());
                    assert_eq!(code, 200, "{body}");
                }
                times
            })
        })
        .collect();
    let mut times = Vec::new();
    for c in clients {
        times.extend(c.await.unwrap());
    }
    let elapsed = started.elapsed();
    watcher.abort();
    times.sort();
    let p50 = times[times.len() / 2];
    let p99 = times[times.len() * 99 / 100];
    // The probes are Railyard's own statements: hooks see none of them, and
    // the metrics count them apart.
    assert!(
        seen.lock().unwrap().is_empty(),
        "hooks saw probe statements: {:?}",
        seen.lock().unwrap()
    );
    let queries: u64 = db
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix("railyard_health_probes_total "))
        .expect("the probe counter")
        .parse()
        .unwrap();
    assert!(queries >= 1, "no probe went to the server");
    let per_sec = queries as f64 / elapsed.as_secs_f64();
    let most = std::sync::atomic::AtomicI64::load(&backends, std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "5000 /readyz at concurrency 50 in {elapsed:.2?}: p50 {p50:.2?}, p99 {p99:.2?}; \
         {queries} probes went to the server ({per_sec:.1}/s); at most {most} backends"
    );
    assert!(
        most <= 4,
        "backends opened by the probes: {most}, pool size 4"
    );
    assert!(
        queries as f64 <= 2.0 + 3.0 * elapsed.as_secs_f64().ceil(),
        "{queries} queries in {elapsed:?}"
    );
    assert!(p99 < Duration::from_millis(100), "p99 {p99:?}");
}

#[tokio::test]
async fn a_retried_transaction_leaves_no_attempt_number_on_its_connection() {
    let seen: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let hook = {
        let seen = seen.clone();
        move |e: &QueryEvent<'_>| seen.lock().unwrap().push((e.sql.to_owned(), e.attempt))
    };
    // One connection: the read after the transaction reuses its connection.
    let db = support::ledger(|c| c.pool_max_size(1)).await;
    let db = Database::builder(db.config().clone())
        .hook(hook)
        .connect()
        .await
        .unwrap();
    let runs = std::sync::atomic::AtomicU32::new(0);
    db.transaction(async |conn| {
        if runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            conn.batch_execute("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001'; END $$")
                .await?;
        }
        conn.batch_execute("SELECT 1 AS in_the_transaction").await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    db.with_primary(async |conn| {
        conn.batch_execute("SELECT 1 AS after_the_transaction")
            .await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    let seen = seen.lock().unwrap().clone();
    let attempt_of = |needle: &str| {
        seen.iter()
            .find(|(sql, _)| sql.contains(needle))
            .unwrap_or_else(|| panic!("no event for {needle}: {seen:?}"))
            .1
    };
    assert_eq!(attempt_of("in_the_transaction"), 2, "{seen:?}");
    assert_eq!(attempt_of("after_the_transaction"), 1, "{seen:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn the_watchdog_cancels_statements_over_its_limit_and_logs_only_their_shape() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(capture.clone())
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // Its own application name: the watchdog leaves other tests' backends alone.
    let app = support::unique("watchdog");
    let base = support::ledger(|c| c.application_name(app.clone())).await;
    let limit = Duration::from_millis(300);
    let watchdog = railyard::observe::Watchdog::cancel_after(limit);
    let db = Database::builder(base.config().clone())
        .watchdog(watchdog)
        .connect()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let e = db
        .transaction(async |c| {
            diesel::sql_query("SELECT pg_sleep(10), 'marker-literal-4d2c' AS m, $1::text AS p")
                .bind::<Text, _>("marker-param-9b1e")
                .execute(c)
                .await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.class(), ErrorClass::Timeout, "{e}");
    assert_eq!(e.sqlstate().map(|s| s.code()), Some("57014"), "{e}");
    assert!(
        took >= limit && took < limit + 2 * watchdog.interval() + Duration::from_secs(1),
        "cancelled after {took:?} (limit {limit:?}, interval {:?})",
        watchdog.interval()
    );
    // Under the limit: left alone.
    db.with_primary(async |c| {
        diesel::sql_query("SELECT pg_sleep(0.1)").execute(c).await?;
        Ok::<_, Error>(())
    })
    .await
    .expect("a statement under the limit runs to its end");
    the_watchdog_leaves_other_programs_of_its_name_alone(&db, &app).await;
    db.close(Duration::from_secs(5)).await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let line = logs
        .lines()
        .find(|l| l.contains("railyard::audit") && l.contains("CANCEL"))
        .unwrap_or_else(|| panic!("no cancel in the audit log:\n{logs}"));
    assert!(line.contains("pg_sleep"), "the statement's shape: {line}");
    for needle in ["marker-literal-4d2c", "marker-param-9b1e", "pg_sleep(10)"] {
        assert!(
            !logs.contains(needle),
            "{needle:?} reached the logs: {line}"
        );
    }
}

/// Another program with the same `application_name` — in the same database
/// under the same user, and in another database — runs statements past the
/// watchdog's limit: neither is touched; `ours`'s own is cancelled. (Run from
/// the test that captures the audit log: tracing's per-callsite interest
/// makes a second test that fires the same callsite on a thread without
/// that subscriber lose the first test's event.)
async fn the_watchdog_leaves_other_programs_of_its_name_alone(ours: &Database, app: &str) {
    let Some(cluster) = support::cluster().await else {
        return;
    };
    let base = ours;
    // The same name, database and user: another program (no watchdog).
    let neighbour = Database::connect(base.config().clone()).await.unwrap();
    // The same name in another database of the server.
    let elsewhere = Database::connect(
        railyard::Config::new(cluster.primary_target("postgres")).application_name(app),
    )
    .await
    .unwrap();
    let sleep = async |db: &Database, secs: f64| {
        let started = std::time::Instant::now();
        let r = db
            .with_primary(async |c| {
                diesel::sql_query(format!("SELECT pg_sleep({secs})"))
                    .execute(c)
                    .await?;
                Ok::<_, Error>(())
            })
            .await;
        (r, started.elapsed())
    };
    let (own, same_db, other_db) = tokio::join!(
        sleep(ours, 10.0),
        sleep(&neighbour, 1.5),
        sleep(&elsewhere, 1.5)
    );
    let e = own.0.expect_err("this handle's statement is cancelled");
    assert_eq!(e.sqlstate().map(|s| s.code()), Some("57014"), "{e}");
    for (who, (r, took)) in [("same database", same_db), ("another database", other_db)] {
        r.unwrap_or_else(|e| panic!("{who}: the other program's statement was touched: {e}"));
        assert!(took >= Duration::from_millis(1500), "{who}: ran {took:?}");
    }
    for db in [neighbour, elsewhere] {
        db.close(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_configured_watchdog_runs_without_a_builder_call() {
    // Its own application name: the watchdog leaves other tests' backends alone.
    let app = support::unique("watchdog_config");
    let limit = Duration::from_millis(300);
    let db = support::ledger(|c| {
        c.application_name(app.clone())
            .watchdog_cancel_after(Some(limit))
    })
    .await;
    let started = std::time::Instant::now();
    let e = db
        .transaction(async |c| {
            diesel::sql_query("SELECT pg_sleep(5)").execute(c).await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.sqlstate().map(|s| s.code()), Some("57014"), "{e}");
    assert!(
        took >= limit && took < Duration::from_millis(1500),
        "cancelled after {took:?} (limit {limit:?})"
    );
    db.close(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "current_thread")]
async fn configured_repeat_detection_warns_without_a_builder_call() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(capture.clone())
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let db = support::ledger(|c| c.detect_repeats(Some(3))).await;
    db.transaction(async |c| {
        for i in 0..3 {
            diesel::sql_query("SELECT $1::int + 7003 AS n")
                .bind::<diesel::sql_types::Integer, _>(i)
                .execute(c)
                .await?;
        }
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    db.close(Duration::from_secs(5)).await;
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.lines()
            .any(|l| l.contains("railyard::n_plus_one") && l.contains("count=3")),
        "{logs}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_statement_repeated_in_one_operation_is_reported_once_by_shape() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(capture.clone())
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let base = support::ledger(|c| c).await;
    let db = Database::builder(base.config().clone())
        .detect_repeats(5)
        .connect()
        .await
        .unwrap();
    // Twelve lookups of one row each, in one transaction: an N+1.
    db.transaction(async |c| {
        for i in 0..12 {
            diesel::sql_query("SELECT $1::int + 7001 AS n")
                .bind::<diesel::sql_types::Integer, _>(i * 1000 + 913)
                .execute(c)
                .await?;
        }
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    // Four in another, and four more with constants instead of parameters:
    // each under the threshold, and each transaction counts on its own.
    for _ in 0..2 {
        db.transaction(async |c| {
            for i in 0..4 {
                diesel::sql_query("SELECT $1::int + 7001 AS n")
                    .bind::<diesel::sql_types::Integer, _>(i)
                    .execute(c)
                    .await?;
            }
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    }
    db.with_primary(async |c| {
        for i in 0..4 {
            c.batch_execute(&format!("SELECT {i} + 7002 AS n")).await?;
        }
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("railyard::n_plus_one"))
        .collect();
    assert_eq!(warnings.len(), 1, "{logs}");
    assert!(warnings[0].contains("count=5"), "{}", warnings[0]);
    assert!(warnings[0].contains("$1::int"), "{}", warnings[0]);
    for value in ["913", "7001", "1913"] {
        assert!(!warnings[0].contains(value), "{value} in {}", warnings[0]);
    }
}

#[tokio::test]
async fn slow_statements_get_their_plans_captured_off_the_request_path_without_values() {
    let base = support::ledger(|c| c).await;
    let db = Database::builder(base.config().clone())
        .capture_plans(railyard::observe::PlanCapture::slower_than(Duration::ZERO))
        .connect()
        .await
        .unwrap();
    db.with_primary(async |c| {
        diesel::sql_query(
            "SELECT id FROM orders WHERE symbol = $1 AND client_order_id = 'marker-lit-51aa' \
             AND quantity > 123457",
        )
        .bind::<Text, _>("marker-param-77b0")
        .execute(c)
        .await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    let waiting = std::time::Instant::now();
    let plan = loop {
        if let Some(p) = db
            .plans()
            .into_iter()
            .find(|p| p.statement.contains("FROM orders WHERE symbol = $1"))
        {
            break p;
        }
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "no plan captured: {:?}",
            db.plans()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        plan.nodes.iter().any(|n| n.contains("Scan")),
        "{:?}",
        plan.nodes
    );
    assert!(plan.total_cost > 0.0 && !plan.top.is_empty(), "{plan:?}");
    let json = serde_json::to_string(&plan).unwrap();
    assert!(
        json.contains("Filter") || json.contains("Index Cond"),
        "{json}"
    );
    for marker in ["marker-lit-51aa", "marker-param-77b0", "123457"] {
        assert!(
            !json.contains(marker),
            "{marker} in the captured plan: {json}"
        );
    }
    db.close(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_plan_that_changes_and_slows_down_under_a_running_workload_is_an_event_a_hook_call_and_a_health_reason()
 {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(capture.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let fresh = support::fresh_database("plan_change").await;
    let (tx, mut hooked) = tokio::sync::mpsc::unbounded_channel();
    let db = Database::builder(fresh.config.clone().pool_max_size(2))
        .capture_plans(
            railyard::observe::PlanCapture::slower_than(Duration::ZERO)
                .again_after(Duration::ZERO)
                .per_minute(100_000),
        )
        .on_plan_change(move |c| {
            let _ = tx.send(c.clone());
        })
        .connect()
        .await
        .unwrap();
    db.with_primary(async |c| {
        c.batch_execute(
            "CREATE TABLE t (id bigserial PRIMARY KEY, k int NOT NULL, pad text NOT NULL); \
             INSERT INTO t (k, pad) SELECT g, repeat('x', 100) FROM generate_series(1, 200000) g; \
             CREATE INDEX t_k_idx ON t (k); ANALYZE t",
        )
        .await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    let plan_of = |db: &Database| {
        db.plans()
            .into_iter()
            .find(|p| p.statement.contains("FROM t WHERE k = $1"))
    };
    // The workload: lookups, one after another, until told to stop.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workload = {
        let (db, stop) = (db.clone(), stop.clone());
        tokio::spawn(async move {
            let mut k = 0;
            while !std::sync::atomic::AtomicBool::load(&stop, std::sync::atomic::Ordering::Relaxed)
            {
                k += 1;
                db.with_primary(async |c| {
                    diesel::sql_query(
                        "SELECT pad FROM t WHERE k = $1 AND pad <> 'marker-lit-0d5e'",
                    )
                    .bind::<diesel::sql_types::Integer, _>(770_000 + k)
                    .execute(c)
                    .await?;
                    Ok::<_, Error>(())
                })
                .await
                .unwrap();
            }
        })
    };
    let waiting = std::time::Instant::now();
    while !plan_of(&db).is_some_and(|p| p.nodes.iter().any(|n| n.contains("Index"))) {
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "{:?}",
            db.plans()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(db.plan_changes().is_empty(), "{:?}", db.plan_changes());
    let before = db.health().await;
    let plans = before.checks.iter().find(|c| c.name == "plans").unwrap();
    assert_eq!(plans.status, railyard::HealthStatus::Healthy, "{plans:?}");
    // The index goes while the lookups run.
    db.with_primary(async |c| {
        c.batch_execute("DROP INDEX t_k_idx").await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    let change = tokio::time::timeout(Duration::from_secs(15), hooked.recv())
        .await
        .unwrap_or_else(|_| panic!("no plan change: {:?}", plan_of(&db)))
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    workload.await.unwrap();
    assert!(
        change.statement.contains("FROM t WHERE k = $1"),
        "{change:?}"
    );
    assert!(
        change.before.iter().any(|n| n.contains("Index")),
        "{change:?}"
    );
    assert!(change.after.iter().any(|n| n == "Seq Scan"), "{change:?}");
    assert!(change.after_ms >= 2.0 * change.before_ms, "{change:?}");
    assert_eq!(
        db.plan_changes().into_iter().next().map(|c| c.statement),
        Some(change.statement.clone())
    );
    // /health names it, degraded, with no value.
    let report = db.health().await;
    let plans = report.checks.iter().find(|c| c.name == "plans").unwrap();
    assert_eq!(plans.status, railyard::HealthStatus::Degraded, "{plans:?}");
    assert!(
        plans.reason.contains("FROM t WHERE k = $1") && plans.reason.contains("Seq Scan"),
        "{plans:?}"
    );
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("railyard::plans") && logs.contains("plan changed"),
        "{logs}"
    );
    if let Some(line) = logs.lines().find(|l| l.contains("plan changed")) {
        eprintln!("{line}");
    }
    eprintln!("{}: {}", plans.name, plans.reason);
    let json = report.to_json();
    for marker in ["marker-lit-0d5e", "770001", "770002"] {
        assert!(
            !json.contains(marker) && !logs.contains(marker),
            "{marker}: {json}\n{logs}"
        );
    }
    db.close(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_statement_that_cannot_be_explained_is_warned_about_once_without_its_values() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(capture.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let base = support::ledger(|c| c).await;
    let db = Database::builder(base.config().clone().pool_max_size(1))
        .capture_plans(
            railyard::observe::PlanCapture::slower_than(Duration::ZERO).again_after(Duration::ZERO),
        )
        .connect()
        .await
        .unwrap();
    for _ in 0..3 {
        // PREPARE cannot choose a generate_series for two untyped
        // parameters: the capture cannot explain it.
        db.with_primary(async |c| {
            diesel::sql_query(
                "SELECT g, 'marker-lit-a61f' AS x FROM generate_series($1, $2) g WHERE $3::text <> 'z'",
            )
            .bind::<diesel::sql_types::Integer, _>(1)
            .bind::<diesel::sql_types::Integer, _>(2)
            .bind::<Text, _>("marker-param-5c2e")
                .execute(c)
                .await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    }
    let waited = std::time::Instant::now();
    let logs = loop {
        let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        if logs.contains("plan capture") || waited.elapsed() > Duration::from_secs(10) {
            break logs;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        logs.matches("plan capture: cannot explain").count(),
        1,
        "{logs}"
    );
    assert!(
        logs.contains("WARN") && logs.contains("is not unique"),
        "{logs}"
    );
    assert!(
        !logs.contains("marker-lit-a61f") && !logs.contains("marker-param-5c2e"),
        "{logs}"
    );
    assert!(db.plans().is_empty());
    db.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_replica_monitors_polling_is_not_the_applications_traffic() {
    let Some(cluster) = support::cluster().await else {
        eprintln!("no local cluster: skipped");
        return;
    };
    let base = support::ledger(|c| c).await;
    let stats = railyard::StatementStats::new();
    let db = Database::builder(
        base.config().clone().replica(
            cluster
                .replica_socket_target(&support::ledger_name())
                .unwrap(),
        ),
    )
    .routing(railyard::RoutingConfig::default().check_interval(Duration::from_millis(20)))
    .hook(stats.clone())
    .connect()
    .await
    .unwrap();
    let before = db.activity().queries;
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Some 30 monitor rounds later: not one query counted.
    assert_eq!(db.activity().queries, before);
    assert!(
        stats
            .snapshot()
            .iter()
            .all(|s| !s.sql.contains("pg_is_in_recovery")),
        "{:?}",
        stats.snapshot()
    );
    assert!(db.replica_health()[0].replay_lsn.is_some());
    // Nor are the health probes (the primary's, the sizes'), although they
    // ride the application's pool.
    let calls = || stats.snapshot().iter().map(|s| s.calls).sum::<u64>();
    let calls_before = calls();
    let report = db.health().await;
    assert!(
        report.checks.iter().any(|c| c.name == "primary"),
        "{report:?}"
    );
    assert!(
        db.metrics_text()
            .contains("railyard_health_probes_total 2\n")
    );
    assert_eq!(db.activity().queries, before);
    assert_eq!(calls(), calls_before, "{:?}", stats.snapshot());
    db.close(Duration::from_secs(2)).await;
}
