//! Failures that need a server stopped or restarted: each test starts a private
//! cluster of its own, never touching the shared one.

use std::time::{Duration, Instant};

use diesel_async::SimpleAsyncConnection;
use railyard::{Database, Error, ErrorClass, RetryPolicy};
use railyard_local::LocalCluster;
use railyard_local::StartKind;

async fn select_one(db: &Database) -> Result<(), Error> {
    db.build_write()
        .retry_policy(RetryPolicy::never())
        .run(async |conn| {
            conn.batch_execute("SELECT 1").await?;
            Ok::<_, Error>(())
        })
        .await
}

#[tokio::test]
async fn a_refused_server_opens_the_circuit_and_its_restart_closes_it() {
    if crate::support::cluster().await.is_none() {
        return; // needs the PostgreSQL binaries, not only TEST_DATABASE_URL
    }
    let dir = std::env::temp_dir().join(crate::support::unique("breaker"));
    let cluster = LocalCluster::builder()
        .dir(&dir)
        .ephemeral(true)
        .replica(false)
        .start()
        .await
        .unwrap();
    let config = cluster
        .config_for("railyard")
        .circuit_breaker(3, Duration::from_secs(1))
        .checkout_timeout(Duration::from_millis(800))
        .connect_timeout(Duration::from_millis(500));
    let db = Database::connect(config).await.unwrap();
    select_one(&db).await.expect("the server is up");

    cluster.stop().unwrap();
    // Refused connects (each checkout retries a few) open the circuit.
    let mut opened = false;
    for _ in 0..10 {
        let e = select_one(&db).await.unwrap_err();
        assert_eq!(e.class(), ErrorClass::Reconnect, "{e}");
        if matches!(e, Error::CircuitOpen { .. }) {
            opened = true;
            break;
        }
    }
    assert!(opened, "the circuit opened");
    let started = Instant::now();
    let fast = select_one(&db).await.unwrap_err();
    assert!(matches!(fast, Error::CircuitOpen { .. }), "{fast}");
    assert_eq!(fast.class(), ErrorClass::Reconnect);
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "fails fast: {:?}",
        started.elapsed()
    );
    assert!(db.pool_status()[0].circuit_open);

    let restarted = LocalCluster::builder()
        .dir(&dir)
        .ephemeral(true)
        .replica(false)
        .start()
        .await
        .unwrap();
    assert_eq!(restarted.started(), StartKind::Warm);
    assert_eq!(
        restarted.primary_port(),
        cluster.primary_port(),
        "same port after a warm start"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match select_one(&db).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.class(), ErrorClass::Reconnect, "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the circuit did not close after the restart: {e}"),
        }
    }
    assert!(!db.pool_status()[0].circuit_open);
    drop(db);
    restarted.destroy().unwrap();
}

#[tokio::test]
async fn after_a_two_second_outage_under_load_readiness_is_green_within_three_seconds() {
    if crate::support::cluster().await.is_none() {
        return; // needs the PostgreSQL binaries, not only TEST_DATABASE_URL
    }
    let dir = std::env::temp_dir().join(crate::support::unique("outage"));
    let cluster = LocalCluster::builder()
        .dir(&dir)
        .ephemeral(true)
        .replica(false)
        .start()
        .await
        .unwrap();
    let config = cluster
        .config_for("railyard")
        .pool_max_size(8)
        .checkout_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(500));
    let db = Database::connect(config).await.unwrap();
    select_one(&db).await.expect("the server is up");

    // 50 clients keep asking throughout.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..50)
        .map(|_| {
            let (db, stop) = (db.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = select_one(&db).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.stop().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        db.pool_status()[0].circuit_open,
        "the outage opened the circuit"
    );
    let restarted = LocalCluster::builder()
        .dir(&dir)
        .ephemeral(true)
        .replica(false)
        .start()
        .await
        .unwrap();
    let back = Instant::now();
    let green = loop {
        let report = db.readiness().await;
        if report.status == railyard::HealthStatus::Healthy {
            break back.elapsed();
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "readiness stayed red: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("readiness green {green:?} after the server came back");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    drop(db);
    restarted.destroy().unwrap();
    assert!(
        green < Duration::from_secs(3),
        "readiness green {green:?} after the server came back"
    );
}

#[tokio::test]
async fn a_standby_that_answers_keeps_a_multi_host_circuit_closed_while_the_primary_is_away() {
    if crate::support::cluster().await.is_none() {
        return; // needs the PostgreSQL binaries, not only TEST_DATABASE_URL
    }
    let dir = std::env::temp_dir().join(crate::support::unique("moving"));
    let cluster = LocalCluster::builder()
        .dir(&dir)
        .ephemeral(true)
        .start()
        .await
        .unwrap();
    // The standby first: with the primary gone, the walk ends on a refused
    // connection, after a server that answered as a standby.
    let sockets = cluster.socket_dir();
    let url = format!(
        "postgres://railyard:{}@/railyard?host={},{}&port={},{}&target_session_attrs=read-write&sslmode=disable",
        cluster.password().expose(),
        sockets.display(),
        sockets.display(),
        cluster.replica_port().unwrap(),
        cluster.primary_port(),
    );
    let config = railyard::Config::from_url(&url)
        .unwrap()
        .circuit_breaker(1, Duration::from_secs(5))
        .checkout_timeout(Duration::from_millis(300));
    let db = Database::connect(config).await.unwrap();
    select_one(&db).await.expect("the primary is up");

    cluster.stop_primary().unwrap();
    for _ in 0..5 {
        let e = select_one(&db).await.unwrap_err();
        assert_eq!(e.class(), ErrorClass::Reconnect, "{e}");
        assert!(!matches!(e, Error::CircuitOpen { .. }), "{e}");
    }
    assert!(
        !db.pool_status()[0].circuit_open,
        "a standby answered: the primary role is moving, the target is not down"
    );
    cluster.promote_replica().unwrap();
    let promoted = Instant::now();
    loop {
        match select_one(&db).await {
            Ok(()) => break,
            Err(e) => {
                assert!(
                    promoted.elapsed() < Duration::from_secs(2),
                    "the promoted standby is found at once, not after a 5 s cooldown: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    drop(db);
    cluster.destroy().unwrap();
}
