//! Every public way a `Database` hands out a connection, inside the harness:
//! a row written through any of them is visible through all the others while
//! the test runs, and is gone after it (nothing reaches the shared test
//! database). One test per writing entry point; each reads through every
//! reading entry point.

use railyard::{Conn, Database, Error};
use railyard_test::{Isolation, TestOptions};

use crate::support::{count_user as count, insert_user as insert};

#[derive(Debug, Clone, Copy)]
enum Via {
    Primary,
    Replica,
    WithPrimary,
    Transaction,
    BuildTransaction,
    Write,
    BuildWrite,
    Read,
    ReadRouted,
    SessionRead,
    SessionReadRouted,
    SessionWrite,
    SessionBuildWrite,
    SessionTransaction,
    SessionBuildTransaction,
    NestedTransaction,
}

const READERS: [Via; 11] = [
    Via::Primary,
    Via::Replica,
    Via::WithPrimary,
    Via::Transaction,
    Via::BuildTransaction,
    Via::Write,
    Via::Read,
    Via::ReadRouted,
    Via::SessionRead,
    Via::SessionReadRouted,
    Via::SessionTransaction,
];

/// Runs `$body` (with the connection bound to `$c`) on a connection obtained
/// through `$via`. A macro, so that every arm passes a literal `async |c|`
/// closure, as application code does.
macro_rules! through {
    ($db:expr, $via:expr, |$c:ident| $body:expr) => {{
        let db: &Database = $db;
        let session = db.session();
        match $via {
            Via::Primary => {
                let mut conn = db.primary().await?;
                let $c: &mut Conn = &mut conn;
                $body
            }
            Via::Replica => {
                let mut conn = db.replica(0).await?;
                let $c: &mut Conn = &mut conn;
                $body
            }
            Via::WithPrimary => db.with_primary(async |$c| $body).await,
            Via::Transaction => db.transaction(async |$c| $body).await,
            Via::BuildTransaction => {
                db.build_transaction()
                    .serializable()
                    .run(async |$c| $body)
                    .await
            }
            Via::Write => db.write(async |$c| $body).await,
            Via::BuildWrite => {
                db.build_write()
                    .idempotent(true)
                    .run(async |$c| $body)
                    .await
            }
            Via::Read => db.read(async |$c| $body).await,
            Via::ReadRouted => db.read_routed(async |$c| $body).await.map(|(v, _)| v),
            Via::SessionRead => session.read(async |$c| $body).await,
            Via::SessionReadRouted => session.read_routed(async |$c| $body).await.map(|(v, _)| v),
            Via::SessionWrite => session.write(async |$c| $body).await,
            Via::SessionBuildWrite => {
                session
                    .build_write()
                    .idempotent(true)
                    .run(async |$c| $body)
                    .await
            }
            Via::SessionTransaction => session.transaction(async |$c| $body).await,
            Via::SessionBuildTransaction => {
                session
                    .build_transaction()
                    .serializable()
                    .run(async |$c| $body)
                    .await
            }
            Via::NestedTransaction => {
                let mut conn = db.primary().await?;
                conn.transaction(async |$c| $body).await
            }
        }
    }};
}

async fn insert_via(db: &Database, via: Via, email: &str) -> Result<(), Error> {
    through!(db, via, |c| insert(c, email).await)
}

async fn count_via(db: &Database, via: Via, email: &str) -> Result<i64, Error> {
    through!(db, via, |c| count(c, email).await)
}

fn options(name: &'static str) -> TestOptions {
    TestOptions {
        name,
        isolation: Isolation::Transaction,
        stale_replica: false,
        migrations: || railyard::Migrator::new(crate::support::LEDGER),
        lock_timeout: None,
    }
}

/// Writes through `writer` inside one harness test, reads through every reader,
/// then checks from a second harness test that nothing was committed.
fn written_through_is_seen_everywhere_and_rolled_back(writer: Via) {
    let email = format!("{writer:?}-{}@entry.test", std::process::id());
    let e = email.clone();
    railyard_test::run(options("entry_points::write"), async move |db: Database| {
        insert_via(&db, writer, &e)
            .await
            .unwrap_or_else(|err| panic!("writing through {writer:?}: {err}"));
        for reader in READERS {
            let n = count_via(&db, reader, &e)
                .await
                .unwrap_or_else(|err| panic!("reading through {reader:?}: {err}"));
            assert_eq!(
                n, 1,
                "a row written through {writer:?} is seen through {reader:?}"
            );
        }
        // Health rides the same connection and must not disturb the test's.
        let _ = db.health().await;
        let n = count_via(&db, Via::Read, &e).await.unwrap();
        assert_eq!(n, 1, "still there after a health check");
    });
    railyard_test::run(options("entry_points::after"), async move |db: Database| {
        for reader in READERS {
            let n = count_via(&db, reader, &email).await.unwrap();
            assert_eq!(
                n, 0,
                "the row written through {writer:?} was rolled back (seen through {reader:?})"
            );
        }
    });
}

macro_rules! entry_point_tests {
    ($($name:ident => $via:expr),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                written_through_is_seen_everywhere_and_rolled_back($via);
            }
        )*
    };
}

entry_point_tests! {
    through_primary => Via::Primary,
    through_replica_index => Via::Replica,
    through_with_primary => Via::WithPrimary,
    through_transaction => Via::Transaction,
    through_build_transaction => Via::BuildTransaction,
    through_write => Via::Write,
    through_build_write => Via::BuildWrite,
    through_read => Via::Read,
    through_read_routed => Via::ReadRouted,
    through_session_read => Via::SessionRead,
    through_session_write => Via::SessionWrite,
    through_session_build_write => Via::SessionBuildWrite,
    through_session_transaction => Via::SessionTransaction,
    through_session_build_transaction => Via::SessionBuildTransaction,
    through_nested_transaction => Via::NestedTransaction,
}
