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

mod board;
mod pgoutput;
mod reader;
mod slot;
mod stream;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::error::Error;

pub use pgoutput::Row;
pub(crate) use slot::{changes, drop_change_slot};
pub use stream::ChangeStream;

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
#[non_exhaustive]
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

/// Whether a slot confirmed up to `at` has consumed events after `token`.
fn token_behind(token: ResumeToken, at: u64) -> bool {
    if token.ends_transaction() {
        at > token.end_lsn
    } else {
        at >= token.end_lsn
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
