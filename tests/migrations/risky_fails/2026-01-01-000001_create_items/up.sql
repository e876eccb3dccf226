CREATE TABLE items (id BIGINT PRIMARY KEY);
INSERT INTO items SELECT generate_series(1, 10);
