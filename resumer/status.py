"""``resumer status``: what is unfinished, how far it got, and what it cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Config
from .errors import StoreError
from .progress import format_bytes
from .store import Store, TransferState


async def collect(root: Path, config: Config) -> dict[str, Any]:
    """Read-only view of the root: it does not take the root lock, so it works mid-pull."""
    db = root / "state.db"
    if not db.exists():
        return {"root": str(root), "transfers": [], "pulls": []}
    store = await Store.open(db)
    try:
        transfers = []
        for t in await store.transfers([TransferState.PARTIAL, TransferState.FAILED]):
            attempts = await store.attempts(t.key)
            last_run = attempts[-1].run_id if attempts else None
            run = [a for a in attempts if a.run_id == last_run and a.attempt_no > 0]
            transfers.append(
                {
                    "key": t.key,
                    "source": t.source,
                    "offset": t.offset,
                    "size": t.size,
                    "state": str(t.state),
                    "attempts_last_run": len(run),
                    "wire_bytes": sum(a.wire_bytes for a in attempts),
                    "wasted_bytes": sum(a.discarded_bytes for a in attempts),
                    "last_error": t.last_error,
                }
            )
        pulls = []
        try:
            rows = await store.read(
                "SELECT id, reference, state, last_error FROM pulls WHERE state != 'done'"
                " ORDER BY id"
            )
        except StoreError:
            rows = []
        for r in rows:
            layers = await store.read(
                "SELECT position, digest, size, state FROM pull_layers WHERE pull_id = ?"
                " ORDER BY position",
                (r["id"],),
            )
            pulls.append(
                {
                    "id": r["id"],
                    "reference": r["reference"],
                    "state": r["state"],
                    "last_error": r["last_error"],
                    "layers": [dict(layer) for layer in layers],
                }
            )
        return {"root": str(root), "transfers": transfers, "pulls": pulls}
    finally:
        await store.close()


def render_text(report: dict[str, Any]) -> str:
    lines = [f"root: {report['root']}"]
    if not report["transfers"] and not report["pulls"]:
        lines.append("nothing unfinished")
    for p in report["pulls"]:
        lines.append(
            f"pull {p['id']} {p['reference']}: {p['state']}"
            + (f" ({p['last_error']})" if p["last_error"] else "")
        )
        for layer in p["layers"]:
            lines.append(f"  {layer['position']:>3} {layer['digest'][7:19]} {layer['state']}")
    for t in report["transfers"]:
        size = format_bytes(t["size"]) if t["size"] is not None else "?"
        lines.append(
            f"{t['key'][:19]}  {format_bytes(t['offset'])}/{size}  {t['state']}  "
            f"attempts(last run) {t['attempts_last_run']}  wire {format_bytes(t['wire_bytes'])}"
            f"  wasted {format_bytes(t['wasted_bytes'])}"
            + (f"  last error: {t['last_error']}" if t["last_error"] else "")
        )
    return "\n".join(lines) + "\n"
