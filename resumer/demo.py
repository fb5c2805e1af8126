"""``resumer demo``: a real ``resumer fetch`` through a lossy local link, one kill, a resume.

Offline and without root: it writes a blob, serves it on 127.0.0.1, puts the seeded
fault-injecting proxy in front (connection cuts, a bandwidth limit), runs ``resumer
fetch`` as a child process, SIGKILLs it once mid-transfer, runs it again, and prints
what crossed the wire against the blob size.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from .cli import _EXTRA_COMMANDS, _HANDLERS, EXIT_FAILED, EXIT_OK
from .config import Config
from .lab.blobserver import StaticServer
from .lab.images import file_digest
from .lab.proxy import FaultProxy, Faults

MiB = 1 << 20


def _register(sub: Any) -> None:
    p = sub.add_parser("demo", help="offline demonstration on a local lossy link")
    p.add_argument("--size-mib", type=int, default=48, help="blob size (default 48)")
    p.add_argument("--rate-mbps", type=float, default=200.0, help="link rate, Mbit/s")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--workdir", type=Path, help="keep files here instead of a temp dir")
    p.add_argument("--progress", choices=["auto", "tty", "plain", "json", "none"])
    p.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")


async def _demo(args: argparse.Namespace, config: Config) -> int:
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return await run_demo(args.workdir, args.size_mib, args.rate_mbps, args.seed)
    with tempfile.TemporaryDirectory(prefix="resumer-demo-") as tmp:
        return await run_demo(Path(tmp), args.size_mib, args.rate_mbps, args.seed)


async def run_demo(work: Path, size_mib: int, rate_mbps: float, seed: int) -> int:
    say = _printer()
    size = size_mib * MiB
    www = work / "www"
    www.mkdir(exist_ok=True)
    blob = random.Random(seed).randbytes(size)
    (www / "layer.bin").write_bytes(blob)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    server = StaticServer(www)
    await server.start()
    # Every connection is cut somewhere between 1/8 and 1/3 of the blob: a client that
    # starts again from byte zero can never finish on this link.
    faults = Faults(cut_after=(size // 8, size // 3), rate=rate_mbps * 1e6 / 8)
    proxy = FaultProxy("127.0.0.1", server.port, faults, seed=seed)
    await proxy.start()
    url = f"http://127.0.0.1:{proxy.port}/layer.bin"
    out, root = work / "layer.out", work / "root"
    say(
        f"resumer demo: {size_mib} MiB blob on 127.0.0.1, link {rate_mbps:g} Mbit/s, "
        f"every connection cut after {size // 8 // MiB}-{size // 3 // MiB} MiB (seed {seed})"
    )
    try:
        say("run 1: resumer fetch, killed with SIGKILL at half way")
        first = await _run_fetch(url, digest, out, root, kill_at=size // 2, say=say)
        wire_1 = proxy.counters.bytes_down
        say(f"  killed at {first['killed_at'] / MiB:.1f} MiB; partial kept in {root}/ingest")
        say("run 2: resumer fetch again: resumes from the checkpoint")
        second = await _run_fetch(url, digest, out, root, kill_at=None, say=say)
    finally:
        await proxy.close()
        await server.close()
    wire = proxy.counters.bytes_down
    ok = second.get("rc") == 0 and out.exists() and file_digest(out) == digest
    stats = second.get("stats", {})
    rows = [
        ("blob size", f"{size:,} B"),
        ("bytes on the wire, both runs", f"{wire:,} B ({wire / size:.3f}x the blob)"),
        ("  run 1 (killed)", f"{wire_1:,} B"),
        ("  run 2 (resumed)", f"{wire - wire_1:,} B"),
        ("connections cut by the link", f"{proxy.counters.cuts}"),
        ("attempts / resumes in run 2", f"{stats.get('attempts')} / {stats.get('resumes')}"),
        ("wasted (thrown away) in run 2", f"{stats.get('wasted_bytes', 0):,} B"),
        (
            "restart from zero",
            "never completes: computed from the schedule, every "
            f"connection is cut before {size // 3 // MiB} MiB",
        ),
        ("result", "verified " + digest[:19] + "…" if ok else "FAILED"),
    ]
    width = max(len(k) for k, _ in rows)
    say("")
    for k, v in rows:
        say(f"  {k.ljust(width)}  {v}")
    return EXIT_OK if ok else EXIT_FAILED


async def _run_fetch(
    url: str, digest: str, out: Path, root: Path, *, kill_at: int | None, say: Any
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "resumer",
        "fetch",
        url,
        "--digest",
        digest,
        "-o",
        str(out),
        "--root",
        str(root),
        "--progress",
        "json",
        "--retry-delay",
        "0.2",
    ]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    result: dict[str, Any] = {}
    shown = -1
    async for raw in proc.stdout:
        msg = json.loads(raw)
        if "stats" in msg:
            result["stats"] = msg["stats"]
            continue
        status = str(msg.get("status", msg.get("error", "")))
        current = msg.get("progressDetail", {}).get("current")
        if current is not None:
            tenth = current * 10 // max(1, msg["progressDetail"].get("total") or 1)
            if tenth != shown:
                shown = tenth
                say(f"  {current / MiB:6.1f} MiB")
            if kill_at is not None and current >= kill_at:
                result["killed_at"] = current
                proc.send_signal(signal.SIGKILL)
                break
        elif status:
            say(f"  {status}")
    result["rc"] = await proc.wait()
    return result


def _printer() -> Any:
    def say(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    return say


_EXTRA_COMMANDS["demo"] = _register
_HANDLERS["demo"] = _demo
