//! The operator tools' errors.

/// An operator tool failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The data layer failed (a connection, a query, a configuration); see
    /// [`railyard::Error::class`] for what it means.
    #[error(transparent)]
    Core(#[from] railyard::Error),

    /// The alert rules (a rules file, a silence) were refused; the message
    /// names the rule or field, never a value from the file.
    #[error("alerts: {0}")]
    Alerts(String),

    /// A retention run could not make or archive a partition; what it had
    /// begun was rolled back, and the next run tries again.
    #[error("retention: {0}")]
    Retention(String),

    /// Index advice could not be written as asked (a bad migration name,
    /// nothing verified to write, a migration that exists already).
    #[error("index advice: {0}")]
    Advice(String),

    /// A backup, restore or restore drill could not be done as asked (no
    /// backup to restore, a bad target time, a repository that is not set
    /// up); the message says what to do.
    #[error("backup: {0}")]
    Backup(String),

    /// The local cluster a backup or drill works on failed.
    #[error(transparent)]
    Local(#[from] railyard_local::Error),

    /// A step (an advisor's, a retention run's) did not finish within its
    /// deadline; nothing it began was kept.
    #[error("{what}: not done within {deadline:?}")]
    Timeout {
        /// The step.
        what: String,
        /// Its deadline.
        deadline: std::time::Duration,
    },

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
    /// A step that did not finish within `deadline`.
    pub(crate) fn timeout(deadline: std::time::Duration, what: &str) -> Self {
        Error::Timeout {
            what: what.to_owned(),
            deadline,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

railyard::wraps_core_errors!(Error);
