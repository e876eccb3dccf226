DROP TABLE trades;
DROP TABLE orders;
