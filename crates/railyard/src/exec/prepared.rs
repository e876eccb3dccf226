//! Constant SQL, prepared once per connection.
//!
//! diesel's `sql_query` marks its statement unsafe to cache, because its text
//! may be built at run time and the statement cache has no bound: every
//! execution then costs a `Parse`/`Describe` round trip before the
//! `Bind`/`Execute` one. [`prepared`] takes only a `&'static str` (text fixed
//! at compile time, so the cache holds at most one entry per call site and
//! bind types), and tells diesel the statement may be cached: from the second
//! execution on a connection, one round trip.

use diesel::QueryResult;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, BoxedSqlQuery, Query, QueryFragment, QueryId, SqlQuery};
use diesel::serialize::ToSql;
use diesel::sql_types::{HasSqlType, Untyped};

/// A constant SQL statement with its binds, cached as a prepared statement
/// on each connection. Load it like `sql_query` (into `QueryableByName`
/// structs), or `execute` it.
///
/// ```no_run
/// use diesel::sql_types::BigInt;
/// use diesel_async::RunQueryDsl;
/// # async fn demo(db: &railyard::Database) -> Result<(), railyard::Error> {
/// #[derive(diesel::QueryableByName)]
/// struct Balance {
///     #[diesel(sql_type = BigInt)]
///     balance_cents: i64,
/// }
/// let b: Balance = db
///     .read(async |conn| {
///         railyard::exec::prepared("SELECT balance_cents FROM accounts WHERE id = $1")
///             .bind::<BigInt, _>(1_i64)
///             .get_result(conn)
///             .await
///             .map_err(railyard::Error::from)
///     })
///     .await?;
/// # Ok(()) }
/// ```
#[must_use = "queries are only executed when calling `load`, `get_result`, `execute` or similar"]
pub struct Prepared<'f>(BoxedSqlQuery<'f, Pg, SqlQuery>);

impl std::fmt::Debug for Prepared<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Bind values may be secrets: only the text is shown.
        f.debug_tuple("Prepared")
            .field(
                &diesel::debug_query::<Pg, _>(&self.0)
                    .to_string()
                    .split(" -- binds")
                    .next(),
            )
            .finish()
    }
}

/// Constant SQL (placeholders `$1`, `$2`, …), prepared once per connection.
pub fn prepared<'f>(sql: &'static str) -> Prepared<'f> {
    Prepared(diesel::sql_query(sql).into_boxed())
}

impl<'f> Prepared<'f> {
    /// Binds the next placeholder's value, of SQL type `ST`.
    pub fn bind<ST, V>(self, value: V) -> Self
    where
        Pg: HasSqlType<ST>,
        V: ToSql<ST, Pg> + Send + 'f,
        ST: Send + 'f,
    {
        Prepared(self.0.bind::<ST, V>(value))
    }
}

impl QueryFragment<Pg> for Prepared<'_> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    // The text is a compile-time constant: one cache entry per statement.
    fn is_safe_to_cache_prepared(&self, _backend: &Pg) -> QueryResult<bool> {
        Ok(true)
    }
}

impl QueryId for Prepared<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for Prepared<'_> {
    type SqlType = Untyped;
}
