//! Work on an enclosed connection: savepoints ([`in_savepoint`] and its
//! loop), and checking that the enclosure is still open.

use super::*;

/// Checks that the enclosing transaction is still open after the work ran.
pub(super) async fn ensure_enclosure_open(conn: &Conn) -> Result<(), Error> {
    conn.wire().quiesce(Duration::from_millis(200)).await;
    if conn.wire().tx_status() == TxStatus::Idle {
        return Err(Error::TestIsolation(
            "the code under test ended the test's transaction (COMMIT or ROLLBACK on the connection); \
             what it wrote may have been committed to the test database. Use `db.transaction`, or \
             `isolation = \"database\"` for tests that must commit"
                .into(),
        ));
    }
    Ok(())
}

/// Work on an enclosed connection: a savepoint, rolled back and released on
/// error. Not retried, except under a [`Contention`] policy (the test
/// harness's), when it failed on another transaction's locks.
pub(crate) async fn in_savepoint<F: ConnWork>(
    mut conn: PooledConn,
    f: F,
    record: bool,
    statement_timeout: Option<Duration>,
    contention: Option<&Contention>,
) -> Result<(F::Value, CommitPosition), Failed<F::Error>> {
    let plain = |e: Error| {
        let class = e.class();
        Failed::bare(F::Error::from(e), Some(class), 1)
    };
    ensure_enclosure_open(&conn).await.map_err(plain)?;
    if let Some(c) = contention {
        c.blockers.clear();
    }
    let started = Instant::now();
    let mut attempt = 1;
    let v = loop {
        let outcome = savepoint_attempt(&mut conn, f.clone(), statement_timeout, attempt).await;
        ensure_enclosure_open(&conn).await.map_err(plain)?;
        let (failed, conflict) = match outcome {
            Ok(v) => break v,
            Err(e) => e,
        };
        let Some(c) = contention.filter(|_| conflict) else {
            return Err(failed);
        };
        let waited = started.elapsed();
        if attempt >= c.max_attempts || waited >= c.bound {
            return Err(blocked(failed, c, waited, attempt));
        }
        let pause = c.backoff(attempt).min(c.bound - waited);
        tracing::debug!(
            target: "railyard::test",
            sqlstate = failed.sqlstate().map(|s| s.code()),
            attempt,
            blockers = c.blockers.last(),
            "enclosed work met another transaction's locks; rolled back to its savepoint, retrying"
        );
        tokio::time::sleep(pause).await;
        attempt += 1;
    };
    let at = if record {
        commit_position(&mut conn).await
    } else {
        CommitPosition::NotRecorded
    };
    Ok((v, at))
}

/// One savepoint around `f`. On failure, also says whether it failed on
/// another transaction's locks (the savepoint is rolled back and released
/// either way).
pub(super) async fn savepoint_attempt<F: ConnWork>(
    conn: &mut PooledConn,
    f: F,
    statement_timeout: Option<Duration>,
    attempt: u32,
) -> Result<F::Value, (Failed<F::Error>, bool)> {
    let plain = |e: Error| {
        let class = e.class();
        (Failed::bare(F::Error::from(e), Some(class), attempt), false)
    };
    let wire = conn.wire_arc();
    let host = host_of(conn);
    AnsiTransactionManager::begin_transaction(conn.pg())
        .await
        .map_err(|e| plain(Error::Query(e)))?;
    if let Some(t) = statement_timeout {
        conn.pg()
            .batch_execute(&format!(
                "SET LOCAL statement_timeout = {}",
                t.as_millis().max(1)
            ))
            .await
            .map_err(|e| plain(Error::Query(e)))?;
    }
    let mark = wire.mark();
    let result = f(conn).await;
    wire.quiesce(Duration::from_millis(100)).await;
    let conflict = |failure: &Failure| {
        failure
            .server
            .as_ref()
            .is_some_and(|s| contention::is_lock_conflict(&s.sqlstate()))
    };
    match result {
        Ok(_) if wire.tx_status() == TxStatus::Failed => {
            let failure = Failure::from_wire(&wire, mark, Phase::InFlight, host).await;
            let _ = conn.rollback_and_release().await;
            let error = F::Error::from(swallowed(&failure));
            Err((
                Failed::of(error, &failure, attempt, None),
                conflict(&failure),
            ))
        }
        Ok(v) => match AnsiTransactionManager::commit_transaction(conn.pg()).await {
            Ok(()) => Ok(v),
            Err(e) => Err(plain(Error::Query(e))),
        },
        Err(e) => {
            let failure = Failure::from_wire(&wire, mark, Phase::InFlight, host).await;
            let _ = conn.rollback_and_release().await;
            let error = enrich(e, &failure, attempt, None);
            Err((
                Failed::of(error, &failure, attempt, None),
                conflict(&failure),
            ))
        }
    }
}

/// Enclosed work that gave up on another transaction's locks: an
/// [`Error::Blocked`] naming who held them, when the closure's error type is
/// [`Error`] (any other type keeps its own error, and the facts stay on the
/// [`Failed`]).
pub(super) fn blocked<E: 'static>(
    failed: Failed<E>,
    c: &Contention,
    waited: Duration,
    attempts: u32,
) -> Failed<E> {
    let blockers = c.blockers.last();
    tracing::warn!(
        target: "railyard::test",
        attempts,
        waited_ms = waited.as_millis() as u64,
        blockers = blockers.as_deref().unwrap_or("unknown"),
        "enclosed work gave up on another transaction's locks"
    );
    let Failed {
        error,
        class,
        sqlstate,
        exhausted,
        ..
    } = failed;
    let any: Box<dyn Any> = Box::new(error);
    let error = match any.downcast::<Error>() {
        Ok(source) => {
            let e: Box<dyn Any> = Box::new(Error::Blocked {
                waited,
                bound: c.bound,
                attempts,
                blockers,
                source,
            });
            *e.downcast::<E>()
                .expect("E is Error: it was just downcast to it")
        }
        Err(any) => *any
            .downcast::<E>()
            .expect("the value boxed just above is an E"),
    };
    Failed {
        error,
        class,
        sqlstate,
        attempts,
        exhausted,
    }
}
