-- What a trading day needs beyond orders and trades: the listed symbols, the
-- money that enters the ledger (deposits) and the money it keeps (fees), and an
-- idempotency key on every order, so that a client that lost the reply to its
-- COMMIT can ask again without placing the order twice.

CREATE TABLE symbols (
    symbol                TEXT PRIMARY KEY,
    reference_price_cents BIGINT NOT NULL,
    CONSTRAINT symbols_price_positive CHECK (reference_price_cents > 0)
);

-- Money enters the ledger only as deposits; each carries the key its client
-- chose, so a retried deposit is recorded once.
CREATE TABLE deposits (
    id              BIGSERIAL PRIMARY KEY,
    account_id      BIGINT NOT NULL REFERENCES accounts (id),
    amount_cents    BIGINT NOT NULL,
    idempotency_key TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT deposits_amount_positive CHECK (amount_cents > 0),
    CONSTRAINT deposits_idempotency_key UNIQUE (idempotency_key)
);
CREATE INDEX deposits_account_idx ON deposits (account_id);

-- Balances that existed before deposits did are recorded as opening deposits,
-- so that "balances + fees = deposits" holds from the start.
INSERT INTO deposits (account_id, amount_cents, idempotency_key)
SELECT id, balance_cents, 'opening-balance-' || id FROM accounts WHERE balance_cents > 0;

-- The fee each side of a trade pays; part of it may be rebated to the payer.
CREATE TABLE fees (
    id            BIGSERIAL PRIMARY KEY,
    trade_id      BIGINT NOT NULL REFERENCES trades (id),
    account_id    BIGINT NOT NULL REFERENCES accounts (id),
    amount_cents  BIGINT NOT NULL,
    rebated_cents BIGINT NOT NULL DEFAULT 0,
    CONSTRAINT fees_amount_non_negative CHECK (amount_cents >= 0),
    CONSTRAINT fees_rebate_bounded CHECK (rebated_cents BETWEEN 0 AND amount_cents)
);
CREATE INDEX fees_trade_idx ON fees (trade_id);
CREATE INDEX fees_account_idx ON fees (account_id);

-- The client's key for an order, unique per account.
ALTER TABLE orders ADD COLUMN client_order_id TEXT;
ALTER TABLE orders ADD CONSTRAINT orders_client_order_id_key UNIQUE (account_id, client_order_id);

-- Positions are net holdings: a short sale takes them below zero.
ALTER TABLE positions DROP CONSTRAINT positions_quantity_non_negative;
