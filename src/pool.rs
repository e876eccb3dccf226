//! Our own `bb8::ManageConnection` (DESIGN.md D1).
//!
//! Each connection is opened by us: the socket (TCP or Unix) is wrapped in the
//! protocol tap, TLS comes from our rustls connector, the password is read from
//! the [`Credentials`](crate::Credentials) provider at every connect (so a rotated
//! password is used without a restart), several hosts are walked in order and
//! `target_session_attrs` is checked by us. Connect errors keep the server's
//! SQLSTATE. Each [`Conn`] knows its host, port, role and backend pid.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::connection::TransactionManagerStatus;
use diesel_async::TransactionManager;
use diesel_async::{AnsiTransactionManager, AsyncPgConnection};
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::error::SqlState;

use crate::config::{Config, ConnectTarget, Host, SslMode, TargetSessionAttrs};
use crate::error::{ConnectError, ConnectStage, Error};
use crate::tls::Connector;
use crate::wire::{Socket, Tapped, WireState};

/// Whether a server accepts writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerRole {
    /// Not in recovery: accepts writes.
    Primary,
    /// In recovery (a hot standby): read-only.
    Standby,
}

/// What is known about one connection, recorded when it was opened.
#[derive(Debug, Clone)]
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
    labels: Option<Arc<crate::observe::ConnLabels>>,
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

    pub(crate) fn wire_arc(&self) -> Arc<WireState> {
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

/// Sends a cancel request for one connection's running query.
#[derive(Clone)]
pub struct CancelHandle {
    token: tokio_postgres::CancelToken,
    host: Host,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
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

/// Opens connections to one target (the primary, or one replica).
#[derive(Clone)]
pub(crate) struct Opener {
    target: ConnectTarget,
    config: Arc<Config>,
    tls: Option<Arc<rustls::ClientConfig>>,
    ssl_mode: SslMode,
    attrs: TargetSessionAttrs,
    pub(crate) breaker: Arc<Breaker>,
    observer: Option<(Arc<crate::observe::Observer>, crate::route::Route)>,
}

/// A circuit breaker per target: after `threshold` consecutive connect failures
/// of the reconnect kind (refused, timed out, starting up, too many
/// connections), calls fail fast for a jittered cooldown that doubles while the
/// server stays down; then one probe connection is let through, and its success
/// closes the circuit.
#[derive(Debug)]
pub(crate) struct Breaker {
    threshold: u32,
    base: Duration,
    max: Duration,
    state: Mutex<BreakerState>,
}

#[derive(Debug, Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
    cooldown: Duration,
    probing: bool,
    last: String,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, base: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            base,
            max: Duration::from_secs(30),
            state: Mutex::new(BreakerState::default()),
        }
    }

    fn open_error(&self, s: &BreakerState, host: &str, until: Instant) -> Error {
        Error::CircuitOpen {
            host: host.to_owned(),
            failures: s.failures,
            retry_in: until.saturating_duration_since(Instant::now()),
            last: s.last.clone(),
        }
    }

    /// Fails fast while the circuit is open (no probe is due).
    pub(crate) fn check(&self, host: &str) -> Result<(), Error> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.open_until {
            Some(until) if Instant::now() < until || s.probing => {
                Err(self.open_error(&s, host, until))
            }
            _ => Ok(()),
        }
    }

    /// Admits a connect attempt: always while closed, one probe once the
    /// cooldown is over.
    fn admit(&self, host: &str) -> Result<(), Error> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.open_until {
            None => Ok(()),
            Some(until) if Instant::now() < until || s.probing => {
                Err(self.open_error(&s, host, until))
            }
            Some(_) => {
                s.probing = true;
                Ok(())
            }
        }
    }

    fn success(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.open_until.is_some() {
            tracing::info!(target: "railyard::pool", "circuit closed: the server answers again");
        }
        *s = BreakerState::default();
    }

    fn failure(&self, message: String) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.failures += 1;
        s.last = message;
        let was_open = s.open_until.is_some();
        s.probing = false;
        if s.failures >= self.threshold {
            s.cooldown = if was_open {
                (s.cooldown * 2).min(self.max)
            } else {
                self.base
            };
            // Jitter (50–100 %) so that many clients do not probe in step.
            let jitter = rand::random_range(0.5..=1.0);
            s.open_until = Some(Instant::now() + s.cooldown.mul_f64(jitter));
            if !was_open {
                tracing::warn!(target: "railyard::pool", failures = s.failures, "circuit opened: connections fail fast until a probe succeeds");
            }
        }
    }

    /// Whether the circuit is open now.
    pub(crate) fn is_open(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open_until
            .is_some()
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("target", &self.target)
            .field("ssl_mode", &self.ssl_mode)
            .finish_non_exhaustive()
    }
}

impl Opener {
    pub(crate) fn new(
        target: ConnectTarget,
        config: Arc<Config>,
        default_attrs: TargetSessionAttrs,
    ) -> Result<Self, Error> {
        let ssl_mode = config.effective_ssl_mode(&target);
        let root = config.effective_root_cert(&target).cloned();
        let tls = crate::tls::tls_client_config(ssl_mode, root.as_deref())?;
        let attrs = target.target_session_attrs().unwrap_or(default_attrs);
        let breaker = Arc::new(Breaker::new(
            config.breaker_threshold,
            config.breaker_cooldown,
        ));
        Ok(Opener {
            target,
            config,
            tls,
            ssl_mode,
            attrs,
            breaker,
            observer: None,
        })
    }

    /// Installs the timing instrumentation on every connection this opener makes.
    pub(crate) fn observed(
        mut self,
        observer: Arc<crate::observe::Observer>,
        route: crate::route::Route,
    ) -> Self {
        self.observer = Some((observer, route));
        self
    }

    /// Opens one connection, walking the target's hosts in order.
    pub(crate) async fn open(&self) -> Result<Conn, Error> {
        let name = self.name();
        self.breaker.admit(&name)?;
        let result = self.open_hosts().await;
        match &result {
            Ok(_) => self.breaker.success(),
            Err(e) if e.class() == crate::retry::ErrorClass::Reconnect => {
                self.breaker.failure(e.to_string())
            }
            // A refused password or an unknown database says nothing of the
            // server's health; a probe that ends so still closes nothing.
            Err(_) => {
                let mut s = self.breaker.state.lock().unwrap_or_else(|p| p.into_inner());
                s.probing = false;
            }
        }
        result
    }

    pub(crate) fn name(&self) -> String {
        self.target
            .hosts
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn open_hosts(&self) -> Result<Conn, Error> {
        let password = self
            .config
            .credentials
            .password(self.target.password.as_ref())
            .map_err(|message| {
                let (host, port) = &self.target.hosts[0];
                ConnectError {
                    host: host.to_string(),
                    port: *port,
                    stage: ConnectStage::Credentials,
                    sqlstate: None,
                    message,
                    source: None,
                }
            })?;
        let mut last = None;
        for (host, port) in &self.target.hosts {
            let timeout = self.config.effective_connect_timeout(&self.target);
            let attempt = self.open_host(host, *port, password.as_ref().map(|p| p.expose()));
            let result = match tokio::time::timeout(timeout, attempt).await {
                Ok(r) => r,
                Err(_) => Err(ConnectError {
                    host: host.to_string(),
                    port: *port,
                    stage: ConnectStage::Timeout,
                    sqlstate: None,
                    message: format!("no answer within the connect timeout of {timeout:?}"),
                    source: None,
                }),
            };
            match result {
                Ok(conn) => return Ok(conn),
                Err(e) => {
                    tracing::debug!(host = %host, port, stage = %e.stage, error = %e.message, "connect attempt failed");
                    last = Some(e);
                }
            }
        }
        Err(Error::Connect(
            last.expect("a target has at least one host"),
        ))
    }

    async fn open_host(
        &self,
        host: &Host,
        port: u16,
        password: Option<&str>,
    ) -> Result<Conn, ConnectError> {
        let fail = |stage, sqlstate: Option<SqlState>, message: String| ConnectError {
            host: host.to_string(),
            port,
            stage,
            sqlstate,
            message,
            source: None,
        };
        let socket = match host {
            Host::Tcp(h) => {
                let s = tokio::net::TcpStream::connect((h.as_str(), port))
                    .await
                    .map_err(|e| fail(ConnectStage::Socket, None, e.to_string()))?;
                let _ = s.set_nodelay(true);
                Socket::Tcp(s)
            }
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let s = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
                    fail(
                        ConnectStage::Socket,
                        None,
                        format!("{}: {e}", path.display()),
                    )
                })?;
                Socket::Unix(s)
            }
        };
        let wire = Arc::new(WireState::default());
        let tapped = Tapped::new(socket, wire.clone(), true);

        let mut pg = tokio_postgres::Config::new();
        if let Some(u) = &self.target.user {
            pg.user(u);
        }
        if let Some(p) = password {
            pg.password(p);
        }
        if let Some(db) = &self.target.dbname {
            pg.dbname(db);
        }
        pg.application_name(
            self.target
                .application_name()
                .unwrap_or(&self.config.application_name),
        );
        // Session settings travel in the startup packet: no extra round trip.
        let mut options = self.target.params.options.clone().unwrap_or_default();
        if let Some(st) = self.config.statement_timeout_setting() {
            options.push_str(&format!(" -c statement_timeout={st}"));
        }
        if !options.trim().is_empty() {
            pg.options(options.trim());
        }
        let unix = matches!(host, Host::Unix(_));
        pg.ssl_mode(match (self.ssl_mode, unix) {
            (_, true) | (SslMode::Disable, _) => tokio_postgres::config::SslMode::Disable,
            (SslMode::Prefer, _) => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        let server_name = match host {
            Host::Tcp(h) => h.clone(),
            Host::Unix(_) => "localhost".to_owned(),
        };
        let connector = Connector::new(
            if unix { None } else { self.tls.as_ref() },
            &server_name,
            wire.clone(),
        )
        .map_err(|e| fail(ConnectStage::Tls, None, e.to_string()))?;

        let (client, connection) = match pg.connect_raw(tapped, connector).await {
            Ok(pair) => pair,
            Err(e) => return Err(self.classify_connect_error(host, port, &wire, e)),
        };
        let driver_wire = wire.clone();
        tokio::spawn(async move {
            let result = connection.await;
            driver_wire.mark_closed(result.err().map(|e| e.to_string()));
        });

        // One round trip: time zone, then who we reached.
        let tz = self.config.time_zone.replace('\'', "''");
        let probe = format!(
            "SET TIME ZONE '{tz}'; SELECT pg_backend_pid()::text, pg_is_in_recovery()::text, current_setting('server_version'), current_setting('transaction_read_only')"
        );
        let rows = client
            .simple_query(&probe)
            .await
            .map_err(|e| fail(ConnectStage::Setup, e.code().cloned(), e.to_string()))?;
        let row = rows
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .ok_or_else(|| {
                fail(
                    ConnectStage::Setup,
                    None,
                    "role probe returned no row".into(),
                )
            })?;
        let col = |i: usize| row.get(i).unwrap_or_default().to_owned();
        let backend_pid: i32 = col(0).parse().unwrap_or(0);
        let in_recovery = col(1) == "true";
        let read_only = col(3) == "on";
        let role = if in_recovery {
            ServerRole::Standby
        } else {
            ServerRole::Primary
        };
        let acceptable = match self.attrs {
            TargetSessionAttrs::Any => true,
            TargetSessionAttrs::ReadWrite => !in_recovery && !read_only,
            TargetSessionAttrs::Standby => in_recovery,
        };
        if !acceptable {
            return Err(fail(
                ConnectStage::SessionAttrs,
                None,
                format!(
                    "server is a {} but target_session_attrs={} was asked for",
                    if in_recovery {
                        "standby"
                    } else {
                        "read-write primary"
                    },
                    self.attrs.as_str()
                ),
            ));
        }
        let cancel = CancelHandle {
            token: client.cancel_token(),
            host: host.clone(),
            port,
            tls: if unix { None } else { self.tls.clone() },
        };
        let mut pg_conn = AsyncPgConnection::try_from(client)
            .await
            .map_err(|e| fail(ConnectStage::Setup, None, e.to_string()))?;
        if self.config.time_zone != "UTC" {
            // diesel-async's setup forces UTC; put the configured zone back.
            use diesel_async::SimpleAsyncConnection;
            pg_conn
                .batch_execute(&format!("SET TIME ZONE '{tz}'"))
                .await
                .map_err(|e| fail(ConnectStage::Setup, None, e.to_string()))?;
        }
        let labels = self.observer.as_ref().map(|(observer, route)| {
            let labels = Arc::new(crate::observe::ConnLabels {
                host: host.to_string(),
                port,
                database: self
                    .target
                    .dbname
                    .clone()
                    .or_else(|| self.target.user.clone())
                    .unwrap_or_default(),
                route: route.clone(),
                attempt: std::sync::atomic::AtomicU32::new(1),
            });
            diesel_async::AsyncConnection::set_instrumentation(
                &mut pg_conn,
                crate::observe::ConnInstrumentation::new(
                    observer.clone(),
                    labels.clone(),
                    wire.clone(),
                ),
            );
            labels
        });
        let now = Instant::now();
        Ok(Conn {
            labels,
            pg: pg_conn,
            cancel,
            info: ConnInfo {
                host: host.clone(),
                port,
                role,
                backend_pid,
                server_version: col(2),
                tls: wire.is_tls(),
            },
            wire,
            created: now,
            last_returned: now,
            generation: 0,
        })
    }

    fn classify_connect_error(
        &self,
        host: &Host,
        port: u16,
        wire: &WireState,
        e: tokio_postgres::Error,
    ) -> ConnectError {
        let (stage, sqlstate, mut message) = if let Some(db) = e.as_db_error() {
            (
                ConnectStage::Startup,
                Some(db.code().clone()),
                format!("{}: {}", db.severity(), db.message()),
            )
        } else if wire.tls_failed() || e.to_string().contains("TLS") {
            let detail = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.to_string());
            (ConnectStage::Tls, None, detail)
        } else {
            (ConnectStage::Startup, None, e.to_string())
        };
        if sqlstate.as_ref() == Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
            && self.ssl_mode == SslMode::Disable
        {
            message.push_str(
                " (the server may accept only TLS connections: use sslmode=require or verify-full)",
            );
        }
        if sqlstate.as_ref() == Some(&SqlState::INVALID_PASSWORD) {
            message.push_str(" (check the password, or its provider: RAILYARD_PASSWORD_FILE / RAILYARD_PASSWORD_ENV)");
        }
        ConnectError {
            host: host.to_string(),
            port,
            stage,
            sqlstate,
            message,
            source: Some(Box::new(e)),
        }
    }
}

/// The bb8 manager for one target.
#[derive(Debug, Clone)]
pub(crate) struct Manager {
    pub(crate) opener: Opener,
    /// Only for the primary's pool: connections that reached a standby, or
    /// that predate a reroute, are refused (failover, DESIGN.md D4).
    pub(crate) require_primary: bool,
    pub(crate) generation: Arc<std::sync::atomic::AtomicU64>,
    /// Connections idle longer than this are pinged at checkout; others are
    /// checked without a round trip (D1).
    pub(crate) ping_after_idle: Duration,
}

impl Manager {
    fn stale_for_primary(&self, conn: &Conn) -> bool {
        self.require_primary
            && (conn.wire.in_hot_standby() == Some(true)
                || conn.generation < self.generation.load(std::sync::atomic::Ordering::Acquire))
    }
}

impl bb8::ManageConnection for Manager {
    type Connection = Conn;
    type Error = Error;

    async fn connect(&self) -> Result<Conn, Error> {
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        let mut conn = self.opener.open().await?;
        conn.generation = generation;
        Ok(conn)
    }

    async fn is_valid(&self, conn: &mut Conn) -> Result<(), Error> {
        if self.stale_for_primary(conn) {
            return Err(Error::Connect(ConnectError {
                host: conn.info.host.to_string(),
                port: conn.info.port,
                stage: ConnectStage::SessionAttrs,
                sqlstate: None,
                message: "the server is no longer the primary (in_hot_standby, or a write reached a standby): re-resolving".into(),
                source: None,
            }));
        }
        if !conn.wire.settle(Duration::from_millis(50)).await {
            return Err(Error::Connect(ConnectError {
                host: conn.info.host.to_string(),
                port: conn.info.port,
                stage: ConnectStage::Socket,
                sqlstate: None,
                message: if conn.wire.is_closed() {
                    "the server closed the connection while it was idle in the pool".into()
                } else {
                    format!(
                        "the connection is not idle (status {:?}, {} requests in flight)",
                        conn.wire.tx_status(),
                        conn.wire.in_flight()
                    )
                },
                source: None,
            }));
        }
        if conn.last_returned.elapsed() >= self.ping_after_idle {
            use diesel_async::SimpleAsyncConnection;
            conn.pg.batch_execute("").await?;
        }
        Ok(())
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.last_returned = Instant::now();
        // A connection handed back inside a transaction, with a request in
        // flight (a cancelled future, say), or whose stream the tap could not
        // follow is in an unknown state: never reuse it.
        // (The tap's status may trail the last result by one ReadyForQuery here;
        // the check-out test waits for it, see `is_valid`.)
        self.stale_for_primary(conn)
            || conn.wire.is_closed()
            || conn.wire.tx_status() == crate::wire::TxStatus::Unknown
            || !conn.transaction_idle()
            || diesel_async::pooled_connection::PoolableConnection::is_broken(&mut conn.pg)
    }
}

/// Records the latest connect error of a pool, so that a checkout that times out
/// can say why (bb8 only reports `TimedOut`).
#[derive(Debug, Clone, Default)]
pub(crate) struct LastError(Arc<Mutex<Option<RecordedError>>>);

/// When a connect error happened, its message and its SQLSTATE.
type RecordedError = (Instant, String, Option<SqlState>);

impl LastError {
    pub(crate) fn take_recent(&self, since: Instant) -> Option<(String, Option<SqlState>)> {
        let guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &*guard {
            Some((at, msg, code)) if *at >= since => Some((msg.clone(), code.clone())),
            _ => None,
        }
    }
}

impl bb8::ErrorSink<Error> for LastError {
    fn sink(&self, error: Error) {
        tracing::warn!(target: "railyard::pool", error = %error, "pool could not open a connection");
        let code = error.sqlstate().cloned();
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), error.to_string(), code));
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<Error>> {
        Box::new(self.clone())
    }
}

/// A pool of connections to one target, with its name for errors and reports.
#[derive(Debug, Clone)]
pub(crate) struct TargetPool {
    pub(crate) name: String,
    breaker: Arc<Breaker>,
    generation: Arc<std::sync::atomic::AtomicU64>,
    pub(crate) pool: bb8::Pool<Manager>,
    pub(crate) last_error: LastError,
    pub(crate) checkout_timeout: Duration,
}

impl TargetPool {
    pub(crate) fn build(name: &str, opener: Opener, max_size: u32, config: &Config) -> TargetPool {
        let last_error = LastError::default();
        let breaker = opener.breaker.clone();
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let manager = Manager {
            // Only a pool that asked for a read-write server re-resolves when
            // its server turns out to be a standby.
            require_primary: name == "primary" && opener.attrs == TargetSessionAttrs::ReadWrite,
            generation: generation.clone(),
            opener,
            ping_after_idle: Duration::from_secs(30),
        };
        let pool = bb8::Pool::builder()
            .max_size(max_size)
            .min_idle(config.pool.min_idle)
            .connection_timeout(config.pool.checkout_timeout)
            .idle_timeout(config.pool.idle_timeout)
            .max_lifetime(config.pool.max_lifetime)
            .test_on_check_out(true)
            .error_sink(Box::new(last_error.clone()))
            .build_unchecked(manager);
        TargetPool {
            name: name.to_owned(),
            breaker,
            generation,
            pool,
            last_error,
            checkout_timeout: config.pool.checkout_timeout,
        }
    }

    pub(crate) async fn get(&self) -> Result<bb8::PooledConnection<'_, Manager>, Error> {
        self.breaker().check(&self.name)?;
        let started = Instant::now();
        self.pool
            .get()
            .await
            .map_err(|e| self.run_error(started, e))
    }

    pub(crate) async fn get_owned(&self) -> Result<bb8::PooledConnection<'static, Manager>, Error> {
        self.breaker().check(&self.name)?;
        let started = Instant::now();
        self.pool
            .get_owned()
            .await
            .map_err(|e| self.run_error(started, e))
    }

    /// Makes every existing connection of this pool unusable, so that new ones
    /// find the primary again (after a 25006, or a promotion).
    pub(crate) fn reroute(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tracing::warn!(target: "railyard::route", pool = %self.name, "re-resolving the primary");
    }

    pub(crate) fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    fn run_error(&self, started: Instant, e: bb8::RunError<Error>) -> Error {
        match e {
            bb8::RunError::User(e) => e,
            bb8::RunError::TimedOut => match self.last_error.take_recent(started) {
                Some((message, sqlstate)) => Error::Connect(ConnectError {
                    host: format!("{} pool", self.name),
                    port: 0,
                    stage: ConnectStage::Timeout,
                    sqlstate,
                    message: format!(
                        "no connection within the checkout timeout of {:?}; the last attempt failed: {message}",
                        self.checkout_timeout
                    ),
                    source: None,
                }),
                None => Error::PoolTimeout {
                    pool: self.name.clone(),
                    waited: started.elapsed(),
                },
            },
        }
    }
}
