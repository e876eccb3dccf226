//! `railyard boot` (and `railyard` alone): boot and print a report.

use std::time::Instant;

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use railyard::Database;
use railyard::database::ReplicaState;

use super::{config, migrator};
use crate::{app, schema};

pub(crate) async fn boot() -> Result<(), app::AppError> {
    let started = Instant::now();
    let (config, cluster) = config().await?;
    if let Some(c) = &cluster {
        out!(
            "local cluster     {:?} in {:.2?} ({})",
            c.started(),
            c.start_time(),
            c.dir().display()
        );
    }
    out!("primary           {}", config.primary());
    let migrator = migrator(&config, cluster.as_ref()).await?;
    let db = Database::builder(config)
        .migrations(migrator)
        .connect()
        .await?;
    print_server(&db).await?;
    print_migrations(&db);
    print_ledger(&db).await?;
    print_pools(&db);
    print_replicas(&db).await;
    out!(
        "boot              {:.2?} (database handle {:.2?})",
        started.elapsed(),
        db.boot_time()
    );
    Ok(())
}

/// The server's version and the primary connection's details.
async fn print_server(db: &Database) -> Result<(), app::AppError> {
    let info = {
        let conn = db.primary().await?;
        conn.info().clone()
    };
    out!("server            PostgreSQL {}", info.server_version);
    out!(
        "connection        {}:{} pid {} ({:?}), TLS {}",
        info.host,
        info.port,
        info.backend_pid,
        info.role,
        if info.tls { "on" } else { "off" }
    );
    Ok(())
}

/// What the boot's migrations did, when it ran them.
fn print_migrations(db: &Database) {
    if let Some(report) = db.migration_report() {
        out!(
            "migrations        {} applied now, {} already applied; lock wait {:.2?}, run {:.2?}",
            report.applied.len(),
            report.already_applied,
            report.lock_wait,
            report.total
        );
        for m in &report.applied {
            out!("  applied         {} in {:.2?}", m.name, m.duration);
        }
        for v in &report.adopted {
            out!("  adopted         {v} (applied earlier without a checksum)");
        }
    }
}

/// The ledger's users and accounts.
async fn print_ledger(db: &Database) -> Result<(), app::AppError> {
    let mut conn = db.primary().await?;
    let users: i64 = schema::users::table.count().get_result(&mut **conn).await?;
    let accounts: i64 = schema::accounts::table
        .count()
        .get_result(&mut **conn)
        .await?;
    drop(conn);
    out!("ledger            {users} users, {accounts} accounts");
    Ok(())
}

/// Each pool's connections and checkouts.
fn print_pools(db: &Database) {
    for p in db.pool_status() {
        out!(
            "pool {:<12} {} open ({} idle) of {}, {} checkouts",
            p.name,
            p.connections,
            p.idle,
            p.max_size,
            p.gets
        );
    }
}

/// Each replica's role, streaming state and lag.
async fn print_replicas(db: &Database) {
    for r in db.replica_report().await {
        match r.state {
            ReplicaState::Reachable {
                role,
                streaming,
                lag_bytes,
                replay_delay,
                ..
            } => out!(
                "replica           {} {:?}, {}, lag {} bytes{}",
                r.target,
                role,
                if streaming {
                    "streaming"
                } else {
                    "NOT streaming"
                },
                lag_bytes
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "unknown".into()),
                replay_delay
                    .map(|d| format!(", last replayed commit {d:.1?} ago"))
                    .unwrap_or_default()
            ),
            ReplicaState::Unreachable { error, .. } => {
                out!("replica           {} unreachable: {error}", r.target)
            }
            _ => out!("replica           {} in an unknown state", r.target),
        }
    }
}
