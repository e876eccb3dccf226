//! The trading ledger's operations, written with Railyard's public API only,
//! as an application would write them: orders placed with idempotency keys in
//! a trader's session, a matcher that crosses the best bid and ask of a symbol
//! in a SERIALIZABLE transaction (re-run by Railyard when it loses a race),
//! with a fee rebate in a savepoint that a CHECK may refuse on its own, and
//! portfolio and order-book reads that a replica serves once it has caught up
//! with the trader.

use std::sync::atomic::{AtomicI64, Ordering};

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel_async::RunQueryDsl;
use railyard::{Database, Error, Route, Session};

/// The ledger's statements, shared with the raw baseline so that both run
/// exactly the same SQL.
pub mod sql {
    /// Places an order under its idempotency key; returns the order id (new or first).
    pub const PLACE: &str = "WITH ins AS ( \
                   INSERT INTO orders (account_id, symbol, side, quantity, limit_price_cents, client_order_id) \
                   VALUES ($1, $2, $3, $4, $5, $6) \
                   ON CONFLICT (account_id, client_order_id) DO NOTHING RETURNING id) \
                 SELECT id FROM ins UNION ALL \
                 SELECT id FROM orders WHERE account_id = $1 AND client_order_id = $6 LIMIT 1";
    /// The best bid and ask of a symbol with their accounts' balances.
    pub const BEST: &str = "(SELECT 'buy' AS side, o.id, o.account_id, o.quantity - o.filled_quantity AS remaining, \
                         o.limit_price_cents AS price, a.balance_cents AS balance \
                  FROM orders o JOIN accounts a ON a.id = o.account_id \
                  WHERE o.symbol = $1 AND o.side = 'buy' AND o.status = 'open' \
                  ORDER BY o.limit_price_cents DESC, o.id LIMIT 1) \
                 UNION ALL \
                 (SELECT 'sell', o.id, o.account_id, o.quantity - o.filled_quantity, \
                         o.limit_price_cents, a.balance_cents \
                  FROM orders o JOIN accounts a ON a.id = o.account_id \
                  WHERE o.symbol = $1 AND o.side = 'sell' AND o.status = 'open' \
                  ORDER BY o.limit_price_cents, o.id LIMIT 1)";
    /// Books a trade: cash, trade, fees, positions and fills in one statement.
    pub const TRADE: &str = "WITH cash AS ( \
                   UPDATE accounts SET balance_cents = balance_cents + d.delta \
                   FROM (VALUES ($6::bigint, -($4::bigint * $5::bigint) - $8::bigint), \
                                ($7::bigint, $4::bigint * $5::bigint - $8::bigint)) d(id, delta) \
                   WHERE accounts.id = d.id RETURNING accounts.id), \
                 t AS ( \
                   INSERT INTO trades (buy_order_id, sell_order_id, symbol, quantity, price_cents) \
                   VALUES ($1, $2, $3, $4, $5) RETURNING id), \
                 f AS ( \
                   INSERT INTO fees (trade_id, account_id, amount_cents) \
                   SELECT t.id, x.account, $8 FROM t, (VALUES ($6::bigint), ($7::bigint)) x(account) \
                   RETURNING id, account_id), \
                 p AS ( \
                   INSERT INTO positions (account_id, symbol, quantity) \
                   VALUES ($6, $3, $4), ($7, $3, -$4::bigint) \
                   ON CONFLICT (account_id, symbol) \
                   DO UPDATE SET quantity = positions.quantity + EXCLUDED.quantity, updated_at = now()), \
                 o AS ( \
                   UPDATE orders SET filled_quantity = filled_quantity + $4, \
                     status = CASE WHEN filled_quantity + $4 = quantity THEN 'filled' ELSE 'open' END \
                   WHERE id IN ($1, $2)) \
                 SELECT t.id AS trade_id, (SELECT id FROM f WHERE account_id = $6) AS buyer_fee_id, \
                        $8 AS buyer_fee \
                 FROM t";
    /// Rebates part of a fee (the CHECK `fees_rebate_bounded` caps it at the fee).
    pub const REBATE_FEE: &str = "UPDATE fees SET rebated_cents = rebated_cents + $2 WHERE id = $1";
    /// Credits a rebate to an account.
    pub const REBATE_CASH: &str =
        "UPDATE accounts SET balance_cents = balance_cents + $2 WHERE id = $1";
    /// Cancels an open order.
    pub const CANCEL_ORDER: &str =
        "UPDATE orders SET status = 'cancelled' WHERE id = $1 AND status = 'open'";
    /// A trader's balance, open orders, positions and newest order id.
    pub const PORTFOLIO: &str = "SELECT a.balance_cents, \
                   (SELECT count(*) FROM orders WHERE account_id = $1 AND status = 'open') AS open_orders, \
                   (SELECT count(*) FROM positions WHERE account_id = $1 AND quantity <> 0) AS positions, \
                   (SELECT coalesce(max(id), 0) FROM orders WHERE account_id = $1) AS last_order_id \
                 FROM accounts a WHERE a.id = $1";
    /// The best five levels on each side of a symbol.
    pub const BOOK: &str = "(SELECT 'buy' AS side, limit_price_cents AS price_cents, sum(quantity - filled_quantity)::bigint AS quantity \
                  FROM orders WHERE symbol = $1 AND side = 'buy' AND status = 'open' \
                  GROUP BY limit_price_cents ORDER BY limit_price_cents DESC LIMIT 5) \
                 UNION ALL \
                 (SELECT 'sell', limit_price_cents, sum(quantity - filled_quantity)::bigint \
                  FROM orders WHERE symbol = $1 AND side = 'sell' AND status = 'open' \
                  GROUP BY limit_price_cents ORDER BY limit_price_cents LIMIT 5)";
    /// Records and credits a deposit once per idempotency key.
    pub const DEPOSIT: &str = "WITH d AS ( \
                   INSERT INTO deposits (account_id, amount_cents, idempotency_key) VALUES ($1, $2, $3) \
                   ON CONFLICT (idempotency_key) DO NOTHING RETURNING account_id, amount_cents) \
                 UPDATE accounts SET balance_cents = balance_cents + d.amount_cents \
                 FROM d WHERE accounts.id = d.account_id";
    /// Cancels an account's oldest open order not locked by the matcher.
    pub const CANCEL_OLDEST: &str = "UPDATE orders SET status = 'cancelled' WHERE id = ( \
                   SELECT id FROM orders WHERE account_id = $1 AND status = 'open' \
                   ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)";
}

/// A listed symbol.
#[derive(Debug, Clone, QueryableByName)]
pub struct Symbol {
    /// The ticker.
    #[diesel(sql_type = Text)]
    pub symbol: String,
    /// The price orders are placed around.
    #[diesel(sql_type = BigInt)]
    pub reference_price_cents: i64,
}

impl Symbol {
    /// A limit price `offset_bp` basis points from the reference price (at
    /// least a cent).
    pub fn limit_price(&self, offset_bp: i64) -> i64 {
        (self.reference_price_cents * (10_000 + offset_bp) / 10_000).max(1)
    }
}

/// A trader of the load run: an account and the session its requests share.
#[derive(Debug)]
pub struct Trader {
    /// The trader's cash account.
    pub account_id: i64,
    /// Read-your-writes across the trader's requests.
    pub session: Session,
    /// The newest order this trader placed whose placement was acknowledged:
    /// a portfolio read that starts later and misses it is a stale read.
    pub last_order: AtomicI64,
}

/// The cents a trader starts the day with.
pub const OPENING_DEPOSIT_CENTS: i64 = 10_000_000;

/// The fee each side of a trade pays: 5 basis points of the notional, plus a cent.
pub fn fee_cents(notional: i64) -> i64 {
    notional / 2_000 + 1
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

/// Lists `n` symbols (`S000`, `S001`, …) with seeded reference prices, and
/// opens `traders` trader accounts with an opening deposit each. Idempotent:
/// a later run with the same numbers reuses them.
pub async fn setup(
    db: &Database,
    traders: usize,
    symbols: usize,
    seed: u64,
) -> Result<(Vec<i64>, Vec<Symbol>), Error> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5EED_5EED);
    let names: Vec<String> = (0..symbols).map(|i| format!("S{i:03}")).collect();
    let prices: Vec<i64> = (0..symbols)
        .map(|_| rng.random_range(1_000..=50_000))
        .collect();
    let traders = i64::try_from(traders).unwrap_or(i64::MAX);
    let (names_q, prices_q) = (names.clone(), prices.clone());
    db.transaction(async |conn| {
        diesel::sql_query(
            "INSERT INTO symbols (symbol, reference_price_cents) \
             SELECT * FROM unnest($1::text[], $2::bigint[]) ON CONFLICT (symbol) DO NOTHING",
        )
        .bind::<diesel::sql_types::Array<Text>, _>(&names_q)
        .bind::<diesel::sql_types::Array<BigInt>, _>(&prices_q)
        .execute(conn)
        .await?;
        diesel::sql_query(
            "INSERT INTO users (email, name) \
             SELECT 'trader-' || i || '@load.railyard', 'Trader ' || i FROM generate_series(1, $1) i \
             ON CONFLICT (email) DO NOTHING",
        )
        .bind::<BigInt, _>(traders)
        .execute(conn)
        .await?;
        diesel::sql_query(
            "INSERT INTO accounts (user_id) \
             SELECT u.id FROM generate_series(1, $1) i \
             JOIN users u ON u.email = 'trader-' || i || '@load.railyard' \
             WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = u.id)",
        )
        .bind::<BigInt, _>(traders)
        .execute(conn)
        .await?;
        diesel::sql_query(
            "WITH d AS ( \
               INSERT INTO deposits (account_id, amount_cents, idempotency_key) \
               SELECT a.id, $2, 'opening-' || a.id FROM generate_series(1, $1) i \
               JOIN users u ON u.email = 'trader-' || i || '@load.railyard' \
               JOIN accounts a ON a.user_id = u.id \
               ON CONFLICT (idempotency_key) DO NOTHING RETURNING account_id, amount_cents) \
             UPDATE accounts SET balance_cents = balance_cents + d.amount_cents \
             FROM d WHERE accounts.id = d.account_id",
        )
        .bind::<BigInt, _>(traders)
        .bind::<BigInt, _>(OPENING_DEPOSIT_CENTS)
        .execute(conn)
        .await?;
        Ok::<_, Error>(())
    })
    .await?;
    let mut conn = db.primary().await?;
    let accounts: Vec<Id> = diesel::sql_query(
        "SELECT DISTINCT ON (i) a.id FROM generate_series(1, $1) i \
         JOIN users u ON u.email = 'trader-' || i || '@load.railyard' \
         JOIN accounts a ON a.user_id = u.id ORDER BY i, a.id",
    )
    .bind::<BigInt, _>(traders)
    .load(&mut **conn)
    .await?;
    let listed: Vec<Symbol> = diesel::sql_query(
        "SELECT symbol, reference_price_cents FROM symbols WHERE symbol = ANY($1) ORDER BY symbol",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(&names)
    .load(&mut **conn)
    .await?;
    Ok((accounts.into_iter().map(|a| a.id).collect(), listed))
}

/// Places a limit order under the client's idempotency key and returns its id.
/// Asking again with the same key returns the first order's id and places
/// nothing, which is what makes the write safe to retry after an ambiguous
/// commit: Railyard is told so with `idempotent(true)`.
pub async fn place(
    trader: &Trader,
    key: &str,
    symbol: &str,
    side: &str,
    quantity: i64,
    price_cents: i64,
) -> Result<i64, Error> {
    let account = trader.account_id;
    let id = trader
        .session
        .build_write()
        .idempotent(true)
        .run(async |conn| {
            railyard::exec::prepared(sql::PLACE)
                .bind::<BigInt, _>(account)
                .bind::<Text, _>(symbol)
                .bind::<Text, _>(side)
                .bind::<BigInt, _>(quantity)
                .bind::<BigInt, _>(price_cents)
                .bind::<Text, _>(key)
                .get_result::<Id>(conn)
                .await
                .map_err(Error::from)
        })
        .await?
        .id;
    trader.last_order.fetch_max(id, Ordering::AcqRel);
    Ok(id)
}

/// What one run of the matcher did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matched {
    /// The book does not cross.
    Nothing,
    /// A trade; whether the buyer's rebate was granted or refused by the CHECK.
    Trade {
        /// The trade's id.
        trade_id: i64,
        /// The rebate was applied (false: none asked, or refused).
        rebated: bool,
        /// A rebate was asked for and the CHECK refused it.
        rebate_refused: bool,
    },
    /// The best bid and ask were the same account's: the newer was cancelled.
    SelfTradePrevented,
    /// The buyer could not pay: the buy order was cancelled.
    InsufficientFunds,
}

/// The best order on one side of a book, as the matcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quote {
    /// The order.
    pub order_id: i64,
    /// Its account.
    pub account_id: i64,
    /// Its unfilled quantity.
    pub remaining: i64,
    /// Its limit price.
    pub price_cents: i64,
    /// Its account's cash.
    pub balance_cents: i64,
}

/// What the matcher does with the best bid and ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// They do not cross (or a side is empty).
    Nothing,
    /// The same account on both sides: cancel this (the newer) order.
    PreventSelfTrade(i64),
    /// The buyer cannot pay: cancel this buy order.
    InsufficientFunds(i64),
    /// Trade.
    Trade {
        /// The bid.
        bid: Quote,
        /// The ask.
        ask: Quote,
    },
}

/// The terms of a trade between a crossing bid and ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cross {
    /// Shares.
    pub quantity: i64,
    /// The resting (older) order's price.
    pub price: i64,
    /// Each side's fee.
    pub fee: i64,
}

/// The terms of a trade between `bid` and `ask`.
pub fn cross(bid: &Quote, ask: &Quote) -> Cross {
    let price = if bid.order_id < ask.order_id {
        bid.price_cents
    } else {
        ask.price_cents
    };
    let quantity = bid.remaining.min(ask.remaining);
    Cross {
        quantity,
        price,
        fee: fee_cents(quantity * price),
    }
}

/// The matcher's rule: trade when the bid reaches the ask, at the resting
/// order's price, for the smaller remaining quantity; never between one
/// account's own orders; never beyond the buyer's cash.
pub fn decide(bid: Option<Quote>, ask: Option<Quote>) -> Decision {
    let (Some(bid), Some(ask)) = (bid, ask) else {
        return Decision::Nothing;
    };
    if bid.price_cents < ask.price_cents {
        return Decision::Nothing;
    }
    if bid.account_id == ask.account_id {
        return Decision::PreventSelfTrade(bid.order_id.max(ask.order_id));
    }
    let c = cross(&bid, &ask);
    if bid.balance_cents < c.quantity * c.price + c.fee {
        return Decision::InsufficientFunds(bid.order_id);
    }
    Decision::Trade { bid, ask }
}

#[derive(QueryableByName)]
struct Best {
    #[diesel(sql_type = Text)]
    side: String,
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    account_id: i64,
    #[diesel(sql_type = BigInt)]
    remaining: i64,
    #[diesel(sql_type = BigInt)]
    price: i64,
    #[diesel(sql_type = BigInt)]
    balance: i64,
}

#[derive(QueryableByName)]
struct TradeRow {
    #[diesel(sql_type = BigInt)]
    trade_id: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    buyer_fee_id: Option<i64>,
    #[diesel(sql_type = BigInt)]
    buyer_fee: i64,
}

/// Crosses the best bid and ask of `symbol` once, atomically, in a
/// SERIALIZABLE transaction of the trader's session: the trade, both fees,
/// both balances, both positions and both orders' fills, or none of them.
/// Railyard re-runs the closure when the transaction loses a race (40001,
/// 40P01). Inside, a savepoint tries to rebate `rebate_pct`% of the buyer's
/// fee; over 100% the `fees_rebate_bounded` CHECK refuses it, the savepoint
/// is rolled back, and the trade stands.
// Long by design: one order match is one transaction, read top to bottom.
pub async fn match_once(
    session: &Session,
    symbol: &str,
    rebate_pct: i64,
) -> Result<Matched, Error> {
    session
        .build_transaction()
        .serializable()
        .retry_policy(matcher_retries())
        .run(async |conn| {
            let best: Vec<Best> = railyard::exec::prepared(sql::BEST)
                .bind::<Text, _>(symbol)
                .load(conn)
                .await?;
            let quote = |side: &str| {
                best.iter().find(|b| b.side == side).map(|b| Quote {
                    order_id: b.id,
                    account_id: b.account_id,
                    remaining: b.remaining,
                    price_cents: b.price,
                    balance_cents: b.balance,
                })
            };
            let (bid, ask) = match decide(quote("buy"), quote("sell")) {
                Decision::Nothing => return Ok(Matched::Nothing),
                Decision::PreventSelfTrade(id) => {
                    cancel_order(conn, id).await?;
                    return Ok(Matched::SelfTradePrevented);
                }
                Decision::InsufficientFunds(id) => {
                    cancel_order(conn, id).await?;
                    return Ok(Matched::InsufficientFunds);
                }
                Decision::Trade { bid, ask, .. } => (bid, ask),
            };
            let Cross {
                quantity,
                price,
                fee,
            } = cross(&bid, &ask);
            let trade: TradeRow = railyard::exec::prepared(sql::TRADE)
                .bind::<BigInt, _>(bid.order_id)
                .bind::<BigInt, _>(ask.order_id)
                .bind::<Text, _>(symbol)
                .bind::<BigInt, _>(quantity)
                .bind::<BigInt, _>(price)
                .bind::<BigInt, _>(bid.account_id)
                .bind::<BigInt, _>(ask.account_id)
                .bind::<BigInt, _>(fee)
                .get_result(conn)
                .await?;
            let (mut rebated, mut rebate_refused) = (false, false);
            if rebate_pct > 0
                && let Some(fee_id) = trade.buyer_fee_id
            {
                let rebate = (trade.buyer_fee * rebate_pct / 100).max(1);
                let buyer = bid.account_id;
                // A savepoint: if the CHECK refuses the rebate, only the
                // rebate is undone.
                let granted = conn
                    .transaction(async |conn| {
                        railyard::exec::prepared(sql::REBATE_FEE)
                            .bind::<BigInt, _>(fee_id)
                            .bind::<BigInt, _>(rebate)
                            .execute(conn)
                            .await?;
                        railyard::exec::prepared(sql::REBATE_CASH)
                            .bind::<BigInt, _>(buyer)
                            .bind::<BigInt, _>(rebate)
                            .execute(conn)
                            .await?;
                        Ok::<_, Error>(())
                    })
                    .await;
                match granted {
                    Ok(()) => rebated = true,
                    Err(e)
                        if e.violation().and_then(|v| v.constraint).as_deref()
                            == Some("fees_rebate_bounded") =>
                    {
                        rebate_refused = true
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(Matched::Trade {
                trade_id: trade.trade_id,
                rebated,
                rebate_refused,
            })
        })
        .await
}

/// The matcher's retries: its transactions are a few milliseconds long, so a
/// conflict clears quickly; back off from 250 µs (doubling, full jitter, at
/// most 10 ms) rather than the default 5 ms, within the usual 10 attempts and
/// the `Database`'s retry budget.
fn matcher_retries() -> railyard::RetryPolicy {
    railyard::RetryPolicy::default().backoff_between(
        std::time::Duration::from_micros(250),
        std::time::Duration::from_millis(10),
    )
}

async fn cancel_order(conn: &mut railyard::Conn, id: i64) -> Result<(), Error> {
    railyard::exec::prepared(sql::CANCEL_ORDER)
        .bind::<BigInt, _>(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// A trader's portfolio as a read sees it.
#[derive(Debug, Clone, QueryableByName)]
#[expect(
    dead_code,
    reason = "read as a client would; the load run times it and checks only its newest order"
)]
pub struct Portfolio {
    /// Cash.
    #[diesel(sql_type = BigInt)]
    pub balance_cents: i64,
    /// Open orders.
    #[diesel(sql_type = BigInt)]
    pub open_orders: i64,
    /// Symbols held (long or short).
    #[diesel(sql_type = BigInt)]
    pub positions: i64,
    /// The newest order of the account the read saw (0: none).
    #[diesel(sql_type = BigInt)]
    pub last_order_id: i64,
}

/// Reads the trader's portfolio in its session (a replica when one has caught
/// up with the trader). Returns the portfolio, where it was read, and whether
/// it was stale: missing an order whose placement was acknowledged before the
/// read started.
pub async fn portfolio(trader: &Trader) -> Result<(Portfolio, Route, bool), Error> {
    let account = trader.account_id;
    let known = AtomicI64::load(&trader.last_order, Ordering::Acquire);
    let (p, route) = trader
        .session
        .read_routed(async |conn| {
            railyard::exec::prepared(sql::PORTFOLIO)
                .bind::<BigInt, _>(account)
                .get_result::<Portfolio>(conn)
                .await
                .map_err(Error::from)
        })
        .await?;
    let stale = p.last_order_id < known;
    Ok((p, route, stale))
}

/// One level of a book.
#[derive(Debug, Clone, QueryableByName)]
#[expect(
    dead_code,
    reason = "read as a client would; the load run only times it"
)]
pub struct Level {
    /// `buy` or `sell`.
    #[diesel(sql_type = Text)]
    pub side: String,
    /// Price.
    #[diesel(sql_type = BigInt)]
    pub price_cents: i64,
    /// Open quantity at that price.
    #[diesel(sql_type = BigInt)]
    pub quantity: i64,
}

/// The best five price levels on each side of `symbol`, read in the trader's
/// session.
pub async fn book(session: &Session, symbol: &str) -> Result<(Vec<Level>, Route), Error> {
    session
        .read_routed(async |conn| {
            railyard::exec::prepared(sql::BOOK)
                .bind::<Text, _>(symbol)
                .load::<Level>(conn)
                .await
                .map_err(Error::from)
        })
        .await
}

/// Deposits cents under the client's idempotency key: recorded and credited
/// once, however often it is asked. Returns whether this call recorded it.
pub async fn deposit(trader: &Trader, key: &str, amount_cents: i64) -> Result<bool, Error> {
    let account = trader.account_id;
    let credited = trader
        .session
        .build_write()
        .idempotent(true)
        .run(async |conn| {
            railyard::exec::prepared(sql::DEPOSIT)
                .bind::<BigInt, _>(account)
                .bind::<BigInt, _>(amount_cents)
                .bind::<Text, _>(key)
                .execute(conn)
                .await
                .map_err(Error::from)
        })
        .await?;
    Ok(credited == 1)
}

/// Cancels the trader's oldest open order, if any (skipping one the matcher
/// holds). Returns whether one was cancelled.
pub async fn cancel_oldest(trader: &Trader) -> Result<bool, Error> {
    let account = trader.account_id;
    let n = trader
        .session
        .write(async |conn| {
            railyard::exec::prepared(sql::CANCEL_OLDEST)
                .bind::<BigInt, _>(account)
                .execute(conn)
                .await
                .map_err(Error::from)
        })
        .await?;
    Ok(n == 1)
}
