"""Link profiles: one blob over an emulated GEO / LEO / rural-LTE / BGAN link, with the
server's TCP congestion control set to CUBIC and to BBR (two passes per profile).

``resumer.lab.linkemu.LinkEmulator`` joins two fresh network namespaces with a userspace
relay over TUN devices (this kernel has no netem) that applies the profile's delay, loss
(random or Gilbert–Elliott bursty), rate, queue and outages. nginx serves the blob inside
namespace b (10.213.0.2), whose congestion control is the pass's (``server_cc``: the
namespace's ``net.ipv4.tcp_congestion_control``, or b's route ``congctl`` where the kernel
refuses the sysctl outside the root namespace; every run checks with ``ss`` which
algorithm b's sockets really used). The client runs in namespace a. Every single run gets
a fresh emulator seeded with ``SEED + round`` and a fresh nginx, so each tool starts at the
same point of the outage cycle and meets the same loss draws per packet index.

**Bounded time window.** A single loss-based stream at 600 ms RTT and 0.5–1 % loss moves a
few hundred kbit/s: 64 MiB would take half an hour. So every run stops at the blob's
verified end or after ``--window`` seconds (default 30), whichever comes first. A run
that completes: goodput = blob bits / wall time (spawn to exit, verification included). A
run stopped at the window: goodput = payload bytes the client's TCP sockets had received
in order (``ss -ti`` ``bytes_received``, summed over every connection of the run, sampled
every 0.5 s, the last sample taken at the window's end, just before the SIGKILL) / the
time of that sample. Ratio = goodput / the profile's nominal down rate (which counts IP
packets: headers alone cap TCP goodput at 1448/1500 = 0.965 of it).

Clients (every one: 11 tries, 1 s apart): ``resumer fetch`` with one connection (K = 1);
``resumer fetch --max-connections-per-blob 4`` only if ``resumer fetch --help`` lists that
flag; ``curl --retry 10 --retry-all-errors`` (restarts from byte 0); ``aria2c -x4 -s4``
(resumes; with its default ``--min-split-size=20M`` it opens fewer than 4 connections on
small blobs: the report shows how many it opened); ``docker pull`` of a one-layer image
(below).

**docker pull.** Once per benchmark, each case gets a one-layer image whose layer is a real
tar+gzip of incompressible bytes (``resumer.lab.images``, seeded; about the case's size),
pushed into a registry storage directory by a CNCF registry on loopback. Each run starts a
fresh ``docker-registry serve`` inside namespace b on that storage (listening on
10.213.0.2:5000) instead of nginx, and a fresh dockerd 20.10 (``resumer.lab.dockerd``: vfs,
empty data root, ``--max-download-attempts 11``, ``--insecure-registry 10.213.0.2/32``)
inside namespace a through ``nsenter --net`` (not ``ip netns exec``, whose remounted /sys
hides the cgroup mounts dockerd needs to start). The run's window starts only once ``docker
version`` answers; then ``docker pull`` runs in namespace a, and ``ss`` in a counts
dockerd's connections, which are the ones that download. Completed = exit 0 and dockerd's
reference store naming the tag and the manifest digest; goodput = layer bytes / wall.
dockerd retries on its own schedule (it cannot be set), and tries HTTPS before plain HTTP.
dockerd is stopped and its roots removed after every run. ``start_offset_s`` in each row is
the time from the link's start to the tool's spawn (dockerd's start makes it longer than
the others': the outage cycle has moved on by then).

Needs root and /dev/net/tun. Without them it writes a results file that says why.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resumer.errors import LinkLabError
from resumer.lab import linkemu
from resumer.lab.dockerd import DOCKER, DOCKERD, Dockerd
from resumer.lab.dockerd import versions as dockerd_versions
from resumer.lab.linkemu import LinkEmulator, LinkProfile

from . import common
from .common import BenchImage, MiB

NAME = "links"
SEED = 20240607
PORT = 8080  # inside namespace b only: the namespaces are new for every run
WINDOW_S = 30.0  # per run: stopped here if not done; goodput from bytes received
SAMPLE_S = 0.5  # how often the client's sockets are read during a run
ATTEMPTS = 11  # resumer/aria2c tries = curl's 1 + 10 retries (and dockerd's per layer)
REGISTRY_PORT = 5000  # docker pull's registry, inside namespace b only
IMAGE_TAG = "latest"
CCS = ("cubic", "bbr")
GOAL_BBR_RATIO = 0.8
GOAL_CURL_FACTOR = 3.0
HEADER_CEILING = 1448 / 1500  # TCP payload per 1500-byte IP packet with timestamps

# The library's RURAL_LTE has a 5 s gap every 120 s; a ≤ 60 s run on a fresh link would
# never reach it, so the benchmark uses a 4 s gap every 15 s (first at t = 11 s).
RURAL_LTE_BENCH = dataclasses.replace(linkemu.RURAL_LTE, outage_every=15.0, outage_for=4.0)


@dataclass(frozen=True)
class Case:
    key: str
    profile: LinkProfile
    size: int
    note: str

    @property
    def rate_mbit(self) -> float:
        assert self.profile.rate_bps is not None
        return self.profile.rate_bps / 1e6

    @property
    def up_fraction(self) -> float:
        """The share of time the link is up (outages excluded)."""
        p = self.profile
        return 1.0 if p.outage_every is None else 1 - p.outage_for / p.outage_every


CASES = [
    Case("geo", linkemu.GEO, 64 * MiB, "600 ms RTT, 0.5 % loss, 20 Mbit/s"),
    Case(
        "leo",
        linkemu.LEO,
        64 * MiB,
        "50 ± 10 ms RTT, 1.5 % bursty loss (mean burst 3 packets), 100 Mbit/s, "
        "1 s outage every 15 s (first at t = 14 s)",
    ),
    Case(
        "rural-lte",
        RURAL_LTE_BENCH,
        64 * MiB,
        "70 ± 10 ms RTT, 0.2 % loss, 20 Mbit/s down / 4 up, 4 s outage every 15 s "
        "(first at t = 11 s; the library profile's is 5 s every 120 s)",
    ),
    Case("bgan", linkemu.BGAN, 4 * MiB, "1100 ms RTT, 0.1 % loss, 0.4 Mbit/s"),
]


# --------------------------------------------------------------------------- tools

CONNECTIONS_FLAG = "--max-connections-per-blob"


@functools.cache
def resumer_has_connections_flag() -> bool:
    """Whether ``resumer fetch --help`` lists ``--max-connections-per-blob``."""
    done = subprocess.run(
        [*common.resumer_bin(), "fetch", "--help"], capture_output=True, text=True, check=False
    )
    return CONNECTIONS_FLAG in done.stdout


def _resumer(k: int) -> Callable[[str, str, Path], list[str]]:
    def argv(url: str, digest: str, scratch: Path) -> list[str]:
        base = common.retrying_fetch_argv(url, digest, scratch, ATTEMPTS)
        # With the flag, K is said explicitly: its default may not be 1.
        return [*base, CONNECTIONS_FLAG, str(k)] if resumer_has_connections_flag() else base

    return argv


def _curl(url: str, digest: str, scratch: Path) -> list[str]:
    return common.retrying_curl_argv(url, scratch, ATTEMPTS)


def _aria2c_x4(url: str, digest: str, scratch: Path) -> list[str]:
    argv = common.retrying_aria2c_argv(url, digest, scratch, ATTEMPTS)
    return ["aria2c", "-x4", "-s4", *[a for a in argv[1:] if a not in ("-x1", "-s1")]]


def _dockerd_of(scratch: Path, link: LinkEmulator | None = None) -> Dockerd:
    """The run's dockerd: in namespace a when ``link`` is given (same socket either way)."""
    if link is None:
        return Dockerd(scratch / "dockerd", max_download_attempts=ATTEMPTS)
    return Dockerd(
        scratch / "dockerd",
        max_download_attempts=ATTEMPTS,
        # The network namespace only: `ip netns exec` also unshares the mount namespace and
        # remounts /sys, which hides /sys/fs/cgroup ("Devices cgroup isn't mounted": exit 1).
        prefix=["nsenter", f"--net=/run/netns/{link.ns_a}", "--"],
        extra_args=["--insecure-registry", f"{link.addr_b}/32"],
    )


def _docker_pull(ref: str, digest: str, scratch: Path) -> list[str]:
    return _dockerd_of(scratch).pull_argv(ref)


def _docker_missing() -> str | None:
    need = {"dockerd": DOCKERD, "docker": DOCKER, "docker-registry": "docker-registry"}
    missing = [name for name, path in need.items() if shutil.which(path) is None]
    return f"not installed here: {', '.join(missing)}" if missing else None


@dataclass(frozen=True)
class Tool:
    key: str
    label: str
    argv: Callable[[str, str, Path], list[str]]  # (url or ref, digest, scratch) → argv
    #: None when the tool runs; else why it is left out (stated in the results)
    skip: Callable[[], str | None] = lambda: None
    #: pulls the case's image from a registry (with a dockerd of its own), not the blob
    pulls_image: bool = False


TOOLS = [
    Tool("resumer-k1", "resumer fetch (K = 1)", _resumer(1)),
    Tool(
        "resumer-k4",
        f"resumer fetch {CONNECTIONS_FLAG} 4",
        _resumer(4),
        lambda: (
            None
            if resumer_has_connections_flag()
            else f"`resumer fetch --help` has no {CONNECTIONS_FLAG} on this build"
        ),
    ),
    Tool("curl", "curl --retry 10", _curl),
    Tool("aria2c-x4", "aria2c -x4 -s4", _aria2c_x4),
    # dockerd in namespace a, the registry (not nginx) in namespace b: see the module doc.
    Tool("docker", "docker pull (one layer)", _docker_pull, _docker_missing, pulls_image=True),
]


def active_tools() -> tuple[list[Tool], dict[str, str]]:
    run, skipped = [], {}
    for t in TOOLS:
        reason = t.skip()
        if reason is None:
            run.append(t)
        else:
            skipped[t.key] = reason
    return run, skipped


# --------------------------------------------------------------------------- one run


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
    return _answering(link, proc, f"http://{link.addr_b}:{PORT}/", "nginx", err)


def _start_registry(link: LinkEmulator, storage: Path, workdir: Path) -> subprocess.Popen[bytes]:
    """``docker-registry serve`` in namespace b on ``addr_b:REGISTRY_PORT``, over ``storage``."""
    servers = common.load_servers()
    workdir.mkdir(parents=True, exist_ok=True)
    config = servers.registry_config(storage.resolve(), REGISTRY_PORT)
    config["http"]["addr"] = f"{link.addr_b}:{REGISTRY_PORT}"
    path = workdir / "config.yml"
    path.write_text(json.dumps(config, indent=2))  # YAML is a superset of JSON
    log = workdir / "registry.log"
    with log.open("wb") as out:
        proc = link.popen(
            link.ns_b,
            [servers.REGISTRY_BIN, "serve", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://{link.addr_b}:{REGISTRY_PORT}/v2/"
    return _answering(link, proc, url, "docker-registry", log)


def _answering(
    link: LinkEmulator, proc: subprocess.Popen[bytes], url: str, what: str, log: Path
) -> subprocess.Popen[bytes]:
    """``proc`` once ``url`` answers; stopped, and RunError with its log's tail, if not."""
    # Poll from inside namespace b (its own address goes over its loopback, not the link).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = link.run(link.ns_b, ["curl", "-s", "-o", "/dev/null", "-m", "1", url], check=False)
        if probe.returncode == 0:
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)  # a short back-off between probes
    _stop(proc)
    tail = log.read_text(errors="replace")[-600:] if log.exists() else "no log"
    raise common.RunError(f"{what} in {link.ns_b} did not start: {tail}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # nginx's fast shutdown; the master reaps its worker
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


_BYTES_RECEIVED = re.compile(r"\bbytes_received:(\d+)")


def _ss(link: LinkEmulator, ns: str, *filt: str) -> list[tuple[str, str]]:
    """``ss -tinH`` in ``ns``: (address line, info line) per socket."""
    out = link.run(ns, ["ss", "-tinH", *filt], capture_output=True, text=True).stdout
    pairs: list[tuple[str, str]] = []
    for line in out.splitlines():
        if line.startswith(("\t", " ")) and pairs:
            pairs[-1] = (pairs[-1][0], pairs[-1][1] + line)
        elif line.strip():
            pairs.append((line, ""))
    return pairs


class Sampler:
    """What the client's sockets received, and the congestion control of the server's."""

    def __init__(self, link: LinkEmulator) -> None:
        self.link = link
        self.received: dict[str, int] = {}  # client ip:port → bytes received (max seen)
        self.server_cc: set[str] = set()
        self._known = set(linkemu.available_congestion_control())

    def sample(self) -> None:
        link = self.link
        for head, info in _ss(link, link.ns_a, "dst", link.addr_b):
            m = _BYTES_RECEIVED.search(info)
            words = head.split()
            if m and len(words) >= 5:
                key = words[3]  # the local address: one key per connection
                self.received[key] = max(self.received.get(key, 0), int(m.group(1)))
        for _head, info in _ss(link, link.ns_b, "state", "established", "dst", link.addr_a):
            self.server_cc.update(w for w in info.split() if w in self._known)

    @property
    def total(self) -> int:
        return sum(self.received.values())


@dataclass(frozen=True)
class Windowed:
    returncode: int | None  # None: stopped at the window
    started: float  # perf_counter() at the spawn
    wall_s: float  # to exit, or to the last sample before the stop
    received: int  # bytes the client's sockets received, summed (sampled)
    connections: int
    server_cc: list[str]
    stdout: str
    stderr_tail: str


def run_windowed(link: LinkEmulator, argv: list[str], window_s: float, cwd: Path) -> Windowed:
    """``argv`` in namespace a until it exits or ``window_s`` passes (then SIGKILL)."""
    out_path, err_path = cwd / "tool.stdout", cwd / "tool.stderr"
    sampler = Sampler(link)
    with out_path.open("wb") as out, err_path.open("wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            link.exec_argv(link.ns_a, argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=cwd,
            start_new_session=True,  # `ip netns exec` execs the tool: its own group
        )
        code: int | None = None
        while True:
            left = window_s - (time.perf_counter() - t0)
            try:
                code = proc.wait(timeout=max(0.0, min(SAMPLE_S, left)))
                wall = time.perf_counter() - t0
                break
            except subprocess.TimeoutExpired:
                pass
            sampler.sample()
            wall = time.perf_counter() - t0
            if wall >= window_s:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
                break
    return Windowed(
        code,
        t0,
        wall,
        sampler.total,
        len(sampler.received),
        sorted(sampler.server_cc),
        out_path.read_text(errors="replace"),
        err_path.read_text(errors="replace").strip()[-600:],
    )


@dataclass(frozen=True)
class Images:
    """What ``docker pull`` fetches: a registry storage directory and one image per case."""

    storage: Path
    images: dict[str, BenchImage]  # case key → its one-layer image

    def ref(self, host: str, case: str) -> str:
        image = self.images[case]
        return f"{host}:{REGISTRY_PORT}/{image.repo}:{image.tag}"


def _push_images(work: Path, cases: list[Case]) -> Images:
    """Each case's one-layer image (about the case's size, incompressible tar+gzip),
    pushed once by a registry on loopback into ``work/registry/storage``."""
    servers = common.load_servers()
    for d in ("registry", "image"):
        shutil.rmtree(work / d, ignore_errors=True)
    registry = servers.start_registry(work / "registry")
    try:
        images = {
            c.key: common.push_bench_image(
                registry.url, work, [c.size // MiB], SEED, repo=f"links/{c.key}", tag=IMAGE_TAG
            )
            for c in cases
        }
    finally:
        registry.stop()
    return Images(registry.storage, images)


def _fetch_blob(
    link: LinkEmulator,
    tool: Tool,
    url: str,
    digest: str,
    docroot: Path,
    scratch: Path,
    window_s: float,
) -> tuple[Windowed, bool]:
    """One blob tool against nginx in b; completed = exit 0 and the blob's digest."""
    nginx = _start_nginx(link, docroot, scratch / "nginx")
    try:
        res = run_windowed(link, tool.argv(url, digest, scratch), window_s, scratch)
    finally:
        _stop(nginx)
    out = scratch / "out.bin"
    return res, res.returncode == 0 and out.is_file() and common.file_sha256(out) == digest


def _pull_image(
    link: LinkEmulator, tool: Tool, case: Case, images: Images, scratch: Path, window_s: float
) -> tuple[Windowed, bool, dict[str, Any]]:
    """``docker pull`` against a registry in b, by a fresh dockerd in a started before the
    window; completed = exit 0 and the tag and manifest digest in dockerd's reference store."""
    image = images.images[case.key]
    ref = images.ref(link.addr_b, case.key)
    registry = _start_registry(link, images.storage, scratch / "registry")
    daemon = _dockerd_of(scratch, link)
    try:
        ready_s = daemon.start()
        res = run_windowed(link, tool.argv(ref, image.manifest_digest, scratch), window_s, scratch)
        done = res.returncode == 0 and daemon.has_image(ref, image.manifest_digest)
        tmp = daemon.leftovers()
    finally:
        daemon.remove()
        _stop(registry)
    return res, done, {"dockerd_ready_s": ready_s, "dockerd_tmp_bytes": tmp["tmp_bytes"]}


def one_run(
    case: Case,
    cc: str,
    tool: Tool,
    seed: int,
    docroot: Path,
    digest: str,
    images: Images | None,
    scratch: Path,
    window_s: float,
) -> dict[str, Any]:
    common.fresh_dir(scratch)
    extra: dict[str, Any] = {}
    with LinkEmulator(case.profile, seed, server_cc=cc) as link:
        t_link = time.perf_counter()
        if tool.pulls_image:
            assert images is not None, "the images are pushed when a tool pulls them"
            res, done, extra = _pull_image(link, tool, case, images, scratch, window_s)
            payload = sum(size for _, size in images.images[case.key].layers)
        else:
            url = f"http://{link.addr_b}:{PORT}/{case.key}.bin"
            res, done = _fetch_blob(link, tool, url, digest, docroot, scratch, window_s)
            payload = case.size
    goodput = (payload if done else res.received) * 8 / 1e6 / res.wall_s
    down = link.stats.get("down", {})
    return {
        "seed": seed,
        "cc": cc,
        "server_cc_via": link.server_cc_via,
        "server_cc_seen": res.server_cc,
        "completed": done,
        "stopped_at_window": res.returncode is None,
        "returncode": res.returncode,
        "start_offset_s": res.started - t_link,
        "wall_s": res.wall_s,
        "payload_bytes": payload,
        "received_bytes": res.received,
        "goodput_mbit_s": goodput,
        "ratio_to_rate": goodput / case.rate_mbit,
        "connections": res.connections,
        "link_down_bytes": down.get("bytes", 0),
        # Packets b→a the link dropped (lost, burst, queue, outage): what TCP had to resend.
        "dropped_down": sum(down.get(k, 0) for k in ("loss", "burst", "queue", "outage")),
        "link_stats": link.stats,
        "tool_stats": common.json_stats(res.stdout),
        "stderr_tail": "" if done or res.returncode is None else res.stderr_tail,
        **extra,
    }


# --------------------------------------------------------------------------- the benchmark


def measure(
    rounds: int, cases: list[Case], ccs: list[str], tools: list[Tool], window_s: float
) -> dict[str, Any]:
    work = common.WORK / NAME
    docroot = work / "docroot"
    digests = {c.key: common.random_blob(docroot / f"{c.key}.bin", c.size, SEED) for c in cases}
    removed = linkemu.remove_stale_namespaces()  # only those whose process is dead
    if removed:
        print(f"removed stale namespaces: {removed}", flush=True)
    scratch = work / "scratch"
    # A dockerd of ours left by a SIGKILLed run (it outlives its namespace): kill it first.
    _dockerd_of(scratch).kill()
    images = _push_images(work, cases) if any(t.pulls_image for t in tools) else None
    runs: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {
        c.key: {cc: {t.key: [] for t in tools} for cc in ccs} for c in cases
    }
    log = work / "rows.jsonl"  # every row as it is measured, should the run be cut short
    log.unlink(missing_ok=True)
    t_start = time.monotonic()
    for r in range(rounds):
        for case in cases:
            for cc in common.rotated(ccs, r):
                for tool in common.rotated(tools, r):
                    row = one_run(
                        case,
                        cc,
                        tool,
                        SEED + r,
                        docroot,
                        digests[case.key],
                        images,
                        scratch,
                        window_s,
                    )
                    runs[case.key][cc][tool.key].append(row)
                    with log.open("a") as f:
                        f.write(json.dumps({"case": case.key, "tool": tool.key, **row}) + "\n")
                    print(
                        f"[{time.monotonic() - t_start:6.0f} s] round {r + 1}/{rounds} "
                        f"{case.key:9s} {cc:5s} {tool.key:10s} "
                        f"{_state(row)} "
                        f"{row['wall_s']:5.1f} s {row['goodput_mbit_s']:7.3f} Mbit/s "
                        f"({row['ratio_to_rate']:.3f} of rate) conns {row['connections']} "
                        f"server cc {','.join(row['server_cc_seen']) or '?'}",
                        flush=True,
                    )
    common.fresh_dir(scratch)
    pushed = (
        {
            k: {"manifest": im.manifest_digest, "layers": im.layers, "ref": images.ref("ADDR_B", k)}
            for k, im in images.images.items()
        }
        if images is not None
        else {}
    )
    return {
        "digests": digests,
        "images": pushed,
        "runs": runs,
        "elapsed_s": time.monotonic() - t_start,
    }


def _state(row: dict[str, Any]) -> str:
    return "done" if row["completed"] else "WIN " if row["stopped_at_window"] else "FAIL"


def _span(xs: list[float]) -> str:
    return f"{min(xs):.2f}–{max(xs):.2f}" if xs else "–"


def _mark(row: dict[str, Any]) -> str:
    return "✓" if row["completed"] else "◷" if row["stopped_at_window"] else "✗"


def _tcp_cc() -> str:
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "unknown"


def _goals(med: dict[str, Any], tools: list[Tool]) -> list[dict[str, Any]]:
    """The issue's goals, as ratios of this run's medians."""
    keys = {t.key for t in tools}
    resumers = [k for k in ("resumer-k1", "resumer-k4") if k in keys]
    out: list[dict[str, Any]] = []

    def g(case: str, cc: str, tool: str) -> float | None:
        try:
            return float(med[case][cc][tool]["goodput_mbit_s"])
        except KeyError:
            return None

    for rk in resumers:
        r, curl, aria = (
            g("geo", "cubic", rk),
            g("geo", "cubic", "curl"),
            g("geo", "cubic", "aria2c-x4"),
        )
        if r is not None and curl is not None:
            out.append(
                {
                    "goal": f"GEO, CUBIC: {rk} ≥ {GOAL_CURL_FACTOR:g}× curl",
                    "value": r / curl if curl else float("inf"),
                    "target": GOAL_CURL_FACTOR,
                    "met": curl == 0 or r / curl >= GOAL_CURL_FACTOR,
                    "unit": "× curl",
                }
            )
        if r is not None and aria is not None:
            out.append(
                {
                    "goal": f"GEO, CUBIC: {rk} ≥ aria2c -x4 -s4",
                    "value": r / aria if aria else float("inf"),
                    "target": 1.0,
                    "met": aria == 0 or r / aria >= 1.0,
                    "unit": "× aria2c",
                }
            )
        for case in ("geo", "leo", "rural-lte"):
            try:
                ratio = float(med[case]["bbr"][rk]["ratio_to_rate"])
            except KeyError:
                continue
            out.append(
                {
                    "goal": f"{case}, BBR: {rk} ≥ {GOAL_BBR_RATIO:g} × link rate",
                    "value": ratio,
                    "target": GOAL_BBR_RATIO,
                    "met": ratio >= GOAL_BBR_RATIO,
                    "unit": "× rate",
                }
            )
    return out


def summarise(
    rounds: int,
    cases: list[Case],
    ccs: list[str],
    tools: list[Tool],
    skipped: dict[str, str],
    window_s: float,
    measured: dict[str, Any],
) -> dict[str, Any]:
    med: dict[str, dict[str, dict[str, Any]]] = {}
    for case in cases:
        med[case.key] = {}
        for cc in ccs:
            med[case.key][cc] = {}
            for key, rows in measured["runs"][case.key][cc].items():
                m = common.outcome_medians(
                    rows,
                    [
                        "wall_s",
                        "goodput_mbit_s",
                        "ratio_to_rate",
                        "connections",
                        "dropped_down",
                        "start_offset_s",
                    ],
                )
                m["stopped_at_window"] = sum(1 for x in rows if x["stopped_at_window"])
                m["server_cc_seen"] = sorted({c for x in rows for c in x["server_cc_seen"]})
                med[case.key][cc][key] = m
    via = sorted(
        {
            x["server_cc_via"]
            for c in measured["runs"].values()
            for cc in c.values()
            for rs in cc.values()
            for x in rs
        }
        - {None}
    )
    versions = common.peer_versions()
    if measured["images"]:
        versions |= {
            **dockerd_versions(),
            "docker-registry": common.more_versions()["docker-registry"],
        }
    return {
        "benchmark": NAME,
        "ran": True,
        "date": common.now_utc(),
        "machine": common.machine(),
        "versions": versions,
        "root_tcp_cc": _tcp_cc(),
        "available_cc": linkemu.available_congestion_control(),
        "server_cc_via": via,
        "seed": SEED,
        "seeds_per_round": [SEED + r for r in range(rounds)],
        "rounds": rounds,
        "window_s": window_s,
        "sample_s": SAMPLE_S,
        "elapsed_s": measured["elapsed_s"],
        "ccs": ccs,
        "cases": {
            c.key: {
                "note": c.note,
                "size": c.size,
                "rate_mbit_s": c.rate_mbit,
                "up_fraction": c.up_fraction,
                "digest": measured["digests"][c.key],
                "profile": dataclasses.asdict(c.profile),
                **({"image": measured["images"][c.key]} if measured["images"] else {}),
            }
            for c in cases
        },
        "tools": {t.key: t.label for t in tools},
        "tools_not_run": skipped,
        "resumer_has_connections_flag": resumer_has_connections_flag(),
        "method": (
            "a fresh LinkEmulator (seed SEED+round) and a fresh nginx in namespace b for "
            "every run, b's TCP congestion control set to the pass's algorithm; client in "
            "namespace a; tools and the two algorithms alternate, order rotated per round. "
            f"Each run ends at the verified blob or at the {window_s:g} s window "
            "(SIGKILL). Completed: goodput = blob bits / wall (spawn to exit). Stopped at "
            "the window: goodput = bytes the client's sockets received in order (ss "
            f"bytes_received, every connection of the run, sampled every {SAMPLE_S:g} s, "
            "the last at the window's end) / the time of that last sample. Ratio = "
            "goodput / the profile's nominal down rate (an IP-packet rate: TCP headers "
            f"alone cap the ratio at {HEADER_CEILING:.3f}, outages lower it further). "
            "docker pull: a fresh docker-registry (not nginx) in b on the one-layer image "
            "pushed once per case, and a fresh dockerd (vfs, empty data root, "
            f"--max-download-attempts {ATTEMPTS}) in a, whose start (until `docker version` "
            "answers) is outside the window; completed = exit 0 and the tag and manifest "
            "digest in dockerd's reference store, goodput = layer bytes / wall"
        ),
        "medians": med,
        "goals": _goals(med, tools),
        "runs": measured["runs"],
    }


def _cell(d: dict[str, Any]) -> list[str]:
    done = f"{d['completed']}/{d['runs']}"
    return [
        f"{d['goodput_mbit_s']:.3f}",
        f"{d['ratio_to_rate']:.3f}",
        done,
        f"{d['connections']:g}",
    ]


def render(data: dict[str, Any]) -> str:
    ver = data["versions"]
    ccs = data["ccs"]
    w = data["window_s"]
    out = [
        "# Link profiles (`python -m benchmarks links`)\n",
        f"Measured {data['date']}; {data['rounds']} rounds (runs per tool, profile and "
        f"congestion control); seeds {', '.join(str(s) for s in data['seeds_per_round'])}; "
        f"the whole run took {data['elapsed_s'] / 60:.1f} min.\n",
        common.machine_line(data["machine"]),
        f"- **Versions:** resumer {ver['resumer']} (commit {ver['resumer_commit']}); "
        f"{ver['curl'].split(' (')[0]}; {ver['aria2c']}; {ver['nginx']}"
        + (f"; dockerd: {ver['dockerd']}; {ver['docker-registry']}." if "dockerd" in ver else "."),
        f"- **Server congestion control:** {' and '.join(c.upper() for c in ccs)}, one pass "
        f"each, set in namespace b only (via: {', '.join(data['server_cc_via'])}: the "
        "kernel refuses `sysctl net.ipv4.tcp_congestion_control=cubic` outside the root "
        "namespace because cubic is not in the root's tcp_allowed_congestion_control, so "
        "it goes on b's route, `ip route … congctl cubic`; bbr takes the sysctl). Every "
        "run checked with `ss -ti` in b which algorithm the server's sockets used: column "
        f'"server cc seen". The root namespace\'s default is {data["root_tcp_cc"]}; the '
        "client side's algorithm is irrelevant (it sends only requests and ACKs).",
        f"- **Time window:** every run ends at the verified blob or after {w:g} s "
        "(SIGKILL of the tool's process group). A completed run's goodput = blob bits / "
        "wall (spawn to exit, verification included). A run stopped at the window: bytes "
        "the client's TCP sockets received in order (`ss -ti` bytes_received, summed over "
        f"every connection of the run, sampled every {data['sample_s']:g} s, the last "
        "sample at the window's end, just before the kill) / the time of that sample. So "
        f"figures for stopped runs are the goodput of the first {w:g} s, slow start "
        "included; bytes a connection received after the last sample before it closed "
        "are missed (≤ 0.5 s of it), and bytes curl would discard on a restart are counted.",
        "- **Ratio** = goodput / the profile's nominal down rate, which counts whole IP "
        f"packets: TCP/IP headers alone cap it at {HEADER_CEILING:.3f}, and outages lower "
        'the ceiling further (column "ceiling" = 0.965 × the share of time the link is '
        "up).",
        f"- **Method:** {data['method']}.",
        "- **Retries:** resumer 11 attempts, linear 1 s step; curl 1 + 10 retries, 1 s, "
        "from byte 0; aria2c 11 tries, 1 s, resumes"
        + (
            "; dockerd `--max-download-attempts 11` per layer, on its own back-off (not "
            "settable), resuming with Range within the pull."
            if "docker" in data["tools"]
            else "."
        ),
    ]
    if "docker" in data["tools"]:
        offsets = [
            x["start_offset_s"]
            for c in data["runs"].values()
            for cc in c.values()
            for x in cc["docker"]
        ]
        others = [
            x["start_offset_s"]
            for c in data["runs"].values()
            for cc in c.values()
            for t, rs in cc.items()
            if t != "docker"
            for x in rs
        ]
        out.append(
            "- **docker pull:** a fresh `docker-registry serve` in namespace b (instead of "
            "nginx) on a one-layer image pushed once per case (a real tar+gzip of "
            "incompressible bytes; layer sizes under Profiles), and a fresh dockerd 20.10 in "
            "namespace a (`nsenter --net`; vfs, empty data root, `--insecure-registry "
            "10.213.0.2/32`), stopped and removed after each run. The window starts once "
            "`docker version` answers, so the pull starts later on the link's clock than the "
            f"other tools (link start to spawn: {_span(offsets)} s for docker against "
            f"{_span(others)} s for the others), at another point of the outage cycle. "
            "`ss` in namespace a counts dockerd's connections (the daemon downloads, not "
            "the client). Completed = exit 0 and dockerd's reference store naming the tag "
            "and the manifest digest; goodput = layer bytes / wall; dockerd tries HTTPS "
            "before plain HTTP (one more round trip)."
        )
    for key, reason in data["tools_not_run"].items():
        out.append(f"- **Not run:** `{key}`: {reason}.")
    out.append("")

    out.append("## Goals (issue 10), medians of this run\n")
    grows = [
        [
            g["goal"],
            f"{g['value']:.3f} {g['unit']}",
            f"{g['target']:g}",
            "met" if g["met"] else "**missed**",
        ]
        for g in data["goals"]
    ]
    out.append(common.markdown_table(["goal", "measured", "target", ""], grows))

    out.append(
        "## Medians: goodput (Mbit/s) and ratio to the link rate, "
        f"{' vs '.join(c.upper() for c in ccs)}\n"
    )
    out.append(
        "completed = runs that finished the blob inside the window, of all runs; conns = "
        "median number of TCP connections the tool opened.\n"
    )
    header = ["profile", "blob", "rate", "ceiling", "tool"]
    for cc in ccs:
        u = cc.upper()
        header += [f"{u} goodput", f"{u} ratio", f"{u} completed", f"{u} conns"]
    rows = []
    for key, case in data["cases"].items():
        for t in data["tools"]:
            row = [
                key,
                f"{case['size'] // MiB} MiB",
                f"{case['rate_mbit_s']:g} Mbit/s",
                f"{HEADER_CEILING * case['up_fraction']:.3f}",
                data["tools"][t],
            ]
            for cc in ccs:
                row += _cell(data["medians"][key][cc][t])
            rows.append(row)
    out.append(common.markdown_table(header, rows))

    out.append("## Profiles\n")
    out += [
        f"- **{k}**: {c['note']}; blob {c['size']} bytes"
        + (
            f"; image layer {sum(s for _, s in c['image']['layers'])} bytes "
            f"(manifest {c['image']['manifest'][:19]}…)."
            if "image" in c
            else "."
        )
        for k, c in data["cases"].items()
    ]
    out.append("\n## Every run (goodput Mbit/s; ✓ completed, ◷ stopped at the window, ✗ failed)\n")
    per = []
    for key in data["cases"]:
        for cc in ccs:
            for t in data["tools"]:
                rs = data["runs"][key][cc][t]
                per.append(
                    [
                        key,
                        cc,
                        data["tools"][t],
                        ", ".join(f"{x['goodput_mbit_s']:.3f}{_mark(x)}" for x in rs),
                        ", ".join(f"{x['wall_s']:.1f}" for x in rs),
                        ", ".join(str(x["connections"]) for x in rs),
                        ", ".join(f"{x['dropped_down']}" for x in rs),
                        ", ".join(sorted({c for x in rs for c in x["server_cc_seen"]})) or "?",
                    ]
                )
    out.append(
        common.markdown_table(
            [
                "profile",
                "cc",
                "tool",
                "goodput",
                "wall (s)",
                "conns",
                "dropped b→a",
                "server cc seen",
            ],
            per,
        )
    )
    fails = [
        (k, cc, data["tools"][t], x)
        for k in data["cases"]
        for cc in ccs
        for t in data["tools"]
        for x in data["runs"][k][cc][t]
        if not x["completed"] and not x["stopped_at_window"]
    ]
    if fails:
        out.append("Failures inside the window (last stderr line):\n")
        out += [
            f"- {k}, {cc}, {label}, seed {x['seed']} (exit {x['returncode']}): "
            f"`{(x['stderr_tail'].splitlines() or [''])[-1][:200]}`"
            for k, cc, label, x in fails
        ]
        out.append("")
    out.append(
        "![goodput per tool, CUBIC and BBR side by side, one panel per profile](links.png)\n"
    )
    return "\n".join(out)


def plot(data: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(data["cases"])
    tools = list(data["tools"])
    ccs = data["ccs"]
    colors = {"cubic": "#dd8452", "bbr": "#4c72b0"}
    fig, axes = plt.subplots(1, len(cases), figsize=(4.8 * len(cases), 4.8), squeeze=False)
    width = 0.8 / len(ccs)
    for ax, key in zip(axes[0], cases, strict=True):
        case = data["cases"][key]
        rate = case["rate_mbit_s"]
        for j, cc in enumerate(ccs):
            xs = [i + (j - (len(ccs) - 1) / 2) * width for i in range(len(tools))]
            meds = [data["medians"][key][cc][t]["goodput_mbit_s"] for t in tools]
            ax.bar(xs, meds, width, color=colors.get(cc), alpha=0.85, label=cc.upper())
            for x, t, m in zip(xs, tools, meds, strict=True):
                vals = [r["goodput_mbit_s"] for r in data["runs"][key][cc][t]]
                ax.plot([x] * len(vals), vals, "k.", markersize=4)
                ax.annotate(f"{m / rate:.2f}", (x, m), ha="center", va="bottom", fontsize=7)
        ax.axhline(rate, color="grey", linestyle=":", linewidth=1, label="link rate")
        ax.axhline(
            GOAL_BBR_RATIO * rate, color="#c44e52", linestyle="--", linewidth=1, label="0.8 × rate"
        )
        ax.set_xticks(range(len(tools)))
        ax.set_xticklabels([data["tools"][t] for t in tools], rotation=25, ha="right", fontsize=8)
        ax.set_ylabel("goodput (Mbit/s); labels: ratio to rate")
        ax.set_title(f"{key}: {case['size'] // MiB} MiB, {rate:g} Mbit/s", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(
        f"Emulated links, server CUBIC vs BBR, median of {data['rounds']}, "
        f"≤ {data['window_s']:g} s per run ({data['date'][:10]})"
    )
    fig.tight_layout()
    path = common.RESULTS / f"{data.get('results_name', NAME)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    p.add_argument("--window", type=float, default=WINDOW_S, help="seconds per run at most")
    p.add_argument(
        "--profile",
        choices=[c.key for c in CASES],
        action="append",
        help="only this profile (repeatable; default: all)",
    )
    p.add_argument("--cc", choices=CCS, action="append", help="only this server cc (repeatable)")
    p.add_argument(
        "--tool",
        choices=[t.key for t in TOOLS],
        action="append",
        help="only this tool (repeatable; default: all); results go to links_TOOL….md",
    )
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.window <= 0:
        p.error("--rounds must be ≥ 1 and --window > 0")
    try:
        linkemu.check_environment()
    except LinkLabError as exc:
        return 0 if args.no_write else write_skipped(str(exc))
    if common.missing_tools(NAME, ("nginx", "curl", "aria2c", "ss")):
        return 1
    cases = [c for c in CASES if args.profile is None or c.key in args.profile]
    ccs = [c for c in CCS if args.cc is None or c in args.cc]
    tools, skipped = active_tools()
    if args.tool:
        tools = [t for t in tools if t.key in args.tool]
    # A run of some tools only is not the side-by-side table: it gets a file of its own.
    name = NAME if not args.tool else "_".join([NAME, *sorted(args.tool)])
    bound = args.rounds * len(cases) * len(ccs) * len(tools) * (args.window + 2)
    print(
        f"links: {len(cases)} profiles × {len(ccs)} cc × {len(tools)} tools × {args.rounds} "
        f"rounds, ≤ {args.window:g} s each: at most ~{bound / 60:.0f} min",
        flush=True,
    )
    measured = measure(args.rounds, cases, ccs, tools, args.window)
    data = summarise(args.rounds, cases, ccs, tools, skipped, args.window, measured)
    data["results_name"] = name
    return common.finish(name, render(data), data, plot, no_write=args.no_write)
