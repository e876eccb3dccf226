//! `COMMIT` and the primary's WAL position after it, and leaving a
//! transaction whose commit failed.

use super::*;

/// `COMMIT` and, in the same flight, the primary's WAL insert position after
/// it: one simple query, so one round trip, whose second statement runs only
/// when the first succeeded. See [`commit`].
pub(super) const COMMIT_AND_POSITION: &str = "COMMIT; SELECT pg_current_wal_insert_lsn()::text";

/// Commits the transaction `attempt_transaction` opened; for a session
/// (`record`), with the commit position.
///
/// A session's commit costs what any commit costs: one round trip. `COMMIT`
/// and the position query travel as one simple query, which the server runs
/// in order and answers with one `ReadyForQuery`; diesel discards its row, the
/// tap keeps it ([`Conn::simple_query_captured`]). The position is read after
/// the commit record was written, so a replica that replayed up to it has the
/// commit (the position cannot be taken before `COMMIT`: the commit record
/// is not written yet).
///
/// diesel's transaction manager is told what happened, as its own
/// `commit_transaction` would have been. It does not see the query (it only
/// sends `COMMIT` alone), so this does its bookkeeping, by what the tap saw:
///
/// - `COMMIT` completed (its `CommandComplete` came): the transaction is
///   over, whether or not the position query then answered (a failed position
///   query leaves the position [`CommitPosition::Unknown`]: the session reads
///   from the primary, never stale);
/// - `COMMIT` failed (40001, a deferred constraint, a lost connection): the
///   server skipped the position query, the error is diesel's error for
///   `COMMIT`, classified from the tap exactly as before; the server ended the
///   transaction (the tap says idle), or, when it cannot be known, diesel
///   rolls back as it would have (a lost connection: the pool drops it).
///
/// A dropped future (a deadline) leaves diesel's manager inside the
/// transaction, and the pool never reuses such a connection.
pub(super) async fn commit(conn: &mut Conn, record: bool) -> diesel::QueryResult<CommitPosition> {
    if !record {
        AnsiTransactionManager::commit_transaction(conn.pg()).await?;
        return Ok(CommitPosition::NotRecorded);
    }
    let depth = match AnsiTransactionManager::transaction_manager_status_mut(conn.pg()) {
        TransactionManagerStatus::Valid(v) => v.transaction_depth(),
        TransactionManagerStatus::InError => {
            return Err(diesel::result::Error::BrokenTransactionManager);
        }
    };
    let Some(depth) = depth.filter(|d| d.get() == 1) else {
        // Not the top-level transaction this layer opened: diesel's own path.
        AnsiTransactionManager::commit_transaction(conn.pg()).await?;
        return Ok(commit_position(conn).await);
    };
    conn.pg()
        .instrumentation()
        .on_connection_event(InstrumentationEvent::commit_transaction(depth));
    let (result, captured) = match conn.simple_query_captured(COMMIT_AND_POSITION).await {
        Ok(sent) => sent,
        Err(e) => {
            // A request was still in flight: commit alone, then ask.
            tracing::debug!(target: "railyard::route", error = %e, "commit position not taken in the commit's flight");
            AnsiTransactionManager::commit_transaction(conn.pg()).await?;
            return Ok(commit_position(conn).await);
        }
    };
    let committed = captured.first_completed("COMMIT");
    match result {
        Ok(()) => {
            leave_transaction(conn);
            Ok(match position_of(&captured) {
                Ok(lsn) => CommitPosition::At(lsn),
                Err(e) => unknown_position(&e),
            })
        }
        Err(e) if committed => {
            // Committed; only the position query failed.
            leave_transaction(conn);
            Ok(unknown_position(&e))
        }
        Err(e) => {
            after_failed_commit(conn).await;
            Err(e)
        }
    }
}

/// The transaction is over on the server: diesel's manager leaves it too.
pub(super) fn leave_transaction(conn: &mut Conn) {
    if let TransactionManagerStatus::Valid(v) =
        AnsiTransactionManager::transaction_manager_status_mut(conn.pg())
    {
        // At depth 1, this ends the transaction (and forgets any "requires
        // rollback" mark diesel set on a 40001).
        let _ = v.change_transaction_depth(TransactionDepthChange::DecreaseDepth);
    }
}

/// A `COMMIT` that failed: the server ended the transaction (a failed
/// `COMMIT` always does), unless the connection is gone or the error came
/// from the client; then diesel rolls back, as its own commit would have.
pub(super) async fn after_failed_commit(conn: &mut Conn) {
    let wire = conn.wire_arc();
    // The error arrives before its ReadyForQuery.
    wire.quiesce(Duration::from_millis(100)).await;
    if !wire.is_closed() && wire.in_flight() == 0 && wire.tx_status() == TxStatus::Idle {
        leave_transaction(conn);
        return;
    }
    if AnsiTransactionManager::rollback_transaction(conn.pg())
        .await
        .is_err()
    {
        AnsiTransactionManager::transaction_manager_status_mut(conn.pg()).set_in_error();
    }
}

pub(super) fn unknown_position(e: &dyn std::fmt::Display) -> CommitPosition {
    tracing::warn!(target: "railyard::route", error = %e, "could not read the commit position; this session reads from the primary");
    CommitPosition::Unknown
}

/// The primary's WAL insert position right after autocommit work on `conn`
/// (one round trip of its own: see `write`). When it cannot be read, the
/// session's reads all go to the primary: slower, never stale.
pub(super) async fn commit_position(conn: &mut Conn) -> CommitPosition {
    match conn.wal_insert_lsn().await {
        Ok(lsn) => CommitPosition::At(lsn),
        Err(e) => unknown_position(&e),
    }
}
