CREATE TABLE notes (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL);
INSERT INTO notes (body) SELECT 'note ' || i FROM generate_series(1, 100) i;
CREATE TABLE other (id BIGINT PRIMARY KEY);
