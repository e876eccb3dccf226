//! `railyard serve`: the operators' endpoints, the dashboard and the alerts
//! over HTTP, retention in the process when configured, and the drain on
//! SIGTERM or SIGINT.

use std::time::Duration;

use railyard::{Config, Database};
use railyard_local::LocalCluster;
use railyard_ops::alert::Alerts;
use railyard_ops::retain::RetentionJob;

use super::{StopSignals, config, migrator};
use crate::app;

/// The HTTP server's task.
type Server = tokio::task::JoinHandle<std::io::Result<()>>;

pub(crate) async fn serve(
    addr: std::net::SocketAddr,
    alerts: Option<std::path::PathBuf>,
) -> Result<(), app::AppError> {
    let (config, cluster) = config().await?;
    let timeout = config.shutdown_deadline();
    // From here on, SIGTERM and SIGINT start a drain instead of killing the
    // process (later ones are ignored: the timeout bounds the drain).
    let mut signals = StopSignals::new()?;
    // The rules first: a bad file stops the start before anything connects.
    let rules = match &alerts {
        Some(path) => railyard_ops::alert::AlertConfig::from_file(path)?,
        None => railyard_ops::alert::AlertConfig::builtin(),
    };
    let alerts = railyard_ops::alert::Alerts::new(rules);
    // Retention runs inside the process when RAILYARD_RETENTION is set.
    let retention = match railyard_ops::retain::RetentionConfig::from_env()? {
        Some(c) => Some(app::retain::ledger(c)?),
        None => None,
    };
    let stats = railyard::StatementStats::new();
    let db = connect(config, cluster.as_ref(), stats.clone(), &alerts).await?;
    // Samples every second, fifteen minutes kept: what the dashboard draws.
    let watcher = railyard_ops::watch::Watcher::spawn(
        db.clone(),
        railyard_ops::watch::WatchOptions::default().statements(stats),
    );
    let (listener, addr) = bind(addr).await?;
    let readiness = railyard_http::Readiness::new();
    let retention = retention.map(|r| RetentionJob::spawn(db.clone(), r));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    alerts.watch(&watcher);
    let app = railyard_http::router_with_dashboard(
        db.clone(),
        readiness.clone(),
        watcher,
        Some(railyard_http::alerts_router(
            alerts,
            railyard_http::ControlToken::from_env()?,
        )),
    );
    let mut server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .into_future(),
    );
    out!("serving /healthz /readyz /health /metrics /alerts on http://{addr}");
    out!("dashboard on http://{addr}/");
    let signal = tokio::select! {
        ended = &mut server => return http_ended(ended),
        signal = signals.next() => signal,
    };
    let drain = Drain {
        server,
        stop,
        readiness,
        retention,
        db,
        timeout,
    };
    drain.run(signal).await
}

/// The database with the hooks `serve` runs: the slow query log, the audit
/// log, spans, the statements' statistics and the alerts' statement hook.
async fn connect(
    config: Config,
    cluster: Option<&LocalCluster>,
    stats: railyard::StatementStats,
    alerts: &Alerts,
) -> Result<Database, app::AppError> {
    let migrator = migrator(&config, cluster).await?;
    Ok(Database::builder(config)
        .migrations(migrator)
        .hook(railyard::SlowQueryLog::new(Duration::from_millis(100)))
        .hook(railyard::AuditLog)
        .hook(railyard::QuerySpans)
        .hook(stats)
        .hook(alerts.statement_hook())
        .connect()
        .await?)
}

/// The listener on `addr`, and the address it got (port 0 picks one).
async fn bind(
    addr: std::net::SocketAddr,
) -> Result<(tokio::net::TcpListener, std::net::SocketAddr), app::AppError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| app::AppError::Io {
            context: format!("cannot listen on {addr}"),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| app::AppError::Io {
        context: "the listener's address".into(),
        source,
    })?;
    Ok((listener, addr))
}

/// What a stop signal drains, within `timeout`.
struct Drain {
    server: Server,
    stop: tokio::sync::oneshot::Sender<()>,
    readiness: railyard_http::Readiness,
    retention: Option<RetentionJob>,
    db: Database,
    timeout: Duration,
}

impl Drain {
    /// Announces, stops accepting and finishes the requests in flight, stops
    /// the retention job, then closes the database.
    async fn run(self, signal: &str) -> Result<(), app::AppError> {
        let Drain {
            mut server,
            stop,
            readiness,
            retention,
            db,
            timeout,
        } = self;
        // The budget: announce, stop accepting and finish the requests in flight,
        // then close the database, which may overrun its deadline by CLOSE_GRACE.
        let started = tokio::time::Instant::now();
        let end =
            started + timeout.saturating_sub(railyard::database::CLOSE_GRACE.min(timeout / 2));
        readiness.drain();
        out!(
            "{signal}: /readyz answers 503; draining, exit within {}",
            humantime::format_duration(timeout)
        );
        let announce = (timeout / 5).min(Duration::from_secs(2));
        tokio::select! {
            ended = &mut server => return http_ended(ended),
            () = tokio::time::sleep(announce) => {}
        }
        let _ = stop.send(());
        match tokio::time::timeout_at(end, &mut server).await {
            Ok(ended) => http_ended(ended)?,
            Err(_) => {
                server.abort();
                out!("HTTP requests still in flight at the deadline were dropped");
            }
        }
        out!("HTTP server stopped after {:.2?}", started.elapsed());
        if let Some(job) = retention {
            job.shutdown(end.saturating_duration_since(tokio::time::Instant::now()) / 2)
                .await;
        }
        let report = db
            .close(end.saturating_duration_since(tokio::time::Instant::now()))
            .await;
        out!("database closed: {report}");
        out!("stopped in {:.2?}", started.elapsed());
        Ok(())
    }
}

/// How the HTTP server's task ended.
fn http_ended(
    ended: Result<std::io::Result<()>, tokio::task::JoinError>,
) -> Result<(), app::AppError> {
    let io = |source| app::AppError::Io {
        context: "HTTP server".into(),
        source,
    };
    match ended {
        Ok(r) => r.map_err(io),
        Err(e) => Err(io(std::io::Error::other(e.to_string()))),
    }
}
