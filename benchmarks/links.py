"""Link profiles: one blob over an emulated GEO / LEO / rural-LTE / BGAN link.

``resumer.lab.linkemu.LinkEmulator`` joins two fresh network namespaces with a userspace
relay over TUN devices (this kernel has no netem) that applies the profile's delay, loss
(random or Gilbert–Elliott bursty), rate, queue and outages. nginx serves the blob inside
namespace b (10.213.0.2); the client runs in namespace a. Every single run gets a fresh
emulator seeded with ``SEED + run index`` and a fresh nginx, so each tool starts at the
same point of the outage cycle and meets the same loss draws per packet index.

Clients: ``resumer fetch`` (``--retry-delay 1 --max-download-attempts 11``), ``curl
--retry 10 --retry-all-errors --retry-delay 1`` (restarts from byte 0 on a retry) and
``aria2c -x1 -s1 --max-tries=11 --retry-wait=1`` (resumes). One connection each: that is
the case the Mathis bound talks about; parallel segments are out of scope here.

Needs root and /dev/net/tun. Without them it writes a results file that says why.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resumer.errors import LinkLabError
from resumer.lab import linkemu
from resumer.lab.linkemu import LinkEmulator, LinkProfile

from . import common
from .common import MiB

NAME = "links"
SEED = 20240607
PORT = 8080  # inside namespace b only: the namespaces are new for every run
LIMIT_S = 120.0  # per run; a run that needs more is reported as not completed
ATTEMPTS = 11  # resumer/aria2c tries = curl's 1 + 10 retries

# The library's RURAL_LTE has a 5 s gap every 120 s; a ≤ 60 s run on a fresh link would
# never reach it, so the benchmark uses a 4 s gap every 15 s (first at t = 11 s).
RURAL_LTE_BENCH = dataclasses.replace(linkemu.RURAL_LTE, outage_every=15.0, outage_for=4.0)


@dataclass(frozen=True)
class Case:
    key: str
    profile: LinkProfile
    size: int
    note: str


CASES = [
    Case("geo", linkemu.GEO, 16 * MiB, "600 ms RTT, 0.5 % loss, 20 Mbit/s"),
    Case(
        "leo",
        linkemu.LEO,
        192 * MiB,
        "50 ± 10 ms RTT, 1.5 % bursty loss (mean burst 3 packets), 100 Mbit/s, "
        "1 s outage every 15 s (first at t = 14 s)",
    ),
    Case(
        "rural-lte",
        RURAL_LTE_BENCH,
        32 * MiB,
        "70 ± 10 ms RTT, 0.2 % loss, 20 Mbit/s down / 4 up, 4 s outage every 15 s "
        "(first at t = 11 s; the library profile's is 5 s every 120 s)",
    ),
    Case("bgan", linkemu.BGAN, 1 * MiB, "1100 ms RTT, 0.1 % loss, 0.4 Mbit/s"),
]


@dataclass(frozen=True)
class Tool:
    key: str
    label: str
    argv: Callable[[str, str, Path], list[str]]  # (url, digest, scratch) → argv


def _resumer(url: str, digest: str, scratch: Path) -> list[str]:
    return common.retrying_fetch_argv(url, digest, scratch, ATTEMPTS)


def _curl(url: str, digest: str, scratch: Path) -> list[str]:
    return common.retrying_curl_argv(url, scratch, ATTEMPTS)


def _aria2c(url: str, digest: str, scratch: Path) -> list[str]:
    return common.retrying_aria2c_argv(url, digest, scratch, ATTEMPTS)


TOOLS = [
    Tool("resumer", "resumer fetch", _resumer),
    Tool("curl", "curl --retry 10", _curl),
    Tool("aria2c", "aria2c -x1 -s1", _aria2c),
]


def _start_nginx(link: LinkEmulator, docroot: Path, workdir: Path) -> subprocess.Popen[bytes]:
    servers = common.load_servers()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = servers.nginx_config(docroot.resolve(), workdir.resolve(), PORT)
    conf = conf.replace("listen 127.0.0.1:", f"listen {link.addr_b}:")
    (workdir / "nginx.conf").write_text(conf)
    err = workdir / "error.log"
    proc = link.popen(
        link.ns_b,
        ["nginx", "-c", str(workdir / "nginx.conf"), "-p", str(workdir), "-e", str(err)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Poll from inside namespace b (its own address goes over its loopback, not the link).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = link.run(
            link.ns_b,
            ["curl", "-s", "-o", "/dev/null", "-m", "1", f"http://{link.addr_b}:{PORT}/"],
            check=False,
        )
        if probe.returncode == 0:
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)  # a short back-off between probes
    _stop(proc)
    log = err.read_text(errors="replace")[-600:] if err.exists() else "no log"
    raise common.RunError(f"nginx in {link.ns_b} did not start: {log}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # nginx's fast shutdown; the master reaps its worker
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def one_run(
    case: Case, tool: Tool, seed: int, docroot: Path, digest: str, scratch: Path
) -> dict[str, Any]:
    common.fresh_dir(scratch)
    with LinkEmulator(case.profile, seed) as link:
        nginx = _start_nginx(link, docroot, scratch / "nginx")
        try:
            url = f"http://{link.addr_b}:{PORT}/{case.key}.bin"
            res = common.run_bounded(
                link.exec_argv(link.ns_a, tool.argv(url, digest, scratch)), LIMIT_S, cwd=scratch
            )
        finally:
            _stop(nginx)
    out = scratch / "out.bin"
    done = res.returncode == 0 and out.is_file() and common.file_sha256(out) == digest
    down = link.stats.get("down", {})
    return {
        "seed": seed,
        "completed": done,
        "returncode": res.returncode,
        "wall_s": res.wall_s,
        "goodput_mbit_s": case.size * 8 / 1e6 / res.wall_s if done else 0.0,
        "link_down_bytes": down.get("bytes", 0),
        "link_down_ratio": down.get("bytes", 0) / case.size,
        # Packets b→a the link dropped (lost, burst, queue, outage): what TCP had to resend.
        "dropped_down": sum(down.get(k, 0) for k in ("loss", "burst", "queue", "outage")),
        "link_stats": link.stats,
        "tool_stats": common.json_stats(res.stdout),
        "stderr_tail": "" if done else res.stderr_tail,
    }


def measure(rounds: int, cases: list[Case]) -> dict[str, Any]:
    work = common.WORK / NAME
    docroot = work / "docroot"
    digests = {c.key: common.random_blob(docroot / f"{c.key}.bin", c.size, SEED) for c in cases}
    removed = linkemu.remove_stale_namespaces()
    if removed:
        print(f"removed stale namespaces: {removed}", flush=True)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        c.key: {t.key: [] for t in TOOLS} for c in cases
    }
    scratch = work / "scratch"
    for case in cases:
        for r in range(rounds):
            for tool in common.rotated(TOOLS, r):
                row = one_run(case, tool, SEED + r, docroot, digests[case.key], scratch)
                runs[case.key][tool.key].append(row)
                print(
                    f"{case.key:9s} round {r + 1}/{rounds} {tool.key:8s} "
                    f"{'ok  ' if row['completed'] else 'FAIL'} {row['wall_s']:6.1f} s "
                    f"{row['goodput_mbit_s']:6.2f} Mbit/s link/blob "
                    f"{row['link_down_ratio']:.3f}",
                    flush=True,
                )
    shutil.rmtree(scratch, ignore_errors=True)
    return {"digests": digests, "runs": runs}


def _header(data: dict[str, Any]) -> list[str]:
    ver = data["versions"]
    return [
        common.machine_line(data["machine"]),
        f"- **Versions:** resumer {ver['resumer']} (commit {ver['resumer_commit']}); "
        f"{ver['curl'].split(' (')[0]}; {ver['aria2c']}; {ver['nginx']}; TCP congestion "
        f"control {data.get('tcp_cc', '?')}.",
    ]


def _tcp_cc() -> str:
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "unknown"


def summarise(rounds: int, cases: list[Case], measured: dict[str, Any]) -> dict[str, Any]:
    med: dict[str, dict[str, Any]] = {}
    for case in cases:
        med[case.key] = {}
        for key, rows in measured["runs"][case.key].items():
            med[case.key][key] = common.outcome_medians(
                rows, ["wall_s", "goodput_mbit_s", "link_down_ratio", "dropped_down"]
            )
    return {
        "benchmark": NAME,
        "ran": True,
        "date": common.now_utc(),
        "machine": common.machine(),
        "versions": common.peer_versions(),
        "tcp_cc": _tcp_cc(),
        "seed": SEED,
        "seeds_per_round": [SEED + r for r in range(rounds)],
        "rounds": rounds,
        "cases": {
            c.key: {
                "note": c.note,
                "size": c.size,
                "digest": measured["digests"][c.key],
                "profile": dataclasses.asdict(c.profile),
            }
            for c in cases
        },
        "tools": {t.key: t.label for t in TOOLS},
        "method": (
            "a fresh LinkEmulator (seed SEED+round) and a fresh nginx in namespace b "
            "for every run; client in namespace a; tools alternate, order rotated per "
            "round; wall from spawn to exit, capped at "
            f"{LIMIT_S:.0f} s; goodput = blob bits / wall (0 if not completed); "
            "link/blob = IP bytes the relay delivered b→a (headers and delivered TCP "
            "retransmissions included; ~1.036 is header overhead alone, more means "
            "bytes fetched twice) / blob size; dropped = b→a packets the link dropped"
        ),
        "medians": med,
        "runs": measured["runs"],
    }


def render(data: dict[str, Any]) -> str:
    out = [
        "# Link profiles (`python -m benchmarks links`)\n",
        f"Measured {data['date']}; {data['rounds']} runs per tool and profile; seeds "
        f"{', '.join(str(s) for s in data['seeds_per_round'])}.\n",
        *_header(data),
        f"- **Method:** {data['method']}.",
        "- **Retries:** resumer 11 attempts, linear 1 s step; curl 1 + 10 retries, 1 s, "
        "from byte 0; aria2c 11 tries, 1 s, resumes.\n",
        "## Medians\n",
    ]
    rows = []
    for key, case in data["cases"].items():
        for t in TOOLS:
            d = data["medians"][key][t.key]
            rows.append(
                [
                    key,
                    f"{case['size'] // MiB} MiB",
                    t.label,
                    f"{d['completed']}/{d['runs']}",
                    f"{d['wall_s']:.1f}",
                    f"{d['goodput_mbit_s']:.2f}",
                    f"{d['link_down_ratio']:.3f}",
                    f"{d['dropped_down']:.0f}",
                ]
            )
    out.append(
        common.markdown_table(
            [
                "profile",
                "blob",
                "tool",
                "completed",
                "median wall (s)",
                "median goodput (Mbit/s)",
                "median delivered link bytes / blob",
                "median packets dropped b→a",
            ],
            rows,
        )
    )
    out.append("## Profiles\n")
    out += [f"- **{k}**: {c['note']}; blob {c['size']} bytes." for k, c in data["cases"].items()]
    out.append("\n## Every run (✗ = not completed)\n")
    per = []
    for key in data["cases"]:
        for t in TOOLS:
            rs = data["runs"][key][t.key]
            per.append(
                [
                    key,
                    t.label,
                    ", ".join(f"{x['wall_s']:.1f}{'' if x['completed'] else '✗'}" for x in rs),
                    ", ".join(f"{x['link_down_ratio']:.2f}" for x in rs),
                ]
            )
    out.append(common.markdown_table(["profile", "tool", "wall (s)", "link bytes / blob"], per))
    fails = [
        (k, t.label, x)
        for k in data["cases"]
        for t in TOOLS
        for x in data["runs"][k][t.key]
        if not x["completed"]
    ]
    if fails:
        out.append("Failures (last stderr line):\n")
        out += [
            f"- {k}, {label}, seed {x['seed']} (exit {x['returncode']}): "
            f"`{(x['stderr_tail'].splitlines() or [''])[-1][:200]}`"
            for k, label, x in fails
        ]
        out.append("")
    out.append("![wall time and goodput per profile](links.png)\n")
    return "\n".join(out)


def plot(data: dict[str, Any]) -> Path:
    cells = [(k, t) for k in data["cases"] for t in TOOLS]
    labels = [f"{k}: {t.key}" for k, t in cells]
    panels = common.outcome_panels(
        [(data["medians"][k][t.key], data["runs"][k][t.key]) for k, t in cells],
        ("wall_s", "goodput_mbit_s"),
    )
    return common.plot_bars(
        common.RESULTS / f"{NAME}.png",
        f"Emulated links, one blob, median of {data['rounds']} ({data['date'][:10]})",
        labels,
        [
            ("wall time (s)", *panels["wall_s"], None),
            ("goodput (Mbit/s)", *panels["goodput_mbit_s"], None),
        ],
    )


def write_skipped(reason: str) -> int:
    data = {
        "benchmark": NAME,
        "ran": False,
        "reason": reason,
        "date": common.now_utc(),
        "machine": common.machine(),
        "versions": common.peer_versions(),
    }
    text = "\n".join(
        [
            "# Link profiles (`python -m benchmarks links`)\n",
            f"**Did not run** on {data['date']}: {reason}.\n",
            "The link emulator needs root, /dev/net/tun and iproute2 (see "
            "`resumer/lab/linkemu.py`). Re-run as root to measure.\n",
        ]
    )
    common.write_results(NAME, text, data)
    print(text)
    return 0


def main(argv: list[str]) -> int:
    p = common.parser(NAME, __doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--profile",
        choices=[c.key for c in CASES],
        action="append",
        help="only this profile (repeatable; default: all)",
    )
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be ≥ 1")
    try:
        linkemu.check_environment()
    except LinkLabError as exc:
        return 0 if args.no_write else write_skipped(str(exc))
    if common.missing_tools(NAME, ("nginx", "curl", "aria2c")):
        return 1
    cases = [c for c in CASES if args.profile is None or c.key in args.profile]
    measured = measure(args.rounds, cases)
    data = summarise(args.rounds, cases, measured)
    return common.finish(NAME, render(data), data, plot, no_write=args.no_write)
