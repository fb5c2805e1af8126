"""``docker pull`` through ``resumer serve`` against ``docker pull`` direct (issue 11).

The same seeded ~64 MiB image of three layers (4, 12, 48 MiB of random bytes, gzip) sits
in the real CNCF registry on 127.0.0.1 as ``library/bench:v1``, behind a fresh
``resumer.lab.proxy`` per run: the proxy's ``bytes_down`` is what the upstream served,
the wire this benchmark reports per image byte. Two variants meet each schedule, with the
same seeds (run i of both variants meets the same cut points, or the same kill times):

- ``docker pull`` direct: dockerd (``resumer.lab.dockerd``: vfs, own roots, fresh data
  root per run) pulls ``127.0.0.1:PROXY/library/bench:v1``, the upstream itself;
- through ``resumer serve``: the mirror (``tests/engines.py``'s ``ResumerServe``, its own
  root, fresh per run; ``--upstream`` the proxy) and a dockerd whose ``daemon.json`` names
  it in ``registry-mirrors`` (and a dead HTTP(S) proxy in its environment, so a fallback
  to Docker Hub fails instead of going out) pulls ``bench:v1``, a Docker Hub name: dockerd
  sends only those to its mirrors.

Schedules, each the code of the benchmark that owns it (imported, not copied):

- (a) ``cuts``' harsh schedule: every upstream connection reset after U(2, 16) MiB, at
  60 MB/s; one ``docker pull`` per run (dockerd ``--max-download-attempts 11``, its own
  5 s × n delay), capped at 150 s; the mirror is started before and stopped after it.
- (b) ``power``'s U(0.6, 1.2) s schedule at 10 MB/s: dockerd and its client are SIGKILLed
  T s after each daemon start (exec root cleared, as /run by a reboot) and started again
  at once, up to 30 restarts; the mirror runs on through every kill.
- (c) the same, but the mirror is SIGKILLed with dockerd at the same instants, as a power
  cut would kill both, and started again with it on the same root and port (its start is
  inside the life's T too). A SIGKILL keeps the page cache: what the mirror wrote is still
  there after it, synced or not, so this is a crash of both processes, not a loss of
  unsynced writes (``power --scenario powercut`` is that, for ``resumer pull``).

Reported: completion, lives (docker pull runs with their daemon), wall, and wire bytes /
image bytes (the upstream's bytes over all lives). The goal: through resumer every run
completes with the upstream serving at most 1.05× the image.
"""

from __future__ import annotations

import dataclasses
import functools
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from resumer.lab.dockerd import Dockerd
from resumer.lab.dockerd import versions as dockerd_versions

from . import common, cuts, image_bench, power
from .image_bench import Ctx

NAME = "mirror"
REPO = "library/bench"  # a Docker Hub name: dockerd's registry-mirrors apply to those only
MIRROR_REF = "bench:v1"  # what the mirrored dockerd pulls (docker.io/library/bench:v1)
GOAL = 1.05  # the upstream's bytes per image byte, through resumer, every run
CUT_SCHEDULE = "harsh"  # cuts.SCHEDULES: every connection reset after U(2, 16) MiB
ROUNDS = 3
SCHEDULES = ("cuts", "kill_dockerd", "kill_both")
SCHEDULE_TEXT = {
    "cuts": "(a) every upstream connection reset after U(2, 16) MiB, 60 MB/s",
    "kill_dockerd": "(b) SIGKILL of dockerd every U(0.6, 1.2) s, 10 MB/s",
    "kill_both": "(c) SIGKILL of dockerd and resumer serve every U(0.6, 1.2) s, 10 MB/s",
}
VARIANTS = {"direct": "docker pull direct", "mirror": "docker pull through resumer serve"}


def _engines() -> ModuleType:
    """tests/engines.py (ResumerServe, engine_dockerd), loaded by path as servers.py is."""
    return common.load_tests_module("engines")


# --------------------------------------------------------------------------- the mirror

#: per run (scratch directory): the mirror its dockerd pulls through
_MIRRORS: dict[Path, Any] = {}


def _free_port() -> int:
    # The mirror's port must be known before its first start: daemon.json names it, and a
    # restarted mirror must come back on it (a port taken in between fails the run loudly).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _mirror(c: Ctx, *, started: bool) -> Iterator[Any]:
    """The run's ``resumer serve`` (upstream: the run's proxy) on a fixed port; stopped,
    whatever state it is in, when the run ends."""
    serve = _engines().ResumerServe(
        c.scratch / "serve", f"127.0.0.1:{c.port}", log=c.scratch / "serve.log"
    )
    serve.port = _free_port()
    _MIRRORS[c.scratch] = serve
    try:
        if started:
            serve.start()
        yield serve
    finally:
        serve.stop()
        _MIRRORS.pop(c.scratch, None)


def _mirrored_dockerd(c: Ctx) -> Dockerd:
    """dockerd with the README's daemon.json naming the run's mirror (the same roots and
    socket every time it is built for this run)."""
    serve = _MIRRORS.get(c.scratch)
    host = serve.host if serve is not None else "127.0.0.1:0"
    d: Dockerd = _engines().engine_dockerd(
        c.scratch / "dm", host, max_download_attempts=power.DOCKERD_ATTEMPTS
    )
    return d


def _mirrored_pull(c: Ctx) -> list[str]:
    return _mirrored_dockerd(c).pull_argv(MIRROR_REF)


def _mirrored_pulled(c: Ctx) -> bool:
    return _mirrored_dockerd(c).has_image(MIRROR_REF, c.image.manifest_digest)


# --------------------------------------------------------------------------- (a) cuts


@contextmanager
def _cuts_session(c: Ctx) -> Iterator[None]:
    """The mirror and a fresh mirrored dockerd, both started before the timed pull."""
    with _mirror(c, started=True):
        d = _mirrored_dockerd(c)
        d.start()
        try:
            yield
        finally:
            d.remove()


CUT_TOOLS = [
    cuts.Tool(
        "direct",
        VARIANTS["direct"],
        "image",
        cuts._docker_pull,
        session=cuts._dockerd_session,
        done=cuts._docker_pulled,
    ),
    cuts.Tool(
        "mirror", VARIANTS["mirror"], "image", _mirrored_pull, _cuts_session, _mirrored_pulled
    ),
]


# --------------------------------------------------------------------------- (b), (c) kills


def _kill_life(c: Ctx, life: int, period: float, log: Path, *, both: bool) -> int | None:
    companion = _MIRRORS[c.scratch] if both else None
    return power._dockerd_life(
        c, life, period, log, dockerd=_mirrored_dockerd, ref=MIRROR_REF, companion=companion
    )


def _kill_tool(key: str, both: bool) -> power.Tool:
    return power.Tool(
        key,
        VARIANTS["mirror"],
        _mirrored_pull,
        _mirrored_pull,
        life=functools.partial(_kill_life, both=both),
        done=_mirrored_pulled,
        # (b): the mirror is up before the first life and through every kill; (c): each
        # life starts it with dockerd
        session=functools.partial(_mirror, started=not both),
    )


KILL_TOOLS = {
    # power's own dockerd tool (its notes on daemon start-up come along), under our key
    "direct": dataclasses.replace(power.BY_KEY["dockerd"], key="direct", label=VARIANTS["direct"]),
    "mirror_b": _kill_tool("mirror_b", both=False),
    "mirror_c": _kill_tool("mirror_c", both=True),
}


# --------------------------------------------------------------------------- measure


def measure(rounds: int, schedules: list[str], max_restarts: int) -> dict[str, Any]:
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    images: dict[str, Any] = {}  # each owner's image: the same shape, its own seed
    if "cuts" in schedules:
        got = cuts.measure(rounds, [CUT_SCHEDULE], tools=CUT_TOOLS, name=f"{NAME}-cuts", repo=REPO)
        images["cuts"] = got["image"]
        runs["cuts"] = {}
        for key, rows in got["runs"][CUT_SCHEDULE].items():
            for row in rows:
                row["lives"] = 1  # one docker pull (dockerd retries inside it)
            runs["cuts"][key] = rows
    kills = [s for s in ("kill_dockerd", "kill_both") if s in schedules]
    if kills:
        keys = {"kill_dockerd": ("direct", "mirror_b"), "kill_both": ("direct", "mirror_c")}
        scenarios = [
            power.Scenario(s, power.RANGE_RATE, rounds, keys[s], span=power.RANGE) for s in kills
        ]
        if "kill_dockerd" in kills and "kill_both" in kills:
            # the direct runs of (b) and (c) are the same runs: one is enough for both
            scenarios[1] = power.Scenario(
                "kill_both", power.RANGE_RATE, rounds, ("mirror_c",), span=power.RANGE
            )
        got = power.measure(
            scenarios, max_restarts, by_key=KILL_TOOLS, name=f"{NAME}-kills", repo=REPO
        )
        images["kills"] = got["image"]
        for s in kills:
            per = got["runs"][s]
            runs[s] = {
                "direct": per.get("direct") or got["runs"]["kill_dockerd"]["direct"],
                "mirror": per["mirror_b" if s == "kill_dockerd" else "mirror_c"],
            }
    return {"images": images, "runs": runs}


def summarise(rounds: int, max_restarts: int, measured: dict[str, Any]) -> dict[str, Any]:
    med: dict[str, dict[str, Any]] = {}
    for sched, per in measured["runs"].items():
        med[sched] = {}
        for key, rows in per.items():
            m = common.outcome_medians(rows, ["wall_s", "wire_ratio", "lives"])
            m["within_goal"] = sum(1 for x in rows if x["completed"] and x["wire_ratio"] <= GOAL)
            m["wire_max"] = max(x["wire_ratio"] for x in rows)
            med[sched][key] = m
    return {
        **common.stamp(NAME, {**image_bench.versions(), **dockerd_versions()}),
        "cut_seeds": [cuts.SEED + r for r in range(rounds)],
        "kill_seeds": [power.SEED + r for r in range(rounds)],
        "rounds": rounds,
        "max_restarts": max_restarts,
        "goal_wire_ratio": GOAL,
        "schedules": {s: SCHEDULE_TEXT[s] for s in measured["runs"]},
        "variants": VARIANTS,
        "images": {
            k: {**image_bench.image_summary(img, cuts.LAYERS_MIB), "seed": seed}
            for k, img in measured["images"].items()
            for seed in [cuts.SEED if k == "cuts" else power.SEED]
        },
        "method": (
            "real CNCF registry on 127.0.0.1 behind a fresh resumer.lab.proxy per run, "
            "whose bytes_down (server→client, headers included, over all lives) is the wire; "
            "docker pull direct pulls from the proxy; through resumer, dockerd's daemon.json "
            "names a resumer serve (own root, fresh per run) in registry-mirrors and the "
            "mirror's --upstream is the proxy. (a) is benchmarks/cuts.py's measure (seed "
            f"{cuts.SEED}+i, cut span U(2, 16) MiB, {cuts.RATE / 1e6:g} MB/s, one docker pull "
            f"capped at {cuts.LIMIT_S:g} s, dockerd --max-download-attempts {cuts.ATTEMPTS}, "
            "fresh dockerd and mirror per run, started before and stopped after the pull); "
            "(b) and (c) are benchmarks/power.py's lives loop (seed "
            f"{power.SEED}+i, T ~ U(0.6, 1.2) s per life, {power.RANGE_RATE / 1e6:g} MB/s, "
            f"up to {max_restarts} restarts; each life starts dockerd on the run's data root "
            "with its exec root cleared, docker pull once it answers, SIGKILL of daemon and "
            "client T s after the daemon's start; done when docker pull exits 0 and the "
            "reference store names the tag and the manifest digest). (b): the mirror starts "
            "before the first life and runs through every kill. (c): the mirror is spawned at "
            "each life's start with dockerd (the pull waits until it serves) and SIGKILLed "
            "with it, then started again on the same root and port; the page cache survives a "
            "SIGKILL, so (c) is a crash of both processes, not a loss of unsynced writes. The "
            "direct runs of (b) and (c) are the same runs (the direct variant has no mirror "
            "to kill). Variants alternate, order rotated per round"
        ),
        "medians": med,
        "runs": measured["runs"],
    }


def _ratios(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f"{x['wire_ratio']:.3f}{'' if x['completed'] else '✗'}" for x in rows)


def _why(row: dict[str, Any]) -> str:
    """A failed run's last error line (dockerd's ``level=error``, a client's ``Error``),
    else its last line."""
    tail = row.get("stderr_tail") or row.get("log_tail") or ""
    lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "level=error" in ln or "Error" in ln]
    return (errors or lines or [""])[-1]


def render(data: dict[str, Any]) -> str:
    m, ver = data["machine"], data["versions"]
    imgs = "; ".join(
        f"{'(a)' if k == 'cuts' else '(b), (c)'}: seed {img['seed']}, "
        f"{img['payload_bytes']} bytes with config and manifest"
        for k, img in data["images"].items()
    )
    img = next(iter(data["images"].values()))
    out = [
        "# docker pull through resumer serve (`python -m benchmarks mirror`)\n",
        f"Measured {data['date']}; {data['rounds']} runs per variant and schedule, the same "
        f"seeds for both variants: cuts {', '.join(map(str, data['cut_seeds']))}, kills "
        f"{', '.join(map(str, data['kill_seeds']))}.\n",
        f"- **Image:** `{img['repo']}:{img['tag']}`, layers {img['layers_mib']} MiB of random "
        f"bytes (gzip), built by each schedule's own benchmark code with its seed ({imgs}).",
        common.machine_line(m),
        f"- **Versions:** resumer {ver['resumer']} (commit {ver['resumer_commit']}); "
        f"{ver.get('dockerd', 'dockerd not run')} (client: {ver.get('docker', '–')}); "
        f"{ver['docker-registry']}.",
        f"- **Method:** {data['method']}.",
        f"- **Goal:** through resumer, every run completes with wire / image ≤ "
        f"{data['goal_wire_ratio']:g}.\n",
        "## Results\n",
    ]
    rows = []
    for sched, text in data["schedules"].items():
        for key, label in data["variants"].items():
            d = data["medians"][sched][key]
            rs = data["runs"][sched][key]
            rows.append(
                [
                    text,
                    label,
                    f"{d['completed']}/{d['runs']}",
                    f"{d['lives']:.0f}",
                    f"{d['wall_s']:.1f}",
                    f"{d['wire_ratio']:.3f}",
                    f"{d['wire_max']:.3f}",
                    f"{d['within_goal']}/{d['runs']}",
                    _ratios(rs),
                    ", ".join(str(x["lives"]) for x in rs),
                ]
            )
    out.append(
        common.markdown_table(
            [
                "schedule",
                "variant",
                "completed",
                f"median lives (kill schedules: cap {data['max_restarts'] + 1})",
                "median wall (s)",
                "median wire / image",
                "max wire / image",
                f"completed at ≤ {data['goal_wire_ratio']:g}×",
                "every run's wire / image (✗ = not completed)",
                "every run's lives",
            ],
            rows,
        )
    )
    starts = []
    for sched, text in data["schedules"].items():
        for key, label in data["variants"].items():
            notes = [x["dockerd"] for x in data["runs"][sched][key] if "dockerd" in x]
            if not notes:
                continue  # (a): one pull, no lives
            ready = [t for n in notes for t in n.get("ready_s", [])]
            starts.append(
                [
                    text,
                    label,
                    sum(x["lives"] for x in data["runs"][sched][key]),
                    "–" if not ready else f"{common.median(ready):.2f}",
                    "–" if not ready else f"{max(ready):.2f}",
                    sum(n.get("not_ready", 0) for n in notes),
                    sum(n.get("companion_not_ready", 0) for n in notes),
                ]
            )
    if starts:
        out.append("## Lives that never reached the pull\n")
        out.append(
            "A life's T starts with dockerd (and in (c) with the mirror, spawned just before "
            "it); `docker pull` starts once the daemon answers `docker version` and, in (c), "
            'the mirror has printed its "Serving on" line. A life in which either did not '
            "happen before T is killed without a pull.\n"
        )
        out.append(
            common.markdown_table(
                [
                    "schedule",
                    "variant",
                    "lives (all runs)",
                    "median dockerd start (s)",
                    "max dockerd start (s)",
                    "lives dockerd did not answer before T",
                    "lives the mirror did not serve before T",
                ],
                starts,
            )
        )
    fails = []
    for sched, text in data["schedules"].items():
        for key, label in data["variants"].items():
            for x in data["runs"][sched][key]:
                if not x["completed"] and (line := _why(x)):
                    fails.append((text, label, line))
    if fails:
        out.append("## Why runs did not complete (last log line, first of each kind)\n")
        seen: set[tuple[str, str]] = set()
        for text, label, line in fails:
            if (text, label) not in seen:
                seen.add((text, label))
                out.append(f"- {text}, {label}: `{' '.join(line.split())[:240]}`")
        out.append("")
    out.append(f"![completion and wire / image per schedule and variant]({NAME}.png)\n")
    return "\n".join(out)


def plot(data: dict[str, Any]) -> Path:
    cells = [(s, k) for s in data["schedules"] for k in data["variants"]]
    short = {"cuts": "(a) cuts", "kill_dockerd": "(b) kill dockerd", "kill_both": "(c) kill both"}
    labels = [f"{short[s]}: {'mirror' if k == 'mirror' else 'direct'}" for s, k in cells]
    panels = common.outcome_panels(
        [(data["medians"][s][k], data["runs"][s][k]) for s, k in cells],
        ("completed", "wire_ratio", "lives"),
    )
    return common.plot_bars(
        common.RESULTS / f"{NAME}.png",
        f"docker pull through resumer serve vs direct, median of {data['rounds']} "
        f"({data['date'][:10]})",
        labels,
        [
            ("completed (fraction of runs)", *panels["completed"], None),
            ("upstream wire bytes / image bytes", *panels["wire_ratio"], data["goal_wire_ratio"]),
            ("lives (docker pull runs)", *panels["lives"], None),
        ],
    )


def main(argv: list[str]) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--rounds", type=int, default=ROUNDS, help="runs per variant and schedule")
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        action="append",
        help="only this schedule (repeatable; default: all three)",
    )
    p.add_argument("--max-restarts", type=int, default=power.MAX_RESTARTS)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.max_restarts < 0:
        p.error("--rounds ≥ 1 and --max-restarts ≥ 0")
    if common.missing_tools(NAME, ("docker-registry", "dockerd")):
        return 1
    schedules = [s for s in SCHEDULES if s in (args.schedule or SCHEDULES)]
    measured = measure(args.rounds, schedules, args.max_restarts)
    data = summarise(args.rounds, args.max_restarts, measured)
    return common.finish(NAME, render(data), data, plot, no_write=args.no_write)
