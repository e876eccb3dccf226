//! Reads routed to the replica through `db.read` vs a raw bb8 pool on the same
//! replica (primary-key lookups from 8 tasks, over the replica's Unix socket),
//! and the routing decision alone per read.
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
use railyard::{CausalToken, Config, Database, Error, LocalCluster, Migrator, Route};

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
        Migrator::new(LEDGER).run(&config).await.expect("migrations");
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
        b.iter(|| {
            rt.block_on(async {
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
            })
        })
    });
    group.bench_function("railyard_db_read", |b| {
        b.iter(|| {
            rt.block_on(async {
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
            })
        })
    });
    group.finish();

    let mut group = c.benchmark_group("routing_decision");
    let token = Some("0/1".parse::<CausalToken>().expect("a token"));
    group.bench_function("route_for_read", |b| b.iter(|| db.route_for_read(token)));
    group.finish();
}

criterion_group!(route, benches);
criterion_main!(route);
