//! An axum service on Railyard: reads on replicas with read-your-writes for
//! the session that wrote, writes in retried transactions, constraint
//! violations as 409, overload as 503, and `/healthz`, `/readyz`, `/metrics`
//! from `railyard-http`, drained on Ctrl-C before the pools close.
//!
//! `cargo run --example inventory` (with no `DATABASE_URL`, on the local
//! cluster), then:
//! `curl -XPOST localhost:3000/items -d '{"sku":"a-1","quantity":3}' -H 'content-type: application/json'`.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Integer, Text};
use diesel_async::RunQueryDsl;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use railyard::{Config, Database, ErrorClass, Migrator};
use serde::{Deserialize, Serialize};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("examples/migrations");

#[derive(Debug, Serialize, QueryableByName)]
struct Item {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Text)]
    sku: String,
    #[diesel(sql_type = Integer)]
    quantity: i32,
}

#[derive(Debug, Deserialize)]
struct NewItem {
    sku: String,
    quantity: i32,
}

/// What a handler fails with: Railyard's error, shown as the status a
/// client can act on.
struct ApiError(railyard::Error);

impl From<railyard::Error> for ApiError {
    fn from(e: railyard::Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = if self.0.violation().is_some() {
            StatusCode::CONFLICT
        } else {
            match self.0.class() {
                ErrorClass::Overloaded | ErrorClass::Timeout => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            }
        };
        if status == StatusCode::CONFLICT {
            // The client's own mistake: say which constraint it broke.
            let constraint = self.0.violation().and_then(|v| v.constraint);
            return (status, constraint.unwrap_or_default()).into_response();
        }
        // The rest is ours to read: hosts and SQLSTATEs stay in the log.
        eprintln!("request failed: {}", self.0);
        (status, "the database could not answer; try again").into_response()
    }
}

async fn create(
    State(db): State<Database>,
    Json(new): Json<NewItem>,
) -> Result<Json<Item>, ApiError> {
    let item = db
        .transaction(async |conn| {
            let item = diesel::sql_query(
                "INSERT INTO items (sku, quantity) VALUES ($1, $2) RETURNING id, sku, quantity",
            )
            .bind::<Text, _>(&new.sku)
            .bind::<Integer, _>(new.quantity)
            .get_result::<Item>(conn)
            .await?;
            Ok::<_, railyard::Error>(item)
        })
        .await?;
    Ok(Json(item))
}

async fn fetch(State(db): State<Database>, Path(id): Path<i64>) -> Result<Response, ApiError> {
    let found = db
        .read(async |conn| {
            let rows = diesel::sql_query("SELECT id, sku, quantity FROM items WHERE id = $1")
                .bind::<BigInt, _>(id)
                .load::<Item>(conn)
                .await?;
            Ok::<_, railyard::Error>(rows.into_iter().next())
        })
        .await?;
    Ok(match found {
        Some(item) => Json(item).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // No DATABASE_URL in development: the local cluster stands in.
    let config = railyard_local::resolve(Config::from_env()?).await?;
    let db = Database::builder(config)
        .migrations(Migrator::new(MIGRATIONS))
        .connect()
        .await?;
    let readiness = railyard_http::Readiness::new();
    let app = Router::new()
        .route("/items", post(create))
        .route("/items/{id}", get(fetch))
        .with_state(db.clone())
        .merge(railyard_http::router_with(db.clone(), readiness.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://127.0.0.1:3000");
    let stopping = async move {
        let _ = tokio::signal::ctrl_c().await;
        readiness.drain();
        // Load balancers see /readyz answer 503 before the listener closes.
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(stopping)
        .await?;
    let report = db.close(Duration::from_secs(10)).await;
    println!("closed: {report:?}");
    Ok(())
}
