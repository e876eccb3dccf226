//! The boot path when nothing is pending, against diesel's plain
//! `run_pending_migrations` on the same database and transport (the local
//! cluster's Unix socket, so TLS handshakes do not dominate either side).
//!
//! `scripts/bench-report boot` prints the ratio.

use criterion::{Criterion, criterion_group, criterion_main};
use diesel_async::{AsyncConnection, AsyncMigrationHarness, AsyncPgConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use railyard::{Config, Migrator};
use railyard_local::LocalCluster;

const LEDGER: EmbeddedMigrations = embed_migrations!("migrations");

fn boot(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (config, url) = rt.block_on(async {
        let cluster = LocalCluster::shared().await.expect("local cluster");
        cluster
            .create_database("bench_boot")
            .await
            .expect("database");
        let target = cluster.primary_socket_target("bench_boot");
        let config = Config::new(target.clone());
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
        (config, target.expose_url())
    });

    let mut group = c.benchmark_group("boot_nothing_pending");
    group.bench_function("diesel_run_pending_migrations", |b| {
        b.to_async(&rt).iter(|| async {
            let conn = AsyncPgConnection::establish(&url).await.expect("connect");
            let mut harness = AsyncMigrationHarness::new(conn);
            let applied = harness.run_pending_migrations(LEDGER).expect("diesel run");
            assert!(applied.is_empty());
        })
    });
    group.bench_function("railyard_migrator_run", |b| {
        b.to_async(&rt).iter(|| async {
            let report = Migrator::new(LEDGER)
                .run(&config)
                .await
                .expect("railyard run");
            assert!(report.applied.is_empty());
        })
    });
    group.finish();
}

criterion_group!(benches, boot);
criterion_main!(benches);
