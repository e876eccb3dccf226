//! Backups through the binary, on a private cluster: `railyard backup init`
//! (archiving on, the replica kept), a workload, a full backup, more
//! workload, an incremental one, a noted time, more workload; the
//! point-in-time restore to that time holds exactly the transactions
//! committed before it (by the ledger's idempotency keys), and the restore
//! drill passes. A drill on a damaged repository fails clearly.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use railyard::LocalCluster;

use crate::support;

/// The private cluster, destroyed when the test ends (passed or not).
struct Destroy(LocalCluster);

impl Drop for Destroy {
    fn drop(&mut self) {
        let scratch = self.0.dir().join("backup/scratch");
        let left: Vec<_> = std::fs::read_dir(&scratch)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        for name in left {
            // A scratch instance a failed assertion left running.
            let _ = railyard(&self.0, &["backup", "discard", &name.to_string_lossy()]);
        }
        let _ = self.0.destroy();
    }
}

fn railyard(cluster: &LocalCluster, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_railyard"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RAILYARD_LOCAL_DIR", cluster.dir())
        .env("RAILYARD_ENV", "development")
        .output()
        .expect("the binary runs")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(cluster: &LocalCluster, args: &[&str]) -> String {
    let started = Instant::now();
    let o = railyard(cluster, args);
    assert!(
        o.status.success(),
        "railyard {}: {}",
        args.join(" "),
        text(&o)
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    println!(
        "$ railyard {}   ({:.2?})",
        args.join(" "),
        started.elapsed()
    );
    for l in out
        .lines()
        .filter(|l| !l.starts_with("pass ") || args[0] == "backup")
    {
        println!("  {l}");
    }
    out
}

fn load(cluster: &LocalCluster, out: &Path) {
    let out = out.display().to_string();
    ok(
        cluster,
        &[
            "load",
            "--orders",
            "60",
            "--rate",
            "300",
            "--traders",
            "8",
            "--symbols",
            "4",
            "--concurrency",
            "4",
            "--quiet",
            "--out",
            &out,
        ],
    );
}

async fn client(socket: &Path, port: u16, password: &str) -> tokio_postgres::Client {
    let mut c = tokio_postgres::Config::new();
    c.host_path(socket)
        .port(port)
        .user("railyard")
        .password(password)
        .dbname("railyard");
    let (client, conn) = c.connect(tokio_postgres::NoTls).await.expect("connects");
    tokio::spawn(conn);
    client
}

/// The ledger's idempotency keys: deposits' keys and orders' client ids.
async fn keys(c: &tokio_postgres::Client) -> BTreeSet<String> {
    c.query(
        "SELECT 'deposit ' || idempotency_key FROM deposits \
         UNION ALL SELECT 'order ' || account_id || ' ' || client_order_id FROM orders WHERE client_order_id IS NOT NULL",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test]
async fn pitr_holds_exactly_the_transactions_before_the_target_and_the_drill_passes() {
    let started = Instant::now();
    let cluster = support::private_cluster("backup", true).await;
    let guard = Destroy(cluster.clone());
    let out = cluster.dir().join("load-out");
    let password = cluster.password().expose().to_owned();

    ok(&cluster, &["boot"]);
    ok(&cluster, &["backup", "init"]);
    let source = client(&cluster.socket_dir(), cluster.primary_port(), &password).await;
    // The replica streams again after the primary's restart.
    let streaming: i64 = source
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(streaming, 1);

    load(&cluster, &out);
    let full = ok(&cluster, &["backup", "run", "--type", "full"]);
    assert!(full.contains("(full)"), "{full}");
    load(&cluster, &out);
    let incr = ok(&cluster, &["backup", "run", "--type", "incr"]);
    assert!(incr.contains("(incr)"), "{incr}");
    let list = ok(&cluster, &["backup", "list"]);
    assert!(list.contains("2 backup(s)"), "{list}");

    // The workload is stopped: the keys now are those committed before `t`.
    let before = keys(&source).await;
    source
        .batch_execute("SELECT pg_switch_wal()")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = source
            .query_one(
                "SELECT last_archived_wal >= pg_walfile_name(pg_current_wal_lsn() - 1) FROM pg_stat_archiver",
                &[],
            )
            .await
            .unwrap();
        if row.get::<_, Option<bool>>(0) == Some(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the switched segment was not archived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t: String = source
        .query_one(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    load(&cluster, &out);
    let after = keys(&source).await;
    assert!(before.is_subset(&after));
    let later: BTreeSet<_> = after.difference(&before).cloned().collect();
    assert!(!later.is_empty(), "the last workload committed after t");
    // Commit order by the server's own clock (track_commit_timestamp is on
    // with backups): every deposit committed at or before t is in `before`,
    // every later one is not (deposits are never updated, so xmin is the
    // inserting transaction).
    let rows = source
        .query(
            "SELECT 'deposit ' || idempotency_key, pg_xact_commit_timestamp(xmin) <= $1::text::timestamptz FROM deposits",
            &[&t],
        )
        .await
        .unwrap();
    for r in &rows {
        let key: String = r.get(0);
        let committed_before: Option<bool> = r.get(1);
        if let Some(b) = committed_before {
            assert_eq!(b, before.contains(&key), "{key}");
        }
    }

    let restore = ok(&cluster, &["backup", "restore", "--to-time", &t, "--keep"]);
    let kept = restore
        .lines()
        .find_map(|l| l.strip_prefix("kept "))
        .expect("the kept instance is named");
    let mut words = kept.split_whitespace();
    let name = words.next().unwrap().to_owned();
    let port: u16 = words.nth(2).unwrap().parse().unwrap();
    let restored = client(
        &cluster.dir().join("backup/scratch").join(&name).join("s"),
        port,
        &password,
    )
    .await;
    let got = keys(&restored).await;
    drop(restored);
    let missing: Vec<_> = before.difference(&got).take(5).collect();
    let extra: Vec<_> = got.difference(&before).take(5).collect();
    println!(
        "PITR check: {} keys committed before {t}, {} after; the restored copy has {} (missing {}, extra {})",
        before.len(),
        later.len(),
        got.len(),
        before.difference(&got).count(),
        got.difference(&before).count()
    );
    assert_eq!(got, before, "missing {missing:?}, extra {extra:?}");
    ok(&cluster, &["backup", "discard", &name]);

    let drill = ok(&cluster, &["backup", "verify"]);
    assert!(drill.contains("drill PASSED"), "{drill}");
    assert!(drill.contains("pass invariant money_conserved"), "{drill}");
    assert!(drill.contains("pass rows public.orders"), "{drill}");
    let full_label = full.split_whitespace().nth(1).unwrap().to_owned();
    let drill = ok(&cluster, &["backup", "verify", "--set", &full_label]);
    assert!(drill.contains("drill PASSED"), "{drill}");
    let left = std::fs::read_dir(cluster.dir().join("backup/scratch"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "scratch instances are removed");
    drop(source);
    drop(guard);
    println!("whole test {:.2?}", started.elapsed());
}

#[tokio::test]
async fn a_drill_on_a_damaged_repository_fails_clearly_and_leaves_nothing() {
    let cluster = support::private_cluster("backup_bad", false).await;
    let _guard = Destroy(cluster.clone());
    ok(&cluster, &["boot"]);
    ok(&cluster, &["backup", "init"]);
    let run = ok(&cluster, &["backup", "run"]);
    let label = run.split_whitespace().nth(1).unwrap().to_owned();
    // The backup's files are gone; pgBackRest's catalogue still lists it.
    std::fs::remove_dir_all(
        cluster
            .dir()
            .join("backup/repo/backup/railyard")
            .join(&label),
    )
    .unwrap();
    let o = railyard(&cluster, &["backup", "verify"]);
    let all = text(&o);
    println!("{all}");
    assert_eq!(o.status.code(), Some(1), "{all}");
    assert!(all.contains("drill FAILED"), "{all}");
    assert!(
        all.contains("phase restore") && all.contains("FAILED"),
        "{all}"
    );
    assert!(
        all.contains("pgbackrest"),
        "the tool's error is kept: {all}"
    );
    assert!(!all.contains("panicked"), "{all}");
    assert!(
        !all.contains(cluster.password().expose()),
        "no secret in the output"
    );
    let left = std::fs::read_dir(cluster.dir().join("backup/scratch"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "the scratch directory is removed");

    // The whole repository gone: a clear failure as well.
    std::fs::remove_dir_all(cluster.dir().join("backup/repo")).unwrap();
    let o = railyard(&cluster, &["backup", "verify"]);
    let all = text(&o);
    println!("{all}");
    assert_eq!(o.status.code(), Some(1), "{all}");
    assert!(all.contains("drill FAILED"), "{all}");
    assert!(!all.contains("panicked"), "{all}");
}
