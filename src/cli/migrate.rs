//! `railyard migrate`: the ledger's migrations.

use railyard::migrate::{ChecksumState, MigrationState};
use railyard::{Config, Migrator};

use super::config;
use crate::{MIGRATIONS, MigrateAction, app};

pub(crate) async fn migrate(action: MigrateAction) -> Result<(), app::AppError> {
    let migrator = Migrator::new(MIGRATIONS);
    if let MigrateAction::Embedded = action {
        for (version, name) in migrator.versions()? {
            out!("{version:<16} {name}");
        }
        return Ok(());
    }
    let (config, cluster) = config().await?;
    let migrator = match action {
        MigrateAction::Run => super::migrator(&config, cluster.as_ref()).await?,
        _ => migrator,
    };
    match action {
        MigrateAction::Status => {
            print_status(&migrator, &config).await?;
        }
        MigrateAction::Run => {
            let report = migrator.run(&config).await?;
            for m in &report.applied {
                out!("applied {} in {:.2?}", m.name, m.duration);
            }
            out!(
                "{} applied, {} already applied ({:.2?})",
                report.applied.len(),
                report.already_applied,
                report.total
            );
        }
        MigrateAction::Revert => match migrator.revert_last(&config).await? {
            Some(v) => out!("reverted {v}"),
            None => out!("nothing to revert"),
        },
        MigrateAction::Redo => match migrator.redo_last(&config).await? {
            Some(v) => out!("redid {v}: reverted and applied again"),
            None => out!("nothing to redo"),
        },
        MigrateAction::Repair => match migrator.repair_last(&config).await? {
            Some(v) => out!("recorded the new checksum of {v}"),
            None => out!("nothing to repair: the newest migration matches this binary"),
        },
        MigrateAction::Embedded => unreachable!("answered above without a database"),
        MigrateAction::Verify => {
            let pending = migrator.verify(&config).await?;
            out!(
                "applied migrations match this binary; {} pending{}",
                pending.len(),
                if pending.is_empty() {
                    String::new()
                } else {
                    format!(": {}", pending.join(", "))
                }
            );
        }
    }
    Ok(())
}

/// `migrate status`: each version's state, and its backup or risk.
async fn print_status(migrator: &Migrator, config: &Config) -> Result<(), app::AppError> {
    for row in migrator.status(config).await? {
        let state = match row.state {
            MigrationState::Applied { checksum, duration } => format!(
                "applied ({}){}",
                match checksum {
                    ChecksumState::Verified => "checksum ok",
                    ChecksumState::Edited => "EDITED since applied",
                    ChecksumState::Unrecorded => "no checksum yet",
                    _ => "checksum state unknown to this CLI",
                },
                duration.map(|d| format!(" in {d:.2?}")).unwrap_or_default()
            ),
            MigrationState::Pending => "pending".into(),
            MigrationState::Unknown => "UNKNOWN to this binary".into(),
            MigrationState::Orphaned => "ORPHANED: in railyard_schema_migrations only".into(),
            _ => "in a state this CLI does not know".into(),
        };
        let backup = match (&row.backup, row.risky) {
            (Some(b), _) => format!(
                "  backup: {} {} at {}{}",
                b.kind,
                b.location,
                chrono::DateTime::<chrono::Utc>::from(b.taken_at)
                    .format("%Y-%m-%d %H:%M:%S%.3f UTC"),
                b.bytes.map(|n| format!(" ({n} bytes)")).unwrap_or_default()
            ),
            (None, true) => "  risky: backup before applying".into(),
            (None, false) => String::new(),
        };
        out!("{:<16} {:<45} {state}{backup}", row.version, row.name);
    }
    Ok(())
}
