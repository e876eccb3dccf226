//! A durable stream of row changes from a logical replication slot, with
//! resume tokens.
//!
//! [`DatabaseEvents::changes`](crate::DatabaseEvents::changes) reads the slot through the SQL function
//! `pg_logical_slot_peek_binary_changes` with the built-in `pgoutput`
//! plugin, on a connection of its own. Why these: pgoutput ships with
//! PostgreSQL (wal2json and the like are packages a server may not have),
//! and the SQL functions work over any ordinary connection, through the same
//! TLS, tap and failover as every other, where the streaming replication
//! protocol needs a replication connection that neither tokio-postgres nor
//! diesel-async speaks.
//!
//! Each event carries a [`ResumeToken`]: its transaction's end position,
//! its index in the transaction and the transaction's size. Peeking does not
//! consume: the slot moves only when the consumer [acknowledges](ChangeStream::ack)
//! the last event of a transaction (`pg_replication_slot_advance` to its end),
//! so a consumer that crashes and starts again from its last token gets
//! every change after it, at least once, and none before it. Transactions
//! come in commit order. Memory is bounded: at most [`CHANGE_BUFFER`] events
//! wait in the stream and at most `max_unacked` are delivered unacknowledged;
//! beyond that nothing more is read and the changes wait in the WAL.
//!
//! A slot keeps WAL on the primary until it is advanced, so a dead consumer
//! fills the primary's disk: the stream measures the WAL its slot retains
//! every few seconds, shows it in `Database::health` (degraded over the
//! limit) and `/metrics`, and warns on `railyard::changes`. An abandoned
//! slot is dropped with [`DatabaseEvents::drop_change_slot`](crate::DatabaseEvents::drop_change_slot) (or
//! `SELECT pg_drop_replication_slot('name')`).
//!
//! PostgreSQL 15 does not copy logical slots to standbys: after a failover
//! the slot is gone on the new primary. The stream then ends with
//! [`Error::Changes`] saying so; the safe recovery is to read the tables
//! afresh (a snapshot at a known point) and start a new slot, accepting that
//! changes between the old slot's last acknowledgement and the snapshot are
//! in the snapshot rather than in the stream.

mod pgoutput;

use std::collections::BTreeMap;
use std::fmt;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Binary, Nullable, Text};
use diesel_async::RunQueryDsl;
use serde::Serialize;

use crate::error::Error;
use railyard::Database;
use railyard::database::Attachment;
use railyard::observe::HealthCheck;

pub use pgoutput::Row;

/// Events waiting in a [`ChangeStream`] at most.
pub const CHANGE_BUFFER: usize = 256;

/// Where an event is in the slot's history; start a stream after it with
/// [`ChangeStreamConfig::from`]. Its text form (`Display`/`FromStr`) is
/// `END_LSN_HEX.INDEX.COUNT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResumeToken {
    end_lsn: u64,
    index: u32,
    count: u32,
}

impl ResumeToken {
    /// Whether this is the last event of its transaction (acknowledging it
    /// lets the slot move past the transaction).
    pub fn ends_transaction(&self) -> bool {
        self.index + 1 >= self.count
    }

    fn position(&self) -> (u64, u32) {
        (self.end_lsn, self.index)
    }
}

impl fmt::Display for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}.{}.{}", self.end_lsn, self.index, self.count)
    }
}

impl Serialize for ResumeToken {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl FromStr for ResumeToken {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::Changes(
                "a resume token is END_LSN_HEX.INDEX.COUNT, as a change event printed it".into(),
            )
        };
        let mut parts = s.trim().split('.');
        let end_lsn = u64::from_str_radix(parts.next().ok_or_else(bad)?, 16).map_err(|_| bad())?;
        let index = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let count: u32 = parts.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        if parts.next().is_some() || index >= count {
            return Err(bad());
        }
        Ok(ResumeToken {
            end_lsn,
            index,
            count,
        })
    }
}

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeOp {
    /// A new row.
    Insert,
    /// A changed row.
    Update,
    /// A removed row.
    Delete,
}

/// One row change.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ChangeEvent {
    /// Where it is: acknowledge it, or start after it.
    pub token: ResumeToken,
    /// Insert, update or delete.
    pub op: ChangeOp,
    /// `schema.table`.
    pub table: String,
    /// The row's key (its replica identity, by default the primary key).
    pub key: Row,
    /// The new row (insert, update), as text.
    pub new: Option<Row>,
    /// The old key, when an update changed it (or the replica identity is
    /// `FULL`: the old row).
    pub old_key: Option<Row>,
    /// The transaction's commit position (`X/Y`).
    pub commit_lsn: String,
    /// When it committed, ms since 1970.
    pub commit_time_ms: i64,
}

/// How to stream changes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ChangeStreamConfig {
    /// The tables (`name` or `schema.name`).
    pub tables: Vec<String>,
    /// The slot's name (lowercase letters, digits, `_`).
    pub slot: String,
    /// Start after this token (the last one acknowledged). A token the
    /// slot has already moved past is refused with [`Error::Changes`]: the
    /// changes between them cannot be read again.
    pub from: Option<ResumeToken>,
    /// Create the slot and its publication when missing (default true).
    pub create: bool,
    /// Events delivered and not acknowledged at most (default 10,000).
    pub max_unacked: usize,
    /// Between reads of an idle slot (default 100 ms).
    pub poll: Duration,
    /// Retained WAL over which the slot is reported (default 1 GiB).
    pub warn_retained_bytes: u64,
}

impl ChangeStreamConfig {
    /// Streams `tables` through `slot`.
    ///
    /// ```
    /// let c = railyard_events::ChangeStreamConfig::new("ledger_events", ["trades", "orders"]);
    /// assert!(c.create);
    /// ```
    pub fn new<I, S>(slot: &str, tables: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ChangeStreamConfig {
            tables: tables.into_iter().map(Into::into).collect(),
            slot: slot.to_owned(),
            from: None,
            create: true,
            max_unacked: 10_000,
            poll: Duration::from_millis(100),
            warn_retained_bytes: 1 << 30,
        }
    }

    /// Starts after `token` (refused when the slot has moved past it).
    #[must_use]
    pub fn from(mut self, token: ResumeToken) -> Self {
        self.from = Some(token);
        self
    }

    /// Events delivered and not acknowledged at most.
    #[must_use]
    pub fn max_unacked(mut self, n: usize) -> Self {
        self.max_unacked = n.max(1);
        self
    }

    /// The retained-WAL limit.
    #[must_use]
    pub fn warn_retained_bytes(mut self, bytes: u64) -> Self {
        self.warn_retained_bytes = bytes;
        self
    }
}

/// What the stream last measured of its slot (shared with the handle's
/// health and metrics).
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotFigures {
    pub(crate) retained_bytes: Option<u64>,
    pub(crate) limit: u64,
    pub(crate) lost: bool,
}

pub(crate) type Slots = Arc<Mutex<BTreeMap<String, SlotFigures>>>;

/// The change streams' slots of one handle, shown by its health and metrics.
#[derive(Default)]
pub(crate) struct SlotBoard(Slots);

impl SlotBoard {
    fn of(db: &Database) -> Slots {
        db.attachment::<SlotBoard>().0.clone()
    }
}

impl Attachment for SlotBoard {
    fn health_checks(&self) -> Vec<HealthCheck> {
        let slots = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .map(|(name, f)| {
                railyard::observe::health::slot(name, f.retained_bytes, f.limit, f.lost)
            })
            .collect()
    }

    fn metrics_text(&self, out: &mut String) {
        let slots = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slots.is_empty() {
            return;
        }
        out.push_str("# HELP railyard_slot_retained_bytes WAL a change stream's slot keeps on the primary.\n# TYPE railyard_slot_retained_bytes gauge\n");
        for (name, f) in slots.iter() {
            if let Some(b) = f.retained_bytes {
                out.push_str(&format!(
                    "railyard_slot_retained_bytes{{slot=\"{name}\"}} {b}\n"
                ));
            }
        }
    }
}

#[derive(Debug, Default)]
struct Acks {
    /// The furthest token acknowledged.
    upto: Mutex<Option<ResumeToken>>,
    notify: tokio::sync::Notify,
}

/// A stream of [`ChangeEvent`]s (see [`DatabaseEvents::changes`](crate::DatabaseEvents::changes)).
#[derive(Debug)]
pub struct ChangeStream {
    rx: tokio::sync::mpsc::Receiver<Result<ChangeEvent, Error>>,
    acks: Arc<Acks>,
    slot: String,
    slots: Slots,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ChangeStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ChangeStream {
    /// The next event; `None` when the stream ended (after an error item).
    pub async fn next(&mut self) -> Option<Result<ChangeEvent, Error>> {
        self.rx.recv().await
    }

    /// Acknowledges every event up to `token`: the slot moves past every
    /// transaction wholly acknowledged (asynchronously), whose changes are
    /// then never delivered again.
    pub fn ack(&self, token: &ResumeToken) {
        let mut upto = self.acks.upto.lock().unwrap_or_else(|p| p.into_inner());
        if upto.is_none_or(|u| *token > u) {
            *upto = Some(*token);
            drop(upto);
            self.acks.notify.notify_one();
        }
    }

    /// The WAL the slot retains on the primary, as last measured.
    pub fn retained_bytes(&self) -> Option<u64> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&self.slot)
            .and_then(|f| f.retained_bytes)
    }
}

impl futures_util::Stream for ChangeStream {
    type Item = Result<ChangeEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

fn check_name(what: &str, name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Changes(format!(
            "{what} {name:?}: use 1 to 63 lowercase letters, digits and _"
        )))
    }
}

fn quote_table(t: &str) -> Result<String, Error> {
    let parts: Vec<&str> = t.split('.').collect();
    if parts.is_empty() || parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(Error::Changes(format!(
            "table {t:?}: write name or schema.name"
        )));
    }
    Ok(parts
        .iter()
        .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join("."))
}

fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Microseconds since 2000-01-01 to milliseconds since 1970.
fn unix_ms(pg_us: i64) -> i64 {
    pg_us / 1000 + 946_684_800_000
}

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

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

/// Refuses a token the slot has moved past: the changes between it and the
/// slot were acknowledged (by an earlier consumer, or by this one before it
/// stored the token) and the slot cannot read them again. Starting there
/// anyway would skip them without a word.
async fn check_token_not_behind(
    conn: &mut railyard::conn::Conn,
    slot: &str,
    token: ResumeToken,
) -> Result<(), Error> {
    let at: Vec<Exists> = diesel::sql_query(
        "SELECT coalesce(pg_wal_lsn_diff(confirmed_flush_lsn, '0/0'), 0)::int8 AS n \
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind::<Text, _>(slot)
    .load(conn)
    .await?;
    let at = at.into_iter().next().map_or(0, |e| e.n.max(0) as u64);
    if token_behind(token, at) {
        return Err(Error::Changes(format!(
            "slot {slot:?} is at {} and has moved past token {token}: the changes after the \
             token up to there were acknowledged already and cannot be read again; start from \
             the last token acknowledged, or without a token to go on from the slot",
            lsn_text(at)
        )));
    }
    Ok(())
}

/// Whether a slot confirmed up to `at` has consumed events after `token`.
fn token_behind(token: ResumeToken, at: u64) -> bool {
    if token.ends_transaction() {
        at > token.end_lsn
    } else {
        at >= token.end_lsn
    }
}

fn slot_lost(e: &Error) -> bool {
    let Error::Core(e) = e else {
        return false;
    };
    e.sqlstate()
        .is_some_and(|s| *s == tokio_postgres::error::SqlState::UNDEFINED_OBJECT)
        || e.to_string().contains("does not exist")
}

/// Streams row changes of `config.tables` from the logical replication
/// slot `config.slot` (see the [module](railyard_events::ChangeStream)
/// docs on `ChangeStream`). Creates the publication `railyard_<slot>`
/// and the slot when missing (needs the `REPLICATION` attribute or
/// superuser, and `wal_level = logical`).
///
/// ```no_run
/// # async fn demo(db: railyard::Database) -> Result<(), railyard_events::Error> {
/// use railyard_events::DatabaseEvents;
/// use railyard_events::ChangeStreamConfig;
/// let mut changes = db.changes(ChangeStreamConfig::new("ledger", ["trades"])).await?;
/// while let Some(event) = changes.next().await {
///     let event = event?; // a lost slot ends the stream with an error
///     println!("{} {:?} {:?}", event.table, event.op, event.key);
///     changes.ack(&event.token);
/// }
/// # Ok(()) }
/// ```
pub(crate) async fn changes(
    db: &Database,
    config: ChangeStreamConfig,
) -> Result<ChangeStream, Error> {
    check_name("slot", &config.slot)?;
    if config.tables.is_empty() {
        return Err(Error::Changes("stream at least one table".into()));
    }
    let tables: Vec<String> = config
        .tables
        .iter()
        .map(|t| quote_table(t))
        .collect::<Result<_, _>>()?;
    let publication = format!("railyard_{}", config.slot);
    let mut conn = db.dedicated_primary().await?;
    let exists = |sql: &'static str, name: String| diesel::sql_query(sql).bind::<Text, _>(name);
    let have_pub: Vec<Exists> = exists(
        "SELECT count(*) AS n FROM pg_publication WHERE pubname = $1",
        publication.clone(),
    )
    .load(&mut conn)
    .await?;
    let have_slot: Vec<Exists> = exists(
        "SELECT count(*) AS n FROM pg_replication_slots WHERE slot_name = $1",
        config.slot.clone(),
    )
    .load(&mut conn)
    .await?;
    let count = |v: Vec<Exists>| v.into_iter().next().map_or(0, |e| e.n);
    let (have_pub, have_slot) = (count(have_pub) > 0, count(have_slot) > 0);
    if let (Some(token), false) = (config.from, have_slot) {
        return Err(Error::Changes(format!(
            "slot {:?} does not exist, so the changes after token {token} cannot be read: \
             take a fresh snapshot of the tables and start without a token",
            config.slot
        )));
    }
    if let (Some(token), true) = (config.from, have_slot) {
        check_token_not_behind(&mut conn, &config.slot, token).await?;
    }
    if (!have_pub || !have_slot) && !config.create {
        return Err(Error::Changes(format!(
            "slot {:?} or its publication {publication:?} does not exist (and create is off)",
            config.slot
        )));
    }
    use diesel_async::SimpleAsyncConnection;
    if !have_pub {
        conn.batch_execute(&format!(
            "CREATE PUBLICATION {publication} FOR TABLE {}",
            tables.join(", ")
        ))
        .await?;
    }
    if !have_slot {
        diesel::sql_query(
            "SELECT 1::int8 AS n FROM pg_create_logical_replication_slot($1, 'pgoutput')",
        )
        .bind::<Text, _>(&config.slot)
        .load::<Exists>(&mut conn)
        .await?;
    }
    SlotBoard::of(db)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            config.slot.clone(),
            SlotFigures {
                retained_bytes: None,
                limit: config.warn_retained_bytes,
                lost: false,
            },
        );
    let (tx, rx) = tokio::sync::mpsc::channel(CHANGE_BUFFER);
    // Starting after a token says everything up to it was handled: the
    // slot may move up to it (the previous consumer may have stopped
    // before its last acknowledgement reached the slot).
    let acks = Arc::new(Acks {
        upto: Mutex::new(config.from),
        notify: tokio::sync::Notify::new(),
    });
    let task = tokio::spawn(run(
        db.clone(),
        conn,
        config.clone(),
        publication,
        tx,
        acks.clone(),
    ));
    Ok(ChangeStream {
        rx,
        acks,
        slot: config.slot,
        slots: SlotBoard::of(db),
        task,
    })
}

/// Drops a change stream's slot and its publication (an abandoned slot
/// keeps WAL on the primary for ever); whether the slot existed.
pub(crate) async fn drop_change_slot(db: &Database, slot: &str) -> Result<bool, Error> {
    check_name("slot", slot)?;
    let mut conn = db.dedicated_primary().await?;
    // A consumer that just stopped may still hold the slot for a moment
    // (its backend is on its way out): wait for it, within a bound.
    let started = Instant::now();
    let dropped: Vec<Exists> = loop {
        let r = diesel::sql_query(
            "SELECT count(pg_drop_replication_slot(slot_name))::int8 AS n FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind::<Text, _>(slot)
        .load(&mut conn)
        .await;
        match r {
            Ok(v) => break v,
            Err(e)
                if e.to_string().contains("is active")
                    && started.elapsed() < Duration::from_secs(5) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) if e.to_string().contains("is active") => {
                return Err(Error::Changes(format!(
                    "slot {slot:?} is in use by a running consumer: stop it first"
                )));
            }
            Err(e) => return Err(e.into()),
        }
    };
    use diesel_async::SimpleAsyncConnection;
    conn.batch_execute(&format!("DROP PUBLICATION IF EXISTS railyard_{slot}"))
        .await?;
    SlotBoard::of(db)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(slot);
    Ok(dropped.into_iter().next().is_some_and(|d| d.n > 0))
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

async fn run(
    db: Database,
    mut conn: railyard::conn::Conn,
    config: ChangeStreamConfig,
    publication: String,
    tx: tokio::sync::mpsc::Sender<Result<ChangeEvent, Error>>,
    acks: Arc<Acks>,
) {
    let mut delivered: Option<(u64, u32)> = config.from.map(|t| t.position());
    let mut advanced = 0u64;
    // Transactions delivered (wholly or partly) that the slot has not moved
    // past: their end positions and events delivered; bounded by
    // `max_unacked`.
    let mut pending: std::collections::VecDeque<(u64, usize)> = Default::default();
    let mut measured: Option<Instant> = None;
    // Rows asked of each peek: it starts at the slot's position, so rows
    // already delivered (or skipped after a restart) come again; when a full
    // window held nothing new, the next one is larger.
    let mut window: usize = 2048;
    let mut warned = false;
    let mut backoff = Duration::from_millis(100);
    loop {
        if tx.is_closed() {
            return;
        }
        // Move the slot past what was wholly acknowledged: the token's own
        // transaction when it was its last event, else the ones before it.
        let upto = *acks.upto.lock().unwrap_or_else(|p| p.into_inner());
        let acked = match upto {
            None => 0,
            Some(t) if t.ends_transaction() => t.end_lsn,
            Some(t) => pending
                .iter()
                .map(|(end, _)| *end)
                .filter(|end| *end < t.end_lsn)
                .max()
                .unwrap_or(0),
        };
        let step: Result<usize, Error> = async {
            if acked > advanced {
                diesel::sql_query(
                    "SELECT 1::int8 AS n FROM pg_replication_slot_advance($1, $2::pg_lsn)",
                )
                .bind::<Text, _>(&config.slot)
                .bind::<Text, _>(lsn_text(acked))
                .load::<Exists>(&mut conn)
                .await?;
                advanced = acked;
                while pending.front().is_some_and(|(end, _)| *end <= acked) {
                    pending.pop_front();
                }
            }
            let unacked: usize = pending.iter().map(|(_, n)| n).sum();
            if measured.is_none_or(|m| m.elapsed() >= Duration::from_secs(2)) {
                measured = Some(Instant::now());
                let r: Vec<Retained> = diesel::sql_query(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 AS bytes \
                     FROM pg_replication_slots WHERE slot_name = $1",
                )
                .bind::<Text, _>(&config.slot)
                .load(&mut conn)
                .await?;
                let Some(r) = r.into_iter().next() else {
                    return Err(Error::Changes(format!(
                        "the replication slot {:?} does not exist",
                        config.slot
                    )));
                };
                let bytes = r.bytes.unwrap_or(0).max(0) as u64;
                if let Some(f) = SlotBoard::of(&db)
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&config.slot)
                {
                    f.retained_bytes = Some(bytes);
                }
                if bytes > config.warn_retained_bytes && !warned {
                    warned = true;
                    tracing::warn!(target: "railyard::changes", slot = %config.slot, retained_bytes = bytes, limit = config.warn_retained_bytes, "a change stream's slot retains more WAL than its limit: acknowledge events, or drop the slot if it is abandoned (Database::drop_change_slot)");
                } else if bytes <= config.warn_retained_bytes {
                    warned = false;
                }
            }
            if unacked >= config.max_unacked {
                return Ok(0);
            }
            let asked = (window + unacked * 2).min(i32::MAX as usize);
            let rows: Vec<Change> = diesel::sql_query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, \
                 'proto_version', '1', 'publication_names', $3)",
            )
            .bind::<Text, _>(&config.slot)
            .bind::<diesel::sql_types::Integer, _>(asked as i32)
            .bind::<Text, _>(&publication)
            .load(&mut conn)
            .await?;
            let full = rows.len() >= asked;
            let mut relations: BTreeMap<u32, pgoutput::Relation> = BTreeMap::new();
            let mut txn: Option<Txn> = None;
            let mut sent = 0;
            for row in rows {
                let m = pgoutput::decode(&row.data).map_err(|e| {
                    Error::Changes(format!("an undecodable pgoutput message: {e}"))
                })?;
                match m {
                    pgoutput::Message::Begin {
                        final_lsn,
                        commit_time,
                    } => {
                        txn = Some(Txn {
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
                    pgoutput::Message::Commit { end_lsn, .. } => {
                        let Some(t) = txn.take() else { continue };
                        let count = t.events.len() as u32;
                        for (index, (op, table, key, new, old_key)) in
                            t.events.into_iter().enumerate()
                        {
                            let token = ResumeToken {
                                end_lsn,
                                index: index as u32,
                                count,
                            };
                            if delivered.is_some_and(|d| token.position() <= d) {
                                continue;
                            }
                            let event = ChangeEvent {
                                token,
                                op,
                                table,
                                key,
                                new,
                                old_key: if op == ChangeOp::Delete { old_key } else { old_key.filter(|o| !o.is_empty()) },
                                commit_lsn: lsn_text(t.commit_lsn),
                                commit_time_ms: unix_ms(t.commit_time),
                            };
                            if tx.send(Ok(event)).await.is_err() {
                                return Ok(0);
                            }
                            delivered = Some(token.position());
                            match pending.back_mut() {
                                Some((end, n)) if *end == token.end_lsn => *n += 1,
                                _ => pending.push_back((token.end_lsn, 1)),
                            }
                            sent += 1;
                            if pending.iter().map(|(_, n)| n).sum::<usize>() >= config.max_unacked {
                                return Ok(sent);
                            }
                        }
                    }
                    pgoutput::Message::Other(_) => {}
                }
            }
            if sent == 0 && full {
                // A full window of what was already delivered: look further.
                window = (window * 2).min(1 << 22);
                return Ok(usize::MAX);
            }
            if sent > 0 {
                window = 2048;
            }
            Ok(sent)
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_print_parse_and_order() {
        let t = ResumeToken {
            end_lsn: 0x1_0000_00A0,
            index: 2,
            count: 3,
        };
        assert_eq!(t.to_string(), "1000000A0.2.3");
        assert_eq!("1000000A0.2.3".parse::<ResumeToken>().unwrap(), t);
        assert!(t.ends_transaction());
        assert!("1000000A0.3.3".parse::<ResumeToken>().is_err());
        assert!("zz.1.2".parse::<ResumeToken>().is_err());
        let earlier = ResumeToken {
            end_lsn: 0x1_0000_00A0,
            index: 1,
            count: 3,
        };
        assert!(earlier < t);
        assert_eq!(lsn_text(0x1_0000_00A0), "1/A0");
        assert_eq!(
            quote_table("public.orders").unwrap(),
            "\"public\".\"orders\""
        );
        assert!(quote_table("a.b.c").is_err());
    }

    #[test]
    fn a_token_the_slot_moved_past_is_behind() {
        let last = ResumeToken {
            end_lsn: 0x500,
            index: 2,
            count: 3,
        };
        let middle = ResumeToken { index: 1, ..last };
        // Slot at the transaction's end: the last event was acknowledged,
        // the middle one's successors too.
        assert!(!token_behind(last, 0x500));
        assert!(token_behind(middle, 0x500));
        // Slot before it: nothing after either token was consumed.
        assert!(!token_behind(last, 0x4FF));
        assert!(!token_behind(middle, 0x4FF));
        // Slot past it.
        assert!(token_behind(last, 0x501));
    }
}
