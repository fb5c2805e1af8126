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

Two scenarios: kill every T in {1, 2, 5} s at 20 MB/s (every tool), and DESIGN's
containerd figure, kill every U(0.6, 1.2) s (seeded per run, the same draws for every
tool in a round) at 10 MB/s (resumer and containerd; skopeo cannot finish a pull that
is cut before 1.2 s).

Metrics: completed within 30 restarts?, wall time (all lives together), wire bytes
(the proxy's ``bytes_down`` over all lives) / image payload, restarts needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
RANGE_TOOLS = ("resumer_pull", "resumer_256k", "containerd")
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


def _ctd_config(c: Ctx) -> Path:
    """A minimal config: own root/state/socket, no CRI, no snapshotters that cannot load."""
    d = _ctd_dir(c)
    path = d / "config.toml"
    if not path.exists():
        d.mkdir(parents=True, exist_ok=True)
        disabled = [
            "io.containerd.grpc.v1.cri",
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.tracing.processor.v1.otlp",
            "io.containerd.internal.v1.tracing",
        ]
        path.write_text(
            "version = 2\n"
            f'root = "{d / "root"}"\n'
            f'state = "{d / "state"}"\n'
            f'temp = "{d / "tmp"}"\n'
            f"disabled_plugins = {json.dumps(disabled)}\n"
            "[grpc]\n"
            f'  address = "{_ctd_sock(c)}"\n'
            "[ttrpc]\n"
            f'  address = "{_ctd_sock(c)}.ttrpc"\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{d / "opt"}"\n'
        )
    return path


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
            client = subprocess.Popen(
                _ctr_pull(c),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
            try:
                return client.wait(timeout=max(0.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                return None
            finally:
                _kill_group(client)
        finally:
            _kill_group(daemon)


def _ctd_pulled(c: Ctx) -> bool:
    """Whether containerd's content store holds every layer of the image, at full size."""
    blobs = _ctd_dir(c) / "root" / "io.containerd.content.v1.content" / "blobs" / "sha256"
    for digest, size in c.image.layers:
        p = blobs / digest.removeprefix("sha256:")
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


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


def measure(scenarios: list[Scenario], max_restarts: int) -> dict[str, Any]:
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        s.label: {key: [] for key in s.tools} for s in scenarios
    }
    with image_bench.registry_with_image(NAME, LAYERS_MIB, SEED) as lab:
        image = lab.image
        for s in scenarios:
            tools = [BY_KEY[k] for k in s.tools]
            for r in range(s.rounds):
                for tool in common.rotated(tools, r):
                    with lab.proxied(SEED + r, rate=s.rate) as (ctx, counters):
                        row = run_with_kills(tool, ctx, s.periods(SEED + r), max_restarts)
                    row["wire_bytes"] = counters.get("bytes_down", 0)
                    row["wire_ratio"] = row["wire_bytes"] / image.payload
                    row["connections"] = counters.get("connections", 0)
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
            med[period][key] = common.outcome_medians(rows, ["wall_s", "wire_ratio", "restarts"])
    return {
        **common.stamp(NAME, image_bench.versions()),
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
            "exits 0 with every layer in the content store; T is fixed, or drawn from "
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
        f"{ver['skopeo']}; {ver['containerd']}; {ver['docker-registry']}.",
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
    if not scenarios:
        p.error("nothing to run")
    needed = ["docker-registry"]
    needed += ["skopeo"] if "skopeo" in keep else []
    needed += ["containerd", "ctr"] if "containerd" in keep else []
    if common.missing_tools(NAME, needed):
        return 1
    measured = measure(scenarios, args.max_restarts)
    data = summarise(scenarios, args.max_restarts, measured)
    return common.finish(NAME, render(data), data, plot, no_write=args.no_write)
