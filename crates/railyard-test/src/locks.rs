//! Tests that meet on the same rows: what each test's transaction sets so a
//! wait names its blocker and ends at the lock bound, and the watchdog that
//! asks the server who blocks a waiting test.

use super::*;
/// What the harness sets at the start of each test's transaction (`SET
/// LOCAL`, so the reused connection is clean for the next test):
/// `application_name` = the test's name, so that a test held up by this one
/// can name it; `lock_timeout` = the lock bound, so that no wait outlasts it;
/// and, for a superuser, a short `deadlock_timeout`, so that two tests that
/// deadlock find out in a fifth of a second rather than a second.
pub(super) fn contention_settings(name: &str, bound: Duration) -> String {
    // application_name keeps 63 bytes: keep the end of a long path, where the
    // test's own name is.
    let mut start = name.len().saturating_sub(63);
    while !name.is_char_boundary(start) {
        start += 1;
    }
    let app = name[start..].replace('\'', "''");
    format!(
        "SET LOCAL application_name = '{app}'; SET LOCAL lock_timeout = {}; \
         SELECT set_config('deadlock_timeout', '200ms', true) FROM pg_roles \
         WHERE rolname = current_user AND rolsuper",
        bound.as_millis().clamp(1, i32::MAX as u128)
    )
}

/// Who blocks backend `$1`: each blocker's `application_name` (a test's name,
/// under the harness), pid and how long its transaction has been open.
pub(super) const BLOCKERS_SQL: &str = "SELECT string_agg(format('%s (pid %s, its transaction open for %s s)', \
     CASE WHEN application_name = '' THEN 'a session without an application_name' ELSE application_name END, \
     pid, COALESCE(round(extract(epoch FROM now() - xact_start)::numeric, 1)::text, '?')), '; ' ORDER BY pid) AS who \
     FROM pg_stat_activity WHERE pid = ANY(pg_blocking_pids($1))";

#[derive(diesel::QueryableByName)]
pub(super) struct Who {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    pub(super) who: Option<String>,
}

/// The connection the lock watchdogs ask on: one per process, opened when a
/// test first waits, reopened after a failure.
pub(super) fn observer() -> &'static tokio::sync::Mutex<Option<Conn>> {
    static OBSERVER: OnceLock<tokio::sync::Mutex<Option<Conn>>> = OnceLock::new();
    OBSERVER.get_or_init(Default::default)
}

pub(super) async fn blockers_of(admin: &ConnectTarget, pid: i32) -> Result<Option<String>, Error> {
    use diesel_async::RunQueryDsl;
    let mut slot = observer().lock().await;
    let conn = match &mut *slot {
        Some(c) => c,
        empty => {
            let t = admin.clone();
            let c = background().spawn(connect(t)).await.map_err(|e| {
                Error::TestIsolation(format!("the harness's connect task failed: {e}"))
            })??;
            empty.insert(c)
        }
    };
    let r = diesel::sql_query(BLOCKERS_SQL)
        .bind::<diesel::sql_types::Integer, _>(pid)
        .get_result::<Who>(conn)
        .await;
    match r {
        Ok(w) => Ok(w.who),
        Err(e) => {
            *slot = None;
            Err(e.into())
        }
    }
}

/// How often the watchdog looks at the test's connection, and how long a
/// request must have been waiting before it asks the server who blocks it.
pub(super) const WATCH_EVERY: Duration = Duration::from_millis(100);
pub(super) const ASK_AFTER: Duration = Duration::from_millis(200);

/// Runs beside a test: while one of the test's requests has been waiting for
/// longer than [`ASK_AFTER`], asks the server (on the observer connection)
/// who blocks the test's backend, and records it for the error the test gets
/// if it gives up, and for the failure message. Costs nothing while the
/// test's requests are answered promptly.
pub(super) async fn watch_locks(
    admin: ConnectTarget,
    pid: i32,
    wire: Arc<railyard::conn::wire::WireState>,
    contention: Arc<Contention>,
    seen: Arc<Blockers>,
) {
    let mut waiting: Option<(u64, tokio::time::Instant)> = None;
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        if wire.is_closed() {
            return;
        }
        if wire.in_flight() == 0 {
            waiting = None;
            continue;
        }
        let ready = wire.ready_count();
        let since = match waiting {
            Some((r, since)) if r == ready => since,
            _ => {
                waiting = Some((ready, tokio::time::Instant::now()));
                continue;
            }
        };
        if since.elapsed() < ASK_AFTER {
            continue;
        }
        match tokio::time::timeout(Duration::from_secs(2), blockers_of(&admin, pid)).await {
            Ok(Ok(Some(who))) => {
                contention.blockers.saw(who.clone());
                seen.saw(who);
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::debug!(target: "railyard::test", error = %e, "the lock watchdog could not ask who blocks the test")
            }
            Err(_) => {
                tracing::debug!(target: "railyard::test", "the lock watchdog's question timed out")
            }
        }
    }
}
