//! What migrating reports, and reading the applied history: the report and
//! status types, the history tables and how the known migrations compare.

use super::*;

/// One migration applied by a run.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AppliedMigration {
    /// The migration version (digits of its directory name's prefix).
    pub version: String,
    /// The directory name.
    pub name: String,
    /// How long its SQL took.
    pub duration: Duration,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct MigrationReport {
    /// Migrations applied by this run, in order.
    pub applied: Vec<AppliedMigration>,
    /// How many were already applied.
    pub already_applied: usize,
    /// Versions applied earlier without a checksum (by the diesel CLI) whose
    /// checksum this run recorded.
    pub adopted: Vec<String>,
    /// The newest migration, edited after it was applied, whose new checksum
    /// this run recorded under the development override (see the module docs).
    pub accepted_edits: Vec<String>,
    /// Time spent waiting for the lock.
    pub lock_wait: Duration,
    /// Wall time of the whole run, connection included.
    pub total: Duration,
}

/// Whether an applied migration still matches the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChecksumState {
    /// The recorded checksum equals the embedded one.
    Verified,
    /// The embedded SQL differs from what was applied.
    Edited,
    /// Applied without a checksum (by the diesel CLI); recorded at the next boot.
    Unrecorded,
}

/// The state of one version.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum MigrationState {
    /// Applied to the database.
    Applied {
        /// Checksum comparison with the embedded SQL.
        checksum: ChecksumState,
        /// Recorded duration, when Railyard applied it.
        duration: Option<Duration>,
    },
    /// Embedded but not applied yet.
    Pending,
    /// Applied to the database but unknown to this binary.
    Unknown,
    /// Recorded in `railyard_schema_migrations` but not in diesel's table.
    Orphaned,
}

/// One row of [`Migrator::status`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct MigrationStatus {
    /// The version.
    pub version: String,
    /// The directory name (empty for unknown versions).
    pub name: String,
    /// Applied, pending or unknown.
    pub state: MigrationState,
    /// Whether `up.sql` is marked risky (see the module docs).
    pub risky: bool,
    /// The newest backup taken before it (risky migrations).
    pub backup: Option<MigrationBackup>,
}

#[derive(QueryableByName)]
pub(super) struct Tables {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub(super) diesel: bool,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub(super) ours: bool,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub(super) backups: bool,
}

/// What the bookkeeping tables say.
pub(super) struct Applied {
    /// diesel's applied versions, with Railyard's checksums when recorded.
    pub(super) rows: Vec<AppliedRow>,
    /// Whether Railyard's table exists.
    pub(super) recorded: bool,
    /// Versions in Railyard's table that diesel's lacks.
    pub(super) orphans: Vec<String>,
}

#[derive(QueryableByName)]
pub(super) struct VersionRow {
    #[diesel(sql_type = Text)]
    pub(super) version: String,
}

pub(super) const TABLES_SQL: &str = "SELECT to_regclass('__diesel_schema_migrations') IS NOT NULL AS diesel, \
     to_regclass('railyard_schema_migrations') IS NOT NULL AS ours, \
     to_regclass('railyard_migration_backups') IS NOT NULL AS backups";

/// The query for versions only Railyard's table has, when it exists.
pub(super) fn orphans_sql(tables: &Tables) -> Option<&'static str> {
    match (tables.ours, tables.diesel) {
        (false, _) => None,
        (true, true) => Some(
            "SELECT r.version::text AS version FROM railyard_schema_migrations r \
             WHERE NOT EXISTS (SELECT 1 FROM __diesel_schema_migrations d WHERE d.version = r.version) \
             ORDER BY r.version",
        ),
        (true, false) => {
            Some("SELECT version::text AS version FROM railyard_schema_migrations ORDER BY version")
        }
    }
}

/// The query for diesel's applied versions with Railyard's checksums, when
/// diesel's table exists.
pub(super) fn applied_sql(tables: &Tables) -> Option<&'static str> {
    match (tables.diesel, tables.ours) {
        (false, _) => None,
        (true, true) => Some(
            "SELECT d.version::text AS version, r.up_sha256, r.down_sha256, r.duration_ms \
             FROM __diesel_schema_migrations d LEFT JOIN railyard_schema_migrations r USING (version) ORDER BY d.version",
        ),
        (true, false) => Some(
            "SELECT version::text AS version, NULL::text AS up_sha256, NULL::text AS down_sha256, NULL::float8 AS duration_ms \
             FROM __diesel_schema_migrations ORDER BY version",
        ),
    }
}

/// The applied versions with their recorded checksums, whether both
/// bookkeeping tables exist, and the versions only Railyard's table has.
pub(super) fn read_applied(c: &mut SyncConn) -> Result<Applied, Error> {
    let tables: Tables = diesel::sql_query(TABLES_SQL).get_result(c).map_err(q)?;
    let orphans: Vec<VersionRow> = match orphans_sql(&tables) {
        Some(sql) => diesel::sql_query(sql).load(c).map_err(q)?,
        None => Vec::new(),
    };
    let rows = match applied_sql(&tables) {
        Some(sql) => diesel::sql_query(sql).load(c).map_err(q)?,
        None => Vec::new(),
    };
    Ok(Applied {
        rows,
        recorded: tables.ours,
        orphans: orphans.into_iter().map(|r| r.version).collect(),
    })
}

/// Checks the applied history against the binary: an unknown or orphaned
/// version or an edited migration is an error; returns the applied migrations
/// whose checksum is to be recorded: those applied by the diesel CLI, and,
/// when `allow_latest`, the newest migration if it was edited.
pub(super) fn check_history<'k>(
    applied: &Applied,
    known: &'k [Known],
    allow_latest: bool,
) -> Result<Vec<&'k Known>, Error> {
    if let Some(version) = applied.orphans.first() {
        return Err(Error::Migration(MigrationError::Orphaned {
            version: version.clone(),
        }));
    }
    let newest_applied = applied.rows.last().map(|a| a.version.as_str());
    let newest_known = known.last().map(|k| k.version.as_str());
    let mut unrecorded = Vec::new();
    for a in &applied.rows {
        let Some(k) = known.iter().find(|k| k.version == a.version) else {
            return Err(Error::Migration(MigrationError::UnknownVersion {
                version: a.version.clone(),
            }));
        };
        match (&a.up_sha256, &a.down_sha256) {
            (Some(up), Some(down)) => {
                let (which, recorded, embedded) = if *up != k.up_sha {
                    ("up", up, &k.up_sha)
                } else if *down != k.down_sha {
                    ("down", down, &k.down_sha)
                } else {
                    continue;
                };
                if allow_latest
                    && newest_applied == Some(a.version.as_str())
                    && newest_known == Some(a.version.as_str())
                {
                    unrecorded.push(k);
                    continue;
                }
                return Err(Error::Migration(MigrationError::Edited {
                    version: a.version.clone(),
                    name: k.name.clone(),
                    newest: newest_applied == Some(a.version.as_str())
                        && newest_known == Some(a.version.as_str()),
                    recorded: format!("{which}.sql {}", short(recorded)),
                    embedded: format!("{which}.sql {}", short(embedded)),
                }));
            }
            _ => unrecorded.push(k),
        }
    }
    Ok(unrecorded)
}

pub(super) fn status(c: &mut SyncConn, known: &[Known]) -> Result<Vec<MigrationStatus>, Error> {
    let rows = status_of(read_applied(c)?, known);
    Ok(with_backups(rows, read_backups(c)?))
}

pub(super) fn status_of(applied: Applied, known: &[Known]) -> Vec<MigrationStatus> {
    let Applied {
        rows: applied,
        orphans,
        ..
    } = applied;
    let mut out = Vec::new();
    for k in known {
        let state = match applied.iter().find(|a| a.version == k.version) {
            None if orphans.contains(&k.version) => MigrationState::Orphaned,
            None => MigrationState::Pending,
            Some(a) => MigrationState::Applied {
                checksum: match (&a.up_sha256, &a.down_sha256) {
                    (Some(up), Some(down)) if *up == k.up_sha && *down == k.down_sha => {
                        ChecksumState::Verified
                    }
                    (Some(_), _) => ChecksumState::Edited,
                    (None, _) => ChecksumState::Unrecorded,
                },
                duration: a.duration_ms.map(|ms| Duration::from_secs_f64(ms / 1000.0)),
            },
        };
        out.push(MigrationStatus {
            version: k.version.clone(),
            name: k.name.clone(),
            state,
            risky: k.risky.is_some(),
            backup: None,
        });
    }
    for a in &applied {
        if !known.iter().any(|k| k.version == a.version) {
            out.push(MigrationStatus {
                version: a.version.clone(),
                name: String::new(),
                state: MigrationState::Unknown,
                risky: false,
                backup: None,
            });
        }
    }
    for o in &orphans {
        if !known.iter().any(|k| k.version == *o) {
            out.push(MigrationStatus {
                version: o.clone(),
                name: String::new(),
                state: MigrationState::Orphaned,
                risky: false,
                backup: None,
            });
        }
    }
    out.sort_by(|a, b| a.version.cmp(&b.version));
    out
}
