//! `railyard queries`: the running statements, longest first.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use railyard::Database;

use super::config;
use crate::app;

pub(crate) async fn queries(all: bool) -> Result<(), app::AppError> {
    use diesel::sql_types::{BigInt, Integer, Text};
    #[derive(QueryableByName)]
    struct Running {
        #[diesel(sql_type = Integer)]
        pid: i32,
        #[diesel(sql_type = Text)]
        application_name: String,
        #[diesel(sql_type = Text)]
        state: String,
        #[diesel(sql_type = BigInt)]
        running_ms: i64,
        #[diesel(sql_type = Text)]
        wait: String,
        #[diesel(sql_type = Text)]
        blocked_by: String,
        #[diesel(sql_type = Text)]
        query: String,
    }
    let (config, _cluster) = config().await?;
    let name = config.effective_application_name().to_owned();
    let db = Database::connect(config.pool_max_size(1)).await?;
    let mut conn = db.primary().await?;
    let rows: Vec<Running> = diesel::sql_query(
        "SELECT pid, coalesce(application_name, '') AS application_name, coalesce(state, '') AS state, \
           coalesce((extract(epoch FROM clock_timestamp() - query_start) * 1000)::bigint, 0) AS running_ms, \
           coalesce(wait_event_type || ':' || wait_event, '') AS wait, \
           array_to_string(pg_blocking_pids(pid), ',') AS blocked_by, coalesce(query, '') AS query \
         FROM pg_stat_activity \
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND datname = current_database() \
           AND state <> 'idle' AND ($1 OR application_name = $2) \
         ORDER BY query_start",
    )
    .bind::<diesel::sql_types::Bool, _>(all)
    .bind::<Text, _>(&name)
    .load(&mut **conn)
    .await?;
    drop(conn);
    out!(
        "{:>7} {:>10} {:<20} {:<24} {:<10} statement",
        "pid",
        "running",
        "state",
        "wait",
        "blocked by"
    );
    for r in &rows {
        out!(
            "{:>7} {:>8}ms {:<20} {:<24} {:<10} {}{}",
            r.pid,
            r.running_ms,
            r.state,
            r.wait,
            r.blocked_by,
            if all {
                format!("[{}] ", r.application_name)
            } else {
                String::new()
            },
            railyard::observe::statement_shape(r.query.trim())
        );
    }
    if rows.is_empty() {
        out!(
            "(no running statements of {})",
            if all { "any client" } else { name.as_str() }
        );
    }
    db.close(std::time::Duration::from_secs(5)).await;
    Ok(())
}
