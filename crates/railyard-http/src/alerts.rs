//! `/alerts` over HTTP: the view, silences and acknowledgements.

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use serde::Deserialize;

use railyard_ops::alert::{Alerts, Labels};

use crate::ControlToken;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SilenceRequest {
    matchers: Labels,
    for_s: u64,
    #[serde(default)]
    comment: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckRequest {
    #[serde(default)]
    rule: Option<String>,
    #[serde(default)]
    labels: Labels,
}

/// The alerting's routes, to merge into an application's router:
/// `GET /alerts` (the [`AlertsView`](railyard_ops::alert::AlertsView) as JSON),
/// and the controls, which need `Authorization: Bearer <token>` (401
/// without it; 403 when `token` is `None`): `POST /alerts/silences`
/// (`{"matchers": {"rule": "replica_lag"}, "for_s": 3600, "comment": "…"}` →
/// `{"id": "s1"}`), `DELETE /alerts/silences/{id}`, and `POST /alerts/ack`
/// (`{"rule": "replica_lag", "labels": {…}}` → `{"acknowledged": n}`).
/// Every route answers only to the host names the crate allows (421
/// otherwise; see [`HOSTS_VAR`](crate::HOSTS_VAR)).
///
/// ```no_run
/// # fn demo(db: railyard::Database, alerts: railyard_ops::alert::Alerts) -> Result<(), railyard::error::ConfigError> {
/// let token = railyard_http::ControlToken::from_env()?; // RAILYARD_HTTP_TOKEN_FILE
/// let app = railyard_http::router(db).merge(railyard_http::alerts_router(alerts, token));
/// # Ok(()) }
/// ```
pub fn router(alerts: Alerts, token: Option<ControlToken>) -> Router {
    let controls = Router::new()
        .route("/alerts/silences", post(silence))
        .route("/alerts/silences/{id}", delete(unsilence))
        .route("/alerts/ack", post(ack))
        .route_layer(axum::middleware::from_fn_with_state(
            token,
            crate::guard::require_token,
        ));
    crate::host_checked(
        Router::new()
            .route("/alerts", get(view))
            .merge(controls)
            .with_state(alerts)
            // A silence or an acknowledgement is a few hundred bytes.
            .layer(axum::extract::DefaultBodyLimit::max(16 * 1024)),
    )
}

async fn view(State(a): State<Alerts>) -> impl IntoResponse {
    Json(a.view())
}

async fn silence(State(a): State<Alerts>, Json(r): Json<SilenceRequest>) -> impl IntoResponse {
    match a.silence(r.matchers, Duration::from_secs(r.for_s), &r.comment) {
        Ok(id) => (StatusCode::CREATED, Json(serde_json::json!({ "id": id }))).into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": e.to_string() })),
        )
            .into_response(),
    }
}

async fn unsilence(State(a): State<Alerts>, Path(id): Path<String>) -> impl IntoResponse {
    if a.unsilence(&id) {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}

async fn ack(State(a): State<Alerts>, Json(r): Json<AckRequest>) -> impl IntoResponse {
    let mut labels = r.labels;
    if let Some(rule) = r.rule {
        labels.insert("rule".into(), rule);
    }
    let n = a.acknowledge(&labels);
    Json(serde_json::json!({ "acknowledged": n }))
}
