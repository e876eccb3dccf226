//! Reading the server: the catalog and statistics reads (each bounded by
//! [`STEP`]), the extensions in place, the replicas' scans, generic plans,
//! the relations plans name, and costs with hypothetical indexes (hypopg).

use std::collections::HashMap;

use diesel::QueryableByName;
use diesel::sql_types::{Array, Double, Nullable, Text};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use railyard::conn::Conn;
use railyard::database::Database;

use super::{MAX_RELATIONS, STEP, catalog, plan, report};
use crate::error::Error;

pub(super) async fn load<T>(conn: &mut Conn, sql: &'static str) -> Result<Vec<T>, Error>
where
    T: QueryableByName<diesel::pg::Pg> + Send + 'static,
{
    bounded(diesel::sql_query(sql).load::<T>(conn)).await
}

pub(super) async fn bounded<T>(
    f: impl Future<Output = diesel::QueryResult<T>>,
) -> Result<T, Error> {
    match tokio::time::timeout(STEP, f).await {
        Ok(r) => r.map_err(Error::from),
        Err(_) => Err(Error::timeout(STEP, "an advisor step did not finish")),
    }
}

#[derive(QueryableByName)]
struct Ext {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    schema: String,
}

/// The schemas of the extensions the advisor uses, by name.
pub(super) async fn extensions(conn: &mut Conn) -> Result<HashMap<String, String>, Error> {
    let rows: Vec<Ext> = load(
        conn,
        "SELECT e.extname::text AS name, n.nspname::text AS schema FROM pg_extension e \
         JOIN pg_namespace n ON n.oid = e.extnamespace \
         WHERE e.extname IN ('hypopg', 'pg_stat_statements')",
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(|e| (e.name, report::ident(&e.schema)))
        .collect())
}

#[derive(QueryableByName)]
struct Since {
    #[diesel(sql_type = Nullable<Text>)]
    since: Option<String>,
}

pub(super) async fn stats_since(conn: &mut Conn) -> Result<Option<String>, Error> {
    let rows: Vec<Since> = load(
        conn,
        "SELECT date_trunc('second', stats_reset)::text AS since FROM pg_stat_database \
         WHERE datname = current_database()",
    )
    .await?;
    Ok(rows.into_iter().next().and_then(|r| r.since))
}

pub(super) async fn replica_scans(
    db: &Database,
    index: usize,
) -> Result<(Vec<catalog::IndexRow>, Vec<catalog::TableRow>), Error> {
    let mut conn = tokio::time::timeout(STEP, db.replica(index))
        .await
        .map_err(|_| Error::timeout(STEP, "no replica connection"))??;
    let i = load(&mut conn, catalog::INDEXES).await?;
    let t = load(&mut conn, catalog::TABLES).await?;
    Ok((i, t))
}

/// Explains a generic plan of `sql`; a statement left prepared by a failure
/// is deallocated.
pub(super) async fn explain(conn: &mut Conn, sql: &str) -> Result<serde_json::Value, String> {
    let result =
        match tokio::time::timeout(STEP, railyard::observe::explain_generic(conn, sql)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no plan within {STEP:?}")),
        };
    match result {
        Ok(json) => serde_json::from_str(&json).map_err(|e| e.to_string()),
        Err(e) => {
            let _ =
                tokio::time::timeout(STEP, conn.batch_execute("ROLLBACK; DEALLOCATE ALL")).await;
            Err(e)
        }
    }
}

#[derive(QueryableByName)]
struct RelationRow {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Array<Text>)]
    columns: Vec<String>,
    #[diesel(sql_type = Double)]
    rows: f64,
}

/// The columns and row estimates of the relations plans name (bounded).
#[derive(Debug, Default)]
pub(super) struct Relations {
    pub(super) columns: HashMap<String, Vec<String>>,
    pub(super) rows: HashMap<String, f64>,
}

impl Relations {
    pub(super) async fn learn(&mut self, conn: &mut Conn, names: &[String]) -> Result<(), Error> {
        let new: Vec<&String> = names
            .iter()
            .filter(|n| !self.columns.contains_key(*n))
            .collect();
        if new.is_empty() || self.columns.len() >= MAX_RELATIONS {
            return Ok(());
        }
        let rows: Vec<RelationRow> = bounded(
            diesel::sql_query(
                "SELECT n.name, \
                   ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid \
                         AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum) AS columns, \
                   GREATEST(c.reltuples, coalesce(s.n_live_tup, 0), 0)::float8 AS rows \
                 FROM unnest($1::text[]) n(name) \
                 JOIN pg_class c ON c.oid = to_regclass(quote_ident(n.name)) \
                 LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid",
            )
            .bind::<Array<Text>, _>(new.iter().map(|s| s.as_str()).collect::<Vec<_>>())
            .load(conn),
        )
        .await?;
        for r in rows {
            self.rows.insert(r.name.clone(), r.rows);
            self.columns.insert(r.name, r.columns);
        }
        Ok(())
    }
}

#[derive(QueryableByName)]
struct Created {
    #[diesel(sql_type = Text)]
    #[allow(dead_code)]
    name: String,
}

/// The estimated cost of `sql` with a hypothetical index on `table (columns)`,
/// or `None` when hypopg refused the index or the statement did not explain.
pub(super) async fn hypothetical_cost(
    conn: &mut Conn,
    schema: &str,
    table: &str,
    columns: &[String],
    sql: &str,
) -> Result<Option<f64>, Error> {
    let ddl = format!(
        "CREATE INDEX ON {} ({})",
        report::ident(table),
        columns
            .iter()
            .map(|c| report::ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let reset = format!("SELECT {schema}.hypopg_reset()");
    bounded(conn.batch_execute(&reset)).await?;
    let created: Result<Vec<Created>, Error> = bounded(
        diesel::sql_query(format!(
            "SELECT indexname::text AS name FROM {schema}.hypopg_create_index($1)"
        ))
        .bind::<Text, _>(&ddl)
        .load(conn),
    )
    .await;
    let cost = match created {
        Ok(_) => explain(conn, sql)
            .await
            .ok()
            .and_then(|p| plan::total_cost(&p)),
        Err(_) => None,
    };
    bounded(conn.batch_execute(&reset)).await?;
    Ok(cost)
}
