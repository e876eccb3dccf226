//! Retention and archival of the ledger's history: a year of synthetic trades
//! (compressed in time), a retention of 90 days. The job archives exactly the
//! months wholly past the period, the invariants hold over live and archive
//! together, reads across the boundary return the same rows, two instances
//! running at once archive each month once, and sizes reach /health and
//! /metrics, with the threshold's early run and degraded verdict.

use std::time::Duration;

use chrono::{DateTime, Datelike, Utc};
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text, Timestamptz};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use railyard::{Config, Database, HealthStatus};
use railyard_ops::retain::{RetentionConfig, RetentionJob};

use crate::ledger_check;
use crate::ledger_retain;
use crate::support::{self, FreshDb};

const DAY: u64 = 86_400;
const TRADES: i64 = 20_000;

#[derive(QueryableByName, Debug, Clone, PartialEq)]
struct TradeRow {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    buy_order_id: i64,
    #[diesel(sql_type = BigInt)]
    sell_order_id: i64,
    #[diesel(sql_type = Text)]
    symbol: String,
    #[diesel(sql_type = BigInt)]
    quantity: i64,
    #[diesel(sql_type = BigInt)]
    price_cents: i64,
    #[diesel(sql_type = Timestamptz)]
    executed_at: DateTime<Utc>,
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName)]
struct PlanLine {
    #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
    line: String,
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn ledger_db(fresh: &FreshDb) -> Database {
    let dumps = support::Dumps::new();
    Database::builder(fresh.config.clone().pool_max_size(4))
        .migrations(dumps.migrator())
        .connect()
        .await
        .expect("the ledger boots")
}

async fn names(db: &Database, sql: &str) -> Vec<String> {
    let mut conn = db.primary().await.unwrap();
    diesel::sql_query(sql)
        .load::<Name>(&mut **conn)
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect()
}

async fn n(db: &Database, sql: &str) -> i64 {
    let mut conn = db.primary().await.unwrap();
    diesel::sql_query(sql)
        .get_result::<N>(&mut **conn)
        .await
        .unwrap()
        .n
}

async fn trades_between(db: &Database, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<TradeRow> {
    let mut conn = db.primary().await.unwrap();
    diesel::sql_query(ledger_retain::TRADES_BETWEEN)
        .bind::<Timestamptz, _>(from)
        .bind::<Timestamptz, _>(to)
        .load(&mut **conn)
        .await
        .unwrap()
}

/// A year of a consistent ledger: 20 accounts, 20,000 trades spread evenly
/// over the last 365 days, each with its two filled orders (most created a
/// minute before the trade, one in 500 a hundred days before it: an order
/// resting across the boundary), two fees, and the balances and positions
/// they make; plus an old open order and an old cancelled one.
const HISTORY: &str = "
INSERT INTO users (email, name) VALUES ('retain@example.com', 'retain');
INSERT INTO symbols VALUES ('RTN', 100);
INSERT INTO accounts (user_id, balance_cents) SELECT 1, 0 FROM generate_series(1, 20);
INSERT INTO deposits (account_id, amount_cents, idempotency_key) SELECT id, 100000000, 'retain-' || id FROM accounts;
CREATE TEMP TABLE g AS
  SELECT i, now() - interval '365 days' + interval '365 days' * i / 20000 AS ts,
         1 + i % 10 AS buyer, 11 + i % 10 AS seller FROM generate_series(1, 20000) i;
INSERT INTO orders (id, account_id, symbol, side, quantity, filled_quantity, limit_price_cents, status, created_at, client_order_id)
  SELECT 2 * i - 1, buyer, 'RTN', 'buy', 10, 10, 100, 'filled',
         ts - CASE WHEN i % 500 = 0 THEN interval '100 days' ELSE interval '1 minute' END, 'b' || i FROM g
  UNION ALL
  SELECT 2 * i, seller, 'RTN', 'sell', 10, 10, 100, 'filled', ts - interval '1 minute', 's' || i FROM g;
INSERT INTO orders (id, account_id, symbol, side, quantity, limit_price_cents, status, created_at, client_order_id) VALUES
  (50001, 1, 'RTN', 'buy', 5, 90, 'open', now() - interval '300 days', 'old-open'),
  (50002, 2, 'RTN', 'sell', 5, 110, 'cancelled', now() - interval '300 days', 'old-cancelled');
SELECT setval('orders_id_seq', 50002);
INSERT INTO trades (id, buy_order_id, sell_order_id, symbol, quantity, price_cents, executed_at)
  SELECT i, 2 * i - 1, 2 * i, 'RTN', 10, 100, ts FROM g;
SELECT setval('trades_id_seq', 20000);
INSERT INTO fees (trade_id, account_id, amount_cents)
  SELECT i, buyer, 5 FROM g UNION ALL SELECT i, seller, 5 FROM g;
UPDATE accounts a SET balance_cents = 100000000
  + coalesce((SELECT sum(CASE WHEN g.seller = a.id THEN 1000 ELSE -1000 END) FROM g WHERE a.id IN (g.buyer, g.seller)), 0)
  - coalesce((SELECT sum(amount_cents) FROM fees f WHERE f.account_id = a.id), 0);
INSERT INTO positions (account_id, symbol, quantity)
  SELECT a.id, 'RTN', coalesce((SELECT sum(CASE WHEN g.buyer = a.id THEN 10 ELSE -10 END) FROM g WHERE a.id IN (g.buyer, g.seller)), 0)
  FROM accounts a;
";

/// The first instant (UTC) of the month `k` months after `t`'s, by chrono's
/// month arithmetic (the job has its own, which this checks).
fn month_start(t: DateTime<Utc>, k: u32) -> DateTime<Utc> {
    t.date_naive()
        .with_day(1)
        .and_then(|d| d.checked_add_months(chrono::Months::new(k)))
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .expect("a month's first day")
        .and_utc()
}

async fn assert_invariants(db: &Database) {
    let verdicts = ledger_check::check(db).await.expect("check runs");
    for v in &verdicts {
        assert!(
            v.passed(),
            "{} fails: {} [{}]",
            v.name,
            v.violations,
            v.detail
        );
    }
}

fn config() -> RetentionConfig {
    RetentionConfig::new(Duration::from_secs(90 * DAY))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_year_of_history_keeps_ninety_days_live() {
    let fresh = support::fresh_database("retain").await;
    let db = ledger_db(&fresh).await;
    let started = std::time::Instant::now();
    db.primary()
        .await
        .unwrap()
        .batch_execute(HISTORY)
        .await
        .expect("the synthetic year");
    println!(
        "a year of history: {TRADES} trades in {:.2?}",
        started.elapsed()
    );
    assert_eq!(n(&db, "SELECT count(*) AS n FROM trades_default").await, TRADES - n(&db, "SELECT count(*) AS n FROM trades WHERE executed_at >= date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'").await);
    assert_invariants(&db).await;

    let retention = ledger_retain::ledger(config()).unwrap();
    // The months of the year leave the default partition for their own.
    let made = retention
        .prepare(&db)
        .await
        .unwrap()
        .expect("the lock is free");
    println!("partitions made from the default partition: {made:?}");
    assert_eq!(n(&db, "SELECT count(*) AS n FROM trades_default").await, 0);
    assert_invariants(&db).await;

    // What the job must archive: the months that end 90 days ago or before.
    let now = Utc::now();
    let cutoff = now - chrono::Duration::days(90);
    let first = month_start(now - chrono::Duration::days(365), 0);
    let mut expected = Vec::new();
    let mut m = first;
    while month_start(m, 1) <= cutoff {
        expected.push(format!("trades_p{:04}_{:02}", m.year(), m.month()));
        m = month_start(m, 1);
    }
    println!("expected to archive: {expected:?}");
    assert!(expected.len() >= 8, "{expected:?}");

    let (from, to) = (
        now - chrono::Duration::days(400),
        now + chrono::Duration::days(1),
    );
    let all_before = trades_between(&db, from, to).await;
    let edge = (
        cutoff - chrono::Duration::days(45),
        cutoff + chrono::Duration::days(45),
    );
    let edge_before = trades_between(&db, edge.0, edge.1).await;
    let orders_before = n(&db, "SELECT count(*) AS n FROM order_history").await;
    assert_eq!(all_before.len() as i64, TRADES);

    // A run that dies between archiving a month and moving its orders: its
    // row move fails after the first month's archival committed. The
    // invariants hold at that commit point, and the audit row stays pending.
    let crashing = railyard_ops::retain::Retention::new(config())
        .partitioned("trades", "executed_at")
        .unwrap()
        .move_rows(
            "orders",
            "UPDATE orders SET id = id WHERE created_at < $1 AND 1 / 0 = 1",
        );
    let e = crashing
        .run(&db, false)
        .await
        .expect_err("the row move fails");
    println!("a run that dies after archiving: {e}");
    assert_eq!(
        names(&db, "SELECT partition_name AS name FROM railyard_retention_audit WHERE moves_done_at IS NULL").await,
        vec![expected[0].clone()],
        "the first month is archived, its orders not yet moved"
    );
    assert_eq!(
        n(&db, "SELECT count(*) AS n FROM railyard_archive.orders").await,
        0
    );
    assert_invariants(&db).await;

    // The lock: held by a third connection, a run skips and names its pid.
    let mut holder = db.primary().await.unwrap();
    let holder_pid = diesel::sql_query(
        "SELECT pg_backend_pid()::bigint AS n FROM (SELECT pg_advisory_lock($1)) l",
    )
    .bind::<BigInt, _>(railyard_ops::retain::LOCK_KEY)
    .get_result::<N>(&mut **holder)
    .await
    .unwrap()
    .n;
    let skipped = retention.run(&db, false).await.expect("a run while locked");
    println!(
        "while pid {holder_pid} holds the lock: {:?}",
        skipped.skipped
    );
    assert!(
        skipped
            .skipped
            .as_deref()
            .is_some_and(|why| why.contains(&format!("backend pid {holder_pid}"))),
        "{skipped:?}"
    );
    assert!(skipped.archived.is_empty());
    diesel::sql_query("SELECT pg_advisory_unlock($1) AS ok")
        .bind::<BigInt, _>(railyard_ops::retain::LOCK_KEY)
        .execute(&mut **holder)
        .await
        .unwrap();
    drop(holder);

    // Two instances at once: two handles, started together at a barrier.
    let db2 = ledger_db(&fresh).await;
    let other = ledger_retain::ledger(config()).unwrap();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let spawn = |db: Database, r: railyard_ops::retain::Retention| {
        let barrier = barrier.clone();
        tokio::spawn(async move {
            barrier.wait().await;
            r.run(&db, false).await
        })
    };
    let (ta, tb) = (
        spawn(db.clone(), retention.clone()),
        spawn(db2.clone(), other),
    );
    let (a, b) = (
        ta.await.unwrap().expect("run 1"),
        tb.await.unwrap().expect("run 2"),
    );
    for (i, r) in [&a, &b].into_iter().enumerate() {
        println!(
            "instance {}: skipped {:?}, archived {:?}, took {:.2?}",
            i + 1,
            r.skipped,
            r.archived
                .iter()
                .map(|p| (&p.partition, p.rows, p.bytes, &p.moved))
                .collect::<Vec<_>>(),
            r.took
        );
    }
    assert_eq!(
        [&a, &b].iter().filter(|r| !r.archived.is_empty()).count(),
        1,
        "exactly one instance archived"
    );
    let done = if a.archived.is_empty() { &b } else { &a };
    let idle = if std::ptr::eq(done, &a) { &b } else { &a };
    println!(
        "the other instance: {}",
        idle.skipped
            .as_deref()
            .unwrap_or("ran after, found nothing left")
    );
    for p in &done.archived {
        println!(
            "{}: ACCESS EXCLUSIVE on trades for {:.1?} (detach, count, move to the archive, audit); its orders moved after, in {:.1?}: {:?}",
            p.partition, p.exclusive, p.moves_took, p.moved
        );
    }
    let archived: Vec<String> = done.archived.iter().map(|p| p.partition.clone()).collect();
    assert_eq!(
        archived,
        expected[1..],
        "exactly the months past the period (the first was archived by the run that died)"
    );
    assert_eq!(
        n(
            &db,
            "SELECT count(*) AS n FROM railyard_retention_audit WHERE moves_done_at IS NULL"
        )
        .await,
        0,
        "the dead run's order move was finished"
    );
    assert_eq!(
        n(&db, "SELECT count(*) AS n FROM (SELECT partition_name FROM railyard_retention_audit GROUP BY 1 HAVING count(*) > 1) d").await,
        0,
        "one audit row per partition"
    );
    let audit = names(
        &db,
        "SELECT partition_name AS name FROM railyard_retention_audit ORDER BY range_from",
    )
    .await;
    assert_eq!(audit, expected, "one audit row per archived month");
    let in_archive = names(
        &db,
        "SELECT c.relname::text AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'railyard_archive.trades'::regclass ORDER BY 1",
    )
    .await;
    assert_eq!(in_archive, expected);
    println!(
        "audit: {}",
        names(&db, "SELECT format('%s [%s, %s) rows %s bytes %s moved %s by %s/%s pid %s', partition_name, range_from::date, range_to::date, row_count, bytes, rows_moved, application_name, instance, backend_pid) AS name FROM railyard_retention_audit ORDER BY range_from LIMIT 3").await.join("\n       ")
    );

    // Live and archive together: the invariants, the same rows.
    assert_invariants(&db).await;
    let all_after = trades_between(&db, from, to).await;
    let edge_after = trades_between(&db, edge.0, edge.1).await;
    assert_eq!(
        all_after, all_before,
        "every trade reads the same through trade_history"
    );
    assert_eq!(
        edge_after, edge_before,
        "the rows across the boundary read the same"
    );
    assert_eq!(
        n(&db, "SELECT count(*) AS n FROM order_history").await,
        orders_before
    );
    let live = n(&db, "SELECT count(*) AS n FROM trades").await;
    let archived_rows = n(&db, "SELECT count(*) AS n FROM railyard_archive.trades").await;
    println!(
        "cross-boundary read [{} .. {}): {} rows before, {} after, identical; all: {} = {} live + {} archived",
        edge.0.format("%Y-%m-%d"),
        edge.1.format("%Y-%m-%d"),
        edge_before.len(),
        edge_after.len(),
        all_after.len(),
        live,
        archived_rows
    );
    assert_eq!(live + archived_rows, TRADES);
    assert_eq!(
        n(
            &db,
            "SELECT sum(row_count)::bigint AS n FROM railyard_retention_audit"
        )
        .await,
        archived_rows,
        "the audit counts are exact"
    );
    // The old open order stays; the old cancelled one moved; the orders
    // resting across the boundary stay with their live trades.
    assert_eq!(
        n(
            &db,
            "SELECT count(*) AS n FROM orders WHERE client_order_id = 'old-open'"
        )
        .await,
        1
    );
    assert_eq!(n(&db, "SELECT count(*) AS n FROM railyard_archive.orders WHERE client_order_id = 'old-cancelled'").await, 1);
    assert_eq!(
        n(&db, "SELECT count(*) AS n FROM orders o WHERE o.created_at < now() - interval '90 days' AND o.status <> 'open' \
                AND NOT EXISTS (SELECT 1 FROM trades t WHERE o.id IN (t.buy_order_id, t.sell_order_id))").await,
        0,
        "no closed order past the period is left live without a live trade"
    );
    assert!(n(&db, "SELECT count(*) AS n FROM orders o WHERE o.created_at < now() - interval '90 days' AND status = 'filled'").await > 0);
    // A time-bounded read of the archive prunes to its month.
    let plan = {
        let mut conn = db.primary().await.unwrap();
        diesel::sql_query(format!(
            "EXPLAIN SELECT * FROM trade_history WHERE executed_at >= '{}' AND executed_at < '{}'",
            first.format("%Y-%m-%d"),
            month_start(first, 1).format("%Y-%m-%d")
        ))
        .load::<PlanLine>(&mut **conn)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.line)
        .collect::<Vec<_>>()
        .join("\n")
    };
    assert!(
        plan.contains(&expected[0]) && !plan.contains(&expected[1]),
        "{plan}"
    );

    // Sizes: /health's storage check and /metrics' gauges.
    println!(
        "sizes before: database {} live {} archive {}; after: database {} live {} archive {}",
        done.before.database_bytes,
        done.before.live_bytes(),
        done.before.archived_bytes(),
        done.after.database_bytes,
        done.after.live_bytes(),
        done.after.archived_bytes()
    );
    assert!(done.after.live_bytes() < done.before.live_bytes());
    assert!(done.after.archived_bytes() > done.before.archived_bytes());
    // A second run finds nothing more to archive.
    let again = retention.run(&db, false).await.unwrap();
    assert!(again.archived.is_empty());
    let health = db.health().await;
    let storage = health
        .checks
        .iter()
        .find(|c| c.name == "storage")
        .expect("a storage check");
    println!("/health storage: {:?} {}", storage.status, storage.reason);
    assert_eq!(storage.status, HealthStatus::Healthy);
    let metrics = db.metrics_text();
    for gauge in [
        "railyard_database_size_bytes ",
        "railyard_table_size_bytes{table=\"public.trades\",archived=\"false\"} ",
        "railyard_table_size_bytes{table=\"railyard_archive.trades\",archived=\"true\"} ",
        "railyard_retention_live_bytes ",
        "railyard_retention_cannot_free 0",
    ] {
        assert!(metrics.contains(gauge), "{gauge} in /metrics:\n{metrics}");
    }

    // The threshold: the job runs at once; live bytes then cross the
    // threshold (backdated trades waiting in the default partition, for
    // months already archived), the next size check runs it early, and it
    // cannot free them: the storage check degrades.
    // A margin above what autovacuum's maps may add meanwhile.
    let threshold = done.after.live_bytes() + (1 << 20);
    let job = RetentionJob::spawn(
        db.clone(),
        ledger_retain::ledger(
            config()
                .size_threshold(Some(threshold))
                .check_every(Duration::from_millis(200)),
        )
        .unwrap(),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while job.runs() < 1 {
        assert!(tokio::time::Instant::now() < deadline, "the first run ends");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_run = job.last_run().unwrap().unwrap();
    assert!(!first_run.after.cannot_free, "{first_run:?}");
    db.primary()
        .await
        .unwrap()
        .batch_execute(&format!(
            "INSERT INTO trades (buy_order_id, sell_order_id, symbol, quantity, price_cents, executed_at) \
             SELECT 39999, 40000, 'RTN', 10, 100, '{}'::timestamptz + interval '1 second' * i FROM generate_series(1, 20000) i",
            first.format("%Y-%m-%d")
        ))
        .await
        .unwrap();
    while !(job.early_runs() >= 1 && job.runs() >= 2) {
        assert!(tokio::time::Instant::now() < deadline, "an early run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = job.last_run().unwrap().unwrap();
    assert!(last.after.cannot_free, "{last:?}");
    let health = db.health().await;
    let storage = health.checks.iter().find(|c| c.name == "storage").unwrap();
    println!(
        "/health storage after the early run: {:?} {}",
        storage.status, storage.reason
    );
    assert_eq!(storage.status, HealthStatus::Degraded);
    assert_eq!(health.status, HealthStatus::Degraded);
    assert!(
        db.metrics_text()
            .contains("railyard_retention_cannot_free 1")
    );
    assert!(
        railyard_ops::alert::Rule::builtin()
            .iter()
            .any(|r| r.name == "storage"
                && r.metric == railyard_ops::alert::Metric::StorageCannotFree)
    );
    job.shutdown(Duration::from_secs(5)).await;
    db.close(Duration::from_secs(5)).await;
    db2.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn bad_settings_name_their_variable() {
    let e = RetentionConfig::from_vars([("RAILYARD_RETENTION", "ninety days")]).unwrap_err();
    assert_eq!(e.field, "RAILYARD_RETENTION");
    let e = RetentionConfig::from_vars([
        ("RAILYARD_RETENTION", "90d"),
        ("RAILYARD_RETENTION_SIZE_THRESHOLD", "-1"),
    ])
    .unwrap_err();
    assert_eq!(e.field, "RAILYARD_RETENTION_SIZE_THRESHOLD");
    let e = RetentionConfig::new(Duration::from_secs(60))
        .validate()
        .unwrap_err();
    assert!(e.field.contains("RetentionConfig::new"), "{e}");
    let _ = Config::new("postgres://localhost/x".parse().unwrap());
}

/// Behind a transaction-mode pooler the session lock and timeouts of a run
/// would not hold: a run is refused, naming the setting, before it changes
/// anything.
#[tokio::test]
async fn a_transaction_mode_pooler_is_refused() {
    let fresh = support::fresh_database("retainpool").await;
    let db = Database::connect(
        fresh
            .config
            .clone()
            .pooler(railyard::config::Pooler::PgBouncerTransaction)
            .pool_max_size(1),
    )
    .await
    .expect("connects");
    let e = ledger_retain::ledger(config())
        .unwrap()
        .run(&db, false)
        .await
        .expect_err("refused");
    println!("{e}");
    assert!(
        matches!(&e, railyard_ops::Error::Core(railyard::Error::Config(c)) if c.field.contains("RAILYARD_POOLER")),
        "{e:?}"
    );
    assert_eq!(
        n(
            &db,
            "SELECT count(*) AS n FROM pg_tables WHERE tablename = 'railyard_retention_audit'"
        )
        .await,
        0,
        "nothing was changed"
    );
    db.close(Duration::from_secs(5)).await;
}

/// Without a retention job, `/health` and `/metrics` still show the
/// database's size and its largest tables, measured on demand (cached).
#[tokio::test]
async fn sizes_without_retention() {
    let fresh = support::fresh_database("retainsizes").await;
    let db = ledger_db(&fresh).await;
    assert!(db.storage().is_none(), "no retention job recorded figures");
    // partition_history is risky, and trades was empty on this first boot:
    // the record says no backup was needed.
    assert_eq!(
        n(&db, "SELECT count(*) AS n FROM railyard_migration_backups WHERE version = '20261124000005' AND kind = 'none'").await,
        1
    );
    let health = db.health().await;
    let storage = health
        .checks
        .iter()
        .find(|c| c.name == "storage")
        .expect("a storage check without retention");
    println!("/health storage: {:?} {}", storage.status, storage.reason);
    assert_eq!(storage.status, HealthStatus::Healthy);
    let metrics = db.metrics_text();
    let lines: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("railyard_database_size_bytes")
                || l.starts_with("railyard_table_size_bytes")
        })
        .collect();
    println!("{}", lines.join("\n"));
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("railyard_database_size_bytes ")),
        "{metrics}"
    );
    assert!(
        lines.iter().any(|l| l.contains("table=\"public.")),
        "{metrics}"
    );
    let figures = db.storage_figures().await.expect("measured");
    assert!(figures.database_bytes > 0);
    assert!(figures.tables.len() as i64 <= railyard::database::SIZES_TOP_TABLES);
    db.close(Duration::from_secs(5)).await;
}
