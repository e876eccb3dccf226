//! A statement's failure on the server: [`DbError`], the integrity rule it
//! broke ([`Violation`]) and why retries ended ([`RetriesExhausted`]).

use super::*;

/// Which integrity rule was broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ViolationKind {
    /// 23505: a unique index or constraint.
    Unique,
    /// 23503: a foreign key.
    ForeignKey,
    /// 23502: a NOT NULL column.
    NotNull,
    /// 23514: a CHECK constraint.
    Check,
    /// 23P01: an exclusion constraint.
    Exclusion,
    /// 23001: a RESTRICT rule.
    Restrict,
    /// Another 23xxx code.
    Other,
}

/// An integrity violation, with the names the server reported.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Violation {
    /// Which kind of rule.
    pub kind: ViolationKind,
    /// The constraint's name (e.g. `users_email_key`).
    pub constraint: Option<String>,
    /// The table.
    pub table: Option<String>,
    /// The column, when the server names one (NOT NULL).
    pub column: Option<String>,
}

/// A failed query with what the protocol tap saw: the exact SQLSTATE (diesel
/// keeps only six), the constraint, table and column, the phase it failed in,
/// and how many attempts were made.
#[derive(Debug)]
#[non_exhaustive]
pub struct DbError {
    /// The class, from the SQLSTATE and the connection's fate.
    pub class: ErrorClass,
    /// The SQLSTATE, when the server sent one.
    pub sqlstate: Option<SqlState>,
    /// The server's error fields, when it sent an error.
    pub server: Option<ServerError>,
    /// Where in the operation it failed.
    pub phase: Phase,
    /// Attempts made (1 when not retried).
    pub attempts: u32,
    /// `host:port` of the server.
    pub host: String,
    /// Set when the failure was of a retryable kind but retrying stopped.
    pub exhausted: Option<RetriesExhausted>,
    /// The error as diesel (or Railyard) reported it.
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Why retrying stopped although the last failure was of a kind that may be
/// retried (see [`Error::retries_exhausted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetriesExhausted {
    /// The retry policy's attempt limit was reached.
    AttemptLimit {
        /// The limit (attempts in all, the first included).
        limit: u32,
    },
    /// The `Database`'s retry budget was spent: retries across all callers
    /// already took their allowed share of recent work.
    Budget,
    /// The `Database` is closing ([`Database::close`](crate::Database::close)):
    /// no new attempt is started.
    Closing,
}

impl fmt::Display for RetriesExhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetriesExhausted::AttemptLimit { limit } => {
                write!(f, "the attempt limit ({limit}) was reached")
            }
            RetriesExhausted::Budget => f.write_str(
                "the retry budget is spent (retries across this Database already took their share of recent work)",
            ),
            RetriesExhausted::Closing => f.write_str(
                "the database handle is shutting down (Database::close was called): no new attempt is started",
            ),
        }
    }
}

impl DbError {
    /// The violated constraint, for 23xxx errors.
    pub fn violation(&self) -> Option<Violation> {
        let server = self.server.as_ref()?;
        if !server.code.starts_with("23") {
            return None;
        }
        let kind = match server.code.as_str() {
            "23505" => ViolationKind::Unique,
            "23503" => ViolationKind::ForeignKey,
            "23502" => ViolationKind::NotNull,
            "23514" => ViolationKind::Check,
            "23P01" => ViolationKind::Exclusion,
            "23001" => ViolationKind::Restrict,
            _ => ViolationKind::Other,
        };
        Some(Violation {
            kind,
            constraint: server.constraint.clone(),
            table: server.table.clone(),
            column: server.column.clone(),
        })
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(code) = &self.sqlstate {
            write!(f, " (SQLSTATE {}", code.code())?;
        } else {
            f.write_str(" (no SQLSTATE")?;
        }
        write!(
            f,
            ", class {}, {:?} on {}",
            self.class, self.phase, self.host
        )?;
        if self.attempts > 1 {
            write!(f, ", after {} attempts", self.attempts)?;
        }
        if let Some(why) = &self.exhausted {
            write!(f, "; retries stopped: {why}")?;
        }
        f.write_str(")")
    }
}

impl std::error::Error for DbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}
