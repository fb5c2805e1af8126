"""Garbage collection of partials: the disk never fills with junk (invariant 7).

Runs when an engine opens, before any transfer starts, so no partial is in use:
- files in ``ingest/`` that no transfer row claims are removed (debris of a crash between
  creating a file and recording it, or of a forgotten transfer);
- while the partials exceed ``partial-budget-bytes``, the partials touched longest ago
  are removed, those of no unfinished pull first. Every removal is logged with its reason.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .ingest import Ingest
from .store import TransferState

log = logging.getLogger(__name__)


@dataclass
class GcReport:
    removed: list[tuple[str, int, str]] = field(default_factory=list)  # (name, bytes, reason)
    kept_bytes: int = 0


async def collect_partials(ingest: Ingest, budget: int) -> GcReport:
    """Remove orphan partials, then the oldest ones beyond ``budget`` bytes."""
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
    files = await asyncio.to_thread(_partial_files, ingest.dir)
    by_name = {ingest.partial_path(k).name: k for k in rows}
    live: list[tuple[bool, float, str, Path, int]] = []
    for path, size in files:
        key = by_name.get(path.name)
        row = rows.get(key) if key is not None else None
        if row is None or row.state is TransferState.COMMITTED:
            await asyncio.to_thread(path.unlink, missing_ok=True)
            report.removed.append((path.name, size, "no transfer claims it"))
            continue
        live.append((row.key in wanted, row.updated, row.key, path, size))
    total = sum(item[4] for item in live)
    # Least valuable first: not needed by an unfinished pull, then touched longest ago.
    for _needed, _updated, key, path, size in sorted(live):
        if total <= budget:
            break
        await asyncio.to_thread(path.unlink, missing_ok=True)
        await store.forget_transfer(key)
        total -= size
        report.removed.append((key, size, f"partials over the {budget}-byte budget"))
    report.kept_bytes = total
    for name, size, reason in report.removed:
        log.warning("gc: removed partial %s (%d bytes): %s", name, size, reason)
    return report


def _partial_files(folder: Path) -> list[tuple[Path, int]]:
    out = []
    for p in folder.iterdir():
        if p.is_file():
            out.append((p, p.stat().st_size))
    return out
