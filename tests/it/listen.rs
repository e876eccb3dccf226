//! LISTEN/NOTIFY through Railyard: order, gaps after a terminated backend and
//! a restarted server, the payload limit, and closing.

use std::time::{Duration, Instant};

use railyard::{Config, Database, Error};
use railyard_events::{DatabaseEvents, ListenEvent};

use crate::support;

async fn next(l: &mut railyard_events::Listener) -> ListenEvent {
    tokio::time::timeout(Duration::from_secs(20), l.next())
        .await
        .expect("an event within 20 s")
        .expect("the listener is open")
}

/// The pid of the backend listening on `channel`.
async fn listener_pid(admin: &Database, channel: &str) -> i32 {
    #[derive(diesel::QueryableByName)]
    struct Pid {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        pid: i32,
    }
    let started = Instant::now();
    loop {
        let pids: Vec<Pid> = admin
            .with_primary(async |c| {
                use diesel_async::RunQueryDsl;
                diesel::sql_query(
                    // Idle: the LISTEN has completed. It takes effect when
                    // it commits; a notification sent while it is still
                    // running is not delivered (that was a flaky wait).
                    "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND query LIKE $1 AND state = 'idle'",
                )
                .bind::<diesel::sql_types::Text, _>(format!("%{channel}%"))
                .load(c)
                .await
                .map_err(Error::from)
            })
            .await
            .unwrap();
        if let Some(p) = pids.first() {
            return p.pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no listening backend"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn notifications_arrive_in_order_and_a_terminated_backend_gives_a_gap_then_listening_resumes()
{
    let db = support::ledger(|c| c).await;
    let channel = support::unique("orders");
    let mut l = db.listen([channel.as_str()]).await.unwrap();
    for i in 0..200 {
        db.notify(&channel, &format!("n{i}")).await.unwrap();
    }
    for i in 0..200 {
        match next(&mut l).await {
            ListenEvent::Notification(n) => {
                assert_eq!(
                    (n.channel.as_str(), n.payload.as_str()),
                    (channel.as_str(), format!("n{i}").as_str())
                );
            }
            other => panic!("{other:?} at {i}"),
        }
    }
    // Its backend is terminated: a gap, then notifications again.
    let pid = listener_pid(&db, &channel).await;
    db.with_primary(async |c| {
        use diesel_async::SimpleAsyncConnection;
        c.batch_execute(&format!("SELECT pg_terminate_backend({pid})"))
            .await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    let gap = next(&mut l).await;
    let ListenEvent::Gap(g) = gap else {
        panic!("expected a gap, got {gap:?}")
    };
    eprintln!("listen: gap after a terminated backend: {g:?}");
    assert!(g.attempts >= 1);
    assert_ne!(listener_pid(&db, &channel).await, pid);
    db.notify(&channel, "after").await.unwrap();
    match next(&mut l).await {
        ListenEvent::Notification(n) => assert_eq!(n.payload, "after"),
        other => panic!("{other:?}"),
    }
    // Closing the database ends the stream, promptly.
    let started = Instant::now();
    db.close(Duration::from_secs(5)).await;
    let end = tokio::time::timeout(Duration::from_secs(10), l.next())
        .await
        .unwrap();
    assert!(end.is_none(), "{end:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_payload_over_the_servers_limit_is_refused_before_it_is_sent() {
    let db = support::ledger(|c| c).await;
    let channel = support::unique("big");
    let mut l = db.listen([channel.as_str()]).await.unwrap();
    let e = db.notify(&channel, &"x".repeat(8000)).await.unwrap_err();
    assert!(matches!(e, railyard_events::Error::Notify(_)), "{e:?}");
    assert!(
        e.to_string().contains("8000 bytes") && e.to_string().contains("7999"),
        "{e}"
    );
    let max = "y".repeat(railyard_events::MAX_PAYLOAD);
    db.notify(&channel, &max).await.unwrap();
    match next(&mut l).await {
        ListenEvent::Notification(n) => assert_eq!(n.payload, max),
        other => panic!("{other:?}"),
    }
    assert!(db.listen(Vec::<String>::new()).await.is_err());
    assert!(db.listen(["x".repeat(64)]).await.is_err());
}

#[tokio::test]
async fn a_restarted_server_gives_a_gap_and_listening_resumes() {
    let cluster = support::private_cluster("listen", false).await;
    let db =
        Database::connect(Config::new(cluster.primary_socket_target("postgres")).pool_max_size(2))
            .await
            .unwrap();
    let mut l = db.listen(["events", "other"]).await.unwrap();
    db.notify("events", "before").await.unwrap();
    match next(&mut l).await {
        ListenEvent::Notification(n) => assert_eq!(n.payload, "before"),
        other => panic!("{other:?}"),
    }
    cluster.restart_primary().unwrap();
    let gap = next(&mut l).await;
    let ListenEvent::Gap(g) = gap else {
        panic!("expected a gap, got {gap:?}")
    };
    eprintln!("listen: gap after a server restart: {g:?}");
    // The pool's connections died too: the first notify may meet one.
    let started = Instant::now();
    while db.notify("other", "after").await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match next(&mut l).await {
        ListenEvent::Notification(n) => {
            assert_eq!((n.channel.as_str(), n.payload.as_str()), ("other", "after"))
        }
        other => panic!("{other:?}"),
    }
    drop(l);
    db.close(Duration::from_secs(2)).await;
    cluster.destroy().unwrap();
}

/// `railyard listen` prints notifications and gap markers as JSON lines.
#[tokio::test]
async fn the_cli_prints_notifications_and_gap_markers_as_json_lines() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let db = support::ledger(|c| c).await;
    let channel = support::unique("cli");
    let mut child = Command::new(env!("CARGO_BIN_EXE_railyard"))
        .args(["listen", &channel])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", db.config().primary().expose_url())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // The child goes when the test ends, a failing one included.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(child);
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The next line, waited for off the runtime's thread.
    let lines = std::sync::Arc::new(std::sync::Mutex::new(lines));
    let next_line = || {
        let lines = lines.clone();
        async move {
            let line = tokio::task::spawn_blocking(move || {
                lines
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(15))
                    .expect("a line")
            })
            .await
            .unwrap();
            serde_json::from_str::<serde_json::Value>(&line)
                .unwrap_or_else(|e| panic!("{e}: {line}"))
        }
    };
    let pid = listener_pid(&db, &channel).await;
    db.notify(&channel, "one").await.unwrap();
    // Printed before the backend goes: a notification the backend had not
    // yet handed over when it was terminated would be lost with it (the
    // gap says so), and this test would wait for it in vain.
    let first = next_line().await;
    assert_eq!(first["notification"]["payload"], "one", "{first:?}");
    db.with_primary(async |c| {
        use diesel_async::SimpleAsyncConnection;
        c.batch_execute(&format!("SELECT pg_terminate_backend({pid})"))
            .await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    // The new backend listens before the second notification is sent.
    let started = Instant::now();
    while listener_pid(&db, &channel).await == pid {
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    db.notify(&channel, "two").await.unwrap();
    let got = [next_line().await, next_line().await];
    assert!(
        got[0]["gap"]["reason"].as_str().unwrap().contains("57P01"),
        "{got:?}"
    );
    assert_eq!(got[1]["notification"]["payload"], "two", "{got:?}");
    assert_eq!(got[1]["notification"]["channel"], channel.as_str());
}
