//! The per-test isolation cost of three ways to isolate database tests:
//! Railyard's harness (a whole `#[railyard_test::test]` with an empty body: its
//! runtime, a reused connection, BEGIN, ROLLBACK), a database per test cloned
//! from the migrated template (CREATE DATABASE … TEMPLATE, DROP DATABASE), and
//! TRUNCATE of the ledger's tables between tests.
//!
//! `scripts/bench-report harness` prints the ratios; `scripts/harness-suite`
//! runs a generated suite of 1,000 tests the three ways.

use criterion::{Criterion, criterion_group, criterion_main};
use diesel_async::SimpleAsyncConnection;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use railyard::{Config, Database, Migrator};
use railyard_local::LocalCluster;
use railyard_test::{Isolation, TestOptions};

const LEDGER: EmbeddedMigrations = embed_migrations!("migrations");

fn options() -> TestOptions {
    TestOptions {
        name: "bench::empty",
        isolation: Isolation::Transaction,
        stale_replica: false,
        migrations: || Migrator::new(LEDGER),
        lock_timeout: None,
    }
}

fn benches(c: &mut Criterion) {
    // Prepares the template and the shared test database.
    railyard_test::run(options(), async |_db: Database| {});
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let template = format!(
        "railyard_tpl_{}",
        Migrator::new(LEDGER).fingerprint().expect("fingerprint")
    );
    let (admin, truncating) = rt.block_on(async {
        let cluster = LocalCluster::shared().await.expect("local cluster");
        let admin = Database::connect(
            Config::new(cluster.primary_socket_target("postgres")).pool_max_size(1),
        )
        .await
        .expect("admin");
        cluster
            .create_database("bench_truncate")
            .await
            .expect("database");
        let config = Config::new(cluster.primary_socket_target("bench_truncate")).pool_max_size(1);
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
        (admin, Database::connect(config).await.expect("connect"))
    });

    let mut group = c.benchmark_group("isolation_per_test");
    group.sample_size(20);
    group.bench_function("railyard_harness_empty_test", |b| {
        b.iter(|| railyard_test::run(options(), async |_db: Database| {}))
    });
    group.bench_function("truncate_ledger_tables", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut conn = truncating.primary().await.expect("checkout");
                conn.batch_execute(
                    "INSERT INTO users (email, name) VALUES ('t@example.test', 'T');
                     TRUNCATE users, accounts, orders, trades, positions RESTART IDENTITY CASCADE",
                )
                .await
                .expect("truncate");
            })
        })
    });
    group.bench_function("template_database_per_test", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut conn = admin.primary().await.expect("checkout");
                conn.batch_execute(&format!("CREATE DATABASE bench_clone TEMPLATE {template}"))
                    .await
                    .expect("create");
                conn.batch_execute("DROP DATABASE bench_clone")
                    .await
                    .expect("drop");
            })
        })
    });
    group.finish();
}

criterion_group!(harness, benches);
criterion_main!(harness);
