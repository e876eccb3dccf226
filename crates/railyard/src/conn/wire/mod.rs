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
    pub(crate) fn tls_failed(&self) -> bool {
        self.tls_failed.load(Ordering::Relaxed)
    }
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

/// Control messages longer than this are not copied (an `ErrorResponse` or a
/// `ParameterStatus` is a few hundred bytes).
const CAPTURE_LIMIT: usize = 16 * 1024;

/// Frames backend messages from arbitrary chunks of the byte stream.
#[derive(Debug, Default)]
pub(crate) struct Framer {
    header: [u8; 5],
    have: usize,
    remaining: usize,
    kind: u8,
    body: Vec<u8>,
    capture: bool,
    /// The client sent SSLRequest: the server's next byte is a bare 'S' or 'N'.
    expect_ssl_byte: bool,
    /// The first bytes the client wrote, to recognise SSLRequest.
    written: [u8; 8],
    written_len: usize,
    broken: bool,
    /// Frontend framing: untyped messages still expected (SSLRequest, startup).
    out_untyped_seen: bool,
    out_header: [u8; 5],
    out_have: usize,
    out_remaining: usize,
    out_broken: bool,
}

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

impl Framer {
    pub(crate) fn on_write(&mut self, bytes: &[u8], wire: &WireState) {
        if self.written_len < 8 {
            let n = (8 - self.written_len).min(bytes.len());
            self.written[self.written_len..self.written_len + n].copy_from_slice(&bytes[..n]);
            self.written_len += n;
            if self.written_len == 8 && self.written == SSL_REQUEST {
                self.expect_ssl_byte = true;
            }
        }
        self.frame_out(bytes, wire);
    }

    /// Frames frontend messages to count those that each end in one
    /// `ReadyForQuery`: `Q` (simple query) and `S` (Sync). The first message on a
    /// stream has no type byte (SSLRequest or the startup message; after an
    /// SSLRequest answered with `N`, the startup message follows, untyped too).
    fn frame_out(&mut self, mut bytes: &[u8], wire: &WireState) {
        while !bytes.is_empty() && !self.out_broken {
            if self.out_remaining == 0 {
                let typed = self.out_untyped_seen;
                let need = if typed { 5 } else { 4 };
                let n = (need - self.out_have).min(bytes.len());
                self.out_header[self.out_have..self.out_have + n].copy_from_slice(&bytes[..n]);
                self.out_have += n;
                bytes = &bytes[n..];
                if self.out_have < need {
                    return;
                }
                let (kind, len_at) = if typed {
                    (self.out_header[0], 1)
                } else {
                    (0, 0)
                };
                let len = i32::from_be_bytes([
                    self.out_header[len_at],
                    self.out_header[len_at + 1],
                    self.out_header[len_at + 2],
                    self.out_header[len_at + 3],
                ]);
                if len < 4 {
                    self.out_broken = true;
                    wire.desync();
                    return;
                }
                self.out_have = 0;
                self.out_remaining = len as usize - 4;
                if typed {
                    if kind == b'Q' || kind == b'S' {
                        wire.syncs_sent.fetch_add(1, Ordering::Release);
                    }
                } else if len == 8 && self.written == SSL_REQUEST {
                    // SSLRequest: the startup message (untyped) comes next, on this
                    // stream ('N') or above TLS ('S', where a new tap takes over).
                } else {
                    self.out_untyped_seen = true;
                    // The startup exchange ends in one ReadyForQuery.
                    wire.syncs_sent.fetch_add(1, Ordering::Release);
                }
                continue;
            }
            let n = self.out_remaining.min(bytes.len());
            self.out_remaining -= n;
            bytes = &bytes[n..];
        }
    }

    pub(crate) fn on_read(&mut self, mut bytes: &[u8], wire: &WireState) {
        while !bytes.is_empty() && !self.broken {
            if self.expect_ssl_byte {
                // 'S': TLS follows (this tap is switched off); 'N': plaintext goes on.
                self.expect_ssl_byte = false;
                bytes = &bytes[1..];
                continue;
            }
            if self.remaining == 0 && self.have < 5 {
                let n = (5 - self.have).min(bytes.len());
                self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                bytes = &bytes[n..];
                if self.have < 5 {
                    return;
                }
                self.kind = self.header[0];
                let len = i32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                if len < 4 {
                    self.broken = true;
                    wire.desync();
                    return;
                }
                self.remaining = len as usize - 4;
                // Rows and command tags are copied only while a capture is armed.
                self.capture = self.remaining <= CAPTURE_LIMIT
                    && (matches!(self.kind, b'E' | b'S' | b'Z')
                        || (matches!(self.kind, b'C' | b'D') && wire.capturing()));
                self.body.clear();
                if self.remaining == 0 {
                    self.finish(wire);
                }
                continue;
            }
            let n = self.remaining.min(bytes.len());
            if self.capture {
                self.body.extend_from_slice(&bytes[..n]);
            }
            self.remaining -= n;
            bytes = &bytes[n..];
            if self.remaining == 0 {
                self.finish(wire);
            }
        }
    }

    fn finish(&mut self, wire: &WireState) {
        if self.capture && matches!(self.kind, b'C' | b'D') {
            wire.on_captured(self.kind, &self.body);
        }
        wire.on_message(self.kind, if self.capture { &self.body } else { &[] });
        self.have = 0;
        self.remaining = 0;
    }
}

/// A stream whose traffic is observed into a [`WireState`] while `observing` is on.
///
/// Behind a transaction-mode pooler it also hosts the statement rewriter
/// ([`super::unnamed`]), on the same plaintext layer: the tap then observes
/// what tokio-postgres wrote and what it is given to read.
#[derive(Debug)]
pub(crate) struct Tapped<S> {
    inner: S,
    wire: std::sync::Arc<WireState>,
    observing: bool,
    framer: Framer,
    rewrite: Option<Box<Rewrite>>,
}

/// The rewriter and its buffers: rewritten bytes not yet written, filtered
/// bytes not yet read.
#[derive(Debug, Default)]
struct Rewrite {
    unnamer: super::unnamed::Unnamer,
    out: Vec<u8>,
    out_at: usize,
    back: Vec<u8>,
    back_at: usize,
    scratch: Vec<u8>,
}

/// Rewritten bytes that may wait unwritten before a write waits too.
const REWRITE_HIGH_WATER: usize = 256 * 1024;

impl<S> Tapped<S> {
    pub(crate) fn new(inner: S, wire: std::sync::Arc<WireState>, observing: bool) -> Self {
        Tapped {
            inner,
            wire,
            observing,
            framer: Framer::default(),
            rewrite: None,
        }
    }

    /// Rewrites named statements into unnamed ones (see [`super::unnamed`]).
    pub(crate) fn unnamed(mut self, on: bool) -> Self {
        self.rewrite = on.then(Default::default);
        self
    }

    pub(crate) fn set_observing(&mut self, on: bool) {
        self.observing = on;
        if !on {
            // Below TLS the bytes are ciphertext: the layer above rewrites.
            self.rewrite = None;
        }
    }
}

impl<S: AsyncWrite + Unpin> Tapped<S> {
    /// Writes pending rewritten bytes; `Ready(Ok)` once none are left.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(rw) = self.rewrite.as_deref_mut() else {
            return Poll::Ready(Ok(()));
        };
        while rw.out_at < rw.out.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &rw.out[rw.out_at..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => rw.out_at += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        rw.out.clear();
        rw.out_at = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> Tapped<S> {
    /// A read through the rewriter: the server's bytes, without the replies to
    /// the rewriter's own messages.
    fn poll_read_rewritten(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let rw = self.rewrite.as_deref_mut().expect("called with a rewriter");
            if rw.back_at < rw.back.len() {
                let n = (rw.back.len() - rw.back_at).min(buf.remaining());
                let from = rw.back_at;
                buf.put_slice(&rw.back[from..from + n]);
                rw.back_at += n;
                if self.observing {
                    self.framer.on_read(&rw.back[from..from + n], &self.wire);
                }
                if rw.back_at == rw.back.len() {
                    rw.back.clear();
                    rw.back_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            rw.scratch.resize(16 * 1024, 0);
            let mut raw = ReadBuf::new(&mut rw.scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut raw) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            let n = raw.filled().len();
            if n == 0 {
                self.wire.mark_closed(None);
                return Poll::Ready(Ok(()));
            }
            self.wire.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
            let (unnamer, scratch, back) = (&mut rw.unnamer, &rw.scratch, &mut rw.back);
            unnamer.read(&scratch[..n], back);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tapped<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.rewrite.is_some() {
            return this.poll_read_rewritten(cx, buf);
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let n = buf.filled().len() - before;
            if n == 0 {
                // EOF: the server closed the connection.
                this.wire.mark_closed(None);
            } else if this.observing {
                this.wire.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                let filled = buf.filled();
                this.framer.on_read(&filled[filled.len() - n..], &this.wire);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tapped<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.rewrite.is_some() {
            if let Poll::Ready(Err(e)) = this.drain(cx) {
                return Poll::Ready(Err(e));
            }
            let rw = this.rewrite.as_deref_mut().expect("checked above");
            if rw.out.len() - rw.out_at > REWRITE_HIGH_WATER {
                // `drain` returned Pending with the waker registered.
                return Poll::Pending;
            }
            if let Err(e) = rw.unnamer.write(buf, &mut rw.out) {
                return Poll::Ready(Err(io::Error::other(e.to_string())));
            }
            if this.observing {
                this.framer.on_write(buf, &this.wire);
            }
            this.wire
                .bytes_written
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            if let Poll::Ready(Err(e)) = this.drain(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if this.observing
            && let Poll::Ready(Ok(n)) = &r
        {
            this.framer.on_write(&buf[..*n], &this.wire);
            this.wire
                .bytes_written
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<S> tokio_postgres::tls::TlsStream for Tapped<S>
where
    S: tokio_postgres::tls::TlsStream + Unpin,
{
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        self.inner.channel_binding()
    }
}

/// The socket we open ourselves: TCP or a Unix socket.
#[derive(Debug)]
pub(crate) enum Socket {
    /// A TCP connection.
    Tcp(tokio::net::TcpStream),
    /// A Unix-domain socket.
    Unix(tokio::net::UnixStream),
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn error_body(code: &str, constraint: Option<&str>) -> Vec<u8> {
        let mut b = Vec::new();
        for (f, v) in [
            (b'S', "ERREUR"),
            (b'V', "ERROR"),
            (b'C', code),
            (b'M', "la valeur viole la contrainte"),
        ] {
            b.push(f);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        if let Some(c) = constraint {
            for (f, v) in [(b't', "users"), (b'n', c)] {
                b.push(f);
                b.extend_from_slice(v.as_bytes());
                b.push(0);
            }
        }
        b.push(0);
        b
    }

    #[derive(Debug, Clone)]
    enum M {
        Ready(u8),
        Row(Vec<u8>),
        Error(String, Option<String>),
        Standby(bool),
        Other(u8, Vec<u8>),
    }

    fn encode(ms: &[M]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in ms {
            out.extend(match m {
                M::Ready(s) => msg(b'Z', &[*s]),
                M::Row(b) => msg(b'D', b),
                M::Error(c, n) => msg(b'E', &error_body(c, n.as_deref())),
                M::Standby(on) => msg(
                    b'S',
                    if *on {
                        b"in_hot_standby\0on\0"
                    } else {
                        b"in_hot_standby\0off\0"
                    },
                ),
                M::Other(k, b) => msg(*k, b),
            });
        }
        out
    }

    fn observe(w: &WireState) -> (TxStatus, Option<bool>, Option<ServerError>, u64, u64, u64) {
        (
            w.tx_status(),
            w.in_hot_standby(),
            w.last_error(),
            w.ready_count(),
            w.error_count(),
            w.message_count(),
        )
    }

    fn arb_message() -> impl Strategy<Value = M> {
        prop_oneof![
            prop_oneof![Just(b'I'), Just(b'T'), Just(b'E')].prop_map(M::Ready),
            proptest::collection::vec(any::<u8>(), 0..400).prop_map(M::Row),
            (
                prop_oneof![Just("23505"), Just("40001"), Just("40P01"), Just("57014")],
                proptest::option::of("[a-z_]{1,20}")
            )
                .prop_map(|(c, n)| M::Error(c.to_owned(), n)),
            any::<bool>().prop_map(M::Standby),
            (
                prop_oneof![Just(b'C'), Just(b'T'), Just(b'1'), Just(b'2'), Just(b'N')],
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(k, b)| M::Other(k, b)),
        ]
    }

    proptest! {
        #[test]
        fn any_chunking_yields_the_same_observations(
            ms in proptest::collection::vec(arb_message(), 1..60),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            let stream = encode(&ms);
            let whole = WireState::default();
            Framer::default().on_read(&stream, &whole);

            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            points.sort();
            let chunked = WireState::default();
            let mut f = Framer::default();
            let mut at = 0;
            for p in points.into_iter().chain([stream.len()]) {
                f.on_read(&stream[at..p], &chunked);
                at = p;
            }
            prop_assert_eq!(observe(&whole), observe(&chunked));
            prop_assert_eq!(whole.message_count(), ms.len() as u64);
        }
    }

    #[test]
    fn an_error_response_yields_its_code_and_constraint_whatever_the_language() {
        let w = WireState::default();
        let stream = encode(&[
            M::Ready(b'I'),
            M::Error("23505".into(), Some("users_email_key".into())),
            M::Ready(b'E'),
        ]);
        Framer::default().on_read(&stream, &w);
        let e = w.last_error().unwrap();
        assert_eq!(
            e.sqlstate(),
            tokio_postgres::error::SqlState::UNIQUE_VIOLATION
        );
        assert_eq!(e.constraint.as_deref(), Some("users_email_key"));
        assert_eq!(e.table.as_deref(), Some("users"));
        assert_eq!(e.severity, "ERROR");
        assert_eq!(w.tx_status(), TxStatus::Failed);
    }

    fn data_row(values: &[Option<&str>]) -> Vec<u8> {
        let mut b = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v.as_bytes());
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        b
    }

    /// The replies to `COMMIT; SELECT pg_current_wal_insert_lsn()::text`.
    fn commit_and_position(lsn: &str) -> Vec<u8> {
        encode(&[
            M::Other(b'C', b"COMMIT\0".to_vec()),
            M::Other(b'T', vec![0, 1, b'x', 0]),
            M::Row(data_row(&[Some(lsn)])),
            M::Other(b'C', b"SELECT 1\0".to_vec()),
            M::Ready(b'I'),
        ])
    }

    #[test]
    fn an_armed_capture_keeps_the_first_tag_and_row_in_any_chunking() {
        let stream = commit_and_position("16/B374D848");
        for cut in 0..=stream.len() {
            let w = WireState::default();
            let mut f = Framer::default();
            w.capture_replies();
            f.on_read(&stream[..cut], &w);
            f.on_read(&stream[cut..], &w);
            let c = w.take_captured();
            assert!(c.first_completed("COMMIT"), "cut at {cut}: {c:?}");
            assert_eq!(c.one_text_value(), Some("16/B374D848"), "cut at {cut}");
            assert_eq!(w.ready_count(), 1, "one round trip");
        }
    }

    #[test]
    fn rows_are_not_copied_unless_a_capture_is_armed() {
        let w = WireState::default();
        let mut f = Framer::default();
        f.on_read(&commit_and_position("0/1"), &w);
        assert_eq!(w.take_captured(), Captured::default());
        // Disarmed by the take: the next replies are not kept either.
        w.capture_replies();
        let _ = w.take_captured();
        f.on_read(&commit_and_position("0/2"), &w);
        assert_eq!(w.take_captured(), Captured::default());
    }

    #[test]
    fn a_commit_that_fails_leaves_no_tag_and_no_row() {
        let w = WireState::default();
        w.capture_replies();
        Framer::default().on_read(
            &encode(&[M::Error("40001".into(), None), M::Ready(b'I')]),
            &w,
        );
        let c = w.take_captured();
        assert!(!c.first_completed("COMMIT"));
        assert_eq!(c.one_text_value(), None);
    }

    #[test]
    fn only_a_single_non_null_column_is_a_text_value() {
        let of = |row: Vec<u8>| Captured {
            first_tag: None,
            first_row: Some(row),
        };
        assert_eq!(of(data_row(&[Some("0/1")])).one_text_value(), Some("0/1"));
        assert_eq!(of(data_row(&[None])).one_text_value(), None);
        assert_eq!(of(data_row(&[Some("a"), Some("b")])).one_text_value(), None);
        assert_eq!(of(vec![0, 1, 0, 0, 0, 9, b'x']).one_text_value(), None);
        assert_eq!(of(vec![0]).one_text_value(), None);
    }

    #[test]
    fn the_answer_to_an_ssl_request_is_skipped() {
        let w = WireState::default();
        let mut f = Framer::default();
        f.on_write(&SSL_REQUEST, &w);
        let mut stream = vec![b'N'];
        stream.extend(encode(&[M::Standby(true), M::Ready(b'I')]));
        f.on_read(&stream, &w);
        assert_eq!(w.in_hot_standby(), Some(true));
        assert_eq!(w.tx_status(), TxStatus::Idle);
    }

    #[test]
    fn requests_in_flight_are_counted_until_their_ready_for_query() {
        let w = WireState::default();
        let mut f = Framer::default();
        let params = b"user\0u\0\0";
        let mut startup = Vec::new();
        startup.extend_from_slice(&(8 + params.len() as i32).to_be_bytes());
        startup.extend_from_slice(&196608i32.to_be_bytes());
        startup.extend_from_slice(params);
        // written in awkward pieces
        for chunk in startup.chunks(3) {
            f.on_write(chunk, &w);
        }
        assert_eq!(w.in_flight(), 1);
        f.on_read(
            &encode(&[M::Other(b'R', vec![0, 0, 0, 0]), M::Ready(b'I')]),
            &w,
        );
        assert!(w.is_settled_idle());
        let mut extended = msg(b'P', b"\0SELECT 1\0\0\0");
        extended.extend(msg(b'B', &[0; 8]));
        extended.extend(msg(b'E', &[0, 0, 0, 0, 0]));
        extended.extend(msg(b'S', &[]));
        extended.extend(msg(b'Q', b"SELECT 2\0"));
        f.on_write(&extended, &w);
        assert_eq!(w.in_flight(), 2);
        assert!(
            !w.is_settled_idle(),
            "idle status is stale while requests are in flight"
        );
        f.on_read(&encode(&[M::Ready(b'I'), M::Ready(b'I')]), &w);
        assert!(w.is_settled_idle());
    }

    #[test]
    fn a_negative_length_makes_the_status_unknown() {
        let w = WireState::default();
        let mut stream = encode(&[M::Ready(b'I')]);
        stream.extend_from_slice(&[b'D', 0xff, 0xff, 0xff, 0xff]);
        Framer::default().on_read(&stream, &w);
        assert_eq!(w.tx_status(), TxStatus::Unknown);
    }

    #[tokio::test]
    async fn the_tap_passes_bytes_through_unchanged_and_counts_them() {
        let (a, mut b) = tokio::io::duplex(64);
        let wire = Arc::new(WireState::default());
        let mut t = Tapped::new(a, wire.clone(), true);
        t.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        b.write_all(b"world!").await.unwrap();
        let mut back = [0u8; 6];
        t.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"world!");
        assert_eq!((wire.bytes_written(), wire.bytes_read()), (5, 6));
        drop(b);
        let mut rest = Vec::new();
        t.read_to_end(&mut rest).await.unwrap();
        assert!(wire.is_closed());
    }

    #[tokio::test]
    async fn a_tap_that_is_switched_off_counts_nothing() {
        let (a, mut b) = tokio::io::duplex(64);
        let wire = Arc::new(WireState::default());
        let mut t = Tapped::new(a, wire.clone(), false);
        t.write_all(b"ciphertext").await.unwrap();
        let mut got = [0u8; 10];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(wire.bytes_written(), 0);
    }
}
