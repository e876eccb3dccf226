//! Durable row changes from a logical replication slot (pgoutput), on a
//! private primary: nothing lost across consumer crashes, duplicates only
//! after the last acknowledgement, commit order kept; the retention warning;
//! a lost slot ends the stream with a clear error.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use diesel_async::SimpleAsyncConnection;
use railyard::{Config, Database, Error};
use railyard_events::{ChangeOp, ChangeStreamConfig, DatabaseEvents, ResumeToken};
use railyard_local::LocalCluster;

use crate::support;

async fn private(name: &str) -> (LocalCluster, Database) {
    let cluster = support::private_cluster(name, false).await;
    let db =
        Database::connect(Config::new(cluster.primary_socket_target("postgres")).pool_max_size(10))
            .await
            .unwrap();
    db.with_primary(async |c| {
        c.batch_execute(
            "CREATE TABLE ev (id bigserial PRIMARY KEY, writer int NOT NULL, seq int NOT NULL, note text)",
        )
        .await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    (cluster, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_arrives_in_commit_order_across_consumer_crashes_with_duplicates_only_after_the_last_ack()
 {
    const WRITERS: i32 = 8;
    const PER_TXN: i32 = 50;
    const TXNS: i32 = 250; // 8 × 250 × 50 = 100,000 changes
    let (cluster, db) = private("changes").await;
    let config = ChangeStreamConfig::new("ev_stream", ["ev"]);
    let mut stream = db.changes(config.clone()).await.unwrap();
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let db = db.clone();
            tokio::spawn(async move {
                for t in 0..TXNS {
                    db.with_primary(async |c| {
                        c.batch_execute(&format!(
                            "INSERT INTO ev (writer, seq) SELECT {w}, g FROM generate_series({}, {}) g",
                            t * PER_TXN,
                            t * PER_TXN + PER_TXN - 1
                        ))
                        .await?;
                        Ok::<_, Error>(())
                    })
                    .await
                    .unwrap();
                }
            })
        })
        .collect();

    let total = (WRITERS * PER_TXN * TXNS) as usize;
    let mut seen: BTreeSet<(i32, i32)> = BTreeSet::new();
    let mut deliveries = 0usize;
    let mut duplicates = 0usize;
    let mut crashes = 0;
    let mut last_acked: Option<ResumeToken> = None;
    let mut last_in_segment: Option<ResumeToken> = None;
    let mut per_writer: BTreeMap<i32, i32> = BTreeMap::new();
    let mut next_crash = 2_000 + rand::random::<u32>() as usize % 8_000;
    let mut since_crash = 0usize;
    while seen.len() < total {
        let event = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!("no change within 60 s: {} of {total} seen, {crashes} crashes, last acknowledged {last_acked:?}", seen.len())
            })
            .expect("the stream is open")
            .expect("no stream error");
        assert_eq!(event.op, ChangeOp::Insert);
        assert_eq!(event.table, "public.ev");
        // Commit order within a segment: positions only grow.
        if let Some(prev) = last_in_segment {
            assert!(event.token > prev, "{} after {prev}", event.token);
        }
        // None before the token a segment started from.
        if let Some(from) = last_acked {
            assert!(
                event.token > from,
                "{} redelivered, acknowledged up to {from}",
                event.token
            );
        }
        last_in_segment = Some(event.token);
        let new = event.new.as_ref().unwrap();
        let writer: i32 = new["writer"].as_deref().unwrap().parse().unwrap();
        let seq: i32 = new["seq"].as_deref().unwrap().parse().unwrap();
        deliveries += 1;
        if !seen.insert((writer, seq)) {
            duplicates += 1;
        } else {
            // Each writer's rows arrive in the order it committed them.
            let last = per_writer.entry(writer).or_insert(-1);
            assert!(seq > *last, "writer {writer}: {seq} after {last}");
            *last = seq;
        }
        since_crash += 1;
        // Acknowledge every 37th event.
        if deliveries.is_multiple_of(37) {
            stream.ack(&event.token);
            last_acked = Some(event.token);
        }
        // A crash: the consumer goes away without acknowledging the rest,
        // and a new one starts from the last acknowledged token.
        if since_crash >= next_crash && seen.len() < total {
            drop(stream);
            crashes += 1;
            since_crash = 0;
            next_crash = 2_000 + rand::random::<u32>() as usize % 8_000;
            last_in_segment = None;
            // Rows after the last acknowledgement may come again: forget
            // the order check's high-water marks for them.
            per_writer.clear();
            let mut c = config.clone();
            c.from = last_acked;
            stream = db.changes(c).await.unwrap();
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    eprintln!(
        "changes: {total} changes from {WRITERS} writers in {:.1?}: {deliveries} deliveries, {duplicates} duplicates (all after the last acknowledgement), {crashes} consumer crashes",
        started.elapsed()
    );
    assert!(crashes >= 10, "{crashes} crashes");
    assert_eq!(seen.len(), total);
    // Nothing more is pending once everything is acknowledged.
    drop(stream);
    assert!(db.drop_change_slot("ev_stream").await.unwrap());
    db.close(Duration::from_secs(2)).await;
    cluster.destroy().unwrap();
}

#[tokio::test]
async fn an_unacknowledged_slot_is_reported_over_its_limit_and_a_lost_slot_ends_the_stream() {
    let (cluster, db) = private("slot").await;
    let capture = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let mut stream = db
        .changes(
            ChangeStreamConfig::new("ev_retained", ["public.ev"]).warn_retained_bytes(64 * 1024),
        )
        .await
        .unwrap();
    db.with_primary(async |c| {
        c.batch_execute(
            "INSERT INTO ev (writer, seq, note) SELECT 1, g, repeat('x', 500) FROM generate_series(1, 2000) g; \
             UPDATE ev SET note = 'changed' WHERE seq = 1; DELETE FROM ev WHERE seq = 2",
        )
        .await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    let mut ops = Vec::new();
    while ops.len() < 2002 {
        let e = stream.next().await.unwrap().unwrap();
        ops.push((e.op, e.key.clone(), e.old_key.clone()));
    }
    assert_eq!(ops[2000].0, ChangeOp::Update);
    assert_eq!(ops[2001].0, ChangeOp::Delete);
    assert!(ops[2001].1.contains_key("id"), "{:?}", ops[2001]);
    // Nothing acknowledged: the slot keeps the WAL, over its limit.
    let waited = Instant::now();
    let check =
        loop {
            let report = db.health().await;
            if let Some(c) = report.checks.iter().find(|c| {
                c.name == "slot ev_retained" && c.status == railyard::HealthStatus::Degraded
            }) {
                break c.clone();
            }
            assert!(waited.elapsed() < Duration::from_secs(15), "{report:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
    eprintln!("changes: {}: {}", check.name, check.reason);
    assert!(
        check.reason.contains("over its limit of 65536"),
        "{}",
        check.reason
    );
    assert!(stream.retained_bytes().unwrap() > 64 * 1024);
    assert!(
        db.metrics_text()
            .contains("railyard_slot_retained_bytes{slot=\"ev_retained\"}")
    );
    drop(capture);
    // The slot disappears (as after a failover): the stream says so and ends.
    db.with_primary(async |c| {
        c.batch_execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'ev_retained' AND active_pid IS NOT NULL",
        )
        .await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    db.with_primary(async |c| {
        for _ in 0..50 {
            if c.batch_execute("SELECT pg_drop_replication_slot('ev_retained')")
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c.batch_execute("INSERT INTO ev (writer, seq) VALUES (9, 9)")
            .await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .unwrap()
        {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("the stream ended without saying why"),
        }
    };
    eprintln!("changes: {end}");
    assert!(
        matches!(end, railyard_events::Error::Changes(_)) && end.to_string().contains("snapshot"),
        "{end}"
    );
    assert!(stream.next().await.is_none());
    db.close(Duration::from_secs(2)).await;
    cluster.destroy().unwrap();
}

/// `railyard changes` prints changes as JSON lines with their tokens and
/// acknowledges what it printed; it starts again after a token, and refuses
/// a token its slot has moved past (the changes between would be skipped).
#[tokio::test]
async fn the_cli_prints_changes_with_tokens_and_resumes_after_one() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let (cluster, db) = private("changes_cli").await;
    let url = cluster.primary_socket_target("postgres").expose_url();
    let spawn = |extra: &[&str]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_railyard"))
            .args(["changes", "--tables", "ev", "--slot", "cli_test"])
            .args(extra)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", &url)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel::<serde_json::Value>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(serde_json::from_str(&line).unwrap());
            }
        });
        (child, lines)
    };
    let insert = async |from: i32, to: i32| {
        db.with_primary(async |c| {
            for i in from..=to {
                c.batch_execute(&format!("INSERT INTO ev (writer, seq) VALUES (1, {i})"))
                    .await?;
            }
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    };
    let (mut first, lines) = spawn(&[]);
    // The slot exists once the command has started.
    let started = Instant::now();
    loop {
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let n: Vec<N> = db
            .with_primary(async |c| {
                use diesel_async::RunQueryDsl;
                diesel::sql_query(
                    "SELECT count(*) AS n FROM pg_replication_slots WHERE slot_name = 'cli_test'",
                )
                .load(c)
                .await
                .map_err(Error::from)
            })
            .await
            .unwrap();
        if n[0].n == 1 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no slot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    insert(1, 3).await;
    let got: Vec<serde_json::Value> = (0..3)
        .map(|_| {
            lines
                .recv_timeout(Duration::from_secs(20))
                .expect("a change")
        })
        .collect();
    let seqs: Vec<&str> = got
        .iter()
        .map(|v| v["new"]["seq"].as_str().unwrap())
        .collect();
    assert_eq!(seqs, ["1", "2", "3"], "{got:?}");
    assert_eq!(got[0]["op"], "insert");
    assert_eq!(got[0]["table"], "public.ev");
    let token = |v: &serde_json::Value| v["token"].as_str().unwrap().to_owned();
    // What it printed, it acknowledged: the slot moves past the third.
    let third_end = u64::from_str_radix(token(&got[2]).split('.').next().unwrap(), 16).unwrap();
    let started = Instant::now();
    loop {
        #[derive(diesel::QueryableByName)]
        struct At {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            at: i64,
        }
        let at: Vec<At> = db
            .with_primary(async |c| {
                use diesel_async::RunQueryDsl;
                diesel::sql_query(
                    "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, '0/0')::int8 AS at \
                     FROM pg_replication_slots WHERE slot_name = 'cli_test'",
                )
                .load(c)
                .await
                .map_err(Error::from)
            })
            .await
            .unwrap();
        if at[0].at as u64 >= third_end {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the slot did not move past the printed {}",
            token(&got[2])
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = first.kill();
    let _ = first.wait();
    insert(4, 6).await;
    let (mut second, lines) = spawn(&["--from", &token(&got[2])]);
    let again: Vec<serde_json::Value> = (0..3)
        .map(|_| {
            lines
                .recv_timeout(Duration::from_secs(20))
                .expect("a change")
        })
        .collect();
    let _ = second.kill();
    let _ = second.wait();
    let seqs: Vec<&str> = again
        .iter()
        .map(|v| v["new"]["seq"].as_str().unwrap())
        .collect();
    assert_eq!(seqs, ["4", "5", "6"], "after {}: {again:?}", token(&got[2]));
    // An older token is refused, naming the slot and the token: starting
    // there would skip the third change without a word.
    let stale = token(&got[1]);
    let mut third = Command::new(env!("CARGO_BIN_EXE_railyard"))
        .args([
            "changes", "--tables", "ev", "--slot", "cli_test", "--from", &stale,
        ])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", &url)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = third.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = third.kill();
            let _ = third.wait();
            panic!("a token the slot moved past was not refused");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut third.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("has moved past token")
            && stderr.contains(&stale)
            && stderr.contains("cli_test"),
        "{stderr}"
    );
    assert!(!stderr.contains(&url), "{stderr}");
    let status = Command::new(env!("CARGO_BIN_EXE_railyard"))
        .args(["changes", "--slot", "cli_test", "--drop-slot"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", &url)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    db.close(Duration::from_secs(2)).await;
    cluster.destroy().unwrap();
}
