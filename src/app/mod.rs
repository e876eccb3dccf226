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
    /// A flag or argument was wrong; the message names it.
    #[error("{0}")]
    Usage(String),
    /// A file could not be read or written.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
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
            what: what.into(),
            source,
        }
    }
}
