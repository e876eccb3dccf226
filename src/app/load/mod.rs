//! `railyard load`: a trading day driven open-loop through the crate, with
//! stress scenarios, a per-operation report, JSON and an HTML report, and
//! (`--compare raw`) the same plan replayed by a raw tokio-postgres client
//! and pgbench's TPC-B-like script for scale.
//!
//! Open loop: operations start at the times the plan says, whether or not
//! earlier ones have finished. A worker pool of `--concurrency` bounds the
//! work in flight; when every worker is busy the dispatcher waits, and the
//! operations it starts late carry that wait in their latency, which counts
//! from the intended start (no coordinated omission).

pub mod dashboard;
pub mod engine;
pub mod html;
pub mod pgbench;
pub mod plan;
pub mod raw;
pub mod record;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use railyard::Database;
use railyard_local::LocalCluster;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::AppError;
use engine::Engine;
use plan::{OpKind, Plan, Rate};
use record::{Recorder, RunReport};

/// How long the burst lasts.
pub const BURST_LENGTH: Duration = Duration::from_secs(10);
/// How long in-flight operations may take to finish after the plan ends.
const DRAIN: Duration = Duration::from_secs(60);

/// The load command's options.
#[derive(Debug, Clone, Serialize)]
pub struct LoadOptions {
    /// Traders (accounts), at least 2.
    pub traders: usize,
    /// Listed symbols, at least 1.
    pub symbols: usize,
    /// Run for this long (of plan time).
    pub duration: Option<Duration>,
    /// Or until this many orders were placed.
    pub orders: Option<u64>,
    /// Operations per second (open loop).
    pub rate: f64,
    /// Operations in flight at most (and the primary pool's size).
    pub concurrency: usize,
    /// The plan's seed.
    pub seed: u64,
    /// Pause the replica's replay from a quarter to half of the run.
    pub pause_replica: bool,
    /// Restart the local primary (immediate mode) at half of the run.
    pub restart_primary: bool,
    /// 20× the rate for 10 s from a third of the run.
    pub burst: bool,
    /// Replay the plan with the raw client too, and run pgbench.
    pub compare_raw: bool,
    /// Where report.json and report.html go.
    pub out: PathBuf,
    /// Print the live progress line.
    pub progress: bool,
}

impl LoadOptions {
    /// Checks the options, naming the flag at fault.
    pub fn validate(&self) -> Result<(), AppError> {
        let bad = |flag: &str, what: &str| Err(AppError::Usage(format!("--{flag}: {what}")));
        if self.traders < 2 {
            return bad("traders", "at least 2 traders are needed for a trade");
        }
        if self.traders > 1_000_000 {
            return bad("traders", "at most 1000000");
        }
        if self.symbols == 0 || self.symbols > 10_000 {
            return bad("symbols", "between 1 and 10000");
        }
        if !(self.rate.is_finite() && self.rate > 0.0 && self.rate <= 1_000_000.0) {
            return bad("rate", "operations per second, above 0 and at most 1000000");
        }
        if self.concurrency == 0 || self.concurrency > 1_000 {
            return bad("concurrency", "between 1 and 1000");
        }
        match (self.duration, self.orders) {
            (Some(d), _) if d.is_zero() => bad("duration", "must be above 0"),
            (_, Some(0)) => bad("orders", "must be above 0"),
            (None, None) => bad("duration", "give --duration or --orders"),
            _ => Ok(()),
        }
    }

    /// How long the plan is expected to last: its duration, or the time the
    /// orders take at the planned rate (orders are 45% of operations).
    pub fn nominal(&self) -> Duration {
        let by_orders = self
            .orders
            .map(|n| Duration::from_secs_f64(n as f64 / (self.rate * 0.45)));
        match (self.duration, by_orders) {
            (Some(d), Some(o)) => d.min(o),
            (Some(d), None) => d,
            (None, Some(o)) => o,
            (None, None) => Duration::ZERO,
        }
    }

    fn rate(&self) -> Rate {
        let d = self.nominal();
        Rate {
            per_second: self.rate,
            burst: self.burst.then(|| (d / 3, d / 3 + BURST_LENGTH)),
        }
    }
}

/// The pgbench figure printed for scale.
#[derive(Debug, Clone, Serialize)]
pub struct PgbenchFigure {
    /// Clients (`-c`).
    pub clients: usize,
    /// Seconds run (`-T`).
    pub seconds: u64,
    /// Transactions per second (without connection time).
    pub tps: f64,
    /// Average latency, ms.
    pub latency_ms: f64,
}

/// Railyard against the raw client.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ratios {
    /// Railyard's throughput over the raw client's (goal ≥ 0.9).
    pub throughput: f64,
    /// Railyard's p99 over the raw client's (goal ≤ 1.0).
    pub p99: f64,
}

/// Everything a load run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// The options it ran with.
    pub options: LoadOptions,
    /// The Railyard run.
    pub railyard: RunReport,
    /// The raw client's run of the same plan.
    pub raw: Option<RunReport>,
    /// Railyard over raw.
    pub ratios: Option<Ratios>,
    /// pgbench's TPC-B-like script on the same cluster.
    pub pgbench: Option<Result<PgbenchFigure, String>>,
}

/// Runs the day: setup, the Railyard run (with stress), and the comparison.
pub async fn run(
    db: &Database,
    cluster: Option<&LocalCluster>,
    opts: &LoadOptions,
) -> Result<LoadReport, AppError> {
    opts.validate()?;
    if opts.restart_primary && cluster.is_none() {
        return Err(AppError::Usage(
            "--restart-primary restarts the local cluster's primary: unset DATABASE_URL to use the local cluster".into(),
        ));
    }
    if opts.pause_replica && db.config().replicas().is_empty() {
        return Err(AppError::Usage(
            "--pause-replica needs a replica (DATABASE_REPLICA_URLS, or the local cluster)".into(),
        ));
    }
    let (accounts, symbols) =
        crate::app::ledger::setup(db, opts.traders, opts.symbols, opts.seed).await?;
    if symbols.len() < opts.symbols {
        return Err(AppError::Usage(format!(
            "--symbols: only {} of {} symbols are listed",
            symbols.len(),
            opts.symbols
        )));
    }
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3f");
    let railyard_engine = Arc::new(engine::RailyardEngine::new(
        db,
        &accounts,
        symbols.clone(),
        format!("load-{stamp}-{}-railyard", opts.seed),
    ));
    let railyard = drive("railyard", railyard_engine, opts, Some((db, cluster))).await;
    let (raw, ratios, pgbench) = if opts.compare_raw {
        let raw_engine = raw::RawEngine::new(
            db.config().primary(),
            opts.concurrency,
            &accounts,
            symbols,
            format!("load-{stamp}-{}-raw", opts.seed),
        )
        .map_err(AppError::Usage)?;
        let raw = drive("raw", Arc::new(raw_engine), opts, None).await;
        let ratios = Ratios {
            throughput: railyard.throughput / raw.throughput.max(1e-9),
            p99: railyard.p99_ms / raw.p99_ms.max(1e-9),
        };
        let seconds = opts.nominal().as_secs().clamp(5, 15);
        let pgbench = pgbench::run(db, cluster, opts.concurrency, seconds).await;
        (Some(raw), Some(ratios), Some(pgbench))
    } else {
        (None, None, None)
    };
    Ok(LoadReport {
        options: opts.clone(),
        railyard,
        raw,
        ratios,
        pgbench,
    })
}

/// Replays the plan through `engine`; with `db`, runs the stress actions.
async fn drive<E: Engine>(
    name: &str,
    engine: Arc<E>,
    opts: &LoadOptions,
    stress: Option<(&Database, Option<&LocalCluster>)>,
) -> RunReport {
    let start = Instant::now();
    let recorder = Arc::new(Recorder::new(start));
    let workers = Arc::new(Semaphore::new(opts.concurrency));
    let mut tasks = JoinSet::new();
    let progress = opts
        .progress
        .then(|| tokio::spawn(progress_line(name.to_owned(), recorder.clone())));
    let stressor = stress.map(|(db, cluster)| {
        stress_task(db.clone(), cluster.cloned(), opts.clone(), recorder.clone())
    });
    let stressor = stressor.map(tokio::spawn);
    let mut placed = 0u64;
    for op in Plan::new(opts.seed, opts.rate(), opts.traders, opts.symbols) {
        if opts.duration.is_some_and(|d| op.at >= d) || opts.orders.is_some_and(|n| placed >= n) {
            break;
        }
        placed += u64::from(op.action.kind() == OpKind::Place);
        let intended = start + op.at;
        tokio::time::sleep_until(intended).await;
        let permit = workers
            .clone()
            .acquire_owned()
            .await
            .expect("the worker semaphore is never closed");
        let (engine, recorder) = (engine.clone(), recorder.clone());
        tasks.spawn(async move {
            let steps = engine.run(op).await;
            recorder.record(intended, &steps);
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    let drained =
        tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        recorder.event(format!(
            "{} operations still running after {DRAIN:?}: abandoned",
            tasks.len()
        ));
        tasks.abort_all();
    }
    let elapsed = start.elapsed();
    if let Some(s) = stressor {
        let _ = s.await;
    }
    if let Some(p) = progress {
        p.abort();
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
    recorder.report(name, elapsed)
}

/// The stress actions at their times in the run; each is noted as an event.
/// Replay is always resumed before this returns.
async fn stress_task(
    db: Database,
    cluster: Option<LocalCluster>,
    opts: LoadOptions,
    recorder: Arc<Recorder>,
) {
    let d = opts.nominal();
    let start = Instant::now();
    if opts.burst {
        let recorder = recorder.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(start + d / 3).await;
            recorder.event(format!(
                "burst: {}× the rate for {BURST_LENGTH:?}",
                plan::BURST_FACTOR
            ));
            tokio::time::sleep(BURST_LENGTH).await;
            recorder.event("burst over");
        });
    }
    if opts.pause_replica {
        tokio::time::sleep_until(start + d / 4).await;
        match replay(&db, "pause").await {
            Ok(()) => recorder.event("replica replay paused"),
            Err(e) => recorder.event(format!("could not pause the replica: {e}")),
        }
        tokio::time::sleep_until(start + d / 2).await;
        match replay(&db, "resume").await {
            Ok(()) => recorder.event("replica replay resumed"),
            Err(e) => recorder.event(format!("could not resume the replica: {e}")),
        }
    }
    if opts.restart_primary
        && let Some(cluster) = cluster
    {
        tokio::time::sleep_until(start + d / 2).await;
        recorder.event("primary restarting (immediate)");
        let restarted = tokio::task::spawn_blocking(move || cluster.restart_primary()).await;
        match restarted {
            Ok(Ok(())) => recorder.event("primary accepting connections again"),
            Ok(Err(e)) => recorder.event(format!("primary restart failed: {e}")),
            Err(e) => recorder.event(format!("primary restart panicked: {e}")),
        }
    }
}

/// Pauses or resumes WAL replay on the first replica.
async fn replay(db: &Database, what: &str) -> Result<(), railyard::Error> {
    use diesel_async::SimpleAsyncConnection;
    let mut conn = db.replica(0).await?;
    conn.batch_execute(&format!("SELECT pg_wal_replay_{what}()"))
        .await?;
    Ok(())
}

async fn progress_line(name: String, recorder: Arc<Recorder>) {
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let t = start.elapsed().as_secs();
        if !tty && !t.is_multiple_of(5) {
            continue;
        }
        let p = recorder.progress();
        let line = format!(
            "[{name}] {t:>4}s  {done:>8} ops  {rate:>7.0}/s  p50 {p50:>6.1} ms  p99 {p99:>7.1} ms  retries {retries}  replica {share:>3.0}%  stale {stale}  errors {errors}",
            done = p.done,
            rate = p.rate,
            p50 = p.p50_ms,
            p99 = p.p99_ms,
            retries = p.retries,
            share = p.replica_share * 100.0,
            stale = p.stale,
            errors = p.errors,
        );
        if tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }
}

/// The report as text: a table per run, the ratios, pgbench.
pub fn render_text(r: &LoadReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for run in std::iter::once(&r.railyard).chain(r.raw.as_ref()) {
        let _ = writeln!(
            s,
            "\n{}: {} operations in {:.1} s = {:.0}/s; p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms; late starts {}; replica share {}; stale reads {}",
            run.engine,
            run.operations,
            run.elapsed_s,
            run.throughput,
            run.p50_ms,
            run.p99_ms,
            run.max_ms,
            run.late_starts,
            run.replica_share
                .map_or("-".into(), |x| format!("{:.0}%", x * 100.0)),
            run.stale_reads
        );
        let _ = writeln!(
            s,
            "  {:<10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}  {:<28} retries",
            "op", "count", "per s", "p50 ms", "p95 ms", "p99 ms", "max ms", "replica", "errors"
        );
        for op in &run.ops {
            let classes = |m: &std::collections::BTreeMap<String, u64>| {
                if m.is_empty() {
                    "0".to_owned()
                } else {
                    m.iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            };
            let _ = writeln!(
                s,
                "  {:<10} {:>8} {:>8.1} {:>8.2} {:>8.2} {:>8.2} {:>9.1} {:>8}  {:<28} {}",
                op.op,
                op.count,
                op.throughput,
                op.p50_ms,
                op.p95_ms,
                op.p99_ms,
                op.max_ms,
                op.replica_share
                    .map_or("-".into(), |x| format!("{:.0}%", x * 100.0)),
                classes(&op.errors),
                classes(&op.retries),
            );
        }
        for e in &run.events {
            let _ = writeln!(s, "  at {:>6.1} s: {}", e.t, e.what);
        }
    }
    if let Some(x) = r.ratios {
        let _ = writeln!(
            s,
            "\nrailyard / raw: throughput {:.3}× (goal ≥ 0.9), p99 {:.3}× (goal ≤ 1.0)",
            x.throughput, x.p99
        );
    }
    match &r.pgbench {
        Some(Ok(p)) => {
            let _ = writeln!(
                s,
                "pgbench (TPC-B-like, {} clients, {} s, same cluster): {:.0} tps, {:.2} ms average latency",
                p.clients, p.seconds, p.tps, p.latency_ms
            );
        }
        Some(Err(e)) => {
            let _ = writeln!(s, "pgbench: not run: {e}");
        }
        None => {}
    }
    s
}

/// Writes report.json and report.html into `dir`; returns their paths.
pub fn write_reports(
    r: &LoadReport,
    dir: &std::path::Path,
) -> Result<(PathBuf, PathBuf), AppError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| AppError::io(format!("creating {}", dir.display()), e))?;
    let json = dir.join("report.json");
    let html = dir.join("report.html");
    let body = serde_json::to_string_pretty(r).map_err(|e| AppError::Usage(e.to_string()))?;
    std::fs::write(&json, body)
        .map_err(|e| AppError::io(format!("writing {}", json.display()), e))?;
    std::fs::write(&html, html::render(r))
        .map_err(|e| AppError::io(format!("writing {}", html.display()), e))?;
    Ok((json, html))
}
