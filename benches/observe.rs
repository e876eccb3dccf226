//! The cost of the timing hooks: primary-key lookups with every built-in hook on
//! vs none (the always-on metrics run in both), and the per-event cost of the
//! hook path alone. No `tracing` subscriber is installed, as in an application
//! that does not export spans.
//!
//! `scripts/bench-report observe` prints the ratios.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use diesel::sql_types::BigInt;
use diesel_async::RunQueryDsl;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use railyard::{
    AuditLog, Config, Database, Migrator, QueryEvent, QueryHook, QuerySpans, Route, SlowQueryLog,
    StatementStats,
};
use railyard_local::LocalCluster;

const LEDGER: EmbeddedMigrations = embed_migrations!("migrations");
const LOOKUPS: u64 = 200;

#[derive(diesel::QueryableByName)]
struct One {
    #[diesel(sql_type = BigInt)]
    #[allow(dead_code)]
    n: i64,
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let stats = StatementStats::new();
    let (plain, hooked) = rt.block_on(async {
        let cluster = LocalCluster::shared().await.expect("local cluster");
        cluster
            .create_database("bench_observe")
            .await
            .expect("database");
        let config = Config::new(cluster.primary_socket_target("bench_observe")).pool_max_size(1);
        // The ledger's newest migration is risky: its backup is a pg_dump into a
        // directory removed after (a fresh machine has no backup set up).
        let dumps =
            std::env::temp_dir().join(format!("railyard-bench-dumps-{}", std::process::id()));
        Migrator::new(LEDGER)
            .backup_before_risky(railyard::migrate::BeforeRisky::pg_dump(&dumps))
            .run(&config)
            .await
            .expect("migrations");
        let _ = std::fs::remove_dir_all(&dumps);
        let plain = Database::connect(config.clone()).await.expect("connect");
        let hooked = Database::builder(config)
            .hook(SlowQueryLog::new(Duration::from_millis(100)))
            .hook(stats.clone())
            .hook(QuerySpans)
            .hook(AuditLog)
            .connect()
            .await
            .expect("connect");
        (plain, hooked)
    });
    let mut group = c.benchmark_group("hooks_pk_lookup");
    group.throughput(Throughput::Elements(LOOKUPS));
    for (name, db) in [("no_hooks", &plain), ("all_builtin_hooks", &hooked)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut conn = db.primary().await.expect("checkout");
                    for i in 0..LOOKUPS as i64 {
                        diesel::sql_query("SELECT $1::int8 AS n")
                            .bind::<BigInt, _>(i)
                            .get_result::<One>(&mut conn)
                            .await
                            .expect("lookup");
                    }
                })
            })
        });
    }
    group.finish();

    let route = Route::Primary;
    let event = QueryEvent::new(
        "SELECT balance_cents FROM accounts WHERE id = $1",
        &route,
        Duration::from_micros(180),
    );
    let slow = SlowQueryLog::new(Duration::from_millis(100));
    let stats2 = StatementStats::new();
    let mut group = c.benchmark_group("hook_event");
    group.bench_function("all_builtin_hooks_per_event", |b| {
        b.iter(|| {
            slow.on_query(&event);
            stats2.on_query(&event);
            QuerySpans.on_query(&event);
            AuditLog.on_query(&event);
        })
    });
    group.finish();
}

criterion_group!(observe, benches);
criterion_main!(observe);
