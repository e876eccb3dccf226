//! # Railyard
//!
//! A production data layer for applications built on **Diesel + PostgreSQL**, and
//! a test harness that runs against real PostgreSQL.
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
//!     let mut conn = db.primary().await?;
//!     diesel::sql_query("SELECT 1").execute(&mut **conn).await?;
//!     Ok(())
//! }
//! ```
//!
//! | item | what it gives |
//! |---|---|
//! | [`Config`] | typed configuration: URL (several hosts), replicas, pools, TLS, timeouts |
//! | [`tls_client_config`] | rustls from `sslmode`/`sslrootcert`, libpq's meanings |
//! | [`Database`] | the handle: pools of [`Conn`]s; `transaction`, `write`, `read`, `health` |
//! | [`Session`], [`CausalToken`] | read-your-writes on replicas by WAL position |
//! | [`ErrorClass`], [`RetryPolicy`], [`RetryBudget`] | one classification, safe retries |
//! | [`Migrator`] | boot-time migrations: lock, checksums, status, verify, revert |
//! | [`QueryHook`], [`StatementStats`], [`SlowQueryLog`], [`QuerySpans`], [`AuditLog`] | per-query timing |
//! | [`LocalCluster`] | a private primary + streaming replica from the machine's PostgreSQL |
//! | [`WireState`] | what the protocol tap observed on a connection |
//!
//! | feature | what it adds |
//! |---|---|
//! | `testing` | `#[railyard::test]` and [`testing`](crate#features): rollback-isolated tests |
//! | `http` | `http::router`: `/healthz`, `/readyz`, `/health`, `/metrics` (axum) |
//! | `cli` | the reference application and CLI (`src/main.rs`) |

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod config;
mod database;
mod error;
mod health;
#[cfg(feature = "http")]
pub mod http;
mod local;
mod migrate;
mod observe;
mod pool;
mod retry;
mod route;
#[cfg(feature = "testing")]
pub mod testing;
mod tls;
mod tx;
mod wire;

pub use config::{
    Config, ConnectTarget, Credentials, Host, PoolConfig, Secret, SslMode, TargetSessionAttrs,
    parse_duration,
};
pub use database::{ConnFn, Database, DatabaseBuilder, PoolStatus, PooledConn, ReplicaReport};
pub use error::{
    ConfigError, ConnectError, ConnectStage, DbError, Error, MigrationError, Violation,
    ViolationKind,
};
pub use health::{HealthCheck, HealthReport, HealthStatus};
pub use local::{
    Binaries, LocalCluster, LocalClusterBuilder, StartKind, default_cluster_dir, stop_dir,
};
pub use migrate::{
    AppliedMigration, ChecksumState, MigrationReport, MigrationState, MigrationStatus, Migrator,
};
pub use observe::{
    AuditLog, DURATION_BUCKETS, Outcome, QueryEvent, QueryHook, QuerySpans, SlowQueryLog,
    StatementStat, StatementStats, sanitize_sql,
};
pub use pool::{CancelHandle, Conn, ConnInfo, ServerRole};
#[cfg(feature = "testing")]
pub use railyard_macros::test;
pub use retry::{ErrorClass, Phase, RetryBudget, RetryPolicy, classify, retryable};
pub use route::{
    CausalToken, Fallback, Lsn, ReplicaChoice, ReplicaHealth, ReplicaStatus, Route, RoutingConfig,
    Session, Staleness,
};
pub use tls::tls_client_config;
pub use tx::{IsolationLevel, TransactionBuilder, WriteBuilder};
pub use wire::{ServerError, Socket, Tapped, TxStatus, WireMark, WireState};
