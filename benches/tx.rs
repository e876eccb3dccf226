//! The hot paths against their raw baselines, over the same Unix socket:
//!
//! - `tap_stream`: 100,000 rows through a tapped connection vs an untapped one
//!   (diesel-async over tokio-postgres with the socket handed in directly);
//! - `checkout_8_tasks`: primary-key lookups from 8 tasks through Railyard's pool
//!   (check-out validated from the tap) vs bb8 with diesel-async's manager and its
//!   default `SELECT 1` check, and vs bb8 with no check at all;
//! - `transaction_one_lookup`: `db.transaction` with one lookup vs diesel-async's
//!   own `conn.transaction` on a pooled connection;
//! - `session_transaction` and `session_write`: one INSERT in a transaction, and
//!   as an autocommit write, in a `Session` (which records the commit's WAL
//!   position) vs without one. A session transaction reads the position in its
//!   COMMIT's round trip; a session write pays one round trip for it. Also
//!   measured in paired rounds (the `paired session_…` lines).
//!
//! `scripts/bench-report tx` prints the ratios.

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use diesel::sql_types::{BigInt, Text};
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use railyard::{Config, Database, Error, Migrator};
use railyard_local::LocalCluster;

const LEDGER: EmbeddedMigrations = embed_migrations!("migrations");
const ROWS: u64 = 100_000;
const TASKS: u64 = 8;
const LOOKUPS_PER_TASK: u64 = 50;

#[derive(diesel::QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    #[allow(dead_code)]
    i: i64,
    #[diesel(sql_type = Text)]
    #[allow(dead_code)]
    s: String,
}

#[derive(diesel::QueryableByName)]
struct Balance {
    #[diesel(sql_type = BigInt)]
    balance_cents: i64,
}

const STREAM_SQL: &str =
    "SELECT i::int8 AS i, repeat('x', 40) AS s FROM generate_series(1, 100000) i";
const LOOKUP_SQL: &str = "SELECT balance_cents FROM accounts WHERE id = $1";

async fn lookup<C>(conn: &mut C, id: i64) -> i64
where
    C: diesel_async::AsyncConnection<Backend = diesel::pg::Pg> + Send,
{
    diesel::sql_query(LOOKUP_SQL)
        .bind::<BigInt, _>(id)
        .get_result::<Balance>(conn)
        .await
        .expect("lookup")
        .balance_cents
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (config, url, ids) = rt.block_on(async {
        let cluster = LocalCluster::shared().await.expect("local cluster");
        cluster.create_database("bench_tx").await.expect("database");
        let target = cluster.primary_socket_target("bench_tx");
        let config = Config::new(target.clone()).pool_max_size(TASKS as u32);
        // The ledger's newest migration is risky: its backup is a pg_dump into a
        // directory removed after (a fresh machine has no backup set up).
        let dumps = std::env::temp_dir().join(format!("railyard-bench-dumps-{}", std::process::id()));
        Migrator::new(LEDGER)
            .backup_before_risky(railyard::migrate::BeforeRisky::pg_dump(&dumps))
            .run(&config)
            .await
            .expect("migrations");
        let _ = std::fs::remove_dir_all(&dumps);
        let db = Database::connect(config.clone()).await.expect("connect");
        let mut conn = db.primary().await.expect("checkout");
        diesel::sql_query(
            "INSERT INTO users (email, name) VALUES ('bench@example.test', 'Bench') ON CONFLICT (email) DO NOTHING",
        )
        .execute(&mut conn)
        .await
        .expect("user");
        diesel::sql_query(
            "INSERT INTO accounts (user_id, balance_cents) SELECT u.id, g FROM users u, generate_series(1, 1000) g \
             WHERE u.email = 'bench@example.test' AND (SELECT count(*) FROM accounts) < 1000",
        )
        .execute(&mut conn)
        .await
        .expect("accounts");
        #[derive(diesel::QueryableByName)]
        struct Id {
            #[diesel(sql_type = BigInt)]
            id: i64,
        }
        let ids: Vec<i64> = diesel::sql_query("SELECT id FROM accounts ORDER BY id LIMIT 1000")
            .load::<Id>(&mut conn)
            .await
            .expect("ids")
            .into_iter()
            .map(|r| r.id)
            .collect();
        (config, target.expose_url(), Arc::new(ids))
    });

    // --- the tap while streaming rows
    let (db, mut raw) = rt.block_on(async {
        let db = Database::connect(config.clone()).await.expect("railyard");
        let raw = AsyncPgConnection::establish(&url).await.expect("untapped");
        (db, raw)
    });
    let mut group = c.benchmark_group("tap_stream");
    group.throughput(Throughput::Elements(ROWS));
    group.sample_size(20);
    group.bench_function("untapped", |b| {
        b.iter(|| {
            rt.block_on(async {
                let rows: Vec<Row> = diesel::sql_query(STREAM_SQL)
                    .load(&mut raw)
                    .await
                    .expect("rows");
                assert_eq!(rows.len() as u64, ROWS);
            })
        })
    });
    group.bench_function("tapped", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut conn = db.primary().await.expect("checkout");
                let rows: Vec<Row> = diesel::sql_query(STREAM_SQL)
                    .load(&mut conn)
                    .await
                    .expect("rows");
                assert_eq!(rows.len() as u64, ROWS);
            })
        })
    });
    group.finish();

    // --- pooled lookups from 8 tasks
    let (default_check, no_check) = rt.block_on(async {
        let m = AsyncDieselConnectionManager::<AsyncPgConnection>::new(url.clone());
        let a = bb8::Pool::builder()
            .max_size(TASKS as u32)
            .build(m)
            .await
            .expect("pool");
        let m = AsyncDieselConnectionManager::<AsyncPgConnection>::new(url.clone());
        let b = bb8::Pool::builder()
            .max_size(TASKS as u32)
            .test_on_check_out(false)
            .build(m)
            .await
            .expect("pool");
        (a, b)
    });
    let mut group = c.benchmark_group("checkout_8_tasks");
    group.throughput(Throughput::Elements(TASKS * LOOKUPS_PER_TASK));
    macro_rules! run_tasks {
        ($b:expr, $pool:expr, $get:expr) => {
            $b.iter(|| {
                rt.block_on(async {
                    let mut tasks = Vec::new();
                    for t in 0..TASKS {
                        let pool = $pool.clone();
                        let ids = ids.clone();
                        tasks.push(tokio::spawn(async move {
                            for i in 0..LOOKUPS_PER_TASK {
                                #[allow(clippy::redundant_closure_call)]
                                let mut conn = ($get)(&pool).await;
                                let id = ids[((t * 131 + i * 7) % ids.len() as u64) as usize];
                                lookup(&mut conn, id).await;
                            }
                        }));
                    }
                    for t in tasks {
                        t.await.expect("task");
                    }
                })
            })
        };
    }
    group.bench_function("bb8_default_select_1_check", |b| {
        run_tasks!(b, default_check, async |p: &bb8::Pool<
            AsyncDieselConnectionManager<AsyncPgConnection>,
        >| p
            .get_owned()
            .await
            .expect("get"))
    });
    group.bench_function("bb8_no_check", |b| {
        run_tasks!(b, no_check, async |p: &bb8::Pool<
            AsyncDieselConnectionManager<AsyncPgConnection>,
        >| p.get_owned().await.expect("get"))
    });
    group.bench_function("railyard", |b| {
        run_tasks!(b, db, async |d: &Database| d.primary().await.expect("get"))
    });
    group.finish();

    // --- one lookup in a transaction
    let mut group = c.benchmark_group("transaction_one_lookup");
    let id = ids[0];
    group.bench_function("diesel_async_conn_transaction", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut conn = no_check.get().await.expect("get");
                conn.transaction::<_, diesel::result::Error, _>(async |c| Ok(lookup(c, id).await))
                    .await
                    .expect("tx")
            })
        })
    });
    group.bench_function("railyard_db_transaction", |b| {
        b.iter(|| {
            rt.block_on(async {
                db.transaction(async |c| Ok::<_, Error>(lookup(c, id).await))
                    .await
                    .expect("tx")
            })
        })
    });
    group.finish();

    // --- what a session's commit position costs
    let session = db.session();
    let run = format!("{:x}", rand::random::<u32>());
    let n = std::sync::atomic::AtomicU64::new(0);
    let email = || {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("bench-{run}-{i}@example.test")
    };
    let mut group = c.benchmark_group("session_transaction");
    group.bench_function("plain", |b| {
        b.iter(|| {
            let e = email();
            rt.block_on(db.transaction(async |c| add_user(c, &e).await))
                .expect("tx")
        })
    });
    group.bench_function("session", |b| {
        b.iter(|| {
            let e = email();
            rt.block_on(session.transaction(async |c| add_user(c, &e).await))
                .expect("tx")
        })
    });
    group.finish();
    let mut group = c.benchmark_group("session_write");
    group.bench_function("plain", |b| {
        b.iter(|| {
            let e = email();
            rt.block_on(db.write(async |c| add_user(c, &e).await))
                .expect("write")
        })
    });
    group.bench_function("session", |b| {
        b.iter(|| {
            let e = email();
            rt.block_on(session.write(async |c| add_user(c, &e).await))
                .expect("write")
        })
    });
    group.finish();

    paired_session(&rt, &db, &session, &email);
}

/// Paired rounds of the session groups: each round times a batch without a
/// session and a batch in one, back to back in alternating order, so that the
/// shared machine's drift hits both sides of each ratio alike (criterion's
/// groups run seconds apart and swing more than the difference measured).
fn paired_session(
    rt: &tokio::runtime::Runtime,
    db: &Database,
    session: &railyard::Session,
    email: &dyn Fn() -> String,
) {
    const ROUNDS: usize = 30;
    const OPS: usize = 200;
    for transaction in [true, false] {
        let mut ratios = Vec::with_capacity(ROUNDS);
        let mut total = [0.0f64; 2];
        for round in 0..ROUNDS {
            let mut time = |in_session: bool| {
                let started = std::time::Instant::now();
                rt.block_on(async {
                    for _ in 0..OPS {
                        let e = email();
                        let work = async |c: &mut railyard::Conn| add_user(c, &e).await;
                        match (transaction, in_session) {
                            (true, false) => db.transaction(work).await,
                            (true, true) => session.transaction(work).await,
                            (false, false) => db.write(work).await,
                            (false, true) => session.write(work).await,
                        }
                        .expect("an insert");
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
        let ops = (ROUNDS * OPS) as f64;
        println!(
            "paired session_{}: in a session vs without, median time ratio {:.3} (quartiles {:.3}–{:.3}, {ROUNDS} rounds of {OPS}); mean per operation: without {:.1} µs, in a session {:.1} µs",
            if transaction { "transaction" } else { "write" },
            q(0.5),
            q(0.25),
            q(0.75),
            total[0] / ops * 1e6,
            total[1] / ops * 1e6,
        );
    }
}

diesel::table! {
    users (id) {
        id -> Int8,
        email -> Text,
        name -> Text,
    }
}

/// One INSERT through the query builder: a statement diesel caches, so one
/// round trip.
async fn add_user(conn: &mut railyard::Conn, email: &str) -> Result<(), Error> {
    use diesel::ExpressionMethods;
    diesel::insert_into(users::table)
        .values((users::email.eq(email), users::name.eq("Bench")))
        .execute(conn)
        .await?;
    Ok(())
}

criterion_group!(tx, benches);
criterion_main!(tx);
