//! The bb8 side: our `ManageConnection`, check-out validation from the tap, and
//! a pool per target that bounds its check-out queue, sheds what exceeds it,
//! reports why a check-out timed out, and lets go of its connections when its
//! `Database` closes.

use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;

use super::breaker::Breaker;
use super::gate::Gate;
use super::open::Opener;
use super::queue::{Queue, ShedLog};
use super::wire::TxStatus;
use super::{Conn, Route};
use crate::config::{Config, TargetSessionAttrs};
use crate::error::{ConnectError, ConnectStage, Error, Shed};

/// The bb8 manager for one target.
#[derive(Debug, Clone)]
pub(crate) struct Manager {
    pub(crate) opener: Opener,
    /// Only for the primary's pool: connections that reached a standby, or
    /// that predate a reroute, are refused (failover).
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
        // A reply still owed (a statement close tokio-postgres sends without
        // waiting) comes as soon as the driver task runs: on a starved machine
        // that can be hundreds of milliseconds, and discarding a healthy
        // connection then costs a reconnect. `settle` gives up at once on a
        // connection that is closed or idle in a transaction; otherwise it
        // waits as long as a ping may (a dead link is bounded the same way).
        if !conn.wire.settle(self.opener.connect_timeout()).await {
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
            // A dead link (a crashed host, a dropped route) would hold the
            // ping until the check-out's own timeout, and the caller's
            // operation with it: bounded by the connect timeout, it is
            // discarded and the check-out goes on with another connection.
            let bound = self.opener.connect_timeout();
            match tokio::time::timeout(bound, conn.pg.batch_execute("")).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(Error::Connect(ConnectError {
                        host: conn.info.host.to_string(),
                        port: conn.info.port,
                        stage: ConnectStage::Timeout,
                        sqlstate: None,
                        message: format!(
                            "the idle connection did not answer a ping within {bound:?}"
                        ),
                        source: None,
                    }));
                }
            }
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
        // A closing `Database` keeps no connection: each is dropped (and hangs
        // up) as it comes back.
        self.opener.gate().is_some_and(|g| g.is_closed())
            || self.stale_for_primary(conn)
            || conn.wire.is_closed()
            || conn.wire.tx_status() == TxStatus::Unknown
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
        if matches!(error, Error::Closed { .. }) {
            // The pool asked for a connection after its `Database` closed.
            return;
        }
        tracing::warn!(target: "railyard::pool", error = %error, "pool could not open a connection");
        let code = error.sqlstate().cloned();
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), error.to_string(), code));
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<Error>> {
        Box::new(self.clone())
    }
}

/// A snapshot of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStatus {
    /// `primary`, or the replica's host and port.
    pub name: String,
    /// The target the pool serves.
    pub route: Route,
    /// Connections open (idle + in use).
    pub connections: u32,
    /// Idle connections.
    pub idle: u32,
    /// The pool's maximum.
    pub max_size: u32,
    /// Check-outs served since the pool was built.
    pub gets: u64,
    /// Check-outs that had to wait.
    pub gets_waited: u64,
    /// Check-outs that timed out.
    pub gets_timed_out: u64,
    /// Connections opened.
    pub connections_created: u64,
    /// Connections closed because they were broken.
    pub connections_closed_broken: u64,
    /// Whether the host's circuit breaker is open (calls fail fast).
    pub circuit_open: bool,
    /// Check-outs in progress now: waiting for a connection (or about to
    /// receive one).
    pub waiters: u32,
    /// The most check-outs in progress at once since the pool was built:
    /// never above `max_waiters`.
    pub waiters_peak: u32,
    /// The bound on check-outs in progress; beyond it, check-outs are shed.
    pub max_waiters: u32,
    /// How long a check-out waits while every connection is in use before it
    /// is shed.
    pub max_wait: Duration,
    /// Check-outs shed since the pool was built ([`crate::Error::Overloaded`]).
    pub shed: u64,
    /// Check-outs shed over the last minute.
    pub shed_last_minute: u64,
    /// Whether the pool was closed ([`crate::Database::close`]): it holds no
    /// connection and opens none.
    pub closed: bool,
}

/// A pool of connections to one target, with its name for errors and reports.
#[derive(Debug)]
pub(crate) struct TargetPool {
    pub(crate) name: String,
    pub(crate) route: Route,
    breaker: Arc<Breaker>,
    generation: Arc<std::sync::atomic::AtomicU64>,
    /// `None` once closed: the last lease to come back drops bb8's pool, and
    /// its idle connections with it.
    pool: RwLock<Option<bb8::Pool<Manager>>>,
    pub(crate) last_error: LastError,
    pub(crate) checkout_timeout: Duration,
    gate: Arc<Gate>,
    queue: Queue,
    max_wait: Duration,
    shed: ShedLog,
    /// bb8's counters when the pool was closed.
    at_close: OnceLock<Counters>,
}

/// bb8's counters of one pool.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    max_size: u32,
    gets: u64,
    gets_waited: u64,
    gets_timed_out: u64,
    connections_created: u64,
    connections_closed_broken: u64,
}

impl Counters {
    fn of(pool: &bb8::Pool<Manager>, s: &bb8::State) -> Self {
        Counters {
            max_size: pool.config().max_size,
            gets: s.statistics.get_direct + s.statistics.get_waited,
            gets_waited: s.statistics.get_waited,
            gets_timed_out: s.statistics.get_timed_out,
            connections_created: s.statistics.connections_created,
            connections_closed_broken: s.statistics.connections_closed_broken,
        }
    }
}

impl TargetPool {
    pub(crate) fn build(
        route: Route,
        opener: Opener,
        max_size: u32,
        config: &Config,
    ) -> TargetPool {
        let name = match &route {
            Route::Primary => "primary".to_owned(),
            Route::Replica(name) => name.to_string(),
        };
        let last_error = LastError::default();
        let breaker = opener.breaker.clone();
        let gate = opener.gate().cloned().unwrap_or_default();
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let manager = Manager {
            // Only a pool that asked for a read-write server re-resolves when
            // its server turns out to be a standby.
            require_primary: matches!(route, Route::Primary)
                && opener.attrs() == TargetSessionAttrs::ReadWrite,
            generation: generation.clone(),
            opener,
            ping_after_idle: config.pool.ping_after_idle,
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
            name,
            route,
            breaker,
            generation,
            pool: RwLock::new(Some(pool)),
            last_error,
            checkout_timeout: config.pool.checkout_timeout,
            gate,
            queue: Queue::new(config.pool.max_waiters_for(max_size)),
            max_wait: config.pool.max_wait_or_default(),
            shed: ShedLog::default(),
            at_close: OnceLock::new(),
        }
    }

    /// bb8's pool, until this one is closed.
    fn current(&self) -> Option<bb8::Pool<Manager>> {
        self.pool.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Hands out a connection. A check-out that finds `max_waiters` others in
    /// progress is shed at once; one that waits `max_wait` while every
    /// connection is in use is shed then ([`Error::Overloaded`]). One that
    /// waits for a connection being opened (the pool had room) is bounded by
    /// the checkout timeout instead. A check-out waiting when the `Database`
    /// closes fails at once ([`Error::Closed`]).
    pub(crate) async fn get_owned(&self) -> Result<bb8::PooledConnection<'static, Manager>, Error> {
        let closed = || Error::Closed { source: None };
        if self.gate.is_closed() {
            return Err(closed());
        }
        self.breaker().check(&self.name)?;
        let pool = self.current().ok_or_else(closed)?;
        let Some(_place) = self.queue.enter() else {
            return Err(self.shed(Shed::QueueFull {
                max_waiters: self.queue.max(),
            }));
        };
        let started = Instant::now();
        let get = pool.get_owned();
        tokio::pin!(get);
        let budget = tokio::time::sleep(self.max_wait);
        tokio::pin!(budget);
        let mut past_budget = false;
        loop {
            tokio::select! {
                biased;
                r = &mut get => return r.map_err(|e| self.run_error(started, e)),
                () = &mut budget, if !past_budget => {
                    if saturated(&pool) {
                        return Err(self.shed(Shed::WaitBudget { budget: self.max_wait }));
                    }
                    // The pool had room: a connection is being opened for this
                    // check-out, which the checkout timeout bounds.
                    past_budget = true;
                }
                () = self.gate.wait_closed() => return Err(closed()),
            }
        }
    }

    fn shed(&self, why: Shed) -> Error {
        self.shed.record(&self.name, why);
        Error::Overloaded {
            pool: self.name.clone(),
            why,
        }
    }

    /// Puts a connection opened elsewhere (at boot) into the pool; dropped
    /// when the pool is full or closed.
    pub(crate) fn add(&self, conn: Conn) {
        if let Some(pool) = self.current() {
            let _ = pool.add(conn);
        }
    }

    /// Lets go of bb8's pool: its idle connections are dropped (they hang up)
    /// with the last lease still out, and the gate, closed already, makes
    /// every lease that comes back drop its connection.
    pub(crate) fn close(&self) {
        let taken = self.pool.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(pool) = taken {
            let _ = self.at_close.set(Counters::of(&pool, &pool.state()));
        }
    }

    /// Makes every existing connection of this pool unusable, so that new ones
    /// find the primary again (after a 25006, or a promotion).
    pub(crate) fn reroute(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tracing::warn!(target: "railyard::route", pool = %self.name, "re-resolving the primary");
    }

    /// A snapshot of this pool's state and counters (after it closed: no
    /// connection, and its counters as they were then).
    pub(crate) fn status(&self) -> PoolStatus {
        let (connections, idle, c, closed) = match self.current() {
            Some(pool) => {
                let s = pool.state();
                (
                    s.connections,
                    s.idle_connections,
                    Counters::of(&pool, &s),
                    false,
                )
            }
            None => (0, 0, self.at_close.get().copied().unwrap_or_default(), true),
        };
        PoolStatus {
            name: self.name.clone(),
            route: self.route.clone(),
            connections,
            idle,
            max_size: c.max_size,
            gets: c.gets,
            gets_waited: c.gets_waited,
            gets_timed_out: c.gets_timed_out,
            connections_created: c.connections_created,
            connections_closed_broken: c.connections_closed_broken,
            circuit_open: self.breaker.is_open(),
            waiters: self.queue.waiting(),
            waiters_peak: self.queue.peak(),
            max_waiters: self.queue.max(),
            max_wait: self.max_wait,
            shed: self.shed.total(),
            shed_last_minute: self.shed.last_minute(),
            closed,
        }
    }

    pub(crate) fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    fn run_error(&self, started: Instant, e: bb8::RunError<Error>) -> Error {
        if self.gate.is_closed() {
            return Error::Closed { source: None };
        }
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

/// Whether every connection a pool may open is open and in use: a check-out
/// waits for another's work to end, not for a connection being opened.
fn saturated(pool: &bb8::Pool<Manager>) -> bool {
    let s = pool.state();
    s.connections >= pool.config().max_size && s.idle_connections == 0
}
