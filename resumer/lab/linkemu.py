"""A packet-level link emulator between two network namespaces, in userspace.

The kernel here has no netem, so the link is a Python relay instead: two network
namespaces, each holding one TUN device, and a relay process in the root namespace that
reads every IP packet from one TUN and writes it to the other after applying, per
direction, a rate limit with a drop-tail queue, one-way delay with optional jitter,
random loss, Gilbert–Elliott bursty loss and periodic outages. The RNG is seeded, so a
run can be replayed.

Side "a" is the client (resumer, curl, …) and side "b" the server (registry, nginx)::

    with LinkEmulator(GEO, seed=1) as link:          # a synchronous context manager
        server = link.popen(link.ns_b, ["nginx", ...])
        link.run(link.ns_a, ["curl", f"http://{link.addr_b}/blob"])

``LinkEmulator(..., server_cc="cubic")`` sets the TCP congestion control of namespace b
(the server side: the sender of a download) to that algorithm; see `LinkEmulator`.

``LinkEmulator`` needs root, /dev/net/tun and the ``ip`` tool; without them it raises
`LinkLabError` saying which one is missing. Its addresses (10.213.0.1 and 10.213.0.2)
exist only inside the two namespaces it creates, which are deleted on exit, even on error.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import fcntl
import itertools
import json
import os
import random
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

from resumer.errors import LinkLabError

__all__ = [
    "BGAN",
    "GEO",
    "LEO",
    "PROFILES",
    "RURAL_LTE",
    "GilbertElliott",
    "LinkEmulator",
    "LinkProfile",
    "Shaper",
    "available_congestion_control",
    "check_environment",
    "remove_stale_namespaces",
]

TUN_PATH = "/dev/net/tun"
_CC_SYSCTL = "net.ipv4.tcp_congestion_control"
_CC_PROC = "/proc/sys/net/ipv4/tcp_available_congestion_control"
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
#: How long setup waits for the relay to say it is ready.
RELAY_READY_TIMEOUT = 10.0


@dataclass(frozen=True)
class GilbertElliott:
    """Bursty loss: a two-state Markov chain stepped once per packet.

    In the good state a packet is lost with `loss_good`, in the bad state with `loss_bad`;
    `p` is P(good→bad) and `r` is P(bad→good), so bursts last 1/r packets on average and
    the long-run loss is ``(r·loss_good + p·loss_bad) / (p + r)``.
    """

    p: float
    r: float
    loss_bad: float = 1.0
    loss_good: float = 0.0

    @property
    def mean_loss(self) -> float:
        return (self.r * self.loss_good + self.p * self.loss_bad) / (self.p + self.r)


@dataclass(frozen=True)
class LinkProfile:
    """One link, applied to both directions unless `up_rate_bps` says otherwise.

    `rate_bps` counts whole IP packets, so TCP goodput is ~3.5 % below it (headers).
    `queue_limit` is the drop-tail buffer in front of the rate limiter, in packets;
    packets already "in flight" (in the delay) do not count, unlike netem's `limit`.
    Jitter is uniform in ±`jitter_ms` but never reorders packets.
    Outages: every `outage_every` s, `outage_for` s in which every packet is dropped.
    """

    name: str = "custom"
    delay_ms: float = 0.0  # one way, each direction
    jitter_ms: float = 0.0
    loss: float = 0.0  # independent loss probability per packet
    gemodel: GilbertElliott | None = None
    rate_bps: float | None = None  # b→a (down); None: unlimited
    up_rate_bps: float | None = None  # a→b; None: same as rate_bps
    queue_limit: int = 1000
    outage_every: float | None = None
    outage_for: float = 0.0

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or not 0 <= self.jitter_ms <= self.delay_ms:
            raise ValueError("need delay_ms >= 0 and 0 <= jitter_ms <= delay_ms")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")
        for rate in (self.rate_bps, self.up_rate_bps):
            if rate is not None and rate <= 0:
                raise ValueError(f"rates must be > 0 bit/s, got {rate}")
        if self.queue_limit < 1:
            raise ValueError("queue_limit must be >= 1 packet")
        if self.outage_every is not None and not 0 < self.outage_for < self.outage_every:
            raise ValueError("outage_for must be > 0 and shorter than outage_every")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LinkProfile:
        fields = json.loads(text)
        ge = fields.pop("gemodel")
        return cls(**fields, gemodel=GilbertElliott(**ge) if ge else None)


def _ge_for(mean_loss: float, burst_packets: float) -> GilbertElliott:
    """Gilbert (loss_bad=1) parameters with this long-run loss and mean burst length."""
    r = 1 / burst_packets
    return GilbertElliott(p=mean_loss * r / (1 - mean_loss), r=r)


# The profiles of DESIGN.md ("Link profiles for benchmarks"). RTT is twice delay_ms.
GEO = LinkProfile("geo", delay_ms=300, loss=0.005, rate_bps=20e6, queue_limit=2000)
LEO = LinkProfile(
    "leo",
    delay_ms=25,
    jitter_ms=5,
    gemodel=_ge_for(0.015, burst_packets=3),
    rate_bps=100e6,
    queue_limit=1000,
    outage_every=15,
    outage_for=1,
)
RURAL_LTE = LinkProfile(
    "rural-lte",
    delay_ms=35,
    jitter_ms=5,
    loss=0.002,
    rate_bps=20e6,
    up_rate_bps=4e6,
    queue_limit=500,
    outage_every=120,
    outage_for=5,
)
BGAN = LinkProfile("bgan", delay_ms=550, loss=0.001, rate_bps=0.4e6, queue_limit=100)
PROFILES = {p.name: p for p in (GEO, LEO, RURAL_LTE, BGAN)}


class Shaper:
    """One direction of the link: decides each packet's fate and release time.

    Pure logic over explicit times, so it is tested without root or real packets.
    """

    def __init__(
        self, profile: LinkProfile, rate_bps: float | None, rng: random.Random, start: float
    ) -> None:
        self.profile = profile
        self.rate_bps = rate_bps
        self.rng = rng
        self.start = start
        self.bad = False  # Gilbert–Elliott state
        self._finish: collections.deque[float] = collections.deque()  # of queued packets
        self._last_finish = start
        self._last_release = start
        self.pending: collections.deque[tuple[float, bytes]] = collections.deque()
        self.stats: dict[str, int] = dict.fromkeys(
            ("forwarded", "bytes", "loss", "burst", "queue", "outage"), 0
        )

    def link_down(self, now: float) -> bool:
        every = self.profile.outage_every
        if every is None:
            return False
        return (now - self.start) % every >= every - self.profile.outage_for

    def offer(self, packet: bytes, now: float) -> str | None:
        """Take a packet arriving at `now`; returns why it was dropped, or None."""
        reason = self._fate(now)
        if reason is None:
            finish = self._serialize(len(packet), now)
            if finish is None:
                reason = "queue"
            else:
                p = self.profile
                jitter = self.rng.uniform(-p.jitter_ms, p.jitter_ms) if p.jitter_ms else 0.0
                # Never before an earlier packet: a link delays, it does not reorder.
                release = max(finish + (p.delay_ms + jitter) / 1000, self._last_release)
                self._last_release = release
                self.pending.append((release, packet))
                return None
        self.stats[reason] += 1
        return reason

    def next_due(self) -> float | None:
        return self.pending[0][0] if self.pending else None

    def pop_due(self, now: float) -> list[bytes]:
        """Packets whose release time has come; those landing in an outage are lost."""
        out: list[bytes] = []
        while self.pending and self.pending[0][0] <= now:
            release, packet = self.pending.popleft()
            if self.link_down(release):
                self.stats["outage"] += 1
                continue
            self.stats["forwarded"] += 1
            self.stats["bytes"] += len(packet)
            out.append(packet)
        return out

    def _fate(self, now: float) -> str | None:
        # Draw in a fixed order per packet, so a seed replays the same losses.
        if self.link_down(now):
            return "outage"
        ge = self.profile.gemodel
        if ge is not None:
            lost = self.rng.random() < (ge.loss_bad if self.bad else ge.loss_good)
            self.bad = self.rng.random() >= ge.r if self.bad else self.rng.random() < ge.p
            if lost:
                return "burst"
        if self.profile.loss and self.rng.random() < self.profile.loss:
            return "loss"
        return None

    def _serialize(self, size: int, now: float) -> float | None:
        """When the packet has left the rate limiter, or None if the queue is full."""
        if self.rate_bps is None:
            return now
        while self._finish and self._finish[0] <= now:
            self._finish.popleft()
        if len(self._finish) >= self.profile.queue_limit:
            return None
        self._last_finish = max(now, self._last_finish) + size * 8 / self.rate_bps
        self._finish.append(self._last_finish)
        return self._last_finish


# -- the relay process ----------------------------------------------------------------


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def relay(fd_a: int, fd_b: int, profile: LinkProfile, seed: int) -> dict[str, dict[str, int]]:
    """Move packets between the two TUN fds until SIGTERM; returns per-direction stats."""
    start = time.monotonic()
    # One RNG per direction, so traffic one way cannot shift the losses of the other.
    up = Shaper(
        profile, profile.up_rate_bps or profile.rate_bps, random.Random(f"{seed}:up"), start
    )
    down = Shaper(profile, profile.rate_bps, random.Random(f"{seed}:down"), start)
    routes = {fd_a: (up, fd_b), fd_b: (down, fd_a)}
    sel = selectors.DefaultSelector()
    for fd in routes:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    signal.signal(signal.SIGTERM, _raise_stop)
    print("ready", flush=True)
    try:
        while True:
            now = time.monotonic()
            for shaper, out in routes.values():
                for packet in shaper.pop_due(now):
                    try:
                        os.write(out, packet)
                    except OSError:
                        shaper.stats["forwarded"] -= 1  # the far side is gone; count as lost
            dues = [d for d in (up.next_due(), down.next_due()) if d is not None]
            timeout = max(0.0, min(dues) - time.monotonic()) if dues else None
            for key, _ in sel.select(timeout):
                fd = int(key.fd)
                shaper, _out = routes[fd]
                now = time.monotonic()
                # Drain a batch per wake-up: one select per packet would cap the rate.
                for _ in range(256):
                    try:
                        packet = os.read(fd, 65536)
                    except (BlockingIOError, InterruptedError):
                        break
                    shaper.offer(packet, now)
    except _Stop:
        pass
    finally:
        sel.close()
    return {"up": up.stats, "down": down.stats}


# -- setup and teardown ---------------------------------------------------------------


def check_environment(
    *, euid: int | None = None, tun_path: str = TUN_PATH, ip_binary: str = "ip"
) -> None:
    """Raise LinkLabError saying exactly why the emulator cannot run here, if it cannot."""
    uid = os.geteuid() if euid is None else euid
    if uid != 0:
        raise LinkLabError(f"link emulator needs root: running as uid {uid}")
    if not os.path.exists(tun_path):
        raise LinkLabError(f"link emulator needs a TUN device: {tun_path} does not exist")
    if not os.access(tun_path, os.R_OK | os.W_OK):
        raise LinkLabError(f"link emulator needs a TUN device: cannot open {tun_path}")
    if shutil.which(ip_binary) is None:
        raise LinkLabError(f"link emulator needs iproute2: {ip_binary!r} is not on PATH")


_counter = itertools.count()


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces left by emulators whose process died (SIGKILL skips teardown)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    removed = []
    for line in listing.stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        parts = name.split("-")
        if len(parts) != 4 or parts[0] != "rsm" or not parts[1].isdigit():
            continue
        if os.path.exists(f"/proc/{parts[1]}"):
            continue  # its owner is alive (or the pid was reused: leave it alone)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        removed.append(name)
    return removed


class LinkEmulator:
    """Two namespaces joined by an emulated link.

    A synchronous context manager (``with``); ``async with`` also works and runs the
    setup and teardown (a few ``ip`` commands, ~0.1 s) in a thread. ``start()`` and
    ``close()`` do the same as entering and leaving. After `close`, `stats` holds the
    relay's per-direction counts ("up" is a→b, "down" is b→a).

    ``server_cc`` (e.g. ``"cubic"``, ``"bbr"``) is the TCP congestion control of
    namespace b. It is set with ``sysctl net.ipv4.tcp_congestion_control`` inside the
    namespace; the kernel refuses that in a namespace other than the root one for an
    algorithm that is not in the root's ``tcp_allowed_congestion_control`` (EPERM), and
    then it is set on namespace b's route to a instead (``ip route … congctl ALG``),
    which every socket of b towards a uses. `server_cc_via` says which (``"sysctl"`` or
    ``"route"``); the machine's own settings are never changed. An algorithm the kernel
    does not have is loaded with ``modprobe tcp_ALG`` first, else `LinkLabError`.
    """

    addr_a = "10.213.0.1"
    addr_b = "10.213.0.2"

    def __init__(
        self,
        profile: LinkProfile,
        seed: int = 0,
        *,
        check: Callable[[], None] = check_environment,
        server_cc: str | None = None,
    ) -> None:
        self.profile = profile
        self.seed = seed
        self._check = check
        self.server_cc = server_cc
        self.server_cc_via: str | None = None
        n = next(_counter)
        pid = os.getpid()
        self.ns_a = f"rsm-{pid}-{n}-a"
        self.ns_b = f"rsm-{pid}-{n}-b"
        # Interface names are limited to 15 bytes; they live only briefly in the root ns.
        self._dev_a = f"rsm{pid % 10**7}x{n % 100}a"
        self._dev_b = f"rsm{pid % 10**7}x{n % 100}b"
        self._namespaces: list[str] = []
        self._relay: subprocess.Popen[str] | None = None
        self.stats: dict[str, Any] = {}

    def __enter__(self) -> LinkEmulator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> LinkEmulator:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    def start(self) -> None:
        """Check the environment, build the namespaces and start the relay."""
        self._check()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the relay and delete the namespaces; safe to call more than once."""
        proc, self._relay = self._relay, None
        if proc is not None:
            proc.terminate()
            try:
                out, _ = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            lines = out.strip().splitlines()
            if lines and lines[-1].startswith("{"):
                self.stats = json.loads(lines[-1])
        while self._namespaces:
            subprocess.run(
                ["ip", "netns", "del", self._namespaces.pop()],
                capture_output=True,
                check=False,
            )

    def exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside namespace `ns`."""
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run inside namespace `ns`."""
        return subprocess.run(self.exec_argv(ns, argv), **kwargs)

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen inside namespace `ns`; the caller reaps it."""
        return subprocess.Popen(self.exec_argv(ns, argv), **kwargs)

    def _ip(self, *args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise LinkLabError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")

    def _open_tun(self, name: str) -> int:
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK)
        except OSError as exc:
            raise LinkLabError(f"cannot open {TUN_PATH}: {exc.strerror}") from exc
        try:
            ifr = struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI)
            fcntl.ioctl(fd, _TUNSETIFF, ifr)
        except OSError as exc:
            os.close(fd)
            raise LinkLabError(f"cannot create TUN device {name}: {exc.strerror}") from exc
        return fd

    def _setup(self) -> None:
        fds: list[int] = []
        try:
            # Create each TUN in the root namespace, then move it: its fd stays attached,
            # so the relay can run here while the stacks on each side are isolated.
            for ns, dev, addr in (
                (self.ns_a, self._dev_a, self.addr_a),
                (self.ns_b, self._dev_b, self.addr_b),
            ):
                fds.append(self._open_tun(dev))
                self._ip("netns", "add", ns)
                self._namespaces.append(ns)
                self._ip("link", "set", "dev", dev, "netns", ns)
                self._ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                # IPv6 autoconfiguration would put stray packets on the link.
                self.run(
                    ns,
                    ["sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1"],
                    capture_output=True,
                    check=False,
                )
                # A TUN drops what its ring cannot hold before the relay sees it; make the
                # ring deep so that the profile's queue_limit is the only drop-tail.
                self._ip("-n", ns, "link", "set", "dev", dev, "txqueuelen", "10000", "up")
                self._ip("-n", ns, "link", "set", "dev", "lo", "up")
            if self.server_cc is not None:
                self._set_server_cc(self.server_cc)
            argv = [
                sys.executable,
                "-m",
                "resumer.lab.linkemu",
                "relay",
                "--fd-a",
                str(fds[0]),
                "--fd-b",
                str(fds[1]),
                "--seed",
                str(self.seed),
                "--profile",
                self.profile.to_json(),
            ]
            env = {**os.environ, "PYTHONPATH": _package_root()}
            self._relay = subprocess.Popen(
                argv,
                pass_fds=fds,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        finally:
            for fd in fds:  # the relay holds its own copies now
                os.close(fd)
        assert self._relay.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self._relay.stdout, selectors.EVENT_READ)
        ready = sel.select(RELAY_READY_TIMEOUT)
        sel.close()
        line = self._relay.stdout.readline() if ready else ""
        if line.strip() != "ready":
            self._relay.kill()
            _, err = self._relay.communicate()
            self._relay = None
            raise LinkLabError(f"link relay did not start: {err.strip() or 'no output'}")

    def _set_server_cc(self, cc: str) -> None:
        if cc not in available_congestion_control():
            tried = "no modprobe here"
            if shutil.which("modprobe") is not None:
                subprocess.run(["modprobe", f"tcp_{cc}"], capture_output=True, check=False)
                tried = f"modprobe tcp_{cc} did not help"
            if cc not in available_congestion_control():
                raise LinkLabError(
                    f"TCP congestion control {cc!r} is not available here "
                    f"(have: {' '.join(available_congestion_control())}; {tried})"
                )
        done = self.run(
            self.ns_b, ["sysctl", "-qw", f"{_CC_SYSCTL}={cc}"], capture_output=True, text=True
        )
        if done.returncode == 0 and self.congestion_control(self.ns_b) == cc:
            self.server_cc_via = "sysctl"
            return
        # EPERM: cc is "restricted" outside the root namespace. The route's congctl is not.
        prefix = f"{self.addr_b.rsplit('.', 1)[0]}.0/30"
        self._ip(
            "-n",
            self.ns_b,
            "route",
            "replace",
            prefix,
            "dev",
            self._dev_b,
            "proto",
            "kernel",
            "scope",
            "link",
            "src",
            self.addr_b,
            "congctl",
            cc,
        )
        self.server_cc_via = "route"

    def congestion_control(self, ns: str) -> str:
        """Namespace ``ns``'s ``net.ipv4.tcp_congestion_control``."""
        done = self.run(ns, ["sysctl", "-n", _CC_SYSCTL], capture_output=True, text=True)
        return str(done.stdout.strip())

    def route_congestion_control(self, ns: str) -> str | None:
        """The ``congctl`` on namespace ``ns``'s route to the other side, if any."""
        done = self.run(ns, ["ip", "route", "show"], capture_output=True, text=True)
        for line in done.stdout.splitlines():
            words = line.split()
            if "congctl" in words:
                i = words.index("congctl") + 1
                if i < len(words) and words[i] == "lock":
                    i += 1
                return words[i] if i < len(words) else None
        return None


def available_congestion_control() -> list[str]:
    """The TCP congestion control algorithms this kernel has loaded."""
    try:
        with open(_CC_PROC) as f:
            return f.read().split()
    except OSError:
        return []


def _package_root() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    existing = os.environ.get("PYTHONPATH")
    return f"{root}{os.pathsep}{existing}" if existing else root


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m resumer.lab.linkemu")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("relay", help="internal: the relay process LinkEmulator starts")
    r.add_argument("--fd-a", type=int, required=True)
    r.add_argument("--fd-b", type=int, required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--profile", required=True, help="LinkProfile as JSON")
    args = ap.parse_args(argv)
    stats = relay(args.fd_a, args.fd_b, LinkProfile.from_json(args.profile), args.seed)
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
