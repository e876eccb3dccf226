//! Graceful shutdown against the real server: `Database::close` lets work in
//! flight finish, cancels what outlives the deadline, leaves no backend
//! behind and stops the replica monitors; `serve` turns /readyz red first and
//! exits 0 within its timeout on SIGTERM.

use std::time::{Duration, Instant};

use diesel_async::RunQueryDsl;
use railyard::error::RetriesExhausted;
use railyard::{Config, Database, Error, ErrorClass, HealthStatus};

use crate::support;

/// Backends of `app` on the primary.
async fn backends(app: &str) -> i64 {
    support::count_admin(&format!(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = '{app}'"
    ))
    .await
}

/// Backends of `app` on the local cluster's replica (`None` without one).
async fn replica_backends(app: &str) -> Option<i64> {
    let cluster = support::cluster().await?;
    let url = format!(
        "{}&target_session_attrs=any",
        cluster.replica_socket_target("postgres")?.expose_url()
    );
    let config = Config::from_url(&url).unwrap();
    Some(
        support::count(
            &config,
            &format!("SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = '{app}'"),
        )
        .await,
    )
}

/// Waits (up to 2 s) until no backend of `app` is left on the primary or the
/// replica; returns how long that took after the client side had closed.
async fn no_backends_left(app: &str) -> Duration {
    let started = Instant::now();
    for check in 1.. {
        let primary = backends(app).await;
        let replica = replica_backends(app).await.unwrap_or(0);
        if primary == 0 && replica == 0 {
            eprintln!("no backend of {app} left (check {check})");
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "backends of {app} left: {primary} on the primary, {replica} on the replica"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    unreachable!("the loop returns or fails")
}

/// A handle on the shared ledger database, named `app` on the server, with
/// the local cluster's replica when there is one (so that monitors run).
async fn ledger_named(app: &str, pool: u32) -> Database {
    let base = support::ledger(|c| c).await;
    let mut config = base
        .config()
        .clone()
        .pool_max_size(pool)
        .application_name(app);
    if let Some(c) = support::cluster().await {
        config = config.replica(c.replica_socket_target(&support::ledger_name()).unwrap());
    }
    Database::builder(config)
        .routing(railyard::RoutingConfig::default().check_interval(Duration::from_millis(50)))
        .connect()
        .await
        .unwrap()
}

/// Waits until `n` statements of `app` run `pg_sleep` on the server.
async fn sleeping(app: &str, n: i64) {
    let started = Instant::now();
    loop {
        let running = support::count_admin(&format!(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = '{app}' \
             AND state = 'active' AND query LIKE '%pg_sleep%'"
        ))
        .await;
        if running >= n {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{running} of {n} statements of {app} started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A transaction that adds a user, then sleeps on the server.
async fn add_then_sleep(db: &Database, email: &str, secs: f64) -> Result<(), Error> {
    db.transaction(async |conn| {
        support::insert_user(conn, email).await?;
        diesel::sql_query(format!("SELECT pg_sleep({secs})"))
            .execute(conn)
            .await?;
        Ok::<_, Error>(())
    })
    .await
}

async fn committed(email: &str) -> i64 {
    let db = support::ledger(|c| c).await;
    let mut conn = db.primary().await.unwrap();
    support::count_user(&mut conn, email).await.unwrap()
}

#[tokio::test]
async fn close_lets_short_work_commit_cancels_long_work_at_the_deadline_and_leaves_nothing() {
    let app = support::unique("close");
    let db = ledger_named(&app, 4).await;
    let replicas = db.config().replicas().len();
    let clone = db.clone();
    let emails: Vec<String> = (0..4)
        .map(|i| format!("{}-{i}@example.test", support::unique("close")))
        .collect();
    let mut work = Vec::new();
    for (i, email) in emails.iter().enumerate() {
        let (db, email) = (db.clone(), email.clone());
        // Three finish within the deadline; the fourth would run 30 s.
        let secs = if i < 3 { 0.3 } else { 30.0 };
        work.push(tokio::spawn(async move {
            let started = Instant::now();
            let r = add_then_sleep(&db, &email, secs).await;
            (r, started.elapsed())
        }));
    }
    sleeping(&app, 4).await;

    let deadline = Duration::from_secs(1);
    let called = Instant::now();
    let closing = db.close(deadline);
    // Refused at once, before the close is even polled, on every path and
    // on every clone.
    assert!(clone.is_closed());
    let refused = Instant::now();
    let e = clone.primary().await.unwrap_err();
    assert!(matches!(e, Error::Closed { source: None }), "{e}");
    assert_eq!(e.class(), ErrorClass::Permanent);
    assert!(e.to_string().contains("shutting down"), "{e}");
    let e = add_then_sleep(&clone, "never@example.test", 0.0)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Closed { source: None }), "{e}");
    let e = clone
        .read(async |conn| {
            diesel::sql_query("SELECT 1").execute(conn).await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Closed { source: None }), "{e}");
    assert!(
        refused.elapsed() < Duration::from_millis(100),
        "refusals took {:?}",
        refused.elapsed()
    );

    let report = closing.await;
    let took = called.elapsed();
    eprintln!("close: {report}");
    assert!(took >= deadline, "{took:?}");
    assert!(
        took < deadline + railyard::database::CLOSE_GRACE,
        "close took {took:?}"
    );
    assert_eq!(
        (
            report.in_flight,
            report.finished,
            report.cancelled,
            report.severed
        ),
        (4, 3, 1, 0),
        "{report:?}"
    );
    assert_eq!(
        report.monitors_stopped,
        if replicas > 0 { replicas + 1 } else { 0 }
    );

    for (i, w) in work.into_iter().enumerate() {
        let (r, elapsed) = w.await.unwrap();
        if i < 3 {
            r.unwrap_or_else(|e| panic!("short transaction {i}: {e}"));
            assert_eq!(committed(&emails[i]).await, 1, "short transaction {i}");
        } else {
            let e = r.unwrap_err();
            eprintln!("the long transaction after {elapsed:.2?}: {e}");
            assert!(matches!(e, Error::Closed { source: Some(_) }), "{e}");
            assert_eq!(e.class(), ErrorClass::Permanent);
            assert_eq!(e.sqlstate().map(|s| s.code()), Some("57014"), "{e}");
            assert!(e.to_string().contains("cancelled"), "{e}");
            let cause = std::error::Error::source(&e).expect("the cancelled query");
            assert!(cause.to_string().contains("57014"), "{cause}");
            assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
            assert_eq!(committed(&emails[i]).await, 0, "rolled back");
        }
    }

    let gone = no_backends_left(&app).await;
    eprintln!("no backend of the handle left {gone:.2?} after close returned");
    for p in db.pool_status() {
        assert!(p.closed, "{p:?}");
        assert_eq!((p.connections, p.idle), (0, 0), "{p:?}");
    }
    let health = db.health().await;
    assert_eq!(health.status, HealthStatus::Unhealthy);
    assert_eq!(health.checks[0].name, "shutdown");
    assert_eq!(db.readiness().await.status, HealthStatus::Unhealthy);

    // Again, and on a clone: the same report, at once.
    let again = Instant::now();
    assert_eq!(clone.close(Duration::from_secs(30)).await, report);
    assert!(again.elapsed() < Duration::from_millis(50));
}

#[tokio::test]
async fn a_connection_held_idle_in_a_transaction_past_the_deadline_is_severed() {
    let app = support::unique("sever");
    let db = ledger_named(&app, 2).await;
    let email = format!("{}@example.test", support::unique("sever"));
    let held = {
        let (db, email) = (db.clone(), email.clone());
        tokio::spawn(async move {
            db.transaction(async |conn| {
                support::insert_user(conn, &email).await?;
                // Idle in transaction on the server: nothing to cancel.
                tokio::time::sleep(Duration::from_secs(2)).await;
                diesel::sql_query("SELECT 1").execute(conn).await?;
                Ok::<_, Error>(())
            })
            .await
        })
    };
    let started = Instant::now();
    loop {
        let idle = support::count_admin(&format!(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = '{app}' \
             AND state = 'idle in transaction'"
        ))
        .await;
        if idle == 1 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = db.close(Duration::from_millis(200)).await;
    eprintln!("close: {report}");
    assert_eq!((report.cancelled, report.severed), (1, 1), "{report:?}");
    // The holder is still asleep, and its server session is gone already.
    assert!(!held.is_finished());
    no_backends_left(&app).await;
    let e = held.await.unwrap().unwrap_err();
    assert!(matches!(e, Error::Closed { source: Some(_) }), "{e}");
    assert_eq!(committed(&email).await, 0);
}

#[tokio::test]
async fn work_that_fails_retryably_while_the_handle_closes_is_not_retried() {
    let app = support::unique("noretry");
    let db = ledger_named(&app, 2).await;
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let work = {
        let (db, attempts) = (db.clone(), attempts.clone());
        tokio::spawn(async move {
            let db = &db;
            db.transaction(async |conn| {
                attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // In the server until the close has begun (a fixed sleep
                // raced the close on a loaded machine), at most 10 s.
                let waiting = std::time::Instant::now();
                while !db.is_closed() && waiting.elapsed() < Duration::from_secs(10) {
                    diesel::sql_query("SELECT pg_sleep(0.02)")
                        .execute(conn)
                        .await?;
                }
                // A serialization failure: retried, unless the handle closes.
                diesel::sql_query(
                    "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$",
                )
                .execute(conn)
                .await?;
                Ok::<_, Error>(())
            })
            .await
        })
    };
    sleeping(&app, 1).await;
    let report = db.close(Duration::from_secs(5)).await;
    let e = work.await.unwrap().unwrap_err();
    eprintln!("close: {report}; the work: {e}");
    // (`RunQueryDsl::load` is in scope: name the atomic's.)
    assert_eq!(
        std::sync::atomic::AtomicU32::load(&attempts, std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(e.class(), ErrorClass::RetryTransaction, "{e}");
    assert_eq!(
        e.retries_exhausted(),
        Some(RetriesExhausted::Closing),
        "{e}"
    );
    assert!(e.to_string().contains("shutting down"), "{e}");
    assert_eq!((report.finished, report.cancelled), (1, 0), "{report:?}");
    assert!(report.took < Duration::from_secs(2), "{report:?}");
}

mod serve {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use super::{backends, no_backends_left};
    use crate::support;

    /// One HTTP/1.1 request; `None` when nothing listens.
    async fn get(addr: &str, path: &str) -> Option<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.ok()?;
        buf.split_whitespace().nth(1)?.parse().ok()
    }

    #[tokio::test]
    async fn serve_turns_readyz_red_on_sigterm_then_drains_and_exits_0_within_the_timeout() {
        let base = support::ledger(|c| c).await;
        let app = support::unique("serve");
        let timeout = Duration::from_secs(5);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_railyard"));
        cmd.args(["serve", "--addr", "127.0.0.1:0"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", std::env::var_os("HOME").unwrap_or_default())
            .env("DATABASE_URL", base.config().primary().expose_url())
            .env("RAILYARD_APPLICATION_NAME", &app)
            .env("RAILYARD_SHUTDOWN_TIMEOUT", "5s")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(c) = support::cluster().await {
            cmd.env(
                "DATABASE_REPLICA_URLS",
                c.replica_socket_target(&support::ledger_name())
                    .unwrap()
                    .expose_url(),
            );
        }
        let mut child = cmd.spawn().expect("the binary runs");
        let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
        let mut seen = Vec::new();
        let addr = loop {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .expect("serve prints where it listens");
            seen.push(line.clone());
            if let Some(rest) = line.split("http://").nth(1) {
                break rest.trim().to_owned();
            }
        };
        let ready = Instant::now();
        while get(&addr, "/readyz").await != Some(200) {
            assert!(ready.elapsed() < Duration::from_secs(10), "never ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(backends(&app).await > 0, "the server holds connections");

        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let signalled = Instant::now();
        let mut red_at = None;
        let mut served_while_red = 0;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            match get(&addr, "/readyz").await {
                Some(503) => {
                    red_at.get_or_insert(signalled.elapsed());
                    if get(&addr, "/healthz").await == Some(200) {
                        served_while_red += 1;
                    }
                }
                Some(200) => assert!(red_at.is_none(), "ready again after going red"),
                _ => {}
            }
            assert!(
                signalled.elapsed() < timeout + Duration::from_secs(2),
                "still running after {:?}",
                signalled.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let exited = signalled.elapsed();
        // Its last lines may still be on their way through the reader
        // thread: read until the pipe's end (the thread then drops its
        // sender), not just what already arrived.
        while let Ok(line) = lines.recv_timeout(Duration::from_secs(10)) {
            seen.push(line);
        }
        eprintln!(
            "serve: /readyz red {red_at:?} after SIGTERM, {served_while_red} requests served while red, exit {status} after {exited:.2?}\n{}",
            seen.join("\n")
        );
        assert!(status.success(), "{status}");
        let red_at = red_at.expect("/readyz answered 503 before the exit");
        assert!(red_at < Duration::from_millis(500), "{red_at:?}");
        assert!(served_while_red > 0, "requests are still served while red");
        assert!(exited < timeout, "exited after {exited:?}");
        assert!(
            seen.iter().any(|l| l.starts_with("database closed:")),
            "{seen:?}"
        );
        no_backends_left(&app).await;
    }
}
