//! The reference application: the trading ledger's operations (`ledger`),
//! its invariants (`check`) and the load generator (`load`). It uses the
//! crate's public API only, as any application would.

pub mod check;
pub mod ledger;
pub mod load;
pub mod retain;

/// What the application's commands fail with.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// From the database layer.
    #[error(transparent)]
    Db(#[from] railyard::Error),
    /// From the local cluster.
    #[error(transparent)]
    Local(#[from] railyard_local::Error),
    /// From an operator tool.
    #[error(transparent)]
    Ops(#[from] railyard_ops::Error),
    /// From a listener or a change stream.
    #[error(transparent)]
    Events(#[from] railyard_events::Error),
    /// A flag or argument was wrong; the message names it.
    #[error("{0}")]
    Usage(String),
    /// A file could not be read or written.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The command ran and its verdict is a failure (an invariant broken).
    #[error("{0}")]
    Failed(String),
}

impl AppError {
    /// An I/O failure while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        AppError::Io {
            context: what.into(),
            source,
        }
    }
}

impl From<railyard::error::ConfigError> for AppError {
    fn from(e: railyard::error::ConfigError) -> Self {
        AppError::Db(e.into())
    }
}

impl From<diesel::result::Error> for AppError {
    fn from(e: diesel::result::Error) -> Self {
        AppError::Db(e.into())
    }
}
