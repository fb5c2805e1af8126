-- Transfers of single blobs, their chunk hashes and every attempt (DESIGN.md, data model).
CREATE TABLE transfers (
    key         TEXT PRIMARY KEY,      -- 'sha256:<hex>' or, for a URL without digest, 'url:<sha256 of url>'
    digest      TEXT,                  -- expected digest when known
    size        INTEGER,               -- expected size when known
    media_type  TEXT,
    source      TEXT,                  -- where it came from, query string removed (no secrets at rest)
    validator   TEXT,                  -- ETag or Last-Modified, for If-Range
    chunk_size  INTEGER NOT NULL,
    offset      INTEGER NOT NULL DEFAULT 0,  -- durable offset: data fdatasync'd up to here
    state       TEXT NOT NULL,         -- see resumer.store.TransferState
    last_error  TEXT,
    created     REAL NOT NULL,
    updated     REAL NOT NULL
);

CREATE TABLE chunks (
    key   TEXT NOT NULL,
    idx   INTEGER NOT NULL,
    xxh3  INTEGER NOT NULL,           -- xxh3-64 of chunk idx, stored signed
    PRIMARY KEY (key, idx)
) WITHOUT ROWID;

CREATE TABLE attempts (
    id               INTEGER PRIMARY KEY,
    key              TEXT NOT NULL,
    run_id           TEXT NOT NULL,    -- one process run of pull/resume/fetch: budgets are per run
    pull_id          INTEGER,
    attempt_no       INTEGER NOT NULL, -- 1..N within the run; 0 for accounting rows
    host             TEXT,
    started          REAL NOT NULL,
    ended            REAL,
    start_offset     INTEGER NOT NULL,
    end_offset       INTEGER,
    wire_bytes       INTEGER NOT NULL DEFAULT 0,
    kept_bytes       INTEGER NOT NULL DEFAULT 0,
    discarded_bytes  INTEGER NOT NULL DEFAULT 0,
    discard_reason   TEXT,
    http_status      INTEGER,
    error            TEXT
);
CREATE INDEX attempts_key ON attempts (key);
