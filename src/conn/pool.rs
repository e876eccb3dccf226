//! The bb8 side: our `ManageConnection`, check-out validation from the tap, and
//! a pool per target that reports why a check-out timed out.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;

use super::breaker::Breaker;
use super::open::Opener;
use super::wire::TxStatus;
use super::{Conn, Route};
use crate::config::{Config, TargetSessionAttrs};
use crate::error::{ConnectError, ConnectStage, Error};

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
}

/// A pool of connections to one target, with its name for errors and reports.
#[derive(Debug, Clone)]
pub(crate) struct TargetPool {
    pub(crate) name: String,
    pub(crate) route: Route,
    breaker: Arc<Breaker>,
    generation: Arc<std::sync::atomic::AtomicU64>,
    pub(crate) pool: bb8::Pool<Manager>,
    pub(crate) last_error: LastError,
    pub(crate) checkout_timeout: Duration,
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
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let manager = Manager {
            // Only a pool that asked for a read-write server re-resolves when
            // its server turns out to be a standby.
            require_primary: matches!(route, Route::Primary)
                && opener.attrs() == TargetSessionAttrs::ReadWrite,
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
            name,
            route,
            breaker,
            generation,
            pool,
            last_error,
            checkout_timeout: config.pool.checkout_timeout,
        }
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

    /// A snapshot of this pool's state and counters.
    pub(crate) fn status(&self) -> PoolStatus {
        let s = self.pool.state();
        PoolStatus {
            name: self.name.clone(),
            route: self.route.clone(),
            connections: s.connections,
            idle: s.idle_connections,
            max_size: self.pool.config().max_size,
            gets: s.statistics.get_direct + s.statistics.get_waited,
            gets_waited: s.statistics.get_waited,
            gets_timed_out: s.statistics.get_timed_out,
            connections_created: s.statistics.connections_created,
            connections_closed_broken: s.statistics.connections_closed_broken,
            circuit_open: self.breaker.is_open(),
        }
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
