//! `railyard load`: the trading day's load generator, its reports and the
//! ledger's invariants checked at the end.

use super::check::print_verdicts;
use super::ledger_db_with;
use crate::{Compare, LoadArgs, app};

pub(crate) async fn load(args: LoadArgs) -> Result<(), app::AppError> {
    let opts = app::load::LoadOptions {
        traders: args.traders,
        symbols: args.symbols,
        duration: args.duration.map(Into::into).or(args
            .orders
            .is_none()
            .then_some(std::time::Duration::from_secs(30))),
        orders: args.orders,
        rate: args.rate,
        concurrency: args.concurrency,
        seed: args.seed.unwrap_or_else(rand::random),
        pause_replica: args.pause_replica,
        restart_primary: args.restart_primary,
        burst: args.burst,
        compare_raw: matches!(args.compare, Some(Compare::Raw)),
        out: args.out,
        progress: !args.quiet,
    };
    opts.validate()?;
    let pool = u32::try_from(opts.concurrency).unwrap_or(u32::MAX);
    // With a dashboard, the run's statements are recorded for its top list.
    let stats = args.dashboard.map(|_| railyard::StatementStats::new());
    let (db, cluster) = ledger_db_with(Some(pool), stats.clone()).await?;
    let dashboard = match (args.dashboard, stats) {
        (Some(addr), Some(stats)) => {
            let live = app::load::dashboard::serve(&db, stats, addr).await?;
            out!("dashboard on http://{}/", live.addr());
            Some(live)
        }
        _ => None,
    };
    out!(
        "load: {} traders, {} symbols, {} ops/s for {}, concurrency {}, seed {}",
        opts.traders,
        opts.symbols,
        opts.rate,
        opts.duration
            .map(|d| format!("{d:?}"))
            .unwrap_or_else(|| format!("{} orders", opts.orders.unwrap_or(0))),
        opts.concurrency,
        opts.seed
    );
    let report = app::load::run(&db, cluster.as_ref(), &opts).await?;
    out!("{}", app::load::render_text(&report));
    let (json, html) = app::load::write_reports(&report, &opts.out)?;
    out!("reports           {} {}", json.display(), html.display());
    let verdicts = app::check::check(&db).await?;
    print_verdicts(&verdicts);
    drop(dashboard);
    let stale = report.railyard.stale_reads;
    let failed = verdicts.iter().filter(|v| !v.passed()).count();
    db.close(db.config().shutdown_deadline()).await;
    if failed > 0 || stale > 0 {
        return Err(app::AppError::Failed(format!(
            "{failed} invariant(s) broken, {stale} stale read(s)"
        )));
    }
    Ok(())
}
