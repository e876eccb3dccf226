//! The harness itself: `#[railyard_test::test]` isolation, parallelism, savepoints,
//! guard rails, property tests, database isolation and stale-replica mode.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use diesel::sql_types::{BigInt, Integer, Text};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use railyard::{Conn, Database, Error};
use railyard_test::{Isolation, TestOptions};

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

#[railyard_test::test]
async fn the_same_unique_email_in_two_parallel_tests_first(db: Database) {
    tokio::task::block_in_place(|| rendezvous(0));
    db.write(async |c| add_user(c, "same@parallel.test").await)
        .await
        .unwrap();
    assert_eq!(users_like(&db, "same@parallel.test").await, 1);
}

// The second waits (at most 20 s) for the first to end, when they meet.
#[railyard_test::test(lock_timeout = "20s")]
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
        lock_timeout: None,
    };
    let m = marker.clone();
    let outcome = std::panic::catch_unwind(move || {
        railyard_test::run(options, async move |db: Database| {
            db.write(async |c| add_user(c, &m).await).await.unwrap();
            if !m.is_empty() {
                panic!("deliberate");
            }
        })
    });
    assert!(outcome.is_err(), "the panic reaches the test runner");
    railyard_test::run(options, async move |db: Database| {
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

#[railyard_test::test]
async fn application_transactions_behave_the_same_under_the_harness(db: Database) {
    let under_harness = app_flow(&db, &crate::support::unique("h")).await.unwrap();
    assert_eq!(under_harness, vec!["inner-T@app.test", "kept-T@app.test"]);
    APP_RESULTS.lock().unwrap().push(under_harness);
}

#[railyard_test::test(isolation = "database")]
async fn application_transactions_behave_the_same_when_they_really_commit(db: Database) {
    let committed = app_flow(&db, &crate::support::unique("d")).await.unwrap();
    assert_eq!(committed, vec!["inner-T@app.test", "kept-T@app.test"]);
    // And it really committed: a second, independent connection sees it.
    let other = Database::connect(db.config().clone()).await.unwrap();
    assert_eq!(users_like(&other, "%@app.test").await, 2);
}

#[railyard_test::test]
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

#[railyard_test::test]
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

#[railyard_test::test]
async fn each_proptest_case_sees_only_its_own_rows(db: Database) {
    use proptest::prelude::*;
    // An expensive fixture, made once in the test's transaction.
    db.write(async |c| add_user(c, "fixture@prop.test").await)
        .await
        .unwrap();
    let cases = Arc::new(AtomicU32::new(0));
    railyard_test::proptest_cases(
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

#[railyard_test::test(stale_replica)]
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
        lock_timeout: None,
    };
    let outcome = std::panic::catch_unwind(move || railyard_test::run(options, body));
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

#[railyard_test::test]
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

// ---- Tests that meet in the lock manager --------------------------------------

fn lock_options(name: &'static str, lock_timeout: Option<Duration>) -> TestOptions {
    TestOptions {
        name,
        isolation: Isolation::Transaction,
        stale_replica: false,
        migrations: || railyard::Migrator::new(crate::support::LEDGER),
        lock_timeout,
    }
}

/// Two harness tests, on two threads, that insert the same two unique keys in
/// opposite orders: without the harness's help one of them fails with 40P01.
/// Both pass; exactly one of them ran its work twice (rolled back to its
/// savepoint, then waited for the other test to end).
#[test]
fn two_tests_that_lock_in_opposite_orders_both_pass() {
    let keys = [0, 1].map(|i| format!("deadlock-{i}-{}@probe.test", std::process::id()));
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let attempts = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
    let started = std::time::Instant::now();
    let sides: Vec<_> = [
        ("harness::deadlock_probe_a", 0usize),
        ("harness::deadlock_probe_b", 1),
    ]
    .into_iter()
    .map(|(name, side)| {
        let (first, second) = (keys[side].clone(), keys[1 - side].clone());
        let (barrier, attempts) = (barrier.clone(), attempts.clone());
        std::thread::spawn(move || {
            railyard_test::run(lock_options(name, None), async move |db: Database| {
                db.write(async |c| {
                    let attempt = attempts[side].fetch_add(1, Ordering::SeqCst);
                    add_user(c, &first).await?;
                    if attempt == 0 {
                        tokio::task::block_in_place(|| barrier.wait());
                    }
                    add_user(c, &second).await
                })
                .await
                .unwrap();
                assert_eq!(users_like(&db, &first).await, 1);
                assert_eq!(users_like(&db, &second).await, 1);
            })
        })
    })
    .collect();
    for side in sides {
        side.join().expect("both tests pass");
    }
    let runs = [0, 1].map(|i| std::sync::atomic::AtomicU32::load(&attempts[i], Ordering::SeqCst));
    assert_eq!(
        runs.iter().sum::<u32>(),
        3,
        "one side ran once, the deadlock's loser twice: {runs:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// Runs `holder` and `waiter` as two harness tests on two threads; `holder`
/// signals once it holds its lock, `waiter` starts its work after that.
fn holder_and_waiter(
    holder: impl FnOnce(
        Database,
        std::sync::mpsc::Sender<()>,
    ) -> futures_util::future::BoxFuture<'static, ()>
    + Send
    + 'static,
    waiter: impl FnOnce(Database) -> futures_util::future::BoxFuture<'static, ()> + Send + 'static,
    waiter_timeout: Option<Duration>,
) {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        railyard_test::run(
            lock_options("harness::lock_holder", None),
            async move |db| holder(db, tx).await,
        )
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the holder took its lock");
    railyard_test::run(
        lock_options("harness::lock_waiter", waiter_timeout),
        async move |db| waiter(db).await,
    );
    h.join().expect("the holder passes");
}

#[test]
fn a_wait_for_another_tests_lock_ends_when_that_test_ends() {
    let key = format!("wait-{}@probe.test", std::process::id());
    let k = key.clone();
    holder_and_waiter(
        move |db, tx| {
            Box::pin(async move {
                db.write(async |c| add_user(c, &k).await).await.unwrap();
                tx.send(()).unwrap();
                tokio::time::sleep(Duration::from_millis(800)).await;
            })
        },
        move |db| {
            Box::pin(async move {
                let started = std::time::Instant::now();
                db.write(async |c| add_user(c, &key).await).await.unwrap();
                let waited = started.elapsed();
                assert!(
                    waited > Duration::from_millis(400) && waited < Duration::from_secs(3),
                    "waited {waited:?}: as long as the holder ran, no longer"
                );
            })
        },
        None,
    );
}

#[test]
fn a_test_held_up_past_its_lock_timeout_fails_naming_the_other_test() {
    let key = format!("bound-{}@probe.test", std::process::id());
    let k = key.clone();
    holder_and_waiter(
        move |db, tx| {
            Box::pin(async move {
                db.write(async |c| add_user(c, &k).await).await.unwrap();
                tx.send(()).unwrap();
                tokio::time::sleep(Duration::from_secs(3)).await;
            })
        },
        move |db| {
            Box::pin(async move {
                let started = std::time::Instant::now();
                let err = db
                    .write(async |c| add_user(c, &key).await)
                    .await
                    .unwrap_err();
                let waited = started.elapsed();
                assert!(waited < Duration::from_millis(2500), "{waited:?}");
                assert!(
                    matches!(&err, Error::Blocked { blockers: Some(who), .. } if who.contains("harness::lock_holder")),
                    "{err:?}"
                );
                assert_eq!(err.sqlstate().map(|s| s.code()), Some("55P03"));
                let message = err.to_string();
                assert!(message.contains("harness::lock_holder"), "{message}");
                assert!(message.contains("RAILYARD_TEST_LOCK_TIMEOUT"), "{message}");
            })
        },
        Some(Duration::from_secs(1)),
    );
}

#[test]
fn nowait_against_another_test_is_retried_until_that_test_ends() {
    holder_and_waiter(
        |db, tx| {
            Box::pin(async move {
                let mut c = db.primary().await.unwrap();
                c.batch_execute("LOCK TABLE __diesel_schema_migrations IN EXCLUSIVE MODE")
                    .await
                    .unwrap();
                drop(c);
                tx.send(()).unwrap();
                tokio::time::sleep(Duration::from_millis(600)).await;
            })
        },
        |db| {
            Box::pin(async move {
                let attempts = AtomicU32::new(0);
                let started = std::time::Instant::now();
                db.write(async |c| {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    c.batch_execute(
                        "LOCK TABLE __diesel_schema_migrations IN EXCLUSIVE MODE NOWAIT",
                    )
                    .await?;
                    Ok::<_, Error>(())
                })
                .await
                .unwrap();
                assert!(
                    AtomicU32::load(&attempts, Ordering::SeqCst) > 1,
                    "NOWAIT failed at first"
                );
                assert!(
                    started.elapsed() < Duration::from_secs(3),
                    "{:?}",
                    started.elapsed()
                );
            })
        },
        None,
    );
}

/// Three lookups of one user each: the N+1 a query bound catches.
async fn three_lookups(db: &Database) {
    for i in 0..3 {
        let email = format!("n-plus-{i}@bound.test");
        assert_eq!(users_like(db, &email).await, 1);
    }
}

#[railyard_test::test]
async fn a_test_can_count_bound_and_list_its_statements(db: Database) {
    for i in 0..3 {
        db.write(async |c| add_user(c, &format!("n-plus-{i}@bound.test")).await)
            .await
            .unwrap();
    }
    let ((), statements, total) = railyard_test::count_queries(&db, three_lookups(&db)).await;
    assert_eq!(total, 3, "{statements:?}");
    assert!(
        statements
            .iter()
            .all(|s| s == "SELECT count(*) AS n FROM users WHERE email LIKE $1"),
        "{statements:?}"
    );
    // Within the bound, the macro evaluates to the block's value.
    let seven = railyard_test::assert_max_queries!(db, 3, {
        three_lookups(&db).await;
        7
    });
    assert_eq!(seven, 7);
    // Beyond it, the test fails, listing what ran (never a value).
    let failed = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
        railyard_test::assert_max_queries(&db, 2, three_lookups(&db)),
    ))
    .await
    .expect_err("3 statements where 2 are allowed fail the test");
    let message = failed.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains("3 statements ran where at most 2 were allowed"),
        "{message}"
    );
    assert!(message.contains("  3. SELECT count(*)"), "{message}");
    assert!(!message.contains("bound.test"), "{message}");
}
