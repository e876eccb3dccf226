//! The backup taken before a migration marked risky ([`Backup`], `take`) and
//! its record in `railyard_migration_backups`.

use super::*;

pub(super) const CREATE_BACKUPS: &str = "CREATE TABLE IF NOT EXISTS railyard_migration_backups (
    id BIGSERIAL PRIMARY KEY,
    version VARCHAR(50) NOT NULL,
    kind TEXT NOT NULL,
    location TEXT NOT NULL,
    bytes BIGINT,
    duration_ms DOUBLE PRECISION NOT NULL,
    taken_at TIMESTAMPTZ NOT NULL DEFAULT now()
)";

/// The newest backup of each version.
pub(super) const BACKUPS_SQL: &str = "SELECT DISTINCT ON (version) version::text AS version, kind, location, bytes, \
     extract(epoch FROM taken_at)::float8 AS taken_at FROM railyard_migration_backups \
     ORDER BY version, taken_at DESC, id DESC";

#[derive(QueryableByName)]
pub(super) struct BackupRow {
    #[diesel(sql_type = Text)]
    pub(super) version: String,
    #[diesel(sql_type = Text)]
    pub(super) kind: String,
    #[diesel(sql_type = Text)]
    pub(super) location: String,
    #[diesel(sql_type = Nullable<diesel::sql_types::BigInt>)]
    pub(super) bytes: Option<i64>,
    #[diesel(sql_type = Double)]
    pub(super) taken_at: f64,
}

pub(super) fn with_backups(
    mut rows: Vec<MigrationStatus>,
    backups: Vec<BackupRow>,
) -> Vec<MigrationStatus> {
    for b in backups {
        if let Some(r) = rows.iter_mut().find(|r| r.version == b.version) {
            r.backup = Some(MigrationBackup {
                kind: b.kind,
                location: b.location,
                taken_at: std::time::UNIX_EPOCH
                    + Duration::from_micros((b.taken_at.max(0.0) * 1e6) as u64),
                bytes: b.bytes,
            });
        }
    }
    rows
}

pub(super) fn read_backups(c: &mut SyncConn) -> Result<Vec<BackupRow>, Error> {
    let tables: Tables = diesel::sql_query(TABLES_SQL).get_result(c).map_err(q)?;
    if !tables.backups {
        return Ok(Vec::new());
    }
    diesel::sql_query(BACKUPS_SQL).load(c).map_err(q)
}

/// The marker of a risky migration: the first line of `up.sql`,
/// `-- railyard: risky` with an optional `tables=a,b`. `None` when the
/// line is no marker; an error when it starts like one but says something
/// else.
pub(super) fn risky_header(name: &str, up: &str) -> Result<Option<Vec<String>>, Error> {
    let first = up.lines().next().unwrap_or("").trim();
    let Some(rest) = first
        .strip_prefix("--")
        .map(str::trim_start)
        .and_then(|r| r.strip_prefix("railyard:"))
    else {
        return Ok(None);
    };
    let bad = |why: String| {
        Error::Migration(MigrationError::Setting {
            setting: format!("{name}/up.sql, first line"),
            reason: format!(
                "{why}; the header is `-- railyard: risky` or `-- railyard: risky tables=schema.table,other`"
            ),
        })
    };
    let mut words = rest.split_whitespace();
    if words.next() != Some("risky") {
        return Err(bad("a `-- railyard:` header must say `risky`".into()));
    }
    let mut tables = Vec::new();
    for w in words {
        let Some(list) = w.strip_prefix("tables=") else {
            return Err(bad(format!(
                "{:?} is not understood",
                w.chars().take(40).collect::<String>()
            )));
        };
        for t in list.split(',').filter(|t| !t.is_empty()) {
            if !dump::valid_table(t) {
                return Err(bad(format!(
                    "table {:?} is not a plain name",
                    t.chars().take(60).collect::<String>()
                )));
            }
            tables.push(t.to_owned());
        }
    }
    Ok(Some(tables))
}

/// What a run needs to back up before a risky migration.
pub(super) struct Backup {
    pub(super) how: Option<BeforeRisky>,
    pub(super) target: Option<ConnectTarget>,
    /// Behind a transaction-mode pooler.
    pub(super) per_transaction: bool,
    pub(super) handle: tokio::runtime::Handle,
}

/// A backup taken before a risky migration, to be recorded.
pub(super) struct Taken {
    pub(super) kind: &'static str,
    pub(super) location: String,
    pub(super) bytes: Option<i64>,
    pub(super) took: Duration,
}

#[derive(QueryableByName)]
pub(super) struct PartitionRow {
    #[diesel(sql_type = Text)]
    pub(super) schema: String,
    #[diesel(sql_type = Text)]
    pub(super) name: String,
}

/// The leaf partitions (with rows of their own) of the partitioned tables
/// among `tables`: `pg_dump --table` of a partitioned table dumps only its
/// definition, so they are named too.
pub(super) const PARTITIONS_SQL: &str = "SELECT n.nspname::text AS schema, c.relname::text AS name \
     FROM unnest($1::text[]) AS t(name) \
     CROSS JOIN LATERAL pg_partition_tree(to_regclass(t.name)) p \
     JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE p.relid <> to_regclass(t.name) AND c.relkind = 'r' ORDER BY 1, 2";

impl Backup {
    /// Takes the backup before `k` and records it (the session-lock path:
    /// under the lock, outside any transaction, so the record is committed
    /// before the migration begins).
    pub(super) fn before(&self, c: &mut SyncConn, k: &Known) -> Result<(), Error> {
        match self.take(c, k)? {
            Some(t) => record_backup(c, k, &t),
            None => Ok(()),
        }
    }

    /// Takes the backup before `k` when it is risky (`None` otherwise). Runs
    /// on the migration's blocking thread, with no transaction open on `c`.
    pub(super) fn take(&self, c: &mut SyncConn, k: &Known) -> Result<Option<Taken>, Error> {
        let Some(tables) = &k.risky else {
            return Ok(None);
        };
        let fail = |source: Error| {
            Error::Migration(MigrationError::BackupFailed {
                name: k.name.clone(),
                source: Box::new(source),
            })
        };
        let started = Instant::now();
        // A first boot on an empty database: nothing a backup could keep.
        if nothing_to_back_up(c, tables).map_err(|e| fail(q(e)))? {
            let location = format!("nothing to back up: {} empty or absent", tables.join(", "));
            tracing::info!(target: "railyard::migrate", version = %k.version, %location, "no backup needed before a risky migration");
            return Ok(Some(Taken {
                kind: "none",
                location,
                bytes: Some(0),
                took: started.elapsed(),
            }));
        }
        let (kind, location, bytes) = match &self.how {
            None => {
                return Err(fail(Error::Backup(format!(
                    "no backup is configured: call Migrator::backup_before_risky or set {BACKUP_DIR_VAR} to a directory for pg_dump"
                ))));
            }
            Some(BeforeRisky::PgDump {
                dir,
                timeout,
                direct,
            }) => {
                if self.per_transaction && direct.is_none() {
                    return Err(fail(Error::Backup(
                        "pg_dump does not run through a transaction-mode pooler: its session settings (search_path = '', statement_timeout = 0, …) would stay on the pooled server connections other clients then get. Give it a direct connection to the primary (BeforeRisky::pg_dump(dir).direct(target)), or back up with pgBackRest".into(),
                    )));
                }
                let Some(target) = direct.as_deref().or(self.target.as_ref()) else {
                    return Err(fail(Error::Backup(
                        "Migrator::run_on has no connection parameters for pg_dump; use Migrator::run, or pgBackRest".into(),
                    )));
                };
                let partitions = partitions_of(c, tables).map_err(|e| fail(q(e)))?;
                let stem = format!(
                    "{}-{}-{}",
                    target.dbname.as_deref().unwrap_or("db"),
                    k.version,
                    dump::utc_stamp(std::time::SystemTime::now())
                );
                let dump = self
                    .handle
                    .block_on(dump::pg_dump_with(
                        target,
                        dir,
                        &stem,
                        tables,
                        &partitions,
                        *timeout,
                    ))
                    .map_err(fail)?;
                (
                    "pg_dump",
                    dump.path.display().to_string(),
                    i64::try_from(dump.bytes).ok(),
                )
            }
            Some(BeforeRisky::Tool(tool)) => {
                let taken = self
                    .handle
                    .block_on(tool.take())
                    .map_err(|e| fail(Error::BackupTool(e)))?;
                (
                    taken.kind,
                    taken.location,
                    taken.bytes.and_then(|b| i64::try_from(b).ok()),
                )
            }
        };
        tracing::info!(target: "railyard::migrate", version = %k.version, kind, location = %location, "backup taken before a risky migration");
        Ok(Some(Taken {
            kind,
            location,
            bytes,
            took: started.elapsed(),
        }))
    }
}

/// Whether every table a risky migration names is absent or has no row (its
/// partitions included): then no backup is needed, and none is asked for.
/// A migration that names no table stands for the whole database and is
/// never judged empty. A row written after this look and before the
/// migration is not backed up: the window is one statement wide, and a table
/// an application already writes to is not empty at the look.
fn nothing_to_back_up(c: &mut SyncConn, tables: &[String]) -> diesel::QueryResult<bool> {
    #[derive(QueryableByName)]
    struct Yes {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        yes: bool,
    }
    if tables.is_empty() {
        return Ok(false);
    }
    for t in tables {
        let present = diesel::sql_query("SELECT to_regclass($1) IS NOT NULL AS yes")
            .bind::<Text, _>(t)
            .get_result::<Yes>(c)?
            .yes;
        // A plain name (checked when the header was read): it folds as
        // to_regclass folds it.
        if present
            && diesel::sql_query(format!("SELECT EXISTS (SELECT 1 FROM {t}) AS yes"))
                .get_result::<Yes>(c)?
                .yes
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The partitions of `tables` (schema and name), which `pg_dump` is asked
/// for with them; none asked, none read.
fn partitions_of(
    c: &mut SyncConn,
    tables: &[String],
) -> diesel::QueryResult<Vec<(String, String)>> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    Ok(diesel::sql_query(PARTITIONS_SQL)
        .bind::<diesel::sql_types::Array<Text>, _>(tables)
        .load::<PartitionRow>(c)?
        .into_iter()
        .map(|r| (r.schema, r.name))
        .collect())
}

/// Records a backup taken before `k`.
pub(super) fn record_backup(c: &mut SyncConn, k: &Known, t: &Taken) -> Result<(), Error> {
    diesel::sql_query(
        "INSERT INTO railyard_migration_backups (version, kind, location, bytes, duration_ms) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind::<Text, _>(&k.version)
    .bind::<Text, _>(t.kind)
    .bind::<Text, _>(&t.location)
    .bind::<Nullable<diesel::sql_types::BigInt>, _>(t.bytes)
    .bind::<Double, _>(t.took.as_secs_f64() * 1000.0)
    .execute(c)
    .map_err(q)?;
    Ok(())
}
