//! `railyard load --dashboard ADDR`: the live dashboard of the run's own
//! database (the page `railyard serve` shows), served while the run lasts.

use std::net::SocketAddr;

use railyard::{Database, StatementStats};
use railyard_ops::watch::{WatchOptions, Watcher};

use crate::app::AppError;

/// The dashboard being served; stops when dropped.
#[derive(Debug)]
pub struct Live {
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Live {
    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Starts sampling `db` and serves the dashboard on `addr`. `stats` must be
/// a hook of `db` for the top statements to fill.
pub async fn serve(
    db: &Database,
    stats: StatementStats,
    addr: SocketAddr,
) -> Result<Live, AppError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| AppError::io(format!("--dashboard: cannot listen on {addr}"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| AppError::io("--dashboard: the listener's address", e))?;
    let watcher = Watcher::spawn(db.clone(), WatchOptions::default().statements(stats));
    let app = railyard_http::router_with_dashboard(
        db.clone(),
        railyard_http::Readiness::new(),
        watcher,
        None,
    );
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("the dashboard stopped: {e}");
        }
    });
    Ok(Live { addr, server })
}
