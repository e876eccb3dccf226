//! Boot-time migrations: checksums, refusal of edited or unknown history, races,
//! failures that leave nothing behind, the lock, status and revert. Each test
//! uses a database of its own, since migrations commit.

use std::time::Duration;

use diesel_async::SimpleAsyncConnection;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use railyard::error::MigrationError;
use railyard::migrate::BeforeRisky;
use railyard::migrate::{ChecksumState, MigrationState};
use railyard::{Database, Error, Migrator};

use crate::support::{self, count};

const V1: EmbeddedMigrations = embed_migrations!("tests/migrations/v1");
const V2: EmbeddedMigrations = embed_migrations!("tests/migrations/v2");
const EDITED: EmbeddedMigrations = embed_migrations!("tests/migrations/edited");
const FAILING: EmbeddedMigrations = embed_migrations!("tests/migrations/failing");
const SLOW: EmbeddedMigrations = embed_migrations!("tests/migrations/slow");

#[tokio::test]
async fn a_fresh_database_gets_every_migration_and_a_second_boot_applies_nothing() {
    let fresh = support::fresh_database("mig_fresh").await;
    // The ledger's newest migration is marked risky: a backup goes first.
    let dumps = support::Dumps::new();
    let config = fresh.config.clone();
    let db = Database::builder(config.clone())
        .migrations(dumps.migrator())
        .connect()
        .await
        .unwrap();
    let report = db.migration_report().unwrap();
    assert_eq!(report.applied.len(), support::ledger_migrations());
    assert_eq!(report.already_applied, 0);
    assert_eq!(
        count(
            &config,
            "SELECT count(*) AS n FROM railyard_schema_migrations"
        )
        .await,
        support::ledger_migrations() as i64
    );
    assert_eq!(
        count(
            &config,
            "SELECT count(*) AS n FROM __diesel_schema_migrations"
        )
        .await,
        support::ledger_migrations() as i64
    );
    assert_eq!(count(&config, "SELECT count(*) AS n FROM users").await, 0);

    let again = Database::builder(config.clone())
        .migrations(dumps.migrator())
        .connect()
        .await
        .unwrap();
    let report = again.migration_report().unwrap();
    assert!(report.applied.is_empty());
    assert_eq!(report.already_applied, support::ledger_migrations());
}

#[tokio::test]
async fn refuses_to_boot_when_an_applied_migration_was_edited() {
    let fresh = support::fresh_database("mig_edited").await;
    let config = fresh.config.clone();
    Migrator::new(V1).run(&config).await.unwrap();
    let err = Migrator::new(EDITED).run(&config).await.unwrap_err();
    match &err {
        Error::Migration(MigrationError::Edited { version, .. }) => {
            assert_eq!(version, "20200101000002")
        }
        other => panic!("expected Edited, got {other}"),
    }
    // Named by its directory; the newest migration's edit names the
    // development setting that accepts it.
    let text = err.to_string();
    assert!(text.contains("2020-01-01-000002_"), "{text}");
    assert!(
        text.contains("RAILYARD_MIGRATIONS_ALLOW_EDITED=latest"),
        "{text}"
    );
    let status = Migrator::new(EDITED).status(&config).await.unwrap();
    assert!(matches!(
        status[1].state,
        MigrationState::Applied {
            checksum: ChecksumState::Edited,
            ..
        }
    ));
    assert!(Migrator::new(EDITED).verify(&config).await.is_err());
}

#[tokio::test]
async fn refuses_to_boot_when_the_database_is_ahead_of_the_binary() {
    let fresh = support::fresh_database("mig_ahead").await;
    let config = fresh.config.clone();
    Migrator::new(V2).run(&config).await.unwrap();
    let err = Database::builder(config)
        .migrations(Migrator::new(V1))
        .connect()
        .await
        .unwrap_err();
    match &err {
        Error::Migration(MigrationError::UnknownVersion { version }) => {
            assert_eq!(version, "20200101000003")
        }
        other => panic!("expected UnknownVersion, got {other}"),
    }
}

#[tokio::test]
async fn eight_racing_boots_apply_each_migration_exactly_once_and_all_succeed() {
    let fresh = support::fresh_database("mig_race").await;
    let dumps = std::sync::Arc::new(support::Dumps::new());
    let config = fresh.config.clone();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let config = config.clone();
        let dumps = dumps.clone();
        tasks.push(tokio::spawn(async move {
            Database::builder(config)
                .migrations(dumps.migrator())
                .connect()
                .await
                .map(|db| db.migration_report().unwrap().applied.len())
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await.unwrap().expect("every racing boot succeeds");
    }
    assert_eq!(
        applied,
        support::ledger_migrations(),
        "each migration applied by exactly one boot"
    );
    assert_eq!(
        count(
            &config,
            "SELECT count(*) AS n FROM __diesel_schema_migrations"
        )
        .await,
        support::ledger_migrations() as i64
    );
}

#[tokio::test]
async fn a_failing_migration_leaves_nothing_behind_and_frees_the_lock() {
    let fresh = support::fresh_database("mig_fail").await;
    let config = fresh.config.clone();
    let err = Migrator::new(FAILING).run(&config).await.unwrap_err();
    match &err {
        Error::Migration(MigrationError::Failed {
            version, message, ..
        }) => {
            assert_eq!(version, "20200101000002");
            assert!(message.contains("division by zero"), "{message}");
        }
        other => panic!("expected Failed, got {other}"),
    }
    assert!(
        err.to_string().contains("2020-01-01-000002_"),
        "named by its directory: {err}"
    );
    // The first migration committed; the broken one left no table and no record.
    assert_eq!(count(&config, "SELECT count(*) AS n FROM widgets").await, 0);
    assert_eq!(
        count(
            &config,
            "SELECT count(*) AS n FROM pg_tables WHERE tablename = 'half_done'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &config,
            "SELECT count(*) AS n FROM __diesel_schema_migrations WHERE version = '20200101000002'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &config,
            "SELECT count(*) AS n FROM railyard_schema_migrations"
        )
        .await,
        1
    );
    // The lock is free: another run takes it at once (and fails the same way).
    let err = Migrator::new(FAILING)
        .lock_timeout(Duration::from_millis(200))
        .run(&config)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Migration(MigrationError::Failed { .. })),
        "{err}"
    );
}

#[tokio::test]
async fn a_held_lock_times_out_naming_the_holder() {
    let fresh = support::fresh_database("mig_lock").await;
    let config = fresh.config.clone();
    let holder = Database::connect(config.clone().pool_max_size(1))
        .await
        .unwrap();
    let mut conn = holder.primary().await.unwrap();
    conn.batch_execute(&format!("SELECT pg_advisory_lock({})", Migrator::LOCK_KEY))
        .await
        .unwrap();
    let pid = conn.info().backend_pid;
    let err = Migrator::new(V1)
        .lock_timeout(Duration::from_millis(300))
        .run(&config)
        .await
        .unwrap_err();
    match &err {
        Error::Migration(MigrationError::LockTimeout { holder_pid, waited }) => {
            assert_eq!(*holder_pid, Some(pid), "{err}");
            let text = err.to_string();
            assert!(text.contains(&format!("backend pid {pid}")), "{text}");
            assert!(!text.contains("Some("), "no Rust debug forms: {text}");
            assert!(*waited >= Duration::from_millis(300));
        }
        other => panic!("expected LockTimeout, got {other}"),
    }
    conn.batch_execute("SELECT pg_advisory_unlock_all()")
        .await
        .unwrap();
    Migrator::new(V1)
        .run(&config)
        .await
        .expect("runs once the lock is free");
}

#[tokio::test]
async fn status_lists_pending_and_applied_and_revert_undoes_the_last() {
    let fresh = support::fresh_database("mig_status").await;
    let config = fresh.config.clone();
    let m = Migrator::new(V2);
    let before = m.status(&config).await.unwrap();
    assert!(before.iter().all(|s| s.state == MigrationState::Pending));
    Migrator::new(V1).run(&config).await.unwrap();
    let after = m.status(&config).await.unwrap();
    assert!(matches!(
        after[0].state,
        MigrationState::Applied {
            checksum: ChecksumState::Verified,
            ..
        }
    ));
    assert_eq!(after[2].state, MigrationState::Pending);
    assert_eq!(
        m.verify(&config).await.unwrap(),
        vec!["20200101000003".to_owned()]
    );

    assert_eq!(
        m.revert_last(&config).await.unwrap().as_deref(),
        Some("20200101000002")
    );
    assert_eq!(
        count(
            &config,
            "SELECT count(*) AS n FROM pg_tables WHERE tablename = 'gadgets'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &config,
            "SELECT count(*) AS n FROM __diesel_schema_migrations"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &config,
            "SELECT count(*) AS n FROM railyard_schema_migrations"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn migrations_applied_by_the_diesel_cli_are_adopted_with_their_checksum() {
    let fresh = support::fresh_database("mig_adopt").await;
    let config = fresh.config.clone();
    // What `diesel migration run` leaves: the table and diesel's row, no checksum.
    let db = Database::connect(config.clone().pool_max_size(1))
        .await
        .unwrap();
    let mut conn = db.primary().await.unwrap();
    conn.batch_execute(
        "CREATE TABLE __diesel_schema_migrations (version VARCHAR(50) PRIMARY KEY NOT NULL, run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP);
         CREATE TABLE widgets (id BIGSERIAL PRIMARY KEY, label TEXT NOT NULL);
         INSERT INTO __diesel_schema_migrations (version) VALUES ('20200101000001');",
    )
    .await
    .unwrap();
    drop(conn);
    let report = Migrator::new(V1).run(&config).await.unwrap();
    assert_eq!(report.adopted, vec!["20200101000001".to_owned()]);
    assert_eq!(report.applied.len(), 1);
    let status = Migrator::new(V1).status(&config).await.unwrap();
    assert!(status.iter().all(|s| matches!(
        s.state,
        MigrationState::Applied {
            checksum: ChecksumState::Verified,
            ..
        }
    )));
}

async fn exec(config: &railyard::Config, sql: &str) {
    let db = Database::connect(config.clone().pool_max_size(1))
        .await
        .unwrap();
    let mut conn = db.primary().await.unwrap();
    conn.batch_execute(sql).await.unwrap();
}

#[tokio::test]
async fn a_version_recorded_only_in_railyards_table_is_refused() {
    let fresh = support::fresh_database("mig_orphan").await;
    let config = fresh.config.clone();
    Migrator::new(V1).run(&config).await.unwrap();
    // diesel's row of the newest migration deleted by hand: without the check,
    // the next boot would run its SQL a second time.
    exec(
        &config,
        "DELETE FROM __diesel_schema_migrations WHERE version = '20200101000002'",
    )
    .await;
    let err = Migrator::new(V1).run(&config).await.unwrap_err();
    match &err {
        Error::Migration(MigrationError::Orphaned { version }) => {
            assert_eq!(version, "20200101000002")
        }
        other => panic!("expected Orphaned, got {other}"),
    }
    assert!(Migrator::new(V1).verify(&config).await.is_err());
    let status = Migrator::new(V1).status(&config).await.unwrap();
    assert_eq!(status[1].state, MigrationState::Orphaned);
    // A version no binary knows, only in Railyard's table, is refused too.
    exec(&config, "INSERT INTO __diesel_schema_migrations (version) VALUES ('20200101000002'); \
        INSERT INTO railyard_schema_migrations (version, name, up_sha256, down_sha256) VALUES ('20990101000000', 'x', 'a', 'b')").await;
    let err = Migrator::new(V1).run(&config).await.unwrap_err();
    assert!(
        matches!(&err, Error::Migration(MigrationError::Orphaned { version }) if version == "20990101000000"),
        "{err}"
    );
}

#[tokio::test]
async fn a_connection_lost_in_the_middle_of_a_migration_names_it() {
    let fresh = support::fresh_database("mig_lost").await;
    let config = fresh.config.clone();
    let name = fresh.name.clone();
    let killer = tokio::spawn(async move {
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let n = support::count_admin(&format!(
                "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity \
                 WHERE datname = '{name}' AND query LIKE '%pg_sleep(60)%' AND pid <> pg_backend_pid()"
            ))
            .await;
            if n > 0 {
                return true;
            }
        }
        false
    });
    let err = Migrator::new(SLOW).run(&config).await.unwrap_err();
    assert!(
        killer.await.unwrap(),
        "the migration's backend was terminated"
    );
    match &err {
        Error::Migration(MigrationError::Interrupted {
            name,
            in_transaction,
            ..
        }) => {
            assert_eq!(name, "2020-01-01-000001_slow");
            assert!(*in_transaction);
        }
        other => panic!("expected Interrupted, got {other}"),
    }
    assert!(err.to_string().contains("2020-01-01-000001_slow"), "{err}");
}

#[tokio::test]
async fn the_newest_migration_may_be_edited_in_development_and_redone_or_repaired() {
    let fresh = support::fresh_database("mig_dev").await;
    let config = fresh.config.clone();
    Migrator::new(V1).run(&config).await.unwrap();
    // Refused by default.
    assert!(Migrator::new(EDITED).run(&config).await.is_err());
    // The override accepts the newest migration's edit and records it.
    let report = Migrator::new(EDITED)
        .allow_edited_latest(true)
        .run(&config)
        .await
        .unwrap();
    assert_eq!(report.accepted_edits, vec!["20200101000002".to_owned()]);
    Migrator::new(EDITED)
        .run(&config)
        .await
        .expect("the new checksum is recorded");
    // Back to v1's file: repair records its checksum without running SQL.
    assert!(Migrator::new(V1).run(&config).await.is_err());
    assert_eq!(
        Migrator::new(V1)
            .repair_last(&config)
            .await
            .unwrap()
            .as_deref(),
        Some("20200101000002")
    );
    Migrator::new(V1).run(&config).await.unwrap();
    assert_eq!(Migrator::new(V1).repair_last(&config).await.unwrap(), None);
    // Redo runs the edited down and up: the new column exists afterwards.
    assert_eq!(
        Migrator::new(EDITED)
            .redo_last(&config)
            .await
            .unwrap()
            .as_deref(),
        Some("20200101000002")
    );
    assert_eq!(
        count(
            &config,
            "SELECT count(*) AS n FROM information_schema.columns WHERE table_name = 'gadgets' AND column_name = 'colour'"
        )
        .await,
        1
    );
    Migrator::new(EDITED).run(&config).await.unwrap();
    // Only the newest: with v2 applied, an edit of the second is still refused.
    Migrator::new(V2).repair_last(&config).await.unwrap_err();
}

const RISKY: EmbeddedMigrations = embed_migrations!("tests/migrations/risky");
const SAFE: EmbeddedMigrations = embed_migrations!("tests/migrations/safe");

/// A path in the system's temporary directory (a directory or a file), removed when dropped.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.0.is_dir() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[tokio::test]
async fn a_risky_migration_boots_after_a_pg_dump_recorded_and_shown_in_status() {
    let fresh = support::fresh_database("mig_risky").await;
    let dir = TempDir(std::env::temp_dir().join(support::unique("risky_dumps")));
    let migrator = Migrator::new(RISKY).backup_before_risky(BeforeRisky::pg_dump(&dir.0));
    let report = migrator.run(&fresh.config).await.unwrap();
    assert_eq!(report.applied.len(), 2);

    let status = migrator.status(&fresh.config).await.unwrap();
    assert!(!status[0].risky && status[0].backup.is_none(), "{status:?}");
    assert!(status[1].risky, "{status:?}");
    let backup = status[1]
        .backup
        .clone()
        .expect("the risky migration's backup is recorded");
    assert_eq!(backup.kind, "pg_dump");
    let path = std::path::PathBuf::from(&backup.location);
    assert!(path.starts_with(&dir.0), "{path:?}");
    assert!(backup.bytes.unwrap_or(0) > 0);
    println!(
        "{:<16} {} backup: {} {} at {} ({} bytes)",
        status[1].version,
        status[1].name,
        backup.kind,
        backup.location,
        chrono::DateTime::<chrono::Utc>::from(backup.taken_at),
        backup.bytes.unwrap_or(0)
    );

    // The dump is a custom-format archive of the named table, with its data.
    let list = std::process::Command::new("pg_restore")
        .arg("--list")
        .arg(&path)
        .output()
        .expect("pg_restore runs");
    let toc = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success(), "{toc}");
    assert!(toc.contains("TABLE public notes"), "{toc}");
    assert!(toc.contains("TABLE DATA public notes"), "{toc}");
    assert!(
        !toc.contains("other"),
        "only the listed table is dumped: {toc}"
    );
    // Its rows come back: restore the data as SQL and count the rows.
    let sql = std::process::Command::new("pg_restore")
        .args(["--data-only", "--file=-"])
        .arg(&path)
        .output()
        .expect("pg_restore runs");
    let text = String::from_utf8_lossy(&sql.stdout);
    assert_eq!(text.lines().filter(|l| l.contains("\tnote ")).count(), 100);
}

#[tokio::test]
async fn a_failing_backup_stops_the_risky_migration_and_names_it() {
    let fresh = support::fresh_database("mig_risky_fail").await;
    // A directory that cannot be made, even by root: its parent is a file.
    let file = TempDir(std::env::temp_dir().join(support::unique("risky_file")));
    std::fs::write(&file.0, b"not a directory").unwrap();
    let migrator =
        Migrator::new(RISKY).backup_before_risky(BeforeRisky::pg_dump(file.0.join("dumps")));
    let err = migrator.run(&fresh.config).await.unwrap_err();
    let text = support::chain(&err);
    assert!(
        matches!(&err, Error::Migration(MigrationError::BackupFailed { name, .. }) if name == "2026-01-01-000002_drop_note_body"),
        "{err:?}"
    );
    assert!(
        text.contains("2026-01-01-000002_drop_note_body") && text.contains("NOT applied"),
        "{text}"
    );
    assert!(
        text.contains("backup directory"),
        "the cause is kept: {text}"
    );
    if let Some(p) = fresh.config.primary().password() {
        assert!(!text.contains(p.expose()) && !format!("{err:?}").contains(p.expose()));
    }
    // The first migration is applied, the risky one is not: the column is there.
    let status = migrator.status(&fresh.config).await.unwrap();
    assert!(matches!(status[0].state, MigrationState::Applied { .. }));
    assert_eq!(status[1].state, MigrationState::Pending);
    assert_eq!(
        count(
            &fresh.config,
            "SELECT count(*) AS n FROM information_schema.columns WHERE table_name = 'notes' AND column_name = 'body'"
        )
        .await,
        1
    );
    // Without any backup configured, the same refusal (whatever the
    // environment of the test run says).
    let err = Migrator::new(RISKY)
        .backup_dir_from_env(false)
        .run(&fresh.config)
        .await
        .unwrap_err();
    assert!(
        support::chain(&err).contains("RAILYARD_MIGRATION_BACKUP_DIR"),
        "{err}"
    );
}

#[tokio::test]
async fn a_migration_not_marked_risky_takes_no_backup() {
    let fresh = support::fresh_database("mig_safe").await;
    let dir = TempDir(std::env::temp_dir().join(support::unique("safe_dumps")));
    let migrator = Migrator::new(SAFE).backup_before_risky(BeforeRisky::pg_dump(&dir.0));
    migrator.run(&fresh.config).await.unwrap();
    let status = migrator.status(&fresh.config).await.unwrap();
    assert!(
        status.iter().all(|s| !s.risky && s.backup.is_none()),
        "{status:?}"
    );
    assert_eq!(
        count(
            &fresh.config,
            "SELECT count(*) AS n FROM railyard_migration_backups"
        )
        .await,
        0
    );
    assert!(!dir.0.exists(), "no dump directory was made");
}

const RISKY_PARTITIONED: EmbeddedMigrations =
    embed_migrations!("tests/migrations/risky_partitioned");
const RISKY_FAILS: EmbeddedMigrations = embed_migrations!("tests/migrations/risky_fails");
const RISKY_EMPTY: EmbeddedMigrations = embed_migrations!("tests/migrations/risky_empty");

/// A first boot on an empty database: a risky migration whose tables have no
/// row needs no backup setting and records that none was needed; once the
/// table has a row, the same migration without a backup is refused.
#[tokio::test]
async fn a_risky_migration_of_empty_tables_needs_no_backup_and_one_of_a_filled_table_does() {
    let fresh = support::fresh_database("mig_risky_empty").await;
    let report = Migrator::new(RISKY_EMPTY).run(&fresh.config).await.unwrap();
    assert_eq!(report.applied.len(), 2);
    let status = Migrator::new(RISKY_EMPTY)
        .status(&fresh.config)
        .await
        .unwrap();
    let backup = status[1]
        .backup
        .as_ref()
        .expect("the record says no backup was needed");
    assert_eq!(backup.kind, "none", "{status:?}");
    assert!(backup.location.contains("drafts"), "{status:?}");

    // The same migration over a row: refused, naming the migration.
    let filled = &fresh;
    Migrator::new(RISKY_EMPTY)
        .revert_last(&filled.config)
        .await
        .unwrap()
        .expect("the risky migration is reverted");
    let db = Database::connect(filled.config.clone()).await.unwrap();
    db.with_primary(async |c| {
        diesel_async::SimpleAsyncConnection::batch_execute(
            c,
            "INSERT INTO drafts (body) VALUES ('kept')",
        )
        .await?;
        Ok::<_, Error>(())
    })
    .await
    .unwrap();
    db.close(Duration::from_secs(5)).await;
    let err = Migrator::new(RISKY_EMPTY)
        .run(&filled.config)
        .await
        .unwrap_err();
    let text = support::chain(&err);
    assert!(
        text.contains("2026-01-01-000002_drop_draft_body")
            && text.contains("no backup is configured"),
        "{text}"
    );
}

/// `pg_restore --list` of a dump.
fn toc(path: &std::path::Path) -> String {
    let list = std::process::Command::new("pg_restore")
        .arg("--list")
        .arg(path)
        .output()
        .expect("pg_restore runs");
    let toc = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(list.status.success(), "{toc}");
    toc
}

#[tokio::test]
async fn a_risky_migration_of_a_partitioned_table_dumps_its_partitions_rows_behind_a_transaction_pooler()
 {
    let fresh = support::fresh_database("mig_risky_part").await;
    let dir = TempDir(std::env::temp_dir().join(support::unique("risky_part_dumps")));
    // One transaction per migration, under the transaction-scoped lock, as
    // behind PgBouncer in transaction mode; the backup is taken between them.
    let config = fresh
        .config
        .clone()
        .pooler(railyard::config::Pooler::PgBouncerTransaction);
    let migrator = Migrator::new(RISKY_PARTITIONED)
        .backup_before_risky(BeforeRisky::pg_dump(&dir.0).direct(fresh.config.primary().clone()));
    let report = migrator.run(&config).await.unwrap();
    assert_eq!(report.applied.len(), 2);
    let status = migrator.status(&fresh.config).await.unwrap();
    let backup = status[1].backup.clone().expect("the backup is recorded");
    assert_eq!(backup.kind, "pg_dump");
    let toc = toc(std::path::Path::new(&backup.location));
    println!("{toc}");
    for part in ["events_2025", "events_2026"] {
        assert!(
            toc.contains(&format!("TABLE DATA public {part}")),
            "the partition's rows are dumped: {toc}"
        );
    }
    assert!(toc.contains("TABLE public events"), "{toc}");
    let sql = std::process::Command::new("pg_restore")
        .args(["--data-only", "--file=-"])
        .arg(&backup.location)
        .output()
        .expect("pg_restore runs");
    let text = String::from_utf8_lossy(&sql.stdout);
    assert_eq!(text.lines().filter(|l| l.contains("\tevent ")).count(), 100);
}

#[tokio::test]
async fn behind_a_transaction_pooler_the_backup_record_outlives_a_failed_risky_migration() {
    let fresh = support::fresh_database("mig_risky_pool_fail").await;
    let dir = TempDir(std::env::temp_dir().join(support::unique("risky_pool_dumps")));
    let config = fresh
        .config
        .clone()
        .pooler(railyard::config::Pooler::PgBouncerTransaction);
    // Through the pooler's own target, pg_dump is refused: its session
    // settings would stay on pooled server connections.
    let refused = Migrator::new(RISKY_FAILS)
        .backup_before_risky(BeforeRisky::pg_dump(&dir.0))
        .run(&config)
        .await
        .unwrap_err();
    assert!(
        support::chain(&refused).contains("transaction-mode pooler"),
        "{refused}"
    );
    let migrator = Migrator::new(RISKY_FAILS)
        .backup_before_risky(BeforeRisky::pg_dump(&dir.0).direct(fresh.config.primary().clone()));
    let err = migrator.run(&config).await.unwrap_err();
    assert!(err.to_string().contains("2026-01-01-000002_fails"), "{err}");
    // The migration rolled back, its backup's record is committed.
    assert_eq!(
        count(&fresh.config, "SELECT count(*) AS n FROM items").await,
        10
    );
    let status = migrator.status(&fresh.config).await.unwrap();
    assert_eq!(status[1].state, MigrationState::Pending);
    let backup = status[1].backup.clone().expect("the record is kept");
    assert_eq!(backup.kind, "pg_dump");
    assert!(toc(std::path::Path::new(&backup.location)).contains("TABLE DATA public items"));
}

/// Eight instances of the reference app boot at once on a fresh, empty
/// database with no backup setting: one migrates (its risky migration finds
/// nothing to back up), the others wait for the lock and find it done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_boots_of_the_reference_app_on_an_empty_database_all_succeed() {
    let fresh = support::fresh_database("boot_empty").await;
    let url = fresh.config.primary().expose_url();
    let boots = (0..8).map(|_| {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_railyard"));
        c.arg("boot")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RAILYARD_ENV", "development")
            .env("DATABASE_URL", &url)
            .kill_on_drop(true);
        async move {
            tokio::time::timeout(Duration::from_secs(120), c.output())
                .await
                .expect("a boot ends within 120 s")
                .expect("the binary runs")
        }
    });
    let outputs = futures_util::future::join_all(boots).await;
    for (i, o) in outputs.iter().enumerate() {
        assert!(
            o.status.success(),
            "boot {i} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let status = railyard::Migrator::new(support::LEDGER)
        .status(&fresh.config)
        .await
        .unwrap();
    let risky: Vec<_> = status.iter().filter(|s| s.risky).collect();
    assert!(!risky.is_empty());
    for s in risky {
        assert_eq!(
            s.backup.as_ref().map(|b| b.kind.as_str()),
            Some("none"),
            "{s:?}"
        );
    }
}
