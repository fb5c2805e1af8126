"""Cut links: one image (and its largest layer blob) through the same seeded RST schedule.

The real CNCF registry serves a seeded ~64 MiB image on 127.0.0.1; a fresh
``python -m resumer.lab.proxy`` sits in front of it for every single run, seeded with
``SEED + run index``, so run i of every tool meets the same cut points: connection k is
reset after a number of bytes drawn uniformly from the schedule's span, and all
connections share one token-bucket rate limit. The proxy's ``bytes_down`` is the wire.

Tools, each with ~10 retries and a 1 s retry step where it can be set:

- ``resumer pull`` (the image) and ``resumer fetch`` (the largest layer blob):
  ``--max-download-attempts 11 --retry-delay 1`` (resumer's delay is linear: n × 1 s);
- ``skopeo copy docker://… oci:…`` with ``--retry-times 5``: skopeo 1.9.3 retries the
  whole copy with exponential back-off (1, 2, 4, 8, 16 s, not settable in this version),
  so 10 retries would sleep 17 min; a retry keeps finished layers and restarts the rest;
- ``docker pull`` against a fresh ``dockerd`` per run (``resumer.lab.dockerd``: vfs, own data
  and exec roots, ``--insecure-registry 127.0.0.0/8``, ``--max-download-attempts 11``),
  started before and stopped after the timed pull: it retries a layer within the pull,
  resuming its partial file with Range, after a delay of 5 s × n that cannot be set;
- ``curl --retry 10 --retry-all-errors --retry-delay 1`` (the blob) — the plain retry,
  which throws the partial away and restarts from byte 0 (no ``-C -``);
- ``aria2c --max-tries=11 --retry-wait=1 --checksum=sha-256=…`` (the blob) — it resumes
  with Range inside one session, and verifies the digest like resumer does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resumer.lab.dockerd import Dockerd
from resumer.lab.dockerd import versions as dockerd_versions

from . import common, image_bench
from .common import BenchImage, MiB
from .image_bench import Ctx

NAME = "cuts"
SEED = 20240605
LAYERS_MIB = (4, 12, 48)  # ~64 MiB image; the 48 MiB layer is the blob for blob tools
RATE = 60e6  # bytes/s: fast enough to be quick, slow enough that a cut is not instant
LIMIT_S = 150.0  # per run; nothing here should take that long
ATTEMPTS = 11  # resumer/aria2c tries = curl's 1 + 10 retries
# name → (cut span in bytes, why). "harsh": no connection ever carries the 48 MiB layer;
# "mild": ~29 % of fresh connections do, so a tool that restarts from zero can finish.
SCHEDULES: dict[str, tuple[tuple[int, int], str]] = {
    "harsh": ((2 * MiB, 16 * MiB), "every connection cut after U(2, 16) MiB"),
    "mild": ((8 * MiB, 64 * MiB), "every connection cut after U(8, 64) MiB"),
}


@dataclass(frozen=True)
class Tool:
    key: str
    label: str
    level: str  # "image" or "blob": what payload means
    argv: Callable[[Ctx], list[str]]
    #: around the timed command: a daemon it talks to (started and stopped untimed)
    session: Callable[[Ctx], AbstractContextManager[Any]] | None = None
    done: Callable[[Ctx], bool] | None = None  # None: the level's own check


def _resumer_pull(c: Ctx) -> list[str]:
    return image_bench.pull_argv(c, "--max-download-attempts", str(ATTEMPTS), "--retry-delay", "1")


def _skopeo(c: Ctx) -> list[str]:
    return image_bench.skopeo_copy_argv(c, "--retry-times", "5")


def _resumer_fetch(c: Ctx) -> list[str]:
    return common.retrying_fetch_argv(c.blob_url, c.image.largest[0], c.scratch, ATTEMPTS)


def _curl(c: Ctx) -> list[str]:
    return common.retrying_curl_argv(c.blob_url, c.scratch, ATTEMPTS)


def _aria2c(c: Ctx) -> list[str]:
    return common.retrying_aria2c_argv(c.blob_url, c.image.largest[0], c.scratch, ATTEMPTS)


def _dockerd_of(c: Ctx) -> Dockerd:
    return Dockerd(c.scratch / "dockerd", max_download_attempts=ATTEMPTS)


@contextmanager
def _dockerd_session(c: Ctx) -> Iterator[None]:
    """A fresh dockerd (empty data root: the pull downloads every layer), stopped after."""
    d = _dockerd_of(c)
    d.start()
    try:
        yield
    finally:
        d.remove()


def _docker_pull(c: Ctx) -> list[str]:
    return _dockerd_of(c).pull_argv(c.ref)


def _docker_pulled(c: Ctx) -> bool:
    return _dockerd_of(c).has_image(c.ref, c.image.manifest_digest)


TOOLS = [
    Tool("resumer_pull", "resumer pull", "image", _resumer_pull),
    Tool("skopeo", "skopeo copy --retry-times 5", "image", _skopeo),
    Tool(
        "dockerd",
        "docker pull, dockerd --max-download-attempts 11",
        "image",
        _docker_pull,
        session=_dockerd_session,
        done=_docker_pulled,
    ),
    Tool("resumer_fetch", "resumer fetch", "blob", _resumer_fetch),
    Tool("curl", "curl --retry 10 (restarts)", "blob", _curl),
    Tool("aria2c", "aria2c --max-tries 11", "blob", _aria2c),
]


def _completed(tool: Tool, ctx: Ctx, code: int | None) -> bool:
    if code != 0:
        return False
    if tool.done is not None:
        return tool.done(ctx)
    if tool.level == "image":
        return image_bench.pulled(ctx)
    out = ctx.scratch / "out.bin"
    return out.is_file() and common.file_sha256(out) == ctx.image.largest[0]


def measure(
    rounds: int,
    schedules: list[str],
    *,
    tools: Sequence[Tool] = TOOLS,
    name: str = NAME,
    repo: str = "bench/img",
) -> dict[str, Any]:
    """Every tool through every schedule, ``rounds`` runs each (``tools``, ``name`` and
    ``repo``: another benchmark's tools on this one's schedules, its own work directory)."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {t.key: [] for t in tools} for s in schedules
    }
    load0 = os.getloadavg()
    with image_bench.registry_with_image(name, LAYERS_MIB, SEED, repo) as lab:
        image = lab.image
        for sched in schedules:
            span, _ = SCHEDULES[sched]
            for r in range(rounds):
                seed = SEED + r  # the same schedule for every tool in run r
                for tool in common.rotated(tools, r):
                    with (
                        lab.proxied(seed, cut_after=span, rate=RATE) as (ctx, counters),
                        tool.session(ctx) if tool.session else nullcontext(),
                    ):
                        res = common.run_bounded(tool.argv(ctx), LIMIT_S, cwd=ctx.scratch)
                        done = _completed(tool, ctx, res.returncode)
                    payload = image.payload if tool.level == "image" else image.largest[1]
                    row = {
                        "seed": seed,
                        "completed": done,
                        "returncode": res.returncode,
                        "wall_s": res.wall_s,
                        "wire_bytes": counters.get("bytes_down", 0),
                        "payload_bytes": payload,
                        "wire_ratio": counters.get("bytes_down", 0) / payload,
                        "connections": counters.get("connections", 0),
                        "cuts": counters.get("cuts", 0),
                        "tool_stats": common.json_stats(res.stdout),
                        "stderr_tail": "" if done else res.stderr_tail,
                    }
                    runs[sched][tool.key].append(row)
                    print(
                        f"{sched} round {r + 1}/{rounds} {tool.key:14s} "
                        f"{'ok  ' if done else 'FAIL'} {res.wall_s:6.1f} s "
                        f"wire/payload {row['wire_ratio']:.3f} cuts {row['cuts']}",
                        flush=True,
                    )
    return {"image": image, "runs": runs, "load": [load0, os.getloadavg()]}


def summarise(rounds: int, measured: dict[str, Any]) -> dict[str, Any]:
    image: BenchImage = measured["image"]
    med: dict[str, dict[str, Any]] = {}
    for sched, per_tool in measured["runs"].items():
        med[sched] = {}
        for key, rows in per_tool.items():
            med[sched][key] = common.outcome_medians(
                rows, ["wall_s", "wire_ratio", "cuts"], completed_too=["wall_s", "wire_ratio"]
            )
    return {
        **common.stamp(NAME, {**image_bench.versions(), **dockerd_versions()}),
        "seed": SEED,
        "seeds_per_round": [SEED + r for r in range(rounds)],
        "rounds": rounds,
        "rate_bytes_per_s": RATE,
        "schedules": {
            s: {"cut_after": SCHEDULES[s][0], "text": SCHEDULES[s][1]} for s in measured["runs"]
        },
        "image": image_bench.image_summary(image, LAYERS_MIB, with_blob=True),
        "tools": {t.key: {"label": t.label, "level": t.level} for t in TOOLS},
        "method": (
            "real CNCF registry on 127.0.0.1 behind a fresh resumer.lab.proxy per run "
            "(seed SEED+round, so run i of every tool meets the same cut points per "
            "connection in accept order), rate-limited; tools alternate, order rotated "
            "per round; fresh root/output every run (dockerd: a fresh daemon per run on an "
            "empty data root, started before and stopped after the timed docker pull); "
            "wire = proxy bytes_down "
            "(server→client bytes including HTTP headers); wall from spawn to exit, "
            f"capped at {LIMIT_S:.0f} s"
        ),
        "load_average": measured["load"],
        "medians": med,
        "runs": measured["runs"],
    }


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def render(data: dict[str, Any]) -> str:
    m, ver, img = data["machine"], data["versions"], data["image"]
    out = [
        "# Cut links (`python -m benchmarks cuts`)\n",
        f"Measured {data['date']}; {data['rounds']} runs per tool and schedule; seeds "
        f"{', '.join(str(s) for s in data['seeds_per_round'])} (run i uses seed {data['seed']}+i "
        f"for every tool). Link: {data['rate_bytes_per_s'] / 1e6:.0f} MB/s shared token bucket.\n",
        f"- **Image:** `{img['repo']}:{img['tag']}`, layers {img['layers_mib']} MiB of random "
        f"bytes (gzip), {img['payload_bytes']} bytes with config and manifest. Blob tools fetch "
        f"the largest layer, {img['blob'][1]} bytes (`{img['blob'][0][:19]}…`), from "
        "`/v2/<repo>/blobs/<digest>` of the same registry.",
        common.machine_line(m),
        *([common.load_line(*data["load_average"])] if "load_average" in data else []),
        f"- **Versions:** resumer {ver['resumer']} (commit {ver['resumer_commit']}); "
        f"{ver['skopeo']}; {ver.get('dockerd', 'dockerd not run')}; "
        f"{ver['curl'].split(' (')[0]}; {ver['aria2c']}; "
        f"{ver['docker-registry']}.",
        f"- **Method:** {data['method']}.",
        "- **Retries:** resumer and aria2c 11 tries, 1 s step (resumer's back-off is linear, "
        "n × 1 s; aria2c waits 1 s each time); curl 1 + 10 retries, 1 s, restarting from "
        "byte 0 each time (no `-C -`); skopeo `--retry-times 5`, which re-runs the whole copy "
        "with exponential back-off 1–16 s (keeps finished layers, restarts partial ones); "
        "dockerd (vfs, `--max-download-attempts 11`) retries each layer within the one pull, "
        "resuming its partial file with Range, after its own fixed delay of 5 s × n "
        "(not settable).\n",
    ]
    for sched, info in data["schedules"].items():
        out.append(f"## {sched}: {info['text']}\n")
        rows = []
        for t in TOOLS:
            d = data["medians"][sched][t.key]
            rows.append(
                [
                    t.label,
                    t.level,
                    f"{d['completed']}/{d['runs']}",
                    f"{d['wall_s']:.1f}",
                    _fmt(d["wall_s_completed"], ".1f"),
                    f"{d['wire_ratio']:.3f}",
                    _fmt(d["wire_ratio_completed"], ".3f"),
                    f"{d['cuts']:.0f}",
                ]
            )
        out.append(
            common.markdown_table(
                [
                    "tool",
                    "payload",
                    "completed",
                    "median wall (s), all runs",
                    "median wall (s), completed runs",
                    "median wire / payload, all runs",
                    "median wire / payload, completed",
                    "median cuts",
                ],
                rows,
            )
        )
        per = []
        for t in TOOLS:
            rs = data["runs"][sched][t.key]
            per.append(
                [
                    t.label,
                    ", ".join(f"{x['wall_s']:.1f}{'' if x['completed'] else '✗'}" for x in rs),
                    ", ".join(f"{x['wire_ratio']:.2f}" for x in rs),
                ]
            )
        out.append("Every run (✗ = did not complete):\n")
        out.append(common.markdown_table(["tool", "wall (s)", "wire / payload"], per))
        fails = [
            (t.label, x["returncode"], x["stderr_tail"].splitlines()[-1:])
            for t in TOOLS
            for x in data["runs"][sched][t.key]
            if not x["completed"] and x["stderr_tail"]
        ]
        if fails:
            seen: set[str] = set()
            out.append("Why runs failed (last stderr line, first of each kind):\n")
            for label, code, last in fails:
                line = last[0] if last else ""
                if label in seen:
                    continue
                seen.add(label)
                out.append(f"- {label} (exit {code}): `{line[:220]}`")
            out.append("")
    out.append("![completion, wall time and wire/payload per tool](cuts.png)\n")
    return "\n".join(out)


def plot(data: dict[str, Any]) -> Path:
    cells = [(s, t) for s in data["schedules"] for t in TOOLS]
    labels = [f"{s}: {t.label.split(' --')[0]}" for s, t in cells]
    panels = common.outcome_panels(
        [(data["medians"][s][t.key], data["runs"][s][t.key]) for s, t in cells],
        ("completed", "wall_s", "wire_ratio"),
    )
    return common.plot_bars(
        common.RESULTS / f"{NAME}.png",
        f"Cut links, seeded RST schedule, median of {data['rounds']} ({data['date'][:10]})",
        labels,
        [
            ("completed (fraction of runs)", *panels["completed"], None),
            ("wall time (s), incl. failed runs", *panels["wall_s"], None),
            ("wire bytes / payload", *panels["wire_ratio"], 1.0),
        ],
    )


def main(argv: list[str]) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--rounds", type=int, default=3, help="runs per tool and schedule (≥ 3)")
    p.add_argument(
        "--schedule",
        choices=list(SCHEDULES),
        action="append",
        help="only this schedule (repeatable; default: all)",
    )
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be ≥ 1")
    if common.missing_tools(NAME, ("docker-registry", "skopeo", "curl", "aria2c", "dockerd")):
        return 1
    measured = measure(args.rounds, args.schedule or list(SCHEDULES))
    data = summarise(args.rounds, measured)
    return common.finish(NAME, render(data), data, plot, no_write=args.no_write)
