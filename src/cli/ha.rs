//! `railyard ha`: the pg_auto_failover formation on loopback.

use std::time::Instant;

use railyard_local::ha::{Formation, default_formation_dir};

use crate::{HaAction, app};

pub(crate) async fn ha(action: HaAction) -> Result<(), app::AppError> {
    match action {
        HaAction::Start => {
            let f = Formation::builder().start().await?;
            out!(
                "{:?} in {:.2?} ({})",
                f.started(),
                f.start_time(),
                f.dir().display()
            );
            print_nodes(&f).await?;
            out!("uri    {}", f.uri().await?);
        }
        HaAction::Stop => {
            railyard_local::ha::stop_dir(&default_formation_dir())?;
            out!("stopped");
        }
        HaAction::Status => match Formation::running(None).await? {
            Some(f) => {
                out!("running in {}", f.dir().display());
                print_nodes(&f).await?;
                for e in f.events(8).await? {
                    out!("  {e}");
                }
            }
            None => out!("not running ({})", default_formation_dir().display()),
        },
        HaAction::Uri => out!("{}", running().await?.uri().await?),
        HaAction::Env => out!("{}", running().await?.env_lines().await?.trim_end()),
        HaAction::Failover => {
            let f = running().await?;
            let started = Instant::now();
            f.perform_failover(std::time::Duration::from_secs(120))
                .await?;
            out!("failover done in {:.2?}", started.elapsed());
            print_nodes(&f).await?;
        }
        HaAction::Destroy => {
            let dir = default_formation_dir();
            if dir.exists() {
                railyard_local::ha::destroy_dir(&dir)?;
                out!("removed {}", dir.display());
            } else {
                out!("nothing to remove ({})", dir.display());
            }
        }
    }
    Ok(())
}

/// The formation that runs, or an error that says how to start one.
async fn running() -> Result<Formation, railyard_local::Error> {
    Formation::running(None).await?.ok_or_else(|| {
        railyard_local::Error::Local(format!(
            "no formation runs in {} (start one with `scripts/ha start`)",
            default_formation_dir().display()
        ))
    })
}

/// One line per node: its port, reported and assigned states, health.
async fn print_nodes(f: &Formation) -> Result<(), app::AppError> {
    for n in f.nodes().await? {
        out!(
            "{:<6} 127.0.0.1:{:<5}  {:>12} (assigned {}){}",
            n.name,
            n.port,
            n.reported,
            n.assigned,
            if n.healthy == Some(false) {
                "  unhealthy"
            } else {
                ""
            }
        );
    }
    Ok(())
}
