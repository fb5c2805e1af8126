"""Persistent pulls: an image reference resolved to ordered layers, stored before any byte.

A pull is written once its manifest is resolved and before the first layer byte moves, so
that after a crash ``resume`` knows what to continue without asking the registry again.
Its layers carry a state each (pending → downloaded → registered, or failed), and the
``layers`` table records every registered chain on top of its parent.

No HTTP here: this module only talks to the Store. Every write is one transaction
(``Store.run``), so a power cut leaves either the whole change or none of it.
"""

from __future__ import annotations

import enum
import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .store import Store, from_row


class PullState(enum.StrEnum):
    PENDING = "pending"  # not finished yet: running, interrupted or crashed
    DONE = "done"
    FAILED = "failed"  # the last run gave up; still unfinished, ``resume`` retries it


class LayerState(enum.StrEnum):
    PENDING = "pending"
    DOWNLOADED = "downloaded"  # blob committed to the content store
    REGISTERED = "registered"  # diffID verified, chain recorded on its parent
    FAILED = "failed"  # this layer or one below it failed in the last run


#: States a pull is continued from by a later ``pull`` of the same reference or ``resume``.
UNFINISHED = (PullState.PENDING, PullState.FAILED)


class LayerDescriptor(Protocol):
    """What a pull stores of each layer (``download.LayerJob`` is one)."""

    @property
    def digest(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def media_type(self) -> str: ...

    @property
    def diff_id(self) -> str | None: ...


@dataclass(frozen=True)
class PullLayer:
    position: int
    digest: str
    size: int
    media_type: str
    diff_id: str | None
    state: LayerState


@dataclass(frozen=True)
class Pull:
    id: int
    reference: str
    manifest_digest: str | None
    dest: str
    platform: str | None
    options: dict[str, Any]
    state: PullState
    last_error: str | None
    permanent: bool
    created: float
    updated: float
    layers: tuple[PullLayer, ...]


@dataclass(frozen=True)
class Chain:
    chain_id: str
    diff_id: str
    parent_chain_id: str | None
    blob_digest: str


class Pulls:
    """The pulls, pull_layers and layers tables of one state database."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # --- creating and joining --------------------------------------------------------

    async def create(
        self,
        reference: str,
        *,
        dest: str,
        layers: Sequence[LayerDescriptor],
        manifest_digest: str | None = None,
        platform: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> int:
        """Store a new pull with its ordered layers; returns its id."""
        rows = _layer_rows(layers)
        opts = _dump_options(options)
        now = self.store.clock.time()

        def tx(c: sqlite3.Connection) -> int:
            return _insert(c, reference, dest, manifest_digest, platform, opts, rows, now)

        return await self.store.run(tx)

    async def create_or_join(
        self,
        reference: str,
        *,
        dest: str,
        layers: Sequence[LayerDescriptor],
        manifest_digest: str | None = None,
        platform: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> tuple[int, bool]:
        """The unfinished pull of (reference, dest) for this manifest, else a new one.

        Returns ``(pull_id, joined)``. When the reference now resolves to another manifest
        (the tag moved), the old pull must not be resumed (it would bring the old manifest
        back under the tag): it is forgotten and a new one created. Its partials, blobs
        and chains stay, and the new pull reuses whatever layers the two share.
        Find, close and create run in one transaction, so two callers cannot both create.
        """
        rows = _layer_rows(layers)
        opts = _dump_options(options)
        now = self.store.clock.time()

        def tx(c: sqlite3.Connection) -> tuple[int, bool]:
            for row in c.execute(
                "SELECT id, manifest_digest FROM pulls WHERE reference = ? AND dest = ?"
                " AND state IN (?, ?) ORDER BY id",
                (reference, dest, *UNFINISHED),
            ).fetchall():
                if manifest_digest is None or row[1] in (None, manifest_digest):
                    return int(row[0]), True
                # Resuming it would bring back the tag's old manifest: forget it instead.
                c.execute("DELETE FROM pulls WHERE id = ?", (row[0],))
            return _insert(c, reference, dest, manifest_digest, platform, opts, rows, now), False

        return await self.store.run(tx)

    # --- reading ---------------------------------------------------------------------

    async def get(self, pull_id: int) -> Pull | None:
        rows = await self.store.read("SELECT * FROM pulls WHERE id = ?", (pull_id,))
        if not rows:
            return None
        return _pull(rows[0], await self._layers(pull_id))

    async def find_unfinished(self, reference: str, dest: str) -> Pull | None:
        """The oldest unfinished pull of ``reference`` into ``dest``: a new pull joins it."""
        rows = await self.store.read(
            "SELECT * FROM pulls WHERE reference = ? AND dest = ? AND state IN (?, ?)"
            " ORDER BY id LIMIT 1",
            (reference, dest, *UNFINISHED),
        )
        if not rows:
            return None
        return _pull(rows[0], await self._layers(rows[0]["id"]))

    async def unfinished(self) -> list[Pull]:
        """Every pending or failed pull, in creation order: what ``resume`` continues."""
        rows = await self.store.read(
            "SELECT * FROM pulls WHERE state IN (?, ?) ORDER BY id", UNFINISHED
        )
        return [_pull(r, await self._layers(r["id"])) for r in rows]

    async def _layers(self, pull_id: int) -> tuple[PullLayer, ...]:
        rows = await self.store.read(
            "SELECT * FROM pull_layers WHERE pull_id = ? ORDER BY position", (pull_id,)
        )
        return tuple(from_row(PullLayer, r, state=LayerState(r["state"])) for r in rows)

    # --- state changes ---------------------------------------------------------------

    async def set_layer_state(
        self, pull_id: int, positions: Iterable[int], state: LayerState
    ) -> None:
        params = [(state.value, pull_id, p) for p in positions]
        if not params:
            return
        now = self.store.clock.time()

        def tx(c: sqlite3.Connection) -> None:
            c.executemany(
                "UPDATE pull_layers SET state = ? WHERE pull_id = ? AND position = ?", params
            )
            c.execute("UPDATE pulls SET updated = ? WHERE id = ?", (now, pull_id))

        await self.store.run(tx)

    async def reset_failed_layers(self, pull_id: int) -> None:
        """A new run gives failed layers a fresh start (and a fresh budget)."""
        await self.store.run(
            lambda c: c.execute(
                "UPDATE pull_layers SET state = ? WHERE pull_id = ? AND state = ?",
                (LayerState.PENDING, pull_id, LayerState.FAILED),
            )
        )

    async def set_state(
        self,
        pull_id: int,
        state: PullState,
        *,
        error: str | None = None,
        permanent: bool = False,
    ) -> None:
        """Mark the pull pending (a run starts), done, or failed with its last error;
        ``permanent``: a new run cannot help until something changes (retry.fails_for_good)."""
        now = self.store.clock.time()
        await self.store.run(
            lambda c: c.execute(
                "UPDATE pulls SET state = ?, last_error = ?, permanent = ?, updated = ?"
                " WHERE id = ?",
                (state.value, error, int(permanent), now, pull_id),
            )
        )

    async def all(self) -> list[Pull]:
        """Every stored pull, finished or not, in creation order (``resumer ls``)."""
        rows = await self.store.read("SELECT * FROM pulls ORDER BY id")
        return [_pull(r, await self._layers(r["id"])) for r in rows]

    async def find(self, which: str) -> list[Pull]:
        """The stored pulls that ``which`` names: an id, or a reference as stored."""
        if which.isdigit():
            rows = await self.store.read("SELECT * FROM pulls WHERE id = ?", (int(which),))
        else:
            rows = await self.store.read(
                "SELECT * FROM pulls WHERE reference = ? ORDER BY id", (which,)
            )
        return [_pull(r, await self._layers(r["id"])) for r in rows]

    async def remove(self, pull_id: int) -> None:
        """Forget a pull (its layers go with it; blobs, partials and chains stay)."""
        await self.store.run(lambda c: c.execute("DELETE FROM pulls WHERE id = ?", (pull_id,)))

    # --- registered chains -----------------------------------------------------------

    async def register_chain(
        self,
        chain_id: str,
        diff_id: str,
        parent_chain_id: str | None,
        blob_digest: str,
        *,
        pull_id: int | None = None,
        positions: Iterable[int] = (),
    ) -> None:
        """Record a verified layer on its parent; with ``pull_id``, mark those positions
        registered in the same transaction, so the two never disagree after a crash."""
        now = self.store.clock.time()
        marks = [(LayerState.REGISTERED.value, pull_id, p) for p in positions] if pull_id else []

        def tx(c: sqlite3.Connection) -> None:
            # The first registration of a chain wins: the same chain from another blob
            # (another compression of the same tar) is the same layer.
            c.execute(
                "INSERT OR IGNORE INTO layers (chain_id, diff_id, parent_chain_id, blob_digest,"
                " registered) VALUES (?, ?, ?, ?, ?)",
                (chain_id, diff_id, parent_chain_id, blob_digest, now),
            )
            if marks:
                c.executemany(
                    "UPDATE pull_layers SET state = ? WHERE pull_id = ? AND position = ?", marks
                )
                c.execute("UPDATE pulls SET updated = ? WHERE id = ?", (now, pull_id))

        await self.store.run(tx)

    async def has_chain(self, chain_id: str) -> bool:
        rows = await self.store.read("SELECT 1 FROM layers WHERE chain_id = ?", (chain_id,))
        return bool(rows)

    async def chain(self, chain_id: str) -> Chain | None:
        rows = await self.store.read("SELECT * FROM layers WHERE chain_id = ?", (chain_id,))
        return _chain(rows[0]) if rows else None

    async def chains(self) -> list[Chain]:
        """Every registered chain, in registration order."""
        rows = await self.store.read("SELECT * FROM layers ORDER BY registered, rowid")
        return [_chain(r) for r in rows]


def _layer_rows(layers: Sequence[LayerDescriptor]) -> list[tuple[int, str, int, str, str | None]]:
    return [(i, x.digest, x.size, x.media_type, x.diff_id) for i, x in enumerate(layers)]


def _dump_options(options: Mapping[str, Any] | None) -> str:
    return json.dumps(dict(options or {}), sort_keys=True, separators=(",", ":"))


def _insert(
    c: sqlite3.Connection,
    reference: str,
    dest: str,
    manifest_digest: str | None,
    platform: str | None,
    options: str,
    layers: list[tuple[int, str, int, str, str | None]],
    now: float,
) -> int:
    cur = c.execute(
        "INSERT INTO pulls (reference, manifest_digest, dest, platform, options, state,"
        " created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (reference, manifest_digest, dest, platform, options, PullState.PENDING.value, now, now),
    )
    pull_id = int(cur.lastrowid or 0)
    c.executemany(
        "INSERT INTO pull_layers (pull_id, position, digest, size, media_type, diff_id, state)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(pull_id, *row, LayerState.PENDING.value) for row in layers],
    )
    return pull_id


def _pull(r: sqlite3.Row, layers: tuple[PullLayer, ...]) -> Pull:
    return from_row(
        Pull,
        r,
        options=json.loads(r["options"]),
        state=PullState(r["state"]),
        permanent=bool(r["permanent"]),
        layers=layers,
    )


def _chain(r: sqlite3.Row) -> Chain:
    return from_row(Chain, r)


__all__ = [
    "UNFINISHED",
    "Chain",
    "LayerDescriptor",
    "LayerState",
    "Pull",
    "PullLayer",
    "PullState",
    "Pulls",
]
