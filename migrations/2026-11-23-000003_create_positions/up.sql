-- Holdings per account and symbol, maintained as trades execute.
CREATE TABLE positions (
    account_id BIGINT NOT NULL REFERENCES accounts (id),
    symbol     TEXT NOT NULL,
    quantity   BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, symbol),
    CONSTRAINT positions_quantity_non_negative CHECK (quantity >= 0)
);

-- "Who holds this symbol": the primary key covers lookups by account only.
CREATE INDEX positions_symbol_idx ON positions (symbol);
