-- Limit orders placed by accounts, and the trades that fill them.
CREATE TABLE orders (
    id                BIGSERIAL PRIMARY KEY,
    account_id        BIGINT NOT NULL REFERENCES accounts (id),
    symbol            TEXT NOT NULL,
    side              TEXT NOT NULL,
    quantity          BIGINT NOT NULL,
    filled_quantity   BIGINT NOT NULL DEFAULT 0,
    limit_price_cents BIGINT NOT NULL,
    status            TEXT NOT NULL DEFAULT 'open',
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT orders_side_valid CHECK (side IN ('buy', 'sell')),
    CONSTRAINT orders_status_valid CHECK (status IN ('open', 'filled', 'cancelled')),
    CONSTRAINT orders_quantity_positive CHECK (quantity > 0),
    CONSTRAINT orders_fill_bounded CHECK (filled_quantity BETWEEN 0 AND quantity),
    CONSTRAINT orders_price_positive CHECK (limit_price_cents > 0)
);

-- An account's order history, newest first.
CREATE INDEX orders_account_created_idx ON orders (account_id, created_at DESC);
-- The order book: open orders of a symbol by price.
CREATE INDEX orders_open_book_idx ON orders (symbol, side, limit_price_cents) WHERE status = 'open';

CREATE TABLE trades (
    id            BIGSERIAL PRIMARY KEY,
    buy_order_id  BIGINT NOT NULL REFERENCES orders (id),
    sell_order_id BIGINT NOT NULL REFERENCES orders (id),
    symbol        TEXT NOT NULL,
    quantity      BIGINT NOT NULL,
    price_cents   BIGINT NOT NULL,
    executed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT trades_quantity_positive CHECK (quantity > 0),
    CONSTRAINT trades_price_positive CHECK (price_cents > 0),
    CONSTRAINT trades_distinct_orders CHECK (buy_order_id <> sell_order_id)
);

CREATE INDEX trades_buy_order_idx ON trades (buy_order_id);
CREATE INDEX trades_sell_order_idx ON trades (sell_order_id);
-- Recent trades of a symbol (the tape).
CREATE INDEX trades_symbol_executed_idx ON trades (symbol, executed_at DESC);
