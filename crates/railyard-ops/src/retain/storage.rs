//! Measuring the database and the managed tables, and recording the figures
//! on the [`Database`] for `/health` and `/metrics`.

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use railyard::database::Database;
use railyard::observe::{StorageFigures, TableSize};

use super::sql::bounded;
use super::{ARCHIVE_SCHEMA, Retention};
use crate::error::Error;

impl Retention {
    /// Measures the database and the managed tables.
    pub async fn measure(&self, db: &Database) -> Result<StorageFigures, Error> {
        let mut conn = db.primary().await?;
        self.measure_on(&mut conn).await
    }

    pub(super) async fn measure_on(
        &self,
        conn: &mut AsyncPgConnection,
    ) -> Result<StorageFigures, Error> {
        let bound = self.config.statement_timeout;
        let database = bounded(
            bound,
            diesel::sql_query("SELECT pg_database_size(current_database())::bigint AS n")
                .get_result::<N>(conn),
        )
        .await?
        .n;
        let mut names: Vec<(String, bool)> = Vec::new();
        for (t, _) in &self.tables {
            names.push((format!("public.{t}"), false));
            names.push((format!("{ARCHIVE_SCHEMA}.{t}"), true));
        }
        for w in &self.watched {
            let archived = w.split_once('.').is_some_and(|(s, _)| s == ARCHIVE_SCHEMA);
            let name = if w.contains('.') {
                w.clone()
            } else {
                format!("public.{w}")
            };
            names.push((name, archived));
        }
        let mut tables = Vec::with_capacity(names.len());
        for (name, archived) in names {
            let n = bounded(
                bound,
                diesel::sql_query(
                    "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint AS n FROM pg_class c \
                     WHERE c.oid = to_regclass($1) \
                        OR c.oid IN (SELECT relid FROM pg_partition_tree(to_regclass($1)))",
                )
                .bind::<Text, _>(&name)
                .get_result::<N>(conn),
            )
            .await?
            .n;
            tables.push(TableSize::new(
                name,
                u64::try_from(n).unwrap_or(0),
                archived,
            ));
        }
        Ok(StorageFigures::new(
            u64::try_from(database).unwrap_or(0),
            tables,
            self.config.size_threshold,
        ))
    }
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// What a retention job last measured, kept on the handle so that its
/// health and metrics show the job's figures (with its threshold and
/// verdict) instead of the core's own measurement.
#[derive(Default)]
struct RecordedStorage(std::sync::Mutex<Option<railyard::observe::StorageFigures>>);

impl railyard::database::Attachment for RecordedStorage {
    fn storage(&self) -> Option<railyard::observe::StorageFigures> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Records what a storage measurement found on `db`: `/health` gains a
/// `storage` check and `/metrics` the sizes from then on.
pub fn record_storage(db: &Database, figures: railyard::observe::StorageFigures) {
    *db.attachment::<RecordedStorage>()
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(figures);
}
