//! What a failed attempt leaves: [`Failure`] (what the tap saw), [`Failed`]
//! (the caller's view of it) and the enrichment of a bare diesel error.

use super::*;

/// What went wrong in one attempt, as the tap saw it.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) class: ErrorClass,
    pub(super) phase: Phase,
    pub(super) sent: bool,
    /// The connection was gone when the failure was judged.
    pub(super) lost: bool,
    pub(super) server: Option<ServerError>,
    pub(super) host: String,
}

impl Failure {
    pub(super) async fn from_wire(
        wire: &WireState,
        mark: WireMark,
        phase: Phase,
        host: String,
    ) -> Self {
        if wire.error_since(mark).is_none() && !wire.is_closed() && wire.in_flight() > 0 {
            // A request is unanswered and no error came: the connection may be
            // dying, and its driver about to say so. Give it a moment.
            wire.quiesce(Duration::from_millis(100)).await;
        }
        let server = wire.error_since(mark);
        let lost = wire.is_closed();
        let sent = wire.written_since(mark) > 0;
        let class = match &server {
            // A FATAL from a dying backend (57P01) and an ordinary error both count.
            Some(s) => s.class(lost),
            None if lost && phase == Phase::Commit && sent => ErrorClass::Ambiguous,
            None => classify(None, lost),
        };
        Failure {
            class,
            phase,
            sent,
            lost,
            server,
            host,
        }
    }

    pub(super) fn connect(e: &Error) -> Self {
        Failure {
            class: e.class(),
            phase: Phase::Connect,
            sent: false,
            lost: false,
            server: None,
            host: String::new(),
        }
    }
}

/// A failed transaction or write, with what Railyard learned of the failure,
/// whatever the closure's error type: returned by the builders' `run_detailed`.
///
/// When the closure returns [`Error`], the error itself carries all this
/// ([`Error::sqlstate`], [`Error::class`], [`Error::retries_exhausted`]). An
/// application error type that wraps a Railyard error cannot be looked into,
/// so `run_detailed` hands the facts over beside it:
///
/// ```no_run
/// use diesel_async::RunQueryDsl;
/// #[derive(Debug)]
/// enum AppError { Db(railyard::Error), Overdrawn }
/// impl From<railyard::Error> for AppError {
///     fn from(e: railyard::Error) -> Self { AppError::Db(e) }
/// }
/// # async fn demo(db: railyard::Database) {
/// let r = db
///     .build_transaction()
///     .serializable()
///     .run_detailed(async |conn| {
///         diesel::sql_query("UPDATE accounts SET balance_cents = balance_cents - 5 WHERE id = 1")
///             .execute(conn)
///             .await
///             .map_err(|e| AppError::Db(e.into()))
///     })
///     .await;
/// if let Err(failed) = r {
///     eprintln!(
///         "SQLSTATE {:?} after {} attempt(s), exhausted: {:?}",
///         failed.sqlstate().map(|s| s.code()),
///         failed.attempts(),
///         failed.retries_exhausted(),
///     );
///     let _app_error: AppError = failed.into_error();
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct Failed<E> {
    pub(super) error: E,
    pub(super) class: Option<ErrorClass>,
    pub(super) sqlstate: Option<tokio_postgres::error::SqlState>,
    pub(super) attempts: u32,
    pub(super) exhausted: Option<RetriesExhausted>,
}

impl<E> Failed<E> {
    pub(super) fn bare(error: E, class: Option<ErrorClass>, attempts: u32) -> Self {
        Failed {
            error,
            class,
            sqlstate: None,
            attempts,
            exhausted: None,
        }
    }

    pub(super) fn of(
        error: E,
        f: &Failure,
        attempts: u32,
        exhausted: Option<RetriesExhausted>,
    ) -> Self {
        Failed {
            error,
            class: Some(f.class),
            sqlstate: f.server.as_ref().map(ServerError::sqlstate),
            attempts,
            exhausted,
        }
    }

    /// The closure's error (enriched as [`Error::Database`] when it is an [`Error`]).
    pub fn error(&self) -> &E {
        &self.error
    }

    /// Takes the error out.
    pub fn into_error(self) -> E {
        self.error
    }

    /// The failure's class, when Railyard saw the failure (it did not for an
    /// error the closure made up without touching the server).
    pub fn class(&self) -> Option<ErrorClass> {
        self.class
    }

    /// The SQLSTATE the server sent during the last attempt, if any.
    pub fn sqlstate(&self) -> Option<&tokio_postgres::error::SqlState> {
        self.sqlstate.as_ref()
    }

    /// Attempts started (1 when not retried; 0 when no attempt could start).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Why retrying stopped, when the failure was retryable.
    pub fn retries_exhausted(&self) -> Option<RetriesExhausted> {
        self.exhausted
    }
}

impl<E: std::fmt::Display> std::fmt::Display for Failed<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)?;
        if let Some(why) = &self.exhausted {
            write!(
                f,
                " (after {} attempts; retries stopped: {why})",
                self.attempts
            )?;
        }
        Ok(())
    }
}

impl<E: std::error::Error + 'static> std::error::Error for Failed<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Replaces a bare diesel error in `e` (when `E` is [`Error`]) by one that carries
/// what the tap saw.
pub(super) fn enrich<E: 'static>(
    e: E,
    f: &Failure,
    attempts: u32,
    exhausted: Option<RetriesExhausted>,
) -> E {
    let any: Box<dyn Any> = Box::new(e);
    match any.downcast::<Error>() {
        Ok(err) => {
            let enriched: Box<dyn Any> = Box::new(enrich_error(*err, f, attempts, exhausted));
            *enriched
                .downcast::<E>()
                .expect("E is Error: it was just downcast to it")
        }
        Err(any) => *any
            .downcast::<E>()
            .expect("the value boxed just above is an E"),
    }
}

pub(super) fn enrich_error(
    err: Error,
    f: &Failure,
    attempts: u32,
    exhausted: Option<RetriesExhausted>,
) -> Error {
    match err {
        Error::Query(d) => {
            let db = Box::new(DbError {
                class: f.class,
                sqlstate: f.server.as_ref().map(ServerError::sqlstate),
                server: f.server.clone(),
                phase: f.phase,
                attempts,
                host: f.host.clone(),
                exhausted,
                source: Box::new(d),
            });
            if f.class == ErrorClass::Ambiguous {
                Error::Ambiguous(db)
            } else {
                Error::Database(db)
            }
        }
        Error::Database(mut d) => {
            d.attempts = attempts;
            d.exhausted = exhausted;
            Error::Database(d)
        }
        other => other,
    }
}

/// The error of work run once, with no retries (`Database::with_primary`),
/// carrying what the tap saw as transaction and write errors do: the
/// server's SQLSTATE and class, and `Ambiguous` for a connection lost after
/// a statement was sent (an autocommit statement may have committed).
pub(crate) async fn enrich_once<E: 'static>(
    e: E,
    wire: &WireState,
    mark: WireMark,
    host: String,
) -> E {
    let phase = if wire.written_since(mark) > 0 {
        Phase::Commit
    } else {
        Phase::BeforeSend
    };
    let f = Failure::from_wire(wire, mark, phase, host).await;
    enrich(e, &f, 1, None)
}

pub(super) fn host_of(conn: &Conn) -> String {
    format!("{}:{}", conn.info().host, conn.info().port)
}

/// The error for a closure that swallowed a server error: the server aborted
/// the transaction, and COMMIT would silently have rolled it back.
pub(super) fn swallowed(failure: &Failure) -> Error {
    Error::Database(Box::new(DbError {
        class: failure.class,
        sqlstate: failure.server.as_ref().map(ServerError::sqlstate),
        server: failure.server.clone(),
        phase: Phase::InFlight,
        attempts: 1,
        host: failure.host.clone(),
        exhausted: None,
        source: "the transaction was aborted by an error that the closure did not return; it was rolled back, not committed".into(),
    }))
}
