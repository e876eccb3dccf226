//! Opening one connection: socket, tap, TLS, startup, authentication, the role
//! probe and `target_session_attrs`, walking a target's hosts in order.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use diesel_async::AsyncPgConnection;
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::error::SqlState;

use super::breaker::Breaker;
use super::gate::Gate;
use super::tls::Connector;
use super::wire::{Socket, Tapped, WireState};
use super::{CancelHandle, Conn, ConnInfo, ConnLabels, Instrument, Route, ServerRole};
use crate::config::{Config, ConnectTarget, Host, SslMode, TargetSessionAttrs};
use crate::error::{ConnectError, ConnectStage, Error, ErrorClass};

/// Opens connections to one target (the primary, or one replica).
#[derive(Clone)]
pub struct Opener {
    target: ConnectTarget,
    config: Arc<Config>,
    /// The TLS client configuration: settled at construction when no CA file is
    /// read, else built on the blocking pool at the first connection.
    tls: Arc<tokio::sync::OnceCell<Option<Arc<super::tls::ClientConfig>>>>,
    ssl_mode: SslMode,
    attrs: TargetSessionAttrs,
    pub(crate) breaker: Arc<Breaker>,
    attempts: Arc<Attempts>,
    instrument: Option<(Arc<dyn Instrument>, Route)>,
    /// The closing state of the `Database` this opener serves: a closed gate
    /// refuses to connect, and every connection made is registered with it.
    gate: Option<Arc<Gate>>,
    /// Where the connection's driver hands the notifications (`LISTEN`) it
    /// reads; `None`: they are dropped, as a pooled connection's are.
    forward: Option<tokio::sync::mpsc::Sender<tokio_postgres::Notification>>,
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
    pub fn new(
        target: ConnectTarget,
        config: Arc<Config>,
        default_attrs: TargetSessionAttrs,
    ) -> Result<Self, Error> {
        let ssl_mode = config.effective_ssl_mode(&target);
        let tcp = target.hosts.iter().any(|(h, _)| matches!(h, Host::Tcp(_)));
        // No CA file is read when TLS is off (sslmode=disable, or only Unix sockets).
        let tls = if ssl_mode == SslMode::Disable || !tcp {
            tokio::sync::OnceCell::new_with(Some(None))
        } else if config.effective_root_cert(&target).is_none() {
            tokio::sync::OnceCell::new_with(Some(super::tls::tls_client_config(ssl_mode, None)?))
        } else {
            tokio::sync::OnceCell::new()
        };
        let tls = Arc::new(tls);
        let attrs = target.target_session_attrs().unwrap_or(default_attrs);
        let breaker = Arc::new(Breaker::new(
            config.breaker_threshold,
            config.breaker_cooldown,
        ));
        let bound = config.pool.max_connecting.max(1) as usize;
        let attempts = Arc::new(Attempts {
            under_way: std::sync::atomic::AtomicUsize::new(0),
            bound,
            permits: tokio::sync::Semaphore::new(bound),
        });
        Ok(Opener {
            target,
            config,
            tls,
            ssl_mode,
            attrs,
            breaker,
            attempts,
            instrument: None,
            gate: None,
            forward: None,
        })
    }

    /// Connections from this opener hand their notifications to `tx`. The
    /// driver waits for room in `tx` before it reads on, so a consumer that
    /// falls behind holds the socket, and the server queues for it.
    pub fn forwarding(
        mut self,
        tx: tokio::sync::mpsc::Sender<tokio_postgres::Notification>,
    ) -> Self {
        self.forward = Some(tx);
        self
    }

    /// Connects only while `gate` is open, and registers every connection
    /// with it.
    pub(crate) fn gated(mut self, gate: Arc<Gate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The gate this opener passes, when it has one.
    pub(crate) fn gate(&self) -> Option<&Arc<Gate>> {
        self.gate.as_ref()
    }

    /// Installs the timing instrumentation on every connection this opener makes.
    pub(crate) fn observed(mut self, instrument: Arc<dyn Instrument>, route: Route) -> Self {
        self.instrument = Some((instrument, route));
        self
    }

    /// How long one host may take to answer a connection attempt.
    pub(crate) fn connect_timeout(&self) -> std::time::Duration {
        self.config.effective_connect_timeout(&self.target)
    }

    /// Opens one connection, walking the target's hosts in order.
    pub async fn open(&self) -> Result<Conn, Error> {
        if self.gate.as_ref().is_some_and(|g| g.is_closed()) {
            return Err(Error::Closed { source: None });
        }
        let _turn = self.attempts.turn().await;
        let name = self.name();
        let admission = self.breaker.admit(&name)?;
        let mut answered_in_another_role = false;
        let result = self.open_hosts(&mut answered_in_another_role).await;
        match &result {
            Ok(conn) => {
                self.breaker.success();
                if let Some(g) = &self.gate {
                    g.register(&conn.wire, conn.cancel.clone(), conn.info.backend_pid);
                }
            }
            // One of the hosts answered, as a standby where a primary was asked
            // for (or the reverse): the servers are up and the role is moving
            // between them, as during a failover. Opening the circuit would
            // only delay the moment the new primary is found.
            Err(_) if answered_in_another_role => self.breaker.inconclusive(admission),
            Err(e) if e.class() == ErrorClass::Reconnect => {
                self.breaker.failure(admission, e.to_string())
            }
            // A refused password or an unknown database says nothing of the
            // server's health; a probe that ends so still closes nothing.
            Err(_) => self.breaker.inconclusive(admission),
        }
        result
    }

    /// The TLS client configuration, reading the CA file (on the blocking pool,
    /// not on the caller's task) the first time it is needed.
    async fn tls(&self) -> Result<Option<Arc<super::tls::ClientConfig>>, Error> {
        self.tls
            .get_or_try_init(|| async {
                let mode = self.ssl_mode;
                let root = self.config.effective_root_cert(&self.target).cloned();
                tokio::task::spawn_blocking(move || {
                    super::tls::tls_client_config(mode, root.as_deref())
                })
                .await
                .map_err(|e| Error::tls("loading sslrootcert failed", e))?
            })
            .await
            .cloned()
    }

    /// The `target_session_attrs` this opener checks.
    pub(crate) fn attrs(&self) -> TargetSessionAttrs {
        self.attrs
    }

    pub(crate) fn name(&self) -> String {
        self.target
            .hosts
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Tries the hosts in order; `answered_in_another_role` is set when one of
    /// them was reached but is not what `target_session_attrs` asks for.
    async fn open_hosts(&self, answered_in_another_role: &mut bool) -> Result<Conn, Error> {
        let password = self
            .config
            .credentials
            .password(self.target.password.as_ref())
            .await
            .map_err(|e| {
                let (host, port) = &self.target.hosts[0];
                ConnectError {
                    host: host.to_string(),
                    port: *port,
                    stage: ConnectStage::Credentials,
                    sqlstate: None,
                    message: e.message,
                    source: e.source,
                }
            })?;
        let tls = self.tls().await?;
        let mut last = None;
        for (host, port) in &self.target.hosts {
            let timeout = self.config.effective_connect_timeout(&self.target);
            let attempt = self.open_host(
                host,
                *port,
                password.as_ref().map(|p| p.expose()),
                tls.as_ref(),
            );
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
                    *answered_in_another_role |= e.stage == ConnectStage::SessionAttrs;
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
        tls: Option<&Arc<super::tls::ClientConfig>>,
    ) -> Result<Conn, ConnectError> {
        let fail = |stage, sqlstate, message| connect_error(host, port, stage, sqlstate, message);
        let socket = open_socket(host, port).await?;
        let wire = Arc::new(WireState::default());
        let unix = matches!(host, Host::Unix(_));
        let tapped = Tapped::new(socket, wire.clone(), true)
            .unnamed(self.config.pooler.per_transaction())
            .refuse_weak_auth(!unix);
        let (pg, setup_sets) = self.startup(host, password);
        let server_name = match host {
            Host::Tcp(h) => h.clone(),
            Host::Unix(_) => "localhost".to_owned(),
        };
        let connector = Connector::new(if unix { None } else { tls }, &server_name, wire.clone())
            .map(|c| c.unnamed(self.config.pooler.per_transaction()))
            .map_err(|e| fail(ConnectStage::Tls, None, e.to_string()))?;

        let (client, connection) = match pg.connect_raw(tapped, connector).await {
            Ok(pair) => pair,
            Err(e) => return Err(self.classify_connect_error(host, port, &wire, e)),
        };
        let driver_wire = wire.clone();
        let forward = self.forward.clone();
        // The server's statement timeout cannot reach the client through a
        // dead link (a black hole: a crashed host, a dead switch, a proxy
        // that stopped relaying); the connection's own watch does.
        let stall_bound = self.config.statement_timeout.map(|t| t + STALL_GRACE);
        tokio::spawn(async move {
            // A severed connection (a closing `Database`'s last resort) drops
            // its socket here, whoever holds the client.
            let reason = tokio::select! {
                result = drive(connection, forward) => result.err().map(|e| e.to_string()),
                bound = stalled(&driver_wire, stall_bound) => Some(format!(
                    "no reply from the server for {bound:?} while a request was in flight (the statement timeout plus {STALL_GRACE:?}): the server or the network is gone"
                )),
                () = driver_wire.severed() => Some(
                    "closed by Database::close: the connection was still held after the close's deadline".to_owned(),
                ),
            };
            driver_wire.mark_closed(reason);
        });

        let reached = self.probe_session(&client, host, port, &setup_sets).await?;
        let cancel = CancelHandle {
            token: client.cancel_token(),
            host: host.clone(),
            port,
            tls: if unix { None } else { tls.cloned() },
        };
        let mut pg_conn = AsyncPgConnection::try_from(client)
            .await
            .map_err(|e| fail(ConnectStage::Setup, None, e.to_string()))?;
        self.restore_time_zone(&mut pg_conn, host, port).await?;
        let labels = self.install_labels(&mut pg_conn, host, port, &wire);
        let now = Instant::now();
        Ok(Conn {
            labels,
            pg: pg_conn,
            cancel,
            info: ConnInfo {
                host: host.clone(),
                port,
                role: reached.role,
                backend_pid: reached.backend_pid,
                server_version: reached.server_version,
                tls: wire.is_tls(),
            },
            wire,
            created: now,
            last_returned: now,
            generation: 0,
        })
    }

    /// The startup parameters for `host`, and the `SET`s the setup round trip
    /// runs first (behind a session-mode pooler).
    fn startup(&self, host: &Host, password: Option<&str>) -> (tokio_postgres::Config, String) {
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
        // Session settings travel in the startup packet (no extra round
        // trip), except through a pooler, which refuses `options`: then the
        // statement timeout is a `SET` in the setup round trip (session
        // mode), or a `SET LOCAL` in each transaction (transaction mode).
        let pooler = self.config.pooler;
        let mut setup_sets = String::new();
        if pooler.plain_startup() {
            if let Some(st) = self.config.statement_timeout_setting()
                && !pooler.per_transaction()
            {
                setup_sets.push_str(&format!("SET statement_timeout = '{st}'; "));
            }
        } else {
            let mut options = self.target.params.options.clone().unwrap_or_default();
            if let Some(st) = self.config.statement_timeout_setting() {
                options.push_str(&format!(" -c statement_timeout={st}"));
            }
            if !options.trim().is_empty() {
                pg.options(options.trim());
            }
        }
        let unix = matches!(host, Host::Unix(_));
        pg.ssl_mode(match (self.ssl_mode, unix) {
            (_, true) | (SslMode::Disable, _) => tokio_postgres::config::SslMode::Disable,
            // A build without TLS does what a libpq built without SSL does.
            (SslMode::Prefer, _) if !cfg!(feature = "tls") => {
                tokio_postgres::config::SslMode::Disable
            }
            (SslMode::Prefer, _) => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        (pg, setup_sets)
    }

    /// One round trip: time zone, then who we reached; refused when it is not
    /// what `target_session_attrs` asked for.
    async fn probe_session(
        &self,
        client: &tokio_postgres::Client,
        host: &Host,
        port: u16,
        setup_sets: &str,
    ) -> Result<Reached, ConnectError> {
        let fail = |stage, sqlstate, message| connect_error(host, port, stage, sqlstate, message);
        let tz = self.config.time_zone.replace('\'', "''");
        let probe = format!(
            "{setup_sets}SET TIME ZONE '{tz}'; SELECT pg_backend_pid()::text, pg_is_in_recovery()::text, current_setting('server_version'), current_setting('transaction_read_only')"
        );
        let rows = client
            .simple_query(&probe)
            .await
            .map_err(|e| self.setup_error(host, port, e))?;
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
        let backend_pid: i32 = col(0).parse().map_err(|_| {
            fail(
                ConnectStage::Setup,
                None,
                format!("the server sent an unreadable backend pid {:?}", col(0)),
            )
        })?;
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
        Ok(Reached {
            role,
            backend_pid,
            server_version: col(2),
        })
    }

    /// diesel-async's setup forces UTC; puts the configured zone back.
    async fn restore_time_zone(
        &self,
        pg_conn: &mut AsyncPgConnection,
        host: &Host,
        port: u16,
    ) -> Result<(), ConnectError> {
        if self.config.time_zone == "UTC" {
            return Ok(());
        }
        use diesel_async::SimpleAsyncConnection;
        let tz = self.config.time_zone.replace('\'', "''");
        pg_conn
            .batch_execute(&format!("SET TIME ZONE '{tz}'"))
            .await
            .map_err(|e| ConnectError {
                source: Some(Box::new(e)),
                ..connect_error(
                    host,
                    port,
                    ConnectStage::Setup,
                    None,
                    "setting the time zone failed".into(),
                )
            })
    }

    /// The connection's labels, with the instrumentation installed on it,
    /// when this opener records.
    fn install_labels(
        &self,
        pg_conn: &mut AsyncPgConnection,
        host: &Host,
        port: u16,
        wire: &Arc<WireState>,
    ) -> Option<Arc<ConnLabels>> {
        self.instrument.as_ref().map(|(instrument, route)| {
            let labels = Arc::new(ConnLabels {
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
                operation: Default::default(),
                recording: Default::default(),
                quiet: Default::default(),
            });
            instrument
                .clone()
                .install(pg_conn, labels.clone(), wire.clone());
            labels
        })
    }

    /// A failed session setup (the time zone, then the role probe). A value the
    /// server refuses there (22023) can only be the configured time zone.
    fn setup_error(&self, host: &Host, port: u16, e: tokio_postgres::Error) -> ConnectError {
        let sqlstate = e.code().cloned();
        let message = if sqlstate.as_ref() == Some(&SqlState::INVALID_PARAMETER_VALUE) {
            format!(
                "{} {:?} is not a time zone the server knows",
                self.config.time_zone_field(),
                self.config.time_zone
            )
        } else if let Some(db) = e.as_db_error() {
            format!("{}: {}", db.severity(), db.message())
        } else {
            e.to_string()
        };
        ConnectError {
            host: host.to_string(),
            port,
            stage: ConnectStage::Setup,
            sqlstate,
            message,
            source: Some(Box::new(e)),
        }
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
        } else if wire.weak_auth_asked() && !wire.is_tls() {
            (
                ConnectStage::Startup,
                None,
                super::wire::WEAK_AUTH_REFUSED.to_owned(),
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

/// Who the setup round trip reached.
struct Reached {
    role: ServerRole,
    backend_pid: i32,
    server_version: String,
}

/// A failure to open a connection to `host:port` at `stage`.
fn connect_error(
    host: &Host,
    port: u16,
    stage: ConnectStage,
    sqlstate: Option<SqlState>,
    message: String,
) -> ConnectError {
    ConnectError {
        host: host.to_string(),
        port,
        stage,
        sqlstate,
        message,
        source: None,
    }
}

/// The socket to `host:port`: TCP (no delay, keepalives, a bound on
/// unacknowledged data) or a Unix socket in the host's directory.
async fn open_socket(host: &Host, port: u16) -> Result<Socket, ConnectError> {
    let fail = |message| connect_error(host, port, ConnectStage::Socket, None, message);
    Ok(match host {
        Host::Tcp(h) => {
            let s = tokio::net::TcpStream::connect((h.as_str(), port))
                .await
                .map_err(|e| fail(e.to_string()))?;
            let _ = s.set_nodelay(true);
            // A peer that died without a word (a crashed host, a dead
            // switch) is found within about 30 s even when no request is
            // in flight (an idle pooled connection, a listener).
            let sock = socket2::SockRef::from(&s);
            let _ = sock.set_tcp_keepalive(&KEEPALIVE);
            // Keepalives probe only an idle link: with a request in
            // flight, the kernel retransmits for up to about 15 min.
            // This bounds unacknowledged data to the same 30 s.
            #[cfg(any(target_os = "linux", target_os = "android"))]
            let _ = sock.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT));
            Socket::Tcp(s)
        }
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            let s = tokio::net::UnixStream::connect(&path)
                .await
                .map_err(|e| fail(format!("{}: {e}", path.display())))?;
            Socket::Unix(s)
        }
    })
}

/// Runs a connection: as tokio-postgres does (notifications dropped), or
/// handing each notification to `forward`, waiting for room first.
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    forward: Option<tokio::sync::mpsc::Sender<tokio_postgres::Notification>>,
) -> Result<(), tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // Driven message by message rather than awaited whole: tokio-postgres
    // logs each server notice at INFO (every `CREATE … IF NOT EXISTS` at
    // boot); here they are DEBUG, on `railyard::notice`.
    let mut forward = forward;
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                if let Some(tx) = &forward
                    && tx.send(n).await.is_err()
                {
                    // Nobody listens any more: drop them from now on.
                    forward = None;
                }
            }
            Some(Ok(tokio_postgres::AsyncMessage::Notice(n))) => {
                tracing::debug!(
                    target: "railyard::notice",
                    severity = n.severity(),
                    sqlstate = n.code().code(),
                    "{}",
                    n.message()
                );
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => return Ok(()),
        }
    }
}

/// TCP keepalive on every connection: probes after 15 s of silence, every
/// 5 s, 3 of them: a dead peer is given up on after about 30 s.
const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(std::time::Duration::from_secs(15))
    .with_interval(std::time::Duration::from_secs(5))
    .with_retries(3);

/// Connection attempts to one target: how many are under way, and a bound
/// on how many run at once.
#[derive(Debug)]
struct Attempts {
    under_way: std::sync::atomic::AtomicUsize,
    bound: usize,
    permits: tokio::sync::Semaphore,
}

/// What an attempt made while `n` others are under way (as many as the
/// bound, or more) may first wait, at most: `n` times this, up to
/// [`MAX_SPREAD`].
const SPREAD_PER_ATTEMPT: std::time::Duration = std::time::Duration::from_millis(2);
/// The most an attempt waits before it starts.
const MAX_SPREAD: std::time::Duration = std::time::Duration::from_millis(100);

/// An attempt's turn: counted as under way until dropped.
struct Turn<'a> {
    attempts: &'a Attempts,
    _permit: Option<tokio::sync::SemaphorePermit<'a>>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.attempts
            .under_way
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Attempts {
    /// Waits for this attempt's turn. Within the bound, it goes at once;
    /// beyond it (many connections lost together), it waits a random part of
    /// a spread that grows with the number under way, then for a permit:
    /// the server sees a stream of attempts, not a herd, and each attempt,
    /// not competing with all the others, completes sooner.
    async fn turn(&self) -> Turn<'_> {
        let ahead = self
            .under_way
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let mut turn = Turn {
            attempts: self,
            _permit: None,
        };
        if ahead >= self.bound {
            let spread = (SPREAD_PER_ATTEMPT * ahead as u32).min(MAX_SPREAD);
            tokio::time::sleep(spread.mul_f64(rand::random_range(0.0..=1.0))).await;
        }
        // The semaphore is never closed.
        turn._permit = self.permits.acquire().await.ok();
        turn
    }
}

/// How long data written to a TCP socket may go unacknowledged before the
/// kernel gives the connection up: as long as keepalives take to find an
/// idle dead peer.
#[cfg(any(target_os = "linux", target_os = "android"))]
const TCP_USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Beyond the statement timeout, how long a request may go unanswered
/// before its connection is given up.
pub(crate) const STALL_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Returns when a request has been in flight with no message from the
/// server for `bound` (never without a bound). It samples the message count
/// a few times per bound: no cost per message.
async fn stalled(wire: &WireState, bound: Option<std::time::Duration>) -> std::time::Duration {
    let Some(bound) = bound else {
        return std::future::pending().await;
    };
    let tick = (bound / 8).max(std::time::Duration::from_millis(50));
    let mut last = (wire.message_count(), tokio::time::Instant::now());
    loop {
        tokio::time::sleep(tick).await;
        let now = (wire.message_count(), tokio::time::Instant::now());
        let bound = bound.max(wire.stall_floor());
        if now.0 != last.0 || wire.in_flight() == 0 {
            last = now;
        } else if now.1 - last.1 >= bound {
            return bound;
        }
    }
}
