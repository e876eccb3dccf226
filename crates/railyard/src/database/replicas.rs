//! Probing the replicas: [`Database::replica_report`] and what it finds.

use super::*;

/// The state of one replica, as probed by [`Database::replica_report`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReplicaReport {
    /// The replica's URL (password redacted).
    pub target: String,
    /// What the probe found.
    pub state: ReplicaState,
}

/// What a replica probe found.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ReplicaState {
    /// A connection was opened and the probe answered.
    Reachable {
        /// Whether it is in recovery (a standby).
        role: ServerRole,
        /// Whether its WAL receiver is streaming.
        streaming: bool,
        /// WAL bytes between the primary's current position and the replica's
        /// replay, when both are known.
        lag_bytes: Option<u64>,
        /// Time since the last replayed transaction committed on the primary;
        /// `None` before any replay (meaningless on an idle primary, so read it
        /// with the bytes).
        replay_delay: Option<Duration>,
    },
    /// No connection, or the probe failed.
    Unreachable {
        /// Why.
        error: String,
    },
}

impl Database {
    /// Probes each replica: reachable, in recovery, streaming, and its lag.
    pub async fn replica_report(&self) -> Vec<ReplicaReport> {
        #[derive(QueryableByName)]
        struct Position {
            #[diesel(sql_type = diesel::pg::sql_types::PgLsn)]
            lsn: diesel::pg::data_types::PgLsn,
        }
        #[derive(QueryableByName)]
        struct Probe {
            #[diesel(sql_type = diesel::sql_types::Bool)]
            in_recovery: bool,
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::pg::sql_types::PgLsn>)]
            replay_lsn: Option<diesel::pg::data_types::PgLsn>,
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
            receiver: Option<String>,
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Double>)]
            delay_secs: Option<f64>,
        }
        let primary_lsn = match self.checkout(Want::Primary).await {
            Ok(mut c) => diesel::sql_query("SELECT pg_current_wal_lsn() AS lsn")
                .get_result::<Position>(&mut **c)
                .await
                .ok()
                .map(|p| p.lsn.0),
            Err(_) => None,
        };
        let mut out = Vec::new();
        for (i, target) in self.inner.config.replicas.iter().enumerate() {
            let probe = async {
                let mut c = self.checkout(Want::Replica(i)).await?;
                let p: Probe = diesel::sql_query(
                    "SELECT pg_is_in_recovery() AS in_recovery, pg_last_wal_replay_lsn() AS replay_lsn, \
                     (SELECT status FROM pg_stat_wal_receiver LIMIT 1) AS receiver, \
                     extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS delay_secs",
                )
                .get_result(&mut **c)
                .await?;
                Ok::<_, Error>(p)
            };
            let state = match probe.await {
                Ok(p) => ReplicaState::Reachable {
                    role: if p.in_recovery {
                        ServerRole::Standby
                    } else {
                        ServerRole::Primary
                    },
                    streaming: p.receiver.as_deref() == Some("streaming"),
                    lag_bytes: match (primary_lsn, p.replay_lsn.map(|l| l.0)) {
                        (Some(a), Some(b)) => Some(a.saturating_sub(b)),
                        _ => None,
                    },
                    replay_delay: p.delay_secs.map(|s| Duration::from_secs_f64(s.max(0.0))),
                },
                Err(e) => ReplicaState::Unreachable {
                    error: e.to_string(),
                },
            };
            out.push(ReplicaReport {
                target: target.to_string(),
                state,
            });
        }
        out
    }
}
