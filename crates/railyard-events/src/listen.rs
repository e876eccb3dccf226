//! `LISTEN`/`NOTIFY` that survives reconnects and says when it may have
//! missed something.
//!
//! A [`Listener`] holds one connection of its own to the primary (never a
//! pooled one: a listening session must stay open, and a pool would hand it
//! to someone else). When that connection is lost (a terminated backend, a
//! restarted server, a failover), it connects again with backoff, walking
//! the primary URL's hosts as every connection does, and `LISTEN`s again;
//! between the two, notifications sent were lost, so the stream yields a
//! [`ListenEvent::Gap`] before anything from the new connection. An
//! application answers a gap by resynchronising from the tables.
//!
//! Memory is bounded: the stream holds at most [`LISTEN_BUFFER`] events;
//! beyond that the connection's socket is not read, and the server queues
//! the notifications (in its own bounded queue) until the consumer catches up.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::Error;
use railyard::Database;
use railyard::conn::open::Opener;

/// Events a [`Listener`] holds at most before it stops reading.
pub const LISTEN_BUFFER: usize = 1024;

/// The server's limit on a payload: shorter than 8,000 bytes.
pub const MAX_PAYLOAD: usize = 7999;

/// A notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Notification {
    /// The channel.
    pub channel: String,
    /// The payload (empty when none was sent).
    pub payload: String,
    /// The backend that sent it.
    pub process_id: i32,
}

/// A stretch of time in which notifications may have been missed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Gap {
    /// Why the connection was lost.
    pub reason: String,
    /// How long the listener had no connection, ms.
    pub down_ms: u64,
    /// Connection attempts it took.
    pub attempts: u32,
}

/// What a [`Listener`] yields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ListenEvent {
    /// A notification on one of the channels.
    Notification(Notification),
    /// The connection was lost and is back, listening again: notifications
    /// sent in between were missed. Resynchronise.
    Gap(Gap),
}

/// A stream of [`ListenEvent`]s (see [`DatabaseEvents::listen`](crate::DatabaseEvents::listen)); stops listening
/// when dropped.
#[derive(Debug)]
pub struct Listener {
    rx: tokio::sync::mpsc::Receiver<ListenEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Listener {
    /// The next event; `None` once the database is closed.
    pub async fn next(&mut self) -> Option<ListenEvent> {
        self.rx.recv().await
    }
}

impl futures_util::Stream for Listener {
    type Item = ListenEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ListenEvent>> {
        self.rx.poll_recv(cx)
    }
}

/// A channel name as SQL needs it, double-quoted.
fn quoted(channel: &str) -> String {
    format!("\"{}\"", channel.replace('"', "\"\""))
}

fn check_channel(channel: &str) -> Result<(), Error> {
    if channel.is_empty() || channel.len() > 63 || channel.contains('\0') {
        return Err(Error::Notify(format!(
            "a channel name has 1 to 63 bytes and no NUL; {:?} has {}",
            channel.chars().take(80).collect::<String>(),
            channel.len()
        )));
    }
    Ok(())
}

/// Listens on `channels` on a connection of its own (never a pooled
/// one), reconnecting with backoff after any failure (a terminated
/// backend, a restarted server, a failover: the primary URL's hosts are
/// walked as for every connection) and yielding a [`ListenEvent::Gap`]
/// each time, before anything from the new connection: notifications
/// sent in between were missed, so resynchronise. At most
/// [`LISTEN_BUFFER`] events wait in the stream; beyond that the socket is
/// not read and the server queues. Returns once the first `LISTEN` is in
/// place, so a notification sent after this returns is received.
///
/// ```no_run
/// # async fn demo(db: railyard::Database) -> Result<(), railyard_events::Error> {
/// use railyard_events::DatabaseEvents;
/// use railyard_events::ListenEvent;
/// let mut orders = db.listen(["orders"]).await?;
/// while let Some(event) = orders.next().await {
///     match event {
///         ListenEvent::Notification(n) => println!("{}: {}", n.channel, n.payload),
///         ListenEvent::Gap(g) => println!("missed up to {} ms ({}): reloading", g.down_ms, g.reason),
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// ```
pub(crate) async fn listen<I, S>(db: &Database, channels: I) -> Result<Listener, Error>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let channels: Vec<String> = channels.into_iter().map(Into::into).collect();
    if channels.is_empty() {
        return Err(Error::Notify("listen to at least one channel".into()));
    }
    for c in &channels {
        check_channel(c)?;
    }
    let listen: String = channels
        .iter()
        .map(|c| format!("LISTEN {};", quoted(c)))
        .collect();
    let base = db.dedicated_opener()?;
    let (events, rx) = tokio::sync::mpsc::channel(LISTEN_BUFFER);
    // The first connection here, so that its errors reach the caller.
    let (conn, notes) = connect(&base, &listen).await?;
    let task = tokio::spawn(run(base, listen, events, conn, notes));
    Ok(Listener { rx, task })
}

/// Sends a notification (`pg_notify`) on a primary connection; it is
/// delivered when the statement commits. The payload is checked first:
/// the server takes fewer than 8,000 bytes.
///
/// ```no_run
/// # async fn demo(db: railyard::Database) -> Result<(), railyard_events::Error> {
/// use railyard_events::DatabaseEvents;
/// db.notify("orders", "placed 42").await?;
/// # Ok(()) }
/// ```
pub(crate) async fn notify(db: &Database, channel: &str, payload: &str) -> Result<(), Error> {
    check_channel(channel)?;
    if payload.len() > MAX_PAYLOAD {
        return Err(Error::Notify(format!(
            "the payload for channel {channel:?} has {} bytes; the server takes at most {MAX_PAYLOAD}: send a key and let the listener read the rest",
            payload.len()
        )));
    }
    use diesel::sql_types::Text;
    use diesel_async::RunQueryDsl;
    let (channel, payload) = (channel.to_owned(), payload.to_owned());
    db.with_primary(async move |c| {
        diesel::sql_query("SELECT pg_notify($1, $2)")
            .bind::<Text, _>(&channel)
            .bind::<Text, _>(&payload)
            .execute(c)
            .await?;
        Ok::<_, Error>(())
    })
    .await
}

type Notes = tokio::sync::mpsc::Receiver<tokio_postgres::Notification>;

/// One listening connection: the connection and what its driver forwards.
async fn connect(base: &Opener, listen: &str) -> Result<(railyard::conn::Conn, Notes), Error> {
    let (tx, notes) = tokio::sync::mpsc::channel(64);
    let mut conn = base.clone().forwarding(tx).open().await?;
    use diesel_async::SimpleAsyncConnection;
    conn.batch_execute(listen).await?;
    Ok((conn, notes))
}

async fn run(
    base: Opener,
    listen: String,
    events: tokio::sync::mpsc::Sender<ListenEvent>,
    mut conn: railyard::conn::Conn,
    mut notes: Notes,
) {
    loop {
        // Until the connection ends: its driver drops the sender then.
        while let Some(n) = notes.recv().await {
            let event = ListenEvent::Notification(Notification {
                channel: n.channel().to_owned(),
                payload: n.payload().to_owned(),
                process_id: n.process_id(),
            });
            if events.send(event).await.is_err() {
                return;
            }
        }
        // The server's own words when it said why (57P01 "terminating
        // connection due to administrator command", a shutdown), else the
        // driver's.
        let reason = match conn.wire().last_error() {
            Some(e) => format!("{} ({} {})", e.message, e.severity, e.code),
            None => conn
                .wire()
                .close_reason()
                .unwrap_or_else(|| "the connection was lost".to_owned()),
        };
        drop(conn);
        let lost = Instant::now();
        let mut backoff = Duration::from_millis(50);
        let mut attempts = 0u32;
        (conn, notes) = loop {
            if events.is_closed() {
                return;
            }
            attempts += 1;
            match connect(&base, &listen).await {
                Ok(pair) => break pair,
                Err(Error::Core(railyard::Error::Closed { .. })) => return,
                Err(e) => {
                    tracing::debug!(target: "railyard::listen", attempt = attempts, error = %e, "listener reconnecting");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        };
        tracing::warn!(target: "railyard::listen", reason = %reason, attempts, down_ms = lost.elapsed().as_millis() as u64, "listener reconnected: notifications may have been missed");
        // The gap goes out before anything the new connection receives:
        // its notifications wait in `notes` until this is sent.
        let gap = ListenEvent::Gap(Gap {
            reason,
            down_ms: lost.elapsed().as_millis() as u64,
            attempts,
        });
        if events.send(gap).await.is_err() {
            return;
        }
    }
}
