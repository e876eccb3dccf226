//! # Railyard
//!
//! A production data layer for applications built on **Diesel + PostgreSQL**,
//! and a test harness that runs against real PostgreSQL.
//!
//! One call takes an application from `main()` to a database handle: typed
//! configuration from a URL or the environment (secrets never printed), a bb8
//! pool of diesel-async connections (over rustls TLS with the `tls` feature),
//! and embedded migrations run at boot under an advisory lock with checksums.
//!
//! ```no_run
//! use diesel_async::RunQueryDsl;
//! use diesel_migrations::{embed_migrations, EmbeddedMigrations};
//!
//! # const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations");
//! # /*
//! const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");
//! # */
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
//! | plans of slow statements, plan changes, N+1 warnings, a long-query watchdog | [`DatabaseBuilder::capture_plans`], [`DatabaseBuilder::on_plan_change`], [`DatabaseBuilder::detect_repeats`], [`DatabaseBuilder::watchdog`] |
//! | to refuse a burst rather than queue it | per-pool queue bounds: [`Config::pool_max_waiters`], [`Config::pool_max_wait`]; [`Error::Overloaded`] |
//! | to stop without losing work in flight | [`Database::close`] ([`database::CloseReport`]) |
//! | product state shown by health and metrics | [`database::Attachment`], [`Database::attachment`] |
//!
//! Every closure-taking API takes a [`ConnWork`]: an `async |conn| …` closure
//! whose parameter needs no annotation.
//!
//! ## The other crates
//!
//! This crate has no cargo features: what not every application needs is a
//! crate of its own, built on this one.
//!
//! | crate | what it adds |
//! |---|---|
//! | `railyard-test` | `#[railyard_test::test]`: rollback-isolated tests against real PostgreSQL (a dev-dependency) |
//! | `railyard-local` | a private primary + streaming replica, PgBouncer and pg_auto_failover on this machine |
//! | `railyard-events` | LISTEN/NOTIFY with gap markers, change streams with resume tokens |
//! | `railyard-ops` | the live view, alerts, index advice, pgBackRest backups, retention |
//! | `railyard-http` | `/healthz`, `/readyz`, `/health`, `/metrics`, the dashboard and alert routes (axum) |
//! | `railyard-cli` | the `railyard` command and the reference trading application |

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

// The layers, lowest first. A module may use only the modules above it in this
// list (tests/layers.rs checks it): error, config, conn, exec, route, migrate,
// observe, database.
pub mod config;
pub mod conn;
pub mod database;
pub mod error;
pub mod exec;
pub mod migrate;
pub mod observe;
pub mod route;

pub use config::{Config, Credentials, Secret, SslMode};
pub use conn::{Conn, PooledConn, Route};
pub use database::{Database, DatabaseBuilder, Session, TransactionBuilder, WriteBuilder};
pub use error::{Error, ErrorClass};
pub use exec::{ConnWork, IsolationLevel, RetryBudget, RetryPolicy};
pub use migrate::Migrator;
pub use observe::{AuditLog, QueryEvent, QueryHook, QuerySpans, SlowQueryLog, StatementStats};
pub use observe::{HealthReport, HealthStatus};
pub use route::{CausalToken, RoutingConfig};
