-- Waste per reason, exactly. One attempt can throw bytes away for more than one reason
-- (a server that ignored Range, then a digest mismatch); attempts.discarded_bytes stays the
-- total and attempts.discard_reason the reason that cost the most, and this table holds
-- every reason with its bytes. Rows written before it existed carry their one reason over.
CREATE TABLE attempt_discards (
    attempt_id  INTEGER NOT NULL REFERENCES attempts (id) ON DELETE CASCADE,
    reason      TEXT NOT NULL,
    bytes       INTEGER NOT NULL,
    PRIMARY KEY (attempt_id, reason)
) WITHOUT ROWID;

INSERT INTO attempt_discards (attempt_id, reason, bytes)
    SELECT id, discard_reason, discarded_bytes FROM attempts
    WHERE discard_reason IS NOT NULL AND discarded_bytes > 0;
