//! Reads routed to the replica through `db.read` vs a raw bb8 pool on the same
//! replica (primary-key lookups from 8 tasks, over the replica's Unix socket),
//! the routing decision alone per read, and a session's read that falls back
//! to the primary vs a plain read on the primary (`fallback_read`: the session's
//! floor after it costs no round trip).
//!
//! `scripts/bench-report route` prints the ratios.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use diesel::sql_types::BigInt;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use railyard::route::ReplicaStatus;
use railyard::{CausalToken, Config, Database, Error, Migrator, Route};
use railyard_local::LocalCluster;

const LEDGER: EmbeddedMigrations = embed_migrations!("migrations");
const TASKS: u64 = 8;
const LOOKUPS_PER_TASK: u64 = 50;

#[derive(diesel::QueryableByName)]
struct Balance {
    #[diesel(sql_type = BigInt)]
    balance_cents: i64,
}

async fn lookup<C>(conn: &mut C, id: i64) -> Result<i64, Error>
where
    C: diesel_async::AsyncConnection<Backend = diesel::pg::Pg> + Send,
{
    Ok(
        diesel::sql_query("SELECT balance_cents FROM accounts WHERE id = $1")
            .bind::<BigInt, _>(id)
            .get_result::<Balance>(conn)
            .await?
            .balance_cents,
    )
}

type RawPool = bb8::Pool<AsyncDieselConnectionManager<AsyncPgConnection>>;

/// 8 tasks × 50 primary-key lookups through a plain bb8 pool on the replica.
async fn raw_batch(raw: &RawPool, ids: &Arc<Vec<i64>>) {
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (pool, ids) = (raw.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..LOOKUPS_PER_TASK {
                let mut conn = pool.get().await.expect("get");
                let id = ids[((t * 131 + i * 7) % ids.len() as u64) as usize];
                lookup(&mut conn, id).await.expect("lookup");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
}

/// The same lookups through `db.read`, routed to the replica.
async fn railyard_batch(db: &Database, ids: &Arc<Vec<i64>>) {
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (db, ids) = (db.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..LOOKUPS_PER_TASK {
                let id = ids[((t * 131 + i * 7) % ids.len() as u64) as usize];
                let (_, route) = db
                    .read_routed(async |c| lookup(c, id).await)
                    .await
                    .expect("read");
                assert!(matches!(route, Route::Replica(_)));
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
}

/// CPU time (user + system) this process has used.
fn cpu_time() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    secs(u.user_time()) + secs(u.system_time())
}

/// Paired rounds: each round times raw batches and Railyard batches back to
/// back (in alternating order), so that the machine's drift (checkpoints, the
/// other core's load) hits both sides of each ratio alike. Criterion's groups
/// run one variant after the other, seconds apart, and on this 2-core machine
/// their ratio swings by ±8 % from run to run; the median of paired ratios
/// swings far less. The client's CPU time per lookup (this process: the
/// runtime's threads, the tap, the hooks, routing) says where any difference
/// goes on the client side; the rest of each lookup is the server and the
/// kernel.
fn paired(rt: &tokio::runtime::Runtime, db: &Database, raw: &RawPool, ids: &Arc<Vec<i64>>) {
    const ROUNDS: usize = 40;
    const BATCHES: usize = 3;
    let lookups = (ROUNDS * BATCHES) as f64 * (TASKS * LOOKUPS_PER_TASK) as f64;
    let mut ratios = Vec::with_capacity(ROUNDS);
    let mut cpu = [0.0f64; 2];
    for round in 0..ROUNDS {
        let mut time = |railyard: bool| {
            let (started, cpu_before) = (std::time::Instant::now(), cpu_time());
            for _ in 0..BATCHES {
                if railyard {
                    rt.block_on(railyard_batch(db, ids));
                } else {
                    rt.block_on(raw_batch(raw, ids));
                }
            }
            cpu[usize::from(railyard)] += cpu_time() - cpu_before;
            started.elapsed().as_secs_f64()
        };
        let (raw_s, railyard_s) = if round % 2 == 0 {
            let r = time(false);
            (r, time(true))
        } else {
            let y = time(true);
            (time(false), y)
        };
        ratios.push(raw_s / railyard_s);
    }
    ratios.sort_by(f64::total_cmp);
    let q = |p: f64| ratios[((ratios.len() - 1) as f64 * p).round() as usize];
    println!(
        "paired replica_read: db.read vs raw bb8 on the replica, median speed ratio {:.3} (quartiles {:.3}–{:.3}, {ROUNDS} rounds); client CPU per lookup: raw {:.1} µs, railyard {:.1} µs",
        q(0.5),
        q(0.25),
        q(0.75),
        cpu[0] / lookups * 1e6,
        cpu[1] / lookups * 1e6,
    );
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (db, raw, ids) = rt.block_on(async {
        let cluster = LocalCluster::shared().await.expect("local cluster");
        cluster.create_database("bench_route").await.expect("database");
        let primary = cluster.primary_socket_target("bench_route");
        let replica = cluster.replica_socket_target("bench_route").expect("a replica");
        let config = Config::new(primary)
            .replica(replica.clone())
            .replica_pool_max_size(TASKS as u32);
        // The ledger's newest migration is risky: its backup is a pg_dump into a
        // directory removed after (a fresh machine has no backup set up).
        let dumps = std::env::temp_dir().join(format!("railyard-bench-dumps-{}", std::process::id()));
        Migrator::new(LEDGER)
            .backup_before_risky(railyard::migrate::BeforeRisky::pg_dump(&dumps))
            .run(&config)
            .await
            .expect("migrations");
        let _ = std::fs::remove_dir_all(&dumps);
        let db = Database::connect(config).await.expect("connect");
        let session = db.session();
        session
            .write(async |conn| {
                diesel::sql_query(
                    "INSERT INTO users (email, name) VALUES ('bench@example.test', 'Bench') ON CONFLICT (email) DO NOTHING; ",
                )
                .execute(conn)
                .await?;
                diesel::sql_query(
                    "INSERT INTO accounts (user_id, balance_cents) SELECT u.id, g FROM users u, generate_series(1, 1000) g \
                     WHERE u.email = 'bench@example.test' AND (SELECT count(*) FROM accounts) < 1000",
                )
                .execute(conn)
                .await?;
                Ok::<_, Error>(())
            })
            .await
            .expect("data");
        let token = session.token().expect("token");
        while !db
            .replica_health()
            .iter()
            .all(|r| r.status == ReplicaStatus::Healthy && r.replay_lsn >= Some(token.lsn()))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        #[derive(diesel::QueryableByName)]
        struct Id {
            #[diesel(sql_type = BigInt)]
            id: i64,
        }
        let mut conn = db.primary().await.expect("checkout");
        let ids: Vec<i64> = diesel::sql_query("SELECT id FROM accounts ORDER BY id LIMIT 1000")
            .load::<Id>(&mut conn)
            .await
            .expect("ids")
            .into_iter()
            .map(|r| r.id)
            .collect();
        let url = replica.expose_url();
        let m = AsyncDieselConnectionManager::<AsyncPgConnection>::new(url);
        let raw = bb8::Pool::builder()
            .max_size(TASKS as u32)
            .test_on_check_out(false)
            .build(m)
            .await
            .expect("raw pool");
        (db, raw, Arc::new(ids))
    });

    let mut group = c.benchmark_group("replica_read");
    group.throughput(Throughput::Elements(TASKS * LOOKUPS_PER_TASK));
    group.bench_function("raw_bb8_on_replica", |b| {
        b.iter(|| rt.block_on(raw_batch(&raw, &ids)))
    });
    group.bench_function("railyard_db_read", |b| {
        b.iter(|| rt.block_on(railyard_batch(&db, &ids)))
    });
    group.finish();

    paired(&rt, &db, &raw, &ids);

    let mut group = c.benchmark_group("routing_decision");
    let token = Some("0/1".parse::<CausalToken>().expect("a token"));
    group.bench_function("route_for_read", |b| b.iter(|| db.route_for_read(token)));
    group.finish();

    // A session whose floor no replica reaches reads on the primary.
    let far = db.session_from("FFFF/0".parse::<CausalToken>().expect("a token"));
    let id = ids[0];
    let mut group = c.benchmark_group("fallback_read");
    group.bench_function("plain_primary_read", |b| {
        b.iter(|| {
            rt.block_on(db.with_primary(async |c| lookup(c, id).await))
                .expect("read")
        })
    });
    group.bench_function("session_read_on_primary", |b| {
        b.iter(|| {
            let (v, route) = rt
                .block_on(far.read_routed(async |c| lookup(c, id).await))
                .expect("read");
            assert_eq!(route, Route::Primary);
            v
        })
    });
    group.finish();
    paired_fallback(&rt, &db, &far, id);
}

/// Paired rounds of `fallback_read` (see `paired` for why): a batch of reads on
/// the primary without a session and a batch of a session's fallback reads,
/// back to back in alternating order.
fn paired_fallback(rt: &tokio::runtime::Runtime, db: &Database, far: &railyard::Session, id: i64) {
    const ROUNDS: usize = 30;
    const READS: usize = 200;
    let mut ratios = Vec::with_capacity(ROUNDS);
    let mut total = [0.0f64; 2];
    for round in 0..ROUNDS {
        let mut time = |in_session: bool| {
            let started = std::time::Instant::now();
            rt.block_on(async {
                for _ in 0..READS {
                    let read = async |c: &mut railyard::Conn| lookup(c, id).await;
                    if in_session {
                        far.read(read).await
                    } else {
                        db.with_primary(read).await
                    }
                    .expect("a read");
                }
            });
            let s = started.elapsed().as_secs_f64();
            total[usize::from(in_session)] += s;
            s
        };
        let (plain, in_session) = if round % 2 == 0 {
            let p = time(false);
            (p, time(true))
        } else {
            let s = time(true);
            (time(false), s)
        };
        ratios.push(in_session / plain);
    }
    ratios.sort_by(f64::total_cmp);
    let q = |p: f64| ratios[((ratios.len() - 1) as f64 * p).round() as usize];
    let reads = (ROUNDS * READS) as f64;
    println!(
        "paired fallback_read: a session's read on the primary vs a plain one, median time ratio {:.3} (quartiles {:.3}–{:.3}, {ROUNDS} rounds of {READS}); mean per read: plain {:.1} µs, session {:.1} µs",
        q(0.5),
        q(0.25),
        q(0.75),
        total[0] / reads * 1e6,
        total[1] / reads * 1e6,
    );
}

criterion_group!(route, benches);
criterion_main!(route);
