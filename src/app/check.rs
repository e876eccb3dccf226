//! `railyard check`: the ledger's invariants, each one SQL statement with a
//! name, run together in one read-only snapshot (REPEATABLE READ), so that a
//! check taken while trading goes on sees one consistent instant.
//! `railyard check --repair` recomputes the derived data (positions, filled
//! quantities, order status) from the trades in one SERIALIZABLE transaction
//! and reports what it changed; it never touches the source of truth
//! (deposits, trades, fees, balances).
//!
//! Trades and closed orders past the retention period live in the archive
//! schema (see `railyard retain`); every invariant reads them through the
//! views `trade_history` and `order_history`, so it holds over live and
//! archived rows together. A repair only writes live rows: archived orders
//! are closed and their trades archived with them.

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;
use railyard::{Database, Error, IsolationLevel};
use serde::Serialize;

/// One invariant: a name, what it means, and a statement returning
/// `violations` (rows or amounts at fault) and `detail`.
#[derive(Debug, Clone, Copy)]
pub struct Invariant {
    /// Its name in reports.
    pub name: &'static str,
    /// What it asserts.
    pub meaning: &'static str,
    /// The statement.
    pub sql: &'static str,
    /// Whether `--repair` can restore it (it concerns derived data).
    pub repairable: bool,
}

/// The invariants, in report order.
pub const INVARIANTS: [Invariant; 9] = [
    Invariant {
        name: "money_conserved",
        meaning: "the sum of balances plus the fees kept equals the sum of deposits",
        sql: "SELECT (b.s + f.s <> d.s)::int::bigint AS violations, \
                'balances ' || b.s || ' + fees kept ' || f.s || ' vs deposits ' || d.s AS detail \
              FROM (SELECT coalesce(sum(balance_cents), 0)::bigint AS s FROM accounts) b, \
                   (SELECT coalesce(sum(amount_cents - rebated_cents), 0)::bigint AS s FROM fees) f, \
                   (SELECT coalesce(sum(amount_cents), 0)::bigint AS s FROM deposits) d",
        repairable: false,
    },
    Invariant {
        name: "cash_matches_history",
        meaning: "each account's balance is its deposits, plus sales, minus purchases, minus fees kept",
        sql: "WITH flows AS ( \
                SELECT account_id, amount_cents AS delta FROM deposits \
                UNION ALL SELECT o.account_id, -t.quantity * t.price_cents FROM trade_history t JOIN order_history o ON o.id = t.buy_order_id \
                UNION ALL SELECT o.account_id, t.quantity * t.price_cents FROM trade_history t JOIN order_history o ON o.id = t.sell_order_id \
                UNION ALL SELECT account_id, -(amount_cents - rebated_cents) FROM fees), \
              expected AS (SELECT account_id, sum(delta)::bigint AS cents FROM flows GROUP BY account_id), \
              bad AS (SELECT a.id FROM accounts a LEFT JOIN expected e ON e.account_id = a.id \
                      WHERE a.balance_cents <> coalesce(e.cents, 0)) \
              SELECT (SELECT count(*) FROM bad)::bigint AS violations, \
                coalesce('accounts ' || (SELECT string_agg(id::text, ', ') FROM (SELECT id FROM bad ORDER BY id LIMIT 10) b), '') AS detail",
        repairable: false,
    },
    Invariant {
        name: "no_negative_balance",
        meaning: "no account holds less than zero",
        sql: "WITH bad AS (SELECT id FROM accounts WHERE balance_cents < 0) \
              SELECT (SELECT count(*) FROM bad)::bigint AS violations, \
                coalesce('accounts ' || (SELECT string_agg(id::text, ', ') FROM (SELECT id FROM bad ORDER BY id LIMIT 10) b), '') AS detail",
        repairable: false,
    },
    Invariant {
        name: "positions_match_trades",
        meaning: "each position equals the shares its account bought minus those it sold",
        sql: "WITH traded AS ( \
                SELECT o.account_id, t.symbol, sum(CASE WHEN o.side = 'buy' THEN t.quantity ELSE -t.quantity END)::bigint AS q \
                FROM trade_history t JOIN order_history o ON o.id IN (t.buy_order_id, t.sell_order_id) \
                GROUP BY o.account_id, t.symbol), \
              bad AS (SELECT coalesce(p.account_id, x.account_id) AS account_id, coalesce(p.symbol, x.symbol) AS symbol \
                      FROM positions p FULL JOIN traded x ON x.account_id = p.account_id AND x.symbol = p.symbol \
                      WHERE coalesce(p.quantity, 0) <> coalesce(x.q, 0)) \
              SELECT (SELECT count(*) FROM bad)::bigint AS violations, \
                coalesce((SELECT string_agg(account_id || '/' || symbol, ', ') FROM (SELECT * FROM bad LIMIT 10) b), '') AS detail",
        repairable: true,
    },
    Invariant {
        name: "fills_match_trades",
        meaning: "each order's filled quantity equals the sum of its trades",
        sql: "WITH bad AS ( \
                SELECT o.id FROM order_history o \
                LEFT JOIN (SELECT order_id, sum(quantity)::bigint AS q FROM ( \
                    SELECT buy_order_id AS order_id, quantity FROM trade_history \
                    UNION ALL SELECT sell_order_id, quantity FROM trade_history) f GROUP BY order_id) t ON t.order_id = o.id \
                WHERE o.filled_quantity <> coalesce(t.q, 0)) \
              SELECT (SELECT count(*) FROM bad)::bigint AS violations, \
                coalesce('orders ' || (SELECT string_agg(id::text, ', ') FROM (SELECT id FROM bad ORDER BY id LIMIT 10) b), '') AS detail",
        repairable: true,
    },
    Invariant {
        name: "fills_within_quantity",
        meaning: "no order is filled beyond its quantity, and an order is filled exactly when its fill reaches it",
        sql: "WITH bad AS (SELECT id FROM order_history \
                WHERE filled_quantity > quantity OR filled_quantity < 0 \
                   OR (status = 'filled') <> (filled_quantity = quantity)) \
              SELECT (SELECT count(*) FROM bad)::bigint AS violations, \
                coalesce('orders ' || (SELECT string_agg(id::text, ', ') FROM (SELECT id FROM bad ORDER BY id LIMIT 10) b), '') AS detail",
        repairable: true,
    },
    Invariant {
        name: "trades_have_both_orders",
        meaning: "each trade joins an existing buy order and an existing sell order of its symbol",
        sql: "WITH bad AS (SELECT t.id FROM trade_history t \
                LEFT JOIN order_history b ON b.id = t.buy_order_id AND b.side = 'buy' AND b.symbol = t.symbol \
                LEFT JOIN order_history s ON s.id = t.sell_order_id AND s.side = 'sell' AND s.symbol = t.symbol \
                WHERE b.id IS NULL OR s.id IS NULL) \
              SELECT (SELECT count(*) FROM bad)::bigint AS violations, \
                coalesce('trades ' || (SELECT string_agg(id::text, ', ') FROM (SELECT id FROM bad ORDER BY id LIMIT 10) b), '') AS detail",
        repairable: false,
    },
    Invariant {
        name: "trades_pay_two_fees",
        meaning: "each trade charged exactly one fee to each side",
        sql: "WITH bad AS (SELECT t.id FROM trade_history t \
                LEFT JOIN fees f ON f.trade_id = t.id GROUP BY t.id HAVING count(f.id) <> 2) \
              SELECT (SELECT count(*) FROM bad)::bigint AS violations, \
                coalesce('trades ' || (SELECT string_agg(id::text, ', ') FROM (SELECT id FROM bad ORDER BY id LIMIT 10) b), '') AS detail",
        repairable: false,
    },
    Invariant {
        name: "fees_name_a_trade",
        meaning: "each fee belongs to a trade, live or archived",
        sql: "WITH bad AS (SELECT f.id FROM fees f \
                WHERE NOT EXISTS (SELECT 1 FROM trade_history t WHERE t.id = f.trade_id)) \
              SELECT (SELECT count(*) FROM bad)::bigint AS violations, \
                coalesce('fees ' || (SELECT string_agg(id::text, ', ') FROM (SELECT id FROM bad ORDER BY id LIMIT 10) b), '') AS detail",
        repairable: false,
    },
];

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    violations: i64,
    #[diesel(sql_type = Text)]
    detail: String,
}

/// One invariant's result.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// The invariant.
    pub name: &'static str,
    /// What it asserts.
    pub meaning: &'static str,
    /// Rows (or amounts) at fault; 0 when it holds.
    pub violations: i64,
    /// The first offenders, or the sums compared.
    pub detail: String,
    /// Whether `--repair` can restore it.
    pub repairable: bool,
}

impl Verdict {
    /// Whether it holds.
    pub fn passed(&self) -> bool {
        self.violations == 0
    }
}

/// Runs every invariant in one read-only snapshot on the primary.
pub async fn check(db: &Database) -> Result<Vec<Verdict>, Error> {
    db.build_transaction()
        .isolation(IsolationLevel::RepeatableRead)
        .read_only()
        .run(async |conn| {
            let mut out = Vec::with_capacity(INVARIANTS.len());
            for inv in INVARIANTS {
                let row: Row = diesel::sql_query(inv.sql).get_result(conn).await?;
                out.push(Verdict {
                    name: inv.name,
                    meaning: inv.meaning,
                    violations: row.violations,
                    detail: row.detail,
                    repairable: inv.repairable,
                });
            }
            Ok::<_, Error>(out)
        })
        .await
}

/// What a repair changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Repair {
    /// Positions set to their trades' sum (inserted, updated or zeroed).
    pub positions: i64,
    /// Orders whose filled quantity was set to their trades' sum.
    pub fills: i64,
    /// Orders whose status was set from their fill.
    pub statuses: i64,
    /// Orders whose trades exceed their quantity: not repairable from trades.
    pub overfilled: i64,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Recomputes positions, filled quantities and statuses from the trades, in
/// one SERIALIZABLE transaction (all of it or none of it).
pub async fn repair(db: &Database) -> Result<Repair, Error> {
    db.build_transaction()
        .serializable()
        .run(async |conn| {
            let n = async |conn: &mut railyard::Conn, sql: &str| -> Result<i64, Error> {
                Ok(diesel::sql_query(sql).get_result::<Count>(conn).await?.n)
            };
            let positions = n(
                conn,
                "WITH traded AS ( \
                   SELECT o.account_id, t.symbol, sum(CASE WHEN o.side = 'buy' THEN t.quantity ELSE -t.quantity END)::bigint AS q \
                   FROM trade_history t JOIN order_history o ON o.id IN (t.buy_order_id, t.sell_order_id) \
                   GROUP BY o.account_id, t.symbol), \
                 upserted AS ( \
                   INSERT INTO positions (account_id, symbol, quantity) SELECT account_id, symbol, q FROM traded \
                   ON CONFLICT (account_id, symbol) DO UPDATE SET quantity = EXCLUDED.quantity, updated_at = now() \
                   WHERE positions.quantity <> EXCLUDED.quantity RETURNING 1), \
                 zeroed AS ( \
                   UPDATE positions p SET quantity = 0, updated_at = now() \
                   WHERE p.quantity <> 0 AND NOT EXISTS (SELECT 1 FROM traded x WHERE x.account_id = p.account_id AND x.symbol = p.symbol) \
                   RETURNING 1) \
                 SELECT ((SELECT count(*) FROM upserted) + (SELECT count(*) FROM zeroed))::bigint AS n",
            )
            .await?;
            let sums = "(SELECT o.id, o.quantity, coalesce(t.q, 0)::bigint AS q FROM order_history o \
                 LEFT JOIN (SELECT order_id, sum(quantity) AS q FROM ( \
                     SELECT buy_order_id AS order_id, quantity FROM trade_history \
                     UNION ALL SELECT sell_order_id, quantity FROM trade_history) f GROUP BY order_id) t ON t.order_id = o.id)";
            let overfilled = n(conn, &format!("SELECT count(*)::bigint AS n FROM {sums} s WHERE s.q > s.quantity")).await?;
            let fills = n(
                conn,
                &format!(
                    "WITH s AS {sums}, u AS ( \
                       UPDATE orders o SET filled_quantity = s.q FROM s \
                       WHERE s.id = o.id AND o.filled_quantity <> s.q AND s.q <= o.quantity RETURNING 1) \
                     SELECT count(*)::bigint AS n FROM u"
                ),
            )
            .await?;
            let statuses = n(
                conn,
                "WITH u AS (UPDATE orders SET status = CASE WHEN filled_quantity = quantity THEN 'filled' ELSE 'open' END \
                   WHERE (status = 'filled' AND filled_quantity <> quantity) \
                      OR (status = 'open' AND filled_quantity = quantity) RETURNING 1) \
                 SELECT count(*)::bigint AS n FROM u",
            )
            .await?;
            Ok::<_, Error>(Repair {
                positions,
                fills,
                statuses,
                overfilled,
            })
        })
        .await
}
