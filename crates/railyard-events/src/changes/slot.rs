//! Opening a change stream (its publication and slot made when missing, a
//! resume token checked against the slot) and dropping a slot.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;
use railyard::Database;

use super::board::{SlotBoard, SlotFigures};
use super::reader::run;
use super::stream::{Acks, ChangeStream};
use super::{
    CHANGE_BUFFER, ChangeStreamConfig, ResumeToken, check_name, lsn_text, quote_table, token_behind,
};
use crate::error::Error;

#[derive(QueryableByName)]
pub(super) struct Exists {
    #[diesel(sql_type = BigInt)]
    pub(super) n: i64,
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
    let (have_pub, have_slot) = existing(&mut conn, &publication, &config.slot).await?;
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
    create_missing(
        &mut conn,
        &publication,
        &tables,
        &config.slot,
        have_pub,
        have_slot,
    )
    .await?;
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

/// Whether the publication and the slot exist.
async fn existing(
    conn: &mut railyard::conn::Conn,
    publication: &str,
    slot: &str,
) -> Result<(bool, bool), Error> {
    let exists = |sql: &'static str, name: String| diesel::sql_query(sql).bind::<Text, _>(name);
    let have_pub: Vec<Exists> = exists(
        "SELECT count(*) AS n FROM pg_publication WHERE pubname = $1",
        publication.to_owned(),
    )
    .load(conn)
    .await?;
    let have_slot: Vec<Exists> = exists(
        "SELECT count(*) AS n FROM pg_replication_slots WHERE slot_name = $1",
        slot.to_owned(),
    )
    .load(conn)
    .await?;
    let count = |v: Vec<Exists>| v.into_iter().next().map_or(0, |e| e.n);
    Ok((count(have_pub) > 0, count(have_slot) > 0))
}

/// Creates the publication of `tables` and the slot, those missing.
async fn create_missing(
    conn: &mut railyard::conn::Conn,
    publication: &str,
    tables: &[String],
    slot: &str,
    have_pub: bool,
    have_slot: bool,
) -> Result<(), Error> {
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
        .bind::<Text, _>(slot)
        .load::<Exists>(conn)
        .await?;
    }
    Ok(())
}
