"""``resumer status``: what is unfinished, how far it got, and what it cost.

It reads without taking the root lock, so it works while another process pulls. It says
which process holds the root (from ``/proc/locks``, without touching the lock), and tells
an attempt in progress from one that a dead process left open.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from .config import Config
from .errors import UsageError
from .gc import list_orphans
from .progress import format_bytes
from .pulls import LayerState, Pull, Pulls
from .store import AttemptRow, Store, TransferRow, TransferState

#: what ``last_error`` says of an attempt left open by a process that died (SIGKILL, crash)
INTERRUPTED = "interrupted: the process ended mid-attempt (killed or crashed)"


def lock_holder(root: Path) -> int | None:
    """The pid holding the flock on ``ROOT/lock``, read from /proc/locks; None if free
    (or unknown: no /proc). Looking does not take the lock, so it never makes a
    starting pull wait."""
    try:
        st = (root / "lock").stat()
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2e:56789 0 EOF"; "->" marks a blocked waiter
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        with contextlib.suppress(ValueError):
            major, minor, inode = parts[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == want:
                return int(parts[4])
    return None


def _check_root(root: Path) -> Path:
    """The root's state.db; a root that is missing or not a directory is an error that
    says so (``status`` must never report "nothing unfinished" about the wrong place)."""
    if not root.exists():
        raise UsageError(f"{root}: no such root (nothing was ever pulled or fetched here)")
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory, so not a resumer root")
    return root / "state.db"


async def collect(root: Path, config: Config) -> dict[str, Any]:
    """Read-only view of the root: it does not take the root lock, so it works mid-pull,
    and opens the database read-only, so it works on a root this user may not write."""
    db = _check_root(root)
    holder = lock_holder(root)
    report: dict[str, Any] = {
        "root": str(root),
        "in_use_by": holder,
        "transfers": [],
        "pulls": [],
        "orphans": [
            {"name": p.name, "size": size, "mtime": mtime}
            for p, size, mtime in list_orphans(root / "ingest")
        ],
    }
    if not db.exists():
        return report
    store = await Store.open(db, read_only=True)
    try:
        by_key: dict[str, dict[str, Any]] = {}
        for t in await store.transfers([TransferState.PARTIAL, TransferState.FAILED]):
            entry = await _transfer(store, t, running=holder is not None)
            by_key[t.key] = entry
            report["transfers"].append(entry)
        for pull in await Pulls(store).unfinished():
            out_layers = []
            for layer in pull.layers:
                partial = by_key.get(layer.digest)
                out_layers.append(
                    {
                        "position": layer.position,
                        "digest": layer.digest,
                        "size": layer.size,
                        "state": str(layer.state),
                        "offset": partial["offset"] if partial else None,
                        "recorded": partial["recorded"] if partial else None,
                    }
                )
            report["pulls"].append({**_pull_entry(pull), "layers": out_layers})
        return report
    finally:
        await store.close()


def _pull_entry(pull: Pull) -> dict[str, Any]:
    return {
        "id": pull.id,
        "reference": pull.reference,
        "dest": pull.dest,
        "state": str(pull.state),
        "permanent": pull.permanent,
        "last_error": pull.last_error,
    }


async def list_pulls(root: Path, *, finished: bool) -> list[dict[str, Any]]:
    """The stored pulls (``resumer ls``): unfinished ones, or with ``finished`` all."""
    db = _check_root(root)
    if not db.exists():
        return []
    store = await Store.open(db, read_only=True)
    try:
        pulls = await (Pulls(store).all() if finished else Pulls(store).unfinished())
    finally:
        await store.close()
    out = []
    for pull in pulls:
        entry = _pull_entry(pull)
        entry["layers"] = len(pull.layers)
        entry["registered"] = sum(1 for x in pull.layers if x.state is LayerState.REGISTERED)
        entry["updated"] = pull.updated
        out.append(entry)
    return out


def _state_text(pull: dict[str, Any]) -> str:
    if pull["state"] != "failed":
        return str(pull["state"])
    return "failed for good" if pull["permanent"] else "failed (a new run retries it)"


def render_pulls(pulls: list[dict[str, Any]]) -> str:
    if not pulls:
        return "no stored pulls\n"
    rows = [("PULL", "IMAGE", "STATE", "LAYERS", "LAST ERROR")]
    for p in pulls:
        layers = f"{p['registered']}/{p['layers']}"
        rows.append((str(p["id"]), p["reference"], _state_text(p), layers, p["last_error"] or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] + "\n"
        for r in rows
    ).replace("  \n", "\n")


async def _transfer(store: Store, t: TransferRow, *, running: bool) -> dict[str, Any]:
    attempts = await store.attempts(t.key)
    last_run = attempts[-1].run_id if attempts else None
    run = [a for a in attempts if a.run_id == last_run and a.attempt_no > 0]
    chunks = (await store.chunk_map(t.key)).values()
    recorded = sum(length or t.chunk_size for _, length in chunks)
    if t.size is not None:
        recorded = min(recorded, t.size)
    return {
        "key": t.key,
        "source": t.source,
        "size": t.size,
        # offset: durable (fdatasync'd); recorded: chunk hashes on record, which the next
        # run verifies and keeps (after a process crash, all of it)
        "offset": t.offset,
        "recorded": max(recorded, t.offset),
        "state": str(t.state),
        "attempts_last_run": len(run),
        "attempts_total": sum(1 for a in attempts if a.attempt_no > 0),
        "wire_bytes": sum(a.wire_bytes for a in attempts),
        "wasted_bytes": sum(a.discarded_bytes for a in attempts),
        "last_error": _last_error(t, run, running=running),
    }


def _last_error(t: TransferRow, run: list[AttemptRow], *, running: bool) -> str | None:
    """The newest of: an attempt left open by a dead process, an attempt's error, and the
    error the transfer ended with."""
    last = run[-1] if run else None
    if last is not None and last.ended is None:
        if running:
            return None  # in progress in the process that holds the root
        return INTERRUPTED
    errors = [a.error for a in run if a.error and a.error != "cancelled"]
    if t.last_error == "cancelled":
        return "cancelled" + (f" after: {errors[-1]}" if errors else "")
    if t.last_error:
        return t.last_error  # how the transfer ended (budget exhausted names the cause)
    return errors[-1] if errors else None


def render_text(report: dict[str, Any]) -> str:
    lines = [f"root: {report['root']}"]
    if report.get("in_use_by") is not None:
        lines.append(f"in use by pid {report['in_use_by']} (a pull or resume is running)")
    if not report["transfers"] and not report["pulls"] and not report["orphans"]:
        lines.append("nothing unfinished")
    for p in report["pulls"]:
        lines.append(
            f"pull {p['id']} {p['reference']}: {_state_text(p)}"
            + (f" ({p['last_error']})" if p["last_error"] else "")
        )
        for layer in p["layers"]:
            done = ""
            if layer["recorded"] is not None:
                done = f"  {format_bytes(layer['recorded'])}/{format_bytes(layer['size'])}"
            lines.append(f"  {layer['position']:>3} {layer['digest'][7:19]} {layer['state']}{done}")
    if report["transfers"]:
        lines.append("partial transfers:")
    for t in report["transfers"]:
        size = format_bytes(t["size"]) if t["size"] is not None else "?"
        lines.append(
            f"  {t['key'][:19]}  {format_bytes(t['recorded'])}/{size}"
            f" (durable {format_bytes(t['offset'])})  {t['state']}"
            f"  attempts(last run) {t['attempts_last_run']}"
            f"  wire {format_bytes(t['wire_bytes'])}  wasted {format_bytes(t['wasted_bytes'])}"
            + (f"  last error: {t['last_error']}" if t["last_error"] else "")
        )
    if report["orphans"]:
        total = sum(o["size"] for o in report["orphans"])
        lines.append(
            f"kept aside (no record; adopted if the same blob is fetched again, deleted by"
            f" `resumer prune` or the partial budget): {len(report['orphans'])} partials,"
            f" {format_bytes(total)}"
        )
        for o in report["orphans"]:
            lines.append(f"  {o['name'][:19]}  {format_bytes(o['size'])}")
    return "\n".join(lines) + "\n"
