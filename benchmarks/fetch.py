"""Clean-link speed: one blob from nginx on 127.0.0.1, resumer against curl and aria2c.

Every round runs each variant once, in an order rotated per round so no tool always runs
first (or always right after another's disk writes). Outputs and roots are deleted after
every run and ``sync`` is called so the next run does not pay for the previous one's
writeback. The page cache is NOT dropped: the source blob is served from cache after the
first read, as it would be from a warm server; every tool sees the same conditions.

Goals (issue 2, "Benchmarks"): resumer ≤ 1.0× curl's wall time with verification and
checkpoints on; checkpoint overhead ≤ 5 %; peak RSS ≤ 80 MiB.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import common
from .common import GiB, MiB, Run

NAME = "fetch"
SEED = 20240601
GOAL_RATIO = 1.0  # resumer / curl wall time
GOAL_OVERHEAD = 0.05  # resumer / resumer --no-checkpoints − 1
GOAL_RSS_MIB = 80.0


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    # (url, digest, scratch dir) → (argv, output file that must exist afterwards)
    build: Callable[[str, str, Path], tuple[list[str], Path]]


def _resumer(
    *extra: str, exe: list[str] | None = None, env: dict[str, str] | None = None
) -> Callable[[str, str, Path], tuple[list[str], Path]]:
    def build(url: str, digest: str, scratch: Path) -> tuple[list[str], Path]:
        out = scratch / "out.bin"
        root = scratch / "root"  # fresh every run: no checkpoint or blob to reuse
        # fetch_argv runs the console script next to this interpreter, not the first on
        # PATH: a pyenv shim there would add bash start-ups to every timed run.
        prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
        argv = common.fetch_argv(url, digest, out, root, *extra, progress="none", exe=exe)
        return [*prefix, *argv], out

    return build


def _curl(url: str, digest: str, scratch: Path) -> tuple[list[str], Path]:
    out = scratch / "out.bin"
    return ["curl", "-s", "-o", str(out), url], out


def _aria2c(url: str, digest: str, scratch: Path) -> tuple[list[str], Path]:
    out = scratch / "out.bin"
    return [
        "aria2c",
        "-x1",
        "-s1",
        "--allow-overwrite=true",
        "--auto-file-renaming=false",
        "-d",
        str(scratch),
        "-o",
        out.name,
        "--file-allocation=none",
        "--console-log-level=warn",
        "--summary-interval=0",
        url,
    ], out


VARIANTS = [
    Variant("resumer", "resumer (default: 4 connections, 1 MiB chunks)", _resumer()),
    Variant("resumer_nockpt", "resumer --no-checkpoints", _resumer("--no-checkpoints")),
    Variant("resumer_256k", "resumer --chunk-size 256KiB", _resumer("--chunk-size", "262144")),
    # One stream, as before segments (and docker): segments must not slow the clean path.
    Variant(
        "resumer_k1",
        "resumer --max-connections-per-blob 1",
        _resumer("--max-connections-per-blob", "1"),
    ),
    # The copy to -o made at the end instead of as the bytes arrive (what the tee saves).
    Variant(
        "resumer_copy_at_end",
        "resumer, -o copied at the end",
        _resumer(env={"RESUMER_FETCH_TEE": "0"}),
    ),
    Variant("curl", "curl", _curl),
    Variant("aria2c", "aria2c -x1 -s1", _aria2c),
]
# RESUMER_BASELINE=/path/to/resumer: an earlier build beside this one, in the same run
# (e.g. the seed's, or the commit before a change), so "not slower" is one measurement.
if os.environ.get("RESUMER_BASELINE"):
    VARIANTS.insert(
        1,
        Variant(
            "resumer_baseline",
            f"resumer baseline ({os.environ.get('RESUMER_BASELINE_LABEL', 'RESUMER_BASELINE')})",
            _resumer(exe=[os.environ["RESUMER_BASELINE"]]),
        ),
    )


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*(|B|KiB|MiB|GiB)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"size like 1GiB, 256MiB or bytes, got {text!r}")
    return int(m.group(1)) * {"": 1, "B": 1, "KiB": 1024, "MiB": MiB, "GiB": GiB}[m.group(2)]


def measure(size: int, rounds: int, verify_all: bool) -> dict[str, Any]:
    servers = common.load_servers()
    work = common.WORK / NAME
    docroot = work / "docroot"
    blob = docroot / "blob.bin"
    print(f"blob: {size} bytes, seed {SEED} …", flush=True)
    digest = common.random_blob(blob, size, SEED)
    nginx = servers.start_nginx(docroot, work / "nginx")
    url = f"{nginx.url}/{blob.name}"
    scratch = work / "scratch"
    runs: dict[str, list[Run]] = {v.key: [] for v in VARIANTS}
    try:
        for r in range(rounds):
            for v in common.rotated(VARIANTS, r):
                common.fresh_dir(scratch, sync=True)
                argv, out = v.build(url, digest, scratch)
                run = common.time_child(argv, cwd=scratch)
                got = out.stat().st_size
                if got != size:
                    raise common.RunError(f"{v.key}: output has {got} bytes, expected {size}")
                # resumer verifies itself; the peers' bytes are checked once (hashing 1 GiB
                # takes a moment, and the result is outside the timed span anyway).
                if (r == 0 or verify_all) and common.file_sha256(out) != digest:
                    raise common.RunError(f"{v.key}: output digest differs from the source")
                runs[v.key].append(run)
                print(
                    f"round {r + 1}/{rounds} {v.key:15s} {run.wall_s:7.3f} s "
                    f"{run.maxrss_mib:6.1f} MiB",
                    flush=True,
                )
        common.fresh_dir(scratch, sync=True)
    finally:
        nginx.stop()
    return {"url_host": nginx.host, "digest": digest, "runs": runs}


def summarise(size: int, rounds: int, measured: dict[str, Any]) -> dict[str, Any]:
    runs: dict[str, list[Run]] = measured["runs"]
    med = common.run_medians(runs, size)
    curl = med["curl"]["wall_s"]
    ratios = {
        "resumer/curl": med["resumer"]["wall_s"] / curl,
        "resumer_nockpt/curl": med["resumer_nockpt"]["wall_s"] / curl,
        "resumer_256k/curl": med["resumer_256k"]["wall_s"] / curl,
        "aria2c/curl": med["aria2c"]["wall_s"] / curl,
        "checkpoint_overhead": med["resumer"]["wall_s"] / med["resumer_nockpt"]["wall_s"] - 1,
        "resumer_256k/resumer": med["resumer_256k"]["wall_s"] / med["resumer"]["wall_s"],
        "copy_at_end/resumer": med["resumer_copy_at_end"]["wall_s"] / med["resumer"]["wall_s"],
    }
    if "resumer_baseline" in med:
        ratios["resumer/baseline"] = med["resumer"]["wall_s"] / med["resumer_baseline"]["wall_s"]
    goals = {
        "wall_vs_curl": {
            "goal": f"≤ {GOAL_RATIO:.1f}× curl",
            "value": ratios["resumer/curl"],
            "met": ratios["resumer/curl"] <= GOAL_RATIO,
        },
        "checkpoint_overhead": {
            "goal": f"≤ {GOAL_OVERHEAD:.0%}",
            "value": ratios["checkpoint_overhead"],
            "met": ratios["checkpoint_overhead"] <= GOAL_OVERHEAD,
        },
        "peak_rss": {
            "goal": f"≤ {GOAL_RSS_MIB:.0f} MiB",
            "value": med["resumer"]["maxrss_mib"],
            "met": med["resumer"]["maxrss_mib"] <= GOAL_RSS_MIB,
        },
    }
    return {
        **common.stamp(NAME, common.peer_versions()),
        "blob": {
            "size": size,
            "seed": SEED,
            "digest": measured["digest"],
            "generator": "random.Random(seed).randbytes, 4 MiB pieces",
        },
        "server": f"nginx on {measured['url_host']} (tests/servers.py start_nginx, sendfile on)",
        "rounds": rounds,
        "method": (
            "each round runs every variant once, order rotated per round; fresh root and "
            "output every run; outputs deleted and os.sync() between runs; page cache "
            "not dropped; wall time from spawn to reap (perf_counter); peak RSS and CPU "
            "time = the command's own ru_maxrss/ru_utime/ru_stime, reported by GNU "
            "time's wait4 (a direct os.wait4 from Python would include the benchmark "
            "process's own RSS, which Linux carries across exec)"
        ),
        "variants": {
            v.key: {"label": v.label, "argv": v.build("URL", "DIGEST", Path("DIR"))[0]}
            for v in VARIANTS
        },
        "medians": med,
        "ratios": ratios,
        "goals": goals,
        "runs": runs,
    }


def render(data: dict[str, Any], profile: str | None) -> str:
    m, med, ratios, goals = data["machine"], data["medians"], data["ratios"], data["goals"]
    size = data["blob"]["size"]
    curl = med["curl"]["wall_s"]
    rows = []
    for v in VARIANTS:
        d = med[v.key]
        walls = [r.wall_s for r in data["runs"][v.key]]
        rows.append(
            [
                v.label,
                f"{d['wall_s']:.3f}",
                f"{min(walls):.2f}–{max(walls):.2f}",
                f"{d['mb_per_s']:.0f}",
                f"{d['wall_s'] / curl:.3f}×",
                f"{d['maxrss_mib']:.1f}",
                f"{d['user_s']:.2f}",
                f"{d['sys_s']:.2f}",
            ]
        )
    table = common.markdown_table(
        [
            "variant",
            "median wall (s)",
            "min–max (s)",
            "MB/s",
            "÷ curl",
            "median peak RSS (MiB)",
            "median user CPU (s)",
            "median sys CPU (s)",
        ],
        rows,
    )
    ratio_rows = [
        ["resumer / curl", f"{ratios['resumer/curl']:.3f}×"],
        ["resumer --no-checkpoints / curl", f"{ratios['resumer_nockpt/curl']:.3f}×"],
        [
            "checkpoint overhead (resumer / --no-checkpoints − 1)",
            f"{ratios['checkpoint_overhead']:+.1%}",
        ],
        ["256 KiB chunks / 1 MiB chunks", f"{ratios['resumer_256k/resumer']:.3f}×"],
        [
            "-o copied at the end / copied as the bytes arrive",
            f"{ratios['copy_at_end/resumer']:.3f}×",
        ],
        *(
            [["resumer / the baseline build", f"{ratios['resumer/baseline']:.3f}×"]]
            if "resumer/baseline" in ratios
            else []
        ),
        ["aria2c / curl", f"{ratios['aria2c/curl']:.3f}×"],
    ]
    goal_rows = []
    for name, g in goals.items():
        value = (
            f"{g['value']:.3f}×"
            if name == "wall_vs_curl"
            else f"{g['value']:+.1%}"
            if name == "checkpoint_overhead"
            else f"{g['value']:.1f} MiB"
        )
        goal_rows.append([name, g["goal"], value, "met" if g["met"] else "**missed**"])
    per_run = []
    for v in VARIANTS:
        wall_list = ", ".join(f"{r.wall_s:.2f}" for r in data["runs"][v.key])
        rss = ", ".join(f"{r.maxrss_mib:.0f}" for r in data["runs"][v.key])
        per_run.append([v.label, wall_list, rss])
    ver = data["versions"]
    out = [
        "# Clean-link speed (`python -m benchmarks fetch`)\n",
        f"Measured {data['date']}; {data['rounds']} rounds; blob {size} bytes "
        f"({size / GiB:.3g} GiB) of seeded random bytes (seed {data['blob']['seed']}, "
        f"`{data['blob']['digest']}`), served by {data['server']}.\n",
        common.machine_line(m),
        f"- **Versions:** resumer {ver['resumer']} (commit {ver['resumer_commit']}), "
        f"aiohttp {ver['aiohttp']}, xxhash {ver['xxhash']}; {ver['curl'].split(' (')[0]}; "
        f"{ver['aria2c']}; {ver['nginx']}.",
        f"- **Method:** {data['method']}. resumer verifies sha256 and fdatasyncs before "
        "commit (and every ≤ 4 MiB with checkpoints on); curl and aria2c never sync, so "
        "their data may still be in the page cache when they exit.\n",
        "## Medians\n",
        table,
        "## Ratios (of median wall times)\n",
        common.markdown_table(["ratio", "value"], ratio_rows),
        "## Goals (issue 2)\n",
        common.markdown_table(["goal", "target", "measured", "result"], goal_rows),
        "## Every run\n",
        common.markdown_table(["variant", "wall (s), in round order", "peak RSS (MiB)"], per_run),
        "![median wall time and peak RSS](fetch.png)\n",
    ]
    if profile:
        out += ["## Where resumer's time goes\n", profile.strip() + "\n"]
    return "\n".join(out)


def plot(data: dict[str, Any]) -> Path:
    labels = [v.label for v in VARIANTS]
    keys = [v.key for v in VARIANTS]
    med, runs = data["medians"], data["runs"]
    return common.plot_bars(
        common.RESULTS / f"{NAME}.png",
        f"{data['blob']['size'] / GiB:.3g} GiB from nginx on loopback, "
        f"median of {data['rounds']} ({data['date'][:10]})",
        labels,
        [
            ("wall time (s)", *common.run_panel(keys, med, runs, "wall_s"), None),
            ("peak RSS (MiB)", *common.run_panel(keys, med, runs, "maxrss_mib"), GOAL_RSS_MIB),
        ],
    )


def main(argv: list[str]) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5; goals need ≥ 5)")
    p.add_argument("--size", type=parse_size, default=GiB, help="blob size (default 1GiB)")
    p.add_argument(
        "--verify-all", action="store_true", help="hash every peer output, not only round 1's"
    )
    p.add_argument(
        "--no-write",
        action="store_true",
        help="print only; leave benchmarks/results/ alone (for quick tries)",
    )
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be ≥ 1")
    measured = measure(args.size, args.rounds, args.verify_all)
    data = summarise(args.size, args.rounds, measured)
    # A hand-written profile note (results/fetch.profile.md) survives re-runs.
    note = common.RESULTS / f"{NAME}.profile.md"
    text = render(data, note.read_text() if note.exists() else None)
    return common.finish(NAME, text, data, plot, no_write=args.no_write)
