//! The errors of listeners and change streams.

/// A listener or a change stream failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The data layer failed (a connection, a query, a configuration); see
    /// [`railyard::Error::class`] for what it means.
    #[error(transparent)]
    Core(#[from] railyard::Error),

    /// A change stream could not start or go on (a bad slot or table name,
    /// a missing slot, a slot lost to a failover, a token the slot moved
    /// past); the message says what to do.
    #[error("change stream: {0}")]
    Changes(String),

    /// A notification or a listen was refused before it reached the server
    /// (a payload over the server's limit, a channel name it would refuse).
    #[error("notify: {0}")]
    Notify(String),
}

railyard::wraps_core_errors!(Error);
