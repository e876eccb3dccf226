//! The harness itself: `#[railyard::test]` isolation, parallelism, savepoints,
//! guard rails, property tests, database isolation and stale-replica mode.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use diesel::sql_types::{BigInt, Integer, Text};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use railyard::testing::{Isolation, TestOptions};
use railyard::{Conn, Database, Error};

#[derive(diesel::QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn add_user(conn: &mut Conn, email: &str) -> Result<(), Error> {
    diesel::sql_query("INSERT INTO users (email, name) VALUES ($1, 'h')")
        .bind::<Text, _>(email)
        .execute(conn)
        .await?;
    Ok(())
}

async fn users_like(db: &Database, pattern: &str) -> i64 {
    let pattern = pattern.to_owned();
    db.read(async |c| {
        Ok::<_, Error>(
            diesel::sql_query("SELECT count(*) AS n FROM users WHERE email LIKE $1")
                .bind::<Text, _>(&pattern)
                .get_result::<N>(c)
                .await?
                .n,
        )
    })
    .await
    .unwrap()
}

/// Two tests meet here to run at the same time (each waits up to 5 s for the
/// other, so a serial run still passes).
fn rendezvous(key: usize) {
    static MEET: Mutex<[u32; 1]> = Mutex::new([0]);
    static CV: Condvar = Condvar::new();
    let mut m = MEET.lock().unwrap();
    m[key] += 1;
    CV.notify_all();
    let _ = CV
        .wait_timeout_while(m, Duration::from_secs(5), |m| m[key] < 2)
        .unwrap();
}

#[railyard::test]
async fn the_same_unique_email_in_two_parallel_tests_first(db: Database) {
    tokio::task::block_in_place(|| rendezvous(0));
    db.write(async |c| add_user(c, "same@parallel.test").await)
        .await
        .unwrap();
    assert_eq!(users_like(&db, "same@parallel.test").await, 1);
}

#[railyard::test]
async fn the_same_unique_email_in_two_parallel_tests_second(db: Database) {
    tokio::task::block_in_place(|| rendezvous(0));
    db.write(async |c| add_user(c, "same@parallel.test").await)
        .await
        .unwrap();
    // The other test's row is uncommitted: invisible here, and no conflict.
    assert_eq!(users_like(&db, "same@parallel.test").await, 1);
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    let marker = format!("{}@panic.test", std::process::id());
    let options = TestOptions {
        name: "harness::panicking",
        isolation: Isolation::Transaction,
        stale_replica: false,
        migrations: || railyard::Migrator::new(crate::support::LEDGER),
    };
    let m = marker.clone();
    let outcome = std::panic::catch_unwind(move || {
        railyard::testing::run(options, async move |db: Database| {
            db.write(async |c| add_user(c, &m).await).await.unwrap();
            if !m.is_empty() {
                panic!("deliberate");
            }
        })
    });
    assert!(outcome.is_err(), "the panic reaches the test runner");
    railyard::testing::run(options, async move |db: Database| {
        assert_eq!(
            users_like(&db, &marker).await,
            0,
            "the panicking test's row is gone"
        );
    });
}

/// Application code: a transfer with a nested step rolled back on purpose.
async fn app_flow(db: &Database, tag: &str) -> Result<Vec<String>, Error> {
    db.transaction(async |c| {
        add_user(c, &format!("kept-{tag}@app.test")).await?;
        let nested: Result<(), Error> = c
            .transaction(async |c| {
                add_user(c, &format!("undone-{tag}@app.test")).await?;
                Err(Error::from(diesel::result::Error::RollbackTransaction))
            })
            .await;
        assert!(nested.is_err());
        c.transaction(async |c| add_user(c, &format!("inner-{tag}@app.test")).await)
            .await?;
        Ok::<_, Error>(())
    })
    .await?;
    #[derive(diesel::QueryableByName)]
    struct E {
        #[diesel(sql_type = Text)]
        email: String,
    }
    let like = format!("%-{tag}@app.test");
    let rows: Vec<E> = db
        .read(async |c| {
            Ok::<_, Error>(
                diesel::sql_query("SELECT email FROM users WHERE email LIKE $1 ORDER BY email")
                    .bind::<Text, _>(&like)
                    .load(c)
                    .await?,
            )
        })
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| r.email.replace(tag, "T"))
        .collect())
}

static APP_RESULTS: Mutex<Vec<Vec<String>>> = Mutex::new(Vec::new());

#[railyard::test]
async fn application_transactions_behave_the_same_under_the_harness(db: Database) {
    let under_harness = app_flow(&db, &crate::support::unique("h")).await.unwrap();
    assert_eq!(under_harness, vec!["inner-T@app.test", "kept-T@app.test"]);
    APP_RESULTS.lock().unwrap().push(under_harness);
}

#[railyard::test(isolation = "database")]
async fn application_transactions_behave_the_same_when_they_really_commit(db: Database) {
    let committed = app_flow(&db, &crate::support::unique("d")).await.unwrap();
    assert_eq!(committed, vec!["inner-T@app.test", "kept-T@app.test"]);
    // And it really committed: a second, independent connection sees it.
    let other = Database::connect(db.config().clone()).await.unwrap();
    assert_eq!(users_like(&other, "%@app.test").await, 2);
}

#[railyard::test]
async fn tasks_spawned_by_a_test_share_its_connection(db: Database) {
    let mut tasks = Vec::new();
    for i in 0..8 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            db.write(async |c| add_user(c, &format!("task-{i}@spawn.test")).await)
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(users_like(&db, "%@spawn.test").await, 8);
}

#[railyard::test]
async fn twenty_thousand_rolled_back_savepoints_in_one_test(db: Database) {
    for i in 0..20_000 {
        let r = db
            .transaction(async |c| {
                add_user(c, &format!("sp-{i}@savepoint.test")).await?;
                Err::<(), _>(Error::from(diesel::result::Error::RollbackTransaction))
            })
            .await;
        assert!(r.is_err());
    }
    assert_eq!(users_like(&db, "%@savepoint.test").await, 0);
}

#[railyard::test]
async fn each_proptest_case_sees_only_its_own_rows(db: Database) {
    use proptest::prelude::*;
    // An expensive fixture, made once in the test's transaction.
    db.write(async |c| add_user(c, "fixture@prop.test").await)
        .await
        .unwrap();
    let cases = Arc::new(AtomicU32::new(0));
    railyard::testing::proptest_cases(
        &db,
        ProptestConfig::with_cases(256),
        proptest::collection::vec(0..1_000_000i32, 1..6),
        async |db, values| {
            cases.fetch_add(1, Ordering::Relaxed);
            for v in &values {
                let email = format!("case-{v}@prop.test");
                db.write(async |c| {
                    diesel::sql_query(
                        "INSERT INTO users (email, name) VALUES ($1, 'p') ON CONFLICT DO NOTHING",
                    )
                    .bind::<Text, _>(&email)
                    .execute(c)
                    .await?;
                    Ok::<_, Error>(())
                })
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            let mut distinct = values.clone();
            distinct.sort();
            distinct.dedup();
            prop_assert_eq!(
                users_like(&db, "case-%@prop.test").await,
                distinct.len() as i64
            );
            prop_assert_eq!(users_like(&db, "fixture@prop.test").await, 1);
            Ok(())
        },
    )
    .await
    .unwrap();
    assert!(AtomicU32::load(&cases, Ordering::Relaxed) >= 256);
    assert_eq!(users_like(&db, "case-%@prop.test").await, 0);
}

#[railyard::test(stale_replica)]
async fn stale_replica_mode_catches_a_read_of_ones_own_write_without_a_session(db: Database) {
    db.write(async |c| add_user(c, "mine@stale.test").await)
        .await
        .unwrap();
    // The bug: reading one's own write from a replica without a session.
    assert_eq!(
        users_like(&db, "mine@stale.test").await,
        0,
        "caught: the replica read cannot see it"
    );
    // The fix: a session carries the write's position, and its read sees it.
    let session = db.session();
    session
        .write(async |c| add_user(c, "ours@stale.test").await)
        .await
        .unwrap();
    let n = session
        .read(async |c| {
            Ok::<_, Error>(
                diesel::sql_query(
                    "SELECT count(*) AS n FROM users WHERE email = 'ours@stale.test'",
                )
                .get_result::<N>(c)
                .await?
                .n,
            )
        })
        .await
        .unwrap();
    assert_eq!(n, 1);
}

fn expect_failure(
    name: &'static str,
    body: fn(Database) -> futures_util::future::BoxFuture<'static, ()>,
) -> String {
    let options = TestOptions {
        name,
        isolation: Isolation::Transaction,
        stale_replica: false,
        migrations: || railyard::Migrator::new(crate::support::LEDGER),
    };
    let outcome = std::panic::catch_unwind(move || railyard::testing::run(options, body));
    let panic = outcome.expect_err("the harness fails the test");
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn code_that_commits_the_test_transaction_gets_a_clear_error() {
    let message = expect_failure("harness::commits", |db| {
        Box::pin(async move {
            let err = db
                .write(async |c| {
                    c.batch_execute("COMMIT").await?;
                    Ok::<_, Error>(())
                })
                .await
                .unwrap_err();
            assert!(matches!(err, Error::TestIsolation(_)), "{err}");
            panic!("{err}");
        })
    });
    assert!(
        message.contains("ended the test's transaction"),
        "{message}"
    );
}

#[test]
fn deferred_constraints_are_checked_before_the_rollback() {
    let message = expect_failure("harness::deferred", |db| {
        Box::pin(async move {
            let mut c = db.primary().await.unwrap();
            c.batch_execute(
                "CREATE TABLE deferred_parent (id INT PRIMARY KEY);
                 CREATE TABLE deferred_child (parent INT REFERENCES deferred_parent (id) DEFERRABLE INITIALLY DEFERRED);
                 INSERT INTO deferred_child VALUES (42);",
            )
            .await
            .unwrap();
        })
    });
    assert!(message.contains("deferred constraint"), "{message}");
    assert!(message.contains("deferred_child"), "{message}");
}

#[railyard::test]
async fn isolation_options_degrade_to_what_a_savepoint_allows(db: Database) {
    let n: i32 = db
        .build_transaction()
        .serializable()
        .read_only()
        .run(async |c| {
            #[derive(diesel::QueryableByName)]
            struct One {
                #[diesel(sql_type = Integer)]
                one: i32,
            }
            Ok::<_, Error>(
                diesel::sql_query("SELECT 1 AS one")
                    .get_result::<One>(c)
                    .await?
                    .one,
            )
        })
        .await
        .unwrap();
    assert_eq!(
        n, 1,
        "runs, as documented, without changing the test transaction's mode"
    );
}
