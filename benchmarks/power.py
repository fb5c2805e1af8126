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
  already complete in the OCI destination; partial ones start again).

Metrics: completed within 30 restarts?, wall time (all lives together), wire bytes
(the proxy's ``bytes_down`` over all lives) / image payload, restarts needed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
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
MAX_RESTARTS = 30
LIFE_LIMIT_S = 120.0  # a life that outlives T is killed anyway; this bounds the last one


@dataclass(frozen=True)
class Tool:
    key: str
    label: str
    first: Callable[[Ctx], list[str]]
    again: Callable[[Ctx], list[str]]


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
]


def _one_life(argv: list[str], period: float, log: Path) -> tuple[int | None, float]:
    """Run once; SIGKILL the process group after ``period`` s. Returns (exit code or None)."""
    t0 = time.perf_counter()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
        try:
            code: int | None = proc.wait(timeout=period)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    return code, time.perf_counter() - t0


def run_with_kills(tool: Tool, ctx: Ctx, period: float, max_restarts: int) -> dict[str, Any]:
    log = ctx.scratch / "tool.log"
    t0 = time.perf_counter()
    restarts, codes, done = 0, [], False
    for life in range(max_restarts + 1):
        argv = tool.first(ctx) if life == 0 else tool.again(ctx)
        code, _ = _one_life(argv, period if period > 0 else LIFE_LIMIT_S, log)
        codes.append(code)
        done = code == 0 and image_bench.pulled(ctx)
        if done:
            break
        if life < max_restarts:
            restarts += 1
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
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
        "log_tail": "" if done else text.strip()[-600:],
    }


def measure(rounds: int, periods: list[float], max_restarts: int) -> dict[str, Any]:
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        f"{t:g}": {tool.key: [] for tool in TOOLS} for t in periods
    }
    with image_bench.registry_with_image(NAME, LAYERS_MIB, SEED) as lab:
        image = lab.image
        for r in range(rounds):
            order = common.rotated(TOOLS, r)
            for period in periods:
                for tool in order:
                    with lab.proxied(SEED + r, rate=RATE) as (ctx, counters):
                        row = run_with_kills(tool, ctx, period, max_restarts)
                    row["wire_bytes"] = counters.get("bytes_down", 0)
                    row["wire_ratio"] = row["wire_bytes"] / image.payload
                    row["connections"] = counters.get("connections", 0)
                    runs[f"{period:g}"][tool.key].append(row)
                    print(
                        f"T={period:g}s round {r + 1}/{rounds} {tool.key:15s} "
                        f"{'ok  ' if row['completed'] else 'FAIL'} {row['wall_s']:6.1f} s "
                        f"restarts {row['restarts']:2d} wire/payload {row['wire_ratio']:.3f}",
                        flush=True,
                    )
    return {"image": image, "runs": runs}


def summarise(rounds: int, max_restarts: int, measured: dict[str, Any]) -> dict[str, Any]:
    image: BenchImage = measured["image"]
    med: dict[str, dict[str, Any]] = {}
    for period, per_tool in measured["runs"].items():
        med[period] = {}
        for key, rows in per_tool.items():
            med[period][key] = common.outcome_medians(rows, ["wall_s", "wire_ratio", "restarts"])
    return {
        **common.stamp(NAME, image_bench.versions()),
        "seed": SEED,
        "rounds": rounds,
        "max_restarts": max_restarts,
        "rate_bytes_per_s": RATE,
        "image": image_bench.image_summary(image, LAYERS_MIB),
        "tools": {t.key: t.label for t in TOOLS},
        "method": (
            "real CNCF registry on 127.0.0.1 behind a fresh resumer.lab.proxy per run "
            "(rate limit only, no cuts); the tool's process group is SIGKILLed T s after "
            "each start and the tool restarted at once with the same root/destination, "
            f"until it exits 0 with every layer in the OCI destination or {max_restarts} "
            "restarts have passed; wall = first start to last exit; wire = proxy "
            "bytes_down over all lives; tools alternate, order rotated per round"
        ),
        "medians": med,
        "runs": measured["runs"],
    }


def render(data: dict[str, Any]) -> str:
    m, ver, img = data["machine"], data["versions"], data["image"]
    out = [
        "# Power cuts (`python -m benchmarks power`)\n",
        f"Measured {data['date']}; {data['rounds']} runs per tool and period; seed "
        f"{data['seed']} (image; the proxy injects no cuts here). Link: "
        f"{data['rate_bytes_per_s'] / 1e6:.0f} MB/s.\n",
        f"- **Image:** `{img['repo']}:{img['tag']}`, layers {img['layers_mib']} MiB of random "
        f"bytes (gzip), {img['payload_bytes']} bytes with config and manifest "
        f"(≈ {img['payload_bytes'] / data['rate_bytes_per_s']:.1f} s at the link rate).",
        common.machine_line(m),
        f"- **Versions:** resumer {ver['resumer']} (commit {ver['resumer_commit']}); "
        f"{ver['skopeo']}; {ver['docker-registry']}.",
        f"- **Method:** {data['method']}.\n",
        "## Medians\n",
    ]
    rows = []
    for period in data["medians"]:
        for t in TOOLS:
            d = data["medians"][period][t.key]
            rows.append(
                [
                    f"{period} s",
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
    for period in data["runs"]:
        for t in TOOLS:
            rs = data["runs"][period][t.key]
            per.append(
                [
                    f"{period} s",
                    t.label,
                    ", ".join(f"{x['restarts']}{'' if x['completed'] else '✗'}" for x in rs),
                    ", ".join(f"{x['wall_s']:.1f}" for x in rs),
                    ", ".join(f"{x['wire_ratio']:.2f}" for x in rs),
                ]
            )
    out.append(
        common.markdown_table(["kill every", "tool", "restarts", "wall (s)", "wire / payload"], per)
    )
    odd = [
        (p, t.label, x["clean_exits_without_image"])
        for p in data["runs"]
        for t in TOOLS
        for x in data["runs"][p][t.key]
        if x["clean_exits_without_image"]
    ]
    if odd:
        out.append("Lives that exited 0 without the image in the destination:\n")
        out += [f"- T = {p} s, {label}: {n}" for p, label, n in odd]
        out.append("")
    out.append("![completion, restarts and wire/payload per kill period](power.png)\n")
    return "\n".join(out)


def plot(data: dict[str, Any]) -> Path:
    cells = [(p, t) for p in data["medians"] for t in TOOLS]
    labels = [f"T={p}s {t.key.replace('_', ' ')}" for p, t in cells]
    panels = common.outcome_panels(
        [(data["medians"][p][t.key], data["runs"][p][t.key]) for p, t in cells],
        ("completed", "restarts", "wire_ratio"),
    )
    return common.plot_bars(
        common.RESULTS / f"{NAME}.png",
        f"SIGKILL every T s and restart, median of {data['rounds']} ({data['date'][:10]})",
        labels,
        [
            ("completed (fraction of runs)", *panels["completed"], None),
            (f"restarts (cap {data['max_restarts']})", *panels["restarts"], None),
            ("wire bytes / payload", *panels["wire_ratio"], 1.0),
        ],
    )


def main(argv: list[str]) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--period",
        type=float,
        action="append",
        help="kill period in s (repeatable; default 1, 2, 5)",
    )
    p.add_argument("--max-restarts", type=int, default=MAX_RESTARTS)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.max_restarts < 0:
        p.error("--rounds ≥ 1 and --max-restarts ≥ 0")
    if common.missing_tools(NAME, ("docker-registry", "skopeo")):
        return 1
    measured = measure(args.rounds, args.period or list(PERIODS), args.max_restarts)
    data = summarise(args.rounds, args.max_restarts, measured)
    return common.finish(NAME, render(data), data, plot, no_write=args.no_write)
