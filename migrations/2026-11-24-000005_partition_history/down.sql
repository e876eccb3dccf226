-- Back to one trades table, with the archived rows brought home.
DROP VIEW order_history;
DROP VIEW trade_history;

INSERT INTO orders SELECT * FROM railyard_archive.orders;

ALTER SEQUENCE trades_id_seq OWNED BY NONE;
ALTER TABLE trades RENAME TO trades_partitioned;
-- Free the key's name first, so the restored table's key is trades_pkey again.
ALTER TABLE trades_partitioned RENAME CONSTRAINT trades_pkey TO trades_partitioned_pkey;
CREATE TABLE trades (
    id            BIGINT PRIMARY KEY DEFAULT nextval('trades_id_seq'),
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
INSERT INTO trades SELECT * FROM trades_partitioned;
INSERT INTO trades SELECT * FROM railyard_archive.trades;
DROP TABLE trades_partitioned;
ALTER SEQUENCE trades_id_seq OWNED BY trades.id;
CREATE INDEX trades_buy_order_idx ON trades (buy_order_id);
CREATE INDEX trades_sell_order_idx ON trades (sell_order_id);
CREATE INDEX trades_symbol_executed_idx ON trades (symbol, executed_at DESC);

ALTER TABLE fees ADD CONSTRAINT fees_trade_id_fkey FOREIGN KEY (trade_id) REFERENCES trades (id);
DROP SCHEMA railyard_archive CASCADE;
