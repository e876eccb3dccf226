//! `railyard backup`: the local cluster's backups with pgBackRest.

use std::time::Instant;

use railyard::{Config, Database};
use railyard_local::LocalCluster;

use railyard_ops::backup::local::{CheckOutcome, Checks, LocalBackups, Scratch};
use railyard_ops::backup::pgbackrest::BackupType;

use super::config;
use crate::{BackupAction, app};

/// The local cluster's backups, for the `backup` commands.
async fn local_backups() -> Result<
    (
        railyard_ops::backup::local::LocalBackups,
        LocalCluster,
        Config,
    ),
    app::AppError,
> {
    let (config, cluster) = config().await?;
    let Some(cluster) = cluster else {
        return Err(app::AppError::Usage(
            "`railyard backup` drives the local cluster, and DATABASE_URL points elsewhere; unset it, or see docs/backups.md (\"On your own server\") for what to set up there".into(),
        ));
    };
    let db = config.primary().dbname().unwrap_or("railyard").to_owned();
    Ok((
        railyard_ops::backup::local::LocalBackups::new(&cluster, &db)?,
        cluster,
        config,
    ))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1_048_576.0)
}

pub(crate) async fn backup(action: BackupAction) -> Result<(), app::AppError> {
    let (backups, _cluster, config) = local_backups().await?;
    match action {
        BackupAction::Init => init(&backups).await,
        BackupAction::Run { kind } => run(&backups, &kind).await,
        BackupAction::List { json } => list(&backups, json).await,
        BackupAction::Verify { set } => verify(&backups, set.as_deref()).await,
        BackupAction::Restore { to_time, keep } => restore(&backups, &config, &to_time, keep).await,
        BackupAction::Discard { name } => {
            backups.discard(&name).await?;
            out!("removed {name}");
            Ok(())
        }
    }
}

/// `backup init`: archiving on, the configuration, the stanza.
async fn init(backups: &LocalBackups) -> Result<(), app::AppError> {
    let r = backups.init().await?;
    out!(
        "backups enabled in {:.2?}: config {}, repository {}, stanza {}; primary {}",
        r.took,
        r.config.display(),
        r.repo.display(),
        railyard_ops::backup::local::STANZA,
        if r.restarted {
            "restarted with archive_mode=on (the replica streams again)"
        } else {
            "already archiving"
        }
    );
    Ok(())
}

/// `backup run`: a backup, then a counted restore point.
async fn run(backups: &LocalBackups, kind: &str) -> Result<(), app::AppError> {
    let kind: BackupType = kind.parse()?;
    let r = backups.run(kind).await?;
    out!(
        "backup {} ({}) in {:.2?}: {} of the cluster, {} copied, {} in the repository (+{}), WAL {}..{}",
        r.set.label,
        r.set.kind,
        r.backup_took,
        mib(r.set.size),
        mib(r.set.delta),
        mib(r.set.repo_size),
        mib(r.set.repo_delta),
        r.set.wal_start,
        r.set.wal_stop
    );
    out!(
        "restore point {} at {} in {:.2?}: {} rows in {} tables of {} counted",
        r.point.restore_point,
        r.point.lsn,
        r.point_took,
        r.point.counts.values().sum::<i64>(),
        r.point.counts.len(),
        r.point.database
    );
    Ok(())
}

/// `backup list`: the backups, as a table or JSON.
async fn list(backups: &LocalBackups, json: bool) -> Result<(), app::AppError> {
    let sets = backups.list().await?;
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&sets).unwrap_or_default()
        );
    } else {
        out!(
            "{:<34} {:<5} {:<20} {:<20} {:>10} {:>10} {:>10}  WAL",
            "label",
            "type",
            "start (UTC)",
            "stop (UTC)",
            "size",
            "copied",
            "repo"
        );
        for s in &sets {
            out!(
                "{:<34} {:<5} {:<20} {:<20} {:>10} {:>10} {:>10}  {}..{}",
                s.label,
                s.kind,
                s.start.format("%Y-%m-%d %H:%M:%S"),
                s.stop.format("%Y-%m-%d %H:%M:%S"),
                mib(s.size),
                mib(s.delta),
                mib(s.repo_size),
                s.wal_start,
                s.wal_stop
            );
        }
        out!("{} backup(s)", sets.len());
    }
    Ok(())
}

/// `backup verify`: the restore drill, its phases and checks.
async fn verify(backups: &LocalBackups, set: Option<&str>) -> Result<(), app::AppError> {
    let checks = ledger_checks();
    let r = backups.verify(set, checks).await?;
    out!(
        "drill of {} to {}",
        r.label.as_deref().unwrap_or("(no backup)"),
        r.target
    );
    for p in &r.phases {
        out!(
            "phase {:<15} {:>8.2}s {}",
            p.name,
            p.took.as_secs_f64(),
            if p.ok { "ok" } else { "FAILED" }
        );
    }
    for c in &r.checks {
        out!(
            "{} {:<32} {}",
            if c.passed { "pass" } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    let total: f64 = r.phases.iter().map(|p| p.took.as_secs_f64()).sum();
    if r.passed() {
        out!("drill PASSED in {total:.2}s");
    } else {
        let why = r.error.clone().unwrap_or_else(|| {
            let failed: Vec<&str> = r
                .checks
                .iter()
                .filter(|c| !c.passed)
                .map(|c| c.name.as_str())
                .collect();
            format!("checks failed: {}", failed.join(", "))
        });
        out!("drill FAILED in {total:.2}s: {why}");
        return Err(app::AppError::Failed(format!(
            "restore drill failed: {why}"
        )));
    }
    Ok(())
}

/// The drill's checks: the ledger's invariants on the restored instance.
fn ledger_checks() -> Checks {
    Box::new(|config: Config| {
        Box::pin(async move {
            let db = Database::connect(config.pool_max_size(2)).await?;
            let verdicts = app::check::check(&db).await;
            db.close(std::time::Duration::from_secs(2)).await;
            Ok(verdicts?
                .into_iter()
                .map(|v| {
                    CheckOutcome::new(
                        format!("invariant {}", v.name),
                        v.passed(),
                        format!("{} violation(s) {}", v.violations, v.detail),
                    )
                })
                .collect())
        })
    })
}

/// `backup restore`: point-in-time recovery into a scratch instance, kept
/// or removed.
async fn restore(
    backups: &LocalBackups,
    config: &Config,
    to_time: &str,
    keep: bool,
) -> Result<(), app::AppError> {
    let to = chrono::DateTime::parse_from_rfc3339(to_time)
        .map_err(|e| {
            app::AppError::Usage(format!(
                "--to-time: {e}; give an RFC 3339 time such as 2025-01-31T12:00:00.123Z"
            ))
        })?
        .with_timezone(&chrono::Utc);
    let (scratch, r) = backups.restore(to).await?;
    for p in &r.phases {
        out!("phase {:<15} {:>8.2}s ok", p.name, p.took.as_secs_f64());
    }
    match &r.last_xact {
        Some((xid, at)) => out!(
            "recovered to {}: last committed transaction {xid} at {}",
            r.target.format("%Y-%m-%dT%H:%M:%S%.6fZ"),
            at.format("%Y-%m-%dT%H:%M:%S%.6fZ")
        ),
        None => out!(
            "recovered to {}: no commit timestamp found (track_commit_timestamp was off when it committed)",
            r.target.format("%Y-%m-%dT%H:%M:%S%.6fZ")
        ),
    }
    let db = config.primary().dbname().unwrap_or("railyard").to_owned();
    let newest = newest_rows(&scratch, &db).await;
    match newest {
        Ok(line) => out!("{line}"),
        Err(e) => out!("newest ledger rows: not read ({e})"),
    }
    if keep {
        out!("kept {} on port {}", scratch.name(), scratch.port());
        out!("url {}", scratch.target(&db));
        out!(
            "(the password is the local cluster's: `railyard local env`); remove it with: railyard backup discard {}",
            scratch.name()
        );
        scratch.keep();
    } else {
        let started = Instant::now();
        scratch.remove().await?;
        out!(
            "phase {:<15} {:>8.2}s ok",
            "teardown",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The restored ledger's newest rows and counts, as one line.
async fn newest_rows(scratch: &Scratch, db: &str) -> Result<String, app::AppError> {
    let client = scratch.client(db).await?;
    let row = client
        .query_one(
            "SELECT (SELECT max(created_at)::text FROM orders), (SELECT max(created_at)::text FROM deposits), (SELECT max(executed_at)::text FROM trades), \
                    (SELECT count(*) FROM orders), (SELECT count(*) FROM deposits), (SELECT count(*) FROM trades)",
            &[],
        )
        .await
        .map_err(|e| railyard_ops::Error::Backup(format!("reading the restored ledger: {e}")))?;
    Ok::<_, app::AppError>(format!(
        "newest ledger rows: order created {}, deposit {}, trade {} ({} orders, {} deposits, {} trades)",
        row.get::<_, Option<String>>(0)
            .unwrap_or_else(|| "-".into()),
        row.get::<_, Option<String>>(1)
            .unwrap_or_else(|| "-".into()),
        row.get::<_, Option<String>>(2)
            .unwrap_or_else(|| "-".into()),
        row.get::<_, i64>(3),
        row.get::<_, i64>(4),
        row.get::<_, i64>(5)
    ))
}
