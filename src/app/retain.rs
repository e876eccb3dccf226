//! The ledger's retention: `trades` is partitioned by month of execution
//! (migration `partition_history`); months past the retention period move to
//! the `railyard_archive` schema, and the closed orders that only they
//! reference follow them, row by row, in a transaction of their own. Once an
//! order is archived, `orders`' unique keys no longer cover it: its id stays
//! unique (one sequence gives them all), but its idempotency key
//! (`client_order_id`) is no longer enforced against new orders. History is
//! read through the views `trade_history` and `order_history` (live and
//! archive).
//!
//! Uses the crate's public API only (the integration tests include this file).

use railyard::Error;
use railyard_ops::retain::{Retention, RetentionConfig};

/// Moves the closed orders created before `$1` that no live trade
/// references (their trades are all in archived months) into the archive.
pub const MOVE_CLOSED_ORDERS: &str = "WITH moved AS ( \
       DELETE FROM orders o WHERE o.status <> 'open' AND o.created_at < $1 \
         AND NOT EXISTS (SELECT 1 FROM trades t WHERE t.buy_order_id = o.id) \
         AND NOT EXISTS (SELECT 1 FROM trades t WHERE t.sell_order_id = o.id) \
       RETURNING o.*) \
     INSERT INTO railyard_archive.orders SELECT * FROM moved";

/// The trades of a time range, live or archived: the one read path for
/// history (`$1` ≤ executed_at < `$2`), oldest first.
pub const TRADES_BETWEEN: &str = "SELECT id, buy_order_id, sell_order_id, symbol, quantity, price_cents, executed_at \
     FROM trade_history WHERE executed_at >= $1 AND executed_at < $2 ORDER BY executed_at, id";

/// The ledger's retention with `config`.
pub fn ledger(config: RetentionConfig) -> Result<Retention, railyard_ops::Error> {
    Retention::new(config)
        .partitioned("trades", "executed_at")?
        .move_rows("orders", MOVE_CLOSED_ORDERS)
        .watch("orders")?
        .watch("railyard_archive.orders")
}

/// The row count and an md5 digest of [`TRADES_BETWEEN`]'s rows, in order:
/// equal before and after archival when the read path sees the same rows.
#[derive(Debug, Clone, PartialEq, Eq, diesel::QueryableByName)]
pub struct Digest {
    /// Rows.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub n: i64,
    /// md5 of the rows in order.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub digest: String,
}

/// Reads the digest of the trades in [`from`, `to`) on the primary.
pub async fn digest(
    db: &railyard::Database,
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
) -> Result<Digest, Error> {
    use diesel_async::RunQueryDsl;
    let mut conn = db.primary().await?;
    Ok(diesel::sql_query(format!(
        "SELECT count(*)::bigint AS n, \
           coalesce(md5(string_agg(h::text, ',' ORDER BY h.executed_at, h.id)), '') AS digest \
         FROM ({TRADES_BETWEEN}) h"
    ))
    .bind::<diesel::sql_types::Timestamptz, _>(from)
    .bind::<diesel::sql_types::Timestamptz, _>(to)
    .get_result(&mut **conn)
    .await?)
}
