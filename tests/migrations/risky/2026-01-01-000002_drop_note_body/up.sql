-- railyard: risky tables=notes
-- Drops a column: its data is gone unless backed up.
ALTER TABLE notes DROP COLUMN body;
