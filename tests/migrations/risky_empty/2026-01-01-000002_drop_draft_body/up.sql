-- railyard: risky tables=drafts
-- Drops a column of a table that is still empty on a first boot.
ALTER TABLE drafts DROP COLUMN body;
