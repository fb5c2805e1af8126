"""``resumer demo``: a real ``resumer pull`` over a lossy local link, one SIGKILL, a resume.

Offline and without root. It builds a 4-layer gzip image (compressible text and random
layers), serves it from the lab's offline registry on 127.0.0.1, puts the seeded
fault-injecting proxy in front (a bandwidth limit, and every connection reset somewhere
between 1/8 and 1/4 of the image), and then:

1. runs ``resumer pull`` as a child process, following its ``--progress json`` lines,
   and SIGKILLs it once half of the layer bytes have arrived;
2. runs ``resumer resume`` until the pull is done (once, normally);
3. checks the sha256 of every blob in the resulting OCI image layout itself;
4. measures the baseline: the same link, the same seeded cut schedule, and a client that
   restarts every blob from byte zero, with docker's 5 attempts per blob;
5. prints what crossed the wire against the image size, and against that baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import progress as P
from .config import Config
from .errors import UsageError
from .events import Event, Status
from .lab.images import BuiltImage, LayerSpec, build_image, file_digest
from .lab.proxy import FaultProxy, Faults
from .lab.registry import FromZeroResult, OfflineRegistry, pull_from_zero

EXIT_OK, EXIT_FAILED = 0, 1
MiB = 1 << 20
REPO, TAG = "demo/app", "1"
#: Docker's default max-download-attempts: the baseline's budget per blob, and resumer's.
ATTEMPTS = 5
#: resumer's retry step for the demo (docker's is 5 s: 5, 10, 15 … s between attempts).
RETRY_DELAY = 0.2
#: Compressed share of the image per layer, and whether it is compressible text.
LAYERS = ((10 / 48, True), (18 / 48, False), (15 / 48, False), (5 / 48, True))
#: How much the generated text shrinks under gzip (measured: ~2.9x).
TEXT_RATIO = 2.9
#: Statuses the condensed (non-tty) display leaves out; the tty shows them all.
QUIET = (Status.PULLING_FS_LAYER, Status.WAITING, Status.VERIFYING, Status.EXTRACTING)
#: More runs than this and the demo gives up (one killed, normally one resume).
MAX_RUNS = 4

Say = Callable[[str], None]


async def run(args: argparse.Namespace, config: Config) -> int:
    """``resumer demo``; the CLI parses its flags (see cli.py)."""
    progress = args.progress or "auto"
    if progress == "auto":
        progress = "tty" if sys.stdout.isatty() else "plain"
    options = DemoOptions(
        size_mib=args.size_mib,
        rate_mbps=args.rate_mbps,
        seed=args.seed,
        progress=progress,
        kill_at=args.kill_at,
        baseline=not args.no_baseline,
    )
    if args.workdir is not None:
        check_workdir(args.workdir)
        return await run_demo(args.workdir, options)
    with tempfile.TemporaryDirectory(prefix="resumer-demo-") as tmp:
        return await run_demo(Path(tmp), options)


def check_workdir(workdir: Path) -> None:
    """Make ``--workdir`` ready, or refuse it (``UsageError``) before anything is built.

    The demo replaces its ``image``, ``registry`` and ``root`` there, so a directory that
    holds anything else, and was not made by an earlier demo, is refused: it may be
    someone's data (a resumer root, say, which has a ``root``-like layout of its own).
    """
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"--workdir {workdir}: not a directory; give a new or empty directory")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        contents = {p.name for p in workdir.iterdir()}
    except OSError as exc:
        raise UsageError(f"--workdir {workdir}: cannot use it: {exc.strerror or exc}") from exc
    if contents and _WORKDIR_MARK not in contents:
        raise UsageError(
            f"--workdir {workdir}: not empty and not made by resumer demo "
            "(the demo replaces what it finds there); give a new or empty directory"
        )
    try:
        (workdir / _WORKDIR_MARK).write_text("made by resumer demo; safe to delete\n")
    except OSError as exc:
        raise UsageError(f"--workdir {workdir}: not writable: {exc.strerror or exc}") from exc


#: marks a --workdir as the demo's own, so a later demo may replace what it holds
_WORKDIR_MARK = ".resumer-demo"


@dataclass(frozen=True)
class DemoOptions:
    size_mib: int = 48
    rate_mbps: float = 200.0
    seed: int = 7
    progress: str = "plain"  # tty | plain | json | none
    kill_at: float = 0.5
    baseline: bool = True


def build_demo_image(workdir: Path, size_mib: int, seed: int) -> BuiltImage:
    """The demo image: ~``size_mib`` MiB of gzip layers, text and random, from ``seed``."""
    size = size_mib * MiB
    specs = [
        LayerSpec(
            size=int(share * size * (TEXT_RATIO if text else 1)),
            compression="gzip",
            compressible=text,
            files=8 if text else 2,
        )
        for share, text in LAYERS
    ]
    return build_image(workdir, specs, seed=seed)


def image_bytes(image: BuiltImage) -> int:
    """Everything a pull must bring: layers, config and manifest."""
    return image.total_layer_bytes() + len(image.config) + len(image.manifest)


async def run_demo(work: Path, opts: DemoOptions) -> int:
    say = _printer()
    started = time.monotonic()
    for sub in ("image", "registry", "root"):
        shutil.rmtree(work / sub, ignore_errors=True)
    image = await asyncio.to_thread(build_demo_image, work / "image", opts.size_mib, opts.seed)
    total = image_bytes(image)
    layer_total = image.total_layer_bytes()
    root = work / "root"
    cut_lo, cut_hi = opts.size_mib * MiB // 8, opts.size_mib * MiB // 4
    faults = Faults(cut_after=(cut_lo, cut_hi), rate=opts.rate_mbps * 1e6 / 8)
    biggest = max(layer.size for layer in image.layers)
    say(
        f"resumer demo: a {len(image.layers)}-layer image, {_mib(total)} MiB of gzip "
        f"(text and random), served by an offline registry on 127.0.0.1"
    )
    say(
        f"  the link: {opts.rate_mbps:g} Mbit/s, and every connection reset after "
        f"{_mib(cut_lo)}-{_mib(cut_hi)} MiB (seed {opts.seed}); retry delay {RETRY_DELAY} s"
    )
    runs: list[RunResult] = []
    async with OfflineRegistry(work / "registry", accept_pushes=False) as registry:
        registry.add_image(REPO, TAG, image)
        async with FaultProxy("127.0.0.1", registry.port, faults, seed=opts.seed) as proxy:
            reference = f"127.0.0.1:{proxy.port}/{REPO}:{TAG}"
            common = ["--root", str(root), "--progress", "json", "--retry-delay", str(RETRY_DELAY)]
            say("")
            say(f"$ resumer pull {reference}    (SIGKILLed at {opts.kill_at:.0%} of the layers)")
            display = _Display(opts.progress, say)
            run = await _run_child(
                ["pull", reference, *common],
                display,
                kill_after=int(opts.kill_at * layer_total),
            )
            run.wire = proxy.counters.bytes_down
            runs.append(run)
            if run.killed_at is not None:
                display.note(
                    f"** SIGKILL at {_mib(run.killed_at)} of {_mib(layer_total)} MiB: "
                    f"the process is gone, its partials stay in {root / 'ingest'}"
                )
            while runs[-1].rc != 0 or runs[-1].killed_at is not None:
                if len(runs) >= MAX_RUNS:
                    break
                say("")
                say("$ resumer resume")
                display = _Display(opts.progress, say)
                before = proxy.counters.bytes_down
                run = await _run_child(["resume", *common], display, kill_after=None)
                run.wire = proxy.counters.bytes_down - before
                runs.append(run)
            wire = proxy.counters.bytes_down
            cuts = proxy.counters.cuts
        baseline: FromZeroResult | None = None
        baseline_wire = 0
        if opts.baseline:
            say("")
            say(
                f"baseline: the same link and seeded cut schedule, every blob restarted "
                f"from byte zero on each attempt, {ATTEMPTS} attempts per blob…"
            )
            async with FaultProxy("127.0.0.1", registry.port, faults, seed=opts.seed) as bproxy:
                baseline = await pull_from_zero(
                    f"http://127.0.0.1:{bproxy.port}", REPO, TAG, attempts=ATTEMPTS
                )
                baseline_wire = bproxy.counters.bytes_down
    verified, problem = await asyncio.to_thread(verify_layout, root, image)
    elapsed = time.monotonic() - started

    kills = sum(r.killed_at is not None for r in runs)
    rows: list[tuple[str, str]] = [
        ("image", f"{len(image.layers)} layers + config + manifest: {total:,} B"),
        (
            "resumer on the wire",
            f"{wire:,} B = {wire / total:.3f}x the image\n"
            f"{_n(len(runs), 'run')}, {_n(cuts, 'connection reset')}, {_n(kills, 'SIGKILL')}",
        ),
    ]
    for i, r in enumerate(runs):
        what = "pull, killed" if r.killed_at is not None else ("pull" if i == 0 else "resume")
        if r.rc not in (0, None) and r.killed_at is None:
            what += f", exit {r.rc}"
        s = r.stats
        detail = ""
        if s:
            detail = (
                f": {s.get('attempts')} attempts, {s.get('resumes')} resumed, "
                f"{s.get('wasted_bytes', 0):,} B thrown away"
            )
        rows.append((f"  run {i + 1} ({what})", f"{r.wire:,} B{detail}"))
    if baseline is not None:
        if baseline.complete:
            outcome = (
                f"completes, {baseline.attempts} attempts\n"
                f"{baseline_wire:,} B = {baseline_wire / total:.2f}x the image on the wire"
            )
        else:
            missing = baseline.blobs - baseline.blobs_done
            outcome = (
                f"never completes: {missing} of {baseline.blobs} blobs missing after "
                f"{ATTEMPTS} attempts each\n"
                f"{baseline_wire:,} B = {baseline_wire / total:.2f}x the image on the wire, "
                "for an incomplete image"
            )
        outcome += "\n(measured: same seed and cut schedule, each attempt from byte zero)"
    else:
        outcome = (
            f"never completes: every connection is reset by {_mib(cut_hi)} MiB,\n"
            f"and the biggest layer is {_mib(biggest)} MiB "
            "(computed from the schedule, not measured: --no-baseline)"
        )
    rows.append(("restart from zero", outcome))
    rows.append(
        (
            "result",
            f"verified {image.manifest_digest[:19]}…: every blob's sha256 checked"
            if verified
            else f"FAILED: {problem}",
        )
    )
    rows.append(("demo time", f"{elapsed:.1f} s"))
    width = max(len(k) for k, _ in rows)
    say("")
    for k, v in rows:
        first, *more = v.split("\n")
        say(f"  {k.ljust(width)}  {first}")
        for line in more:
            say(f"  {' ' * width}  {line}")
    return EXIT_OK if verified else EXIT_FAILED


def verify_layout(root: Path, image: BuiltImage) -> tuple[bool, str]:
    """Check the pulled OCI layout on our own: the tag, then the sha256 of every blob."""
    try:
        index = json.loads((root / "index.json").read_text())
    except (OSError, ValueError) as exc:
        return False, f"no readable index.json in {root}: {exc}"
    entries = [
        m
        for m in index.get("manifests", [])
        if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == TAG
    ]
    if not entries or entries[0].get("digest") != image.manifest_digest:
        return False, f"index.json does not name {image.manifest_digest} as {TAG}"
    wanted = [(image.manifest_digest, len(image.manifest))]
    wanted += [(image.config_digest, len(image.config))]
    wanted += [(layer.digest, layer.size) for layer in image.layers]
    for digest, size in wanted:
        path = root / "blobs" / "sha256" / digest.removeprefix("sha256:")
        if not path.exists():
            return False, f"blob {digest} is missing"
        if path.stat().st_size != size or file_digest(path) != digest:
            return False, f"blob {digest} is not what the registry served"
    return True, ""


# --------------------------------------------------------------------------- child runs


@dataclass
class RunResult:
    rc: int | None = None
    killed_at: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    wire: int = 0


async def _run_child(command: list[str], display: _Display, *, kill_after: int | None) -> RunResult:
    """Run ``python -m resumer COMMAND``, show its JSON lines, SIGKILL it past ``kill_after``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "resumer", *command, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    result = RunResult()
    done: dict[str, int] = {}  # layer id → bytes it has, as the child reports them
    totals: dict[str, int] = {}
    try:
        async for raw in proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if "stats" in msg:
                result.stats = msg["stats"]
                continue
            display.message(raw.decode().rstrip("\n"), msg)
            lid, detail = msg.get("id"), msg.get("progressDetail") or {}
            if lid and detail.get("current") is not None:
                done[lid] = int(detail["current"])
                totals[lid] = int(detail.get("total") or 0)
            elif lid in totals and msg.get("status") == Status.DOWNLOAD_COMPLETE:
                done[lid] = totals[lid]
            if kill_after is not None and sum(done.values()) >= kill_after:
                result.killed_at = sum(done.values())
                proc.send_signal(signal.SIGKILL)
                break
    except BaseException:
        # Interrupted (Ctrl-C, a closed stdout): leave no pull running behind us.
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    result.rc = await proc.wait()
    return result


class _Display:
    """Docker-like lines for the child's JSON events: live on a tty, condensed otherwise.

    Condensed: one line per status change, and Downloading lines at each quarter only.
    """

    def __init__(self, mode: str, say: Say) -> None:
        self.mode = mode
        self.say = say
        self.tty = P.TtyRenderer(sys.stdout) if mode == "tty" else None
        self._last: dict[str, tuple[str, int]] = {}

    def message(self, raw: str, msg: dict[str, Any]) -> None:
        if self.mode == "none":
            return
        if self.mode == "json":
            self.say(raw)
            return
        event = _event(msg)
        if self.tty is not None:
            self.tty(event)
            return
        if event.error is not None:
            self.say(f"  error: {event.error}")
            return
        if event.status in QUIET:
            return
        quarter = -1
        if event.status == Status.DOWNLOADING and event.total:
            quarter = 4 * (event.current or 0) // event.total
        key = (event.status, quarter)
        if self._last.get(event.id) == key and event.status not in (
            Status.RESUMING,
            Status.RETRYING,
        ):
            return
        self._last[event.id] = key
        detail = ""
        if event.status == Status.DOWNLOADING and event.total:
            detail = f" {P.format_bytes(event.current or 0)}/{P.format_bytes(event.total)}"
        prefix = f"{event.id}: " if event.id else ""
        self.say(f"  {prefix}{event.text}{detail}")

    def note(self, text: str) -> None:
        self.say(f"  {text}")


def _event(msg: dict[str, Any]) -> Event:
    """Rebuild the library's event from one line of ``--progress json``."""
    if "error" in msg:
        return Event("", "", error=str(msg["error"]))
    status = str(msg.get("status", ""))
    lid = str(msg.get("id", ""))
    detail = msg.get("progressDetail") or {}
    for kind, prefix in ((Status.RESUMING, "Resuming from "), (Status.RETRYING, "Retrying in ")):
        if status.startswith(prefix):
            try:
                return Event(lid, kind, value=int(status[len(prefix) :].split()[0]))
            except (ValueError, IndexError):
                break
    return Event(lid, status, detail.get("current"), detail.get("total"))


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _mib(n: int) -> str:
    return f"{n / MiB:.1f}"


def _printer() -> Say:
    def say(text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    return say
