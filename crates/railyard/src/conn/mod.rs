//! Connections: opening them, pooling them, and watching their wire.
//!
//! Railyard opens every connection itself (`open`): the socket (TCP or Unix)
//! is wrapped in the protocol tap ([`wire`]), TLS comes from our rustls
//! connector (`tls`, with the `tls` feature; `plain.rs` stands in without it), the password is read from the
//! [`Credentials`](crate::config::Credentials) provider at every connect (so a
//! rotated password is used without a restart), several hosts are walked in
//! order and `target_session_attrs` is checked by us. Connect errors keep the
//! server's SQLSTATE. Each [`Conn`] knows its host, port, role and backend pid.
//! `pool` is our `bb8::ManageConnection`, with a bounded check-out queue per
//! target; `breaker` fails connects fast while a server is down; `lease` is
//! what a check-out hands out; `gate` is what closing a `Database` shuts.
//!
//! This layer knows nothing of retries, routing or hooks: the timing hooks are
//! installed through the `Instrument` seam, which `observe` implements.

pub(crate) mod breaker;
#[cfg(feature = "tls")]
mod endpoint;
pub(crate) mod gate;
pub(crate) mod lease;
#[doc(hidden)]
pub mod open;
pub(crate) mod pool;
pub(crate) mod queue;
#[cfg(feature = "tls")]
pub(crate) mod tls;
// Without the `tls` feature: the same seam, plain sockets only.
#[cfg(not(feature = "tls"))]
#[path = "plain.rs"]
pub(crate) mod tls;
pub(crate) mod unnamed;
// The protocol tap's state: the executor, the test harness and the
// product crates read it; applications do not.
#[doc(hidden)]
pub mod wire;

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Instant;

use diesel::connection::TransactionManagerStatus;
use diesel_async::{AnsiTransactionManager, AsyncPgConnection, TransactionManager};
use tokio_postgres::types::PgLsn;

use crate::config::Host;
use crate::error::{ConnectError, ConnectStage, Error};
use tls::Connector;
use wire::{Socket, Tapped, WireState};

#[doc(hidden)]
pub use lease::LentConn;
pub use lease::PooledConn;
pub use pool::PoolStatus;
pub(crate) use wire::Captured;

/// Where an operation ran, or which target a connection serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Route {
    /// The primary.
    Primary,
    /// A replica, by `host:port`.
    Replica(Arc<str>),
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Primary => f.write_str("primary"),
            Route::Replica(name) => write!(f, "replica {name}"),
        }
    }
}

/// What a connection's timing instrumentation needs to label its events.
#[derive(Debug)]
#[doc(hidden)]
pub struct ConnLabels {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) database: String,
    pub(crate) route: Route,
    /// The attempt of the operation the connection is serving (set per attempt).
    pub(crate) attempt: AtomicU32,
    /// Bumped each time the connection is leased: one lease, one operation.
    pub(crate) operation: std::sync::atomic::AtomicU64,
    /// Statements recorded while armed (the harness's query assertions).
    pub recording: StatementRecording,
    /// Set while Railyard runs its own statements on the connection (health
    /// probes): the instrumentation reports none of them.
    pub(crate) quiet: std::sync::atomic::AtomicBool,
}

/// Railyard's own statements on a connection while this lives (a health
/// probe's): its timing hooks, statistics, spans and error rate see none of
/// them, as they see none of the replica monitors' polling. Declare it after
/// the connection's binding, so that it ends first.
pub(crate) struct Quiet(Option<Arc<ConnLabels>>);

impl Quiet {
    pub(crate) fn new(conn: &Conn) -> Self {
        let labels = conn.labels.clone();
        if let Some(l) = &labels {
            l.quiet.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Quiet(labels)
    }
}

impl Drop for Quiet {
    fn drop(&mut self) {
        if let Some(l) = &self.0 {
            l.quiet.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The statements a connection ran while recording was armed, their literals
/// replaced; bounded to [`StatementRecording::BOUND`] (the rest are counted).
#[derive(Debug, Default)]
#[doc(hidden)]
pub struct StatementRecording {
    armed: std::sync::atomic::AtomicBool,
    seen: std::sync::Mutex<(Vec<String>, usize)>,
}

impl StatementRecording {
    /// The most statement texts kept.
    pub(crate) const BOUND: usize = 1_000;

    /// Whether statements are being recorded.
    pub(crate) fn armed(&self) -> bool {
        self.armed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts recording afresh.
    pub fn arm(&self) {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = (Vec::new(), 0);
        self.armed.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops recording; returns the texts kept and how many ran in all.
    pub fn disarm(&self) -> (Vec<String>, usize) {
        self.armed
            .store(false, std::sync::atomic::Ordering::Relaxed);
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Records one statement.
    pub(crate) fn record(&self, sql: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.1 += 1;
        if seen.0.len() < Self::BOUND {
            seen.0.push(sql.to_owned());
        }
    }
}

/// The seam through which a higher layer (`observe`) puts its instrumentation
/// on each new connection, so that this layer never depends on hooks.
pub(crate) trait Instrument: Send + Sync + fmt::Debug {
    /// Installs the instrumentation on a freshly opened connection.
    fn install(
        self: Arc<Self>,
        pg: &mut AsyncPgConnection,
        labels: Arc<ConnLabels>,
        wire: Arc<WireState>,
    );
}

/// Whether a server accepts writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ServerRole {
    /// Not in recovery: accepts writes.
    Primary,
    /// In recovery (a hot standby): read-only.
    Standby,
}

/// What is known about one connection, recorded when it was opened.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnInfo {
    /// The host the connection reached.
    pub host: Host,
    /// The port it reached.
    pub port: u16,
    /// Primary or standby, from `pg_is_in_recovery()` at connect time.
    pub role: ServerRole,
    /// The server process serving this connection (`pg_backend_pid()`).
    pub backend_pid: i32,
    /// `server_version`, e.g. `15.8 (Debian 15.8-0+deb12u1)`.
    pub server_version: String,
    /// Whether the connection is encrypted.
    pub tls: bool,
}

/// A connection produced by Railyard's pool: a diesel-async connection plus what
/// Railyard knows about it. Dereferences to [`AsyncPgConnection`], so diesel
/// queries take `&mut *conn`.
pub struct Conn {
    labels: Option<Arc<ConnLabels>>,
    pg: AsyncPgConnection,
    info: ConnInfo,
    cancel: CancelHandle,
    wire: Arc<WireState>,
    created: Instant,
    last_returned: Instant,
    generation: u64,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("info", &self.info)
            .field("closed", &self.wire.is_closed())
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Host, role, backend pid and server version of this connection.
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }
    /// What the protocol tap has seen on this connection.
    pub fn wire(&self) -> &WireState {
        &self.wire
    }
    /// When the connection was opened.
    pub fn created(&self) -> Instant {
        self.created
    }
    /// Tells the timing hooks which attempt of an operation this is.
    pub(crate) fn set_attempt(&self, attempt: u32) {
        if let Some(l) = &self.labels {
            l.attempt
                .store(attempt, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The connection's labels, when it is instrumented. Workspace-internal.
    #[doc(hidden)]
    pub fn labels(&self) -> Option<&Arc<ConnLabels>> {
        self.labels.as_ref()
    }

    /// Starts a new operation on this connection (a new lease): attempt 1,
    /// and a fresh count of repeated statements.
    pub(crate) fn begin_operation(&self) {
        if let Some(l) = &self.labels {
            l.attempt.store(1, std::sync::atomic::Ordering::Relaxed);
            l.operation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[doc(hidden)]
    pub fn wire_arc(&self) -> Arc<WireState> {
        self.wire.clone()
    }
    /// A handle that can cancel the query this connection is running, from
    /// anywhere (it opens its own connection, through the same TLS settings).
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }
    /// The diesel connection, for running queries.
    pub fn pg(&mut self) -> &mut AsyncPgConnection {
        &mut self.pg
    }
    /// Takes the diesel connection out (for long-lived work outside the pool).
    pub fn into_inner(self) -> AsyncPgConnection {
        self.pg
    }

    /// Runs `sql` in the simple query protocol (its statements in order, one
    /// round trip) and returns diesel's result with what the tap kept of the
    /// replies: the first statement's command tag and the first row. diesel
    /// discards a simple query's rows; the tap reads them off the wire.
    ///
    /// A request still in flight (the `Close` of a statement diesel did not
    /// cache, say) is waited for first, so that what the tap keeps answers
    /// `sql` and nothing else; when it does not settle, `sql` is not sent.
    pub(crate) async fn simple_query_captured(
        &mut self,
        sql: &str,
    ) -> Result<(diesel::QueryResult<()>, Captured), Error> {
        use diesel_async::SimpleAsyncConnection;
        if !self.wire.quiesce(SETTLE_BEFORE_CAPTURE).await {
            return Err(Error::Query(diesel::result::Error::DeserializationError(
                "a request is still in flight on the connection; its replies could be taken for the position's"
                    .into(),
            )));
        }
        self.wire.capture_replies();
        let result = self.pg.batch_execute(sql).await;
        Ok((result, self.wire.take_captured()))
    }

    /// The server's WAL insert position, read on this connection (on the
    /// primary, right after autocommit work: the position a causal token
    /// records). One round trip: a simple query, its row read by the tap.
    pub(crate) async fn wal_insert_lsn(&mut self) -> Result<PgLsn, Error> {
        let (result, captured) = self.simple_query_captured(WAL_INSERT_LSN).await?;
        result?;
        position_of(&captured)
    }

    /// Whether diesel believes this connection is outside any transaction and healthy.
    fn transaction_idle(&mut self) -> bool {
        match AnsiTransactionManager::transaction_manager_status_mut(&mut self.pg) {
            TransactionManagerStatus::Valid(v) => v.transaction_depth().is_none(),
            TransactionManagerStatus::InError => false,
        }
    }
}

impl Deref for Conn {
    type Target = AsyncPgConnection;
    fn deref(&self) -> &AsyncPgConnection {
        &self.pg
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut AsyncPgConnection {
        &mut self.pg
    }
}

/// The query that reads the primary's WAL insert position, as text (a
/// simple query's rows are text; `pg_lsn`'s is `16/B374D848`).
pub(crate) const WAL_INSERT_LSN: &str = "SELECT pg_current_wal_insert_lsn()::text";

/// How long a capture waits for requests still in flight (answers normally
/// arrive within a round trip).
const SETTLE_BEFORE_CAPTURE: std::time::Duration = std::time::Duration::from_millis(100);

/// The WAL position in a captured reply to [`WAL_INSERT_LSN`].
pub(crate) fn position_of(captured: &Captured) -> Result<PgLsn, Error> {
    captured
        .one_text_value()
        .and_then(|v| v.parse::<PgLsn>().ok())
        .ok_or_else(|| {
            Error::Query(diesel::result::Error::DeserializationError(
                format!("no WAL position in the reply: {captured:?}").into(),
            ))
        })
}

/// Sends a cancel request for one connection's running query.
#[derive(Clone)]
pub struct CancelHandle {
    token: tokio_postgres::CancelToken,
    host: Host,
    port: u16,
    tls: Option<Arc<tls::ClientConfig>>,
}

impl fmt::Debug for CancelHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CancelHandle({}:{})", self.host, self.port)
    }
}

impl CancelHandle {
    /// Asks the server to cancel the query running on the connection; the query
    /// then fails with SQLSTATE 57014. Harmless when nothing is running.
    pub async fn cancel(&self) -> Result<(), Error> {
        let fail = |message: String| {
            Error::Connect(ConnectError {
                host: self.host.to_string(),
                port: self.port,
                stage: ConnectStage::Socket,
                sqlstate: None,
                message: format!("cancel request: {message}"),
                source: None,
            })
        };
        let socket = match &self.host {
            Host::Tcp(h) => Socket::Tcp(
                tokio::net::TcpStream::connect((h.as_str(), self.port))
                    .await
                    .map_err(|e| fail(e.to_string()))?,
            ),
            Host::Unix(dir) => Socket::Unix(
                tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{}", self.port)))
                    .await
                    .map_err(|e| fail(e.to_string()))?,
            ),
        };
        let wire = Arc::new(WireState::default());
        let name = match &self.host {
            Host::Tcp(h) => h.clone(),
            Host::Unix(_) => "localhost".to_owned(),
        };
        let tls = if matches!(self.host, Host::Unix(_)) {
            None
        } else {
            self.tls.as_ref()
        };
        let connector = Connector::new(tls, &name, wire.clone())?;
        self.token
            .cancel_query_raw(Tapped::new(socket, wire, false), connector)
            .await
            .map_err(|e| fail(e.to_string()))
    }
}
