//! # railyard-http
//!
//! HTTP endpoints for operators of a [`railyard`] database (axum): `/healthz` (the process is
//! alive), `/readyz` (the primary answers and migrations are current, and the
//! process is not shutting down), `/health` (the full report as JSON) and
//! `/metrics` (Prometheus text format); with [`router_with_dashboard`], a
//! live dashboard at `/` (one self-contained page, no external resources)
//! fed by `/dashboard/data`.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use railyard::database::Database;
use railyard::observe::{self as health, HealthReport, HealthStatus};
use railyard_ops::watch::Watcher;

mod alerts;
mod dashboard;
mod guard;

pub use alerts::router as alerts_router;
pub use guard::{ControlToken, HOSTS_VAR, MIN_TOKEN_LEN, TOKEN_FILE_VAR};

/// The Host check every router of this crate ends with (see `guard`).
fn host_checked(router: Router) -> Router {
    router.layer(axum::middleware::from_fn_with_state(
        guard::Hosts::from_env(),
        guard::check_host,
    ))
}

/// Whether the process still takes traffic, beside what its database says.
/// A process that is stopping calls [`Readiness::drain`] first: `/readyz`
/// answers 503 from then on (so load balancers stop sending traffic) while
/// the requests in flight are still served. Clones share the state.
///
/// ```no_run
/// # async fn demo(db: railyard::Database, stop: tokio::sync::oneshot::Receiver<()>) -> std::io::Result<()> {
/// use std::time::Duration;
/// use railyard_http::Readiness;
/// let readiness = Readiness::new();
/// let app = railyard_http::router_with(db.clone(), readiness.clone());
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:9187").await?;
/// let stopping = async move {
///     let _ = stop.await; // say, on SIGTERM
///     readiness.drain();
///     // Load balancers see the 503 before the listener goes away.
///     tokio::time::sleep(Duration::from_secs(1)).await;
/// };
/// axum::serve(listener, app).with_graceful_shutdown(stopping).await?;
/// db.close(Duration::from_secs(10)).await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Ready (until [`Readiness::drain`]).
    pub fn new() -> Self {
        Readiness::default()
    }

    /// From now on, `/readyz` answers 503 and `/health` says the process is
    /// shutting down.
    pub fn drain(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether [`Readiness::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct App {
    db: Database,
    readiness: Readiness,
}

/// The router; serve it with `axum::serve`.
///
/// ```no_run
/// # async fn demo(db: railyard::Database) -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:9187").await?;
/// axum::serve(listener, railyard_http::router(db)).await
/// # }
/// ```
pub fn router(db: Database) -> Router {
    router_with(db, Readiness::new())
}

/// The router, with `/readyz` and `/health` also following `readiness`
/// (see [`Readiness`]).
pub fn router_with(db: Database, readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(App { db, readiness })
        .pipe(host_checked)
}

/// `router.pipe(f)` for `f(router)`, to end a builder chain.
trait Pipe: Sized {
    fn pipe(self, f: impl FnOnce(Self) -> Self) -> Self {
        f(self)
    }
}
impl Pipe for Router {}

/// The router of [`router_with`], plus the live dashboard: `GET /` (one HTML
/// page with its CSS and JS inline, nothing fetched from elsewhere, which
/// polls every second) and `GET /dashboard/data` (JSON: the latest sample,
/// the history as arrays per series, `?since=AT_MS` for only the samples
/// after `AT_MS`, top statements, captured plans and plan changes; every
/// part bounded). `extra` is merged in as is: the page polls `GET /alerts`
/// and posts to `/alerts/silences` and `/alerts/ack`, which an alerting
/// module supplies this way (without it the page says alerting is not
/// configured). `extra` must not define the routes above (axum panics on
/// overlapping routes).
///
/// Register the same [`StatementStats`](railyard::observe::StatementStats) as a
/// hook on the database and in the watcher's options for top statements;
/// plans appear when plan capture is on.
///
/// ```no_run
/// # async fn demo(config: railyard::Config) -> Result<(), Box<dyn std::error::Error>> {
/// use railyard_ops::watch::{WatchOptions, Watcher};
/// let stats = railyard::StatementStats::new();
/// let db = railyard::Database::builder(config).hook(stats.clone()).connect().await?;
/// let watcher = Watcher::spawn(
///     db.clone(),
///     WatchOptions::default().statements(stats),
/// );
/// let app = railyard_http::router_with_dashboard(
///     db,
///     railyard_http::Readiness::new(),
///     watcher,
///     None,
/// );
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:9187").await?;
/// axum::serve(listener, app).await?; // open http://127.0.0.1:9187/
/// # Ok(()) }
/// ```
pub fn router_with_dashboard(
    db: Database,
    readiness: Readiness,
    watcher: Watcher,
    extra: Option<Router>,
) -> Router {
    let app =
        router_with(db.clone(), readiness).merge(host_checked(dashboard::routes(db, watcher)));
    match extra {
        Some(extra) => app.merge(host_checked(extra)),
        None => app,
    }
}

fn json(status: StatusCode, body: String) -> impl IntoResponse {
    (status, [(header::CONTENT_TYPE, "application/json")], body)
}

fn answer(report: &HealthReport) -> impl IntoResponse + use<> {
    let code = if report.status == HealthStatus::Unhealthy {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    json(code, report.to_json())
}

async fn readyz(State(app): State<App>) -> impl IntoResponse {
    if app.readiness.is_draining() {
        // Answered at once: a stopping process asks its database nothing.
        return answer(&HealthReport::of(vec![health::shutting_down()]));
    }
    answer(&app.db.readiness().await)
}

async fn health(State(app): State<App>) -> impl IntoResponse {
    let mut report = app.db.health().await;
    if app.readiness.is_draining() {
        let mut checks = std::mem::take(&mut report.checks);
        checks.push(health::shutting_down());
        report = HealthReport::of(checks);
    }
    answer(&report)
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    // Refreshes the size figures when their cache is stale (at most once per
    // SIZES_PROBE_TTL, bounded).
    let _ = app.db.storage_figures().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.db.metrics_text(),
    )
}
