-- railyard: risky tables=events
-- Drops a column of a partitioned table: its partitions' data is what the dump must keep.
ALTER TABLE events DROP COLUMN body;
