//! The harness with whatever build of the core the test command gives it:
//! `cargo test -p railyard-test` alone builds the core without its `tls`
//! feature, the workspace's run with it. Either way the harness reaches the
//! local cluster through its Unix socket (no TLS, no password on a wire).

use diesel::sql_types::{BigInt, Bool};
use diesel_async::RunQueryDsl;

#[derive(diesel::QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    n: i64,
    #[diesel(sql_type = Bool)]
    socket: bool,
}

#[railyard_test::test(migrations = "tests/migrations")]
async fn a_test_sees_its_own_write_through_the_local_socket_with_or_without_tls(
    db: railyard::Database,
) {
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
                "SELECT (SELECT count(*) FROM notes) AS n, inet_client_addr() IS NULL AS socket",
            )
            .get_result::<Row>(conn)
            .await
            .map_err(railyard::Error::from)
        })
        .await
        .unwrap();
    assert_eq!(row.n, 1, "the test's own write, and only it");
    assert!(row.socket, "the harness's connection is the Unix socket's");
}
