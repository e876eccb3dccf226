-- railyard: risky tables=items
-- Fails after its backup: the backup's record must stay.
DELETE FROM items;
SELECT 1 / 0;
