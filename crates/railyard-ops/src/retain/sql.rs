//! What the run's statements share: the time bound on each, the session
//! advisory lock, and identifiers quoted for SQL.

use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Bool, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::LOCK_KEY;
use crate::error::Error;

pub(super) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

pub(super) async fn try_lock(
    conn: &mut AsyncPgConnection,
    bound: Duration,
) -> Result<Option<i32>, Error> {
    let got: Flag = bounded(
        bound,
        diesel::sql_query("SELECT pg_try_advisory_lock($1) AS ok")
            .bind::<BigInt, _>(LOCK_KEY)
            .get_result(conn),
    )
    .await?;
    if got.ok {
        return Ok(None);
    }
    let holder: Option<Pid> = bounded(
        bound,
        diesel::sql_query(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND classid = ($1 >> 32)::bigint::oid AND objid = ($1 & 4294967295)::bigint::oid AND objsubid = 1 LIMIT 1",
        )
        .bind::<BigInt, _>(LOCK_KEY)
        .get_result(conn),
    )
    .await
    .ok();
    Ok(Some(holder.map(|h| h.pid).unwrap_or(0)))
}

pub(super) async fn unlock(conn: &mut AsyncPgConnection) {
    // The connection is dedicated and dropped after the run, which releases
    // the lock anyway.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        diesel::sql_query("SELECT pg_advisory_unlock($1) AS ok")
            .bind::<BigInt, _>(LOCK_KEY)
            .get_result::<Flag>(conn),
    )
    .await;
}

pub(super) async fn bounded<T>(
    bound: Duration,
    f: impl Future<Output = diesel::QueryResult<T>>,
) -> Result<T, Error> {
    // The server's statement_timeout fires first; this is the backstop for
    // a server that does not answer at all.
    let limit = bound + Duration::from_secs(5);
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(Error::from),
        Err(_) => Err(Error::timeout(
            limit,
            "a retention statement did not finish",
        )),
    }
}

#[derive(QueryableByName)]
pub(super) struct Named {
    #[diesel(sql_type = Text)]
    pub(super) name: String,
}

#[derive(QueryableByName)]
struct Flag {
    #[diesel(sql_type = Bool)]
    ok: bool,
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
}
