//! The protocol tap: a pass-through stream under tokio-postgres that
//! observes the bytes of one connection and, except behind a transaction-mode
//! pooler (see `super::unnamed`), never changes them.
//!
//! Every connection opens its own socket (`Config::connect_raw`), wrapped in
//! `Tapped`. When TLS is negotiated, our connector switches the socket's tap off
//! and wraps the decrypted stream instead; both share one [`WireState`].
//!
//! A small framing state machine reads backend message headers (type byte and
//! length) as the bytes stream past and records, per connection: the SQLSTATE,
//! constraint, column and table of the latest `ErrorResponse`; the status byte of
//! the latest `ReadyForQuery` (`I` idle, `T` in a transaction, `E` failed
//! transaction); `in_hot_standby` from `ParameterStatus`; and counts of bytes and
//! messages. diesel-async keeps only six SQLSTATEs, and message text follows the
//! server's `lc_messages`, so this is where exact classification comes from
//! Only the small control messages (`E`, `S`, `Z`) are copied;
//! row data is skipped by length, never copied, except while a capture is
//! armed (`WireState::capture_replies`): then the tag of the first
//! `CommandComplete` and the first `DataRow` are kept, which is how Railyard
//! reads the value of its own one-row simple queries (the WAL position sent
//! in the same flight as a session's `COMMIT`), whose rows diesel discards.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ServerError;

mod framer;
mod stream;
#[cfg(test)]
mod tests;

pub(crate) use framer::Framer;
pub(crate) use stream::{Socket, Tapped, WEAK_AUTH_REFUSED};

/// The transaction status from the latest `ReadyForQuery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TxStatus {
    /// Not in a transaction block (`I`).
    Idle,
    /// In a transaction block (`T`).
    InTransaction,
    /// In a failed transaction block (`E`): statements are refused until rollback.
    Failed,
    /// No `ReadyForQuery` seen yet, or the stream could not be framed.
    Unknown,
}

/// What the tap has seen on one connection. Shared by the socket tap, the tap
/// above TLS, the connection driver task and the pool.
#[derive(Debug, Default)]
pub struct WireState {
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    tls: AtomicBool,
    /// The server asked for the password in clear or as MD5 (see
    /// [`Tapped::refuse_weak_auth`]).
    weak_auth_asked: AtomicBool,
    tls_failed: AtomicBool,
    closed: AtomicBool,
    close_reason: Mutex<Option<String>>,
    /// The latest ReadyForQuery status byte (0 before the first).
    tx_status: AtomicU8,
    /// 0 unknown, 1 off, 2 on.
    hot_standby: AtomicU8,
    desynced: AtomicBool,
    ready_count: AtomicU64,
    error_count: AtomicU64,
    message_count: AtomicU64,
    /// Frontend messages that each end in exactly one ReadyForQuery (Query, Sync),
    /// plus one for the startup.
    syncs_sent: AtomicU64,
    last_error: Mutex<Option<ServerError>>,
    ready_notify: tokio::sync::Notify,
    /// Tasks waiting in `settle` or `quiesce`: the framer wakes them (which
    /// takes the `Notify`'s lock) only when there are any.
    waiting: AtomicUsize,
    /// Whether a check-out holds the connection now (see `conn::gate`).
    leased: AtomicBool,
    /// Set by [`WireState::sever`]: the connection's driver drops the socket.
    severed: AtomicBool,
    /// The driver's waker (the one task that waits for `severed`; a `Notify`
    /// could take a lock at every wake of the driver).
    sever_waker: futures_util::task::AtomicWaker,
    /// Whether the framer copies replies into `captured` (see
    /// [`WireState::capture_replies`]).
    capture_armed: AtomicBool,
    captured: Mutex<Captured>,
    /// The longest statement timeout a transaction set on this connection
    /// (`SET LOCAL`), plus the grace: the stall watch never gives up sooner.
    stall_floor_ms: AtomicU64,
}

/// What an armed capture kept of the replies to one request: the tag of its
/// first `CommandComplete` (`COMMIT`, `SELECT 1`, …) and its first `DataRow`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Captured {
    /// The first `CommandComplete`'s tag, without its terminating NUL.
    pub(crate) first_tag: Option<Vec<u8>>,
    /// The body of the first `DataRow`.
    pub(crate) first_row: Option<Vec<u8>>,
}

impl Captured {
    /// The first row's only column, as text (a simple query's rows are text),
    /// when the row has exactly one non-NULL column.
    pub(crate) fn one_text_value(&self) -> Option<&str> {
        let row = self.first_row.as_deref()?;
        let (count, rest) = row.split_at_checked(2)?;
        if i16::from_be_bytes([count[0], count[1]]) != 1 {
            return None;
        }
        let (len, value) = rest.split_at_checked(4)?;
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        if len < 0 || value.len() != len as usize {
            return None;
        }
        std::str::from_utf8(value).ok()
    }

    /// Whether the first statement completed with this tag.
    pub(crate) fn first_completed(&self, tag: &str) -> bool {
        self.first_tag.as_deref() == Some(tag.as_bytes())
    }
}

/// Counts a task as waiting for the wire for as long as it lives (a waiting
/// future may be dropped at any await).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        // SeqCst pairs with the framer's: either the framer sees this waiter,
        // or the waiter's next check sees the framer's update.
        n.fetch_add(1, Ordering::SeqCst);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A point in a connection's traffic, taken before an operation, to tell what the
/// operation itself did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WireMark {
    bytes_written: u64,
    errors: u64,
    ready: u64,
}

impl WireState {
    /// Bytes received from the server (decrypted bytes when TLS is on).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }
    /// Bytes sent to the server (before encryption when TLS is on).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }
    /// Whether the connection negotiated TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.load(Ordering::Relaxed)
    }
    /// Whether the connection's socket has closed or its driver ended.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
    /// Why the connection closed, when it ended with an error.
    pub fn close_reason(&self) -> Option<String> {
        self.close_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    /// The transaction status of the latest `ReadyForQuery`.
    pub fn tx_status(&self) -> TxStatus {
        if self.desynced.load(Ordering::Relaxed) {
            return TxStatus::Unknown;
        }
        match self.tx_status.load(Ordering::Acquire) {
            b'I' => TxStatus::Idle,
            b'T' => TxStatus::InTransaction,
            b'E' => TxStatus::Failed,
            _ => TxStatus::Unknown,
        }
    }
    /// `in_hot_standby` as last reported by the server (PostgreSQL 14 and later),
    /// `None` when it never reported it.
    pub fn in_hot_standby(&self) -> Option<bool> {
        match self.hot_standby.load(Ordering::Relaxed) {
            1 => Some(false),
            2 => Some(true),
            _ => None,
        }
    }
    /// The latest `ErrorResponse` seen on this connection.
    pub fn last_error(&self) -> Option<ServerError> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    /// `ReadyForQuery` messages seen: one per completed round trip.
    pub fn ready_count(&self) -> u64 {
        self.ready_count.load(Ordering::SeqCst)
    }
    /// `ErrorResponse` messages seen.
    pub fn error_count(&self) -> u64 {
        self.error_count.load(Ordering::Relaxed)
    }
    /// Backend messages seen.
    pub fn message_count(&self) -> u64 {
        self.message_count.load(Ordering::Relaxed)
    }
    /// Whether the connection is idle with nothing in flight: the latest
    /// `ReadyForQuery` said idle and every request sent has been answered. This is
    /// the pool's check-out test, with no round trip.
    #[doc(hidden)]
    pub fn is_settled_idle(&self) -> bool {
        !self.is_closed()
            && self.tx_status() == TxStatus::Idle
            && self.ready_count() >= self.syncs_sent.load(Ordering::Acquire)
    }
    /// Waits up to `patience` for the connection to be idle with nothing in
    /// flight. A query's result reaches the caller at `CommandComplete`, a moment
    /// before its `ReadyForQuery` is read, so a connection just handed back may
    /// need that moment; one still running a (cancelled) query or inside a
    /// transaction does not settle and is refused.
    pub(crate) async fn settle(&self, patience: std::time::Duration) -> bool {
        // The common case, every check-out: nothing to wait for, no lock taken.
        if self.is_settled_idle() {
            return true;
        }
        let _waiting = Waiting::new(&self.waiting);
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let notified = self.ready_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_settled_idle() {
                return true;
            }
            if self.is_closed()
                || self.tx_status() == TxStatus::Unknown
                || (self.in_flight() == 0 && self.tx_status() != TxStatus::Idle)
            {
                return false;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.is_settled_idle();
            }
        }
    }

    /// Waits up to `patience` until every request sent has its `ReadyForQuery`,
    /// so that [`WireState::tx_status`] describes the latest request; returns
    /// whether it did.
    pub async fn quiesce(&self, patience: std::time::Duration) -> bool {
        if self.in_flight() == 0 {
            return true;
        }
        let _waiting = Waiting::new(&self.waiting);
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let notified = self.ready_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return true;
            }
            if self.is_closed() || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.in_flight() == 0;
            }
        }
    }

    /// Arms the reply capture: from now on the framer keeps the tag of the
    /// first `CommandComplete` and the first `DataRow` it reads, until
    /// [`WireState::take_captured`]. Arm it only with nothing in flight
    /// (see [`WireState::in_flight`]), right before sending the one request
    /// whose replies are wanted, so that what is kept is that request's.
    pub(crate) fn capture_replies(&self) {
        *self.captured.lock().unwrap_or_else(|p| p.into_inner()) = Captured::default();
        self.capture_armed.store(true, Ordering::Release);
    }

    /// Disarms the capture and returns what it kept.
    pub(crate) fn take_captured(&self) -> Captured {
        self.capture_armed.store(false, Ordering::Release);
        std::mem::take(&mut *self.captured.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn capturing(&self) -> bool {
        self.capture_armed.load(Ordering::Acquire)
    }

    /// A `CommandComplete` or `DataRow` read while the capture was armed.
    fn on_captured(&self, kind: u8, body: &[u8]) {
        let mut c = self.captured.lock().unwrap_or_else(|p| p.into_inner());
        match kind {
            b'C' if c.first_tag.is_none() => {
                let tag = body.strip_suffix(&[0]).unwrap_or(body);
                c.first_tag = Some(tag.to_vec());
            }
            b'D' if c.first_row.is_none() => c.first_row = Some(body.to_vec()),
            _ => {}
        }
    }

    /// Requests sent whose `ReadyForQuery` has not arrived.
    #[doc(hidden)]
    pub fn in_flight(&self) -> u64 {
        self.syncs_sent
            .load(Ordering::Acquire)
            .saturating_sub(self.ready_count())
    }
    /// Marks the start of an operation.
    pub(crate) fn mark(&self) -> WireMark {
        WireMark {
            bytes_written: self.bytes_written(),
            errors: self.error_count(),
            ready: self.ready_count(),
        }
    }
    /// Bytes written since `mark`: zero means the server never saw the operation.
    pub(crate) fn written_since(&self, mark: WireMark) -> u64 {
        self.bytes_written().saturating_sub(mark.bytes_written)
    }
    /// The server's error for an operation that began at `mark`, if it sent one.
    pub(crate) fn error_since(&self, mark: WireMark) -> Option<ServerError> {
        if self.error_count() > mark.errors {
            self.last_error()
        } else {
            None
        }
    }
    /// Like [`WireState::error_since`], reading the error in place instead of
    /// copying it (for the per-query path, which must not allocate).
    pub(crate) fn with_error_since<R>(
        &self,
        mark: WireMark,
        read: impl FnOnce(&ServerError) -> R,
    ) -> Option<R> {
        if self.error_count() <= mark.errors {
            return None;
        }
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(read)
    }
    pub(crate) fn weak_auth_asked(&self) -> bool {
        self.weak_auth_asked.load(Ordering::Acquire)
    }
    pub(crate) fn tls_failed(&self) -> bool {
        self.tls_failed.load(Ordering::Relaxed)
    }
    #[cfg(feature = "tls")]
    pub(crate) fn note_tls(&self) {
        self.tls.store(true, Ordering::Relaxed);
    }
    pub(crate) fn note_tls_failure(&self) {
        self.tls_failed.store(true, Ordering::Relaxed);
    }
    /// Whether a check-out holds the connection now.
    pub(crate) fn is_leased(&self) -> bool {
        self.leased.load(Ordering::Acquire)
    }
    pub(crate) fn set_leased(&self, on: bool) {
        self.leased.store(on, Ordering::Release);
    }
    /// Closes the connection from outside, whoever holds it: its driver drops
    /// the socket at once (no `Terminate`), so the server sees the client gone
    /// and rolls back whatever the session had open. Requests in flight, and
    /// every later one, fail with a closed connection.
    /// Raises the connection's stall bound to at least `d` (see
    /// `conn::open::STALL_GRACE`): a transaction that allows its statements
    /// longer than the configured timeout is not given up on sooner.
    pub(crate) fn raise_stall_floor(&self, d: std::time::Duration) {
        self.stall_floor_ms.fetch_max(
            d.as_millis().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// The stall floor (zero when none).
    pub(crate) fn stall_floor(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.stall_floor_ms.load(Ordering::Relaxed))
    }

    pub(crate) fn sever(&self) {
        self.severed.store(true, Ordering::SeqCst);
        self.sever_waker.wake();
    }
    /// Completes once [`WireState::sever`] was called. For the connection's
    /// driver only: one task at a time may wait.
    pub(crate) async fn severed(&self) {
        std::future::poll_fn(|cx| {
            if self.severed.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            self.sever_waker.register(cx.waker());
            if self.severed.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
    pub(crate) fn mark_closed(&self, reason: Option<String>) {
        if let Some(r) = reason {
            *self.close_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        }
        self.closed.store(true, Ordering::SeqCst);
        // Waiters give up on a closed connection at once.
        self.ready_notify.notify_waiters();
    }

    fn on_message(&self, kind: u8, body: &[u8]) {
        self.message_count.fetch_add(1, Ordering::Relaxed);
        match kind {
            b'Z' => {
                if let Some(&status) = body.first() {
                    self.tx_status.store(status, Ordering::Release);
                }
                self.ready_count.fetch_add(1, Ordering::SeqCst);
                if self.waiting.load(Ordering::SeqCst) > 0 {
                    self.ready_notify.notify_waiters();
                }
            }
            b'E' => {
                let e = parse_error(body);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                self.error_count.fetch_add(1, Ordering::Release);
            }
            b'R' => {
                // 3: the password in clear; 5: its MD5 hash (both replayable
                // by whoever reads a plain TCP stream). SCRAM is 10.
                if let Some(code) = body.get(..4) {
                    let code = u32::from_be_bytes([code[0], code[1], code[2], code[3]]);
                    if code == 3 || code == 5 {
                        self.weak_auth_asked.store(true, Ordering::Release);
                    }
                }
            }
            b'S' => {
                let mut parts = body.split(|&b| b == 0);
                if let (Some(name), Some(value)) = (parts.next(), parts.next())
                    && name == b"in_hot_standby"
                {
                    let v = if value == b"on" { 2 } else { 1 };
                    self.hot_standby.store(v, Ordering::Relaxed);
                }
            }
            _ => {}
        }
    }

    fn desync(&self) {
        self.desynced.store(true, Ordering::Relaxed);
    }
}

fn parse_error(body: &[u8]) -> ServerError {
    let mut e = ServerError::default();
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match field {
            b'C' => e.code = value,
            b'V' => e.severity = value,
            b'n' => e.constraint = Some(value),
            b'c' => e.column = Some(value),
            b't' => e.table = Some(value),
            b's' => e.schema = Some(value),
            b'M' => e.message = value,
            b'R' => e.routine = Some(value),
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    e
}
