//! Backups through the binary, on a private cluster: `railyard backup init`
//! (archiving on, the replica kept), a workload, a full backup, more
//! workload, an incremental one, a noted time, more workload; the
//! point-in-time restore to that time holds exactly the transactions
//! committed before it (by the ledger's idempotency keys), and the restore
//! drill passes. A drill on a damaged repository fails clearly. Risky
//! migrations on the local cluster are backed up as the binary configures
//! it (pg_dump into the cluster before `backup init`, pgBackRest after); a
//! drill of a backup without a counted restore point is not verified; a
//! point-in-time restore on a quiet cluster works.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use railyard::Migrator;
use railyard::migrate::BeforeRisky;
use railyard_local::LocalCluster;
use railyard_ops::backup::local::{LocalBackups, NOT_VERIFIED};

use crate::support::{self, output_text};

/// How long one run of the binary may take before it is killed.
const RUN_DEADLINE: Duration = Duration::from_secs(600);

/// The private cluster, destroyed when the test ends (passed or not).
struct Destroy(LocalCluster);

impl Drop for Destroy {
    fn drop(&mut self) {
        let scratch = self.0.dir().join("backup/scratch");
        let left: Vec<_> = std::fs::read_dir(&scratch)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        for dir in left {
            // A scratch instance a failed assertion left running.
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let discarded = railyard_blocking(&self.0, &["backup", "discard", &name]);
            if !discarded {
                // Its postmaster must not outlive the directory removed below.
                stop_postmaster(&dir.join("data"));
            }
        }
        let _ = self.0.destroy();
    }
}

/// Stops the postmaster of `data` by its pid file (SIGQUIT, then SIGKILL
/// after 10 s), waiting until it is gone.
fn stop_postmaster(data: &Path) {
    let Some(pid) = std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next()?.trim().parse::<i32>().ok())
    else {
        return;
    };
    let alive = || Path::new(&format!("/proc/{pid}")).exists();
    let _ = Command::new("kill")
        .args(["-QUIT", &pid.to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if alive() {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn command(cluster: &LocalCluster, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_railyard"));
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RAILYARD_LOCAL_DIR", cluster.dir())
        .env("RAILYARD_ENV", "development");
    c
}

/// Runs the binary off the runtime's threads, killed past [`RUN_DEADLINE`].
async fn railyard(cluster: &LocalCluster, args: &[&str]) -> Output {
    let mut c = tokio::process::Command::from(command(cluster, args));
    c.kill_on_drop(true);
    tokio::time::timeout(RUN_DEADLINE, c.output())
        .await
        .unwrap_or_else(|_| panic!("railyard {} ran past {RUN_DEADLINE:?}", args.join(" ")))
        .expect("the binary runs")
}

/// For `Drop`: runs the binary to its end (killed after 120 s); whether it
/// succeeded.
fn railyard_blocking(cluster: &LocalCluster, args: &[&str]) -> bool {
    let Ok(mut child) = command(cluster, args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return false;
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

async fn ok(cluster: &LocalCluster, args: &[&str]) -> String {
    let started = Instant::now();
    let o = railyard(cluster, args).await;
    assert!(
        o.status.success(),
        "railyard {}: {}",
        args.join(" "),
        output_text(&o)
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

async fn load(cluster: &LocalCluster, out: &Path) {
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
    )
    .await;
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

    ok(&cluster, &["boot"]).await;
    ok(&cluster, &["backup", "init"]).await;
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

    load(&cluster, &out).await;
    let full = ok(&cluster, &["backup", "run", "--type", "full"]).await;
    assert!(full.contains("(full)"), "{full}");
    load(&cluster, &out).await;
    let incr = ok(&cluster, &["backup", "run", "--type", "incr"]).await;
    assert!(incr.contains("(incr)"), "{incr}");
    let list = ok(&cluster, &["backup", "list"]).await;
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
    let t: String = server_now(&source).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    load(&cluster, &out).await;
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

    let restore = ok(&cluster, &["backup", "restore", "--to-time", &t, "--keep"]).await;
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
    ok(&cluster, &["backup", "discard", &name]).await;

    let drill = ok(&cluster, &["backup", "verify"]).await;
    assert!(drill.contains("drill PASSED"), "{drill}");
    assert!(drill.contains("pass invariant money_conserved"), "{drill}");
    assert!(drill.contains("pass rows public.orders"), "{drill}");
    let full_label = full.split_whitespace().nth(1).unwrap().to_owned();
    let drill = ok(&cluster, &["backup", "verify", "--set", &full_label]).await;
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
    ok(&cluster, &["boot"]).await;
    ok(&cluster, &["backup", "init"]).await;
    let run = ok(&cluster, &["backup", "run"]).await;
    let label = run.split_whitespace().nth(1).unwrap().to_owned();
    // The backup's files are gone; pgBackRest's catalogue still lists it.
    std::fs::remove_dir_all(
        cluster
            .dir()
            .join("backup/repo/backup/railyard")
            .join(&label),
    )
    .unwrap();
    let o = railyard(&cluster, &["backup", "verify"]).await;
    let all = output_text(&o);
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
    let o = railyard(&cluster, &["backup", "verify"]).await;
    let all = output_text(&o);
    println!("{all}");
    assert_eq!(o.status.code(), Some(1), "{all}");
    assert!(all.contains("drill FAILED"), "{all}");
    assert!(!all.contains("panicked"), "{all}");
}

const RISKY: EmbeddedMigrations = embed_migrations!("tests/migrations/risky");

#[tokio::test]
async fn risky_migrations_are_backed_up_as_the_binary_does_and_a_drill_without_counts_is_not_verified()
 {
    let started = Instant::now();
    let cluster = support::private_cluster("backup_risky", false).await;
    let _guard = Destroy(cluster.clone());
    ok(&cluster, &["boot"]).await;

    // Before `backup init`: pg_dump into the cluster's directory, so a
    // fresh local cluster boots through its risky migrations.
    cluster.create_database("risky_a").await.unwrap();
    let backups = LocalBackups::new(&cluster, "risky_a").unwrap();
    let how = backups.before_risky().await.unwrap();
    assert!(matches!(how, BeforeRisky::PgDump { .. }), "{how:?}");
    let config = cluster.config_for("risky_a");
    let migrator = Migrator::new(RISKY)
        .backup_before_risky(how)
        .backup_dir_from_env(false);
    assert_eq!(migrator.run(&config).await.unwrap().applied.len(), 2);
    let b = migrator.status(&config).await.unwrap()[1]
        .backup
        .clone()
        .expect("the risky migration's backup is recorded");
    println!(
        "before init: {} {} ({:?} bytes)",
        b.kind, b.location, b.bytes
    );
    assert_eq!(b.kind, "pg_dump");
    assert!(Path::new(&b.location).starts_with(backups.dumps_path()));
    assert!(Path::new(&b.location).is_file());

    // After it: pgBackRest.
    ok(&cluster, &["backup", "init"]).await;
    cluster.create_database("risky_b").await.unwrap();
    let backups = LocalBackups::new(&cluster, "risky_b").unwrap();
    let how = backups.before_risky().await.unwrap();
    assert!(matches!(how, BeforeRisky::Tool(_)), "{how:?}");
    let config = cluster.config_for("risky_b");
    let migrator = Migrator::new(RISKY).backup_before_risky(how);
    let t0 = Instant::now();
    migrator.run(&config).await.unwrap();
    let b = migrator.status(&config).await.unwrap()[1]
        .backup
        .clone()
        .expect("the risky migration's backup is recorded");
    println!(
        "after init: {} {} in {:.2?}",
        b.kind,
        b.location,
        t0.elapsed()
    );
    assert_eq!(b.kind, "pgbackrest");

    // That backup has no counted restore point: the drill restores it and
    // runs the checks, but cannot compare rows, so it does not pass.
    let o = railyard(&cluster, &["backup", "verify"]).await;
    let all = output_text(&o);
    println!("{all}");
    assert_eq!(o.status.code(), Some(1), "{all}");
    assert!(
        all.contains("drill FAILED") && all.contains(NOT_VERIFIED),
        "{all}"
    );
    assert!(
        all.contains(&b.location),
        "the drill names the backup: {all}"
    );

    // A point-in-time restore on a quiet cluster: nothing commits after the
    // target, yet recovery finds a commit after it.
    let source = client(
        &cluster.socket_dir(),
        cluster.primary_port(),
        cluster.password().expose(),
    )
    .await;
    let t: String = server_now(&source).await;
    drop(source);
    tokio::time::sleep(Duration::from_millis(20)).await;
    ok(&cluster, &["backup", "restore", "--to-time", &t]).await;
    // A time ahead of the server's clock is refused, naming the flag.
    let o = railyard(
        &cluster,
        &["backup", "restore", "--to-time", "2999-01-01T00:00:00Z"],
    )
    .await;
    let all = output_text(&o);
    assert_ne!(o.status.code(), Some(0), "{all}");
    assert!(
        all.contains("--to-time") && all.contains("server's clock"),
        "{all}"
    );
    let left = std::fs::read_dir(cluster.dir().join("backup/scratch"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "scratch instances are removed");
    println!("whole test {:.2?}", started.elapsed());
}

/// The server's clock now, as `railyard backup restore --to-time` takes it.
async fn server_now(client: &tokio_postgres::Client) -> String {
    client
        .query_one(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}
