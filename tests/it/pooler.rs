//! Behind a real PgBouncer (Debian's 1.18, default settings), in session and
//! in transaction mode: concurrent boots with migrations, contended ledger
//! transfers, health probes, read-your-writes on the replica, and the
//! statement timeout, all through the pooler (TLS on both sides).

use std::time::{Duration, Instant};

use diesel::sql_types::BigInt;
use diesel_async::RunQueryDsl;
use railyard::config::Pooler;
use railyard::{Config, Database, Error, ErrorClass, RetryPolicy};
use railyard_local::pgbouncer::LocalPgBouncer;

use crate::support;

#[derive(diesel::QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

use support::balance;

async fn behind(mode: Pooler) {
    let Some(cluster) = support::cluster().await else {
        return; // TEST_DATABASE_URL: no local servers to put a PgBouncer in front of
    };
    let fresh = support::fresh_database("pooled").await;
    let name = fresh.name.clone();
    let primary = LocalPgBouncer::start(cluster, cluster.primary_port(), mode)
        .await
        .expect("PgBouncer starts (apt-get install pgbouncer)");
    let replica = LocalPgBouncer::start(cluster, cluster.replica_port().unwrap(), mode)
        .await
        .expect("a second PgBouncer starts");
    let config = || {
        Config::new(primary.target(&name))
            .replica(replica.target(&name))
            .pooler(mode)
            .pool_max_size(4)
            .statement_timeout(Some(Duration::from_secs(5)))
    };

    // 8 concurrent boots, each migrating: every one succeeds, each migration
    // is applied once.
    let started = Instant::now();
    let dumps = support::Dumps::new();
    // The dump before the risky migration goes to the server directly.
    let direct = cluster.primary_socket_target(&name);
    let boots = futures_util::future::join_all((0..8).map(|_| {
        Database::builder(config())
            .migrations(dumps.migrator_direct(direct.clone()))
            .connect()
    }))
    .await;
    let mut applied = 0;
    let mut dbs = Vec::new();
    for b in boots {
        let db = b.unwrap_or_else(|e| panic!("{mode}: a boot failed: {e}"));
        applied += db.migration_report().map_or(0, |r| r.applied.len());
        dbs.push(db);
    }
    assert_eq!(
        applied,
        support::ledger_migrations(),
        "{mode}: each migration applied once"
    );
    eprintln!("{mode}: 8 concurrent boots in {:.2?}", started.elapsed());
    let db = Database::builder(dbs[0].config().clone())
        .retry_policy(RetryPolicy::default().max_attempts(100))
        .retry_budget(railyard::RetryBudget::new(
            10.0,
            1000.0,
            Duration::from_secs(10),
        ))
        .connect()
        .await
        .unwrap();
    drop(dbs);

    // Contended transfers: 8 tasks × 500, serializable, retried; money conserved.
    let ids = support::accounts(&db, 4, 10_000).await;
    let started = Instant::now();
    support::contended_transfers(&db, &ids, 8, 500).await;
    let total = support::total_balance(&db, &ids).await;
    assert_eq!(total, 40_000, "{mode}: money is conserved");
    eprintln!(
        "{mode}: 8 × 500 contended transfers in {:.2?}; retries {:?}",
        started.elapsed(),
        db.retry_counts()
    );

    // 1,000 health probes, 50 at a time: all answered from the pools.
    let started = Instant::now();
    for _ in 0..20 {
        let probes = futures_util::future::join_all((0..50).map(|_| db.health())).await;
        for h in probes {
            assert!(
                h.status != railyard::observe::HealthStatus::Unhealthy,
                "{mode}: {h:?}"
            );
        }
    }
    eprintln!("{mode}: 1000 health probes in {:.2?}", started.elapsed());

    // Read-your-writes in a session, on the replica through its own PgBouncer.
    let session = db.session();
    let email = format!("{}@pooler.test", support::unique("ryw"));
    session
        .write(async |c| support::insert_user(c, &email).await)
        .await
        .unwrap();
    let (n, route) = session
        .read_routed(async |c| support::count_user(c, &email).await)
        .await
        .unwrap();
    assert_eq!(n, 1, "{mode}: the session reads its own write ({route:?})");

    // The statement timeout holds inside transactions (SET at connect in
    // session mode, SET LOCAL in each transaction in transaction mode).
    let short = Database::connect(config().statement_timeout(Some(Duration::from_millis(200))))
        .await
        .unwrap();
    let err = short
        .transaction(async |c| {
            diesel::sql_query("SELECT pg_sleep(2)").execute(c).await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Timeout, "{mode}: {err}");

    // Plain queries with parameters, many shapes, from many tasks.
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                for j in 0..50i64 {
                    let v: N = db
                        .read(async |c| {
                            Ok::<_, Error>(
                                diesel::sql_query(format!("SELECT $1::bigint + {} AS n", i % 4))
                                    .bind::<BigInt, _>(j)
                                    .get_result::<N>(c)
                                    .await?,
                            )
                        })
                        .await
                        .unwrap();
                    assert_eq!(v.n, j + i % 4);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_works_behind_pgbouncer_in_transaction_mode() {
    behind(Pooler::PgBouncerTransaction).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_works_behind_pgbouncer_in_session_mode() {
    behind(Pooler::PgBouncerSession).await;
}

/// The price of the transaction-mode path, against the normal one, on the
/// same server in the same run: each execution parses its statement again
/// (and the first of each shape describes it), where the normal path reuses
/// a prepared statement. Connected directly, so only the rewriting differs.
#[tokio::test]
async fn the_pooler_safe_path_costs_a_parse_per_query() {
    let base = support::ledger(|c| c).await;
    let normal = Database::connect(base.config().clone().pool_max_size(1))
        .await
        .unwrap();
    let safe = Database::connect(
        base.config()
            .clone()
            .pool_max_size(1)
            .pooler(Pooler::PgBouncerTransaction),
    )
    .await
    .unwrap();
    let ids = support::accounts(&normal, 1, 100).await;
    let mut a = normal.primary().await.unwrap();
    let mut b = safe.primary().await.unwrap();
    // Warm both, then alternate query by query, so that whatever else the
    // machine does hits both alike, and compare medians, which a burst of
    // other work (the rest of the suite) does not move.
    for _ in 0..50 {
        assert_eq!(balance(&mut a, ids[0]).await.unwrap(), 100);
        assert_eq!(balance(&mut b, ids[0]).await.unwrap(), 100);
    }
    let (mut normal_t, mut safe_t) = (Vec::with_capacity(2000), Vec::with_capacity(2000));
    for _ in 0..2000 {
        let started = Instant::now();
        assert_eq!(balance(&mut a, ids[0]).await.unwrap(), 100);
        normal_t.push(started.elapsed());
        let started = Instant::now();
        assert_eq!(balance(&mut b, ids[0]).await.unwrap(), 100);
        safe_t.push(started.elapsed());
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (a, b) = (median(&mut normal_t), median(&mut safe_t));
    let ratio = b.as_secs_f64() / a.as_secs_f64();
    eprintln!(
        "point query, 2000 each, medians: normal {:.1} µs, pooler-safe {:.1} µs per query: {ratio:.2}×",
        a.as_secs_f64() * 1e6,
        b.as_secs_f64() * 1e6
    );
    assert!(
        ratio < 3.0,
        "the rewriting path costs {ratio:.2}× the normal one"
    );
}

/// The test harness through PgBouncer in session mode: this test binary's
/// own harness tests, run again in a child process whose
/// `TEST_DATABASE_URL` is the pooler (a superuser URL, as the harness needs).
#[tokio::test]
async fn the_harness_runs_through_pgbouncer_in_session_mode() {
    let Some(cluster) = support::cluster().await else {
        return;
    };
    if std::env::var_os("RAILYARD_IN_POOLER_CHILD").is_some() {
        return; // the child runs only `harness::`; never recurse
    }
    let bouncer = LocalPgBouncer::start(cluster, cluster.primary_port(), Pooler::PgBouncerSession)
        .await
        .expect("PgBouncer starts");
    let url = bouncer.target("postgres").expose_url();
    let exe = std::env::current_exe().expect("the test binary");
    let started = Instant::now();
    let out = tokio::process::Command::new(exe)
        .args(["harness::", "--test-threads", "2"])
        .env("TEST_DATABASE_URL", &url)
        .env("RAILYARD_IN_POOLER_CHILD", "1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), out)
        .await
        .expect("the harness run ends within 5 minutes")
        .expect("the test binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("test result"))
        .unwrap_or_default()
        .to_owned();
    assert!(summary.contains(" 0 failed"), "{summary}");
    assert!(!summary.contains(" 0 passed"), "{summary}");
    eprintln!(
        "harness through a session-mode PgBouncer: {summary} ({:.1?})",
        started.elapsed()
    );
}
