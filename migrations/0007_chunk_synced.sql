-- A chunk's record may be newer than its data on disk: records reach SQLite when a write
-- finishes, the data only at the next fdatasync. After a power cut the newer record (a
-- longer tail, or the whole chunk) no longer matches, and the synced prefix under it would
-- be lost with it, once per stream writing (K streams, K chunks). So each row also keeps
-- the record the last finished fdatasync covered, which reopen falls back to.
-- synced_xxh3 NULL: no sync has covered any of this chunk; synced_length as `length`
-- (NULL: the whole chunk).
ALTER TABLE chunks ADD COLUMN synced_xxh3 INTEGER;
ALTER TABLE chunks ADD COLUMN synced_length INTEGER;
