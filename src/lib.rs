//! # Railyard
//!
//! A production data layer for applications built on **Diesel + PostgreSQL**,
//! and a test harness that runs against real PostgreSQL.
//!
//! One call takes an application from `main()` to a database handle: typed
//! configuration from a URL or the environment (secrets never printed), a bb8
//! pool of diesel-async connections over rustls TLS, and embedded migrations run
//! at boot under an advisory lock with checksums.
//!
//! ```no_run
//! use diesel_async::RunQueryDsl;
//! use diesel_migrations::{embed_migrations, EmbeddedMigrations};
//!
//! const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");
//!
//! #[tokio::main]
//! async fn main() -> Result<(), railyard::Error> {
//!     let db = railyard::Database::builder(railyard::Config::from_env()?)
//!         .migrations(railyard::Migrator::new(MIGRATIONS))
//!         .connect()
//!         .await?;
//!     db.transaction(async |conn| {
//!         diesel::sql_query("UPDATE accounts SET balance_cents = balance_cents - 5 WHERE id = 1")
//!             .execute(conn)
//!             .await?;
//!         Ok::<_, railyard::Error>(())
//!     })
//!     .await?;
//!     Ok(())
//! }
//! ```
//!
//! ## In the order you meet them
//!
//! | you want | you use |
//! |---|---|
//! | settings from `DATABASE_URL` and `RAILYARD_*` | [`Config`] (details in [`config`]) |
//! | a handle, pools, migrations at boot | [`Database::builder`], [`Migrator`] |
//! | a transaction retried when safe | [`Database::transaction`], [`Database::build_transaction`] |
//! | an autocommit write retried only when safe | [`Database::write`], [`Database::build_write`] |
//! | nested blocks that roll back alone | [`Conn::transaction`] (a savepoint, always released) |
//! | reads on replicas | [`Database::read`] |
//! | read-your-writes across requests | [`Session`], [`CausalToken`] (routing knobs in [`route`]) |
//! | to decide what a failure means | [`Error::class`] → [`ErrorClass`]; [`Error::violation`] (details in [`error`]) |
//! | to see every query | [`QueryHook`], [`StatementStats`], [`SlowQueryLog`], [`QuerySpans`], [`AuditLog`] |
//! | health and metrics | [`Database::health`], [`Database::metrics_text`] (types in [`observe`]) |
//! | a live view of the last fifteen minutes | [`watch::Watcher`]; `http::router_with_dashboard` serves it as a page (feature `http`) |
//! | plans of slow statements, plan changes, N+1 warnings, a long-query watchdog | [`DatabaseBuilder::capture_plans`], [`DatabaseBuilder::on_plan_change`], [`DatabaseBuilder::detect_repeats`], [`DatabaseBuilder::watchdog`] |
//! | indexes to create (proved with hypopg), unused and redundant ones | [`advise::Advisor`] |
//! | to refuse a burst rather than queue it | per-pool queue bounds: [`Config::pool_max_waiters`], [`Config::pool_max_wait`]; [`Error::Overloaded`] |
//! | to stop without losing work in flight | [`Database::close`] ([`database::CloseReport`]); `http::Readiness` for `/readyz` |
//! | tests against real PostgreSQL | `#[railyard::test]` (feature `testing`) |
//! | a PostgreSQL primary + replica on this machine | `LocalCluster` (feature `local`) |
//!
//! Every closure-taking API takes a [`ConnWork`]: an `async |conn| …` closure
//! whose parameter needs no annotation.
//!
//! ## Features
//!
//! | feature | what it adds |
//! |---|---|
//! | `local` | `local::LocalCluster`: a private primary + streaming replica from the machine's PostgreSQL binaries (pulls certificate generation) |
//! | `testing` | `#[railyard::test]` and `testing`: rollback-isolated tests (turns on `local`) |
//! | `http` | `http::router`: `/healthz`, `/readyz`, `/health`, `/metrics` (axum); `http::router_with_dashboard`: the live dashboard at `/` |
//! | `cli` | the reference application and CLI (`src/main.rs`; turns on `local` and `http`) |
//!
//! The default build pulls no HTTP server, CLI or certificate-generation crate.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

// The layers, lowest first. A module may use only the modules above it in this
// list (tests/layers.rs checks it): error, config, local, backup, conn, exec, route,
// migrate, observe, database, advise, watch, alert, http, testing.
pub mod advise;
pub mod alert;
pub mod backup;
pub mod config;
pub mod conn;
pub mod database;
pub mod error;
pub mod exec;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "local")]
pub mod local;
pub mod migrate;
pub mod observe;
pub mod retain;
pub mod route;
#[cfg(feature = "testing")]
pub mod testing;
pub mod watch;

pub use config::{Config, Credentials, Secret, SslMode};
pub use conn::{Conn, PooledConn, Route};
pub use database::{Database, DatabaseBuilder, Session, TransactionBuilder, WriteBuilder};
pub use error::{Error, ErrorClass};
pub use exec::retry::{RetryBudget, RetryPolicy};
pub use exec::{ConnWork, IsolationLevel};
#[cfg(feature = "local")]
pub use local::LocalCluster;
pub use migrate::Migrator;
pub use observe::health::{HealthReport, HealthStatus};
pub use observe::{AuditLog, QueryEvent, QueryHook, QuerySpans, SlowQueryLog, StatementStats};
#[cfg(feature = "testing")]
pub use railyard_macros::test;
pub use route::{CausalToken, RoutingConfig};
