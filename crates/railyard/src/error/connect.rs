//! Connecting and checking out: which bound shed a check-out ([`Shed`]) and
//! which stage of opening a connection failed ([`ConnectStage`], [`ConnectError`]).

use super::*;

/// Which bound of a pool's check-out queue refused a check-out (see
/// [`Error::Overloaded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Shed {
    /// This many check-outs were already waiting: the queue's bound.
    QueueFull {
        /// The bound (`RAILYARD_POOL_MAX_WAITERS`, `Config::pool_max_waiters`).
        max_waiters: u32,
    },
    /// The check-out waited its whole budget and every connection was in use.
    WaitBudget {
        /// The budget (`RAILYARD_POOL_MAX_WAIT`, `Config::pool_max_wait`).
        budget: Duration,
    },
}

impl fmt::Display for Shed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shed::QueueFull { max_waiters } => {
                write!(
                    f,
                    "{max_waiters} check-outs were already waiting (the queue's bound)"
                )
            }
            Shed::WaitBudget { budget } => write!(
                f,
                "every connection stayed in use for the whole wait budget of {budget:?}"
            ),
        }
    }
}

/// What stage of connection establishment failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectStage {
    /// Resolving the host name or opening the socket.
    Socket,
    /// The whole attempt exceeded the connect timeout.
    Timeout,
    /// TLS negotiation or certificate verification.
    Tls,
    /// Startup and authentication: the server answered with an error.
    Startup,
    /// Session setup after authentication (application name, timeouts, role probe).
    Setup,
    /// The server was reachable but did not satisfy `target_session_attrs`.
    SessionAttrs,
    /// The password could not be obtained from its provider.
    Credentials,
}

impl fmt::Display for ConnectStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectStage::Socket => "socket",
            ConnectStage::Timeout => "timeout",
            ConnectStage::Tls => "TLS",
            ConnectStage::Startup => "startup",
            ConnectStage::Setup => "session setup",
            ConnectStage::SessionAttrs => "target_session_attrs",
            ConnectStage::Credentials => "credentials",
        })
    }
}

/// A failed attempt to open a connection, with the server's SQLSTATE when it sent one.
#[derive(Debug, thiserror::Error)]
#[error("connecting to {host}{} failed at {stage}{}: {message}", if *port == 0 { String::new() } else { format!(":{port}") }, sqlstate.as_ref().map(|s| format!(" (SQLSTATE {})", s.code())).unwrap_or_default())]
#[non_exhaustive]
pub struct ConnectError {
    /// The host (or socket directory) tried last.
    pub host: String,
    /// The port tried last (0 when the error is about a whole pool).
    pub port: u16,
    /// Where the attempt failed.
    pub stage: ConnectStage,
    /// The server's SQLSTATE, e.g. `28P01` for a refused password.
    pub sqlstate: Option<SqlState>,
    /// A human-readable description (never contains a password).
    pub message: String,
    #[source]
    pub(crate) source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ConnectError {
    /// The server's SQLSTATE, if the failure came from the server.
    pub fn code(&self) -> Option<&SqlState> {
        self.sqlstate.as_ref()
    }
}
