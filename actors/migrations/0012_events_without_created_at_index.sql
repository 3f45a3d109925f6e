-- Pruning finds events past their retention by id (the oldest first, at
-- most a batch at a time, along the primary key): the index on created_at
-- only cost every event written a second index entry.
DROP INDEX IF EXISTS events_created_at;
