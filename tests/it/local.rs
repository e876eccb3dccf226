//! The local cluster: shared across processes through its lock file, and usable
//! as root and as an unprivileged user.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use railyard::Database;
use railyard_local::LocalCluster;
use railyard_local::StartKind;

/// Not a test of its own: when `RAILYARD_CHILD_DIR` is set, this process is a
/// child started by the tests below; it starts or joins the cluster there and
/// prints what happened.
#[tokio::test]
async fn child_process_entry_point() {
    let Ok(dir) = std::env::var("RAILYARD_CHILD_DIR") else {
        return;
    };
    let replica = std::env::var("RAILYARD_CHILD_REPLICA").is_ok();
    let c = LocalCluster::builder()
        .dir(&dir)
        .replica(replica)
        .start()
        .await
        .expect("start");
    let db = Database::connect(c.config_for("railyard"))
        .await
        .expect("connect");
    assert!(db.primary().await.unwrap().info().tls);
    println!("CHILD {:?} {}", c.started(), c.primary_port());
}

fn spawn_child(
    dir: &std::path::Path,
    replica: bool,
    as_user: Option<(u32, u32)>,
) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "local::child_process_entry_point",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("RAILYARD_CHILD_DIR", dir)
    .env_remove("TEST_DATABASE_URL")
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    if replica {
        cmd.env("RAILYARD_CHILD_REPLICA", "1");
    }
    if let Some((uid, gid)) = as_user {
        cmd.uid(uid).gid(gid).env("HOME", dir);
    }
    cmd.spawn().unwrap()
}

fn child_report(child: std::process::Child) -> (String, u16) {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // libtest may print "test … ... " before the line on the same line.
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("CHILD ").map(|(_, rest)| rest))
        .expect("child report");
    let mut parts = line.split_whitespace();
    (
        parts.next().unwrap().to_owned(),
        parts.next().unwrap().parse().unwrap(),
    )
}

#[tokio::test]
async fn two_processes_starting_at_once_share_one_cluster() {
    let dir = std::env::temp_dir().join(crate::support::unique("shared_cluster"));
    // This test owns it (not the children): a killed run's is reclaimed.
    railyard_local::scratch::claim_dir(&dir).unwrap();
    let a = spawn_child(&dir, true, None);
    let b = spawn_child(&dir, true, None);
    let (kind_a, port_a) = child_report(a);
    let (kind_b, port_b) = child_report(b);
    assert_eq!(port_a, port_b, "both processes use the same primary");
    let mut kinds = [kind_a, kind_b];
    kinds.sort();
    assert_eq!(kinds, ["Cold".to_owned(), "Joined".to_owned()]);
    // A third process after both joins, and the data survives a stop: warm start.
    let joined = LocalCluster::builder().dir(&dir).start().await.unwrap();
    assert_eq!(joined.started(), StartKind::Joined);
    joined.stop().unwrap();
    let warm = LocalCluster::builder().dir(&dir).start().await.unwrap();
    assert_eq!(warm.started(), StartKind::Warm);
    // Statement statistics of every client, when the server has the module.
    if railyard_local::Binaries::find()
        .unwrap()
        .has_library("pg_stat_statements")
    {
        #[derive(diesel::QueryableByName)]
        struct Calls {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            calls: i64,
        }
        let db = railyard::Database::connect(warm.config_for("postgres").pool_max_size(1))
            .await
            .unwrap();
        let mut conn = db.primary().await.unwrap();
        diesel_async::SimpleAsyncConnection::batch_execute(
            &mut **conn,
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT 4242 AS probe",
        )
        .await
        .unwrap();
        let seen: Calls = diesel_async::RunQueryDsl::get_result(
            diesel::sql_query(
                "SELECT coalesce(sum(calls), 0)::bigint AS calls FROM pg_stat_statements \
                 WHERE query LIKE 'SELECT $1 AS probe%'",
            ),
            &mut **conn,
        )
        .await
        .unwrap();
        assert!(seen.calls >= 1, "pg_stat_statements is loaded and tracking");
    }
    warm.destroy().unwrap();
}

#[tokio::test]
async fn the_cluster_starts_for_an_unprivileged_user_too() {
    let euid = std::fs::metadata("/proc/self").unwrap().uid();
    if euid != 0 {
        // This whole suite already runs unprivileged.
        return;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let ids = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f[0] == "nobody")
        .map(|f| (f[2].parse().unwrap(), f[3].parse().unwrap()));
    let Some((uid, gid)) = ids else { return };
    let dir = std::env::temp_dir().join(crate::support::unique("nobody_cluster"));
    railyard_local::scratch::claim_dir(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
    let (kind, _) = child_report(spawn_child(&dir, false, Some((uid, gid))));
    assert_eq!(kind, "Cold");
    // Stop it as its owner.
    let bins = railyard_local::Binaries::find().unwrap();
    let _ = Command::new(bins.dir().join("pg_ctl"))
        .args(["stop", "-m", "immediate", "-D"])
        .arg(dir.join("pg/primary"))
        .uid(uid)
        .gid(gid)
        .status();
    let _ = std::fs::remove_dir_all(&dir);
}
