//! The reference application (a small trading ledger) and Railyard's CLI.
//!
//! `cargo run` with no `DATABASE_URL` starts (or joins) the local
//! cluster, boots (migrations included) and prints a boot report.
//!
//! This file holds the command line (its clap types), `main` and the
//! dispatch; each command's implementation is in `cli/`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use diesel_migrations::{EmbeddedMigrations, embed_migrations};

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

// After `out!`, which the commands print with.
mod cli;

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

async fn run(command: Command) -> Result<(), app::AppError> {
    match command {
        Command::Boot => Ok(cli::boot::boot().await?),
        Command::Serve { addr, alerts } => Ok(cli::serve::serve(addr, alerts).await?),
        Command::Load(args) => cli::load::load(args).await,
        Command::Check { repair } => cli::check::check(repair).await,
        Command::Retain { dry_run, retention } => cli::retain::retain(dry_run, retention).await,
        Command::Queries { all } => Ok(cli::queries::queries(all).await?),
        Command::Advise {
            migration,
            dir,
            min_cost_factor,
            min_rows,
            json,
        } => Ok(cli::advise::advise(migration, dir, min_cost_factor, min_rows, json).await?),
        Command::Listen { channels } => Ok(cli::events::listen(channels).await?),
        Command::Changes {
            tables,
            slot,
            from,
            drop_slot,
        } => Ok(cli::events::changes(tables, slot, from, drop_slot).await?),
        Command::Notify { channel, payload } => cli::events::notify(channel, payload).await,
        Command::Migrate { action } => Ok(cli::migrate::migrate(action).await?),
        Command::Backup { action } => cli::backup::backup(action).await,
        Command::Local { action } => Ok(cli::local::local(action).await?),
        Command::Ha { action } => Ok(cli::ha::ha(action).await?),
    }
}
