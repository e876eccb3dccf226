//! Replica routing: read-your-writes by WAL position, monitors that eject and
//! re-admit replicas, failover. Tests that pause replay, stop or promote servers
//! run on private clusters of their own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diesel::sql_types::{BigInt, Text};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use railyard::route::ReplicaStatus;
use railyard::{CausalToken, Config, Conn, Database, Error, Route, RoutingConfig};
use railyard_local::LocalCluster;

use crate::support::{self, count_user, insert_user};

#[derive(diesel::QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn fast_routing() -> RoutingConfig {
    RoutingConfig::default().check_interval(Duration::from_millis(30))
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_healthy(db: &Database) {
    wait_for("a healthy replica", || {
        db.replica_health()
            .iter()
            .all(|r| r.status == ReplicaStatus::Healthy)
    })
    .await;
}

/// A private cluster with the ledger migrated, reached over its sockets.
async fn private(name: &str) -> (LocalCluster, Config) {
    let cluster = support::private_cluster(name, true).await;
    let config = Config::new(cluster.primary_socket_target("railyard"))
        .replica(cluster.replica_socket_target("railyard").unwrap());
    let dumps = support::Dumps::new();
    dumps.migrator().run(&config).await.unwrap();
    (cluster, config)
}

/// Reads `email`'s count through `session` until the read is routed to the
/// replica again (within 10 s of replay resuming); the count it read there.
async fn back_on_replica(db: &Database, session: &railyard::Session, email: &str) -> i64 {
    let waited = std::time::Instant::now();
    loop {
        let (n, route) = session
            .read_routed(async |c| count_user(c, email).await)
            .await
            .unwrap();
        if matches!(route, Route::Replica(_)) {
            return n;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "still on the primary 10 s after replay resumed: floor {:?}, {:?}",
            session.token(),
            db.replica_health()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn replica_admin(cluster: &LocalCluster) -> Database {
    let url = format!(
        "{}&target_session_attrs=any",
        cluster
            .replica_socket_target("postgres")
            .unwrap()
            .expose_url()
    );
    Database::connect(Config::from_url(&url).unwrap().pool_max_size(1))
        .await
        .unwrap()
}

diesel::table! {
    users (id) {
        id -> Int8,
        email -> Text,
        name -> Text,
    }
}

/// The same count through the query builder: a prepared statement diesel
/// caches, so that a repeated read is one round trip.
async fn count_user_dsl(conn: &mut Conn, email: &str) -> Result<i64, Error> {
    use diesel::{ExpressionMethods, QueryDsl};
    Ok(users::table
        .filter(users::email.eq(email))
        .count()
        .get_result::<i64>(conn)
        .await?)
}

async fn sql(db: &Database, sql: &str) {
    let mut c = db.primary().await.unwrap();
    c.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[tokio::test]
async fn reads_go_to_a_replica_with_no_extra_round_trip() {
    let Some(cluster) = support::cluster().await else {
        return;
    };
    support::ledger(|c| c).await;
    let config = Config::new(cluster.primary_socket_target(&support::ledger_name()))
        .replica(
            cluster
                .replica_socket_target(&support::ledger_name())
                .unwrap(),
        )
        .replica_pool_max_size(1);
    let db = Database::builder(config)
        .routing(fast_routing())
        .connect()
        .await
        .unwrap();
    wait_healthy(&db).await;

    let session = db.session();
    let email = format!("{}@example.test", support::unique("rt"));
    session
        .write(async |c| insert_user(c, &email).await)
        .await
        .unwrap();
    let token = session.token().expect("the write recorded a token");
    wait_for("the replica to replay the write", || {
        db.replica_health()[0].replay_lsn >= Some(token.lsn())
    })
    .await;

    // Two reads on the single replica connection: the tap counts round trips.
    let count_rt = async |c: &mut Conn| {
        let before = c.wire().ready_count();
        let n = count_user_dsl(c, &email).await?;
        c.wire().quiesce(Duration::from_secs(1)).await;
        Ok::<_, Error>((n, before, c.wire().ready_count()))
    };
    let ((n1, _, after_first), route1) = session.read_routed(count_rt).await.unwrap();
    let ((n2, before_second, after_second), route2) = session.read_routed(count_rt).await.unwrap();
    assert!(matches!(route1, Route::Replica(_)), "{route1}");
    assert!(matches!(route2, Route::Replica(_)), "{route2}");
    assert_eq!((n1, n2), (1, 1), "the session reads its own write");
    assert_eq!(
        before_second, after_first,
        "routing and check-out cost no round trip"
    );
    assert_eq!(
        after_second - before_second,
        1,
        "one round trip: the read itself"
    );

    // Writes always go to the primary.
    let err = db
        .read(async |c| insert_user(c, "never@example.test").await)
        .await
        .unwrap_err();
    assert_eq!(
        err.class(),
        railyard::ErrorClass::Reroute,
        "reads are for reading: {err}"
    );
}

/// The round trips the one connection of a single-connection primary pool has
/// made so far: checking it out costs none (the tap answers for it), so the
/// difference between two counts is what the work in between cost. Requests
/// nobody waits for (the `Close` of a statement diesel did not cache) are
/// counted once answered.
async fn primary_round_trips(db: &Database) -> u64 {
    let c = db.primary().await.unwrap();
    assert!(c.wire().quiesce(Duration::from_secs(5)).await);
    c.wire().ready_count()
}

/// The round trips `work` cost on the primary (see [`primary_round_trips`]).
async fn cost(db: &Database, work: impl std::future::Future<Output = ()>) -> u64 {
    let before = primary_round_trips(db).await;
    work.await;
    primary_round_trips(db).await - before
}

/// An INSERT through the query builder: a statement diesel caches (its
/// UPDATEs it never caches), so that after the first run it is one round trip.
async fn add_user(conn: &mut Conn, email: &str) -> Result<(), Error> {
    use diesel::ExpressionMethods;
    diesel::insert_into(users::table)
        .values((users::email.eq(email), users::name.eq("rt")))
        .execute(conn)
        .await?;
    Ok(())
}

/// A fresh email for each insert of a test.
fn email(prefix: &str) -> String {
    format!("{}@example.test", support::unique(prefix))
}

/// The primary's WAL insert position now. Read on a connection of its own
/// when `db` is measured: diesel closes the statement of an SQL query it does
/// not cache only when the connection runs its next query.
async fn insert_position(db: &Database) -> CausalToken {
    #[derive(diesel::QueryableByName)]
    struct Lsn {
        #[diesel(sql_type = Text)]
        lsn: String,
    }
    let mut c = db.primary().await.unwrap();
    diesel::sql_query("SELECT pg_current_wal_insert_lsn()::text AS lsn")
        .get_result::<Lsn>(&mut c)
        .await
        .unwrap()
        .lsn
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_session_transaction_costs_the_round_trips_of_a_plain_one_and_its_token_comes_with_the_commit()
 {
    let db = support::ledger(|c| c.pool_max_size(1)).await;
    let positions = support::ledger(|c| c.pool_max_size(1)).await;
    // Warm the statement cache: from here on the INSERT is one round trip.
    let e = email("rt_warm");
    db.write(async |c| add_user(c, &e).await).await.unwrap();

    let e = email("rt_plain");
    let plain = cost(&db, async {
        db.transaction(async |c| add_user(c, &e).await)
            .await
            .unwrap()
    })
    .await;
    assert_eq!(plain, 3, "BEGIN, the INSERT, COMMIT");

    let session = db.session();
    let mut last = None;
    for _ in 0..2 {
        let before = insert_position(&positions).await;
        let e = email("rt_session");
        let spent = cost(&db, async {
            session
                .transaction(async |c| add_user(c, &e).await)
                .await
                .unwrap()
        })
        .await;
        assert_eq!(
            spent, plain,
            "a session's transaction costs what the same transaction costs without a session"
        );
        let token = session.token().expect("the commit recorded a token");
        assert!(
            token > before,
            "the token ({token}) is past the commit, which is past {before}"
        );
        assert!(
            token <= insert_position(&positions).await,
            "the token is a position the primary reached"
        );
        assert!(last < Some(token), "each commit moves the token forward");
        last = Some(token);
    }

    // The builder takes the same path.
    let e = email("rt_built");
    let spent = cost(&db, async {
        session
            .build_transaction()
            .serializable()
            .run(async |c| add_user(c, &e).await)
            .await
            .unwrap()
    })
    .await;
    assert_eq!(spent, plain);
    assert!(session.token() > last);
}

#[tokio::test]
async fn a_session_write_costs_one_round_trip_more_than_a_plain_one_its_commit_position() {
    let db = support::ledger(|c| c.pool_max_size(1)).await;
    let e = email("rt_warm");
    db.write(async |c| add_user(c, &e).await).await.unwrap();

    let e = email("rt_plain");
    let plain = cost(&db, async {
        db.write(async |c| add_user(c, &e).await).await.unwrap()
    })
    .await;
    assert_eq!(plain, 1, "the INSERT alone");
    let session = db.session();
    let e = email("rt_session");
    let spent = cost(&db, async {
        session
            .write(async |c| add_user(c, &e).await)
            .await
            .unwrap()
    })
    .await;
    // Autocommit work commits inside the closure's own statements: the
    // position can only be asked for after the last of them (see `Session::write`).
    assert_eq!(
        spent,
        plain + 1,
        "an autocommit session write pays exactly one round trip for its commit position"
    );
    assert!(session.token().is_some());
}

#[tokio::test]
async fn a_session_read_that_falls_back_to_the_primary_costs_the_round_trips_of_a_primary_read() {
    let Some(cluster) = support::cluster().await else {
        return;
    };
    support::ledger(|c| c).await;
    let config = Config::new(cluster.primary_socket_target(&support::ledger_name()))
        .replica(
            cluster
                .replica_socket_target(&support::ledger_name())
                .unwrap(),
        )
        .pool_max_size(1);
    let db = Database::builder(config)
        .routing(fast_routing())
        .connect()
        .await
        .unwrap();
    wait_healthy(&db).await;
    let email = format!("{}@example.test", support::unique("rt_read"));
    db.write(async |c| insert_user(c, &email).await)
        .await
        .unwrap();
    // Warm the statement cache on the primary connection.
    db.with_primary(async |c| count_user_dsl(c, &email).await)
        .await
        .unwrap();

    let plain = cost(&db, async {
        let n = db
            .with_primary(async |c| count_user_dsl(c, &email).await)
            .await
            .unwrap();
        assert_eq!(n, 1);
    })
    .await;
    assert_eq!(plain, 1, "the count alone");

    // A session whose floor no replica reaches: every read falls back.
    let far: CausalToken = "FFFF/0".parse().unwrap();
    for session in [db.session_from(far), {
        // …and one whose floor is its own write, with replay out of reach for
        // the monitors' figures (the write just committed).
        let s = db.session();
        let e = format!("fallback-{email}");
        s.transaction(async |c| add_user(c, &e).await)
            .await
            .unwrap();
        s
    }] {
        let mut route = None;
        let spent = cost(&db, async {
            let (n, r) = session
                .read_routed(async |c| count_user_dsl(c, &email).await)
                .await
                .unwrap();
            assert_eq!(n, 1);
            route = Some(r);
        })
        .await;
        if route == Some(Route::Primary) {
            assert_eq!(
                spent, plain,
                "a session's read on the primary costs what a plain primary read costs"
            );
        }
    }
    let (_, route) = db
        .session_from(far)
        .read_routed(async |c| count_user_dsl(c, &email).await)
        .await
        .unwrap();
    assert_eq!(route, Route::Primary, "no replica reaches FFFF/0");
}

#[tokio::test]
async fn a_session_transaction_takes_the_same_options_and_records_a_token() {
    let Some(cluster) = support::cluster().await else {
        return;
    };
    support::ledger(|c| c).await;
    let config = Config::new(cluster.primary_socket_target(&support::ledger_name())).replica(
        cluster
            .replica_socket_target(&support::ledger_name())
            .unwrap(),
    );
    let db = Database::builder(config)
        .routing(fast_routing())
        .connect()
        .await
        .unwrap();
    wait_healthy(&db).await;

    #[derive(diesel::QueryableByName)]
    struct Iso {
        #[diesel(sql_type = Text)]
        iso: String,
    }
    let session = db.session();
    assert!(session.token().is_none(), "a new session has no token");
    let email = format!("{}@example.test", support::unique("opts"));
    let iso = session
        .build_transaction()
        .serializable()
        .statement_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .run(async |c| {
            insert_user(c, &email).await?;
            Ok::<_, Error>(
                diesel::sql_query("SELECT current_setting('transaction_isolation') AS iso")
                    .get_result::<Iso>(c)
                    .await?
                    .iso,
            )
        })
        .await
        .unwrap();
    assert_eq!(
        iso, "serializable",
        "the session's transaction ran SERIALIZABLE"
    );
    let first = session.token().expect("the commit recorded a token");

    // A read-only transaction through the session is refused a write by the server.
    let refused = session
        .build_transaction()
        .read_only()
        .run(async |c| insert_user(c, &format!("ro-{email}")).await)
        .await
        .unwrap_err();
    assert_eq!(
        refused.sqlstate().map(|s| s.code()),
        Some("25006"),
        "{refused}"
    );
    assert_eq!(
        refused.class(),
        railyard::ErrorClass::Permanent,
        "a write refused by READ ONLY is the caller's, not a standby to reroute from: {refused}"
    );

    // An idempotent session write moves the token forward.
    session
        .build_write()
        .idempotent(true)
        .run(async |c| {
            diesel::sql_query("UPDATE users SET name = 'opts' WHERE email = $1")
                .bind::<Text, _>(&email)
                .execute(c)
                .await
                .map_err(Error::from)
        })
        .await
        .unwrap();
    let second = session.token().unwrap();
    assert!(second > first, "{second} after {first}");
    // And the session reads its own write, wherever the read goes.
    let n = session
        .read(async |c| count_user(c, &email).await)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn read_your_writes_holds_while_replay_is_paused_and_across_a_token_string() {
    let (cluster, config) = private("ryw").await;
    let routing = RoutingConfig::default().check_interval(Duration::from_millis(5));
    let db = Database::builder(config)
        .routing(routing)
        .connect()
        .await
        .unwrap();
    let replica = replica_admin(&cluster).await;
    wait_healthy(&db).await;
    // Let the replica replay the migrations before replay is paused.
    let warmup = db.session();
    warmup
        .write(async |c| insert_user(c, &format!("{}@example.test", support::unique("warm"))).await)
        .await
        .unwrap();
    let t = warmup.token().unwrap();
    wait_for("the replica to replay the schema", || {
        db.replica_health()[0].replay_lsn >= Some(t.lsn())
    })
    .await;

    sql(&replica, "SELECT pg_wal_replay_pause()").await;
    let session = db.session();
    let email = format!("{}@example.test", support::unique("paused"));
    session
        .write(async |c| insert_user(c, &email).await)
        .await
        .unwrap();
    let (n, route) = session
        .read_routed(async |c| count_user(c, &email).await)
        .await
        .unwrap();
    assert_eq!(
        (n, route),
        (1, Route::Primary),
        "the session's read goes to the primary and sees its write"
    );
    let (n, route) = db
        .read_routed(async |c| count_user(c, &email).await)
        .await
        .unwrap();
    assert!(
        matches!(route, Route::Replica(_)),
        "reads without a session still use the replica"
    );
    assert_eq!(
        n, 0,
        "…which has not replayed the write (stale reads are allowed there)"
    );

    // A token carried as a string gives a new session the same guarantee.
    let token: CausalToken = session.token().unwrap().to_string().parse().unwrap();
    let later = db.session_from(token);
    let (n, route) = later
        .read_routed(async |c| count_user(c, &email).await)
        .await
        .unwrap();
    assert_eq!((n, route), (1, Route::Primary));

    sql(&replica, "SELECT pg_wal_replay_resume()").await;
    // Back on the replica once it replayed past the session's floor. The
    // floor is not only the write's position: the session's reads on the
    // primary raised it to the primary's position when they ran (monotonic
    // reads), which includes any WAL written since (a page pruned by a
    // read, a standby snapshot), so the test waits for the route itself.
    let n = back_on_replica(&db, &session, &email).await;
    assert_eq!(n, 1);

    // 10,000 write→read pairs, replay paused and resumed at random meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let chaos = {
        let (replica, stop) = (replica.clone(), stop.clone());
        tokio::spawn(async move {
            let mut toggles = 0;
            while !AtomicBool::load(&stop, Ordering::Relaxed) {
                let pause = rand::random::<bool>();
                let q = if pause {
                    "SELECT pg_wal_replay_pause()"
                } else {
                    "SELECT pg_wal_replay_resume()"
                };
                sql(&replica, q).await;
                toggles += 1;
                tokio::time::sleep(Duration::from_millis(rand::random_range(1..30))).await;
            }
            sql(&replica, "SELECT pg_wal_replay_resume()").await;
            toggles
        })
    };
    let stale = Arc::new(AtomicU64::new(0));
    let on_replica = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (db, stale, on_replica) = (db.clone(), stale.clone(), on_replica.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..1250 {
                let email = format!("pair-{t}-{i}-{}@example.test", std::process::id());
                let session = db.session();
                session
                    .write(async |c| insert_user(c, &email).await)
                    .await
                    .unwrap();
                if rand::random::<bool>() {
                    // Give the replica (and its monitor) a moment, so that many
                    // reads do go to it.
                    tokio::time::sleep(Duration::from_millis(rand::random_range(0..12))).await;
                }
                let (n, route) = session
                    .read_routed(async |c| count_user(c, &email).await)
                    .await
                    .unwrap();
                if n != 1 {
                    stale.fetch_add(1, Ordering::Relaxed);
                }
                if matches!(route, Route::Replica(_)) {
                    on_replica.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let toggles = chaos.await.unwrap();
    let on_replica = AtomicU64::load(&on_replica, Ordering::Relaxed);
    eprintln!(
        "10000 write→read pairs: {on_replica} reads on the replica, {toggles} pause/resume toggles"
    );
    assert_eq!(
        AtomicU64::load(&stale, Ordering::Relaxed),
        0,
        "no stale read"
    );
    assert!(toggles > 10);
    assert!(
        on_replica > 500,
        "enough reads went to the replica to mean something"
    );
    drop((db, replica));
    cluster.destroy().unwrap();
}

#[tokio::test]
async fn after_a_read_on_the_primary_a_session_never_reads_older_data_than_it_saw() {
    let (cluster, config) = private("monotonic").await;
    let routing = RoutingConfig::default().check_interval(Duration::from_millis(20));
    let db = Database::builder(config)
        .routing(routing)
        .connect()
        .await
        .unwrap();
    let replica = replica_admin(&cluster).await;
    wait_healthy(&db).await;
    let warmup = db.session();
    warmup
        .write(async |c| insert_user(c, &format!("{}@example.test", support::unique("warm"))).await)
        .await
        .unwrap();
    let t = warmup.token().unwrap();
    wait_for("the replica to replay the schema", || {
        db.replica_health()[0].replay_lsn >= Some(t.lsn())
    })
    .await;

    sql(&replica, "SELECT pg_wal_replay_pause()").await;
    let session = db.session();
    let mine = format!("{}@example.test", support::unique("mine"));
    session
        .transaction(async |c| insert_user(c, &mine).await)
        .await
        .unwrap();
    let written = session.token().unwrap();
    // Another writer commits after the session's write…
    let theirs = format!("{}@example.test", support::unique("theirs"));
    db.write(async |c| insert_user(c, &theirs).await)
        .await
        .unwrap();
    let after_theirs = insert_position(&db).await;
    assert!(after_theirs > written);
    // …and the session, held to the primary by its write, sees that commit.
    let (n, route) = session
        .read_routed(async |c| count_user(c, &theirs).await)
        .await
        .unwrap();
    assert_eq!((n, route), (1, Route::Primary));
    // What it saw becomes its floor (from the primary's position as the
    // monitor samples it after the read, so the read paid no round trip for
    // it): no replica that has not replayed the other writer's commit serves
    // this session again, and its token carries that.
    wait_for(
        "the session's token to cover what its primary read saw",
        || session.token().is_some_and(|t| t >= after_theirs),
    )
    .await;
    let (n, route) = session
        .read_routed(async |c| count_user(c, &theirs).await)
        .await
        .unwrap();
    assert_eq!((n, route), (1, Route::Primary), "replay is still paused");

    sql(&replica, "SELECT pg_wal_replay_resume()").await;
    // Back on the replica once it has replayed past the session's floor.
    // The floor is the token's position and, after the last primary read,
    // the primary's position as the monitor samples it after that read
    // (which the token carries only once sampled), so the test waits for the
    // route itself rather than for a position it would have to guess.
    let n = back_on_replica(&db, &session, &theirs).await;
    assert_eq!(n, 1, "the replica read sees what the primary read saw");
    drop((db, replica));
    cluster.destroy().unwrap();
}

#[tokio::test]
async fn a_stopped_replica_is_ejected_without_errors_and_readmitted_after_restart() {
    let (cluster, config) = private("stopped").await;
    let db = Database::builder(config)
        .routing(fast_routing())
        .connect()
        .await
        .unwrap();
    wait_healthy(&db).await;
    cluster.stop_replica().unwrap();
    let mut routes = Vec::new();
    for _ in 0..50 {
        let (n, route) = db
            .read_routed(async |c| Ok::<_, Error>(count_user(c, "nobody@example.test").await?))
            .await
            .expect("reads keep succeeding while the replica is down");
        assert_eq!(n, 0);
        routes.push(route);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(routes.last(), Some(&Route::Primary));
    assert_eq!(db.replica_health()[0].status, ReplicaStatus::Down);

    cluster.start_replica().unwrap();
    wait_healthy(&db).await;
    let (_, route) = db
        .read_routed(async |c| count_user(c, "nobody@example.test").await)
        .await
        .unwrap();
    assert!(matches!(route, Route::Replica(_)), "re-admitted: {route}");
    drop(db);
    cluster.destroy().unwrap();
}

#[tokio::test]
async fn a_replica_lagging_past_the_bound_is_ejected_then_readmitted() {
    let (cluster, config) = private("lag").await;
    let routing = fast_routing().max_lag_bytes(256 * 1024);
    let db = Database::builder(config)
        .routing(routing)
        .connect()
        .await
        .unwrap();
    let replica = replica_admin(&cluster).await;
    wait_healthy(&db).await;
    sql(&replica, "SELECT pg_wal_replay_pause()").await;
    // About a megabyte of WAL.
    sql(
        &db,
        "CREATE TABLE IF NOT EXISTS filler (v TEXT); INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 1000)",
    )
    .await;
    wait_for("the replica to be ejected", || {
        db.replica_health()[0].status == ReplicaStatus::Lagging
    })
    .await;
    let (_, route) = db
        .read_routed(async |c| count_user(c, "x@example.test").await)
        .await
        .unwrap();
    assert_eq!(route, Route::Primary);
    sql(&replica, "SELECT pg_wal_replay_resume()").await;
    wait_healthy(&db).await;
    let (_, route) = db
        .read_routed(async |c| count_user(c, "x@example.test").await)
        .await
        .unwrap();
    assert!(matches!(route, Route::Replica(_)));
    drop((db, replica));
    cluster.destroy().unwrap();
}

#[tokio::test]
async fn failover_to_a_promoted_replica_loses_no_acknowledged_write() {
    let (cluster, _) = private("failover").await;
    let p = cluster.primary_socket_target("railyard");
    let r = cluster.replica_socket_target("railyard").unwrap();
    let dir = cluster.socket_dir();
    let url = format!(
        "postgres://railyard:{}@/railyard?host={},{}&port={},{}&target_session_attrs=read-write&sslmode=disable",
        cluster.password().expose(),
        dir.display(),
        dir.display(),
        p.hosts()[0].1,
        r.hosts()[0].1
    );
    let config = Config::from_url(&url)
        .unwrap()
        .checkout_timeout(Duration::from_secs(2))
        .circuit_breaker(1000, Duration::from_millis(100));
    let db = Database::connect(config).await.unwrap();

    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::<i64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, acknowledged, stop) = (db.clone(), acknowledged.clone(), stop.clone());
        tokio::spawn(async move {
            let mut longest_gap = Duration::ZERO;
            let mut last_ok = Instant::now();
            let mut i = 0i64;
            while !AtomicBool::load(&stop, Ordering::Relaxed) {
                i += 1;
                let email = format!("failover-{i}@example.test");
                match db.write(async |c| insert_user(c, &email).await).await {
                    Ok(()) => {
                        acknowledged.lock().unwrap().push(i);
                        longest_gap = longest_gap.max(last_ok.elapsed());
                        last_ok = Instant::now();
                    }
                    Err(e) => {
                        assert!(
                            matches!(
                                e.class(),
                                railyard::ErrorClass::Reconnect
                                    | railyard::ErrorClass::Ambiguous
                                    | railyard::ErrorClass::Reroute
                            ),
                            "{e}"
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            longest_gap
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Stop the old primary first (a fast shutdown ships all WAL to the standby),
    // then promote: the reverse order loses writes acknowledged in between,
    // which only synchronous replication prevents.
    cluster.stop_primary().unwrap();
    cluster.promote_replica().unwrap();
    let promoted_at = Instant::now();
    let resumed = loop {
        let n = acknowledged.lock().unwrap().len();
        tokio::time::sleep(Duration::from_millis(50)).await;
        if acknowledged.lock().unwrap().len() > n {
            break promoted_at.elapsed();
        }
        assert!(
            promoted_at.elapsed() < Duration::from_secs(20),
            "writes did not resume"
        );
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let longest_gap = writer.await.unwrap();
    let acknowledged = acknowledged.lock().unwrap().clone();

    let new_primary = Database::connect(Config::new(r.clone())).await.unwrap();
    let mut conn = new_primary.primary().await.unwrap();
    let present: i64 =
        diesel::sql_query("SELECT count(*) AS n FROM users WHERE email LIKE 'failover-%'")
            .get_result::<N>(&mut conn)
            .await
            .unwrap()
            .n;
    let mut missing = 0;
    for i in &acknowledged {
        if count_user(&mut conn, &format!("failover-{i}@example.test"))
            .await
            .unwrap()
            != 1
        {
            missing += 1;
        }
    }
    eprintln!(
        "failover: {} writes acknowledged, {present} present, writes resumed {resumed:.2?} after promotion, longest gap {longest_gap:.2?}",
        acknowledged.len()
    );
    assert_eq!(missing, 0, "no acknowledged write is lost");
    drop((db, new_primary, conn));
    cluster.destroy().unwrap();
}
