//! `railyard local`: the local PostgreSQL cluster.

use railyard_local::LocalCluster;
use railyard_local::{default_cluster_dir, stop_dir};

use crate::{LocalAction, app};

pub(crate) async fn local(action: LocalAction) -> Result<(), app::AppError> {
    match action {
        LocalAction::Start => {
            let c = LocalCluster::shared().await?;
            out!(
                "{:?} in {:.2?} ({})",
                c.started(),
                c.start_time(),
                c.dir().display()
            );
            out!("primary  {}", c.primary_target("railyard"));
            if let Some(r) = c.replica_target("railyard") {
                out!("replica  {r}");
            }
        }
        LocalAction::Stop => {
            stop_dir(&default_cluster_dir())?;
            out!("stopped");
        }
        LocalAction::Status => match LocalCluster::running(None).await? {
            Some(c) => {
                out!("running in {}", c.dir().display());
                out!("primary  {}", c.primary_target("railyard"));
                if let Some(r) = c.replica_target("railyard") {
                    out!("replica  {r}");
                }
            }
            None => out!("not running ({})", default_cluster_dir().display()),
        },
        LocalAction::Gc { template_idle } => {
            let c = LocalCluster::shared().await?;
            let report = c.gc(template_idle.into()).await?;
            for (name, bytes) in report.databases.iter().chain(&report.templates) {
                out!("dropped {name:<48} {:>8.1} MB", *bytes as f64 / 1e6);
            }
            for (dir, bytes) in &report.clusters {
                out!(
                    "removed {:<48} {:>8.1} MB",
                    dir.display(),
                    *bytes as f64 / 1e6
                );
            }
            out!(
                "freed {:.1} MB ({} databases, {} templates, {} clusters)",
                report.bytes() as f64 / 1e6,
                report.databases.len(),
                report.templates.len(),
                report.clusters.len()
            );
        }
        LocalAction::Env { dbname } => {
            let c = LocalCluster::shared().await?;
            let lines = match dbname {
                Some(db) => {
                    c.create_database(&db).await?;
                    c.env_lines_for(&db)
                }
                None => c.env_lines(),
            };
            out!("{}", lines.trim_end());
        }
    }
    Ok(())
}
