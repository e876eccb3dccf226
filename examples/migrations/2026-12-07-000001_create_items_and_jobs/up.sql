CREATE TABLE items (
    id BIGSERIAL PRIMARY KEY,
    sku TEXT NOT NULL UNIQUE,
    quantity INTEGER NOT NULL CHECK (quantity >= 0)
);

CREATE TABLE jobs (
    id BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    done_at TIMESTAMPTZ
);
CREATE INDEX jobs_pending_idx ON jobs (id) WHERE done_at IS NULL;
