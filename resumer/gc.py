"""Garbage collection of partials: the disk never fills with junk, and nothing that might
still be useful is deleted silently (invariants 2 and 7).

Runs when an engine opens, before any transfer starts, so no partial is in use:
- a file in ``ingest/`` that no transfer row claims (the state database was lost, emptied
  or replaced, or a crash came between creating a file and recording it) is *kept aside*
  in ``ingest/orphans/``: its bytes may be all a metered link has delivered so far. A later
  transfer of the same key adopts it (see ``Ingest.open``); ``status`` reports the rest;
- a file whose transfer is committed, with its blob in the store, is a leftover of the
  commit and is removed (the verified copy is in ``blobs/``);
- while partials and orphans together exceed ``partial-budget-bytes``, the least valuable
  go first: orphans, then partials of no unfinished pull, each oldest first.

``prune_orphans`` removes the orphans on request (``resumer prune``), and so does
``prune_blobs`` with the committed blobs nothing needs: the content store never gives a
blob away (``fetch -o`` publishes a copy), so without it a root that only fetches would
grow for ever. Every removal and every move is logged with its reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .content.partial import Ingest
from .layout import Layout, fsync_dir, make_dirs
from .serve.cache import PINNED_SQL
from .store import TransferState

log = logging.getLogger(__name__)

ORPHANS = "orphans"


@dataclass
class GcReport:
    removed: list[tuple[str, int, str]] = field(default_factory=list)  # (name, bytes, reason)
    kept_aside: list[tuple[str, int]] = field(default_factory=list)  # moved to orphans/
    kept_bytes: int = 0


def orphans_dir(ingest: Ingest) -> Path:
    return ingest.dir / ORPHANS


def list_orphans(ingest_dir: Path) -> list[tuple[Path, int, float]]:
    """(path, size, mtime) of every partial kept aside, oldest first."""
    return sorted(
        ((p, st.st_size, st.st_mtime) for p, st in _files(ingest_dir / ORPHANS)),
        key=lambda item: item[2],
    )


async def collect_partials(ingest: Ingest, budget: int) -> GcReport:
    """Keep unclaimed partials aside, drop commit leftovers, then enforce ``budget``."""
    report = GcReport()
    store = ingest.store
    rows = {t.key: t for t in await store.transfers()}
    wanted = {
        r[0]
        for r in await store.read(
            "SELECT DISTINCT l.digest FROM pull_layers l JOIN pulls p ON p.id = l.pull_id"
            " WHERE p.state != 'done'"
        )
    }
    files = await asyncio.to_thread(_files, ingest.dir)
    by_name = {ingest.partial_path(k).name: k for k in rows}
    aside: list[tuple[Path, int]] = []
    live: list[tuple[bool, float, str, Path, int]] = []
    for path, st in files:
        key = by_name.get(path.name)
        row = rows.get(key) if key is not None else None
        if row is not None and row.state is TransferState.COMMITTED:
            if row.digest is not None and ingest.has_blob(row.digest, row.size):
                await asyncio.to_thread(path.unlink, missing_ok=True)
                report.removed.append((path.name, st.st_size, "its blob is committed"))
                continue
            row = None  # committed once, but its blob is gone: the bytes may serve again
        if row is None and st.st_size == 0:
            # Created, then cut before a byte was synced: there is nothing to keep aside.
            await asyncio.to_thread(path.unlink, missing_ok=True)
            report.removed.append((path.name, 0, "empty, and no transfer claims it"))
            continue
        if row is None:
            aside.append((path, st.st_size))
            continue
        live.append((row.key in wanted, row.updated, row.key, path, st.st_size))
    if aside:
        await asyncio.to_thread(_keep_aside, ingest, [p for p, _ in aside])
        report.kept_aside.extend((p.name, n) for p, n in aside)
    orphans = await asyncio.to_thread(list_orphans, ingest.dir)
    total = sum(item[4] for item in live) + sum(n for _, n, _ in orphans)
    # Least valuable first: orphans (oldest first), then partials of no unfinished pull,
    # then the rest, each touched longest ago first.
    for path, size, _ in orphans:
        if total <= budget:
            break
        await asyncio.to_thread(path.unlink, missing_ok=True)
        total -= size
        report.removed.append((path.name, size, f"orphans over the {budget}-byte budget"))
    for _needed, _updated, key, path, size in sorted(live):
        if total <= budget:
            break
        await asyncio.to_thread(path.unlink, missing_ok=True)
        await store.forget_transfer(key)
        total -= size
        report.removed.append((key, size, f"partials over the {budget}-byte budget"))
    report.kept_bytes = total
    for name, size in report.kept_aside:
        log.warning(
            "gc: partial %s (%d bytes) has no record; kept aside in %s (see resumer status)",
            name,
            size,
            orphans_dir(ingest),
        )
    for name, size, reason in report.removed:
        log.warning("gc: removed partial %s (%d bytes): %s", name, size, reason)
    return report


async def prune_orphans(ingest: Ingest) -> list[tuple[str, int]]:
    """Remove every partial kept aside (``resumer prune``); returns (name, bytes)."""
    removed = []
    for path, size, _ in await asyncio.to_thread(list_orphans, ingest.dir):
        await asyncio.to_thread(path.unlink, missing_ok=True)
        removed.append((path.name, size))
        log.warning("prune: removed orphan partial %s (%d bytes)", path.name, size)
    if removed:
        await asyncio.to_thread(fsync_dir, orphans_dir(ingest))
    return removed


async def prune_blobs(ingest: Ingest, *, before: float) -> list[tuple[str, int]]:
    """Remove the root's committed blobs that nothing needs; returns (digest, bytes).

    Needed, so kept: every blob reachable from an image in the root's ``index.json``
    (its manifests, configs and layers) or from a stored pull of any state (its manifest
    and layers: ``resume`` and "Already exists" count on them) or from a manifest that
    ``resumer serve`` cached (its clients count on it offline), and every blob created
    or linked at or after ``before`` (the start of the run: one still being written by
    a pull into this root as its ``--dest``). What goes is what ``fetch`` alone brought
    in, and what ``rm`` let go. A corrupt ``index.json`` raises ``StoreError`` before
    anything is removed: what it references cannot be known.
    """
    layout, content = ingest.layout, ingest.layout.content
    pinned = await _pinned(ingest)
    needed = await asyncio.to_thread(_reachable, layout, pinned)
    doomed = [
        (digest, st.st_size)
        for digest, st in await asyncio.to_thread(content.blobs)
        if digest not in needed and max(st.st_mtime, st.st_ctime) < before
    ]
    await content.remove(digest for digest, _ in doomed)
    for digest, size in doomed:
        log.warning("prune: removed blob %s (%d bytes): no image or pull needs it", digest, size)
    return doomed


async def _pinned(ingest: Ingest) -> set[str]:
    """Manifest digests the root's images and stored pulls start from, and pull layers."""
    images = await asyncio.to_thread(ingest.layout.images)
    rows = await ingest.store.read(
        "SELECT manifest_digest FROM pulls WHERE manifest_digest IS NOT NULL"
        " UNION SELECT digest FROM pull_layers UNION " + PINNED_SQL
    )
    return {e.digest for e in images} | {r[0] for r in rows}


def _reachable(layout: Layout, roots: set[str]) -> set[str]:
    """``roots`` and every blob their manifests (and indexes, recursively) reference."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        digest = todo.pop()
        if digest in seen:
            continue
        seen.add(digest)
        todo.extend(_references(layout, digest))
    return seen


#: larger than any manifest: a blob this big is a layer, not parsed
_MAX_MANIFEST = 4 << 20


def _references(layout: Layout, digest: str) -> list[str]:
    """What the blob ``digest`` references, if it is a manifest or index here."""
    path = layout.blob_path(digest)
    try:
        if path.stat().st_size > _MAX_MANIFEST:
            return []
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return []  # not here, or a layer: it references nothing
    if not isinstance(doc, dict):
        return []
    described = [doc.get("config"), doc.get("subject")]
    for key in ("layers", "manifests", "blobs"):
        if isinstance(doc.get(key), list):
            described.extend(doc[key])
    return [d["digest"] for d in described if isinstance(d, dict) and _is_digest(d.get("digest"))]


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and value.startswith("sha256:") and len(value) == 71


def _keep_aside(ingest: Ingest, paths: list[Path]) -> None:
    dest = orphans_dir(ingest)
    make_dirs(dest)
    for path in paths:
        target = dest / path.name
        # An older orphan of the same key: keep the larger, which holds more bytes.
        if target.exists() and target.stat().st_size >= path.stat().st_size:
            path.unlink()
            continue
        os.replace(path, target)
    # Both directories: the move must not come undone, nor leave the file in both.
    fsync_dir(dest)
    fsync_dir(ingest.dir)


def _files(folder: Path) -> list[tuple[Path, os.stat_result]]:
    out = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.is_file(follow_symlinks=False):
            out.append((Path(entry.path), entry.stat(follow_symlinks=False)))
    return out
