ALTER TABLE positions ADD CONSTRAINT positions_quantity_non_negative CHECK (quantity >= 0);
ALTER TABLE orders DROP CONSTRAINT orders_client_order_id_key;
ALTER TABLE orders DROP COLUMN client_order_id;
DROP TABLE fees;
DROP TABLE deposits;
DROP TABLE symbols;
