-- Persistent pulls and registered layer chains (issue: layer download manager).
CREATE TABLE pulls (
    id               INTEGER PRIMARY KEY,
    reference        TEXT NOT NULL,
    manifest_digest  TEXT,
    dest             TEXT NOT NULL,
    platform         TEXT,
    options          TEXT NOT NULL,    -- JSON of the Config values that a resume reuses
    state            TEXT NOT NULL,    -- 'pending' | 'done' | 'failed'
    last_error       TEXT,
    created          REAL NOT NULL,
    updated          REAL NOT NULL
);
CREATE INDEX pulls_reference ON pulls (reference, dest);

CREATE TABLE pull_layers (
    pull_id     INTEGER NOT NULL REFERENCES pulls (id) ON DELETE CASCADE,
    position    INTEGER NOT NULL,
    digest      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    media_type  TEXT NOT NULL,
    diff_id     TEXT,
    state       TEXT NOT NULL,          -- 'pending' | 'downloaded' | 'registered' | 'failed'
    PRIMARY KEY (pull_id, position)
);

CREATE TABLE layers (
    chain_id         TEXT PRIMARY KEY,
    diff_id          TEXT NOT NULL,
    parent_chain_id  TEXT,
    blob_digest      TEXT NOT NULL,
    registered       REAL NOT NULL
);
