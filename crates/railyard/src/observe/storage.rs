//! Storage figures: the database's size and the sizes of the tables a
//! retention job manages, as the job last measured them, with its threshold
//! on the live (not yet archived) bytes; without a retention job, the
//! database's size and its largest tables, measured by the `Database` at
//! most once a minute when `/health` or `/metrics` asks. The `Database`
//! keeps the latest figures; `/health` and `/metrics` show them.

use std::fmt::Write as _;

use serde::Serialize;

use super::health::{HealthCheck, HealthStatus};

/// One table's size, its indexes and TOAST included (partitions summed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TableSize {
    /// Its schema-qualified name (`public.trades`, `railyard_archive.trades`).
    pub table: String,
    /// Bytes on disk.
    pub bytes: u64,
    /// Whether it is archive (outside the live data).
    pub archived: bool,
}

impl TableSize {
    /// A table's measured size.
    pub fn new(table: impl Into<String>, bytes: u64, archived: bool) -> Self {
        TableSize {
            table: table.into(),
            bytes,
            archived,
        }
    }
}

/// What a storage measurement found, and what retention could do about it.
///
/// ```
/// use railyard::observe::{StorageFigures, TableSize};
/// let f = StorageFigures::new(
///     8_000_000,
///     vec![TableSize::new("public.trades", 3_000_000, false)],
///     Some(2_000_000),
/// );
/// assert!(f.over_threshold());
/// assert_eq!(f.live_bytes(), 3_000_000);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StorageFigures {
    /// `pg_database_size` of the current database.
    pub database_bytes: u64,
    /// The measured tables.
    pub tables: Vec<TableSize>,
    /// The most live bytes wanted, when a threshold is set.
    pub threshold_bytes: Option<u64>,
    /// A retention run finished with the live bytes still over the
    /// threshold: archiving everything past the retention period was not
    /// enough.
    pub cannot_free: bool,
}

impl StorageFigures {
    /// Figures without a verdict of retention yet.
    pub fn new(database_bytes: u64, tables: Vec<TableSize>, threshold_bytes: Option<u64>) -> Self {
        StorageFigures {
            database_bytes,
            tables,
            threshold_bytes,
            cannot_free: false,
        }
    }

    /// The bytes of the measured tables that are not archive.
    pub fn live_bytes(&self) -> u64 {
        self.tables
            .iter()
            .filter(|t| !t.archived)
            .map(|t| t.bytes)
            .sum()
    }

    /// The bytes of the archive tables.
    pub fn archived_bytes(&self) -> u64 {
        self.tables
            .iter()
            .filter(|t| t.archived)
            .map(|t| t.bytes)
            .sum()
    }

    /// Whether the live bytes are over the threshold.
    pub fn over_threshold(&self) -> bool {
        self.threshold_bytes.is_some_and(|t| self.live_bytes() > t)
    }
}

/// The `storage` check: degraded while retention could not bring the live
/// bytes under the threshold.
pub(crate) fn check(f: &StorageFigures) -> HealthCheck {
    let live = f.live_bytes();
    let base = format!(
        "database {} bytes; live history {} bytes, archive {} bytes",
        f.database_bytes,
        live,
        f.archived_bytes()
    );
    let (status, reason) = match f.threshold_bytes {
        Some(t) if live > t && f.cannot_free => (
            HealthStatus::Degraded,
            format!(
                "{base}: over the threshold of {t} bytes after retention archived everything past its period; shorten RAILYARD_RETENTION, raise RAILYARD_RETENTION_SIZE_THRESHOLD or add space"
            ),
        ),
        Some(t) if live > t => (
            HealthStatus::Healthy,
            format!("{base}: over the threshold of {t} bytes; retention runs early"),
        ),
        Some(t) => (
            HealthStatus::Healthy,
            format!("{base} (threshold {t} bytes)"),
        ),
        None => (HealthStatus::Healthy, base),
    };
    HealthCheck {
        name: "storage".into(),
        status,
        reason,
        latency_ms: None,
    }
}

/// The figures as Prometheus gauges.
pub(crate) fn render(out: &mut String, f: &StorageFigures) {
    out.push_str("# HELP railyard_database_size_bytes Size of the database (pg_database_size), as last measured.\n# TYPE railyard_database_size_bytes gauge\n");
    let _ = writeln!(out, "railyard_database_size_bytes {}", f.database_bytes);
    out.push_str("# HELP railyard_table_size_bytes Size of a table with its indexes and partitions (the tables retention manages, or else the largest), as last measured.\n# TYPE railyard_table_size_bytes gauge\n");
    for t in &f.tables {
        let _ = writeln!(
            out,
            "railyard_table_size_bytes{{table=\"{}\",archived=\"{}\"}} {}",
            t.table.replace(['\\', '"', '\n'], "_"),
            t.archived,
            t.bytes
        );
    }
    out.push_str("# HELP railyard_retention_live_bytes Bytes of the managed tables not yet archived.\n# TYPE railyard_retention_live_bytes gauge\n");
    let _ = writeln!(out, "railyard_retention_live_bytes {}", f.live_bytes());
    if let Some(t) = f.threshold_bytes {
        out.push_str("# HELP railyard_retention_threshold_bytes Live bytes over which retention runs early.\n# TYPE railyard_retention_threshold_bytes gauge\n");
        let _ = writeln!(out, "railyard_retention_threshold_bytes {t}");
    }
    out.push_str("# HELP railyard_retention_cannot_free 1 while retention could not bring the live bytes under the threshold.\n# TYPE railyard_retention_cannot_free gauge\n");
    let _ = writeln!(
        out,
        "railyard_retention_cannot_free {}",
        u8::from(f.cannot_free && f.over_threshold())
    );
}
