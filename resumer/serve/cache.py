"""What the mirror remembers of the manifests it served (migration 0006): each manifest by
digest with its media type, and each tag's last known digest, for when the upstream does
not answer. The bytes themselves are blobs of the root's content store.

No HTTP here: this module only talks to the Store, and holds all of the mirror's SQL.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from ..store import Store

#: the digests gc must keep (with everything they reference): read by gc.py
PINNED_SQL = "SELECT digest FROM mirror_manifests"


@dataclass(frozen=True)
class CachedManifest:
    digest: str
    media_type: str
    size: int


class MirrorCache:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def manifest(self, digest: str) -> CachedManifest | None:
        rows = await self.store.read(
            "SELECT digest, media_type, size FROM mirror_manifests WHERE digest = ?", (digest,)
        )
        return CachedManifest(rows[0][0], rows[0][1], rows[0][2]) if rows else None

    async def tag(self, registry: str, repository: str, tag: str) -> CachedManifest | None:
        rows = await self.store.read(
            "SELECT m.digest, m.media_type, m.size FROM mirror_tags t"
            " JOIN mirror_manifests m ON m.digest = t.digest"
            " WHERE t.registry = ? AND t.repository = ? AND t.tag = ?",
            (registry, repository, tag),
        )
        return CachedManifest(rows[0][0], rows[0][1], rows[0][2]) if rows else None

    async def keep(self, manifest: CachedManifest, tag: tuple[str, str, str] | None = None) -> None:
        """Record a manifest committed to the store, and the tag that named it (one
        transaction: a tag never points to an unrecorded manifest)."""
        now = self.store.clock.time()

        def tx(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO mirror_manifests (digest, media_type, size, stored)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING",
                (manifest.digest, manifest.media_type, manifest.size, now),
            )
            if tag is not None:
                c.execute(
                    "INSERT INTO mirror_tags (registry, repository, tag, digest, updated)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (registry, repository, tag)"
                    " DO UPDATE SET digest = excluded.digest, updated = excluded.updated",
                    (*tag, manifest.digest, now),
                )

        await self.store.run(tx)
