//! A fault-injecting proxy for the PostgreSQL wire protocol, in the test
//! support: it sits between Railyard and a real server and, on command,
//! cuts a connection at a chosen frontend message.
//!
//! The client side speaks plain TCP (`sslmode=disable`) and the proxy
//! forwards to the server's Unix socket, where the local cluster accepts
//! connections without TLS; so the proxy sees the protocol's frames and a
//! predicate can choose the message to cut at (a COMMIT, an INSERT). Through
//! TLS it could not read the frames, only count the client's flights (bursts
//! of writes between two replies); the tests here need the frames.
//!
//! A cut is one-shot and deterministic:
//! - `Cut::After(pred)`: the matching message, and the rest of its request
//!   up to the `Sync` after its `Execute` for the extended protocol (a
//!   prepare's round trip comes first), is forwarded; the client's side
//!   is closed at once, so it never sees the reply; the server's side is
//!   kept until the server has answered the request (its `ReadyForQuery`),
//!   so the server has finished the work (committed, for a COMMIT) before
//!   the proxy closes it.
//! - `Cut::Before(pred)`: the matching message is not forwarded; both sides
//!   are closed at once.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

/// A frontend message as the predicate sees it.
#[derive(Debug)]
pub struct Frame<'a> {
    /// Its type byte (`Q` query, `P` parse, `B` bind, `E` execute, `S` sync, …).
    pub kind: u8,
    /// The SQL text of a `Q` or `P`, when it has one.
    pub sql: Option<&'a str>,
}

type Pred = Box<dyn Fn(&Frame<'_>) -> bool + Send + Sync>;

/// Where to cut.
pub enum Cut {
    /// After forwarding the matching request, before relaying its reply.
    After(Pred),
    /// Instead of forwarding the matching message.
    Before(Pred),
    /// At the matching message, stop relaying both ways without closing
    /// either side (a dead switch, a crashed host): nothing is forwarded
    /// and nothing comes back, until the proxy is dropped.
    BlackHole(Pred),
}

#[derive(Default)]
struct Control {
    plan: Mutex<Option<Cut>>,
    accepted: AtomicU64,
    cuts: AtomicU64,
    /// Latency added to each forwarded chunk, each way, in microseconds.
    latency_us: AtomicU64,
    /// Set when the proxy is dropped: black-holed connections let go then.
    stopped: std::sync::atomic::AtomicBool,
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
}

/// The proxy; stops accepting when dropped.
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
    }
}

impl Proxy {
    /// A proxy on a free loopback port to the server's socket `upstream`.
    pub async fn start(upstream: PathBuf) -> Proxy {
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
                let Ok(server) = UnixStream::connect(&upstream).await else {
                    continue;
                };
                tokio::spawn(relay(client, server, c.clone()));
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
    pub fn set_latency(&self, one_way: std::time::Duration) {
        self.control
            .latency_us
            .store(one_way.as_micros() as u64, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.control.accepted.load(Ordering::SeqCst)
    }

    /// Cuts made so far.
    pub fn cuts(&self) -> u64 {
        self.control.cuts.load(Ordering::SeqCst)
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

async fn relay(client: TcpStream, server: UnixStream, control: Arc<Control>) {
    let _ = client.set_nodelay(true);
    let (mut cr, cw) = client.into_split();
    let (mut sr, sw) = server.into_split();
    // Each direction goes through a delay line: a chunk read at `t` is
    // written at `t + latency`, so latency adds to each trip once instead
    // of piling up behind earlier chunks.
    let to_client = line(cw);
    let to_server = line(sw);
    // After an `After` cut: the server's replies are swallowed until its
    // ReadyForQuery, then everything closes.
    let swallow = Arc::new(tokio::sync::Notify::new());
    let swallowing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2c = {
        let swallowing = swallowing.clone();
        let swallow = swallow.clone();
        let holed = holed.clone();
        let control = control.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut frames = Vec::new();
            loop {
                let n = match sr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if holed.load(Ordering::SeqCst) {
                    // Relay nothing, close nothing.
                    let _held = (&sr, &to_client);
                    control.until_stopped().await;
                    return;
                }
                if swallowing.load(Ordering::SeqCst) {
                    // Wait for the server's ReadyForQuery, then stop.
                    frames.extend_from_slice(&buf[..n]);
                    let mut at = 0;
                    while frames.len() >= at + 5 {
                        let len =
                            u32::from_be_bytes(frames[at + 1..at + 5].try_into().unwrap()) as usize;
                        if frames.len() < at + 1 + len {
                            break;
                        }
                        if frames[at] == b'Z' {
                            swallow.notify_one();
                            return;
                        }
                        at += 1 + len;
                    }
                    frames.drain(..at);
                    continue;
                }
                let at = tokio::time::Instant::now() + latency(&control);
                if to_client.send((at, buf[..n].to_vec())).await.is_err() {
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
    'read: loop {
        let n = match cr.read(&mut buf).await {
            Ok(0) | Err(_) => break 'read,
            Ok(n) => n,
        };
        framer.buf.extend_from_slice(&buf[..n]);
        let at = tokio::time::Instant::now() + latency(&control);
        while let Some((kind, msg)) = framer.next() {
            let frame = Frame {
                kind,
                sql: sql_of(kind, &msg),
            };
            let action = if cutting_after {
                None
            } else {
                let mut plan = control.plan.lock().unwrap();
                let hit = match plan.as_ref() {
                    Some(Cut::After(p)) | Some(Cut::Before(p)) | Some(Cut::BlackHole(p)) => {
                        kind != 0 && p(&frame)
                    }
                    None => false,
                };
                if hit { plan.take() } else { None }
            };
            match action {
                Some(Cut::Before(_)) => {
                    control.cuts.fetch_add(1, Ordering::SeqCst);
                    s2c.abort();
                    return; // both sides dropped
                }
                Some(Cut::After(_)) => cutting_after = true,
                Some(Cut::BlackHole(_)) => {
                    control.cuts.fetch_add(1, Ordering::SeqCst);
                    holed.store(true, Ordering::SeqCst);
                    // Hold every socket open, relaying nothing, until the
                    // proxy goes.
                    let _held = (&cr, &to_server);
                    control.until_stopped().await;
                    s2c.abort();
                    return;
                }
                None => {}
            }
            if to_server.send((at, msg)).await.is_err() {
                break 'read;
            }
            if cutting_after && kind == b'E' {
                executed = true;
            }
            if cutting_after && (kind == b'Q' || (kind == b'S' && executed)) {
                control.cuts.fetch_add(1, Ordering::SeqCst);
                // The client never sees the reply: its side closes now.
                swallowing.store(true, Ordering::SeqCst);
                drop(cr);
                // The server finishes the request; then its side closes.
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(10), swallow.notified())
                        .await;
                s2c.abort();
                return;
            }
        }
    }
    s2c.abort();
}

fn latency(control: &Control) -> std::time::Duration {
    std::time::Duration::from_micros(control.latency_us.load(Ordering::Relaxed))
}

type Line = tokio::sync::mpsc::Sender<(tokio::time::Instant, Vec<u8>)>;

/// A writer that writes each chunk at its time; it ends (closing `w`) when
/// every sender is gone.
fn line<W: tokio::io::AsyncWrite + Unpin + Send + 'static>(mut w: W) -> Line {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(1024);
    tokio::spawn(async move {
        while let Some((at, bytes)) = rx.recv().await {
            // The timer ticks by the millisecond: no sleep when the time has
            // come already (no latency set), or a zero-latency proxy would
            // add a tick to every trip.
            if at > tokio::time::Instant::now() {
                tokio::time::sleep_until(at).await;
            }
            if w.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    tx
}
