//! The commands' implementations, one module per command (or family of
//! commands), and what they share: the configuration (the local cluster's
//! when DATABASE_URL is unset), the ledger's migrator and database, and the
//! stop signals.

use railyard::{Config, Database, Migrator};
use railyard_local::LocalCluster;

use crate::{MIGRATIONS, app};

pub(crate) mod advise;
pub(crate) mod backup;
pub(crate) mod boot;
pub(crate) mod check;
pub(crate) mod events;
pub(crate) mod ha;
pub(crate) mod load;
pub(crate) mod local;
pub(crate) mod migrate;
pub(crate) mod queries;
pub(crate) mod retain;
pub(crate) mod serve;

/// The config from the environment; when DATABASE_URL is unset (development
/// and test profiles), the local cluster's, started or joined here so that the
/// report can say how.
pub(crate) async fn config() -> Result<(Config, Option<LocalCluster>), app::AppError> {
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
pub(crate) async fn migrator(
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

/// Boots the ledger database for a command that works on its data.
pub(crate) async fn ledger_db(
    pool: Option<u32>,
) -> Result<(Database, Option<LocalCluster>), app::AppError> {
    ledger_db_with(pool, None).await
}

/// Boots the ledger database, with `stats` as a hook when given.
pub(crate) async fn ledger_db_with(
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

/// SIGTERM and SIGINT, the signals that stop `serve`.
pub(crate) struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub(crate) fn new() -> Result<Self, app::AppError> {
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
    pub(crate) async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
