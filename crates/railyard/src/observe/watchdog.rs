//! The long-running statement watchdog: on a dedicated connection, every
//! interval, it finds this handle's own backends running one statement for
//! longer than the limit, sends each a cancel request (`pg_cancel_backend`,
//! allowed for one's own role without superuser), and logs the statement's
//! shape on the audit target.
//!
//! Its own backends: the pids of the connections this `Database` opened (its
//! gate's registry), in the same database, under the same user and with the
//! same `application_name`. A name alone is no owner: every program that
//! keeps the default name, in any database of the server, shares it.
//!
//! The shape is the statement text as `pg_stat_activity` shows it, normalised:
//! string and numeric constants become `?`. Bind parameters never appear there
//! (the extended protocol shows `$1`), so no value reaches the log.

use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Bool, Double, Integer, Text};
use diesel_async::RunQueryDsl;

use crate::conn::open::Opener;

/// The watchdog's settings: cancel statements of this application that run
/// longer than a limit.
///
/// ```
/// use std::time::Duration;
/// let w = railyard::observe::Watchdog::cancel_after(Duration::from_secs(30));
/// assert_eq!(w.limit(), Duration::from_secs(30));
/// assert_eq!(w.interval(), Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watchdog {
    limit: Duration,
    interval: Duration,
}

impl Watchdog {
    /// Cancels statements running longer than `limit` (at least
    /// [`MIN_WATCHDOG_LIMIT`](crate::config::MIN_WATCHDOG_LIMIT), 10 ms),
    /// looking every quarter of it (between 50 ms and 1 s): a statement is
    /// cancelled within `limit` plus one interval.
    pub fn cancel_after(limit: Duration) -> Self {
        let limit = limit.max(crate::config::MIN_WATCHDOG_LIMIT);
        Watchdog {
            limit,
            interval: (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)),
        }
    }

    /// The limit.
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// How often it looks.
    pub fn interval(&self) -> Duration {
        self.interval
    }
}

/// The running watchdog; dropping it stops it.
#[derive(Debug)]
pub(crate) struct Running(tokio::task::JoinHandle<()>);

impl Running {
    /// Wraps a background task: dropping the result aborts it.
    pub(crate) fn new(task: tokio::task::JoinHandle<()>) -> Self {
        Running(task)
    }

    /// Stops the task now.
    pub(crate) fn stop(&self) {
        self.0.abort();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(QueryableByName)]
struct Cancelled {
    #[diesel(sql_type = Integer)]
    pid: i32,
    #[diesel(sql_type = BigInt)]
    running_ms: i64,
    #[diesel(sql_type = Text)]
    query: String,
    #[diesel(sql_type = Bool)]
    cancelled: bool,
}

/// Finds this handle's statements over the limit and cancels them, in one
/// statement (`clock_timestamp`: `now()` would be the transaction's start).
const SWEEP: &str = "SELECT pid, (extract(epoch FROM clock_timestamp() - query_start) * 1000)::bigint AS running_ms, \
     coalesce(query, '') AS query, pg_cancel_backend(pid) AS cancelled \
     FROM pg_stat_activity \
     WHERE pid = ANY($3) AND datname = current_database() AND usename = current_user \
       AND application_name = $1 AND state = 'active' AND backend_type = 'client backend' \
       AND pid <> pg_backend_pid() \
       AND query_start < clock_timestamp() - make_interval(secs => $2)";

/// Starts the watchdog on connections from `opener`, for the backends its
/// gate registered and named `application_name`.
pub(crate) fn spawn(w: Watchdog, opener: Opener, application_name: String) -> Running {
    Running::new(tokio::spawn(async move {
        let mut conn = None;
        loop {
            tokio::time::sleep(w.interval).await;
            if conn.is_none() {
                conn = opener.open().await.ok();
            }
            let Some(c) = conn.as_mut() else { continue };
            let ours = opener.gate().map(|g| g.backend_pids()).unwrap_or_default();
            if ours.is_empty() {
                continue;
            }
            let swept = tokio::time::timeout(
                w.interval.max(Duration::from_secs(1)),
                diesel::sql_query(SWEEP)
                    .bind::<Text, _>(&application_name)
                    .bind::<Double, _>(w.limit.as_secs_f64())
                    .bind::<Array<Integer>, _>(&ours)
                    .load::<Cancelled>(c),
            )
            .await;
            match swept {
                Ok(Ok(rows)) => {
                    for r in rows {
                        let mut shape = String::new();
                        super::stats::normalize_into(&r.query, &mut shape);
                        tracing::warn!(
                            target: "railyard::audit",
                            operation = "CANCEL",
                            pid = r.pid,
                            running_ms = r.running_ms,
                            limit_ms = w.limit.as_millis() as u64,
                            cancelled = r.cancelled,
                            statement = %shape,
                            "cancelled a statement running longer than the watchdog's limit"
                        );
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(target: "railyard::watchdog", error = %e, "watchdog sweep failed");
                    conn = None;
                }
                Err(_) => conn = None,
            }
        }
    }))
}
