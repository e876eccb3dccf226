//! # railyard-test
//!
//! The rollback-isolated test harness for applications on [`railyard`]:
//! `#[railyard_test::test]`, query-count assertions and proptest cases in
//! savepoints.
//!
//! ```no_run
//! # mod doc {
//! use diesel_async::RunQueryDsl;
//!
//! #[railyard_test::test]
//! async fn signs_up_a_user(db: railyard::Database) {
//!     db.write(async |conn| {
//!         diesel::sql_query("INSERT INTO users (email, name) VALUES ('a@example.test', 'A')")
//!             .execute(conn)
//!             .await
//!             .map_err(railyard::Error::from)
//!     })
//!     .await
//!     .unwrap();
//!     // … assertions; everything is rolled back when the test ends.
//! }
//! # }
//! ```
//!
//! How it works:
//!
//! - The first test of a run joins the local cluster (or `TEST_DATABASE_URL`,
//!   a superuser URL), and under an advisory lock (safe across concurrent test
//!   processes, `cargo test` and nextest alike) makes a template database with the
//!   migrations applied, named by their checksums, and a shared test database
//!   cloned from it. Later runs reuse both while the migrations are unchanged.
//! - Each test gets one connection to the shared test database, inside `BEGIN`,
//!   and a normal [`Database`] whose every route (primary and replicas) uses that
//!   connection. Tests run in parallel, one connection each.
//! - Inside the test, `db.transaction` and `db.write` become savepoints (rolled
//!   back *and released* on error, never retried); isolation level, `READ ONLY`
//!   and `DEFERRABLE` cannot change inside a transaction and are not applied; a
//!   statement timeout is applied with `SET LOCAL` and lasts until the test ends.
//!   Tasks the test spawns share the connection (one operation at a time).
//! - At the end, deferred constraints are checked (`SET CONSTRAINTS ALL
//!   IMMEDIATE`), then everything is rolled back, also when the test panics. Code
//!   under test that commits or rolls back the test's transaction gets
//!   [`Error::TestIsolation`] and fails the test.
//! - `isolation = "database"` gives a fresh database cloned from the template,
//!   for tests that must commit; it is dropped after success and kept (its name
//!   printed) after a failure.
//! - `stale_replica` sends replica reads without a causal token to a second
//!   connection that cannot see the test's uncommitted writes, so code that reads
//!   its own writes without a [`Session`](railyard::Session) fails here rather than in
//!   production.
//! - [`proptest_cases`] runs each proptest case in its own savepoint.
//! - Tests that meet on the same rows do not fail each other. Each test's
//!   `application_name` is its name and its `lock_timeout` is its lock bound
//!   (`#[railyard_test::test(lock_timeout = "30s")]`, else
//!   `RAILYARD_TEST_LOCK_TIMEOUT`, else [`DEFAULT_LOCK_TIMEOUT`], 10 s). A `db.transaction`,
//!   `db.write`, `db.read` or `db.with_primary` that fails with 40P01
//!   (deadlock), 40001 or 55P03 (`NOWAIT` or the lock timeout) is rolled back
//!   to its savepoint, which releases the locks it took, and run again after a
//!   short pause; it then waits until the other test ends. When the bound
//!   passes it fails with [`Error::Blocked`], which names the test that held
//!   the lock (a watchdog asks `pg_blocking_pids` while a request waits). Two
//!   tests that insert the same two keys in opposite orders both pass.
//!   Statements run directly on `db.primary()` are not in a savepoint and are
//!   not retried; when such a test fails, the harness still prints who held
//!   the lock it waited for.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use diesel_async::{AnsiTransactionManager, SimpleAsyncConnection, TransactionManager};
use futures_util::FutureExt;

use railyard::config::{Config, ConnectTarget, TargetSessionAttrs};
use railyard::conn::Conn;
use railyard::conn::open::Opener;
use railyard::conn::wire::TxStatus;
use railyard::database::Database;
use railyard::error::{ConfigError, Error};
use railyard::exec::contention::{Blockers, Contention};
use railyard::migrate::Migrator;
use railyard_local::LocalCluster;

mod counting;
mod locks;
mod pinned;
mod server;

pub use counting::{assert_max_queries, count_queries};
use locks::*;
use server::*;

#[doc(hidden)]
pub use diesel_migrations as __diesel_migrations;
pub use railyard_macros::test;

// The attribute's plumbing: what `#[railyard_test::test]` expands to,
// public only so that the expansion can name it.
#[doc(hidden)]
/// How a test is isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// One transaction, rolled back at the end (the default).
    Transaction,
    /// A fresh database cloned from the migrated template.
    Database,
}

// The attribute's plumbing: what `#[railyard_test::test]` expands to,
// public only so that the expansion can name it.
#[doc(hidden)]
/// What `#[railyard_test::test]` passes to [`run`].
#[derive(Debug, Clone, Copy)]
pub struct TestOptions {
    /// The test's full name, for messages and database names.
    pub name: &'static str,
    /// Transaction or database isolation.
    pub isolation: Isolation,
    /// Untokened replica reads see only committed data.
    pub stale_replica: bool,
    /// The migrations the test database needs.
    pub migrations: fn() -> Migrator,
    /// How long the test's work may be held up by other tests' locks before
    /// it fails naming them (`None`: `RAILYARD_TEST_LOCK_TIMEOUT`, else
    /// [`DEFAULT_LOCK_TIMEOUT`]).
    pub lock_timeout: Option<Duration>,
}

/// How long a test's work may be held up by other tests' locks, unless the
/// test (`lock_timeout = "…"`) or `RAILYARD_TEST_LOCK_TIMEOUT` says otherwise.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// The test's lock bound: its own, else the environment's, else the default.
fn lock_bound(options: &TestOptions, env: Option<String>) -> Result<Duration, String> {
    if let Some(d) = options.lock_timeout {
        return Ok(d);
    }
    match env {
        None => Ok(DEFAULT_LOCK_TIMEOUT),
        Some(v) => humantime::parse_duration(v.trim())
            .ok()
            .filter(|d| !d.is_zero() && d.as_millis() <= i32::MAX as u128)
            .ok_or_else(|| {
                format!(
                    "RAILYARD_TEST_LOCK_TIMEOUT={v:?} is not a duration between 1ms and 24 days; write it like \"10s\" or \"1500ms\""
                )
            }),
    }
}

// The attribute's plumbing: what `#[railyard_test::test]` expands to,
// public only so that the expansion can name it.
#[doc(hidden)]
/// What a test body may return: nothing, or a `Result` whose error fails the test.
pub trait TestOutcome {
    /// `Err` with a message when the test failed.
    fn into_result(self) -> Result<(), String>;
}

impl TestOutcome for () {
    fn into_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: std::fmt::Debug> TestOutcome for Result<(), E> {
    fn into_result(self) -> Result<(), String> {
        self.map_err(|e| format!("{e:?}"))
    }
}

#[doc(hidden)]
/// Runs one test: what `#[railyard_test::test]` expands to.
///
/// # Panics
///
/// When the test fails (panics or returns an error), when isolation was broken,
/// or when the harness cannot reach a server (the message says what to install
/// or set).
pub fn run<F, Fut>(options: TestOptions, test: F)
where
    F: FnOnce(Database) -> Fut,
    Fut: Future,
    Fut::Output: TestOutcome,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime for the test");
    let outcome = rt.block_on(async move {
        let prepared = match prepare(options.migrations).await {
            Ok(p) => p,
            Err(e) => {
                return Err(format!(
                    "the test harness could not prepare a database: {e}"
                ));
            }
        };
        match options.isolation {
            Isolation::Transaction => in_transaction(&prepared, options, test).await,
            Isolation::Database => in_database(&prepared, options, test).await,
        }
    });
    drop(rt);
    if let Err(message) = outcome {
        panic!("{}: {message}", options.name);
    }
}

// Long by design: the test's transaction from `BEGIN` to the rollback; each step's failure is the test's.
async fn in_transaction<F, Fut>(
    prepared: &Prepared,
    options: TestOptions,
    test: F,
) -> Result<(), String>
where
    F: FnOnce(Database) -> Fut,
    Fut: Future,
    Fut::Output: TestOutcome,
{
    let bound = lock_bound(&options, std::env::var("RAILYARD_TEST_LOCK_TIMEOUT").ok())?;
    let target = prepared.admin.with_dbname(&prepared.shared);
    let mut conn = checkout(&target).await.map_err(|e| e.to_string())?;
    AnsiTransactionManager::begin_transaction(conn.pg())
        .await
        .map_err(|e| format!("BEGIN failed: {e}"))?;
    conn.batch_execute(&contention_settings(options.name, bound))
        .await
        .map_err(|e| format!("setting the test's application_name and lock_timeout failed: {e}"))?;
    let stale = if options.stale_replica {
        Some(checkout(&target).await.map_err(|e| e.to_string())?)
    } else {
        None
    };
    let contention = Arc::new(Contention::new(bound));
    let seen = Arc::new(Blockers::default());
    let watchdog = tokio::spawn(watch_locks(
        prepared.admin.clone(),
        conn.info().backend_pid,
        conn.wire_arc(),
        contention.clone(),
        seen.clone(),
    ));
    let db = pinned::Pinned::database(
        Config::new(target.clone()),
        conn,
        stale,
        contention,
        (options.migrations)(),
    );
    let result = AssertUnwindSafe(test(db.clone())).catch_unwind().await;
    watchdog.abort();
    let blocked_note = seen
        .last()
        .map(|who| format!("while it ran, it waited for locks held by {who}"));
    // Whatever happened, end the transaction: deferred constraints first.
    let mut conn = db.primary().await.map_err(|e| e.to_string())?;
    conn.wire().quiesce(Duration::from_millis(200)).await;
    let still_open = conn.wire().tx_status() != TxStatus::Idle;
    let deferred = if still_open && conn.wire().tx_status() != TxStatus::Failed {
        conn.batch_execute("SET CONSTRAINTS ALL IMMEDIATE")
            .await
            .err()
    } else {
        None
    };
    if still_open {
        AnsiTransactionManager::rollback_transaction(conn.pg())
            .await
            .map_err(|e| format!("ROLLBACK failed: {e}"))?;
    }
    drop(conn);
    let (conn, stale) = match pinned::Pinned::of(&db) {
        Some(p) => p.take_back().await,
        None => (None, None),
    };
    for conn in conn.into_iter().chain(stale) {
        checkin(&target, conn);
    }
    match result {
        Err(panic) => {
            if let Some(note) = &blocked_note {
                eprintln!("{}: {note}", options.name);
            }
            std::panic::resume_unwind(panic)
        }
        Ok(out) => out.into_result().map_err(|message| match &blocked_note {
            Some(note) => format!("{message} ({note})"),
            None => message,
        })?,
    }
    if !still_open {
        return Err(Error::TestIsolation(
            "the code under test ended the test's transaction (COMMIT or ROLLBACK); what it wrote may have been committed".into(),
        )
        .to_string());
    }
    if let Some(e) = deferred {
        return Err(format!(
            "a deferred constraint does not hold at the end of the test (it would fail at COMMIT): {e}"
        ));
    }
    Ok(())
}

async fn in_database<F, Fut>(
    prepared: &Prepared,
    options: TestOptions,
    test: F,
) -> Result<(), String>
where
    F: FnOnce(Database) -> Fut,
    Fut: Future,
    Fut::Output: TestOutcome,
{
    let short: String = options
        .name
        .rsplit("::")
        .next()
        .unwrap_or("test")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(30)
        .collect();
    let name = format!("rt_{short}_{:08x}", rand::random::<u32>());
    let mut admin = connect(prepared.admin.clone())
        .await
        .map_err(|e| e.to_string())?;
    with_harness_lock(&mut admin, async |admin| {
        release_template(admin, &prepared.template).await?;
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {} TEMPLATE {}",
                quote_ident(&name),
                quote_ident(&prepared.template),
            ))
            .await?;
        // A killed run's database is dropped by a later run.
        admin
            .batch_execute(&format!(
                "COMMENT ON DATABASE {} IS '{}'",
                quote_ident(&name),
                railyard_local::scratch::scratch_comment(),
            ))
            .await
            .map_err(Error::from)
    })
    .await
    .map_err(|e| e.to_string())?;
    let mut config = Config::new(prepared.admin.with_dbname(&name));
    if std::env::var_os("TEST_DATABASE_URL").is_none()
        && let Ok(cluster) = LocalCluster::shared().await
        && let Some(r) = cluster.replica_socket_target(&name)
    {
        config = config.replica(r);
    }
    let db = Database::builder(config)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let result = AssertUnwindSafe(test(db.clone())).catch_unwind().await;
    drop(db);
    let failed = result.is_err();
    let outcome = match result {
        Err(panic) => {
            eprintln!("{}: kept database {name} for inspection", options.name);
            std::panic::resume_unwind(panic)
        }
        Ok(out) => out.into_result(),
    };
    if outcome.is_err() || failed {
        eprintln!("{}: kept database {name} for inspection", options.name);
    } else {
        let _ = admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(&name)
            ))
            .await;
    }
    outcome
}

/// Runs a proptest inside a harness test: each case runs in its own savepoint
/// of the test's transaction, rolled back after the case (shrinking included),
/// so fixtures made before the call are shared and cases never see each other's
/// rows. Needs the harness's multi-threaded runtime (as `#[railyard_test::test]`
/// gives).
///
/// ```no_run
/// use proptest::prelude::*;
/// # async fn demo(db: railyard::Database) {
/// railyard_test::proptest_cases(&db, ProptestConfig::with_cases(64), 0..100i64, async |db, n| {
///     // … use db; return Err(TestCaseError::fail("…")) to fail the case …
///     Ok(())
/// })
/// .await
/// .unwrap();
/// # }
/// ```
pub async fn proptest_cases<S, F>(
    db: &Database,
    config: proptest::test_runner::Config,
    strategy: S,
    case: F,
) -> Result<(), proptest::test_runner::TestError<S::Value>>
where
    S: proptest::strategy::Strategy,
    F: AsyncFn(Database, S::Value) -> Result<(), proptest::test_runner::TestCaseError>,
{
    use proptest::test_runner::{TestCaseError, TestRunner};
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        let mut runner = TestRunner::new(config);
        runner.run(&strategy, |value| {
            handle.block_on(async {
                let begin = {
                    let mut conn = db.primary().await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    AnsiTransactionManager::begin_transaction(conn.pg())
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    conn.transaction_depth()
                };
                let result = AssertUnwindSafe(case(db.clone(), value)).catch_unwind().await;
                let mut conn = db.primary().await.map_err(|e| TestCaseError::fail(e.to_string()))?;
                if conn.transaction_depth() != begin {
                    return Err(TestCaseError::fail(
                        "the case left a transaction open (a connection from `db.primary()` kept past the case?)",
                    ));
                }
                conn.rollback_and_release()
                    .await
                    .map_err(|e| TestCaseError::fail(format!("rolling back the case: {e}")))?;
                match result {
                    Ok(r) => r,
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(lock_timeout: Option<Duration>) -> TestOptions {
        TestOptions {
            name: "unit",
            isolation: Isolation::Transaction,
            stale_replica: false,
            migrations: || unreachable!("not prepared in unit tests"),
            lock_timeout,
        }
    }

    #[::core::prelude::v1::test]
    fn the_lock_bound_comes_from_the_test_then_the_environment_then_the_default() {
        let own = Some(Duration::from_secs(3));
        assert_eq!(
            lock_bound(&options(own), Some("1s".into())),
            Ok(Duration::from_secs(3))
        );
        assert_eq!(
            lock_bound(&options(None), Some(" 1500ms ".into())),
            Ok(Duration::from_millis(1500))
        );
        assert_eq!(lock_bound(&options(None), None), Ok(DEFAULT_LOCK_TIMEOUT));
        for bad in ["", "0s", "ten", "-1s", "100days"] {
            let e = lock_bound(&options(None), Some(bad.into())).unwrap_err();
            assert!(e.contains("RAILYARD_TEST_LOCK_TIMEOUT"), "{e}");
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[::core::prelude::v1::test]
    fn the_settings_name_the_test_and_bound_its_waits() {
        let sql = contention_settings("it::harness::o'brien", Duration::from_millis(1500));
        assert!(
            sql.contains("application_name = 'it::harness::o''brien'"),
            "{sql}"
        );
        assert!(sql.contains("lock_timeout = 1500"), "{sql}");
        let long = format!("{}::the_test_itself", "m".repeat(80));
        let sql = contention_settings(&long, Duration::from_secs(1));
        let app = sql.split('\'').nth(1).unwrap();
        assert!(app.len() <= 63 && app.ends_with("the_test_itself"), "{app}");
    }
}
