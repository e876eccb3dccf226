//! The trading workload through the binary, as a user runs it: `railyard
//! load` on a fresh ledger database (with the replica), `railyard check`
//! after it, each invariant broken on purpose and caught (and repaired where
//! the data is derived), and the stress flags on a private cluster.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use diesel_async::SimpleAsyncConnection;
use railyard::{Config, Database};
use railyard_local::LocalCluster;

use crate::support::{self, FreshDb, output_text};

/// Runs the binary with a clean environment plus `env`.
fn railyard(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_railyard"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::var_os("HOME").unwrap_or_default());
    // The ledger's partition_history is risky: a boot that applies it dumps
    // `trades` first, into a directory removed afterwards.
    let dumps = support::Dumps::new();
    cmd.env(railyard::migrate::BACKUP_DIR_VAR, dumps.dir().as_os_str());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

/// DATABASE_URL (and the replica's URL) of a fresh database.
async fn env_of(db: &FreshDb) -> Vec<(&'static str, String)> {
    let mut env = vec![("DATABASE_URL", db.config.primary().expose_url())];
    if let Some(c) = support::cluster().await
        && let Some(r) = c.replica_target(&db.name)
    {
        env.push(("DATABASE_REPLICA_URLS", r.expose_url()));
    }
    env
}

fn out_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(support::unique(name))
}

fn report(dir: &Path) -> serde_json::Value {
    let body = std::fs::read_to_string(dir.join("report.json")).expect("report.json is written");
    serde_json::from_str(&body).expect("report.json is JSON")
}

/// Runs SQL on the fresh database as the superuser.
async fn sql(db: &FreshDb, statements: &str) {
    let handle = Database::connect(Config::new(db.config.primary().clone()).pool_max_size(1))
        .await
        .unwrap();
    let mut conn = handle.primary().await.unwrap();
    conn.batch_execute(statements)
        .await
        .unwrap_or_else(|e| panic!("{statements}: {e}"));
}

/// `railyard check`'s failing invariants, by name.
fn failing(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("FAIL "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_trading_day_runs_through_the_crate_and_leaves_the_ledger_consistent() {
    let db = support::fresh_database("load").await;
    let env = env_of(&db).await;
    let out = out_dir("load_report");
    let o = railyard(
        &[
            "load",
            "--orders",
            "150",
            "--rate",
            "150",
            "--traders",
            "20",
            "--symbols",
            "10",
            "--seed",
            "11",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", output_text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    for name in [
        "money_conserved",
        "positions_match_trades",
        "trades_have_both_orders",
    ] {
        assert!(
            stdout.contains(&format!("pass {name}")),
            "{}",
            output_text(&o)
        );
    }
    let r = report(&out);
    let run = &r["railyard"];
    assert_eq!(run["stale_reads"], 0, "{run}");
    let op = |name: &str| {
        run["ops"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["op"] == name)
            .unwrap_or_else(|| panic!("no {name} in {run}"))
            .clone()
    };
    assert_eq!(op("place")["count"], 150, "every planned order was placed");
    assert_eq!(op("match")["count"], 150, "each placement ran the matcher");
    assert!(op("portfolio")["count"].as_u64().unwrap() > 0);
    if env.len() > 1 {
        let share = run["replica_share"].as_f64().unwrap();
        assert!(share > 0.0, "the replica served reads: {run}");
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains("<svg") && html.contains("polyline"),
        "plots are inline SVG"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "nothing is fetched"
    );
    // The idempotency keys: each order placed once, under its own key.
    assert_eq!(
        support::count(
            &db.config,
            "SELECT count(*) - count(DISTINCT (account_id, client_order_id)) AS n FROM orders"
        )
        .await,
        0
    );
    let trades = support::count(&db.config, "SELECT count(*) AS n FROM trades").await;
    assert!(trades > 0, "the matcher crossed orders");
    let c = railyard(&["check"], &env);
    assert!(c.status.success(), "{}", output_text(&c));
    let _ = std::fs::remove_dir_all(&out);
}

#[tokio::test]
async fn each_broken_invariant_is_caught_and_derived_data_is_repaired() {
    let db = support::fresh_database("check").await;
    let env = env_of(&db).await;
    let out = out_dir("check_report");
    let o = railyard(
        &[
            "load",
            "--orders",
            "120",
            "--rate",
            "200",
            "--traders",
            "8",
            "--symbols",
            "3",
            "--seed",
            "5",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ],
        &env,
    );
    assert!(o.status.success(), "{}", output_text(&o));
    let _ = std::fs::remove_dir_all(&out);
    assert!(support::count(&db.config, "SELECT count(*) AS n FROM trades").await > 2);
    let check = || railyard(&["check"], &env);
    let repair = || railyard(&["check", "--repair"], &env);
    assert!(check().status.success());

    // Derived data, broken and repaired.
    let derived: [(&str, &[&str]); 4] = [
        (
            "UPDATE positions SET quantity = quantity + 7 \
             WHERE (account_id, symbol) = (SELECT account_id, symbol FROM positions ORDER BY 1, 2 LIMIT 1); \
             DELETE FROM positions WHERE (account_id, symbol) = (SELECT account_id, symbol FROM positions ORDER BY 1 DESC, 2 LIMIT 1)",
            &["positions_match_trades"],
        ),
        (
            "UPDATE orders SET filled_quantity = filled_quantity - 1, status = 'open' \
             WHERE id = (SELECT min(id) FROM orders WHERE filled_quantity > 0)",
            &["fills_match_trades"],
        ),
        (
            "UPDATE orders SET status = 'filled' \
             WHERE id = (SELECT min(id) FROM orders WHERE status = 'open' AND filled_quantity < quantity)",
            &["fills_within_quantity"],
        ),
        (
            "ALTER TABLE orders DROP CONSTRAINT orders_fill_bounded; \
             UPDATE orders SET filled_quantity = quantity + 5 \
             WHERE id = (SELECT min(id) FROM orders WHERE status = 'filled')",
            &["fills_match_trades", "fills_within_quantity"],
        ),
    ];
    for (corrupt, broken) in derived {
        sql(&db, corrupt).await;
        let c = check();
        assert_eq!(c.status.code(), Some(1), "{corrupt}\n{}", output_text(&c));
        assert_eq!(failing(&c), broken, "{corrupt}\n{}", output_text(&c));
        let r = repair();
        assert!(
            r.status.success(),
            "repaired: {corrupt}\n{}",
            output_text(&r)
        );
        assert!(
            String::from_utf8_lossy(&r.stdout).contains("repair "),
            "{}",
            output_text(&r)
        );
    }
    sql(&db, "ALTER TABLE orders ADD CONSTRAINT orders_fill_bounded CHECK (filled_quantity BETWEEN 0 AND quantity)").await;
    assert!(check().status.success());

    // The source of truth, broken: caught, and left alone by --repair.
    let source: [(&str, &[&str], &str); 4] = [
        (
            "UPDATE accounts SET balance_cents = balance_cents + 1 WHERE id = (SELECT min(id) FROM accounts)",
            &["money_conserved", "cash_matches_history"],
            "UPDATE accounts SET balance_cents = balance_cents - 1 WHERE id = (SELECT min(id) FROM accounts)",
        ),
        (
            "ALTER TABLE accounts DROP CONSTRAINT accounts_balance_non_negative; \
             UPDATE accounts SET balance_cents = balance_cents - 1000000000000 WHERE id = (SELECT min(id) FROM accounts)",
            &[
                "money_conserved",
                "cash_matches_history",
                "no_negative_balance",
            ],
            "UPDATE accounts SET balance_cents = balance_cents + 1000000000000 WHERE id = (SELECT min(id) FROM accounts); \
             ALTER TABLE accounts ADD CONSTRAINT accounts_balance_non_negative CHECK (balance_cents >= 0)",
        ),
        (
            // A trade whose orders do not exist (foreign keys bypassed, as a
            // bad restore or a careless bulk load would).
            "SET session_replication_role = replica; \
             INSERT INTO trades (id, buy_order_id, sell_order_id, symbol, quantity, price_cents) \
             VALUES (999999999, 999999998, 999999997, 'S000', 1, 100)",
            &["trades_have_both_orders", "trades_pay_two_fees"],
            "DELETE FROM trades WHERE id = 999999999",
        ),
        (
            "CREATE TABLE fee_backup AS SELECT * FROM fees WHERE id = (SELECT min(id) FROM fees); \
             DELETE FROM fees WHERE id = (SELECT id FROM fee_backup)",
            &[
                "money_conserved",
                "cash_matches_history",
                "trades_pay_two_fees",
            ],
            "INSERT INTO fees SELECT * FROM fee_backup; DROP TABLE fee_backup",
        ),
    ];
    for (corrupt, broken, undo) in source {
        sql(&db, corrupt).await;
        let c = check();
        assert_eq!(failing(&c), broken, "{corrupt}\n{}", output_text(&c));
        // Each verdict counts its offenders: one account, one trade, one fee.
        for line in String::from_utf8_lossy(&c.stdout).lines() {
            if let Some(rest) = line.strip_prefix("FAIL ")
                && !rest.starts_with("money_conserved")
            {
                assert_eq!(rest.split_whitespace().nth(1), Some("1"), "{line}");
            }
        }
        let r = repair();
        assert_eq!(
            r.status.code(),
            Some(1),
            "not repairable: {corrupt}\n{}",
            output_text(&r)
        );
        assert_eq!(
            failing(&r),
            broken,
            "repair left the source alone: {}",
            output_text(&r)
        );
        sql(&db, undo).await;
        let c = check();
        assert!(
            c.status.success(),
            "after undoing {corrupt}\n{}",
            output_text(&c)
        );
    }
}

#[tokio::test]
async fn the_stress_flags_pause_the_replica_and_restart_the_primary_without_breaking_the_ledger() {
    if support::cluster().await.is_none() {
        return; // needs the PostgreSQL binaries, not only TEST_DATABASE_URL
    }
    let dir = std::env::temp_dir().join(support::unique("stress"));
    let cluster = LocalCluster::builder()
        .dir(&dir)
        .ephemeral(true)
        .start()
        .await
        .unwrap();
    let out = out_dir("stress_report");
    let env = vec![("RAILYARD_LOCAL_DIR", dir.display().to_string())];
    let o = railyard(
        &[
            "load",
            "--duration",
            "8s",
            "--rate",
            "60",
            "--traders",
            "10",
            "--symbols",
            "5",
            "--seed",
            "3",
            "--pause-replica",
            "--restart-primary",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ],
        &env,
    );
    let r = report(&out);
    let _ = std::fs::remove_dir_all(&out);
    cluster.destroy().unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    let run = &r["railyard"];
    let events: Vec<String> = run["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["what"].as_str().unwrap().to_owned())
        .collect();
    for e in [
        "replica replay paused",
        "replica replay resumed",
        "primary restarting (immediate)",
        "primary accepting connections again",
    ] {
        assert!(events.iter().any(|x| x == e), "{e} in {events:?}");
    }
    assert_eq!(run["stale_reads"], 0, "{run}");
}

#[tokio::test]
async fn railyard_queries_lists_the_applications_running_statements_by_shape() {
    let app = support::unique("queries");
    let base = support::ledger(|c| c.application_name(app.clone())).await;
    let sleeper = {
        let db = base.clone();
        tokio::spawn(async move {
            db.with_primary(async |c| {
                c.batch_execute("SELECT pg_sleep(3), 'marker-literal-31c7'")
                    .await?;
                Ok::<_, railyard::Error>(())
            })
            .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let env = vec![
        ("DATABASE_URL", base.config().primary().expose_url()),
        ("RAILYARD_APPLICATION_NAME", app.clone()),
    ];
    let o = tokio::task::spawn_blocking(move || railyard(&["queries"], &env))
        .await
        .unwrap();
    assert!(o.status.success(), "{}", output_text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("pg_sleep"))
        .unwrap_or_else(|| panic!("the sleeping statement is listed: {}", output_text(&o)));
    assert!(
        line.contains("active") && line.contains("PgSleep"),
        "{line}"
    );
    assert!(
        !stdout.contains("marker-literal-31c7"),
        "{}",
        output_text(&o)
    );
    sleeper.await.unwrap().unwrap();
}

#[test]
fn bad_load_flags_are_refused_by_name_before_any_connection() {
    // A URL whose server does not exist: a flag error must come first.
    let env = [(
        "DATABASE_URL",
        "postgres://u:pw-marker-8e1f@127.0.0.1:1/nowhere".to_owned(),
    )];
    for (args, flag) in [
        (&["load", "--traders", "1"][..], "--traders"),
        (&["load", "--rate", "0"][..], "--rate"),
        (&["load", "--concurrency", "0"][..], "--concurrency"),
        (&["load", "--orders", "0"][..], "--orders"),
        (&["load", "--symbols", "0"][..], "--symbols"),
    ] {
        let o = railyard(args, &env);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", output_text(&o));
        assert!(err.contains(flag), "{args:?} names {flag}: {err}");
        assert!(!err.contains("pw-marker-8e1f"), "{err}");
        assert!(!err.contains("connect"), "refused before connecting: {err}");
    }
}
