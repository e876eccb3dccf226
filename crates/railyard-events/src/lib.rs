//! # railyard-events
//!
//! Events out of PostgreSQL for applications on [`railyard`]: LISTEN/NOTIFY
//! with a gap marker when notifications may have been missed ([`listen`]),
//! and logical-replication change streams with resume tokens
//! ([`changes`]).

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

pub mod changes;
pub mod error;
pub mod listen;

pub use changes::{
    CHANGE_BUFFER, ChangeEvent, ChangeOp, ChangeStream, ChangeStreamConfig, ResumeToken, Row,
};
pub use error::Error;
pub use listen::{Gap, LISTEN_BUFFER, ListenEvent, Listener, MAX_PAYLOAD, Notification};

use std::future::Future;

use railyard::Database;

/// LISTEN/NOTIFY and change streams on a [`Database`]: bring the trait into
/// scope (`use railyard_events::DatabaseEvents;`) and call them as methods.
///
/// ```no_run
/// # async fn demo(db: railyard::Database) -> Result<(), railyard_events::Error> {
/// use railyard_events::DatabaseEvents;
/// db.notify("orders", "placed 42").await?;
/// # Ok(()) }
/// ```
pub trait DatabaseEvents {
    /// Listens on `channels` (see [`listen`] for the gap marker and the
    /// bounds); returns once the first `LISTEN` is in place.
    fn listen<I, S>(&self, channels: I) -> impl Future<Output = Result<Listener, Error>> + Send
    where
        I: IntoIterator<Item = S>,
        S: Into<String>;

    /// Sends a notification (`pg_notify`) on a primary connection; the
    /// payload is checked against the server's limit first.
    fn notify(
        &self,
        channel: &str,
        payload: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send;

    /// Streams row changes from a logical replication slot (see
    /// [`changes`]).
    fn changes(
        &self,
        config: ChangeStreamConfig,
    ) -> impl Future<Output = Result<ChangeStream, Error>> + Send;

    /// Drops a change stream's slot and its publication; whether the slot
    /// existed.
    fn drop_change_slot(&self, slot: &str) -> impl Future<Output = Result<bool, Error>> + Send;
}

impl DatabaseEvents for Database {
    fn listen<I, S>(&self, channels: I) -> impl Future<Output = Result<Listener, Error>> + Send
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let channels: Vec<String> = channels.into_iter().map(Into::into).collect();
        listen::listen(self, channels)
    }

    fn notify(
        &self,
        channel: &str,
        payload: &str,
    ) -> impl Future<Output = Result<(), Error>> + Send {
        listen::notify(self, channel, payload)
    }

    fn changes(
        &self,
        config: ChangeStreamConfig,
    ) -> impl Future<Output = Result<ChangeStream, Error>> + Send {
        changes::changes(self, config)
    }

    fn drop_change_slot(&self, slot: &str) -> impl Future<Output = Result<bool, Error>> + Send {
        changes::drop_change_slot(self, slot)
    }
}
