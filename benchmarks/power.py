"""Power cuts: SIGKILL the puller every T seconds and restart it, until done or 30 restarts.

A seeded ~64 MiB image sits in the real CNCF registry on 127.0.0.1, behind a fresh
``python -m resumer.lab.proxy`` per run with a 20 MB/s rate limit and no cuts, so the
pull alone takes ~3.4 s and T = 1 s really interrupts it. Each run starts from an empty
root/destination; the tool is started, SIGKILLed (its whole process group) T seconds
after each start, and started again immediately, with the same root and destination:

- ``resumer pull`` restarted with the same ``resumer pull`` command;
- the same with 256 KiB chunks instead of 1 MiB (what a kill can cost is the chunk in
  progress per concurrent layer);
- ``resumer pull`` restarted with ``resumer resume`` (the stored pull, stored options);
- ``skopeo copy docker://… oci:…`` restarted with the same copy (skopeo reuses layers
  already complete in the OCI destination; partial ones start again);
- containerd: a ``containerd`` daemon of its own (temp root, state, socket; CRI plugin
  disabled) and ``ctr -a SOCK -n bench images pull --plain-http REF``; a kill SIGKILLs
  the daemon and the client, a restart starts the daemon again on the same root (with an
  emptied state directory, as /run after a power cut) and reruns the pull. The life's
  clock starts with the daemon, so its start-up is inside T like resumer's.

- dockerd (the seed): a daemon of its own (``resumer.lab.dockerd``: vfs, own data root,
  fresh per run, exec root and socket) and ``docker pull REF``, killed and restarted like
  containerd; after each SIGKILL its exec root is cleared (a reboot clears /run).

Two scenarios: kill every T in {1, 2, 5} s at 20 MB/s (every tool), and DESIGN's
containerd figure, kill every U(0.6, 1.2) s (seeded per run, the same draws for every
tool in a round) at 10 MB/s (resumer, containerd and dockerd; skopeo cannot finish a pull that
is cut before 1.2 s).

Metrics: completed within 30 restarts?, wall time (all lives together), wire bytes
(the proxy's ``bytes_down`` over all lives) / image payload, restarts needed.

A SIGKILL keeps the page cache, so those scenarios are process crashes. ``--scenario
powercut`` (results in ``results/power_cut_fs.{md,json,png}``, so it never erases
``power.*``; ``--scenario kill`` runs only the above, the default ``all`` both) cuts the
power for real, on ``resumer.lab.powercut``: a fresh FUSE mount per run holds resumer's
root and OCI destination, or containerd's root (content store, bolt metadata and its
snapshots: ``--snapshotter native``, since overlayfs cannot stack on FUSE; the daemon's
state, socket, temp and config stay off the mount, the state emptied at each boot as /run
is). Each life lasts T ~ U(1.0, 2.0) s, seeded per round (the same draws for every tool);
at T the tool (and containerd's daemon) is SIGSTOPped with the proxy (the link goes with
the power: a frozen process's kernel would otherwise still take bytes into its socket
buffers, counted as delivered), the file system cut (every write not yet fsynced is
gone, data and metadata), the processes SIGKILLed and reaped, the proxy continued, the
file system remounted, and the tool started again: ``resumer pull`` with the same
command, the ``resumer resume`` variant after its first life, containerd as above, up to
30 lives. A finished pull gets one more cut, to see that its result survives it.

Why these values: at 10 MB/s the image takes 6.7 s of link time, and every life also
pays the tool's start-up (resumer's first progress comes 0.4–1 s after its start here),
so no life of at most 2 s can finish it: every run is cut at least five times and keeps
going only by what its lives made durable. And 1–2 s is the regime where the sync
interval bites: three transfers share the link, ~3.3 MB/s each, so a transfer passes its
4 MiB sync point about once per life. 3 rounds (medians) and the cap of 30 lives keep a
run of the three tools under ~10 minutes.

Power-cut metrics: completed (exit 0 with every layer on the mount) and lives used, wire
bytes / payload against the goal 1 + 4 MiB × cuts / payload, the wire waste per cut
((wire − payload) / cuts), and the loss of every cut: resumer, per layer the last
``progressDetail.current`` before the cut minus the offset a later life starts it from
(``Resuming from N``); containerd, per layer the bytes held at the freeze (committed
blob, else its ingest ``data`` size) minus those held after the reboot. A cut's bound is
one sync interval (4 MiB) per transfer running at it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from resumer.lab.dockerd import Dockerd, DockerdError
from resumer.lab.dockerd import versions as dockerd_versions
from resumer.lab.powercut import PowerCutError, PowerCutFS, unavailable_reason

from . import common, image_bench
from .common import BenchImage
from .image_bench import Ctx

NAME = "power"
SEED = 20240606
LAYERS_MIB = (4, 12, 48)  # the same shape as the cuts image (another seed)
RATE = 20e6  # bytes/s: ~3.4 s per pull, so a kill every 1 s lands mid-transfer
PERIODS = (1.0, 2.0, 5.0)
RANGE = (0.6, 1.2)  # DESIGN's containerd figure: SIGKILL every U(0.6, 1.2) s …
RANGE_RATE = 10e6  # … at 10 MB/s …
RANGE_ROUNDS = 5  # … 5 runs
RANGE_TOOLS = ("resumer_pull", "resumer_256k", "containerd", "dockerd")
MAX_RESTARTS = 30
LIFE_LIMIT_S = 120.0  # a life that outlives T is killed anyway; this bounds the last one
CTD_NAMESPACE = "bench"
CTD_READY_LIMIT_S = 10.0  # the daemon's socket must appear within this (else the life fails)


Life = Callable[[Ctx, int, float, Path], int | None]  # (ctx, life index, T, log) → exit code


@dataclass(frozen=True)
class Tool:
    key: str
    label: str
    first: Callable[[Ctx], list[str]]
    again: Callable[[Ctx], list[str]]
    life: Life | None = None  # None: one process group, run ``first``/``again``
    done: Callable[[Ctx], bool] = image_bench.pulled
    #: around all lives of a run: what the tool talks to (e.g. a mirror), started untimed
    session: Callable[[Ctx], AbstractContextManager[Any]] | None = None


def _pull(c: Ctx) -> list[str]:
    return image_bench.pull_argv(c)


def _pull_256k(c: Ctx) -> list[str]:
    # DESIGN: "the chunk size sets how much a crash can cost: weigh 256 KiB against 1 MiB".
    return image_bench.pull_argv(c, "--chunk-size", str(256 * 1024))


def _resume(c: Ctx) -> list[str]:
    return [
        *common.resumer_bin(),
        "resume",
        "--root",
        str(c.scratch / "root"),
        "--progress",
        "json",
    ]


def _skopeo(c: Ctx) -> list[str]:
    return image_bench.skopeo_copy_argv(c)


# --------------------------------------------------------------------------- containerd


def _ctd_dir(c: Ctx) -> Path:
    return c.scratch / "ctd"


def _ctd_sock(c: Ctx) -> Path:
    return _ctd_dir(c) / "state" / "c.sock"


CTD_DISABLED = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


def _write_ctd_config(
    path: Path, *, root: Path, state: Path, temp: Path, opt: Path, disabled: tuple[str, ...]
) -> Path:
    """containerd's config.toml: its own root, state (and socket in it), temp and opt."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        sock = state / "c.sock"
        path.write_text(
            "version = 2\n"
            f'root = "{root}"\n'
            f'state = "{state}"\n'
            f'temp = "{temp}"\n'
            f"disabled_plugins = {json.dumps(list(disabled))}\n"
            "[grpc]\n"
            f'  address = "{sock}"\n'
            "[ttrpc]\n"
            f'  address = "{sock}.ttrpc"\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{opt}"\n'
        )
    return path


def _ctd_config(c: Ctx) -> Path:
    """A minimal config: own root/state/socket, no CRI, no snapshotters that cannot load."""
    d = _ctd_dir(c)
    return _write_ctd_config(
        d / "config.toml",
        root=d / "root",
        state=d / "state",
        temp=d / "tmp",
        opt=d / "opt",
        disabled=CTD_DISABLED,
    )


def _ctr_pull(c: Ctx) -> list[str]:
    return [
        "ctr",
        "-a",
        str(_ctd_sock(c)),
        "-n",
        CTD_NAMESPACE,
        "images",
        "pull",
        "--plain-http",
        c.ref,
    ]


def _client_until(argv: list[str], out: Any, deadline: float) -> int | None:
    """Run a pull client (its own process group) until it exits or the life's
    ``deadline`` (perf_counter) comes: its exit code, or None when the life ended first;
    its group is killed either way."""
    client = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
    )
    try:
        return client.wait(timeout=max(0.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        return None
    finally:
        _kill_group(client)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _ctd_life(c: Ctx, life: int, period: float, log: Path) -> int | None:
    """Start the daemon (state emptied, as /run after a power cut) and ``ctr images pull``;
    SIGKILL both ``period`` s after the daemon's start. Returns ctr's exit code or None."""
    cfg = _ctd_config(c)
    state = _ctd_dir(c) / "state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    sock = _ctd_sock(c)
    t0 = time.perf_counter()
    deadline = t0 + period
    with log.open("ab") as out:
        out.write(f"--- life {life}: containerd + ctr, T = {period:.3f} s\n".encode())
        out.flush()
        daemon = subprocess.Popen(
            ["containerd", "--config", str(cfg), "--log-level", "warn"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
        try:
            while not sock.exists() and daemon.poll() is None:
                now = time.perf_counter()
                if now >= deadline or now - t0 > CTD_READY_LIMIT_S:
                    return None
                time.sleep(0.005)
            if daemon.poll() is not None:
                out.write(f"containerd exited {daemon.returncode} before listening\n".encode())
                return daemon.returncode or 1
            return _client_until(_ctr_pull(c), out, deadline)
        finally:
            _kill_group(daemon)


def _ctd_content(root: Path) -> Path:
    """containerd's content store under its root (``blobs/`` and ``ingest/``)."""
    return root / "io.containerd.content.v1.content"


def _ctd_has_blobs(root: Path, layers: list[tuple[str, int]]) -> bool:
    """Whether containerd's content store holds every layer of the image, at full size."""
    blobs = _ctd_content(root) / "blobs" / "sha256"
    for digest, size in layers:
        p = blobs / digest.removeprefix("sha256:")
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


def _ctd_pulled(c: Ctx) -> bool:
    """Whether containerd's content store holds every layer of the image, at full size."""
    return _ctd_has_blobs(_ctd_dir(c) / "root", c.image.layers)


def _unmount_under(path: Path) -> None:
    """Lazily unmount whatever a killed daemon left mounted under ``path`` (deepest first)."""
    prefix = str(path.resolve()) + "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = [ln.split()[4] for ln in lines if len(ln.split()) > 4]
    for mp in sorted((m for m in points if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, timeout=10, check=False)


# --------------------------------------------------------------------------- dockerd

#: dockerd's tries per layer within one pull: the 11 of the cuts benchmark (its default is 5;
#: the delay between them, 5 s × n, cannot be set). A kill ends the pull anyway.
DOCKERD_ATTEMPTS = 11
#: per run: the seconds each daemon start took to answer, and what its data root held after
_DOCKERD_NOTES: dict[Path, dict[str, Any]] = {}


def _dockerd_of(c: Ctx) -> Dockerd:
    # The run's scratch directory is fresh, so the data root is too: every run downloads all.
    return Dockerd(c.scratch / "dockerd", max_download_attempts=DOCKERD_ATTEMPTS)


def _dockerd_pull(c: Ctx) -> list[str]:
    return _dockerd_of(c).pull_argv(c.ref)


class Companion(Protocol):
    """A process that lives and dies with dockerd (e.g. the mirror it pulls through, which
    a power cut kills too): ``spawn`` returns at once, ``wait_ready`` polls until a
    ``perf_counter`` deadline, ``kill`` is a SIGKILL."""

    def spawn(self) -> None: ...
    def wait_ready(self, deadline: float) -> bool: ...
    def kill(self) -> None: ...


def _dockerd_life(
    c: Ctx,
    life: int,
    period: float,
    log: Path,
    *,
    dockerd: Callable[[Ctx], Dockerd] = _dockerd_of,
    ref: str | None = None,
    companion: Companion | None = None,
) -> int | None:
    """Start dockerd (exec root cleared, as /run after a reboot) on the run's data root and
    ``docker pull``; SIGKILL both ``period`` s after the daemon's start. Returns the client's
    exit code, or None when the kill came first.

    ``dockerd`` and ``ref``: another daemon configuration (e.g. one with a mirror) and the
    name it pulls; ``companion`` is started with the daemon (in the same T), must be ready
    before the pull, and is SIGKILLed with it."""
    d = dockerd(c)
    d.log = log
    notes = _DOCKERD_NOTES.setdefault(
        c.scratch, {"ready_s": [], "not_ready": 0, "companion_not_ready": 0}
    )
    deadline = time.perf_counter() + period
    with log.open("ab") as out:
        out.write(f"--- life {life}: dockerd + docker pull, T = {period:.3f} s\n".encode())
    if companion is not None:
        companion.spawn()
    d.spawn()
    try:
        try:
            ready = d.wait_ready(deadline)
        except DockerdError as exc:
            with log.open("ab") as out:
                out.write(f"{exc}\n".encode())
            return 1
        if not ready:
            notes["not_ready"] += 1
            return None
        notes["ready_s"].append(d.ready_s[-1])
        if companion is not None and not companion.wait_ready(deadline):
            notes["companion_not_ready"] += 1
            return None
        with log.open("ab") as out:
            return _client_until(d.pull_argv(ref or c.ref), out, deadline)
    finally:
        d.kill()  # SIGKILL, also after a clean pull: the next run starts its own daemon
        if companion is not None:
            companion.kill()
        notes["leftovers"] = d.leftovers()


DOCKERD_NOT_ON_POWERCUT_FS = (
    "dockerd is not in the power-cut file-system scenario (`--scenario powercut`). What a "
    "cut there adds to a SIGKILL is the loss of writes not yet fsynced, and dockerd keeps "
    "nothing of a download across a restart to lose: its partial layers are files in "
    "`DATA_ROOT/tmp`, which the next daemon empties at start-up, so every life already "
    "starts each unfinished layer from byte 0 here (the wire above is that cost). A run on "
    "the mount would test something else, the survival of its bolt databases and layer "
    "store, and needs a loss accounting of its own (the scenario's per-cut loss reads "
    "resumer's progress stream and containerd's ingest files); not done in this change."
)


def _dockerd_pulled(c: Ctx) -> bool:
    return _dockerd_of(c).has_image(c.ref, c.image.manifest_digest)


TOOLS = [
    Tool("resumer_pull", "resumer pull (restart: same pull)", _pull, _pull),
    Tool(
        "resumer_256k",
        "resumer pull --chunk-size 256KiB (restart: same pull)",
        _pull_256k,
        _pull_256k,
    ),
    Tool("resumer_resume", "resumer pull (restart: resumer resume)", _pull, _resume),
    Tool("skopeo", "skopeo copy (restart: same copy)", _skopeo, _skopeo),
    Tool(
        "containerd",
        "containerd + ctr images pull (restart: daemon, same pull)",
        _ctr_pull,
        _ctr_pull,
        life=_ctd_life,
        done=_ctd_pulled,
    ),
    Tool(
        "dockerd",
        "dockerd + docker pull (restart: daemon, same pull)",
        _dockerd_pull,
        _dockerd_pull,
        life=_dockerd_life,
        done=_dockerd_pulled,
    ),
]
BY_KEY = {t.key: t for t in TOOLS}


# --------------------------------------------------------------------------- kill schedule


@dataclass(frozen=True)
class Scenario:
    """A kill schedule and a link rate: ``period`` s, or U(lo, hi) s drawn per life."""

    label: str
    rate: float
    rounds: int
    tools: tuple[str, ...]
    period: float | None = None
    span: tuple[float, float] | None = None

    def periods(self, seed: int) -> Iterator[float]:
        """Each life's T; a span draws from ``random.Random(seed)`` (same per round)."""
        rng = random.Random(seed)
        while True:
            if self.span is not None:
                yield rng.uniform(*self.span)
            else:
                assert self.period is not None
                yield self.period if self.period > 0 else LIFE_LIMIT_S

    @property
    def kills(self) -> str:
        if self.span is not None:
            return f"every U({self.span[0]:g}, {self.span[1]:g}) s, seeded"
        return f"every {self.period:g} s"


def _one_life(argv: list[str], period: float, log: Path) -> int | None:
    """Run once; SIGKILL the process group after ``period`` s. Returns the exit code or None."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
        try:
            code: int | None = proc.wait(timeout=period)
        except subprocess.TimeoutExpired:
            code = None
        _kill_group(proc)
    return code


def run_with_kills(
    tool: Tool, ctx: Ctx, periods: Iterator[float], max_restarts: int
) -> dict[str, Any]:
    log = ctx.scratch / "tool.log"
    t0 = time.perf_counter()
    restarts, codes, done = 0, [], False
    try:
        for life in range(max_restarts + 1):
            period = next(periods)
            if tool.life is not None:
                code = tool.life(ctx, life, period, log)
            else:
                argv = tool.first(ctx) if life == 0 else tool.again(ctx)
                code = _one_life(argv, period, log)
            codes.append(code)
            done = code == 0 and tool.done(ctx)
            if done:
                break
            if life < max_restarts:
                restarts += 1
    finally:
        _unmount_under(ctx.scratch)
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace") if log.exists() else ""
    return {
        "completed": done,
        "wall_s": wall,
        "restarts": restarts,
        "lives": len(codes),
        "exit_codes": codes,
        # exit 0 without the image: the tool believed it was done (worth a look).
        "clean_exits_without_image": sum(1 for c in codes[:-1] if c == 0)
        + (1 if codes[-1] == 0 and not done else 0),
        "last_stats": common.json_stats(text),
        # progress lines dropped: what is left is the errors and each life's outcome.
        "log_tail": "" if done else _quiet(text)[-1500:],
    }


def _quiet(text: str) -> str:
    noisy = ('{"status": "Downloading"', "elapsed:", "├", "└", "│")
    keep = [ln for ln in text.strip().splitlines() if not ln.lstrip().startswith(noisy)]
    return "\n".join(keep)


def measure(
    scenarios: list[Scenario],
    max_restarts: int,
    *,
    by_key: Mapping[str, Tool] = BY_KEY,
    name: str = NAME,
    repo: str = "bench/img",
) -> dict[str, Any]:
    """Every scenario's tools, ``rounds`` runs each (``by_key``, ``name`` and ``repo``:
    another benchmark's tools on these schedules, in its own work directory)."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        s.label: {key: [] for key in s.tools} for s in scenarios
    }
    with image_bench.registry_with_image(name, LAYERS_MIB, SEED, repo) as lab:
        image = lab.image
        for s in scenarios:
            tools = [by_key[k] for k in s.tools]
            for r in range(s.rounds):
                for tool in common.rotated(tools, r):
                    with (
                        lab.proxied(SEED + r, rate=s.rate) as (ctx, counters),
                        tool.session(ctx) if tool.session else nullcontext(),
                    ):
                        row = run_with_kills(tool, ctx, s.periods(SEED + r), max_restarts)
                    row["wire_bytes"] = counters.get("bytes_down", 0)
                    row["wire_ratio"] = row["wire_bytes"] / image.payload
                    row["connections"] = counters.get("connections", 0)
                    if ctx.scratch in _DOCKERD_NOTES:  # a dockerd life ran
                        row["dockerd"] = _DOCKERD_NOTES.pop(ctx.scratch)
                    runs[s.label][tool.key].append(row)
                    print(
                        f"T={s.label} round {r + 1}/{s.rounds} {tool.key:15s} "
                        f"{'ok  ' if row['completed'] else 'FAIL'} {row['wall_s']:6.1f} s "
                        f"restarts {row['restarts']:2d} wire/payload {row['wire_ratio']:.3f}",
                        flush=True,
                    )
    return {"image": image, "runs": runs}


def summarise(
    scenarios: list[Scenario], max_restarts: int, measured: dict[str, Any]
) -> dict[str, Any]:
    image: BenchImage = measured["image"]
    med: dict[str, dict[str, Any]] = {}
    for period, per_tool in measured["runs"].items():
        med[period] = {}
        for key, rows in per_tool.items():
            med[period][key] = common.outcome_medians(
                rows, ["wall_s", "wire_ratio", "restarts", "lives"]
            )
            if key == "dockerd":
                ready = [t for x in rows for t in x.get("dockerd", {}).get("ready_s", [])]
                med[period][key]["dockerd_ready_s"] = common.median_or_none(ready)
                med[period][key]["dockerd_ready_max_s"] = max(ready, default=None)
                med[period][key]["dockerd_lives_not_ready"] = sum(
                    x.get("dockerd", {}).get("not_ready", 0) for x in rows
                )
    return {
        **common.stamp(NAME, {**image_bench.versions(), **dockerd_versions()}),
        "seed": SEED,
        "rounds": max(s.rounds for s in scenarios),
        "max_restarts": max_restarts,
        "rate_bytes_per_s": RATE,
        "scenarios": {
            s.label: {
                "kills": s.kills,
                "period_s": s.period,
                "span_s": s.span,
                "rate_bytes_per_s": s.rate,
                "rounds": s.rounds,
                "tools": list(s.tools),
            }
            for s in scenarios
        },
        "image": image_bench.image_summary(image, LAYERS_MIB),
        "tools": {t.key: t.label for t in TOOLS},
        "method": (
            "real CNCF registry on 127.0.0.1 behind a fresh resumer.lab.proxy per run "
            "(rate limit only, no cuts); the tool's process group is SIGKILLed T s after "
            "each start and the tool restarted at once with the same root/destination, "
            f"until it exits 0 with every layer in the OCI destination or {max_restarts} "
            "restarts have passed; containerd: the daemon (own root, state, socket; CRI "
            "disabled) and ctr are both SIGKILLed T s after the daemon's start, the state "
            "directory emptied and the daemon restarted on the same root, done when ctr "
            "exits 0 with every layer in the content store; dockerd the same way (own "
            "data root, fresh per run, exec root, pid file and socket; vfs; "
            f"--max-download-attempts {DOCKERD_ATTEMPTS}; after each SIGKILL the exec root is "
            "cleared, as /run by a reboot; the life's clock starts with the daemon; done when "
            "docker pull exits 0 and the reference store names the tag and the manifest "
            "digest); T is fixed, or drawn from "
            "U(lo, hi) per life with the run's seed (the same draws for every tool); "
            "wall = first start to last exit; wire = proxy bytes_down over all lives; "
            "tools alternate, order rotated per round"
        ),
        "medians": med,
        "runs": measured["runs"],
    }


def _scenario_rows(data: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], Tool]]:
    for label, per_tool in data["runs"].items():
        sc = data.get("scenarios", {}).get(label, {})
        for t in TOOLS:
            if t.key in per_tool:
                yield label, sc, t


def _kills_cell(label: str, sc: dict[str, Any]) -> str:
    if sc.get("span_s"):
        lo, hi = sc["span_s"]
        return f"U({lo:g}, {hi:g}) s"
    return f"{label} s"


def render(data: dict[str, Any]) -> str:
    m, ver, img = data["machine"], data["versions"], data["image"]
    scen = data["scenarios"]
    plan = "; ".join(
        f"kill {sc['kills']} at {sc['rate_bytes_per_s'] / 1e6:g} MB/s, {sc['rounds']} runs "
        f"per tool ({', '.join(sc['tools'])})"
        for sc in scen.values()
    )
    out = [
        "# Power cuts (`python -m benchmarks power`)\n",
        f"Measured {data['date']}; seed {data['seed']} (image and kill draws; the proxy "
        f"injects no cuts here). Scenarios: {plan}.\n",
        f"- **Image:** `{img['repo']}:{img['tag']}`, layers {img['layers_mib']} MiB of random "
        f"bytes (gzip), {img['payload_bytes']} bytes with config and manifest "
        f"(≈ {img['payload_bytes'] / data['rate_bytes_per_s']:.1f} s at 20 MB/s, "
        f"{img['payload_bytes'] / RANGE_RATE:.1f} s at 10 MB/s).",
        common.machine_line(m),
        f"- **Versions:** resumer {ver['resumer']} (commit {ver['resumer_commit']}); "
        f"{ver['skopeo']}; {ver['containerd']}; {ver.get('dockerd', 'dockerd not run')} "
        f"(client: {ver.get('docker', '–')}); {ver['docker-registry']}.",
        *([common.load_line(*data["load_average"])] if "load_average" in data else []),
        f"- **Method:** {data['method']}.\n",
        "## Medians\n",
    ]
    rows = []
    for label, sc, t in _scenario_rows(data):
        d = data["medians"][label][t.key]
        rows.append(
            [
                _kills_cell(label, sc),
                f"{sc['rate_bytes_per_s'] / 1e6:g}",
                t.label,
                f"{d['completed']}/{d['runs']}",
                f"{d['restarts']:.0f}",
                f"{d['wall_s']:.1f}",
                f"{d['wire_ratio']:.3f}",
            ]
        )
    out.append(
        common.markdown_table(
            [
                "kill every",
                "MB/s",
                "tool",
                "completed",
                f"median restarts (cap {data['max_restarts']})",
                "median wall (s)",
                "median wire / payload",
            ],
            rows,
        )
    )
    out.append("## Every run (✗ = not done after the cap)\n")
    per = []
    for label, sc, t in _scenario_rows(data):
        rs = data["runs"][label][t.key]
        per.append(
            [
                _kills_cell(label, sc),
                t.label,
                ", ".join(f"{x['restarts']}{'' if x['completed'] else '✗'}" for x in rs),
                ", ".join(f"{x['wall_s']:.1f}" for x in rs),
                ", ".join(f"{x['wire_ratio']:.3f}" for x in rs),
            ]
        )
    out.append(
        common.markdown_table(["kill every", "tool", "restarts", "wall (s)", "wire / payload"], per)
    )
    never = [
        (_kills_cell(label, sc), t.label, x)
        for label, sc, t in _scenario_rows(data)
        for x in data["runs"][label][t.key]
        if not x["completed"]
    ]
    if never:
        out.append("Runs that never completed (lives used, wire bytes over all of them):\n")
        out += [
            f"- kill every {p}, {label}: never completed in {x['lives']} lives, "
            f"{x['wire_ratio']:.1f}× the image on the wire ({x['wall_s']:.0f} s)"
            for p, label, x in never
        ]
        out.append("")
    seed_rows = [
        (_kills_cell(label, sc), data["medians"][label]["dockerd"], data["runs"][label]["dockerd"])
        for label, sc, t in _scenario_rows(data)
        if t.key == "dockerd"
    ]
    if seed_rows:
        out.append("## dockerd here\n")
        out.append(
            "Every life starts the daemon on the run's data root after its exec root was "
            "cleared; the life's clock starts with the daemon, so its start-up is inside T. "
            "`docker pull` runs once the daemon answers `docker version` on its socket. "
            "Left behind after the run's last kill: the files of abandoned downloads in "
            "`DATA_ROOT/tmp` (`GetImageBlob*`: a later daemon never resumes them, and "
            "empties `tmp/` at its start).\n"
        )
        table = []
        for p, d, rs in seed_rows:
            left = [x.get("dockerd", {}).get("leftovers", {}) for x in rs]
            table.append(
                [
                    p,
                    "–" if d.get("dockerd_ready_s") is None else f"{d['dockerd_ready_s']:.2f}",
                    "–"
                    if d.get("dockerd_ready_max_s") is None
                    else f"{d['dockerd_ready_max_s']:.2f}",
                    d.get("dockerd_lives_not_ready", 0),
                    ", ".join(
                        f"{x.get('tmp_files', 0)} / {x.get('tmp_bytes', 0) / common.MiB:.1f}"
                        for x in left
                    ),
                ]
            )
        out.append(
            common.markdown_table(
                [
                    "kill every",
                    "median start-up to answering (s)",
                    "max (s)",
                    "lives killed before it answered",
                    "abandoned tmp files / MiB after each run",
                ],
                table,
            )
        )
        out.append(DOCKERD_NOT_ON_POWERCUT_FS + "\n")
    odd = [
        (_kills_cell(label, sc), t.label, x["clean_exits_without_image"])
        for label, sc, t in _scenario_rows(data)
        for x in data["runs"][label][t.key]
        if x["clean_exits_without_image"]
    ]
    if odd:
        out.append("Lives that exited 0 without the image in the destination:\n")
        out += [f"- T = {p}, {label}: {n}" for p, label, n in odd]
        out.append("")
    out.append("![completion, restarts and wire/payload per kill period](power.png)\n")
    return "\n".join(out)


def plot(data: dict[str, Any]) -> Path:
    cells = list(_scenario_rows(data))
    short = {"resumer_pull": "pull", "resumer_256k": "pull 256k", "resumer_resume": "resume"}
    labels = [
        f"{_kills_cell(p, sc).replace(' s', 's').replace('0.', '.')} {short.get(t.key, t.key)}"
        for p, sc, t in cells
    ]
    panels = common.outcome_panels(
        [(data["medians"][p][t.key], data["runs"][p][t.key]) for p, _, t in cells],
        ("completed", "restarts", "wire_ratio"),
    )
    return common.plot_bars(
        common.RESULTS / f"{NAME}.png",
        f"SIGKILL every T s and restart, median of the runs ({data['date'][:10]})",
        labels,
        [
            ("completed (fraction of runs)", *panels["completed"], None),
            (f"restarts (cap {data['max_restarts']})", *panels["restarts"], None),
            ("wire bytes / payload", *panels["wire_ratio"], 1.0),
        ],
    )


# --------------------------------------------------------------------------- power-cut FS
# ``--scenario powercut``: real power cuts on resumer.lab.powercut (see the module doc).

PC_NAME = "power_cut_fs"  # its own results file: a power-cut run leaves power.md alone
PC_SPAN = (1.0, 2.0)  # s of life between cuts (seeded, the same draws for every tool)
PC_RATE = 10e6  # bytes/s, as the kill-range scenario: a pull takes ~6.7 s
PC_ROUNDS = 3
PC_MAX_LIVES = 30
PC_TOOLS = ("resumer_pull", "resumer_resume", "containerd")
SYNC_INTERVAL = 4 * common.MiB  # resumer's Config.checkpoint_bytes: one sync interval
CTD_SNAPSHOTTER = "native"  # overlayfs cannot stack on FUSE; native keeps it all on the mount
PC_CTD_DISABLED = (*CTD_DISABLED, "io.containerd.snapshotter.v1.overlayfs")
#: the layer's blob is committed (before "Download complete" it may still be verifying)
_COMMITTED = ("Download complete", "Extracting", "Pull complete", "Already exists")


def _lid(digest: str) -> str:
    """A layer's id as the progress stream shows it: 12 hex digits of its digest."""
    return digest.removeprefix("sha256:")[:12]


@dataclass
class PcLife:
    """One life between two power cuts (or up to the tool's own exit)."""

    period: float
    code: int | None = None  # the tool's exit code; None: the power was cut first
    cut: bool = False
    seconds: float = 0.0
    #: layer id → the offset this life started the layer from (its first sight of it)
    start: dict[str, int] = field(default_factory=dict)
    #: layer id → the bytes of the layer it had when it ended (before the cut)
    reached: dict[str, int] = field(default_factory=dict)
    #: layer ids whose blob this life saw committed (resumer: "Download complete")
    committed: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    reboot_s: float = 0.0  # from the freeze to the remounted file system
    t0: float = 0.0  # perf_counter at the life's start
    first_byte_s: float | None = None  # the life's first layer progress, s after its start


class _ProgressReader(threading.Thread):
    """Reads a resumer ``--progress json`` stream into a `PcLife`, copying it to ``log``."""

    def __init__(self, stream: IO[bytes], life: PcLife, sizes: dict[str, int], log: IO[bytes]):
        super().__init__(daemon=True)
        self.stream, self.life, self.sizes, self.log = stream, life, sizes, log

    def run(self) -> None:
        life = self.life
        for raw in self.stream:
            self.log.write(raw)
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            if "stats" in msg:
                life.stats = dict(msg["stats"])
            if "error" in msg:
                life.errors.append(str(msg["error"]))
            lid, status = str(msg.get("id", "")), str(msg.get("status", ""))
            size = self.sizes.get(lid)
            if size is None:
                continue
            if status.startswith("Resuming from "):
                n = int(status.rsplit(" ", 1)[1])
                life.start.setdefault(lid, n)
                life.reached[lid] = max(life.reached.get(lid, 0), n)
            elif status == "Downloading":
                if life.first_byte_s is None:
                    life.first_byte_s = time.perf_counter() - life.t0
                # "Resuming from N" precedes the first bytes of a resumed attempt: without
                # one, the layer started from byte 0.
                life.start.setdefault(lid, 0)
                cur = int((msg.get("progressDetail") or {}).get("current") or 0)
                life.reached[lid] = max(life.reached.get(lid, 0), cur)
            elif status == "Verifying Checksum":  # every byte is in; the commit runs
                life.reached[lid] = size
            elif status in _COMMITTED:
                life.start.setdefault(lid, size)  # without bytes first: an earlier life's
                life.reached[lid] = size
                life.committed.add(lid)
        self.log.flush()


def _ctd_holds(root: Path, layers: list[tuple[str, int]]) -> tuple[dict[str, int], set[str]]:
    """Layer id → bytes containerd holds of it: the blob's size once committed, else the
    size of its ingest's ``data`` (the offset containerd resumes from); and the ids of the
    committed ones."""
    content = _ctd_content(root)
    ingests: list[tuple[str, int]] = []
    with contextlib.suppress(OSError):
        for d in (content / "ingest").iterdir():
            try:
                ingests.append(((d / "ref").read_text(), (d / "data").stat().st_size))
            except OSError:
                continue  # without its ref file an ingest cannot be resumed
    out: dict[str, int] = {}
    committed: set[str] = set()
    for digest, size in layers:
        hexd = digest.removeprefix("sha256:")
        try:
            if (content / "blobs" / "sha256" / hexd).stat().st_size == size:
                out[_lid(digest)] = size
                committed.add(_lid(digest))
                continue
        except OSError:
            pass
        out[_lid(digest)] = max((n for ref, n in ingests if hexd in ref), default=0)
    return out, committed


def _signal_groups(procs: list[subprocess.Popen[bytes]], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


@dataclass(frozen=True)
class _Site:
    """The power-cut mount, and the link (the proxy's process) that the power takes down."""

    fs: PowerCutFS
    link: subprocess.Popen[str] | None  # frozen from the cut until the tool is reaped


def _power_cut(
    site: _Site,
    procs: list[subprocess.Popen[bytes]],
    life: PcLife,
    frozen: Callable[[], None] | None = None,
) -> None:
    """The test suite's life cycle: SIGSTOP, cut, SIGKILL, reap, remount (the reboot).

    The link is frozen with the tool: a SIGSTOPped process's kernel still takes bytes into
    its socket buffers (and the proxy counts them as delivered) until the SIGKILL, which
    a dead site would not. ``frozen`` runs while all is stopped and the old mount answers.
    """
    t0 = time.perf_counter()
    _signal_groups(procs, signal.SIGSTOP)
    if site.link is not None:
        os.kill(site.link.pid, signal.SIGSTOP)
    try:
        if frozen is not None:
            frozen()
        site.fs.cut()
    except PowerCutError as exc:  # a bug of the file system: reported, the run goes on
        life.errors.append(f"power-cut fs: {exc}")
    finally:
        for proc in procs:
            _kill_group(proc)
        if site.link is not None:
            os.kill(site.link.pid, signal.SIGCONT)
    if site.fs.mounted:  # the cut failed before the daemon went
        site.fs.close()
    site.fs.mount()
    life.cut = True
    life.reboot_s = time.perf_counter() - t0


def _pc_resumer_life(
    argv: list[str], site: _Site, life: PcLife, sizes: dict[str, int], log: Path
) -> None:
    t0 = life.t0 = time.perf_counter()
    with log.open("ab") as out:
        out.write(f"--- life: {' '.join(argv[1:3])}, T = {life.period:.3f} s\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=out,
            start_new_session=True,
        )
        assert proc.stdout is not None
        reader = _ProgressReader(proc.stdout, life, sizes, out)
        reader.start()
        try:
            life.code = proc.wait(timeout=life.period)
            life.seconds = time.perf_counter() - t0
        except subprocess.TimeoutExpired:
            life.seconds = time.perf_counter() - t0
            _power_cut(site, [proc], life)
        finally:
            _kill_group(proc)
            reader.join(timeout=30)
            proc.stdout.close()


def _pc_ctd_life(c: Ctx, cfg: Path, state: Path, site: _Site, life: PcLife, log: Path) -> None:
    """The daemon (its state emptied, as /run after a reboot) and ``ctr images pull``; at
    ``life.period`` s after the daemon's start, both are frozen and the power is cut."""
    root = site.fs.mountpoint / "ctd-root"
    life.start = _ctd_holds(root, c.image.layers)[0]
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    sock = state / "c.sock"
    t0 = life.t0 = time.perf_counter()
    deadline = t0 + life.period
    procs: list[subprocess.Popen[bytes]] = []

    def frozen() -> None:
        life.reached, life.committed = _ctd_holds(root, c.image.layers)

    with log.open("ab") as out:
        out.write(f"--- life: containerd + ctr, T = {life.period:.3f} s\n".encode())
        out.flush()
        mark = out.tell()
        try:
            procs.append(
                subprocess.Popen(
                    ["containerd", "--config", str(cfg), "--log-level", "warn"],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                )
            )
            while not sock.exists() and procs[0].poll() is None:
                if time.perf_counter() >= deadline:
                    break
                time.sleep(0.005)
            if procs[0].poll() is not None:
                life.code = procs[0].returncode or 1
                life.errors.append(f"containerd exited {procs[0].returncode} before listening")
            elif sock.exists():
                argv = ["ctr", "-a", str(sock), "-n", CTD_NAMESPACE, "images", "pull"]
                argv += ["--snapshotter", CTD_SNAPSHOTTER, "--plain-http", c.ref]
                procs.append(
                    subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=out,
                        start_new_session=True,
                    )
                )
                with contextlib.suppress(subprocess.TimeoutExpired):
                    life.code = procs[1].wait(timeout=max(0.0, deadline - time.perf_counter()))
            life.seconds = time.perf_counter() - t0
            if life.code is None:
                _power_cut(site, procs, life, frozen)
            else:
                life.reached, life.committed = _ctd_holds(root, c.image.layers)
        finally:
            for proc in procs:
                _kill_group(proc)
            _unmount_under(c.scratch)
    if life.code:  # what ctr or the daemon said about it
        with log.open("rb") as f:
            f.seek(mark)
            said = f.read().decode(errors="replace").splitlines()
        life.errors += [ln for ln in said if ln.startswith("ctr: ") or "level=error" in ln][-3:]


def _pc_present(key: str, mnt: Ctx, *, verify: bool) -> bool:
    """Whether the tool's result is on the mount: every layer (and resumer's index.json);
    ``verify`` also checks each layer's sha256."""
    if key == "containerd":
        blobs = _ctd_content(mnt.scratch / "ctd-root") / "blobs" / "sha256"
        ok = _ctd_has_blobs(mnt.scratch / "ctd-root", mnt.image.layers)
    else:
        blobs = mnt.scratch / "oci" / "blobs" / "sha256"
        ok = image_bench.pulled(mnt)
    if ok and verify:
        for digest, _ in mnt.image.layers:
            if common.file_sha256(blobs / digest.removeprefix("sha256:")) != digest:
                return False
    return ok


def _cut_losses(lives: list[PcLife], sizes: dict[str, int], done: bool) -> list[dict[str, Any]]:
    """Per cut: the bytes it cost (what the life had minus where a later life started
    each layer from), and the transfers running at the cut. A layer no later life showed
    is whole if the run is done (e.g. the cut came after the pull had finished and
    ``resume`` found nothing to do); otherwise its cut is left out (the last cut of a run
    that hit the cap)."""
    out = []
    for i, life in enumerate(lives):
        if not life.cut:
            continue
        loss, arrived, running, unresolved = 0, 0, 0, False
        layers: dict[str, list[int | None]] = {}
        committed_lost = []
        for lid, had in life.reached.items():
            began = life.start.get(lid, had)
            arrived += max(0, had - began)
            # running: bytes of it arrived in this life, and its blob was not committed yet
            running += began < had and lid not in life.committed
            later = next((x.start[lid] for x in lives[i + 1 :] if lid in x.start), None)
            if later is None and done:
                later = sizes[lid]
            layers[lid] = [life.start.get(lid), had, later]
            if later is None:
                unresolved = True
                continue
            loss += max(0, had - later)
            if lid in life.committed and later < sizes[lid]:
                committed_lost.append(lid)  # a blob the tool had committed did not survive
        if unresolved and not loss:
            continue
        out.append(
            {
                "life": i,
                "loss": loss,
                "arrived": arrived,  # bytes this life took in (as far as it showed them)
                "running": running,
                "committed_lost": committed_lost,
                "at_s": round(life.seconds, 3),
                "first_byte_s": life.first_byte_s and round(life.first_byte_s, 3),
                # layer id → [started from, had at the cut, a later life started from]
                "layers": layers,
            }
        )
    return out


def _pc_tool_run(
    key: str, ctx: Ctx, site: _Site, periods: Iterator[float], max_lives: int
) -> dict[str, Any]:
    """Lives until done or ``max_lives``; then one more cut, to see the result last."""
    fs = site.fs
    mnt = Ctx(ctx.port, ctx.image, fs.mountpoint)
    log = ctx.scratch / "tool.log"
    sizes = {_lid(d): s for d, s in ctx.image.layers}
    ctd = ctx.scratch / "ctd"
    cfg = _write_ctd_config(
        ctd / "config.toml",
        root=fs.mountpoint / "ctd-root",
        state=ctd / "state",
        temp=ctd / "tmp",
        opt=ctd / "opt",
        disabled=PC_CTD_DISABLED,
    )
    lives: list[PcLife] = []
    done = False
    t0 = time.perf_counter()
    for n in range(max_lives):
        life = PcLife(next(periods))
        lives.append(life)
        if key == "containerd":
            _pc_ctd_life(mnt, cfg, ctd / "state", site, life, log)
        else:
            argv = _pull(mnt) if n == 0 or key == "resumer_pull" else _resume(mnt)
            _pc_resumer_life(argv, site, life, sizes, log)
        done = life.code == 0 and _pc_present(key, mnt, verify=False)
        if done:
            break
    wall = time.perf_counter() - t0
    held: int | None = None  # bytes of the image kept at the end (unknown: None)
    if key == "containerd" and lives[-1].cut:
        # Where a next life would start: resolves the last cut's loss.
        start = _ctd_holds(mnt.scratch / "ctd-root", ctx.image.layers)[0]
        lives.append(PcLife(0.0, start=start))
        held = sum(start.values())
    survived: bool | None = None
    if done:
        fs.cut()  # the power goes right after the tool said it was done
        fs.mount()
        survived = _pc_present(key, mnt, verify=True)
    real = [x for x in lives if x.period > 0]
    text = log.read_text(errors="replace") if log.exists() else ""
    return {
        "completed": done,
        "survives_cut_after_exit": survived,
        "held_at_end": held,
        "lives": len(real),
        "cuts": sum(1 for x in real if x.cut),
        "wall_s": wall,
        "powered_s": sum(x.seconds for x in real),
        "reboot_s_median": common.median_or_none([x.reboot_s for x in real if x.cut]),
        "first_byte_s_median": common.median_or_none(
            [x.first_byte_s for x in real if x.first_byte_s is not None]
        ),
        "exit_codes": [x.code for x in real],
        "periods_s": [round(x.period, 3) for x in real],
        "losses": _cut_losses(lives, sizes, done),
        "errors": sorted({e[:300] for x in real for e in x.errors}),
        "last_stats": next((x.stats for x in reversed(real) if x.stats), {}),
        "log_tail": "" if done else _quiet(text)[-1500:],
    }


def measure_powercut(
    rounds: int, span: tuple[float, float], tools: list[str], max_lives: int, freeze_link: bool
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in tools}
    with image_bench.registry_with_image(NAME, LAYERS_MIB, SEED) as lab:
        image = lab.image
        sc = Scenario("powercut", PC_RATE, rounds, tuple(tools), span=span)
        for r in range(rounds):
            for key in common.rotated(tools, r):
                # lab.proxied's set-up, keeping the proxy's process: the cut freezes it.
                common.fresh_dir(lab.scratch)
                proxy = common.ProxyProcess(lab.registry_port, SEED + r, rate=PC_RATE)
                ctx = Ctx(proxy.port, image, lab.scratch)
                try:
                    (ctx.scratch / "backing").mkdir()
                    with PowerCutFS(ctx.scratch / "backing", ctx.scratch / "mnt") as fs:
                        site = _Site(fs, proxy.proc if freeze_link else None)
                        try:
                            row = _pc_tool_run(key, ctx, site, sc.periods(SEED + r), max_lives)
                        finally:
                            _unmount_under(ctx.scratch / "ctd")
                finally:
                    counters = proxy.stop()
                row["wire_bytes"] = counters.get("bytes_down", 0)
                row["connections"] = counters.get("connections", 0)
                _pc_derive(row, image.payload)
                runs[key].append(row)
                print(
                    f"powercut round {r + 1}/{rounds} {key:15s} "
                    f"{'ok  ' if row['completed'] else 'FAIL'} lives {row['lives']:2d} "
                    f"cuts {row['cuts']:2d} wire/payload {row['wire_ratio']:.3f} "
                    f"(goal {row['goal_ratio']:.3f}) waste/cut "
                    f"{_mib(row['waste_per_cut'])} MiB, loss/cut median "
                    f"{row['loss_median'] / common.MiB:.2f} max "
                    f"{row['loss_max'] / common.MiB:.2f} MiB, over bound {row['cuts_over']}"
                    f"/{len(row['losses'])}; survives a cut after exit: "
                    f"{row['survives_cut_after_exit']}",
                    flush=True,
                )
    return {"image": image, "runs": runs, "freeze_link": freeze_link}


def _pc_derive(row: dict[str, Any], payload: int) -> None:
    """Wire ratio and its goal, waste per cut, and the per-cut losses against the bound."""
    cuts, wire = row["cuts"], row["wire_bytes"]
    row["wire_ratio"] = wire / payload
    row["goal_ratio"] = 1 + SYNC_INTERVAL * cuts / payload
    row["wire_vs_goal"] = row["wire_ratio"] / row["goal_ratio"]  # ≤ 1: within the goal
    row["meets_wire_goal"] = row["completed"] and row["wire_ratio"] <= row["goal_ratio"]
    # What the cuts cost on the wire: all but the image, or (not done) all but what is kept.
    held = payload if row["completed"] else row["held_at_end"]
    row["waste_per_cut"] = (wire - held) / cuts if cuts and held is not None else None
    losses = row["losses"]
    for x in losses:
        x["bound"] = SYNC_INTERVAL * x["running"]
        x["over"] = x["loss"] > x["bound"]
    row["loss_max"] = max((x["loss"] for x in losses), default=0)
    row["loss_median"] = common.median([x["loss"] for x in losses]) if losses else 0.0
    row["loss_per_transfer_max"] = max(
        (x["loss"] / max(1, x["running"]) for x in losses), default=0.0
    )
    row["running_max"] = max((x["running"] for x in losses), default=0)
    row["cuts_over"] = sum(1 for x in losses if x["over"])
    row["committed_lost"] = sum(len(x["committed_lost"]) for x in losses)
    arrived = sum(x["arrived"] for x in losses)
    row["lost_share"] = sum(x["loss"] for x in losses) / arrived if arrived else 0.0


PC_LABELS = {
    "resumer_pull": "resumer pull (restart: same pull)",
    "resumer_resume": "resumer pull (restart: resumer resume)",
    "containerd": f"containerd + ctr images pull --snapshotter {CTD_SNAPSHOTTER} "
    "(restart: daemon, same pull)",
}


def summarise_powercut(
    rounds: int, span: tuple[float, float], max_lives: int, measured: dict[str, Any]
) -> dict[str, Any]:
    image: BenchImage = measured["image"]
    keys = ["wire_ratio", "goal_ratio", "lives", "cuts", "loss_max"]
    keys += ["loss_median", "loss_per_transfer_max", "powered_s", "lost_share", "wire_vs_goal"]
    med = {
        key: common.outcome_medians(rows, keys, completed_too=("wire_ratio",))
        for key, rows in measured["runs"].items()
    }
    for key, rows in measured["runs"].items():
        med[key]["waste_per_cut"] = common.median_or_none(
            [row["waste_per_cut"] for row in rows if row["waste_per_cut"] is not None]
        )
        every = [x for row in rows for x in row["losses"]]
        med[key]["all_cuts"] = len(every)
        med[key]["all_cuts_over"] = sum(1 for x in every if x["over"])
        med[key]["all_loss_max"] = max((x["loss"] for x in every), default=0)
        med[key]["all_loss_median"] = common.median([x["loss"] for x in every]) if every else 0
        med[key]["all_committed_lost"] = sum(len(x["committed_lost"]) for x in every)
        med[key]["all_loss_per_transfer_max"] = max(
            (x["loss"] / max(1, x["running"]) for x in every), default=0.0
        )
        arrived = sum(x["arrived"] for x in every)
        med[key]["all_lost_share"] = sum(x["loss"] for x in every) / arrived if arrived else 0.0
        med[key]["wire_goal_met"] = sum(1 for row in rows if row["meets_wire_goal"])
        med[key]["survived"] = sum(1 for row in rows if row["survives_cut_after_exit"])
        med[key]["first_byte_s"] = common.median_or_none(
            [row["first_byte_s_median"] for row in rows if row["first_byte_s_median"] is not None]
        )
    return {
        **common.stamp(PC_NAME, image_bench.versions()),
        "seed": SEED,
        "rounds": rounds,
        "span_s": span,
        "rate_bytes_per_s": PC_RATE,
        "max_lives": max_lives,
        "sync_interval_bytes": SYNC_INTERVAL,
        "containerd_snapshotter": CTD_SNAPSHOTTER,
        "link_frozen_during_cut": measured["freeze_link"],
        "image": image_bench.image_summary(image, LAYERS_MIB),
        "tools": {k: PC_LABELS[k] for k in measured["runs"]},
        "method": (
            "real CNCF registry on 127.0.0.1 behind a fresh resumer.lab.proxy per run "
            f"({PC_RATE / 1e6:g} MB/s, no injected faults); every run on a fresh "
            "resumer.lab.powercut mount (FUSE; a cut drops every write not yet fsynced, data "
            "and metadata) that holds resumer's root and OCI destination, or containerd's "
            f"root (content store, bolt metadata, {CTD_SNAPSHOTTER} snapshots); containerd's "
            "state, socket, temp and config are off the mount (state emptied at each boot, "
            "as /run). Each life lasts T ~ U(lo, hi) s (seeded per round: the same draws for "
            "every tool); at T the tool (and containerd's daemon) is SIGSTOPped, the power "
            "cut, the processes SIGKILLed and reaped, the file system remounted over what was "
            "durable, and the tool started again with the same command (resumer resume: "
            "`resumer resume` after the first life); a tool that exits before T is not cut. "
            + (
                "The proxy is SIGSTOPped with the tool and continued once the tool is reaped "
                "(the link goes with the power: a frozen process's kernel would otherwise take "
                "bytes into its socket buffers, counted as delivered, until the SIGKILL). "
                if measured["freeze_link"]
                else "The proxy runs on through the cut (--link-stays-up). "
            )
            + "Done = exit 0 with every layer on the mount; then one more cut, to check the "
            "result survives it (sha256 of every layer). Wire = proxy bytes_down over all "
            "lives; waste per cut = (wire − payload) / cuts (a run not done: wire minus the "
            "bytes kept after its last cut, where known). Loss per cut: resumer, per layer "
            "the last progressDetail.current before the cut (the stream reports every 0.1 s, "
            "so this is a little under what had arrived) minus the offset a later life starts "
            "it from ('Resuming from N'; 0 when it starts over; the size when it is already "
            "committed); containerd, per layer the bytes it held at the freeze (committed "
            "blob, else its ingest data file's size, read through the mount) minus what it "
            "holds after the reboot (what its next ingest resumes from). A running transfer: "
            "a layer whose bytes arrived in that life and whose blob was not yet committed "
            "(resumer: no 'Download complete' yet). Bound per cut: "
            f"{SYNC_INTERVAL // common.MiB} MiB (one sync interval) per running transfer; a "
            "committed blob lost is over it whatever its size. Share lost: Σ loss / Σ bytes "
            "the cut lives took in. Wire goal: completed with wire / payload ≤ 1 + 4 MiB × "
            "cuts / payload. Tools alternate, order rotated per round"
        ),
        "medians": med,
        "runs": measured["runs"],
    }


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / common.MiB:.2f}"


def render_powercut(data: dict[str, Any]) -> str:
    m, ver, img = data["machine"], data["versions"], data["image"]
    lo, hi = data["span_s"]
    out = [
        "# Power cuts on the power-cut file system (`python -m benchmarks power "
        "--scenario powercut`)\n",
        f"Measured {data['date']}; seed {data['seed']} (image and cut draws). A cut every "
        f"U({lo:g}, {hi:g}) s of life at {data['rate_bytes_per_s'] / 1e6:g} MB/s, up to "
        f"{data['max_lives']} lives, {data['rounds']} rounds per tool.\n",
        f"- **Image:** `{img['repo']}:{img['tag']}`, layers {img['layers_mib']} MiB of random "
        f"bytes (gzip), {img['payload_bytes']} bytes with config and manifest "
        f"(≈ {img['payload_bytes'] / data['rate_bytes_per_s']:.1f} s at the link's rate).",
        common.machine_line(m),
        f"- **Versions:** resumer {ver['resumer']} (commit {ver['resumer_commit']}); "
        f"{ver['containerd']}; {ver['docker-registry']}.",
        f"- **Method:** {data['method']}.\n",
        "## Completion and wire bytes (medians of the runs)\n",
    ]
    rows = []
    for key, label in data["tools"].items():
        d = data["medians"][key]
        rows.append(
            [
                label,
                f"{d['completed']}/{d['runs']}",
                f"{d['survived']}/{d['completed']}",
                f"{d['lives']:.0f}",
                f"{d['cuts']:.0f}",
                f"{d['wire_ratio']:.3f}",
                f"{d['goal_ratio']:.3f}",
                f"{d['wire_goal_met']}/{d['runs']}",
                _mib(d["waste_per_cut"]),
            ]
        )
    out.append(
        common.markdown_table(
            [
                "tool",
                "completed",
                "result survives a cut after exit",
                f"median lives (cap {data['max_lives']})",
                "median cuts",
                "median wire / payload",
                "median goal: 1 + 4 MiB × cuts / payload",
                "completed within the goal",
                "median wire waste per cut (MiB)",
            ],
            rows,
        )
    )
    out.append("## Loss per cut (every cut of every run)\n")
    rows = []
    for key, label in data["tools"].items():
        d = data["medians"][key]
        fb = d["first_byte_s"]
        rows.append(
            [
                label,
                d["all_cuts"],
                _mib(d["all_loss_median"]),
                _mib(d["all_loss_max"]),
                _mib(d["all_loss_per_transfer_max"]),
                f"{d['all_cuts_over']}/{d['all_cuts']}",
                d["all_committed_lost"],
                f"{100 * d['all_lost_share']:.0f} %",
                "–" if fb is None else f"{fb:.2f}",
            ]
        )
    out.append(
        common.markdown_table(
            [
                "tool",
                "cuts",
                "median loss (MiB)",
                "max loss (MiB)",
                "max loss per running transfer (MiB)",
                f"cuts over {data['sync_interval_bytes'] // common.MiB} MiB × running transfers",
                "committed blobs lost",
                "share of the cut lives' bytes lost",
                "median first progress after a start (s)",
            ],
            rows,
        )
    )
    out.append("## Every run (✗ = not done after the cap)\n")
    per = []
    for key, label in data["tools"].items():
        rs = data["runs"][key]
        per.append(
            [
                label,
                ", ".join(f"{x['lives']}{'' if x['completed'] else '✗'}" for x in rs),
                ", ".join(f"{x['wire_ratio']:.3f} / {x['goal_ratio']:.3f}" for x in rs),
                ", ".join(_mib(x["waste_per_cut"]) for x in rs),
                ", ".join(f"{_mib(x['loss_median'])} / {_mib(x['loss_max'])}" for x in rs),
                ", ".join(f"{x['cuts_over']}/{len(x['losses'])}" for x in rs),
                ", ".join(f"{100 * x['lost_share']:.0f} %" for x in rs),
            ]
        )
    out.append(
        common.markdown_table(
            [
                "tool",
                "lives",
                "wire / payload (goal)",
                "wire waste per cut (MiB)",
                "loss per cut median / max (MiB)",
                "cuts over the bound",
                "share lost",
            ],
            per,
        )
    )
    errs = [
        (label, e)
        for key, label in data["tools"].items()
        for x in data["runs"][key]
        for e in x["errors"]
    ]
    if errs:
        out.append("## Errors the tools reported (distinct, first 300 characters)\n")
        seen: set[tuple[str, str]] = set()
        for label, e in errs:
            if (label, e) not in seen:
                seen.add((label, e))
                out.append(f"- {label}: `{' '.join(e.split())}`")
        out.append("")
    out.append(f"![completion, wire/payload and loss per cut]({PC_NAME}.png)\n")
    return "\n".join(out)


def plot_powercut(data: dict[str, Any]) -> Path:
    keys = list(data["tools"])
    short = {"resumer_pull": "resumer pull", "resumer_resume": "resumer resume"}
    labels = [short.get(k, k) for k in keys]
    panels = common.outcome_panels(
        [(data["medians"][k], data["runs"][k]) for k in keys],
        ("completed", "wire_vs_goal", "loss_per_transfer_max"),
    )
    mib = common.MiB
    per_transfer = (
        [v / mib for v in panels["loss_per_transfer_max"][0]],
        [[v / mib for v in vs] for vs in panels["loss_per_transfer_max"][1]],
    )
    return common.plot_bars(
        common.RESULTS / f"{PC_NAME}.png",
        f"Power cuts on the power-cut FS, median of the runs ({data['date'][:10]})",
        labels,
        [
            ("completed (fraction of runs)", *panels["completed"], None),
            ("(wire / payload) ÷ (1 + 4 MiB × cuts / payload)", *panels["wire_vs_goal"], 1.0),
            ("max loss per cut per running transfer (MiB)", *per_transfer, SYNC_INTERVAL / mib),
        ],
    )


def _span(text: str) -> tuple[float, float] | None:
    if text.lower() in ("", "none", "off"):
        return None
    lo, _, hi = text.partition(":")
    span = (float(lo), float(hi))
    if not 0 < span[0] <= span[1]:
        raise ValueError(text)
    return span


def main(argv: list[str]) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument(
        "--scenario",
        choices=("all", "kill", "powercut"),
        default="all",
        help="kill: the SIGKILL schedules (results/power.*); powercut: power cuts on the "
        f"power-cut file system (results/{PC_NAME}.*); all (default): both, each file "
        "written by its own part",
    )
    p.add_argument("--rounds", type=int, default=3, help="runs per tool and fixed period")
    p.add_argument(
        "--period",
        type=float,
        action="append",
        help="kill period in s (repeatable; default 1, 2, 5; 0 = no fixed-period scenario)",
    )
    p.add_argument(
        "--period-range",
        type=_span,
        default=RANGE,
        metavar="LO:HI",
        help="a second scenario: kill every U(LO, HI) s, seeded (default 0.6:1.2; 'off')",
    )
    p.add_argument("--range-rounds", type=int, default=RANGE_ROUNDS)
    p.add_argument("--range-rate", type=float, default=RANGE_RATE, metavar="BPS")
    p.add_argument(
        "--cut-range",
        type=_span,
        default=PC_SPAN,
        metavar="LO:HI",
        help="powercut: cut every U(LO, HI) s of life, seeded (default 1:2)",
    )
    p.add_argument("--cut-rounds", type=int, default=PC_ROUNDS, help="powercut: runs per tool")
    p.add_argument(
        "--max-lives", type=int, default=PC_MAX_LIVES, help="powercut: lives per run (cap)"
    )
    p.add_argument(
        "--link-stays-up",
        action="store_true",
        help="powercut: do not freeze the proxy from the cut to the reboot (the frozen "
        "tool's kernel then takes bytes into its socket buffers, counted as wire bytes)",
    )
    p.add_argument(
        "--tool",
        action="append",
        choices=list(BY_KEY),
        help="only these tools (repeatable; default: every tool in each scenario)",
    )
    p.add_argument("--max-restarts", type=int, default=MAX_RESTARTS)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.range_rounds < 1 or args.max_restarts < 0:
        p.error("--rounds ≥ 1, --range-rounds ≥ 1 and --max-restarts ≥ 0")
    if args.cut_rounds < 1 or args.max_lives < 1 or args.cut_range is None:
        p.error("--cut-rounds ≥ 1, --max-lives ≥ 1 and a --cut-range")
    keep = set(args.tool or BY_KEY)
    scenarios: list[Scenario] = []
    fixed = tuple(k for k in BY_KEY if k in keep)
    for period in args.period or list(PERIODS):
        if period > 0 and fixed:
            scenarios.append(Scenario(f"{period:g}", RATE, args.rounds, fixed, period=period))
    ranged = tuple(k for k in RANGE_TOOLS if k in keep)
    if args.period_range is not None and ranged:
        lo, hi = args.period_range
        scenarios.append(
            Scenario(f"U({lo:g},{hi:g})", args.range_rate, args.range_rounds, ranged, span=(lo, hi))
        )
    cut_tools = [k for k in PC_TOOLS if k in keep]
    kills = args.scenario in ("all", "kill") and bool(scenarios)
    cuts = args.scenario in ("all", "powercut") and bool(cut_tools)
    if cuts and (reason := unavailable_reason()) is not None:
        print(f"{PC_NAME}: skipped, the power-cut file system cannot mount here: {reason}")
        if args.scenario == "powercut":
            return 1
        cuts = False
    if not kills and not cuts:
        p.error("nothing to run")
    needed = ["docker-registry"]
    needed += ["skopeo"] if kills and "skopeo" in keep else []
    needed += ["containerd", "ctr"] if "containerd" in keep else []
    needed += ["dockerd"] if "dockerd" in keep else []
    if common.missing_tools(NAME, needed):
        return 1
    worst = 0
    if kills:
        measured = measure(scenarios, args.max_restarts)
        data = summarise(scenarios, args.max_restarts, measured)
        worst = common.finish(NAME, render(data), data, plot, no_write=args.no_write)
    if cuts:
        measured = measure_powercut(
            args.cut_rounds, args.cut_range, cut_tools, args.max_lives, not args.link_stays_up
        )
        data = summarise_powercut(args.cut_rounds, args.cut_range, args.max_lives, measured)
        text = render_powercut(data)
        worst = max(
            worst, common.finish(PC_NAME, text, data, plot_powercut, no_write=args.no_write)
        )
    return worst
