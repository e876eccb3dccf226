//! The reader behind a change stream: it peeks at the slot, decodes
//! pgoutput, delivers the events after the last one delivered, moves the
//! slot past what was acknowledged, measures the WAL it retains, and
//! reconnects (or ends the stream when the slot is gone).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Binary, Nullable, Text};
use diesel_async::RunQueryDsl;
use railyard::Database;

use super::board::SlotBoard;
use super::slot::Exists;
use super::stream::Acks;
use super::{
    ChangeEvent, ChangeOp, ChangeStreamConfig, ResumeToken, Row, lsn_text, pgoutput, unix_ms,
};
use crate::error::Error;

#[derive(QueryableByName)]
struct Change {
    #[diesel(sql_type = Binary)]
    data: Vec<u8>,
}

#[derive(QueryableByName)]
struct Retained {
    #[diesel(sql_type = Nullable<BigInt>)]
    bytes: Option<i64>,
}

fn slot_lost(e: &Error) -> bool {
    let Error::Core(e) = e else {
        return false;
    };
    e.sqlstate()
        .is_some_and(|s| *s == tokio_postgres::error::SqlState::UNDEFINED_OBJECT)
        || e.to_string().contains("does not exist")
}

/// A change before its transaction's end gives it a token: op, table, key,
/// new row, old key.
type Pending = (ChangeOp, String, Row, Option<Row>, Option<Row>);

/// One transaction's changes as they are decoded.
struct Txn {
    commit_lsn: u64,
    commit_time: i64,
    events: Vec<Pending>,
}

/// The reader's task: steps until the consumer is gone, the slot is lost or
/// the database closed; an idle step waits for an acknowledgement or the
/// poll interval, a failed one reconnects with a growing backoff.
pub(super) async fn run(
    db: Database,
    mut conn: railyard::conn::Conn,
    config: ChangeStreamConfig,
    publication: String,
    tx: tokio::sync::mpsc::Sender<Result<ChangeEvent, Error>>,
    acks: Arc<Acks>,
) {
    let mut state = ReadState {
        delivered: config.from.map(|t| t.position()),
        advanced: 0,
        pending: Default::default(),
        measured: None,
        window: 2048,
        warned: false,
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        if tx.is_closed() {
            return;
        }
        let upto = *acks.upto.lock().unwrap_or_else(|p| p.into_inner());
        let acked = acked_upto(upto, &state.pending);
        let step = state
            .step(&db, &mut conn, &config, &publication, &tx, acked)
            .await;
        match step {
            Ok(0) => {
                backoff = Duration::from_millis(100);
                tokio::select! {
                    () = acks.notify.notified() => {}
                    () = tokio::time::sleep(config.poll) => {}
                }
            }
            Ok(_) => backoff = Duration::from_millis(100),
            Err(e) if slot_lost(&e) => {
                if let Some(f) = SlotBoard::of(&db)
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&config.slot)
                {
                    f.lost = true;
                }
                let _ = tx
                    .send(Err(Error::Changes(format!(
                        "the replication slot {:?} is gone from the primary (after a failover PostgreSQL 15 does not keep logical slots): changes since the last acknowledgement cannot be read; take a fresh snapshot of the tables and start a new stream",
                        config.slot
                    ))))
                    .await;
                return;
            }
            Err(e) => {
                tracing::debug!(target: "railyard::changes", slot = %config.slot, error = %e, "change stream reconnecting");
                if db.is_closed() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                if let Ok(c) = db.dedicated_primary().await {
                    conn = c;
                }
            }
        }
    }
}

/// How far the slot may move: past the acknowledged token's own
/// transaction when it was its last event, else past the ones before it.
fn acked_upto(upto: Option<ResumeToken>, pending: &VecDeque<(u64, usize)>) -> u64 {
    match upto {
        None => 0,
        Some(t) if t.ends_transaction() => t.end_lsn,
        Some(t) => pending
            .iter()
            .map(|(end, _)| *end)
            .filter(|end| *end < t.end_lsn)
            .max()
            .unwrap_or(0),
    }
}

/// What the reader keeps from one step to the next.
struct ReadState {
    /// The last event delivered.
    delivered: Option<(u64, u32)>,
    /// Where the slot was last moved to.
    advanced: u64,
    /// Transactions delivered (wholly or partly) that the slot has not moved
    /// past: their end positions and events delivered; bounded by
    /// `max_unacked`.
    pending: VecDeque<(u64, usize)>,
    /// When the retained WAL was last measured.
    measured: Option<Instant>,
    /// Rows asked of each peek: it starts at the slot's position, so rows
    /// already delivered (or skipped after a restart) come again; when a full
    /// window held nothing new, the next one is larger.
    window: usize,
    /// Whether the retained WAL is over its limit and was warned about.
    warned: bool,
}

impl ReadState {
    /// One step: moves the slot past `acked`, measures the retained WAL
    /// (every 2 s), then reads and delivers; the events sent (0: idle).
    async fn step(
        &mut self,
        db: &Database,
        conn: &mut railyard::conn::Conn,
        config: &ChangeStreamConfig,
        publication: &str,
        tx: &tokio::sync::mpsc::Sender<Result<ChangeEvent, Error>>,
        acked: u64,
    ) -> Result<usize, Error> {
        if acked > self.advanced {
            diesel::sql_query(
                "SELECT 1::int8 AS n FROM pg_replication_slot_advance($1, $2::pg_lsn)",
            )
            .bind::<Text, _>(&config.slot)
            .bind::<Text, _>(lsn_text(acked))
            .load::<Exists>(conn)
            .await?;
            self.advanced = acked;
            while self.pending.front().is_some_and(|(end, _)| *end <= acked) {
                self.pending.pop_front();
            }
        }
        let unacked: usize = self.pending.iter().map(|(_, n)| n).sum();
        if self
            .measured
            .is_none_or(|m| m.elapsed() >= Duration::from_secs(2))
        {
            self.measured = Some(Instant::now());
            self.measure(db, conn, config).await?;
        }
        if unacked >= config.max_unacked {
            return Ok(0);
        }
        self.read(conn, config, publication, tx, unacked).await
    }

    /// Measures the WAL the slot retains, for the handle's health and
    /// metrics, and warns once when it passes the limit.
    async fn measure(
        &mut self,
        db: &Database,
        conn: &mut railyard::conn::Conn,
        config: &ChangeStreamConfig,
    ) -> Result<(), Error> {
        let r: Vec<Retained> = diesel::sql_query(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 AS bytes \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind::<Text, _>(&config.slot)
        .load(conn)
        .await?;
        let Some(r) = r.into_iter().next() else {
            return Err(Error::Changes(format!(
                "the replication slot {:?} does not exist",
                config.slot
            )));
        };
        let bytes = r.bytes.unwrap_or(0).max(0) as u64;
        if let Some(f) = SlotBoard::of(db)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&config.slot)
        {
            f.retained_bytes = Some(bytes);
        }
        if bytes > config.warn_retained_bytes && !self.warned {
            self.warned = true;
            tracing::warn!(target: "railyard::changes", slot = %config.slot, retained_bytes = bytes, limit = config.warn_retained_bytes, "a change stream's slot retains more WAL than its limit: acknowledge events, or drop the slot if it is abandoned (Database::drop_change_slot)");
        } else if bytes <= config.warn_retained_bytes {
            self.warned = false;
        }
        Ok(())
    }

    /// Peeks at the slot's changes and delivers those after the last one
    /// delivered; the events sent, or `usize::MAX` when a full window held
    /// nothing new (the next peek looks further).
    async fn read(
        &mut self,
        conn: &mut railyard::conn::Conn,
        config: &ChangeStreamConfig,
        publication: &str,
        tx: &tokio::sync::mpsc::Sender<Result<ChangeEvent, Error>>,
        unacked: usize,
    ) -> Result<usize, Error> {
        let asked = (self.window + unacked * 2).min(i32::MAX as usize);
        let rows: Vec<Change> = diesel::sql_query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, \
             'proto_version', '1', 'publication_names', $3)",
        )
        .bind::<Text, _>(&config.slot)
        .bind::<diesel::sql_types::Integer, _>(asked as i32)
        .bind::<Text, _>(publication)
        .load(conn)
        .await?;
        let full = rows.len() >= asked;
        let mut relations: BTreeMap<u32, pgoutput::Relation> = BTreeMap::new();
        let mut txn: Option<Txn> = None;
        let mut sent = 0;
        for row in rows {
            let m = pgoutput::decode(&row.data)
                .map_err(|e| Error::Changes(format!("an undecodable pgoutput message: {e}")))?;
            match m {
                pgoutput::Message::Commit { end_lsn, .. } => {
                    let Some(t) = txn.take() else { continue };
                    if let Some(r) = self.deliver(t, end_lsn, tx, config, &mut sent).await {
                        return Ok(r);
                    }
                }
                m => collect(m, &mut relations, &mut txn),
            }
        }
        if sent == 0 && full {
            // A full window of what was already delivered: look further.
            self.window = (self.window * 2).min(1 << 22);
            return Ok(usize::MAX);
        }
        if sent > 0 {
            self.window = 2048;
        }
        Ok(sent)
    }

    /// Delivers a committed transaction's events after the last one
    /// delivered, counting them in `sent`; `Some` ends the step with that
    /// value (the consumer is gone, or `max_unacked` is reached).
    async fn deliver(
        &mut self,
        t: Txn,
        end_lsn: u64,
        tx: &tokio::sync::mpsc::Sender<Result<ChangeEvent, Error>>,
        config: &ChangeStreamConfig,
        sent: &mut usize,
    ) -> Option<usize> {
        let count = t.events.len() as u32;
        for (index, (op, table, key, new, old_key)) in t.events.into_iter().enumerate() {
            let token = ResumeToken {
                end_lsn,
                index: index as u32,
                count,
            };
            if self.delivered.is_some_and(|d| token.position() <= d) {
                continue;
            }
            let event = ChangeEvent {
                token,
                op,
                table,
                key,
                new,
                old_key: if op == ChangeOp::Delete {
                    old_key
                } else {
                    old_key.filter(|o| !o.is_empty())
                },
                commit_lsn: lsn_text(t.commit_lsn),
                commit_time_ms: unix_ms(t.commit_time),
            };
            if tx.send(Ok(event)).await.is_err() {
                return Some(0);
            }
            self.delivered = Some(token.position());
            match self.pending.back_mut() {
                Some((end, n)) if *end == token.end_lsn => *n += 1,
                _ => self.pending.push_back((token.end_lsn, 1)),
            }
            *sent += 1;
            if self.pending.iter().map(|(_, n)| n).sum::<usize>() >= config.max_unacked {
                return Some(*sent);
            }
        }
        None
    }
}

/// Takes in a decoded message other than a commit: a transaction's start,
/// a relation's description, or a row change of the open transaction.
fn collect(
    m: pgoutput::Message,
    relations: &mut BTreeMap<u32, pgoutput::Relation>,
    txn: &mut Option<Txn>,
) {
    match m {
        pgoutput::Message::Begin {
            final_lsn,
            commit_time,
        } => {
            *txn = Some(Txn {
                commit_lsn: final_lsn,
                commit_time,
                events: Vec::new(),
            });
        }
        pgoutput::Message::Relation(oid, r) => {
            relations.insert(oid, r);
        }
        pgoutput::Message::Insert { relation, new } => {
            if let (Some(t), Some(r)) = (txn.as_mut(), relations.get(&relation)) {
                let table = format!("{}.{}", r.schema, r.name);
                t.events.push((
                    ChangeOp::Insert,
                    table,
                    pgoutput::row(r, &new, true),
                    Some(pgoutput::row(r, &new, false)),
                    None,
                ));
            }
        }
        pgoutput::Message::Update { relation, old, new } => {
            if let (Some(t), Some(r)) = (txn.as_mut(), relations.get(&relation)) {
                let table = format!("{}.{}", r.schema, r.name);
                t.events.push((
                    ChangeOp::Update,
                    table,
                    pgoutput::row(r, &new, true),
                    Some(pgoutput::row(r, &new, false)),
                    old.map(|o| pgoutput::row(r, &o, true)),
                ));
            }
        }
        pgoutput::Message::Delete { relation, old } => {
            if let (Some(t), Some(r)) = (txn.as_mut(), relations.get(&relation)) {
                let table = format!("{}.{}", r.schema, r.name);
                let key = pgoutput::row(r, &old, true);
                t.events
                    .push((ChangeOp::Delete, table, key.clone(), None, Some(key)));
            }
        }
        pgoutput::Message::Commit { .. } | pgoutput::Message::Other(_) => {}
    }
}
