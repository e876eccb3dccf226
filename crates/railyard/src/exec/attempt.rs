//! The one retry loop ([`retrying`], [`RetryWhen`]) and how an attempt gets
//! its connection.

use super::*;

/// What the first check-out of an operation gave.
pub(super) enum First {
    /// A connection inside someone else's transaction: run once, in a savepoint.
    Enclosed(PooledConn),
    /// The first attempt's lease, or why there is none (a failure the retry
    /// loop judges like any other attempt's).
    Lease(Result<PooledConn, Error>),
}

/// Checks out the first connection before the retry loop, to learn whether it
/// is enclosed; within the operation's deadline (an exhausted pool must not
/// outwait it).
pub(super) async fn first_lease<S: Source, E: From<Error>>(
    src: &S,
    deadline: Deadline,
) -> Result<First, Failed<E>> {
    let lease = match deadline.0 {
        None => src.checkout_primary().await,
        Some((_, until)) => match tokio::time::timeout_at(until, src.checkout_primary()).await {
            Ok(lease) => lease,
            Err(_) => {
                return Err(Failed::bare(
                    E::from(deadline.passed(0)),
                    Some(ErrorClass::Timeout),
                    0,
                ));
            }
        },
    };
    Ok(match lease {
        Ok(conn) if conn.enclosed() => First::Enclosed(conn),
        other => First::Lease(other),
    })
}

/// The first attempt's lease (checked out before the loop, to learn whether it
/// is enclosed), or a new one.
pub(super) async fn checked_out<S: Source>(
    src: &S,
    lease: Option<Result<PooledConn, Error>>,
) -> Result<PooledConn, Error> {
    match lease {
        Some(r) => r,
        None => src.checkout_primary().await,
    }
}

/// One attempt's connection and where its traffic began.
pub(super) struct Attempt {
    pub(super) conn: PooledConn,
    pub(super) wire: Arc<WireState>,
    pub(super) host: String,
    pub(super) mark: WireMark,
}

/// Checks out the attempt's connection (or takes the one checked out before the
/// loop), makes it cancellable by the deadline, and marks the wire.
pub(super) async fn start_attempt<S: Source, E: From<Error>>(
    src: &S,
    lease: Option<Result<PooledConn, Error>>,
    cancel: &CancelSlot,
    attempt: u32,
) -> Result<Attempt, (E, Failure)> {
    let conn = match checked_out(src, lease).await {
        Ok(c) => c,
        Err(e) => {
            let failure = Failure::connect(&e);
            return Err((E::from(e), failure));
        }
    };
    cancel.set(&conn);
    conn.set_attempt(attempt);
    let wire = conn.wire_arc();
    let host = host_of(&conn);
    let mark = wire.mark();
    Ok(Attempt {
        conn,
        wire,
        host,
        mark,
    })
}

/// Which failures an operation runs again after.
#[derive(Debug, Clone, Copy)]
pub(super) enum RetryWhen {
    /// Those after which running the work again is safe (see `retryable`).
    Safe { idempotent: bool },
    /// Only the loss of the connection: a read on the primary, which changed
    /// nothing, runs again on a new connection; any other failure (a
    /// serialization failure included) is the caller's.
    Lost,
}

impl RetryWhen {
    pub(super) fn allows(self, f: &Failure) -> bool {
        match self {
            RetryWhen::Safe { idempotent } => retryable(f.class, f.phase, idempotent, f.sent),
            RetryWhen::Lost => f.lost && f.class == ErrorClass::Reconnect,
        }
    }
}

/// The one retry loop: transactions, autocommit writes and primary reads.
/// Runs attempts until one succeeds or retrying is not safe (`when`), not
/// allowed by the policy, or not affordable from the budget; backs off
/// between attempts.
// Over 80 lines: the one retry loop, kept whole so that every exit is in sight.
// Long by design: the one retry loop: attempt, classify, back off, in one place.
pub(super) async fn retrying<S: Source, T, E, Fut>(
    src: &S,
    policy: &RetryPolicy,
    when: RetryWhen,
    what: &'static str,
    attempts: &AtomicU32,
    mut attempt_fn: impl FnMut(u32) -> Fut,
) -> Result<T, Failed<E>>
where
    Fut: Future<Output = Result<T, (E, Failure)>>,
    E: 'static,
{
    let retries = src.retries();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        attempts.store(attempt, Ordering::Relaxed);
        if attempt == 1 {
            retries.budget.deposit();
        }
        let (e, failure) = match attempt_fn(attempt).await {
            Ok(v) => return Ok(v),
            Err(failed) => failed,
        };
        let lifecycle = src.lifecycle();
        if lifecycle == Lifecycle::Cancelling && cancelled_by_close(failure.class) {
            let e = closed_by(enrich(e, &failure, attempt, None));
            let mut failed = Failed::of(e, &failure, attempt, None);
            failed.class = Some(ErrorClass::Permanent);
            return Err(failed);
        }
        if !when.allows(&failure) {
            return Err(Failed::of(
                enrich(e, &failure, attempt, None),
                &failure,
                attempt,
                None,
            ));
        }
        let exhausted = if attempt >= policy.attempts() {
            Some(RetriesExhausted::AttemptLimit {
                limit: policy.attempts(),
            })
        } else if lifecycle != Lifecycle::Open {
            Some(RetriesExhausted::Closing)
        } else if !retries.budget.withdraw() {
            Some(RetriesExhausted::Budget)
        } else {
            None
        };
        if let Some(why) = exhausted {
            tracing::warn!(
                target: "railyard::retry",
                class = %failure.class,
                sqlstate = failure.server.as_ref().map(|s| s.code.as_str()).unwrap_or(""),
                attempt,
                what,
                "retries stopped: {why}"
            );
            return Err(Failed::of(
                enrich(e, &failure, attempt, exhausted),
                &failure,
                attempt,
                exhausted,
            ));
        }
        retries.note(failure.class);
        if failure.class == ErrorClass::Reroute {
            src.reroute_primary();
        }
        // Each retry is DEBUG; a run that gives up says so at WARN (above).
        tracing::debug!(
            target: "railyard::retry",
            class = %failure.class,
            sqlstate = failure.server.as_ref().map(|s| s.code.as_str()).unwrap_or(""),
            attempt,
            what,
            "retrying"
        );
        tokio::time::sleep(policy.backoff(attempt)).await;
    }
}
