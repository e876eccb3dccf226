//! The tapped streams: [`Tapped`] (the pass-through that feeds the framer,
//! and hosts the statement rewriter behind a transaction-mode pooler) and
//! [`Socket`] (TCP or Unix).

use super::*;

/// A stream whose traffic is observed into a [`WireState`] while `observing` is on.
///
/// Behind a transaction-mode pooler it also hosts the statement rewriter
/// ([`super::super::unnamed`]), on the same plaintext layer: the tap then observes
/// what tokio-postgres wrote and what it is given to read.
#[derive(Debug)]
pub(crate) struct Tapped<S> {
    pub(super) inner: S,
    pub(super) wire: std::sync::Arc<WireState>,
    pub(super) observing: bool,
    pub(super) framer: Framer,
    pub(super) rewrite: Option<Box<Rewrite>>,
    /// Fail the read that brings a request for the password in clear or as
    /// MD5: set on a plain TCP stream, where anyone on the path reads it.
    pub(super) refuse_weak_auth: bool,
}

/// The rewriter and its buffers: rewritten bytes not yet written, filtered
/// bytes not yet read.
#[derive(Debug, Default)]
pub(super) struct Rewrite {
    pub(super) unnamer: super::super::unnamed::Unnamer,
    pub(super) out: Vec<u8>,
    pub(super) out_at: usize,
    pub(super) back: Vec<u8>,
    pub(super) back_at: usize,
    pub(super) scratch: Vec<u8>,
}

/// Why a connect ended when the server asked for a weak password exchange.
pub(crate) const WEAK_AUTH_REFUSED: &str = "the server asked for the password in clear or as MD5 \
     over a connection without TLS; Railyard sends a password over plain TCP only by SCRAM: use TLS \
     (sslmode=require or verify-full, the core's `tls` feature) or store the role's password with \
     scram-sha-256";

/// Rewritten bytes that may wait unwritten before a write waits too.
pub(super) const REWRITE_HIGH_WATER: usize = 256 * 1024;

impl<S> Tapped<S> {
    pub(crate) fn new(inner: S, wire: std::sync::Arc<WireState>, observing: bool) -> Self {
        Tapped {
            inner,
            wire,
            observing,
            framer: Framer::default(),
            rewrite: None,
            refuse_weak_auth: false,
        }
    }

    /// Refuses to go on when the server asks for the password in clear or as
    /// MD5 on this stream (as libpq's `require_auth=scram-sha-256` does): for
    /// a TCP socket, whose tap stays on only while TLS is not negotiated.
    /// tokio-postgres then fails the connect before it writes the password.
    pub(crate) fn refuse_weak_auth(mut self, on: bool) -> Self {
        self.refuse_weak_auth = on;
        self
    }

    fn weak_auth_refused(&self) -> Option<io::Error> {
        (self.refuse_weak_auth && self.observing && self.wire.weak_auth_asked())
            .then(|| io::Error::new(io::ErrorKind::PermissionDenied, WEAK_AUTH_REFUSED))
    }

    /// Rewrites named statements into unnamed ones (see [`super::super::unnamed`]).
    pub(crate) fn unnamed(mut self, on: bool) -> Self {
        self.rewrite = on.then(Default::default);
        self
    }

    #[cfg(feature = "tls")]
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
    pub(super) fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
    pub(super) fn poll_read_rewritten(
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
                if let Some(e) = self.weak_auth_refused() {
                    return Poll::Ready(Err(e));
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
        let r = this.read_observed(cx, buf);
        if let Poll::Ready(Err(e)) = &r {
            // The connection is dead from this moment: said before tokio-postgres
            // fails the request in flight, so that the failure is judged a lost
            // connection however late the driver task runs.
            this.wire
                .mark_closed(Some(format!("reading from the server failed: {e}")));
        }
        r
    }
}

impl<S: AsyncRead + Unpin> Tapped<S> {
    fn read_observed(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
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
                if let Some(e) = this.weak_auth_refused() {
                    return Poll::Ready(Err(e));
                }
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> Tapped<S> {
    fn write_observed(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self;
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
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tapped<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = this.write_observed(cx, buf);
        if let Poll::Ready(Err(e)) = &r {
            this.wire
                .mark_closed(Some(format!("writing to the server failed: {e}")));
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
