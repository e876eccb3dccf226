//! The harness with whatever build of the core the test command gives it.
//! `cargo test -p railyard-test` alone builds the core without its `tls`
//! feature: the harness then reaches the local cluster through its Unix
//! socket; in the workspace's run the core has TLS and the harness uses it.

use diesel::sql_types::{BigInt, Bool};
use diesel_async::RunQueryDsl;

#[derive(diesel::QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    n: i64,
    #[diesel(sql_type = Bool)]
    tls: bool,
}

#[railyard_test::test(migrations = "tests/migrations")]
async fn a_test_sees_its_write_over_tls_exactly_when_the_core_has_it(db: railyard::Database) {
    db.write(async |conn| {
        diesel::sql_query("INSERT INTO notes (body) VALUES ('kept until the test ends')")
            .execute(conn)
            .await
            .map_err(railyard::Error::from)
    })
    .await
    .unwrap();
    let row = db
        .read(async |conn| {
            diesel::sql_query(
                "SELECT (SELECT count(*) FROM notes) AS n, \
                 coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false) AS tls",
            )
            .get_result::<Row>(conn)
            .await
            .map_err(railyard::Error::from)
        })
        .await
        .unwrap();
    assert_eq!(row.n, 1, "the test's own write, and only it");
    assert_eq!(row.tls, railyard::config::tls_available());
}
