//! Bounded check-out queues against the real server: a burst far above the
//! pool's size is served or shed within the wait budget, shed check-outs fail
//! at once with the Overloaded class, the queue never grows past its bound,
//! and metrics and health count what the callers saw.

use std::time::{Duration, Instant};

use diesel_async::RunQueryDsl;
use railyard::error::Shed;
use railyard::{Database, Error, ErrorClass, HealthStatus};

use crate::support;

/// What one request of the burst got.
enum Outcome {
    Served(Duration),
    ShedAtOnce(Duration),
    ShedAfterBudget(Duration),
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() * p).div_ceil(100)).clamp(1, sorted.len()) - 1]
}

#[tokio::test]
async fn a_burst_of_twenty_times_the_pool_is_served_or_shed_within_the_wait_budget() {
    const POOL: u32 = 4;
    const BURST: usize = 20 * POOL as usize;
    let budget = Duration::from_millis(250);
    let work = Duration::from_millis(100);
    let base = support::ledger(|c| c).await;
    let db = Database::builder(
        base.config()
            .clone()
            .pool_max_size(POOL)
            .pool_max_wait(budget)
            .application_name(support::unique("shed")),
    )
    .connect()
    .await
    .unwrap();
    let max_waiters = db.pool_status()[0].max_waiters;
    assert_eq!(max_waiters, 4 * POOL, "the default: four per connection");

    let started = Instant::now();
    let requests: Vec<_> = (0..BURST)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let r = db
                    .transaction(async |conn| {
                        diesel::sql_query(format!("SELECT pg_sleep({})", work.as_secs_f64()))
                            .execute(conn)
                            .await?;
                        Ok::<_, Error>(())
                    })
                    .await;
                let took = t.elapsed();
                match r {
                    Ok(()) => Outcome::Served(took),
                    Err(e) => {
                        assert_eq!(e.class(), ErrorClass::Overloaded, "{e}");
                        assert!(e.retries_exhausted().is_none(), "never retried: {e}");
                        match e {
                            Error::Overloaded {
                                why: Shed::QueueFull { max_waiters: n },
                                ..
                            } => {
                                assert_eq!(n, max_waiters);
                                Outcome::ShedAtOnce(took)
                            }
                            Error::Overloaded {
                                why: Shed::WaitBudget { budget: b },
                                ..
                            } => {
                                assert_eq!(b, budget);
                                Outcome::ShedAfterBudget(took)
                            }
                            other => panic!("{other}"),
                        }
                    }
                }
            })
        })
        .collect();
    let mut served = Vec::new();
    let mut at_once = Vec::new();
    let mut after_budget = Vec::new();
    for r in requests {
        match r.await.unwrap() {
            Outcome::Served(d) => served.push(d),
            Outcome::ShedAtOnce(d) => at_once.push(d),
            Outcome::ShedAfterBudget(d) => after_budget.push(d),
        }
    }
    let wall = started.elapsed();
    for v in [&mut served, &mut at_once, &mut after_budget] {
        v.sort();
    }
    let shed = (at_once.len() + after_budget.len()) as u64;
    let status = db.pool_status().remove(0);
    eprintln!(
        "burst of {BURST} on a pool of {POOL} (queue bound {max_waiters}, wait budget {budget:?}, work {work:?}): \
         {} served (p50 {:.1?}, p99 {:.1?}, max {:.1?}); {shed} shed: {} at once (p99 {:.2?}), {} after the budget (max {:.1?}); \
         at most {} waiting at once; wall {wall:.2?}",
        served.len(),
        percentile(&served, 50),
        percentile(&served, 99),
        served.last().copied().unwrap_or_default(),
        at_once.len(),
        percentile(&at_once, 99),
        after_budget.len(),
        after_budget.last().copied().unwrap_or_default(),
        status.waiters_peak,
    );

    // Every request answered, none waiting out the checkout timeout.
    assert_eq!(served.len() + shed as usize, BURST);
    assert!(served.len() >= POOL as usize, "{} served", served.len());
    assert!(!at_once.is_empty(), "the queue's bound was reached");
    // Served: at most the budget in the queue, plus its own work (and, for
    // the pool's first connections, opening them).
    let slack = Duration::from_millis(400);
    let p99 = percentile(&served, 99);
    assert!(p99 <= budget + work + slack, "served p99 {p99:?}");
    // Shed at once: no wait at all; after the budget: the budget, no more.
    let p99_at_once = percentile(&at_once, 99);
    assert!(
        p99_at_once < Duration::from_millis(100),
        "shed at once p99 {p99_at_once:?}"
    );
    for d in &after_budget {
        assert!(*d >= budget && *d <= budget + slack, "shed after {d:?}");
    }
    assert!(wall < budget + 2 * work + 2 * slack, "wall {wall:?}");

    // Nothing left checked out or waiting, a bounded queue, and the same
    // count in the pool, the metrics and the health report.
    assert_eq!(status.connections - status.idle, 0, "{status:?}");
    assert_eq!(status.waiters, 0, "{status:?}");
    assert_eq!(status.waiters_peak, max_waiters, "{status:?}");
    assert_eq!(status.shed, shed, "{status:?}");
    assert_eq!(status.shed_last_minute, shed, "{status:?}");
    let metrics = db.metrics_text();
    let line = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in\n{metrics}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(
        line("railyard_pool_checkouts_shed_total{pool=\"primary\"}"),
        shed
    );
    assert_eq!(line("railyard_errors_total{class=\"overloaded\"}"), shed);
    assert_eq!(line("railyard_pool_waiters{pool=\"primary\"}"), 0);
    let health = db.health().await;
    let pool = health
        .checks
        .iter()
        .find(|c| c.name == "pool primary")
        .unwrap();
    assert_eq!(pool.status, HealthStatus::Degraded, "{}", pool.reason);
    assert!(
        pool.reason
            .contains(&format!("{shed} check-outs shed in the last minute")),
        "{}",
        pool.reason
    );
    assert_eq!(health.status, HealthStatus::Degraded);
}

#[tokio::test]
async fn a_waiter_that_gives_up_gives_its_place_back() {
    let base = support::ledger(|c| c).await;
    let db = Database::builder(
        base.config()
            .clone()
            .pool_max_size(1)
            .pool_max_waiters(2)
            .pool_max_wait(Duration::from_secs(2)),
    )
    .connect()
    .await
    .unwrap();
    let held = db.primary().await.unwrap();
    // Two waiters fill the queue; a third is shed at once.
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move { db.primary().await.map(drop) })
        })
        .collect();
    let started = Instant::now();
    while db.pool_status()[0].waiters < 2 {
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let e = db.primary().await.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Overloaded, "{e}");
    // The callers stop waiting (their futures are dropped): their places come back.
    for w in &waiters {
        w.abort();
    }
    for w in waiters {
        let _ = w.await;
    }
    assert_eq!(db.pool_status()[0].waiters, 0);
    let next = {
        let db = db.clone();
        tokio::spawn(async move { db.primary().await.map(drop) })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(held);
    next.await
        .unwrap()
        .expect("a place and, once handed back, the connection");
    let s = db.pool_status().remove(0);
    assert_eq!((s.shed, s.waiters, s.waiters_peak), (1, 0, 2), "{s:?}");
}
