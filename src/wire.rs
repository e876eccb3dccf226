//! The protocol tap (DESIGN.md D2): a pass-through stream under tokio-postgres that
//! observes the bytes of one connection and never changes them.
//!
//! Every connection opens its own socket (`Config::connect_raw`), wrapped in
//! [`Tapped`]. When TLS is negotiated, our connector switches the socket's tap off
//! and wraps the decrypted stream instead; both share one [`WireState`]. This
//! module records what the pool needs today (bytes in and out, whether TLS is in
//! use, whether the socket closed); the message framing that extracts SQLSTATEs
//! and transaction status builds on the same seam.

use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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

    pub(crate) fn tls_failed(&self) -> bool {
        self.tls_failed.load(Ordering::Relaxed)
    }
    pub(crate) fn note_tls(&self) {
        self.tls.store(true, Ordering::Relaxed);
    }
    pub(crate) fn note_tls_failure(&self) {
        self.tls_failed.store(true, Ordering::Relaxed);
    }
    pub(crate) fn mark_closed(&self, reason: Option<String>) {
        if let Some(r) = reason {
            *self.close_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        }
        self.closed.store(true, Ordering::Release);
    }
}

/// A stream whose traffic is observed into a [`WireState`] while `observing` is on.
#[derive(Debug)]
pub struct Tapped<S> {
    inner: S,
    wire: std::sync::Arc<WireState>,
    observing: bool,
}

impl<S> Tapped<S> {
    pub(crate) fn new(inner: S, wire: std::sync::Arc<WireState>, observing: bool) -> Self {
        Tapped {
            inner,
            wire,
            observing,
        }
    }

    pub(crate) fn set_observing(&mut self, on: bool) {
        self.observing = on;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tapped<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let n = buf.filled().len() - before;
            if n == 0 {
                // EOF: the server closed the connection.
                this.wire.mark_closed(None);
            } else if this.observing {
                this.wire.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
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
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if this.observing
            && let Poll::Ready(Ok(n)) = &r
        {
            this.wire
                .bytes_written
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
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
pub enum Socket {
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
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
