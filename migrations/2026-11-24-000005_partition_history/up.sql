-- railyard: risky tables=trades
-- The ledger's history by time: trades are range-partitioned by month of
-- execution, so that retention can retire a month with one DETACH instead of
-- deleting its rows. Past the retention period, months move to the schema
-- railyard_archive (with the closed orders that only they reference), and the
-- views trade_history and order_history read live and archived rows as one.

CREATE SCHEMA railyard_archive;

-- A fee names its trade by id; a foreign key to a partitioned table would
-- have to name the partition key too. `railyard check` keeps the rule
-- (trades_pay_two_fees, fees_name_a_trade) over live and archived trades.
ALTER TABLE fees DROP CONSTRAINT fees_trade_id_fkey;

ALTER SEQUENCE trades_id_seq OWNED BY NONE;
ALTER TABLE trades RENAME TO trades_unpartitioned;
ALTER TABLE trades_unpartitioned RENAME CONSTRAINT trades_pkey TO trades_unpartitioned_pkey;
DROP INDEX trades_buy_order_idx, trades_sell_order_idx, trades_symbol_executed_idx;

CREATE TABLE trades (
    id            BIGINT NOT NULL DEFAULT nextval('trades_id_seq'),
    buy_order_id  BIGINT NOT NULL REFERENCES orders (id),
    sell_order_id BIGINT NOT NULL REFERENCES orders (id),
    symbol        TEXT NOT NULL,
    quantity      BIGINT NOT NULL,
    price_cents   BIGINT NOT NULL,
    executed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- A partitioned table's unique keys include its partition key; ids stay
    -- unique because one sequence gives them.
    PRIMARY KEY (id, executed_at),
    CONSTRAINT trades_quantity_positive CHECK (quantity > 0),
    CONSTRAINT trades_price_positive CHECK (price_cents > 0),
    CONSTRAINT trades_distinct_orders CHECK (buy_order_id <> sell_order_id)
) PARTITION BY RANGE (executed_at);
ALTER SEQUENCE trades_id_seq OWNED BY trades.id;

CREATE INDEX trades_buy_order_idx ON trades (buy_order_id);
CREATE INDEX trades_sell_order_idx ON trades (sell_order_id);
CREATE INDEX trades_symbol_executed_idx ON trades (symbol, executed_at DESC);

-- Rows no monthly partition takes (a clock far off, a month not made ahead)
-- land here rather than fail; the retention job moves them out when it makes
-- their month.
CREATE TABLE trades_default PARTITION OF trades DEFAULT;

-- Monthly partitions (UTC months) from the oldest trade to three months
-- ahead; the retention job keeps making them ahead from then on.
DO $$
DECLARE
    m timestamptz := date_trunc('month', coalesce((SELECT min(executed_at) FROM trades_unpartitioned), now()) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    stop timestamptz := date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' + interval '4 months';
BEGIN
    WHILE m < stop LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF trades FOR VALUES FROM (%L) TO (%L)',
            'trades_p' || to_char(m AT TIME ZONE 'UTC', 'YYYY_MM'), m, m + interval '1 month');
        m := m + interval '1 month';
    END LOOP;
END $$;

INSERT INTO trades SELECT * FROM trades_unpartitioned;
DROP TABLE trades_unpartitioned;

-- Where archived months go: attached to a partitioned twin of trades, so the
-- archive reads as one table and prunes by time like the live one.
CREATE TABLE railyard_archive.trades (LIKE trades) PARTITION BY RANGE (executed_at);

-- Closed orders leave `orders` row by row once no live trade references them
-- (`orders` keeps its global keys: the idempotency key and the id trades
-- reference).
CREATE TABLE railyard_archive.orders (LIKE orders INCLUDING DEFAULTS INCLUDING CONSTRAINTS, PRIMARY KEY (id));
CREATE INDEX orders_account_created_idx ON railyard_archive.orders (account_id, created_at DESC);

-- The one read path for history: live rows and archived rows together. A
-- time-bounded query prunes the partitions of both sides.
CREATE VIEW trade_history AS
    SELECT * FROM trades UNION ALL SELECT * FROM railyard_archive.trades;
CREATE VIEW order_history AS
    SELECT * FROM orders UNION ALL SELECT * FROM railyard_archive.orders;
