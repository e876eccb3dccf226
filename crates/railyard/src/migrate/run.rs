//! Running migrations: the blocking connection, the advisory lock, adopting
//! diesel's history, applying in transactions, recording and reverting.

use super::*;

/// Runs `f` with a synchronous diesel connection on a blocking thread.
pub(super) async fn blocking<T: Send + 'static>(
    conn: AsyncPgConnection,
    f: impl FnOnce(&mut SyncConn) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(move || {
        // Created here, so the wrapper uses this runtime's handle from a thread
        // where blocking is allowed.
        let mut c: SyncConn = AsyncConnectionWrapper::from(conn);
        f(&mut c)
    })
    .await
    .map_err(|e| Error::bookkeeping("the migration task", e))?
}

pub(super) fn with_lock<T>(
    c: &mut SyncConn,
    timeout: Duration,
    f: impl FnOnce(&mut SyncConn, Duration) -> Result<T, Error>,
) -> Result<T, Error> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(20);
    loop {
        let got: Flag = diesel::sql_query("SELECT pg_try_advisory_lock($1) AS ok")
            .bind::<diesel::sql_types::BigInt, _>(Migrator::LOCK_KEY)
            .get_result(c)
            .map_err(q)?;
        if got.ok {
            break;
        }
        if started.elapsed() >= timeout {
            let holder: Option<Pid> = diesel::sql_query(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 AND classid = ($1 >> 32)::bigint::oid AND objid = ($1 & 4294967295)::bigint::oid AND objsubid = 1 LIMIT 1",
            )
            .bind::<diesel::sql_types::BigInt, _>(Migrator::LOCK_KEY)
            .get_result(c)
            .ok();
            return Err(Error::Migration(MigrationError::LockTimeout {
                waited: started.elapsed(),
                holder_pid: holder.map(|h| h.pid),
            }));
        }
        std::thread::sleep(delay.min(timeout.saturating_sub(started.elapsed())));
        delay = (delay * 2).min(Duration::from_millis(250));
    }
    let lock_wait = started.elapsed();
    let result = f(c, lock_wait);
    let unlock = diesel::sql_query("SELECT pg_advisory_unlock($1) AS ok")
        .bind::<diesel::sql_types::BigInt, _>(Migrator::LOCK_KEY)
        .get_result::<Flag>(c);
    if let Err(e) = unlock {
        // The connection is dropped right after, which releases the lock anyway.
        tracing::warn!(error = %e, "could not release the migration lock explicitly");
    }
    result
}

pub(super) fn ensure_tables(c: &mut SyncConn) -> Result<(), Error> {
    c.batch_execute(diesel::migration::CREATE_MIGRATIONS_TABLE)
        .map_err(q)?;
    c.batch_execute(CREATE_OURS).map_err(q)?;
    c.batch_execute(CREATE_BACKUPS).map_err(q)
}

/// Checks the applied history against the known migrations and records the
/// checksums of those applied without one (adopted from diesel's table) or
/// accepted as edited (the development override), noting each in `report`.
pub(super) fn adopt_history(
    c: &mut SyncConn,
    applied: &Applied,
    known: &[Known],
    allow_latest: bool,
    report: &mut MigrationReport,
) -> Result<(), Error> {
    for k in check_history(applied, known, allow_latest)? {
        let edited = applied
            .rows
            .iter()
            .any(|a| a.version == k.version && a.up_sha256.is_some());
        if edited {
            tracing::warn!(
                target: "railyard::migrate",
                version = %k.version,
                "migration {} was edited after it was applied; {ALLOW_EDITED_VAR}=latest accepts it and records the new checksum, \
                 but its SQL is NOT run again (redo it: `diesel migration redo` or `railyard migrate redo`). Never set this in production",
                k.name
            );
            report.accepted_edits.push(k.version.clone());
        } else {
            report.adopted.push(k.version.clone());
        }
        record(c, k, None)?;
    }
    Ok(())
}

pub(super) fn apply_pending(
    c: &mut SyncConn,
    known: &[Known],
    allow_latest: bool,
    backup: &Backup,
) -> Result<MigrationReport, Error> {
    ensure_tables(c)?;
    // Re-read under the lock: another instance may have just migrated.
    let applied = read_applied(c)?;
    let mut report = MigrationReport::default();
    adopt_history(c, &applied, known, allow_latest, &mut report)?;
    report.already_applied = applied.rows.len();
    for k in known {
        if applied.rows.iter().any(|a| a.version == k.version) {
            continue;
        }
        backup.before(c, k)?;
        let duration = apply_one(c, k)?;
        tracing::info!(target: "railyard::migrate", version = %k.version, name = %k.name, ?duration, "applied migration");
        report.applied.push(AppliedMigration {
            version: k.version.clone(),
            name: k.name.clone(),
            duration,
        });
    }
    Ok(report)
}

/// What one locked transaction of [`apply_in_transactions`] did.
pub(super) enum Step {
    Applied(AppliedMigration),
    /// The next pending migration is risky and this run has not backed it
    /// up yet.
    Backup(usize),
    Done {
        already_applied: usize,
    },
}

/// Behind a transaction-mode pooler: each pending migration in a transaction
/// of its own that first takes the migration lock with
/// `pg_advisory_xact_lock` (released at COMMIT or ROLLBACK, so it cannot
/// leak onto a server connection another client gets) and re-reads the
/// history, so concurrent boots apply each migration once. A migration that
/// opts out of transactions is refused: nothing could hold the lock around it.
///
/// A risky migration's backup is taken between transactions: the locked
/// transaction that finds it pending ends first, the backup runs with no
/// transaction open (none sits idle through a long dump, and the pooler's
/// server connection is free), its record is committed in a locked
/// transaction of its own (kept even when the migration then fails), and
/// the next locked transaction applies the migration if it is still pending.
/// Two instances may both back up before one of them applies it; the
/// migration itself is still applied once, after a backup of its own run.
pub(super) fn apply_in_transactions(
    c: &mut SyncConn,
    known: &[Known],
    allow_latest: bool,
    lock_timeout: Duration,
    backup: &Backup,
) -> Result<MigrationReport, Error> {
    let mut report = MigrationReport::default();
    let mut backed_up: Vec<usize> = Vec::new();
    loop {
        let (step, wait) = c.transaction::<_, Error, _>(|c| {
            let wait = xact_lock(c, lock_timeout)?;
            ensure_tables(c)?;
            let applied = read_applied(c)?;
            adopt_history(c, &applied, known, allow_latest, &mut report)?;
            let Some((i, k)) = known
                .iter()
                .enumerate()
                .find(|(_, k)| !applied.rows.iter().any(|a| a.version == k.version))
            else {
                return Ok((
                    Step::Done {
                        already_applied: applied.rows.len(),
                    },
                    wait,
                ));
            };
            if !k.migration.metadata().run_in_transaction() {
                return Err(Error::Migration(MigrationError::Setting {
                    setting: "RAILYARD_POOLER".into(),
                    reason: format!(
                        "migration {} runs outside a transaction (run_in_transaction = false), and behind a transaction-mode pooler no lock can be held around it; apply it with a direct connection to the server (`railyard migrate run` with DATABASE_URL pointing at PostgreSQL, or RAILYARD_POOLER=pgbouncer-session through a session-mode pool)",
                        k.name
                    ),
                }));
            }
            if k.risky.is_some() && !backed_up.contains(&i) {
                return Ok((Step::Backup(i), wait));
            }
            let duration = apply_one(c, k)?;
            Ok((
                Step::Applied(AppliedMigration {
                    version: k.version.clone(),
                    name: k.name.clone(),
                    duration,
                }),
                wait,
            ))
        })?;
        report.lock_wait += wait;
        match step {
            Step::Applied(m) => {
                tracing::info!(target: "railyard::migrate", version = %m.version, name = %m.name, duration = ?m.duration, "applied migration (transaction-scoped lock)");
                report.applied.push(m);
            }
            Step::Backup(i) => {
                report.lock_wait += backup_between(c, &known[i], backup, lock_timeout)?;
                backed_up.push(i);
            }
            Step::Done { already_applied } => {
                report.already_applied = already_applied - report.applied.len();
                return Ok(report);
            }
        }
    }
}

/// A risky migration's backup, taken with no transaction open, and its
/// record, committed in a locked transaction of its own: how long that
/// transaction waited for the lock.
fn backup_between(
    c: &mut SyncConn,
    k: &Known,
    backup: &Backup,
    lock_timeout: Duration,
) -> Result<Duration, Error> {
    // No lock is held during the backup (no transaction sits
    // open through a pooler): another instance may apply the
    // migration meanwhile, after its own backup, and a dump
    // racing its DDL can fail. That failure is moot once the
    // migration is applied; any other stops the boot.
    let taken = match backup.take(c, k) {
        Ok(t) => t,
        Err(e) => {
            let applied_meanwhile = c.transaction::<_, Error, _>(|c| {
                xact_lock(c, lock_timeout)?;
                ensure_tables(c)?;
                Ok(read_applied(c)?.rows.iter().any(|a| a.version == k.version))
            })?;
            if !applied_meanwhile {
                return Err(e);
            }
            tracing::info!(target: "railyard::migrate", version = %k.version, name = %k.name, error = %e, "another instance applied the risky migration while this one was backing up; this backup is not needed");
            None
        }
    };
    let Some(t) = taken else {
        return Ok(Duration::ZERO);
    };
    c.transaction::<_, Error, _>(|c| {
        let wait = xact_lock(c, lock_timeout)?;
        ensure_tables(c)?;
        record_backup(c, k, &t)?;
        Ok(wait)
    })
}

/// Takes the migration lock for the current transaction, waiting at most
/// `timeout`; returns how long it waited.
pub(super) fn xact_lock(c: &mut SyncConn, timeout: Duration) -> Result<Duration, Error> {
    let started = Instant::now();
    c.batch_execute(&format!(
        "SET LOCAL lock_timeout = {}",
        timeout.as_millis().clamp(1, i32::MAX as u128)
    ))
    .map_err(q)?;
    let locked = diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
        .bind::<diesel::sql_types::BigInt, _>(Migrator::LOCK_KEY)
        .execute(c);
    if let Err(e) = locked {
        if started.elapsed() >= timeout {
            return Err(Error::Migration(MigrationError::LockTimeout {
                waited: started.elapsed(),
                holder_pid: None,
            }));
        }
        return Err(q(e));
    }
    c.batch_execute("SET LOCAL lock_timeout = DEFAULT")
        .map_err(q)?;
    Ok(started.elapsed())
}

/// Runs one migration's `up.sql` with its bookkeeping rows, in one
/// transaction unless the migration opts out.
pub(super) fn apply_one(c: &mut SyncConn, k: &Known) -> Result<Duration, Error> {
    let started = Instant::now();
    let in_tx = k.migration.metadata().run_in_transaction();
    let run = |c: &mut SyncConn| -> Result<(), Error> {
        k.migration
            .run(c)
            .map_err(|e| failed(k, diesel_sqlstate(&*e), e.to_string()))?;
        diesel::sql_query("INSERT INTO __diesel_schema_migrations (version) VALUES ($1)")
            .bind::<Text, _>(&k.version)
            .execute(c)
            .map_err(q)?;
        record(c, k, Some(started.elapsed()))
    };
    let outcome = if in_tx {
        c.transaction::<_, Error, _>(|c| run(c))
    } else {
        run(c)
    };
    outcome.map_err(|e| name_failure(c, k, in_tx, e))?;
    Ok(started.elapsed())
}

pub(super) fn failed(
    k: &Known,
    sqlstate: Option<tokio_postgres::error::SqlState>,
    message: String,
) -> Error {
    Error::Migration(MigrationError::Failed {
        version: k.version.clone(),
        name: k.name.clone(),
        sqlstate,
        message,
    })
}

/// The SQLSTATE of a diesel error boxed by the migration harness.
pub(super) fn diesel_sqlstate(
    e: &(dyn std::error::Error + Send + Sync + 'static),
) -> Option<tokio_postgres::error::SqlState> {
    let source: &(dyn std::error::Error + 'static) = e;
    let mut cur = Some(source);
    while let Some(err) = cur {
        if let Some(pg) = err.downcast_ref::<tokio_postgres::Error>() {
            return pg.code().cloned();
        }
        cur = err.source();
    }
    None
}

/// An error met while migration `k` ran, named after it: `Interrupted` when
/// the connection is gone, `Failed` otherwise.
pub(super) fn name_failure(c: &mut SyncConn, k: &Known, in_tx: bool, e: Error) -> Error {
    let alive = c.batch_execute("SELECT 1").is_ok();
    if !alive {
        return Error::Migration(MigrationError::Interrupted {
            name: k.name.clone(),
            in_transaction: in_tx,
            source: Box::new(e),
        });
    }
    match e {
        e @ Error::Migration(MigrationError::Failed { .. }) => e,
        other => {
            let sqlstate = other.sqlstate().cloned();
            failed(k, sqlstate, other.to_string())
        }
    }
}

pub(super) fn record(c: &mut SyncConn, k: &Known, duration: Option<Duration>) -> Result<(), Error> {
    diesel::sql_query(
        "INSERT INTO railyard_schema_migrations (version, name, up_sha256, down_sha256, duration_ms) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (version) DO UPDATE SET up_sha256 = EXCLUDED.up_sha256, \
         down_sha256 = EXCLUDED.down_sha256, name = EXCLUDED.name",
    )
    .bind::<Text, _>(&k.version)
    .bind::<Text, _>(&k.name)
    .bind::<Text, _>(&k.up_sha)
    .bind::<Text, _>(&k.down_sha)
    .bind::<Nullable<Double>, _>(duration.map(|d| d.as_secs_f64() * 1000.0))
    .execute(c)
    .map_err(q)?;
    Ok(())
}

/// The newest applied migration, which this binary must know.
pub(super) fn newest<'k>(
    c: &mut SyncConn,
    known: &'k [Known],
) -> Result<Option<(AppliedRow, &'k Known)>, Error> {
    let applied = read_applied(c)?;
    if let Some(version) = applied.orphans.first() {
        return Err(Error::Migration(MigrationError::Orphaned {
            version: version.clone(),
        }));
    }
    let Some(last) = applied.rows.into_iter().last() else {
        return Ok(None);
    };
    let k = known
        .iter()
        .find(|k| k.version == last.version)
        .ok_or_else(|| {
            Error::Migration(MigrationError::CannotRevert(format!(
                "the latest applied migration {} is not in this binary",
                last.version
            )))
        })?;
    Ok(Some((last, k)))
}

pub(super) fn revert_last(c: &mut SyncConn, known: &[Known]) -> Result<Option<String>, Error> {
    let Some((last, k)) = newest(c, known)? else {
        return Ok(None);
    };
    if let Some(up) = &last.up_sha256
        && *up != k.up_sha
    {
        return Err(Error::Migration(MigrationError::Edited {
            version: k.version.clone(),
            name: k.name.clone(),
            newest: true,
            recorded: short(up).to_owned(),
            embedded: short(&k.up_sha).to_owned(),
        }));
    }
    revert_one(c, k)?;
    Ok(Some(k.version.clone()))
}

pub(super) fn redo_last(c: &mut SyncConn, known: &[Known]) -> Result<Option<String>, Error> {
    let Some((_, k)) = newest(c, known)? else {
        return Ok(None);
    };
    ensure_tables(c)?;
    revert_one(c, k)?;
    apply_one(c, k)?;
    tracing::warn!(target: "railyard::migrate", version = %k.version, "redid migration {}: reverted and applied again", k.name);
    Ok(Some(k.version.clone()))
}

/// Runs one migration's `down.sql` and deletes its bookkeeping rows, in one
/// transaction unless the migration opts out.
pub(super) fn revert_one(c: &mut SyncConn, k: &Known) -> Result<(), Error> {
    let revert = |c: &mut SyncConn| -> Result<(), Error> {
        k.migration.revert(c).map_err(|e| {
            Error::Migration(MigrationError::CannotRevert(format!("{}: {e}", k.version)))
        })?;
        diesel::sql_query("DELETE FROM __diesel_schema_migrations WHERE version = $1")
            .bind::<Text, _>(&k.version)
            .execute(c)
            .map_err(q)?;
        diesel::sql_query("DELETE FROM railyard_schema_migrations WHERE version = $1")
            .bind::<Text, _>(&k.version)
            .execute(c)
            .map_err(q)?;
        Ok(())
    };
    let in_tx = k.migration.metadata().run_in_transaction();
    let outcome = if in_tx {
        c.transaction::<_, Error, _>(|c| revert(c))
    } else {
        revert(c)
    };
    outcome.map_err(|e| match e {
        e @ Error::Migration(MigrationError::CannotRevert(_)) => e,
        other => name_failure(c, k, in_tx, other),
    })
}
