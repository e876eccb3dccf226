//! Index advice against a real server: candidates proved with hypopg, the
//! written migration applied, the statement measured before and after.

use std::path::PathBuf;
use std::time::Duration;

use diesel::sql_types::{Integer, Text};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use railyard::{Database, Error, Migrator, StatementStats};
use railyard_ops::advise::{Advisor, Pattern};

use crate::support;

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Self {
        let p = std::env::temp_dir().join(support::unique(prefix));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const LOOKUP: &str = "SELECT id, kind FROM events WHERE account = $1 AND kind <> 'marker-lit-3c1d'";

async fn lookups(db: &Database, n: i32) {
    for i in 0..n {
        db.with_primary(async |c| {
            diesel::sql_query(LOOKUP)
                .bind::<Integer, _>(700_000 + i)
                .execute(c)
                .await?;
            diesel::sql_query("SELECT id FROM small WHERE k = $1 AND note <> $2")
                .bind::<Integer, _>(i)
                .bind::<Text, _>("marker-param-9e4b")
                .execute(c)
                .await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();
    }
}

fn p50(stats: &StatementStats, prefix: &str) -> Duration {
    stats
        .snapshot()
        .into_iter()
        .find(|s| s.sql.starts_with(prefix))
        .unwrap_or_else(|| panic!("no statistics for {prefix}: {:?}", stats.snapshot()))
        .p50
}

#[tokio::test]
async fn advice_is_proved_with_hypopg_and_the_written_migration_makes_the_lookup_faster() {
    let fresh = support::fresh_database("advise").await;
    let setup = Database::connect(fresh.config.clone().pool_max_size(1))
        .await
        .unwrap();
    setup
        .with_primary(async |c| {
            c.batch_execute(
                "CREATE EXTENSION IF NOT EXISTS hypopg; \
                 CREATE TABLE events (id bigserial PRIMARY KEY, account int NOT NULL, kind text NOT NULL, \
                   created_at timestamptz NOT NULL DEFAULT now(), pad text NOT NULL); \
                 INSERT INTO events (account, kind, pad) \
                   SELECT (g * 7919) % 1000000, 'k' || (g % 20), repeat('x', 80) FROM generate_series(1, 150000) g; \
                 CREATE INDEX events_kind_idx ON events (kind); \
                 CREATE INDEX events_kind_dup ON events (kind); \
                 CREATE INDEX events_kind_created_idx ON events (kind, created_at); \
                 CREATE TABLE small (id serial PRIMARY KEY, k int NOT NULL, note text NOT NULL); \
                 INSERT INTO small (k, note) SELECT g, 'n' FROM generate_series(1, 300) g; \
                 CREATE TABLE wide (id serial PRIMARY KEY, c1 int, c2 int, c3 int, c4 int, c5 int, c6 int, \
                   c7 int, c8 int, c9 int, c10 int, c11 int, c12 int, c13 int); \
                 ANALYZE events; ANALYZE small; ANALYZE wide",
            )
            .await?;
            Ok::<_, Error>(())
        })
        .await
        .unwrap();

    let stats = StatementStats::new();
    let db = Database::builder(fresh.config.clone().pool_max_size(2))
        .hook(stats.clone())
        .connect()
        .await
        .unwrap();
    lookups(&db, 40).await;
    db.with_primary(async |c| {
        diesel::sql_query("SELECT * FROM wide WHERE id = $1")
            .bind::<Integer, _>(1)
            .execute(c)
            .await?;
        diesel::sql_query("SELECT id FROM events ORDER BY id LIMIT 10 OFFSET $1")
            .bind::<diesel::sql_types::BigInt, _>(5000)
            .execute(c)
            .await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    let before = p50(&stats, "SELECT id, kind FROM events WHERE account = $1");
    // Backends hand their table statistics over within about a second.
    let waited = std::time::Instant::now();
    while support::count(
        &fresh.config,
        "SELECT coalesce(sum(seq_scan), 0)::int8 AS n FROM pg_stat_user_tables WHERE relname = 'events'",
    )
    .await
        < 40
    {
        assert!(waited.elapsed() < Duration::from_secs(15), "the scans were never counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let advice = Advisor::new(&db)
        .statements(&stats)
        .seq_scan_share(0.5, 10)
        .run()
        .await
        .unwrap();
    let text = advice.to_string();
    eprintln!("{text}");
    let json = advice.to_json();
    for marker in ["marker-lit-3c1d", "marker-param-9e4b", "700000", "700001"] {
        assert!(
            !text.contains(marker) && !json.contains(marker),
            "{marker} in the advice:\n{text}"
        );
    }
    assert!(advice.verified, "{text}");
    let index = advice
        .indexes
        .iter()
        .find(|i| i.table == "events" && i.columns == ["account"])
        .unwrap_or_else(|| panic!("no index on events (account):\n{text}"));
    assert!(index.verified);
    assert_eq!(
        index.create,
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS events_account_idx ON events (account);"
    );
    let factor = index.factor().unwrap();
    assert!(factor >= 10.0, "cost cut only {factor:.1}x:\n{text}");
    assert!(
        index.helps.iter().any(|h| h
            .statement
            .starts_with("SELECT id, kind FROM events WHERE account = $1")),
        "{text}"
    );
    // The small table is too small to benefit.
    assert!(advice.indexes.iter().all(|i| i.table != "small"), "{text}");
    // The catalog report.
    let redundant: Vec<&str> = advice.redundant.iter().map(|r| r.index.as_str()).collect();
    assert!(
        redundant.contains(&"events_kind_idx") && redundant.contains(&"events_kind_dup"),
        "{text}"
    );
    assert!(
        advice.unused.iter().any(|u| u.index == "events_kind_dup"),
        "{text}"
    );
    assert!(
        advice.seq_scans.iter().any(|t| t.table == "events"),
        "{text}"
    );
    assert!(
        advice.patterns.iter().any(
            |p| matches!(&p.pattern, Pattern::SelectStar { table, columns: 14 } if table == "wide")
        ),
        "{text}"
    );
    assert!(
        advice
            .patterns
            .iter()
            .any(|p| matches!(p.pattern, Pattern::DeepOffset { rows } if rows >= 100_000.0)),
        "{text}"
    );

    // Apply the advice as the migration it writes.
    let dir = TempDir::new("advise_migrations");
    let written = advice.write_migrations(&dir.0, "advised_indexes").unwrap();
    assert_eq!(
        written.len(),
        advice.indexes.iter().filter(|i| i.verified).count()
    );
    let meta = std::fs::read_to_string(written[0].join("metadata.toml")).unwrap();
    assert!(meta.contains("run_in_transaction = false"), "{meta}");
    assert!(advice.write_migrations(&dir.0, "Bad Name").is_err());
    let migrations = diesel_migrations::FileBasedMigrations::from_path(&dir.0).unwrap();
    let migrated = Database::builder(fresh.config.clone().pool_max_size(1))
        .migrations(Migrator::new(migrations))
        .connect()
        .await
        .unwrap();
    migrated.close(Duration::from_secs(2)).await;

    #[derive(diesel::QueryableByName)]
    struct Line {
        #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
        line: String,
    }
    let plan: Vec<Line> = db
        .with_primary(async |c| {
            diesel::sql_query("EXPLAIN SELECT id, kind FROM events WHERE account = 123457")
                .load::<Line>(c)
                .await
                .map_err(Error::from)
        })
        .await
        .unwrap();
    let plan: String = plan.into_iter().map(|l| l.line + "\n").collect();
    assert!(plan.contains("events_account_idx"), "{plan}");
    stats.reset();
    lookups(&db, 40).await;
    let after = p50(&stats, "SELECT id, kind FROM events WHERE account = $1");
    assert!(
        after < before,
        "p50 {after:?} with the index, {before:?} without"
    );
    eprintln!("events lookup p50: {before:?} -> {after:?}; estimated cost cut {factor:.0}x");
    db.close(Duration::from_secs(2)).await;
    setup.close(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn no_index_is_advised_for_a_table_too_small_to_benefit() {
    let fresh = support::fresh_database("advise_small").await;
    let stats = StatementStats::new();
    let db = Database::builder(fresh.config.clone().pool_max_size(1))
        .hook(stats.clone())
        .connect()
        .await
        .unwrap();
    db.with_primary(async |c| {
        c.batch_execute(
            "CREATE EXTENSION IF NOT EXISTS hypopg; \
             CREATE TABLE tiny (id serial PRIMARY KEY, k int NOT NULL); \
             INSERT INTO tiny (k) SELECT g FROM generate_series(1, 40) g; ANALYZE tiny",
        )
        .await?;
        for k in 0..5 {
            diesel::sql_query("SELECT id FROM tiny WHERE k = $1")
                .bind::<Integer, _>(k)
                .execute(c)
                .await?;
        }
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    // No size gate: only the hypothetical index's cost decides.
    let advice = Advisor::new(&db)
        .statements(&stats)
        .min_table_rows(0)
        .run()
        .await
        .unwrap();
    assert!(advice.verified, "{advice}");
    assert!(advice.statements_examined >= 1, "{advice}");
    assert!(advice.indexes.is_empty(), "{advice}");
    db.close(Duration::from_secs(2)).await;
}
