//! The background monitors: one samples the primary's WAL position, one per
//! replica polls its replay position, recovery state and lag, at a jittered
//! interval, and ejects or re-admits it.

use super::*;

pub(super) fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.75..=1.25))
}

#[derive(QueryableByName)]
pub(super) struct PrimaryProbe {
    #[diesel(sql_type = diesel::pg::sql_types::PgLsn)]
    lsn: diesel::pg::data_types::PgLsn,
    #[diesel(sql_type = diesel::pg::sql_types::PgLsn)]
    insert_lsn: diesel::pg::data_types::PgLsn,
}

#[derive(QueryableByName)]
pub(super) struct ReplicaProbe {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    in_recovery: bool,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::pg::sql_types::PgLsn>)]
    replay: Option<diesel::pg::data_types::PgLsn>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
    replay_age: Option<f64>,
}

pub(super) async fn probe<T: QueryableByName<diesel::pg::Pg> + Send + 'static>(
    conn: &mut Conn,
    timeout: Duration,
    sql: &'static str,
) -> Result<T, Error> {
    use diesel_async::RunQueryDsl;
    let sql_timeout = format!(
        "SET LOCAL statement_timeout = {}",
        timeout.as_millis().max(1)
    );
    let work = conn.transaction(async move |c| {
        diesel::sql_query(sql_timeout).execute(c).await?;
        Ok::<T, Error>(diesel::sql_query(sql).get_result::<T>(c).await?)
    });
    match tokio::time::timeout(timeout + Duration::from_millis(500), work).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            deadline: timeout,
            attempts: 1,
            last: None,
        }),
    }
}

pub(super) async fn monitor_primary(router: Weak<Router>, opener: Opener) {
    let mut conn = None;
    loop {
        let Some(r) = router.upgrade() else { return };
        if r.stopped.load(Ordering::Relaxed) {
            return;
        }
        let interval = r.config.check_interval;
        let timeout = r.config.check_timeout;
        if conn.is_none() {
            conn = opener.open().await.ok();
        }
        if let Some(c) = conn.as_mut() {
            // Numbered before the query is sent: it runs after every read that
            // ended before this point (see `Router::after_primary_read`).
            let sample = r.begin_primary_sample();
            // The write position measures lag (a replica can replay only what
            // was written); the insert position is past every commit record,
            // even one not yet flushed (synchronous_commit = off) but already
            // visible to readers, so it is what a floor resolves to.
            match probe::<PrimaryProbe>(
                c,
                timeout,
                "SELECT pg_current_wal_lsn() AS lsn, pg_current_wal_insert_lsn() AS insert_lsn",
            )
            .await
            {
                Ok(p) => r.end_primary_sample(sample, p.lsn.0, p.insert_lsn.0),
                Err(e) => {
                    tracing::debug!(target: "railyard::route", error = %e, "primary WAL probe failed");
                    conn = None;
                }
            }
        }
        drop(r);
        tokio::time::sleep(jittered(interval)).await;
    }
}

pub(super) async fn monitor_replica(router: Weak<Router>, node: Arc<ReplicaNode>) {
    let mut conn = None;
    loop {
        let Some(r) = router.upgrade() else { return };
        if r.stopped.load(Ordering::Relaxed) {
            return;
        }
        let cfg = r.config.clone();
        let result = async {
            if conn.is_none() {
                conn = Some(node.opener.open().await?);
            }
            let c = conn.as_mut().expect("opened just above");
            probe::<ReplicaProbe>(
                c,
                cfg.check_timeout,
                "SELECT pg_is_in_recovery() AS in_recovery, pg_last_wal_replay_lsn() AS replay, \
                 extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS replay_age",
            )
            .await
        }
        .await;
        match result {
            Ok(p) if !p.in_recovery => {
                node.set_status(ReplicaStatus::Promoted);
                *node.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some("recovery ended: the server was promoted".into());
            }
            Ok(p) => {
                // NULL before the standby replayed anything: nothing yet.
                let replay = p.replay.map_or(0, |l| l.0);
                node.replay_lsn.fetch_max(replay, Ordering::AcqRel);
                let primary = r.primary_lsn.load(Ordering::Acquire);
                let lag_bytes = primary.saturating_sub(replay);
                // Time lag means something only while WAL is pending: on an idle
                // primary the last replayed commit simply gets old.
                let lag = if lag_bytes > 0 {
                    Duration::from_secs_f64(p.replay_age.unwrap_or(0.0).max(0.0))
                } else {
                    Duration::ZERO
                };
                node.lag_bytes.store(lag_bytes, Ordering::Relaxed);
                node.lag_ms.store(lag.as_millis() as u64, Ordering::Relaxed);
                let lagging = lag_bytes > cfg.max_lag_bytes || lag > cfg.max_lag;
                if lagging {
                    node.good_checks.store(0, Ordering::Relaxed);
                    node.set_status(ReplicaStatus::Lagging);
                } else {
                    let good = node.good_checks.fetch_add(1, Ordering::Relaxed) + 1;
                    let status = node.status();
                    let admit = match status {
                        ReplicaStatus::Unknown | ReplicaStatus::Healthy => true,
                        _ => good >= cfg.readmit_after,
                    };
                    if admit {
                        node.set_status(ReplicaStatus::Healthy);
                        *node.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    }
                }
            }
            Err(e) => {
                conn = None;
                node.good_checks.store(0, Ordering::Relaxed);
                if node.status() != ReplicaStatus::Promoted {
                    node.set_status(ReplicaStatus::Down);
                }
                *node.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
        }
        r.changed.notify_waiters();
        drop(r);
        tokio::time::sleep(jittered(cfg.check_interval)).await;
    }
}
