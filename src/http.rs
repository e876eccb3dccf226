//! HTTP endpoints for operators (feature `http`): `/healthz` (the process is
//! alive), `/readyz` (the primary answers and migrations are current), `/health`
//! (the full report as JSON) and `/metrics` (Prometheus text format).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::database::Database;
use crate::observe::health::HealthStatus;

/// The router; serve it with `axum::serve`.
///
/// ```no_run
/// # async fn demo(db: railyard::Database) -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:9187").await?;
/// axum::serve(listener, railyard::http::router(db)).await
/// # }
/// ```
pub fn router(db: Database) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(db)
}

fn json(status: StatusCode, body: String) -> impl IntoResponse {
    (status, [(header::CONTENT_TYPE, "application/json")], body)
}

async fn readyz(State(db): State<Database>) -> impl IntoResponse {
    let report = db.readiness().await;
    let code = if report.status == HealthStatus::Unhealthy {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    json(code, report.to_json())
}

async fn health(State(db): State<Database>) -> impl IntoResponse {
    let report = db.health().await;
    let code = if report.status == HealthStatus::Unhealthy {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    json(code, report.to_json())
}

async fn metrics(State(db): State<Database>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        db.metrics_text(),
    )
}
