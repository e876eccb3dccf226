//! `railyard retain`: the ledger's retention, run once.

use super::ledger_db;
use crate::app;

/// The retention's configuration: RAILYARD_RETENTION_* with `period` (a
/// flag) over RAILYARD_RETENTION, else 90 days.
fn retention_config(
    period: Option<String>,
) -> Result<railyard_ops::retain::RetentionConfig, app::AppError> {
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("RAILYARD_RETENTION"))
        .collect();
    match period {
        Some(p) => {
            vars.retain(|(k, _)| k != railyard_ops::retain::ENV_PERIOD);
            vars.push((railyard_ops::retain::ENV_PERIOD.into(), p));
        }
        None if !vars
            .iter()
            .any(|(k, _)| k == railyard_ops::retain::ENV_PERIOD) =>
        {
            vars.push((railyard_ops::retain::ENV_PERIOD.into(), "90d".into()));
        }
        None => {}
    }
    railyard_ops::retain::RetentionConfig::from_vars(vars)
        .map_err(|mut e| {
            if e.field == railyard_ops::retain::ENV_PERIOD {
                e.field = "--retention or RAILYARD_RETENTION".into();
            }
            app::AppError::Usage(e.to_string())
        })?
        .ok_or_else(|| app::AppError::Usage("--retention: no period".into()))
}

fn print_sizes(label: &str, f: &railyard::observe::StorageFigures) {
    out!(
        "{label:<17} database {} bytes, live history {} bytes, archive {} bytes",
        f.database_bytes,
        f.live_bytes(),
        f.archived_bytes()
    );
    for t in &f.tables {
        out!("  {:<32} {:>12} bytes", t.table, t.bytes);
    }
}

pub(crate) async fn retain(dry_run: bool, period: Option<String>) -> Result<(), app::AppError> {
    let config = retention_config(period)?;
    let retention = app::retain::ledger(config)?;
    let (db, _cluster) = ledger_db(None).await?;
    // The read check: the trades from two months before the cutoff to now,
    // through the history view, before and after the run.
    let now = chrono::Utc::now();
    let period =
        chrono::Duration::from_std(retention.config().period).unwrap_or(chrono::Duration::days(90));
    let (from, to) = (
        now - period - chrono::Duration::days(62),
        now + chrono::Duration::days(1),
    );
    let read_before = app::retain::digest(&db, from, to).await?;
    let run = retention.run(&db, dry_run).await;
    let read_after = app::retain::digest(&db, from, to).await;
    db.close(db.config().shutdown_deadline()).await;
    let (run, read_after) = (run?, read_after?);
    if let Some(why) = &run.skipped {
        out!("skipped           {why}");
        return Ok(());
    }
    print_run(&run, dry_run);
    out!(
        "read check        trade_history [{} .. {}): {} rows md5 {} before, {} rows md5 {} after: {}",
        from.format("%Y-%m-%d"),
        to.format("%Y-%m-%d"),
        read_before.n,
        read_before.digest,
        read_after.n,
        read_after.digest,
        if read_before == read_after {
            "same"
        } else {
            "DIFFERENT (trades were written meanwhile, or the read path lost rows)"
        }
    );
    out!("took              {:.2?}", run.took);
    Ok(())
}

/// What the run made and archived, and the sizes before and after.
fn print_run(run: &railyard_ops::retain::RetentionRun, dry_run: bool) {
    out!(
        "cutoff            {} (partitions ending at or before it are archived){}",
        run.cutoff.to_rfc3339(),
        if dry_run {
            "; dry run: nothing changed"
        } else {
            ""
        }
    );
    for p in &run.created {
        out!("made              {p}");
    }
    for a in &run.archived {
        out!(
            "{}  {} [{} .. {}) {} rows, {} bytes{}",
            if dry_run {
                "would archive   "
            } else {
                "archived        "
            },
            a.partition,
            a.range_from.format("%Y-%m-%d"),
            a.range_to.format("%Y-%m-%d"),
            a.rows,
            a.bytes,
            a.moved
                .iter()
                .map(|(n, k)| format!(", {k} {n} moved"))
                .collect::<String>()
        );
    }
    if run.archived.is_empty() {
        out!("archived          nothing: no partition is wholly past the retention period");
    }
    print_sizes("before", &run.before);
    if !dry_run {
        print_sizes("after", &run.after);
    }
    if run.after.cannot_free {
        out!("WARNING           the live history is still over RAILYARD_RETENTION_SIZE_THRESHOLD");
    }
}
