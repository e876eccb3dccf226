//! Faults on the wire, through the fault-injecting proxy (`proxy.rs`): the
//! ambiguous commit, made deterministic.
//!
//! A cut right after COMMIT is forwarded, before its reply: the server
//! committed and the client never heard. Railyard must say `Ambiguous`
//! (never `Reconnect`), retry nothing, and discard the connection; the row is
//! on the server; the caller resolves the outcome with the row's unique key
//! (`INSERT … ON CONFLICT (key) DO NOTHING`, then a lookup by key). A cut
//! before COMMIT is sent (at a statement inside the transaction) is a failure
//! the retry may repair, and it does.

use std::time::Duration;

use diesel::sql_types::{BigInt, Text};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use railyard::{Config, Database, Error, ErrorClass};

use crate::proxy::{Cut, Frame, Proxy};
use crate::support;

// The ledger's accounts, for statements diesel prepares once per connection
// and caches (an uncached statement is closed with a request of its own).
diesel::table! {
    accounts (id) {
        id -> Int8,
        balance_cents -> Int8,
    }
}

/// The attempts an operation's counter recorded.
fn attempts_made(a: &std::sync::atomic::AtomicU32) -> u32 {
    std::sync::atomic::AtomicU32::load(a, std::sync::atomic::Ordering::SeqCst)
}

/// A database reached through a proxy to the shared cluster's primary, with
/// a table of keyed rows; `None` without the local cluster.
async fn through_proxy(name: &str) -> Option<(Proxy, Database, String)> {
    let cluster = support::cluster().await?;
    support::ledger(|c| c).await;
    let upstream = cluster
        .socket_dir()
        .join(format!(".s.PGSQL.{}", cluster.primary_port()));
    let proxy = Proxy::start(upstream).await;
    let url = proxy_url(&proxy).await;
    let db = Database::connect(Config::from_url(&url).unwrap().pool_max_size(2))
        .await
        .unwrap();
    let table = support::unique(name);
    db.with_primary(async |c| {
        c.batch_execute(&format!(
            "CREATE TABLE {table} (key text PRIMARY KEY, amount bigint NOT NULL)"
        ))
        .await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    Some((proxy, db, table))
}

/// The ledger database of the shared cluster, reached through `proxy`
/// (plain TCP to the proxy; the proxy uses the server's Unix socket).
async fn proxy_url(proxy: &Proxy) -> String {
    let cluster = support::cluster().await.expect("the local cluster");
    format!(
        "postgres://railyard:{}@127.0.0.1:{}/{}?sslmode=disable",
        cluster.password().expose(),
        proxy.port,
        support::ledger_name()
    )
}

async fn rows(db: &Database, table: &str, key: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let n: Vec<N> = db
        .with_primary(async |c| {
            diesel::sql_query(format!("SELECT count(*) AS n FROM {table} WHERE key = $1"))
                .bind::<Text, _>(key)
                .load(c)
                .await
                .map_err(Error::from)
        })
        .await
        .unwrap();
    n[0].n
}

async fn drop_table(db: &Database, table: &str) {
    let _ = db
        .with_primary(async |c| {
            c.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
                .await?;
            Ok::<_, Error>(())
        })
        .await;
}

/// A COMMIT (Railyard commits with a simple query).
fn is_commit(f: &Frame<'_>) -> bool {
    f.kind == b'Q'
        && f.sql
            .is_some_and(|s| s.trim_start().to_ascii_uppercase().starts_with("COMMIT"))
}

fn inserts_into(table: &str) -> impl Fn(&Frame<'_>) -> bool + Send + Sync + 'static {
    let needle = format!("INSERT INTO {table}");
    move |f| f.sql.is_some_and(|s| s.contains(&needle))
}

/// The documented pattern: the row's unique key makes the write safe to
/// apply again, and a lookup by key says whether it happened.
async fn insert_keyed(c: &mut railyard::Conn, table: &str, key: &str) -> Result<(), Error> {
    diesel::sql_query(format!(
        "INSERT INTO {table} (key, amount) VALUES ($1, 100) ON CONFLICT (key) DO NOTHING"
    ))
    .bind::<Text, _>(key)
    .execute(c)
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_commit_whose_reply_is_lost_is_ambiguous_not_retried_and_the_row_is_there() {
    let Some((proxy, db, table)) = through_proxy("ambiguous_tx").await else {
        return;
    };
    let key = "transfer-1";
    let attempts = std::sync::atomic::AtomicU32::new(0);
    let before = proxy.accepted();
    proxy.arm(Cut::After(Box::new(is_commit)));
    let e = db
        .transaction(async |c| {
            attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            insert_keyed(c, &table, key).await
        })
        .await
        .unwrap_err();
    assert_eq!(proxy.cuts(), 1);
    assert_eq!(e.class(), ErrorClass::Ambiguous, "{e:?}");
    assert!(matches!(e, Error::Ambiguous(_)), "{e:?}");
    assert_eq!(attempts_made(&attempts), 1, "nothing is retried");
    // The server committed: a blind retry would have written it twice.
    assert_eq!(rows(&db, &table, key).await, 1);
    // The pool did not keep the connection: the next check-out is a new one.
    let broken = db.pool_status()[0].connections_closed_broken;
    assert!(broken >= 1, "{:?}", db.pool_status());
    assert!(proxy.accepted() > before, "a new connection was opened");
    // Resolving it: the key says it happened; applying again changes nothing.
    db.transaction(async |c| insert_keyed(c, &table, key).await)
        .await
        .unwrap();
    assert_eq!(rows(&db, &table, key).await, 1);
    drop_table(&db, &table).await;
    db.close(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn an_autocommit_write_whose_reply_is_lost_is_ambiguous_not_retried_and_the_row_is_there() {
    let Some((proxy, db, table)) = through_proxy("ambiguous_write").await else {
        return;
    };
    let key = "deposit-1";
    let attempts = std::sync::atomic::AtomicU32::new(0);
    proxy.arm(Cut::After(Box::new(inserts_into(&table))));
    let e = db
        .write(async |c| {
            attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            insert_keyed(c, &table, key).await
        })
        .await
        .unwrap_err();
    assert_eq!(proxy.cuts(), 1);
    assert_eq!(e.class(), ErrorClass::Ambiguous, "{e:?}");
    assert_eq!(attempts_made(&attempts), 1);
    assert_eq!(rows(&db, &table, key).await, 1, "the server committed it");
    // Not even an idempotent write is retried blindly on its own key… it is
    // the caller's key that makes re-applying safe:
    db.write(async |c| insert_keyed(c, &table, key).await)
        .await
        .unwrap();
    assert_eq!(rows(&db, &table, key).await, 1);

    // Cut instead of forwarding: the client cannot tell the difference (it
    // wrote the bytes), so it is ambiguous too, and the row is not there;
    // the same resolution writes it once.
    let key = "deposit-2";
    proxy.arm(Cut::Before(Box::new(inserts_into(&table))));
    let e = db
        .write(async |c| insert_keyed(c, &table, key).await)
        .await
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::Ambiguous, "{e:?}");
    assert_eq!(rows(&db, &table, key).await, 0, "the server never saw it");
    db.write(async |c| insert_keyed(c, &table, key).await)
        .await
        .unwrap();
    assert_eq!(rows(&db, &table, key).await, 1);
    drop_table(&db, &table).await;
    db.close(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_cut_before_commit_is_sent_is_retried_and_the_row_is_written_once() {
    let Some((proxy, db, table)) = through_proxy("before_commit").await else {
        return;
    };
    let key = "transfer-2";
    let attempts = std::sync::atomic::AtomicU32::new(0);
    // The connection dies at the transaction's INSERT: COMMIT is never sent.
    proxy.arm(Cut::Before(Box::new(inserts_into(&table))));
    db.transaction(async |c| {
        attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        insert_keyed(c, &table, key).await
    })
    .await
    .unwrap();
    assert_eq!(proxy.cuts(), 1);
    assert_eq!(attempts_made(&attempts), 2, "retried once");
    assert_eq!(rows(&db, &table, key).await, 1);
    drop_table(&db, &table).await;
    db.close(Duration::from_secs(2)).await;
}

/// A black hole in the middle of a transaction's query: the operation ends
/// at its deadline with class Timeout, the connection is not reused, and the
/// pool still serves (no slot leaked).
#[tokio::test]
async fn a_black_holed_query_ends_at_the_deadline_and_leaks_no_pool_slot() {
    let Some((proxy, db, table)) = through_proxy("black_hole").await else {
        return;
    };
    proxy.arm(Cut::BlackHole(Box::new(inserts_into(&table))));
    let started = std::time::Instant::now();
    let e = db
        .build_transaction()
        .timeout(Duration::from_millis(500))
        .run(async |c| insert_keyed(c, &table, "held").await)
        .await
        .unwrap_err();
    let detected = started.elapsed();
    eprintln!("wire: a black-holed query ended after {detected:?} (deadline 500 ms): {e}");
    assert_eq!(e.class(), ErrorClass::Timeout, "{e:?}");
    assert!(detected < Duration::from_millis(1500), "{detected:?}");
    // The pool (2 connections) serves on: more operations than its size.
    for i in 0..5 {
        tokio::time::timeout(
            Duration::from_secs(5),
            db.transaction(async |c| insert_keyed(c, &table, &format!("after-{i}")).await),
        )
        .await
        .expect("the pool serves after a black hole")
        .unwrap();
    }
    let waited = std::time::Instant::now();
    loop {
        let p = &db.pool_status()[0];
        if p.connections.saturating_sub(p.idle) == 0 {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(5),
            "a slot stays in use: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop_table(&db, &table).await;
    db.close(Duration::from_secs(2)).await;
    drop(proxy);
}

/// With no deadline of its own, a black-holed statement is bounded by the
/// configured statement timeout plus a grace: the server's timeout cannot
/// reach the client through a dead link, so the connection's stall watch
/// gives up on it. In a transaction the statement had not reached COMMIT:
/// the transaction is retried on a new connection and succeeds. An
/// autocommit write is ambiguous (its bytes were written).
#[tokio::test]
async fn a_black_holed_statement_without_a_deadline_ends_at_the_statement_timeout_plus_grace() {
    let Some((proxy, _db, table)) = through_proxy("stall").await else {
        return;
    };
    let url = proxy_url(&proxy).await;
    let db = Database::connect(
        Config::from_url(&url)
            .unwrap()
            .pool_max_size(2)
            .statement_timeout(Some(Duration::from_millis(300))),
    )
    .await
    .unwrap();
    let attempts = std::sync::atomic::AtomicU32::new(0);
    proxy.arm(Cut::BlackHole(Box::new(inserts_into(&table))));
    let started = std::time::Instant::now();
    db.transaction(async |c| {
        attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        insert_keyed(c, &table, "tx").await
    })
    .await
    .unwrap();
    let took = started.elapsed();
    eprintln!(
        "wire: a black-holed statement in a transaction was given up after {took:?} (statement timeout 300 ms + 2 s grace) and retried"
    );
    assert_eq!(attempts_made(&attempts), 2);
    assert!(
        took >= Duration::from_millis(2300) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(rows(&db, &table, "tx").await, 1);

    proxy.arm(Cut::BlackHole(Box::new(inserts_into(&table))));
    let started = std::time::Instant::now();
    let e = db
        .write(async |c| insert_keyed(c, &table, "auto").await)
        .await
        .unwrap_err();
    let took = started.elapsed();
    eprintln!("wire: a black-holed autocommit write ended after {took:?}: {e}");
    assert_eq!(e.class(), ErrorClass::Ambiguous, "{e:?}");
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert_eq!(
        rows(&db, &table, "auto").await,
        0,
        "the black hole forwarded nothing"
    );
    drop_table(&db, &table).await;
    db.close(Duration::from_secs(2)).await;
}

/// The latency table: Railyard against raw diesel-async (bb8 with its
/// manager's default `SELECT 1` check-out validation) at 0, 1 and 10 ms of
/// added round-trip time, through proxies to the primary and the replica.
/// Sequential operations, mean time per operation, ratio raw / Railyard
/// (above 1: Railyard is faster). Rows: a pooled primary-key lookup on the
/// primary; a one-lookup transaction; a routed read (Railyard's `read`, on
/// the replica, against raw's replica pool); read-your-writes (a session's
/// one-update transaction and then its read of the row, against raw's
/// update transaction and read on the primary, the cheapest raw way to read
/// one's own write).
/// Run: `cargo test --test it wire::latency_table -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: run it by name"]
async fn latency_table() {
    use diesel::{ExpressionMethods, QueryDsl};
    use diesel_async::AsyncPgConnection;
    use diesel_async::pooled_connection::AsyncDieselConnectionManager;
    let Some(cluster) = support::cluster().await else {
        return;
    };
    let Some(replica_port) = cluster.replica_port() else {
        return;
    };
    let seed = support::ledger(|c| c).await;
    let ids: std::sync::Arc<[i64]> = support::accounts(&seed, 100, 1_000).await.into();
    let socket = |port: u16| cluster.socket_dir().join(format!(".s.PGSQL.{port}"));
    let primary = Proxy::start(socket(cluster.primary_port())).await;
    let replica = Proxy::start(socket(replica_port)).await;
    let primary_url = proxy_url(&primary).await;
    let replica_url = proxy_url(&replica).await;
    let db = Database::connect(
        Config::from_url(&primary_url)
            .unwrap()
            .pool_max_size(2)
            .replica_url(&replica_url)
            .unwrap()
            .replica_pool_max_size(2),
    )
    .await
    .unwrap();
    let raw_pool = async |url: &str| {
        bb8::Pool::builder()
            .max_size(2)
            .build(AsyncDieselConnectionManager::<AsyncPgConnection>::new(
                url.to_owned(),
            ))
            .await
            .unwrap()
    };
    let raw = raw_pool(&primary_url).await;
    let raw_replica = raw_pool(&replica_url).await;
    // Statements both sides prepare once per connection and cache, as
    // applications do.
    let lookup = {
        let ids = ids.clone();
        move |i: usize| {
            accounts::table
                .filter(accounts::id.eq(ids[i % ids.len()]))
                .select(accounts::balance_cents)
        }
    };
    let touch = move |i: usize| {
        diesel::update(accounts::table.filter(accounts::id.eq(ids[i % ids.len()])))
            .set(accounts::balance_cents.eq(accounts::balance_cents))
    };
    // Every replica caught up before measuring: the routed read's row shows
    // the replica's figures, not a fallback's.
    let waited = std::time::Instant::now();
    while !matches!(db.route_for_read(None), railyard::Route::Replica(_)) {
        assert!(waited.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "added RTT (measured SELECT 1) | lookup: railyard / raw (ratio) | transaction | routed read | read-your-writes"
    );
    type Op<'a> =
        &'a dyn Fn(usize) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'static>>;
    for (rtt_ms, n) in [(0u64, 400usize), (1, 200), (10, 40)] {
        for p in [&primary, &replica] {
            p.set_latency(Duration::from_micros(rtt_ms * 500));
        }
        let time = async |f: Op<'_>| {
            for i in 0..5 {
                f(i).await; // warm
            }
            let started = std::time::Instant::now();
            for i in 0..n {
                f(i).await;
            }
            started.elapsed().as_secs_f64() * 1000.0 / n as f64
        };
        // The round trip as it is, timer ticks included.
        let mut probe = raw.get().await.unwrap();
        let started = std::time::Instant::now();
        for _ in 0..20 {
            probe.batch_execute("SELECT 1").await.unwrap();
        }
        let rt = started.elapsed().as_secs_f64() * 1000.0 / 20.0;
        drop(probe);
        let pair =
            |ours: f64, theirs: f64| format!("{ours:.3} / {theirs:.3} ms ({:.2}×)", theirs / ours);
        let ours = time(&|i| {
            let (q, db) = (lookup(i), db.clone());
            Box::pin(async move {
                db.with_primary(async |c| q.first::<i64>(c).await.map_err(Error::from))
                    .await
                    .unwrap();
            })
        })
        .await;
        let theirs = time(&|i| {
            let (q, raw) = (lookup(i), raw.clone());
            Box::pin(async move {
                let mut c = raw.get().await.unwrap();
                q.first::<i64>(&mut *c).await.unwrap();
            })
        })
        .await;
        let lookups = pair(ours, theirs);
        let ours = time(&|i| {
            let (q, db) = (lookup(i), db.clone());
            Box::pin(async move {
                db.transaction(async |c| q.first::<i64>(c).await.map_err(Error::from))
                    .await
                    .unwrap();
            })
        })
        .await;
        let theirs = time(&|i| {
            let (q, raw) = (lookup(i), raw.clone());
            Box::pin(async move {
                // What diesel-async's `transaction` sends: BEGIN, the
                // statement, COMMIT.
                let mut c = raw.get().await.unwrap();
                c.batch_execute("BEGIN").await.unwrap();
                q.first::<i64>(&mut *c).await.unwrap();
                c.batch_execute("COMMIT").await.unwrap();
            })
        })
        .await;
        let transactions = pair(ours, theirs);
        let replica_reads = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ours = time(&|i| {
            let (q, db, on) = (lookup(i), db.clone(), replica_reads.clone());
            Box::pin(async move {
                let (_, route) = db
                    .read_routed(async |c| q.first::<i64>(c).await.map_err(Error::from))
                    .await
                    .unwrap();
                if matches!(route, railyard::Route::Replica(_)) {
                    on.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .await;
        let theirs = time(&|i| {
            let (q, raw) = (lookup(i), raw_replica.clone());
            Box::pin(async move {
                let mut c = raw.get().await.unwrap();
                q.first::<i64>(&mut *c).await.unwrap();
            })
        })
        .await;
        let routed = format!(
            "{} [{} of {} on the replica]",
            pair(ours, theirs),
            std::sync::atomic::AtomicU64::load(
                &replica_reads,
                std::sync::atomic::Ordering::Relaxed
            ),
            n + 5
        );
        let ours = time(&|i| {
            let (q, w, db) = (lookup(i), touch(i), db.clone());
            Box::pin(async move {
                let session = db.session();
                session
                    .transaction(async |c| w.execute(c).await.map_err(Error::from))
                    .await
                    .unwrap();
                session
                    .read(async |c| q.first::<i64>(c).await.map_err(Error::from))
                    .await
                    .unwrap();
            })
        })
        .await;
        let theirs = time(&|i| {
            let (q, w, raw) = (lookup(i), touch(i), raw.clone());
            Box::pin(async move {
                let mut c = raw.get().await.unwrap();
                c.batch_execute("BEGIN").await.unwrap();
                w.execute(&mut *c).await.unwrap();
                c.batch_execute("COMMIT").await.unwrap();
                drop(c);
                let mut c = raw.get().await.unwrap();
                q.first::<i64>(&mut *c).await.unwrap();
            })
        })
        .await;
        let ryw = pair(ours, theirs);
        println!("{rtt_ms:>3} ms ({rt:.2} ms) | {lookups} | {transactions} | {routed} | {ryw}");
    }
    db.close(Duration::from_secs(2)).await;
}

/// A database through a proxy that passes TLS through (verify-full against
/// the local cluster's CA: the session is with the server, not the proxy).
async fn through_tls_proxy() -> Option<(Proxy, String)> {
    let cluster = support::cluster().await?;
    support::ledger(|c| c).await;
    let proxy = Proxy::start_tls(([127, 0, 0, 1], cluster.primary_port()).into()).await;
    let url = format!(
        "postgres://railyard:{}@127.0.0.1:{}/{}?sslmode=verify-full&sslrootcert={}",
        cluster.password().expose(),
        proxy.port,
        support::ledger_name(),
        cluster.ca_cert().display()
    );
    Some((proxy, url))
}

/// Through TLS the proxy reads no frame; it counts the client's flights. A
/// flight armed while the transaction's connection is idle between requests
/// is the next request: the COMMIT. Its reply is dropped after the server
/// committed: Ambiguous, not retried, the row there.
#[tokio::test]
async fn through_tls_a_commit_whose_reply_is_lost_is_ambiguous_and_the_row_is_there() {
    let Some((proxy, url)) = through_tls_proxy().await else {
        return;
    };
    // One connection: no other flight can come between.
    let db = Database::connect(Config::from_url(&url).unwrap().pool_max_size(1))
        .await
        .unwrap();
    let table = support::unique("ambiguous_tls");
    db.with_primary(async |c| {
        c.batch_execute(&format!(
            "CREATE TABLE {table} (key text PRIMARY KEY, amount bigint NOT NULL)"
        ))
        .await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    #[derive(diesel::QueryableByName)]
    struct Ssl {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        ssl: bool,
    }
    let ssl: Vec<Ssl> = db
        .with_primary(async |c| {
            diesel::sql_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .load(c)
                .await
                .map_err(Error::from)
        })
        .await
        .unwrap();
    assert!(ssl[0].ssl, "the session through the proxy is TLS");
    let attempts = std::sync::atomic::AtomicU32::new(0);
    let key = "transfer-tls";
    let e = db
        .transaction(async |c| {
            attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            insert_keyed(c, &table, key).await?;
            // The INSERT's reply is in: the next flight is the COMMIT.
            proxy.arm(Cut::AfterNextFlight);
            Ok::<(), Error>(())
        })
        .await
        .unwrap_err();
    assert_eq!(proxy.cuts(), 1);
    assert_eq!(e.class(), ErrorClass::Ambiguous, "{e:?}");
    assert_eq!(attempts_made(&attempts), 1, "nothing is retried");
    assert_eq!(rows(&db, &table, key).await, 1, "the server committed it");
    drop_table(&db, &table).await;
    db.close(Duration::from_secs(2)).await;
}

/// A slow link is not a dead one: a result that takes longer to arrive than
/// the stall bound (statement timeout + 2 s), through a bandwidth cap, is
/// read whole, since its rows keep coming.
#[tokio::test]
async fn a_result_slowed_by_a_bandwidth_cap_is_read_whole_not_given_up() {
    let Some((proxy, _db, table)) = through_proxy("slow_link").await else {
        return;
    };
    let url = proxy_url(&proxy).await;
    let db = Database::connect(
        Config::from_url(&url)
            .unwrap()
            .pool_max_size(1)
            .statement_timeout(Some(Duration::from_millis(300))),
    )
    .await
    .unwrap();
    // About 1 MB, at 400 kB/s.
    proxy.set_bandwidth(Some(400_000));
    let started = std::time::Instant::now();
    let n: i64 = db
        .read(async |c| {
            #[derive(diesel::QueryableByName)]
            struct Pad {
                #[diesel(sql_type = Text)]
                #[allow(dead_code)]
                pad: String,
            }
            let rows: Vec<Pad> =
                diesel::sql_query("SELECT repeat('x', 1000) AS pad FROM generate_series(1, 1000)")
                    .load(c)
                    .await?;
            Ok::<_, Error>(rows.len() as i64)
        })
        .await
        .unwrap();
    let took = started.elapsed();
    proxy.set_bandwidth(None);
    eprintln!("wire: 1000 rows of 1 kB through a 400 kB/s link in {took:?} (stall bound 2.3 s)");
    assert_eq!(n, 1000);
    assert!(took > Duration::from_millis(2300), "{took:?}: the cap held");
    drop_table(&db, &table).await;
    db.close(Duration::from_secs(2)).await;
}

/// A reset (RST) in the middle of a read's result: the read fails with a
/// reconnect-class error, is retried on a new connection, and succeeds.
#[tokio::test]
async fn a_reset_in_the_middle_of_a_result_is_retried_for_a_read() {
    let Some((proxy, db, table)) = through_proxy("reset").await else {
        return;
    };
    let attempts = std::sync::atomic::AtomicU32::new(0);
    let before = proxy.accepted();
    proxy.arm(Cut::ResetInReply(
        Box::new(|f| {
            f.sql
                .is_some_and(|s| s.contains("generate_series(1, 2000)"))
        }),
        5_000,
    ));
    let n = db
        .read(async |c| {
            attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            #[derive(diesel::QueryableByName)]
            struct N {
                #[diesel(sql_type = BigInt)]
                n: i64,
            }
            let rows: Vec<N> =
                diesel::sql_query("SELECT g::int8 AS n FROM generate_series(1, 2000) g")
                    .load(c)
                    .await?;
            Ok::<_, Error>(rows.iter().map(|r| r.n).sum::<i64>())
        })
        .await
        .unwrap();
    assert_eq!(proxy.cuts(), 1);
    assert_eq!(n, 2000 * 2001 / 2);
    assert_eq!(attempts_made(&attempts), 2, "retried once");
    assert!(proxy.accepted() > before, "on a new connection");
    drop_table(&db, &table).await;
    db.close(Duration::from_secs(2)).await;
}

/// Half-closes. The server-to-client direction shut at a read's query: the
/// client reads end of file, and the read is retried on a new connection.
/// The client-to-server direction shut after the query is forwarded: the
/// server answers it and then, reading end of file, ends the session; the
/// read succeeds, and the closed connection is not handed out again.
#[tokio::test]
async fn half_closed_connections_are_retried_or_discarded_never_reused() {
    use diesel::{ExpressionMethods, QueryDsl};
    let Some((proxy, db, table)) = through_proxy("half_close").await else {
        return;
    };
    let attempts = std::sync::atomic::AtomicU32::new(0);
    let count = |a: &std::sync::atomic::AtomicU32| {
        std::sync::atomic::AtomicU32::swap(a, 0, std::sync::atomic::Ordering::SeqCst)
    };
    // Two statement shapes, each cached per connection: the cut matches
    // the first one's Parse on the connection it meets.
    let below = async |n: i64| {
        db.read(async |c| {
            attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            accounts::table
                .filter(accounts::balance_cents.lt(n))
                .count()
                .get_result::<i64>(c)
                .await
                .map_err(Error::from)
        })
        .await
    };
    let above = async |n: i64| {
        db.read(async |c| {
            attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            accounts::table
                .filter(accounts::balance_cents.gt(n))
                .count()
                .get_result::<i64>(c)
                .await
                .map_err(Error::from)
        })
        .await
    };
    let shape = |op: &'static str| {
        move |f: &Frame<'_>| {
            f.kind == b'P'
                && f.sql.is_some_and(|s| {
                    s.contains("\"balance_cents\" ") && s.contains(&format!("{op} $1"))
                })
        }
    };
    proxy.arm(Cut::HalfClose(
        Box::new(shape("<")),
        crate::proxy::Dir::ToClient,
    ));
    let started = std::time::Instant::now();
    below(0).await.unwrap();
    eprintln!(
        "wire: a read whose reply direction was shut was retried in {:?}",
        started.elapsed()
    );
    assert_eq!(proxy.cuts(), 1);
    assert_eq!(count(&attempts), 2, "retried once");

    proxy.arm(Cut::HalfClose(
        Box::new(shape(">")),
        crate::proxy::Dir::ToServer,
    ));
    above(i64::MAX).await.unwrap();
    assert_eq!(proxy.cuts(), 2);
    assert_eq!(count(&attempts), 1, "the server answered before it hung up");
    // The server has hung up on that connection: the next check-outs find
    // it closed and never hand it out.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for n in 0..4 {
        above(n).await.unwrap();
        below(n).await.unwrap();
        assert_eq!(
            count(&attempts),
            2,
            "no operation met the closed connection"
        );
    }
    drop_table(&db, &table).await;
    db.close(Duration::from_secs(2)).await;
}

/// Black holes at check-out. A connection idle past `ping_after_idle` is
/// pinged at check-out; the ping through a black hole is given up at the
/// connect timeout, the connection discarded, and the read goes on with a new
/// one. When new connections are black-holed too, the check-out ends at its
/// own timeout with a reconnect-class error, and the pool serves again once
/// the link is back: no slot leaked.
#[tokio::test]
async fn black_holes_at_check_out_end_at_the_connect_and_checkout_timeouts() {
    let Some((proxy, _db, table)) = through_proxy("hole_checkout").await else {
        return;
    };
    let url = proxy_url(&proxy).await;
    let db = Database::connect(
        Config::from_url(&url)
            .unwrap()
            .pool_max_size(2)
            .ping_after_idle(Duration::from_millis(100))
            .connect_timeout(Duration::from_millis(500))
            .checkout_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    let read = async || {
        db.read(async |c| {
            diesel::select(diesel::dsl::sql::<BigInt>("1::int8"))
                .get_result::<i64>(c)
                .await
                .map_err(Error::from)
        })
        .await
    };
    read().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let holed = proxy.black_hole_all();
    assert!(holed >= 1);
    let before = proxy.accepted();
    let started = std::time::Instant::now();
    read().await.unwrap();
    let took = started.elapsed();
    eprintln!(
        "wire: a black-holed idle connection was found at check-out and replaced in {took:?} (connect timeout 500 ms)"
    );
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    assert!(proxy.accepted() > before, "a new connection");

    // Nothing answers: neither the pooled connection nor a new one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.black_hole_all();
    proxy.black_hole_new_connections(true);
    let started = std::time::Instant::now();
    let e = read().await.unwrap_err();
    let took = started.elapsed();
    eprintln!(
        "wire: with every connection black-holed, the check-out ended after {took:?} (checkout timeout 2 s): {e}"
    );
    assert!(
        matches!(e.class(), ErrorClass::Timeout | ErrorClass::Reconnect),
        "{e:?}"
    );
    assert!(took < Duration::from_millis(2600), "{took:?}");
    proxy.black_hole_new_connections(false);
    for _ in 0..4 {
        tokio::time::timeout(Duration::from_secs(5), read())
            .await
            .expect("the pool serves once the link is back")
            .unwrap();
    }
    drop_table(&db, &table).await;
    db.close(Duration::from_secs(2)).await;
}

/// A black hole in the replica monitor's check: the check ends at its
/// timeout, the replica is ejected (reads go to the primary), the monitor's
/// connection is discarded, and with the link back the replica is
/// re-admitted.
#[tokio::test]
async fn a_black_holed_replica_check_ejects_the_replica_within_the_check_timeout() {
    let Some(cluster) = support::cluster().await else {
        return;
    };
    let Some(replica_port) = cluster.replica_port() else {
        return;
    };
    support::ledger(|c| c).await;
    let primary = Proxy::start(
        cluster
            .socket_dir()
            .join(format!(".s.PGSQL.{}", cluster.primary_port())),
    )
    .await;
    let replica = Proxy::start(
        cluster
            .socket_dir()
            .join(format!(".s.PGSQL.{replica_port}")),
    )
    .await;
    let replica_url = proxy_url(&replica).await;
    let db = Database::builder(
        Config::from_url(&proxy_url(&primary).await)
            .unwrap()
            .replica_url(&replica_url)
            .unwrap(),
    )
    .routing(
        railyard::RoutingConfig::default()
            .check_interval(Duration::from_millis(100))
            .check_timeout(Duration::from_millis(300))
            .readmit_after(2),
    )
    .connect()
    .await
    .unwrap();
    let on_replica = async || {
        let waited = std::time::Instant::now();
        while !matches!(db.route_for_read(None), railyard::Route::Replica(_)) {
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "never on the replica"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        waited.elapsed()
    };
    on_replica().await;
    let before = replica.accepted();
    replica.arm(Cut::BlackHole(Box::new(|f| {
        f.sql.is_some_and(|s| s.contains("pg_is_in_recovery"))
    })));
    let armed = std::time::Instant::now();
    while replica.cuts() == 0 {
        assert!(armed.elapsed() < Duration::from_secs(5), "no check came");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let held = std::time::Instant::now();
    while db.route_for_read(None) != railyard::Route::Primary {
        assert!(held.elapsed() < Duration::from_secs(5), "never ejected");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ejected = held.elapsed();
    let health = db.replica_health();
    eprintln!(
        "wire: a black-holed replica check ejected the replica after {ejected:?} (check timeout 300 ms): {:?} {:?}",
        health[0].status, health[0].last_error
    );
    assert!(ejected < Duration::from_millis(1200), "{ejected:?}");
    let (_, route) = db
        .read_routed(async |c| {
            diesel::select(diesel::dsl::sql::<BigInt>("1::int8"))
                .get_result::<i64>(c)
                .await
                .map_err(Error::from)
        })
        .await
        .unwrap();
    assert_eq!(route, railyard::Route::Primary);
    let back = on_replica().await;
    eprintln!("wire: re-admitted {back:?} later, on a new monitor connection");
    assert!(
        replica.accepted() > before,
        "the monitor's connection was replaced"
    );
    db.close(Duration::from_secs(2)).await;
}
