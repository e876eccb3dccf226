//! The local cluster's errors.

/// Starting, joining or managing a local cluster failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The data layer failed (a connection, a query, a configuration); see
    /// [`railyard::Error::class`] for what it means.
    #[error(transparent)]
    Core(#[from] railyard::Error),

    /// The local PostgreSQL cluster could not be started or joined; the
    /// message says what to do.
    #[error("local PostgreSQL cluster: {0}")]
    Local(String),

    /// An I/O error outside a connection (files, processes).
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

railyard::wraps_core_errors!(Error);
