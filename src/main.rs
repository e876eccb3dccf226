//! The reference application (a small trading ledger) and Railyard's CLI.
//!
//! `cargo run` with no `DATABASE_URL` starts (or joins) the local
//! cluster, boots (migrations included) and prints a boot report.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use railyard::database::ReplicaState;
use railyard::migrate::{ChecksumState, MigrationState};
use railyard::{Config, Database, Migrator};
use railyard_events::DatabaseEvents;
use railyard_local::LocalCluster;
use railyard_local::{default_cluster_dir, stop_dir};

mod app;
mod schema;

/// Prints a line to stdout, ignoring a closed pipe (`railyard … | head`).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// The ledger's migrations, embedded in the binary.
const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

#[derive(Parser)]
#[command(
    name = "railyard",
    about = "Railyard reference application: a trading ledger on Diesel + PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Boot (start the local cluster when DATABASE_URL is unset, migrate) and print a report.
    Boot,
    /// Boot, then serve /healthz, /readyz, /health and /metrics over HTTP,
    /// and the live dashboard at / (health, pools, replicas, the last 15
    /// minutes, top statements and their plans; polls every second).
    ///
    /// On SIGTERM or SIGINT: /readyz answers 503 at once, everything is still
    /// served for a fifth of RAILYARD_SHUTDOWN_TIMEOUT (at most 2 s) so that
    /// load balancers see it, then the listener closes, requests in flight
    /// finish, the database drains (Database::close) and the process exits 0,
    /// all within RAILYARD_SHUTDOWN_TIMEOUT (default 10 s).
    Serve {
        /// Address to listen on (loopback by default; port 0 picks a free one,
        /// printed on the first line).
        #[arg(long, default_value = "127.0.0.1:9187")]
        addr: std::net::SocketAddr,
        /// Alert rules (TOML; see crates/railyard-ops/alerts.example.toml). Default: the
        /// built-in rules, notified as log events. Also RAILYARD_ALERTS.
        #[arg(long, env = "RAILYARD_ALERTS", value_name = "FILE")]
        alerts: Option<std::path::PathBuf>,
    },
    /// Drive a trading day through the crate: traders place orders on
    /// Zipf-popular symbols, a matcher crosses them in SERIALIZABLE
    /// transactions, portfolios and books are read through sessions on the
    /// replica. Open loop (latency from each operation's intended start).
    /// Prints a report per operation, writes report.json and report.html, and
    /// checks the ledger's invariants at the end (exit 1 if one fails).
    Load(LoadArgs),
    /// Check the ledger's invariants (exit 1 if one fails); `--repair`
    /// recomputes positions, filled quantities and statuses from the trades.
    Check {
        /// Recompute the derived data from the trades in one transaction,
        /// report what changed, then check again.
        #[arg(long)]
        repair: bool,
    },
    /// Run the ledger's retention once: make the monthly partitions of
    /// trades ahead, move the months past the retention period (and the
    /// closed orders only they reference) to the railyard_archive schema,
    /// record each in railyard_retention_audit, and print the sizes before
    /// and after. Another instance running it at the same time makes this
    /// one skip (exit 0, said on stdout).
    Retain {
        /// List what would be archived; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// The retention period (`90d`); default RAILYARD_RETENTION, else 90d.
        #[arg(long, value_name = "PERIOD")]
        retention: Option<String>,
    },
    /// List this application's running statements (its application_name),
    /// longest first: duration, state, wait event, blocking pids, shape.
    Queries {
        /// Every client backend of the database, not only this application's.
        #[arg(long)]
        all: bool,
    },
    /// Advise indexes from the statements every client ran
    /// (pg_stat_statements), each proved with a hypothetical index (hypopg);
    /// report unused, duplicate and redundant indexes, tables read mostly by
    /// sequential scans, SELECT * on wide tables and deep OFFSET paging.
    Advise {
        /// Also write the verified indexes as diesel migrations with this
        /// name (one per index, run_in_transaction = false).
        #[arg(long, value_name = "NAME")]
        migration: Option<String>,
        /// Where --migration writes.
        #[arg(long, default_value = "migrations")]
        dir: std::path::PathBuf,
        /// Keep an index only when it makes the statement's estimated cost
        /// this many times cheaper.
        #[arg(long, default_value_t = 2.0)]
        min_cost_factor: f64,
        /// Tables with fewer estimated rows get no index advice.
        #[arg(long, default_value_t = 10_000)]
        min_rows: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print notifications on these channels as JSON lines, and a gap
    /// marker (`{"gap": …}`) each time the connection was lost and is back:
    /// notifications sent in between were missed.
    Listen {
        /// The channels (LISTEN).
        #[arg(required = true)]
        channels: Vec<String>,
    },
    /// Print row changes of these tables as JSON lines with their resume
    /// tokens, from a logical replication slot (created when missing).
    /// Each transaction is acknowledged once printed; start again after a
    /// printed token with --from.
    Changes {
        /// The tables, separated by commas.
        #[arg(long, value_delimiter = ',', required_unless_present = "drop_slot")]
        tables: Vec<String>,
        /// The slot (and publication railyard_SLOT).
        #[arg(long, default_value = "railyard_cli")]
        slot: String,
        /// Start after this token (the last one you handled).
        #[arg(long, value_name = "TOKEN")]
        from: Option<String>,
        /// Drop the slot and its publication, and exit.
        #[arg(long)]
        drop_slot: bool,
    },
    /// Send a notification (NOTIFY) on a channel.
    Notify {
        /// The channel.
        channel: String,
        /// The payload (fewer than 8,000 bytes).
        #[arg(default_value = "")]
        payload: String,
    },
    /// Manage the ledger's migrations.
    Migrate {
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// Backups of the local cluster with pgBackRest: set up, take, list,
    /// prove with a restore drill, restore to a point in time.
    Backup {
        #[command(subcommand)]
        action: BackupAction,
    },
    /// Manage the local PostgreSQL cluster.
    Local {
        #[command(subcommand)]
        action: LocalAction,
    },
    /// Manage a pg_auto_failover formation on loopback (monitor, primary, standby).
    Ha {
        #[command(subcommand)]
        action: HaAction,
    },
}

#[derive(clap::Args)]
struct LoadArgs {
    /// Traders, each with an account and a session.
    #[arg(long, default_value_t = 100)]
    traders: usize,
    /// Listed symbols; popularity follows a Zipf law (s = 1.1).
    #[arg(long, default_value_t = 50)]
    symbols: usize,
    /// How long to run (e.g. `60s`, `5m`); default 30 s unless --orders is given.
    #[arg(long)]
    duration: Option<humantime::Duration>,
    /// Stop after this many orders were placed.
    #[arg(long)]
    orders: Option<u64>,
    /// Operations started per second (open loop; a Poisson arrival process).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Operations in flight at most; also the primary pool's size.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// The plan's seed: the same seed gives the same operations (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Pause the replica's WAL replay from a quarter to half of the run.
    #[arg(long)]
    pause_replica: bool,
    /// Restart the local cluster's primary (immediate mode) at half of the run.
    #[arg(long)]
    restart_primary: bool,
    /// Run at 20× the rate for 10 s from a third of the run.
    #[arg(long)]
    burst: bool,
    /// Replay the same plan with a raw tokio-postgres client (naive retries,
    /// reads on the primary) and print the ratios; also run pgbench.
    #[arg(long, value_enum)]
    compare: Option<Compare>,
    /// Where report.json and report.html are written.
    #[arg(long, default_value = "target/railyard-load")]
    out: std::path::PathBuf,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
    /// Serve the live dashboard of the run's own database on this address
    /// while it runs (port 0 picks a free one; the URL is printed).
    #[arg(long, value_name = "ADDR")]
    dashboard: Option<std::net::SocketAddr>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Compare {
    /// A hand-written raw tokio-postgres client.
    Raw,
}

#[derive(Subcommand)]
enum MigrateAction {
    /// List every version: applied (with checksum state), pending, unknown.
    Status,
    /// Apply pending migrations.
    Run,
    /// Revert the most recently applied migration.
    Revert,
    /// Check applied migrations against the binary without running anything.
    Verify,
    /// Development: revert the newest migration with this binary's down.sql and
    /// apply its up.sql again, recording its new checksum (its data is lost).
    Redo,
    /// Record this binary's checksum for the newest migration, edited and redone
    /// by other means (`diesel migration redo`); runs no migration SQL.
    Repair,
    /// List the migrations embedded in this binary (no database needed).
    Embedded,
}

#[derive(Subcommand)]
enum BackupAction {
    /// Turn WAL archiving on (restarts the local primary once; the replica
    /// follows), write the pgBackRest configuration and repository inside the
    /// cluster's directory, create the stanza and check it.
    Init,
    /// Take a backup, then a counted restore point (row counts of every
    /// table, for the drill to compare against).
    Run {
        /// full, incr (changed since the last backup) or diff (since the last full).
        #[arg(long = "type", default_value = "full", value_name = "TYPE")]
        kind: String,
    },
    /// List the backups: label, type, start and stop, sizes, WAL range.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Restore drill: restore the newest backup (or --set) into a scratch
    /// instance, recover to its counted restore point, promote, run the
    /// ledger's invariants and compare every table's rows, then remove it.
    /// Exit 1 when it fails.
    Verify {
        /// The backup's label (see `backup list`).
        #[arg(long, value_name = "LABEL")]
        set: Option<String>,
    },
    /// Point-in-time recovery into a scratch instance; report the last
    /// transaction it holds. Removed afterwards unless --keep.
    Restore {
        /// The target time, RFC 3339 (e.g. 2025-01-31T12:00:00.123Z).
        #[arg(long, value_name = "TIME")]
        to_time: String,
        /// Leave the instance running; print its URL and how to remove it.
        #[arg(long)]
        keep: bool,
    },
    /// Stop and remove a scratch instance left by `restore --keep`.
    Discard {
        /// Its name, as `restore --keep` printed it.
        name: String,
    },
}

#[derive(Subcommand)]
enum LocalAction {
    /// Start (or join) the cluster and print its URLs (passwords redacted).
    Start,
    /// Stop the cluster's servers (data is kept: the next start is warm).
    Stop,
    /// Say whether the cluster runs, and where.
    Status,
    /// Print DATABASE_URL and DATABASE_REPLICA_URLS lines, for `eval` or a .env file.
    Env {
        /// The database (created when missing); defaults to `railyard`.
        dbname: Option<String>,
    },
    /// Reclaim what test runs left: scratch databases and private clusters of
    /// dead runs, and harness templates not prepared recently; print the space freed.
    Gc {
        /// Keep harness templates prepared within this long (e.g. `10m`, `0s`).
        #[arg(long, default_value = "10m")]
        template_idle: humantime::Duration,
    },
}

#[derive(Subcommand)]
enum HaAction {
    /// Create (or start, or join) the formation and print its nodes.
    Start,
    /// Stop its pg_autoctl services (data is kept: the next start is warm).
    Stop,
    /// Print the nodes' states as the monitor sees them, and its latest events.
    Status,
    /// Print the formation's URL as `pg_autoctl show uri --formation default` prints it.
    Uri,
    /// Print DATABASE_URL and DATABASE_REPLICA_URLS lines (with the password), for `eval`.
    Env,
    /// `pg_autoctl perform failover`, then print the nodes' states.
    Failover,
    /// Stop the formation and remove its directory.
    Destroy,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_init();
    let cli = Cli::parse();
    match run(cli.command.unwrap_or(Command::Boot)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

fn tracing_init() {
    // Plain stderr output of warnings; RUST_LOG is honoured when set.
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber_init(&filter);
}

fn tracing_subscriber_init(filter: &str) -> Result<(), String> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, filter::Targets};
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_new(filter).map_err(|e| e.to_string())?);
    // The load command's per-operation retry counts, whatever RUST_LOG says.
    let retries = app::load::engine::RetryLayer
        .with_filter(Targets::new().with_target("railyard::retry", tracing::Level::INFO));
    tracing_subscriber::registry()
        .with(logs)
        .with(retries)
        .try_init()
        .map_err(|e| e.to_string())
}

/// The config from the environment; when DATABASE_URL is unset (development
/// and test profiles), the local cluster's, started or joined here so that the
/// report can say how.
async fn config() -> Result<(Config, Option<LocalCluster>), app::AppError> {
    let config = Config::from_env()?;
    if config.local_database().is_none() {
        return Ok((config, None));
    }
    let cluster = LocalCluster::shared().await?;
    let config = cluster.resolve(config).await?;
    Ok((config, Some(cluster)))
}

/// The ledger's migrator. On the local cluster, a risky migration is backed
/// up with pgBackRest once `railyard backup init` was run, else with
/// `pg_dump` into `RAILYARD_MIGRATION_BACKUP_DIR` when set, else into the
/// cluster's `backup/dumps`: a fresh local cluster always boots. With
/// DATABASE_URL pointing elsewhere, `pg_dump` into
/// `RAILYARD_MIGRATION_BACKUP_DIR`, or the risky migration is refused.
async fn migrator(
    config: &Config,
    cluster: Option<&LocalCluster>,
) -> Result<Migrator, app::AppError> {
    let migrator = Migrator::new(MIGRATIONS);
    let Some(cluster) = cluster else {
        return Ok(migrator);
    };
    let db = config.primary().dbname().unwrap_or("railyard").to_owned();
    let backups = railyard_ops::backup::local::LocalBackups::new(cluster, &db)?;
    let how = match backups.before_risky().await? {
        railyard::migrate::BeforeRisky::PgDump { .. }
            if std::env::var_os(railyard::migrate::BACKUP_DIR_VAR)
                .is_some_and(|v| !v.is_empty()) =>
        {
            return Ok(migrator);
        }
        how => how,
    };
    Ok(migrator.backup_before_risky(how))
}

async fn run(command: Command) -> Result<(), app::AppError> {
    match command {
        Command::Boot => Ok(boot().await?),
        Command::Serve { addr, alerts } => Ok(serve(addr, alerts).await?),
        Command::Load(args) => load(args).await,
        Command::Check { repair } => check(repair).await,
        Command::Retain { dry_run, retention } => retain(dry_run, retention).await,
        Command::Queries { all } => Ok(queries(all).await?),
        Command::Advise {
            migration,
            dir,
            min_cost_factor,
            min_rows,
            json,
        } => Ok(advise(migration, dir, min_cost_factor, min_rows, json).await?),
        Command::Listen { channels } => Ok(listen(channels).await?),
        Command::Changes {
            tables,
            slot,
            from,
            drop_slot,
        } => Ok(changes(tables, slot, from, drop_slot).await?),
        Command::Notify { channel, payload } => {
            let (config, _cluster) = config().await?;
            let db = Database::connect(config.pool_max_size(1)).await?;
            db.notify(&channel, &payload).await?;
            db.close(std::time::Duration::from_secs(2)).await;
            Ok(())
        }
        Command::Migrate { action } => Ok(migrate(action).await?),
        Command::Backup { action } => backup(action).await,
        Command::Local { action } => Ok(local(action).await?),
        Command::Ha { action } => Ok(ha(action).await?),
    }
}

/// Boots the ledger database for a command that works on its data.
async fn ledger_db(pool: Option<u32>) -> Result<(Database, Option<LocalCluster>), app::AppError> {
    ledger_db_with(pool, None).await
}

/// Boots the ledger database, with `stats` as a hook when given.
async fn ledger_db_with(
    pool: Option<u32>,
    stats: Option<railyard::StatementStats>,
) -> Result<(Database, Option<LocalCluster>), app::AppError> {
    let (mut config, cluster) = config().await?;
    if let Some(n) = pool {
        config = config.pool_max_size(n);
    }
    let migrator = migrator(&config, cluster.as_ref()).await?;
    let mut builder = Database::builder(config).migrations(migrator);
    if let Some(stats) = stats {
        builder = builder.hook(stats);
    }
    Ok((builder.connect().await?, cluster))
}

async fn load(args: LoadArgs) -> Result<(), app::AppError> {
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

fn print_verdicts(verdicts: &[app::check::Verdict]) {
    for v in verdicts {
        out!(
            "{} {:<24} {:>6}  {}{}",
            if v.passed() { "pass" } else { "FAIL" },
            v.name,
            v.violations,
            v.meaning,
            if v.detail.is_empty() || (v.passed() && v.name != "money_conserved") {
                String::new()
            } else {
                format!(" [{}]", v.detail)
            }
        );
    }
}

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

async fn retain(dry_run: bool, period: Option<String>) -> Result<(), app::AppError> {
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

async fn check(repair: bool) -> Result<(), app::AppError> {
    let (db, _cluster) = ledger_db(None).await?;
    if repair {
        let r = app::check::repair(&db).await?;
        out!(
            "repair            positions {}, fills {}, statuses {} recomputed from trades; {} over-filled order(s) left (trades exceed the quantity)",
            r.positions,
            r.fills,
            r.statuses,
            r.overfilled
        );
    }
    let verdicts = app::check::check(&db).await?;
    print_verdicts(&verdicts);
    db.close(db.config().shutdown_deadline()).await;
    let failed: Vec<_> = verdicts
        .iter()
        .filter(|v| !v.passed())
        .map(|v| v.name)
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(app::AppError::Failed(format!(
            "broken: {}",
            failed.join(", ")
        )))
    }
}

async fn advise(
    migration: Option<String>,
    dir: std::path::PathBuf,
    min_cost_factor: f64,
    min_rows: u64,
    json: bool,
) -> Result<(), app::AppError> {
    let (config, _cluster) = config().await?;
    let db = Database::connect(config.pool_max_size(2).replica_pool_max_size(1)).await?;
    let advice = railyard_ops::advise::Advisor::new(&db)
        .min_cost_factor(min_cost_factor)
        .min_table_rows(min_rows)
        .run()
        .await?;
    if json {
        println!("{}", advice.to_json());
    } else {
        print!("{advice}");
    }
    if let Some(name) = migration {
        for path in advice.write_migrations(&dir, &name)? {
            eprintln!("wrote {}", path.display());
        }
    }
    db.close(std::time::Duration::from_secs(2)).await;
    Ok(())
}

async fn changes(
    tables: Vec<String>,
    slot: String,
    from: Option<String>,
    drop_slot: bool,
) -> Result<(), app::AppError> {
    use std::io::Write;
    let (config, _cluster) = config().await?;
    let db = Database::connect(config.pool_max_size(1)).await?;
    if drop_slot {
        let existed = db.drop_change_slot(&slot).await?;
        eprintln!(
            "slot {slot} {}",
            if existed { "dropped" } else { "did not exist" }
        );
        db.close(std::time::Duration::from_secs(2)).await;
        return Ok(());
    }
    let mut cfg = railyard_events::ChangeStreamConfig::new(&slot, tables);
    if let Some(t) = from {
        cfg = cfg.from(t.parse()?);
    }
    let mut stream = db.changes(cfg).await?;
    let mut signals = StopSignals::new()?;
    let result = loop {
        let event = tokio::select! {
            e = stream.next() => e,
            _ = signals.next() => None,
        };
        let event = match event {
            None => break Ok(()),
            Some(Err(e)) => break Err(e),
            Some(Ok(e)) => e,
        };
        let line = serde_json::to_string(&event).unwrap_or_default();
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break Ok(());
        }
        // Printed: handled, as far as this command goes.
        stream.ack(&event.token);
    };
    drop(stream);
    db.close(std::time::Duration::from_secs(2)).await;
    result.map_err(Into::into)
}

async fn listen(channels: Vec<String>) -> Result<(), app::AppError> {
    use std::io::Write;
    let (config, _cluster) = config().await?;
    let db = Database::connect(config.pool_max_size(1)).await?;
    let mut listener = db.listen(channels).await?;
    let mut signals = StopSignals::new()?;
    loop {
        let event = tokio::select! {
            e = listener.next() => e,
            _ = signals.next() => None,
        };
        let Some(event) = event else { break };
        let line = serde_json::to_string(&event).unwrap_or_default();
        let mut out = std::io::stdout().lock();
        // A closed pipe (`railyard listen … | head`) ends the command.
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    drop(listener);
    db.close(std::time::Duration::from_secs(2)).await;
    Ok(())
}

async fn queries(all: bool) -> Result<(), app::AppError> {
    use diesel::sql_types::{BigInt, Integer, Text};
    #[derive(QueryableByName)]
    struct Running {
        #[diesel(sql_type = Integer)]
        pid: i32,
        #[diesel(sql_type = Text)]
        application_name: String,
        #[diesel(sql_type = Text)]
        state: String,
        #[diesel(sql_type = BigInt)]
        running_ms: i64,
        #[diesel(sql_type = Text)]
        wait: String,
        #[diesel(sql_type = Text)]
        blocked_by: String,
        #[diesel(sql_type = Text)]
        query: String,
    }
    let (config, _cluster) = config().await?;
    let name = config.effective_application_name().to_owned();
    let db = Database::connect(config.pool_max_size(1)).await?;
    let mut conn = db.primary().await?;
    let rows: Vec<Running> = diesel::sql_query(
        "SELECT pid, coalesce(application_name, '') AS application_name, coalesce(state, '') AS state, \
           coalesce((extract(epoch FROM clock_timestamp() - query_start) * 1000)::bigint, 0) AS running_ms, \
           coalesce(wait_event_type || ':' || wait_event, '') AS wait, \
           array_to_string(pg_blocking_pids(pid), ',') AS blocked_by, coalesce(query, '') AS query \
         FROM pg_stat_activity \
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND datname = current_database() \
           AND state <> 'idle' AND ($1 OR application_name = $2) \
         ORDER BY query_start",
    )
    .bind::<diesel::sql_types::Bool, _>(all)
    .bind::<Text, _>(&name)
    .load(&mut **conn)
    .await?;
    drop(conn);
    out!(
        "{:>7} {:>10} {:<20} {:<24} {:<10} statement",
        "pid",
        "running",
        "state",
        "wait",
        "blocked by"
    );
    for r in &rows {
        out!(
            "{:>7} {:>8}ms {:<20} {:<24} {:<10} {}{}",
            r.pid,
            r.running_ms,
            r.state,
            r.wait,
            r.blocked_by,
            if all {
                format!("[{}] ", r.application_name)
            } else {
                String::new()
            },
            railyard::observe::statement_shape(r.query.trim())
        );
    }
    if rows.is_empty() {
        out!(
            "(no running statements of {})",
            if all { "any client" } else { name.as_str() }
        );
    }
    db.close(std::time::Duration::from_secs(5)).await;
    Ok(())
}

async fn boot() -> Result<(), app::AppError> {
    let started = Instant::now();
    let (config, cluster) = config().await?;
    if let Some(c) = &cluster {
        out!(
            "local cluster     {:?} in {:.2?} ({})",
            c.started(),
            c.start_time(),
            c.dir().display()
        );
    }
    out!("primary           {}", config.primary());
    let migrator = migrator(&config, cluster.as_ref()).await?;
    let db = Database::builder(config)
        .migrations(migrator)
        .connect()
        .await?;
    let info = {
        let conn = db.primary().await?;
        conn.info().clone()
    };
    out!("server            PostgreSQL {}", info.server_version);
    out!(
        "connection        {}:{} pid {} ({:?}), TLS {}",
        info.host,
        info.port,
        info.backend_pid,
        info.role,
        if info.tls { "on" } else { "off" }
    );
    if let Some(report) = db.migration_report() {
        out!(
            "migrations        {} applied now, {} already applied; lock wait {:.2?}, run {:.2?}",
            report.applied.len(),
            report.already_applied,
            report.lock_wait,
            report.total
        );
        for m in &report.applied {
            out!("  applied         {} in {:.2?}", m.name, m.duration);
        }
        for v in &report.adopted {
            out!("  adopted         {v} (applied earlier without a checksum)");
        }
    }
    let mut conn = db.primary().await?;
    let users: i64 = schema::users::table.count().get_result(&mut **conn).await?;
    let accounts: i64 = schema::accounts::table
        .count()
        .get_result(&mut **conn)
        .await?;
    drop(conn);
    out!("ledger            {users} users, {accounts} accounts");
    for p in db.pool_status() {
        out!(
            "pool {:<12} {} open ({} idle) of {}, {} checkouts",
            p.name,
            p.connections,
            p.idle,
            p.max_size,
            p.gets
        );
    }
    for r in db.replica_report().await {
        match r.state {
            ReplicaState::Reachable {
                role,
                streaming,
                lag_bytes,
                replay_delay,
                ..
            } => out!(
                "replica           {} {:?}, {}, lag {} bytes{}",
                r.target,
                role,
                if streaming {
                    "streaming"
                } else {
                    "NOT streaming"
                },
                lag_bytes
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "unknown".into()),
                replay_delay
                    .map(|d| format!(", last replayed commit {d:.1?} ago"))
                    .unwrap_or_default()
            ),
            ReplicaState::Unreachable { error, .. } => {
                out!("replica           {} unreachable: {error}", r.target)
            }
            _ => out!("replica           {} in an unknown state", r.target),
        }
    }
    out!(
        "boot              {:.2?} (database handle {:.2?})",
        started.elapsed(),
        db.boot_time()
    );
    Ok(())
}

async fn serve(
    addr: std::net::SocketAddr,
    alerts: Option<std::path::PathBuf>,
) -> Result<(), app::AppError> {
    use std::time::Duration;
    let (config, cluster) = config().await?;
    let timeout = config.shutdown_deadline();
    // From here on, SIGTERM and SIGINT start a drain instead of killing the
    // process (later ones are ignored: the timeout bounds the drain).
    let mut signals = StopSignals::new()?;
    // The rules first: a bad file stops the start before anything connects.
    let rules = match &alerts {
        Some(path) => railyard_ops::alert::AlertConfig::from_file(path)?,
        None => railyard_ops::alert::AlertConfig::builtin(),
    };
    let alerts = railyard_ops::alert::Alerts::new(rules);
    // Retention runs inside the process when RAILYARD_RETENTION is set.
    let retention = match railyard_ops::retain::RetentionConfig::from_env()? {
        Some(c) => Some(app::retain::ledger(c)?),
        None => None,
    };
    let stats = railyard::StatementStats::new();
    let migrator = migrator(&config, cluster.as_ref()).await?;
    let db = Database::builder(config)
        .migrations(migrator)
        .hook(railyard::SlowQueryLog::new(Duration::from_millis(100)))
        .hook(railyard::AuditLog)
        .hook(railyard::QuerySpans)
        .hook(stats.clone())
        .hook(alerts.statement_hook())
        .connect()
        .await?;
    // Samples every second, fifteen minutes kept: what the dashboard draws.
    let watcher = railyard_ops::watch::Watcher::spawn(
        db.clone(),
        railyard_ops::watch::WatchOptions {
            statements: Some(stats),
            ..railyard_ops::watch::WatchOptions::default()
        },
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| app::AppError::Io {
            context: format!("cannot listen on {addr}"),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| app::AppError::Io {
        context: "the listener's address".into(),
        source,
    })?;
    let readiness = railyard_http::Readiness::new();
    let retention = retention.map(|r| railyard_ops::retain::RetentionJob::spawn(db.clone(), r));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    alerts.watch(&watcher);
    let app = railyard_http::router_with_dashboard(
        db.clone(),
        readiness.clone(),
        watcher,
        Some(railyard_http::alerts_router(alerts)),
    );
    let mut server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .into_future(),
    );
    out!("serving /healthz /readyz /health /metrics /alerts on http://{addr}");
    out!("dashboard on http://{addr}/");
    let signal = tokio::select! {
        ended = &mut server => return http_ended(ended),
        signal = signals.next() => signal,
    };
    // The budget: announce, stop accepting and finish the requests in flight,
    // then close the database, which may overrun its deadline by CLOSE_GRACE.
    let started = tokio::time::Instant::now();
    let end = started + timeout.saturating_sub(railyard::database::CLOSE_GRACE.min(timeout / 2));
    readiness.drain();
    out!(
        "{signal}: /readyz answers 503; draining, exit within {}",
        humantime::format_duration(timeout)
    );
    let announce = (timeout / 5).min(Duration::from_secs(2));
    tokio::select! {
        ended = &mut server => return http_ended(ended),
        () = tokio::time::sleep(announce) => {}
    }
    let _ = stop.send(());
    match tokio::time::timeout_at(end, &mut server).await {
        Ok(ended) => http_ended(ended)?,
        Err(_) => {
            server.abort();
            out!("HTTP requests still in flight at the deadline were dropped");
        }
    }
    out!("HTTP server stopped after {:.2?}", started.elapsed());
    if let Some(job) = retention {
        job.shutdown(end.saturating_duration_since(tokio::time::Instant::now()) / 2)
            .await;
    }
    let report = db
        .close(end.saturating_duration_since(tokio::time::Instant::now()))
        .await;
    out!("database closed: {report}");
    out!("stopped in {:.2?}", started.elapsed());
    Ok(())
}

/// How the HTTP server's task ended.
fn http_ended(
    ended: Result<std::io::Result<()>, tokio::task::JoinError>,
) -> Result<(), app::AppError> {
    let io = |source| app::AppError::Io {
        context: "HTTP server".into(),
        source,
    };
    match ended {
        Ok(r) => r.map_err(io),
        Err(e) => Err(io(std::io::Error::other(e.to_string()))),
    }
}

/// SIGTERM and SIGINT, the signals that stop `serve`.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> Result<Self, app::AppError> {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind, name: &str| {
            signal(kind).map_err(|source| app::AppError::Io {
                context: format!("cannot handle {name}"),
                source,
            })
        };
        Ok(StopSignals {
            term: listen(SignalKind::terminate(), "SIGTERM")?,
            int: listen(SignalKind::interrupt(), "SIGINT")?,
        })
    }

    /// The next stop signal's name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

async fn migrate(action: MigrateAction) -> Result<(), app::AppError> {
    let migrator = Migrator::new(MIGRATIONS);
    if let MigrateAction::Embedded = action {
        for (version, name) in migrator.versions()? {
            out!("{version:<16} {name}");
        }
        return Ok(());
    }
    let (config, cluster) = config().await?;
    let migrator = match action {
        MigrateAction::Run => self::migrator(&config, cluster.as_ref()).await?,
        _ => migrator,
    };
    match action {
        MigrateAction::Status => {
            for row in migrator.status(&config).await? {
                let state = match row.state {
                    MigrationState::Applied { checksum, duration } => format!(
                        "applied ({}){}",
                        match checksum {
                            ChecksumState::Verified => "checksum ok",
                            ChecksumState::Edited => "EDITED since applied",
                            ChecksumState::Unrecorded => "no checksum yet",
                            _ => "checksum state unknown to this CLI",
                        },
                        duration.map(|d| format!(" in {d:.2?}")).unwrap_or_default()
                    ),
                    MigrationState::Pending => "pending".into(),
                    MigrationState::Unknown => "UNKNOWN to this binary".into(),
                    MigrationState::Orphaned => {
                        "ORPHANED: in railyard_schema_migrations only".into()
                    }
                    _ => "in a state this CLI does not know".into(),
                };
                let backup = match (&row.backup, row.risky) {
                    (Some(b), _) => format!(
                        "  backup: {} {} at {}{}",
                        b.kind,
                        b.location,
                        chrono::DateTime::<chrono::Utc>::from(b.taken_at)
                            .format("%Y-%m-%d %H:%M:%S%.3f UTC"),
                        b.bytes.map(|n| format!(" ({n} bytes)")).unwrap_or_default()
                    ),
                    (None, true) => "  risky: backup before applying".into(),
                    (None, false) => String::new(),
                };
                out!("{:<16} {:<45} {state}{backup}", row.version, row.name);
            }
        }
        MigrateAction::Run => {
            let report = migrator.run(&config).await?;
            for m in &report.applied {
                out!("applied {} in {:.2?}", m.name, m.duration);
            }
            out!(
                "{} applied, {} already applied ({:.2?})",
                report.applied.len(),
                report.already_applied,
                report.total
            );
        }
        MigrateAction::Revert => match migrator.revert_last(&config).await? {
            Some(v) => out!("reverted {v}"),
            None => out!("nothing to revert"),
        },
        MigrateAction::Redo => match migrator.redo_last(&config).await? {
            Some(v) => out!("redid {v}: reverted and applied again"),
            None => out!("nothing to redo"),
        },
        MigrateAction::Repair => match migrator.repair_last(&config).await? {
            Some(v) => out!("recorded the new checksum of {v}"),
            None => out!("nothing to repair: the newest migration matches this binary"),
        },
        MigrateAction::Embedded => unreachable!("answered above without a database"),
        MigrateAction::Verify => {
            let pending = migrator.verify(&config).await?;
            out!(
                "applied migrations match this binary; {} pending{}",
                pending.len(),
                if pending.is_empty() {
                    String::new()
                } else {
                    format!(": {}", pending.join(", "))
                }
            );
        }
    }
    Ok(())
}

async fn local(action: LocalAction) -> Result<(), app::AppError> {
    match action {
        LocalAction::Start => {
            let c = LocalCluster::shared().await?;
            out!(
                "{:?} in {:.2?} ({})",
                c.started(),
                c.start_time(),
                c.dir().display()
            );
            out!("primary  {}", c.primary_target("railyard"));
            if let Some(r) = c.replica_target("railyard") {
                out!("replica  {r}");
            }
        }
        LocalAction::Stop => {
            stop_dir(&default_cluster_dir())?;
            out!("stopped");
        }
        LocalAction::Status => match LocalCluster::running(None).await? {
            Some(c) => {
                out!("running in {}", c.dir().display());
                out!("primary  {}", c.primary_target("railyard"));
                if let Some(r) = c.replica_target("railyard") {
                    out!("replica  {r}");
                }
            }
            None => out!("not running ({})", default_cluster_dir().display()),
        },
        LocalAction::Gc { template_idle } => {
            let c = LocalCluster::shared().await?;
            let report = c.gc(template_idle.into()).await?;
            for (name, bytes) in report.databases.iter().chain(&report.templates) {
                out!("dropped {name:<48} {:>8.1} MB", *bytes as f64 / 1e6);
            }
            for (dir, bytes) in &report.clusters {
                out!(
                    "removed {:<48} {:>8.1} MB",
                    dir.display(),
                    *bytes as f64 / 1e6
                );
            }
            out!(
                "freed {:.1} MB ({} databases, {} templates, {} clusters)",
                report.bytes() as f64 / 1e6,
                report.databases.len(),
                report.templates.len(),
                report.clusters.len()
            );
        }
        LocalAction::Env { dbname } => {
            let c = LocalCluster::shared().await?;
            let lines = match dbname {
                Some(db) => {
                    c.create_database(&db).await?;
                    c.env_lines_for(&db)
                }
                None => c.env_lines(),
            };
            out!("{}", lines.trim_end());
        }
    }
    Ok(())
}

async fn ha(action: HaAction) -> Result<(), app::AppError> {
    use railyard_local::ha::{Formation, default_formation_dir};
    let running = || async {
        Formation::running(None).await?.ok_or_else(|| {
            railyard_local::Error::Local(format!(
                "no formation runs in {} (start one with `scripts/ha start`)",
                default_formation_dir().display()
            ))
        })
    };
    let print_nodes = |f: &Formation| {
        let f = f.clone();
        async move {
            for n in f.nodes().await? {
                out!(
                    "{:<6} 127.0.0.1:{:<5}  {:>12} (assigned {}){}",
                    n.name,
                    n.port,
                    n.reported,
                    n.assigned,
                    if n.healthy == Some(false) {
                        "  unhealthy"
                    } else {
                        ""
                    }
                );
            }
            Ok::<_, app::AppError>(())
        }
    };
    match action {
        HaAction::Start => {
            let f = Formation::builder().start().await?;
            out!(
                "{:?} in {:.2?} ({})",
                f.started(),
                f.start_time(),
                f.dir().display()
            );
            print_nodes(&f).await?;
            out!("uri    {}", f.uri().await?);
        }
        HaAction::Stop => {
            railyard_local::ha::stop_dir(&default_formation_dir())?;
            out!("stopped");
        }
        HaAction::Status => match Formation::running(None).await? {
            Some(f) => {
                out!("running in {}", f.dir().display());
                print_nodes(&f).await?;
                for e in f.events(8).await? {
                    out!("  {e}");
                }
            }
            None => out!("not running ({})", default_formation_dir().display()),
        },
        HaAction::Uri => out!("{}", running().await?.uri().await?),
        HaAction::Env => out!("{}", running().await?.env_lines().await?.trim_end()),
        HaAction::Failover => {
            let f = running().await?;
            let started = Instant::now();
            f.perform_failover(std::time::Duration::from_secs(120))
                .await?;
            out!("failover done in {:.2?}", started.elapsed());
            print_nodes(&f).await?;
        }
        HaAction::Destroy => {
            let dir = default_formation_dir();
            if dir.exists() {
                railyard_local::ha::destroy_dir(&dir)?;
                out!("removed {}", dir.display());
            } else {
                out!("nothing to remove ({})", dir.display());
            }
        }
    }
    Ok(())
}

/// The local cluster's backups, for the `backup` commands.
async fn local_backups() -> Result<
    (
        railyard_ops::backup::local::LocalBackups,
        LocalCluster,
        Config,
    ),
    app::AppError,
> {
    let (config, cluster) = config().await?;
    let Some(cluster) = cluster else {
        return Err(app::AppError::Usage(
            "`railyard backup` drives the local cluster, and DATABASE_URL points elsewhere; unset it, or see docs/backups.md (\"On your own server\") for what to set up there".into(),
        ));
    };
    let db = config.primary().dbname().unwrap_or("railyard").to_owned();
    Ok((
        railyard_ops::backup::local::LocalBackups::new(&cluster, &db)?,
        cluster,
        config,
    ))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1_048_576.0)
}

async fn backup(action: BackupAction) -> Result<(), app::AppError> {
    use railyard_ops::backup::local::{CheckOutcome, Checks};
    use railyard_ops::backup::pgbackrest::BackupType;
    let (backups, _cluster, config) = local_backups().await?;
    match action {
        BackupAction::Init => {
            let r = backups.init().await?;
            out!(
                "backups enabled in {:.2?}: config {}, repository {}, stanza {}; primary {}",
                r.took,
                r.config.display(),
                r.repo.display(),
                railyard_ops::backup::local::STANZA,
                if r.restarted {
                    "restarted with archive_mode=on (the replica streams again)"
                } else {
                    "already archiving"
                }
            );
        }
        BackupAction::Run { kind } => {
            let kind: BackupType = kind.parse()?;
            let r = backups.run(kind).await?;
            out!(
                "backup {} ({}) in {:.2?}: {} of the cluster, {} copied, {} in the repository (+{}), WAL {}..{}",
                r.set.label,
                r.set.kind,
                r.backup_took,
                mib(r.set.size),
                mib(r.set.delta),
                mib(r.set.repo_size),
                mib(r.set.repo_delta),
                r.set.wal_start,
                r.set.wal_stop
            );
            out!(
                "restore point {} at {} in {:.2?}: {} rows in {} tables of {} counted",
                r.point.restore_point,
                r.point.lsn,
                r.point_took,
                r.point.counts.values().sum::<i64>(),
                r.point.counts.len(),
                r.point.database
            );
        }
        BackupAction::List { json } => {
            let sets = backups.list().await?;
            if json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&sets).unwrap_or_default()
                );
            } else {
                out!(
                    "{:<34} {:<5} {:<20} {:<20} {:>10} {:>10} {:>10}  WAL",
                    "label",
                    "type",
                    "start (UTC)",
                    "stop (UTC)",
                    "size",
                    "copied",
                    "repo"
                );
                for s in &sets {
                    out!(
                        "{:<34} {:<5} {:<20} {:<20} {:>10} {:>10} {:>10}  {}..{}",
                        s.label,
                        s.kind,
                        s.start.format("%Y-%m-%d %H:%M:%S"),
                        s.stop.format("%Y-%m-%d %H:%M:%S"),
                        mib(s.size),
                        mib(s.delta),
                        mib(s.repo_size),
                        s.wal_start,
                        s.wal_stop
                    );
                }
                out!("{} backup(s)", sets.len());
            }
        }
        BackupAction::Verify { set } => {
            let checks: Checks = Box::new(|config: Config| {
                Box::pin(async move {
                    let db = Database::connect(config.pool_max_size(2)).await?;
                    let verdicts = app::check::check(&db).await;
                    db.close(std::time::Duration::from_secs(2)).await;
                    Ok(verdicts?
                        .into_iter()
                        .map(|v| {
                            CheckOutcome::new(
                                format!("invariant {}", v.name),
                                v.passed(),
                                format!("{} violation(s) {}", v.violations, v.detail),
                            )
                        })
                        .collect())
                })
            });
            let r = backups.verify(set.as_deref(), checks).await?;
            out!(
                "drill of {} to {}",
                r.label.as_deref().unwrap_or("(no backup)"),
                r.target
            );
            for p in &r.phases {
                out!(
                    "phase {:<15} {:>8.2}s {}",
                    p.name,
                    p.took.as_secs_f64(),
                    if p.ok { "ok" } else { "FAILED" }
                );
            }
            for c in &r.checks {
                out!(
                    "{} {:<32} {}",
                    if c.passed { "pass" } else { "FAIL" },
                    c.name,
                    c.detail
                );
            }
            let total: f64 = r.phases.iter().map(|p| p.took.as_secs_f64()).sum();
            if r.passed() {
                out!("drill PASSED in {total:.2}s");
            } else {
                let why = r.error.clone().unwrap_or_else(|| {
                    let failed: Vec<&str> = r
                        .checks
                        .iter()
                        .filter(|c| !c.passed)
                        .map(|c| c.name.as_str())
                        .collect();
                    format!("checks failed: {}", failed.join(", "))
                });
                out!("drill FAILED in {total:.2}s: {why}");
                return Err(app::AppError::Failed(format!(
                    "restore drill failed: {why}"
                )));
            }
        }
        BackupAction::Restore { to_time, keep } => {
            let to = chrono::DateTime::parse_from_rfc3339(&to_time)
                .map_err(|e| {
                    app::AppError::Usage(format!(
                        "--to-time: {e}; give an RFC 3339 time such as 2025-01-31T12:00:00.123Z"
                    ))
                })?
                .with_timezone(&chrono::Utc);
            let (scratch, r) = backups.restore(to).await?;
            for p in &r.phases {
                out!("phase {:<15} {:>8.2}s ok", p.name, p.took.as_secs_f64());
            }
            match &r.last_xact {
                Some((xid, at)) => out!(
                    "recovered to {}: last committed transaction {xid} at {}",
                    r.target.format("%Y-%m-%dT%H:%M:%S%.6fZ"),
                    at.format("%Y-%m-%dT%H:%M:%S%.6fZ")
                ),
                None => out!(
                    "recovered to {}: no commit timestamp found (track_commit_timestamp was off when it committed)",
                    r.target.format("%Y-%m-%dT%H:%M:%S%.6fZ")
                ),
            }
            let db = config.primary().dbname().unwrap_or("railyard").to_owned();
            let newest = async {
                let client = scratch.client(&db).await?;
                let row = client
                    .query_one(
                        "SELECT (SELECT max(created_at)::text FROM orders), (SELECT max(created_at)::text FROM deposits), (SELECT max(executed_at)::text FROM trades), \
                                (SELECT count(*) FROM orders), (SELECT count(*) FROM deposits), (SELECT count(*) FROM trades)",
                        &[],
                    )
                    .await
                    .map_err(|e| railyard_ops::Error::Backup(format!("reading the restored ledger: {e}")))?;
                Ok::<_, app::AppError>(format!(
                    "newest ledger rows: order created {}, deposit {}, trade {} ({} orders, {} deposits, {} trades)",
                    row.get::<_, Option<String>>(0).unwrap_or_else(|| "-".into()),
                    row.get::<_, Option<String>>(1).unwrap_or_else(|| "-".into()),
                    row.get::<_, Option<String>>(2).unwrap_or_else(|| "-".into()),
                    row.get::<_, i64>(3),
                    row.get::<_, i64>(4),
                    row.get::<_, i64>(5)
                ))
            }
            .await;
            match newest {
                Ok(line) => out!("{line}"),
                Err(e) => out!("newest ledger rows: not read ({e})"),
            }
            if keep {
                out!("kept {} on port {}", scratch.name(), scratch.port());
                out!("url {}", scratch.target(&db));
                out!(
                    "(the password is the local cluster's: `railyard local env`); remove it with: railyard backup discard {}",
                    scratch.name()
                );
                scratch.keep();
            } else {
                let started = Instant::now();
                scratch.remove().await?;
                out!(
                    "phase {:<15} {:>8.2}s ok",
                    "teardown",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        BackupAction::Discard { name } => {
            backups.discard(&name).await?;
            out!("removed {name}");
        }
    }
    Ok(())
}
