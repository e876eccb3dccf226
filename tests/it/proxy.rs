//! A fault-injecting proxy for the PostgreSQL wire protocol, in the test
//! support: it sits between Railyard and a real server and, on command, makes
//! the network misbehave: latency each way, a bandwidth cap, a cut at a chosen
//! message, a black hole, a reset (RST) at a chosen byte, a half-close, and a
//! reset of every connection at once.
//!
//! Two ways to the server:
//! - [`Proxy::start`] forwards plain TCP from the client (`sslmode=disable`)
//!   to the server's Unix socket, where the local cluster accepts connections
//!   without TLS. The proxy reads the frontend's frames, so a predicate can
//!   choose the message to act at (a COMMIT, an INSERT, a monitor's probe).
//! - [`Proxy::start_tls`] forwards TCP to the server's TCP port and passes the
//!   bytes through untouched: the client's TLS session is with the server, and
//!   the proxy cannot read a frame after the 8-byte SSLRequest. What it can
//!   see is *flights*: the bytes a client writes between two replies of the
//!   server. A request (a simple query, or an extended-protocol batch up to
//!   its Sync) is one flight, because the client waits for the reply before it
//!   writes again; so [`Cut::AfterNextFlight`] armed while a connection is
//!   idle between requests acts at the next request, whatever it is.
//!
//! A cut is one-shot and deterministic:
//! - `Cut::After(pred)`: the matching message, and the rest of its request
//!   up to the `Sync` after its `Execute` for the extended protocol (a
//!   prepare's round trip comes first), is forwarded; the client's side is
//!   closed without the reply; the server's side is kept until the server has
//!   answered (its `ReadyForQuery`), so the server has finished the work
//!   (committed, for a COMMIT) before the proxy closes it.
//! - `Cut::AfterNextFlight` (TLS): the next client flight is forwarded; at
//!   the first byte of the server's reply (the work is done by then), both
//!   sides are closed and the reply is dropped.
//! - `Cut::Before(pred)`: the matching message is not forwarded; both sides
//!   are closed at once.
//! - `Cut::BlackHole(pred)`: nothing more is relayed either way and nothing
//!   is closed, until the proxy is dropped.
//! - `Cut::ResetInReply(pred, n)`: the request is forwarded, `n` bytes of
//!   what the server sends after it reach the client, then the client's
//!   connection is reset (RST: `SO_LINGER` 0, then close).
//! - `Cut::HalfClose(pred, dir)`: the matching message is forwarded, then one
//!   direction is shut (FIN) while the other keeps relaying.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// A frontend message as the predicate sees it.
#[derive(Debug)]
pub struct Frame<'a> {
    /// Its type byte (`Q` query, `P` parse, `B` bind, `E` execute, `S` sync, …).
    pub kind: u8,
    /// The SQL text of a `Q` or `P`, when it has one.
    pub sql: Option<&'a str>,
}

type Pred = Box<dyn Fn(&Frame<'_>) -> bool + Send + Sync>;

/// A direction of the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// From the client to the server.
    ToServer,
    /// From the server to the client.
    ToClient,
}

/// Where to cut, and how.
pub enum Cut {
    /// After forwarding the matching request, before relaying its reply.
    After(Pred),
    /// TLS: after forwarding the next client flight, before its reply.
    AfterNextFlight,
    /// Instead of forwarding the matching message.
    Before(Pred),
    /// At the matching message, stop relaying both ways without closing
    /// either side (a dead switch, a crashed host).
    BlackHole(Pred),
    /// Forward the matching request, relay `n` bytes of the server's reply,
    /// then reset the client's connection.
    ResetInReply(Pred, usize),
    /// Forward the matching message, then shut one direction.
    HalfClose(Pred, Dir),
}

impl Cut {
    fn pred(&self) -> Option<&Pred> {
        match self {
            Cut::After(p)
            | Cut::Before(p)
            | Cut::BlackHole(p)
            | Cut::ResetInReply(p, _)
            | Cut::HalfClose(p, _) => Some(p),
            Cut::AfterNextFlight => None,
        }
    }
}

/// What a connection's relay does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Run,
    /// Close both sides (FIN).
    Close,
    /// Reset the client's side (RST), close the server's.
    Reset,
    /// Relay nothing, close nothing, until the proxy goes.
    Hole,
}

/// How many connection starts the proxy remembers (for the storm's spread).
const STARTS_KEPT: usize = 4096;

#[derive(Default)]
struct Control {
    plan: Mutex<Option<Cut>>,
    accepted: AtomicU64,
    cuts: AtomicU64,
    /// Connections being relayed now.
    open: AtomicU64,
    /// When connections were accepted (the newest `STARTS_KEPT`).
    starts: Mutex<VecDeque<Instant>>,
    /// Each live connection's fate, for `reset_all`.
    links: Mutex<Vec<Weak<watch::Sender<Fate>>>>,
    /// New connections are held without a word (a black hole at connect).
    hole_new: AtomicBool,
    /// Latency added to each forwarded chunk, each way, in microseconds.
    latency_us: AtomicU64,
    /// Bytes per second each way per connection; 0: no cap.
    bandwidth: AtomicU64,
    /// Set when the proxy is dropped: black-holed connections let go then.
    stopped: AtomicBool,
    stop: tokio::sync::Notify,
}

impl Control {
    /// Waits until the proxy is dropped.
    async fn until_stopped(&self) {
        let notified = self.stop.notified();
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        notified.await;
    }

    fn take_plan(&self, hit: impl FnOnce(&Cut) -> bool) -> Option<Cut> {
        let mut plan = self.plan.lock().unwrap();
        if plan.as_ref().is_some_and(hit) {
            self.cuts.fetch_add(1, Ordering::SeqCst);
            plan.take()
        } else {
            None
        }
    }
}

#[derive(Clone)]
enum Upstream {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// The proxy; stops accepting, and lets every connection go, when dropped.
pub struct Proxy {
    pub port: u16,
    control: Arc<Control>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.control.stopped.store(true, Ordering::SeqCst);
        self.control.stop.notify_waiters();
        for link in self.control.links.lock().unwrap().drain(..) {
            if let Some(fate) = link.upgrade() {
                let _ = fate.send(Fate::Close);
            }
        }
    }
}

impl Proxy {
    /// A proxy on a free loopback port to the server's socket `upstream`;
    /// the proxy reads the frames (clients connect with `sslmode=disable`).
    pub async fn start(upstream: PathBuf) -> Proxy {
        Self::spawn(Upstream::Unix(upstream), false).await
    }

    /// A proxy on a free loopback port to the server's TCP `upstream`,
    /// passing TLS through: it sees flights, not frames.
    pub async fn start_tls(upstream: SocketAddr) -> Proxy {
        Self::spawn(Upstream::Tcp(upstream), true).await
    }

    async fn spawn(upstream: Upstream, tls: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let control = Arc::new(Control::default());
        let c = control.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                c.accepted.fetch_add(1, Ordering::SeqCst);
                {
                    let mut starts = c.starts.lock().unwrap();
                    if starts.len() == STARTS_KEPT {
                        starts.pop_front();
                    }
                    starts.push_back(Instant::now());
                }
                if c.hole_new.load(Ordering::SeqCst) {
                    // Accepted by the kernel, answered by nobody.
                    let c = c.clone();
                    tokio::spawn(async move {
                        let _held = client;
                        c.until_stopped().await;
                    });
                    continue;
                }
                let c = c.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    c.open.fetch_add(1, Ordering::SeqCst);
                    match upstream {
                        Upstream::Unix(path) => {
                            if let Ok(server) = UnixStream::connect(&path).await {
                                relay(client, server, c.clone(), false).await;
                            }
                        }
                        Upstream::Tcp(addr) => {
                            if let Ok(server) = TcpStream::connect(addr).await {
                                let _ = server.set_nodelay(true);
                                relay(client, server, c.clone(), tls).await;
                            }
                        }
                    }
                    c.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Proxy {
            port,
            control,
            task,
        }
    }

    /// Arms a one-shot cut, for the next matching message on any connection.
    pub fn arm(&self, cut: Cut) {
        *self.control.plan.lock().unwrap() = Some(cut);
    }

    /// Adds `one_way` before each chunk is forwarded, in both directions:
    /// a request and its reply take `2 × one_way` longer.
    pub fn set_latency(&self, one_way: Duration) {
        self.control
            .latency_us
            .store(one_way.as_micros() as u64, Ordering::SeqCst);
    }

    /// Caps each connection's throughput each way at `bytes_per_second`
    /// (`None`: no cap).
    pub fn set_bandwidth(&self, bytes_per_second: Option<u64>) {
        self.control
            .bandwidth
            .store(bytes_per_second.unwrap_or(0), Ordering::SeqCst);
    }

    /// New connections are accepted and then never answered (a host that
    /// died after its kernel took the SYN), until this is turned off.
    pub fn black_hole_new_connections(&self, on: bool) {
        self.control.hole_new.store(on, Ordering::SeqCst);
    }

    /// Black-holes every connection being relayed, at once: nothing more is
    /// relayed either way and nothing is closed; returns how many.
    pub fn black_hole_all(&self) -> usize {
        let links = self.control.links.lock().unwrap();
        let n = links
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|fate| fate.send(Fate::Hole).is_ok())
            .count();
        self.control.cuts.fetch_add(n as u64, Ordering::SeqCst);
        n
    }

    /// Resets (RST) every connection being relayed, at once; returns how many.
    pub fn reset_all(&self) -> usize {
        let links: Vec<_> = self.control.links.lock().unwrap().drain(..).collect();
        let mut n = 0;
        for link in links {
            if let Some(fate) = link.upgrade()
                && fate.send(Fate::Reset).is_ok()
            {
                n += 1;
            }
        }
        self.control.cuts.fetch_add(n as u64, Ordering::SeqCst);
        n
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.control.accepted.load(Ordering::SeqCst)
    }

    /// Cuts made so far (a reset of many connections counts each).
    pub fn cuts(&self) -> u64 {
        self.control.cuts.load(Ordering::SeqCst)
    }

    /// Connections being relayed now.
    pub fn open(&self) -> u64 {
        self.control.open.load(Ordering::SeqCst)
    }

    /// When the connections accepted at or after `since` were accepted.
    pub fn starts_since(&self, since: Instant) -> Vec<Instant> {
        let starts = self.control.starts.lock().unwrap();
        starts.iter().copied().filter(|&t| t >= since).collect()
    }
}

/// Frames of the client's stream: the untyped startup message first, then
/// typed messages.
struct Framer {
    buf: Vec<u8>,
    started: bool,
}

impl Framer {
    /// The next whole message in the buffer: (type, bytes); type 0 for the
    /// startup message.
    fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        if !self.started {
            if self.buf.len() < 4 {
                return None;
            }
            let len = u32::from_be_bytes(self.buf[..4].try_into().unwrap()) as usize;
            if self.buf.len() < len {
                return None;
            }
            let msg: Vec<u8> = self.buf.drain(..len).collect();
            // An SSLRequest or GSSENCRequest is answered and followed by
            // the real startup message; a CancelRequest ends the stream.
            let code = u32::from_be_bytes(msg[4..8].try_into().unwrap());
            if code != 80877103 && code != 80877104 {
                self.started = true;
            }
            return Some((0, msg));
        }
        if self.buf.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
        if self.buf.len() < 1 + len {
            return None;
        }
        let msg: Vec<u8> = self.buf.drain(..1 + len).collect();
        Some((msg[0], msg))
    }
}

fn sql_of(kind: u8, msg: &[u8]) -> Option<&str> {
    let body = &msg[5..];
    let text = match kind {
        b'Q' => body,
        // Parse: a statement name (NUL-terminated), then the query.
        b'P' => {
            let name_end = body.iter().position(|&b| b == 0)?;
            &body[name_end + 1..]
        }
        _ => return None,
    };
    let end = text.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&text[..end]).ok()
}

/// What the server-to-client side does with the server's bytes.
#[derive(Default)]
struct Reply {
    /// After an `After` cut: swallow until ReadyForQuery, then close.
    swallow_until_ready: AtomicBool,
    /// After an `AfterNextFlight` cut: swallow the first bytes, then close.
    swallow_first: AtomicBool,
    /// After a `ResetInReply` cut: relay this many bytes, then reset
    /// (`u64::MAX`: no reset armed).
    reset_after: AtomicU64,
    /// The server wrote since the client's last write: the client's next
    /// write starts a new flight.
    spoke: AtomicBool,
}

async fn relay<S>(client: TcpStream, server: S, control: Arc<Control>, tls: bool)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let _ = client.set_nodelay(true);
    let (fate_tx, mut fate) = watch::channel(Fate::Run);
    let fate_tx = Arc::new(fate_tx);
    {
        let mut links = control.links.lock().unwrap();
        links.retain(|l| l.strong_count() > 0);
        links.push(Arc::downgrade(&fate_tx));
    }
    let (mut cr, cw) = client.into_split();
    let (mut sr, sw) = tokio::io::split(server);
    // Each direction goes through a delay line: a chunk read at `t` is
    // written at `t + latency`, so latency adds to each trip once instead
    // of piling up behind earlier chunks.
    let to_client = line(cw, control.clone());
    let to_server = line(sw, control.clone());
    let reply = Arc::new(Reply {
        reset_after: AtomicU64::new(u64::MAX),
        spoke: AtomicBool::new(true),
        ..Reply::default()
    });
    let s2c = {
        let reply = reply.clone();
        let control = control.clone();
        let fate_tx = fate_tx.clone();
        let mut fate = fate_tx.subscribe();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut frames = Vec::new();
            loop {
                let n = tokio::select! {
                    biased;
                    _ = fate.changed() => match current(&mut fate) {
                        Fate::Run => continue,
                        Fate::Hole => {
                            let _held = (&sr, &to_client);
                            control.until_stopped().await;
                            return;
                        }
                        Fate::Close => return,
                        Fate::Reset => {
                            let _ = to_client.send(Out::Reset).await;
                            return;
                        }
                    },
                    r = sr.read(&mut buf) => match r {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    },
                };
                reply.spoke.store(true, Ordering::SeqCst);
                if reply.swallow_first.load(Ordering::SeqCst) {
                    let _ = fate_tx.send(Fate::Close);
                    return;
                }
                if reply.swallow_until_ready.load(Ordering::SeqCst) {
                    frames.extend_from_slice(&buf[..n]);
                    let mut at = 0;
                    while frames.len() >= at + 5 {
                        let len =
                            u32::from_be_bytes(frames[at + 1..at + 5].try_into().unwrap()) as usize;
                        if frames.len() < at + 1 + len {
                            break;
                        }
                        if frames[at] == b'Z' {
                            let _ = fate_tx.send(Fate::Close);
                            return;
                        }
                        at += 1 + len;
                    }
                    frames.drain(..at);
                    continue;
                }
                let mut n = n;
                let left = reply.reset_after.load(Ordering::SeqCst);
                let reset = left <= n as u64;
                if left != u64::MAX {
                    n = n.min(left as usize);
                    reply.reset_after.store(left - n as u64, Ordering::SeqCst);
                }
                let at = Instant::now() + latency(&control);
                if to_client
                    .send(Out::Data(at, buf[..n].to_vec()))
                    .await
                    .is_err()
                {
                    return;
                }
                if reset {
                    // The line writes what it holds, then resets.
                    let _ = to_client.send(Out::Reset).await;
                    let _ = fate_tx.send(Fate::Reset);
                    return;
                }
            }
        })
    };
    let mut framer = Framer {
        buf: Vec::new(),
        started: false,
    };
    let mut buf = vec![0u8; 16 * 1024];
    // Set once an `After` cut matched: forward up to the Sync that ends the
    // request executing it (a prepare's own Parse/Describe/Sync is not it:
    // the cut waits for an Execute), or the Query itself, then cut.
    let mut cutting_after = false;
    let mut executed = false;
    // TLS: after the SSLRequest, the bytes are opaque.
    let mut opaque = false;
    let mut to_server = Some(to_server);
    let mut half_close = None;
    let end = 'read: loop {
        let n = tokio::select! {
            biased;
            _ = fate.changed() => match current(&mut fate) {
                Fate::Run => continue,
                f => break 'read f,
            },
            r = cr.read(&mut buf) => match r {
                Ok(0) | Err(_) => break 'read Fate::Close,
                Ok(n) => n,
            },
        };
        let at = Instant::now() + latency(&control);
        let Some(tx) = to_server.as_ref() else {
            // The client-to-server direction was shut: drop what comes.
            continue;
        };
        if opaque {
            if reply.spoke.swap(false, Ordering::SeqCst)
                && control
                    .take_plan(|c| matches!(c, Cut::AfterNextFlight))
                    .is_some()
            {
                reply.swallow_first.store(true, Ordering::SeqCst);
            }
            if tx.send(Out::Data(at, buf[..n].to_vec())).await.is_err() {
                break 'read Fate::Close;
            }
            continue;
        }
        framer.buf.extend_from_slice(&buf[..n]);
        while let Some((kind, msg)) = framer.next() {
            if kind == 0 && tls && msg.len() == 8 {
                // The SSLRequest: what follows is TLS.
                opaque = true;
                reply.spoke.store(false, Ordering::SeqCst);
                let rest = std::mem::take(&mut framer.buf);
                if tx.send(Out::Data(at, msg)).await.is_err()
                    || tx.send(Out::Data(at, rest)).await.is_err()
                {
                    break 'read Fate::Close;
                }
                break;
            }
            let frame = Frame {
                kind,
                sql: sql_of(kind, &msg),
            };
            let action = if cutting_after || kind == 0 {
                None
            } else {
                control.take_plan(|c| c.pred().is_some_and(|p| p(&frame)))
            };
            match action {
                Some(Cut::Before(_)) => break 'read Fate::Close,
                Some(Cut::After(_)) => cutting_after = true,
                Some(Cut::BlackHole(_)) => {
                    let _ = fate_tx.send(Fate::Hole);
                    break 'read Fate::Hole;
                }
                Some(Cut::ResetInReply(_, n)) => {
                    reply.reset_after.store(n as u64, Ordering::SeqCst);
                }
                Some(Cut::HalfClose(_, dir)) => half_close = Some(dir),
                Some(Cut::AfterNextFlight) | None => {}
            }
            if tx.send(Out::Data(at, msg)).await.is_err() {
                break 'read Fate::Close;
            }
            // A half-close comes at the end of the request that executes
            // (the Sync after its Execute, or the Query itself), once the
            // server has it all.
            if half_close.is_some() && kind == b'E' {
                executed = true;
            }
            let end_of_request = kind == b'Q' || (kind == b'S' && executed);
            let now = if end_of_request {
                half_close.take()
            } else {
                None
            };
            match now {
                // The server's replies keep coming; the client's writes go nowhere.
                Some(Dir::ToServer) => {
                    to_server = None;
                    continue 'read;
                }
                // The client reads end of file; its writes still reach the server.
                Some(Dir::ToClient) => {
                    s2c.abort();
                }
                None => {}
            }
            if cutting_after && kind == b'E' {
                executed = true;
            }
            if cutting_after && (kind == b'Q' || (kind == b'S' && executed)) {
                // The client never sees the reply; the server finishes the
                // request, then both sides close.
                reply.swallow_until_ready.store(true, Ordering::SeqCst);
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    while *fate.borrow_and_update() == Fate::Run {
                        if fate.changed().await.is_err() {
                            return;
                        }
                    }
                })
                .await;
                break 'read Fate::Close;
            }
        }
    };
    match end {
        Fate::Hole => {
            let _held = (&cr, &to_server);
            control.until_stopped().await;
        }
        Fate::Close | Fate::Reset | Fate::Run => {}
    }
    let _ = fate_tx.send(end);
    // The server-to-client side ends on the fate (a reset goes through its
    // line, so that the close is a RST); then the client's socket goes.
    let _ = tokio::time::timeout(Duration::from_secs(5), s2c).await;
    drop(cr);
}

/// The fate now (the watch's guard is not held across an await).
fn current(fate: &mut watch::Receiver<Fate>) -> Fate {
    *fate.borrow_and_update()
}

fn latency(control: &Control) -> Duration {
    Duration::from_micros(control.latency_us.load(Ordering::Relaxed))
}

/// What a delay line carries.
enum Out {
    /// Bytes to write at a time.
    Data(Instant, Vec<u8>),
    /// Reset the connection (RST) after what came before.
    Reset,
}

type Line = tokio::sync::mpsc::Sender<Out>;

/// A side's write half: it can be reset rather than closed.
trait Half: AsyncWrite + Unpin + Send + 'static {
    /// Drops the half so that the socket's close is a reset.
    fn reset(self);
}

impl Half for tokio::net::tcp::OwnedWriteHalf {
    fn reset(self) {
        let _ = socket2::SockRef::from(self.as_ref()).set_linger(Some(Duration::ZERO));
        // No FIN first: the socket closes (with RST) when its read half goes.
        self.forget();
    }
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Half for tokio::io::WriteHalf<S> {
    fn reset(self) {}
}

/// The largest piece a capped line writes at once.
const PACE_PIECE: usize = 4096;

/// A writer that writes each chunk at its time, paced to the bandwidth cap;
/// it ends (shutting `w`'s direction) when every sender is gone.
fn line<W: Half>(mut w: W, control: Arc<Control>) -> Line {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Out>(1024);
    tokio::spawn(async move {
        // When the capped link is free again.
        let mut free_at = Instant::now();
        while let Some(out) = rx.recv().await {
            let (at, bytes) = match out {
                Out::Data(at, bytes) => (at, bytes),
                Out::Reset => {
                    let _ = w.flush().await;
                    w.reset();
                    return;
                }
            };
            // The timer ticks by the millisecond: no sleep when the time has
            // come already (no latency set), or a zero-latency proxy would
            // add a tick to every trip.
            if at > Instant::now() {
                tokio::time::sleep_until(at).await;
            }
            let cap = control.bandwidth.load(Ordering::Relaxed);
            if cap == 0 {
                if w.write_all(&bytes).await.is_err() {
                    return;
                }
                continue;
            }
            for piece in bytes.chunks(PACE_PIECE) {
                free_at = free_at.max(Instant::now())
                    + Duration::from_secs_f64(piece.len() as f64 / cap as f64);
                tokio::time::sleep_until(free_at).await;
                if w.write_all(piece).await.is_err() {
                    return;
                }
            }
        }
        let _ = w.shutdown().await;
    });
    tx
}
