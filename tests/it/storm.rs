//! A reconnect storm: every connection of four application instances (200
//! in all) is reset at once, under load, through the fault-injecting proxy.
//! The pools refill without a thundering herd, the server's connection limit
//! is never reached, the breaker stays closed, and throughput comes back
//! within a bound measured here.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use diesel::IntoSql;
use diesel_async::RunQueryDsl;
use railyard::{Config, Database, Error};
use tokio::time::Instant;

use crate::proxy::Proxy;
use crate::support;

const INSTANCES: usize = 4;
const POOL: u32 = 50;
/// Each worker (one per pooled connection) runs an operation this often:
/// 200 workers offer 2,000 reads a second, well below what two cores serve, so
/// the rate before the cut is the offered rate and recovery is measured
/// against it.
const PACE: Duration = Duration::from_millis(100);
/// Throughput is counted in buckets of this width.
const BUCKET: Duration = Duration::from_millis(50);

#[derive(Default)]
struct Tally {
    /// Failed operations by class.
    classes: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    ops: AtomicU64,
    errors: AtomicU64,
    circuit_open: AtomicU64,
    too_many: AtomicU64,
}

/// What one storm measured.
struct Storm {
    cut: usize,
    reconnects: usize,
    /// Reconnects after the cut: first, median, last, 80th percentile.
    spread: [Duration; 4],
    before: u64,
    recovered: Option<Duration>,
    lost_s: f64,
    failed: u64,
    /// Operations that succeeded after the cut.
    ops_after: u64,
    /// Failures by class.
    classes: std::collections::BTreeMap<String, u64>,
    circuit_open: u64,
    too_many: u64,
    peak_server: u64,
    max_connections: i64,
    any_circuit_open: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_of_200_connections_under_load_refills_without_a_herd_and_recovers() {
    if support::cluster().await.is_none() {
        return;
    }
    let cluster = support::private_cluster("storm", false).await;
    let s = storm(&cluster, None).await;
    cluster.destroy().unwrap();
    assert!(!s.any_circuit_open);
    // (A connection being replaced at that instant may be missed.)
    assert!(s.cut >= INSTANCES * POOL as usize * 95 / 100, "{}", s.cut);
    assert_eq!(
        s.circuit_open, 0,
        "the breaker stays closed for a transient cut"
    );
    assert_eq!(
        s.too_many, 0,
        "no attempt was refused for too many connections"
    );
    // Reads that lost their connection are retried. A machine starved by
    // everything else the suite runs may shed a few (the pool's wait
    // budget) or run a retry budget dry: bounded, and of those kinds only.
    assert!(
        s.failed * 100 <= s.ops_after,
        "{} failed of {}: {:?}",
        s.failed,
        s.ops_after,
        s.classes
    );
    for class in s.classes.keys() {
        assert!(
            ["Overloaded", "Reconnect", "Timeout"].contains(&class.as_str()),
            "{:?}",
            s.classes
        );
    }
    assert!((s.peak_server as i64) < s.max_connections);
    let recovered = s.recovered.expect("throughput came back");
    // 80 % of the rate needs about 80 % of the connections back: once they
    // are, throughput follows within a second. How fast they come back is
    // the machine's (a busy CI runner pays for each connection's fork and
    // SCRAM); a pool that stalls is bounded separately.
    assert!(
        recovered < s.spread[3] + Duration::from_secs(1),
        "back to 80 % after {recovered:?}, though 80 % of the reconnects were done after {:?}",
        s.spread[3]
    );
    assert!(
        s.spread[2] < Duration::from_secs(10),
        "the last reconnect came {:?} after the cut",
        s.spread[2]
    );
    // Spread, not a herd: unbounded, the 200 attempts land within tens of
    // milliseconds (see `herd_against_stream`); bounded, over hundreds.
    assert!(
        s.spread[2] - s.spread[0] >= Duration::from_millis(150),
        "reconnects within {:?}",
        s.spread[2] - s.spread[0]
    );
    assert!(
        s.reconnects <= 2 * INSTANCES * POOL as usize,
        "{} reconnects",
        s.reconnects
    );
}

/// The same storm with the attempts unbounded (a herd) and bounded (the
/// default), in one run. Run: `cargo test --test it
/// storm::herd_against_stream -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: run it by name"]
async fn herd_against_stream() {
    if support::cluster().await.is_none() {
        return;
    }
    let cluster = support::private_cluster("storm_ab", false).await;
    println!(
        "max_connecting | rate before (ops / 50 ms) | reconnects first / median / last | back to 80 % | full-rate seconds lost"
    );
    for (name, bound) in [
        ("unbounded", Some(100_000)),
        ("8 (default)", None),
        ("unbounded", Some(100_000)),
        ("8 (default)", None),
    ] {
        let s = storm(&cluster, bound).await;
        println!(
            "{name} | {} | {:?} / {:?} / {:?} | {:?} | {:.2}",
            s.before, s.spread[0], s.spread[1], s.spread[2], s.recovered, s.lost_s
        );
    }
    cluster.destroy().unwrap();
}

async fn storm(cluster: &railyard_local::LocalCluster, max_connecting: Option<u32>) -> Storm {
    let proxy = Proxy::start(
        cluster
            .socket_dir()
            .join(format!(".s.PGSQL.{}", cluster.primary_port())),
    )
    .await;
    let url = format!(
        "postgres://railyard:{}@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.password().expose(),
        proxy.port
    );
    let mut dbs = Vec::new();
    for i in 0..INSTANCES {
        dbs.push(
            Database::connect(
                max_connecting
                    .into_iter()
                    .fold(Config::from_url(&url).unwrap(), Config::max_connecting)
                    .application_name(format!("storm-{i}"))
                    .pool_max_size(POOL)
                    .pool_min_idle(Some(POOL))
                    .pool_max_waiters(4 * POOL),
            )
            .await
            .unwrap(),
        );
    }
    // The server's view, on a connection of its own (not through the proxy).
    let direct =
        Database::connect(Config::new(cluster.primary_socket_target("postgres")).pool_max_size(1))
            .await
            .unwrap();
    #[derive(diesel::QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let server_count = async |sql: &'static str| {
        direct
            .with_primary(async |c| {
                diesel::sql_query(sql)
                    .get_result::<Setting>(c)
                    .await
                    .map_err(Error::from)
            })
            .await
            .unwrap()
            .n
    };
    let max_connections =
        server_count("SELECT setting::int8 AS n FROM pg_settings WHERE name = 'max_connections'")
            .await;

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let buckets = Arc::new(std::sync::Mutex::new(vec![0u64; 400]));
    let mut workers = Vec::new();
    for db in &dbs {
        for _ in 0..POOL {
            let (db, tally, stop, buckets) =
                (db.clone(), tally.clone(), stop.clone(), buckets.clone());
            workers.push(tokio::spawn(async move {
                let mut next = Instant::now() + PACE.mul_f64(rand::random_range(0.0..1.0));
                while !AtomicBool::load(&stop, Ordering::Relaxed) {
                    tokio::time::sleep_until(next).await;
                    // Open loop: each worker keeps its phase, and what a
                    // stall held back is sent as soon as it can be.
                    next += PACE;
                    let r = db
                        .read(async |c| {
                            diesel::select(1.into_sql::<diesel::sql_types::Integer>())
                                .get_result::<i32>(c)
                                .await
                                .map_err(Error::from)
                        })
                        .await;
                    match r {
                        Ok(_) => {
                            tally.ops.fetch_add(1, Ordering::Relaxed);
                            let b = (started.elapsed().as_millis() / BUCKET.as_millis()) as usize;
                            if let Some(slot) = buckets.lock().unwrap().get_mut(b) {
                                *slot += 1;
                            }
                        }
                        Err(e) => {
                            tally.errors.fetch_add(1, Ordering::Relaxed);
                            *tally
                                .classes
                                .lock()
                                .unwrap()
                                .entry(format!("{:?}", e.class()))
                                .or_default() += 1;
                            if matches!(e, Error::CircuitOpen { .. }) {
                                tally.circuit_open.fetch_add(1, Ordering::Relaxed);
                            }
                            if e.to_string().contains("53300") {
                                tally.too_many.fetch_add(1, Ordering::Relaxed);
                            }
                            if AtomicU64::load(&tally.errors, Ordering::Relaxed) <= 3 {
                                eprintln!("storm: an operation failed ({:?}): {e}", e.class());
                            }
                        }
                    }
                }
            }));
        }
    }
    // The server's client connections, sampled every 10 ms.
    let peak_server = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (peak, stop) = (peak_server.clone(), stop.clone());
        let direct = direct.clone();
        tokio::spawn(async move {
            while !AtomicBool::load(&stop, Ordering::Relaxed) {
                let n = direct
                    .with_primary(async |c| {
                        diesel::sql_query(
                            "SELECT count(*) AS n FROM pg_stat_activity WHERE backend_type = 'client backend'",
                        )
                        .get_result::<Setting>(c)
                        .await
                        .map_err(Error::from)
                    })
                    .await
                    .map(|s| s.n)
                    .unwrap_or(0);
                peak.fetch_max(n as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    // Warm: every pool at its size.
    let waited = Instant::now();
    while proxy.open() < (INSTANCES as u64) * u64::from(POOL) {
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "only {} connections",
            proxy.open()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let errors_before = AtomicU64::load(&tally.errors, Ordering::Relaxed);
    let ops_before = AtomicU64::load(&tally.ops, Ordering::Relaxed);
    let cut_at = Instant::now();
    let cut = proxy.reset_all();
    let cut_bucket = (cut_at.duration_since(started).as_millis() / BUCKET.as_millis()) as usize;
    if std::env::var_os("STORM_TRACE").is_some() {
        for _ in 0..60 {
            let p = &dbs[0].pool_status()[0];
            eprintln!(
                "storm-trace {:?}: proxy open {} starts {} | pool conns {} idle {} created {} broken {} waiters {} ops {}",
                cut_at.elapsed(),
                proxy.open(),
                proxy.starts_since(cut_at).len(),
                p.connections,
                p.idle,
                p.connections_created,
                p.connections_closed_broken,
                p.waiters,
                AtomicU64::load(&tally.ops, Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let _ = sampler.await;

    // Throughput before the cut (the second before it) and after.
    let buckets = buckets.lock().unwrap().clone();
    let per = (Duration::from_secs(1).as_millis() / BUCKET.as_millis()) as usize;
    // At most the offered rate: workers that fell behind on a starved machine
    // catch up in bursts, and a burst is not a rate to recover to (seen: 141
    // ops per bucket measured against 100 offered, "recovered" only at 2.5 s).
    let offered =
        INSTANCES as u64 * u64::from(POOL) * BUCKET.as_millis() as u64 / PACE.as_millis() as u64;
    let before: u64 =
        (buckets[cut_bucket - per..cut_bucket].iter().sum::<u64>() / per as u64).min(offered);
    // Recovered: from the first dip below half, the first bucket from which
    // five in a row (250 ms) run at 80 % or more of the rate before.
    let after = &buckets[cut_bucket + 1..];
    let dip = after.iter().position(|&n| n * 2 < before).unwrap_or(0);
    let recovered = (dip..after.len().saturating_sub(5))
        .find(|&i| after[i..i + 5].iter().all(|&n| n * 10 >= before * 8))
        .map(|i| BUCKET * (i as u32 + 1));
    // What the cut cost, in seconds of the full rate.
    let lost: u64 = after[..recovered.map_or(after.len(), |d| {
        (d.as_millis() / BUCKET.as_millis()) as usize
    })]
        .iter()
        .map(|&n| before.saturating_sub(n))
        .sum();
    let lost_s = lost as f64 / before as f64 * BUCKET.as_secs_f64();
    let starts = proxy.starts_since(cut_at);
    let offsets: Vec<Duration> = starts.iter().map(|t| t.duration_since(cut_at)).collect();
    let spread = |q: f64| offsets[((offsets.len() - 1) as f64 * q) as usize];
    let after_errors = AtomicU64::load(&tally.errors, Ordering::Relaxed) - errors_before;
    eprintln!(
        "storm: {cut} connections reset at once; {} reconnects, first {:?}, median {:?}, last {:?} after the cut",
        offsets.len(),
        spread(0.0),
        spread(0.5),
        spread(1.0)
    );
    eprintln!(
        "storm: throughput {} ops / {BUCKET:?} before; back to 80 % after {recovered:?}, {lost_s:.2} s of the full rate lost; {after_errors} operations failed after the cut {:?}; peak client connections on the server {} (max_connections {max_connections}); buckets after the cut: {:?}",
        before,
        tally.classes.lock().unwrap(),
        AtomicU64::load(&peak_server, Ordering::Relaxed),
        &buckets[cut_bucket..cut_bucket + 40]
    );
    let any_circuit_open = dbs
        .iter()
        .flat_map(|db| db.pool_status())
        .any(|p| p.circuit_open);
    for db in dbs {
        db.close(Duration::from_secs(2)).await;
    }
    direct.close(Duration::from_secs(2)).await;
    drop(proxy);
    Storm {
        cut,
        reconnects: offsets.len(),
        spread: [spread(0.0), spread(0.5), spread(1.0), spread(0.8)],
        before,
        recovered,
        lost_s,
        failed: after_errors,
        ops_after: AtomicU64::load(&tally.ops, Ordering::Relaxed) - ops_before,
        classes: tally.classes.lock().unwrap().clone(),
        circuit_open: AtomicU64::load(&tally.circuit_open, Ordering::Relaxed),
        too_many: AtomicU64::load(&tally.too_many, Ordering::Relaxed),
        peak_server: AtomicU64::load(&peak_server, Ordering::Relaxed),
        max_connections,
        any_circuit_open,
    }
}
