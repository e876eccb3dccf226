//! The hot paths against their raw baselines, over the same Unix socket:
//!
//! - `tap_stream`: 100,000 rows through a tapped connection vs an untapped one
//!   (diesel-async over tokio-postgres with the socket handed in directly);
//! - `checkout_8_tasks`: primary-key lookups from 8 tasks through Railyard's pool
//!   (check-out validated from the tap) vs bb8 with diesel-async's manager and its
//!   default `SELECT 1` check, and vs bb8 with no check at all;
//! - `transaction_one_lookup`: `db.transaction` with one lookup vs diesel-async's
//!   own `conn.transaction` on a pooled connection.
//!
//! `scripts/bench-report tx` prints the ratios.

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use diesel::sql_types::{BigInt, Text};
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use railyard::{Config, Database, Error, LocalCluster, Migrator};

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
        Migrator::new(LEDGER).run(&config).await.expect("migrations");
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
}

criterion_group!(tx, benches);
criterion_main!(tx);
