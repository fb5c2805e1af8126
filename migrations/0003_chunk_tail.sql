-- A chunk row may describe a chunk's first `length` bytes (the tail of a partial written
-- at a clean stop), so a graceful stop loses no byte; NULL means a whole chunk.
ALTER TABLE chunks ADD COLUMN length INTEGER;
