-- What `resumer serve` keeps of the manifests it served: every manifest by digest (its
-- media type, so a HEAD or GET answers with the right Content-Type without parsing it
-- again), and each tag's last known digest, served while the upstream does not answer.
-- gc keeps every blob these manifests reference.
CREATE TABLE mirror_manifests (
    digest      TEXT PRIMARY KEY,
    media_type  TEXT NOT NULL,
    size        INTEGER NOT NULL,
    stored      REAL NOT NULL
) WITHOUT ROWID;

CREATE TABLE mirror_tags (
    registry    TEXT NOT NULL,
    repository  TEXT NOT NULL,
    tag         TEXT NOT NULL,
    digest      TEXT NOT NULL REFERENCES mirror_manifests (digest),
    updated     REAL NOT NULL,
    PRIMARY KEY (registry, repository, tag)
) WITHOUT ROWID;
