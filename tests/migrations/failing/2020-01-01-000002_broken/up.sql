CREATE TABLE half_done (id INT);
INSERT INTO half_done VALUES (1);
SELECT 1 / 0;
