"""The link emulator: the shaping logic on explicit times, then the real thing in namespaces.

The `Shaper` tests need nothing special. The `root` tests build two namespaces joined by
the TUN relay and measure RTT, goodput and loss through real sockets.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resumer.errors import LinkLabError
from resumer.lab.linkemu import (
    BGAN,
    GEO,
    LEO,
    PROFILES,
    RURAL_LTE,
    GilbertElliott,
    LinkEmulator,
    LinkProfile,
    Shaper,
    available_congestion_control,
    check_environment,
    remove_stale_namespaces,
)


def shaper(profile: LinkProfile, seed: int = 0) -> Shaper:
    return Shaper(profile, profile.rate_bps, random.Random(seed), start=0.0)


# -- shaping logic, no root needed -----------------------------------------------------


def test_delay_holds_each_packet_for_exactly_the_one_way_delay() -> None:
    s = shaper(LinkProfile(delay_ms=100))
    assert s.offer(b"p" * 100, now=1.0) is None
    assert s.next_due() == pytest.approx(1.1)
    assert s.pop_due(1.0999) == []
    assert s.pop_due(1.1) == [b"p" * 100]


def test_rate_serializes_packets_back_to_back() -> None:
    s = shaper(LinkProfile(delay_ms=10, rate_bps=8e6))  # 1000 bytes take 1 ms
    for _ in range(5):
        s.offer(b"x" * 1000, now=0.0)
    releases = [release for release, _ in s.pending]
    assert releases == pytest.approx([0.001 * k + 0.010 for k in range(1, 6)])


def test_queue_limit_drops_the_tail_and_frees_up_as_the_link_sends() -> None:
    s = shaper(LinkProfile(rate_bps=8e6, queue_limit=5))
    fates = [s.offer(b"x" * 1000, now=0.0) for _ in range(8)]
    assert fates == [None] * 5 + ["queue"] * 3
    assert s.offer(b"x" * 1000, now=0.0021) is None  # two have left the queue by then
    assert s.stats["queue"] == 3


def test_outage_drops_arrivals_and_packets_in_flight() -> None:
    s = shaper(LinkProfile(delay_ms=300, outage_every=15, outage_for=1))
    assert s.offer(b"a", now=13.8) is None  # released at 14.1, inside the outage
    assert s.offer(b"b", now=14.5) == "outage"
    assert s.offer(b"c", now=15.2) is None
    assert s.pop_due(16.0) == [b"c"]
    assert s.stats["outage"] == 2


def test_gilbert_elliott_loss_is_bursty_with_the_configured_mean() -> None:
    s = shaper(LEO, seed=5)
    lost = [s._fate(now=1.0) == "burst" for _ in range(200_000)]
    mean = sum(lost) / len(lost)
    bursts = [len(run) for run in "".join("x" if x else "." for x in lost).split(".") if run]
    assert LEO.gemodel is not None
    assert mean == pytest.approx(LEO.gemodel.mean_loss, rel=0.1)
    assert mean == pytest.approx(0.015, rel=0.1)
    assert sum(bursts) / len(bursts) == pytest.approx(3.0, rel=0.1)


def test_independent_loss_matches_its_probability() -> None:
    s = shaper(LinkProfile(loss=0.05), seed=9)
    fates = [s.offer(b"x", now=0.0) for _ in range(100_000)]
    assert fates.count("loss") / len(fates) == pytest.approx(0.05, rel=0.05)


def test_same_seed_replays_the_same_fates() -> None:
    profile = LinkProfile(loss=0.1, gemodel=GilbertElliott(p=0.05, r=0.3), jitter_ms=5, delay_ms=20)

    def run(seed: int) -> list[object]:
        s = shaper(profile, seed)
        fates: list[object] = [s.offer(b"x", now=i / 1000) for i in range(2000)]
        return fates + [release for release, _ in s.pending]

    assert run(1) == run(1)
    assert run(1) != run(2)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 0.01), st.integers(40, 1500)), min_size=1, max_size=60),
    st.integers(0, 2**32),
)
def test_property_jitter_never_reorders_and_never_beats_the_delay(
    arrivals: list[tuple[float, int]], seed: int
) -> None:
    s = shaper(LinkProfile(delay_ms=20, jitter_ms=10, rate_bps=10e6, queue_limit=10_000), seed)
    now = 0.0
    earliest = []
    for gap, size in arrivals:
        now += gap
        assert s.offer(bytes(size), now) is None
        earliest.append(now + 0.010)
    releases = [release for release, _ in s.pending]
    assert releases == sorted(releases)
    assert all(r >= e for r, e in zip(releases, earliest, strict=True))


def test_named_profiles_match_the_design_table() -> None:
    assert set(PROFILES) == {"geo", "leo", "rural-lte", "bgan"}
    assert (2 * GEO.delay_ms, GEO.loss, GEO.rate_bps) == (600, 0.005, 20e6)
    assert 2 * LEO.delay_ms == 50
    assert LEO.outage_every == 15
    assert (2 * RURAL_LTE.delay_ms, RURAL_LTE.loss, RURAL_LTE.rate_bps) == (70, 0.002, 20e6)
    assert RURAL_LTE.outage_every is not None
    assert (2 * BGAN.delay_ms, BGAN.loss, BGAN.rate_bps) == (1100, 0.001, 0.4e6)
    for profile in PROFILES.values():
        assert LinkProfile.from_json(profile.to_json()) == profile


def test_bad_profiles_are_refused() -> None:
    with pytest.raises(ValueError, match="loss"):
        LinkProfile(loss=1.5)
    with pytest.raises(ValueError, match="jitter"):
        LinkProfile(delay_ms=1, jitter_ms=5)


# -- environment checks ----------------------------------------------------------------


def test_without_root_the_emulator_says_it_needs_root() -> None:
    link = LinkEmulator(LinkProfile(), check=lambda: check_environment(euid=1000))
    with pytest.raises(LinkLabError, match=r"^link emulator needs root: running as uid 1000$"):
        link.start()


def test_without_tun_or_ip_the_emulator_says_which_is_missing() -> None:
    with pytest.raises(LinkLabError, match="/nonexistent/tun does not exist"):
        check_environment(euid=0, tun_path="/nonexistent/tun")
    with pytest.raises(LinkLabError, match="'no-such-ip' is not on PATH"):
        check_environment(euid=0, tun_path="/dev/null", ip_binary="no-such-ip")


# -- the real link, in namespaces ------------------------------------------------------


def _unavailable() -> str | None:
    try:
        check_environment()
    except LinkLabError as exc:
        return str(exc)
    return None


needs_root = pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))

ECHO_SERVER = """
import socket
s = socket.socket(); s.bind(("0.0.0.0", 7000)); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while d := c.recv(65536): c.sendall(d)
"""
ECHO_CLIENT = """
import json, socket, sys, time
c = socket.create_connection((sys.argv[1], 7000), timeout=10)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(5):
    t = time.perf_counter(); c.sendall(b"x"); c.recv(1); rtts.append(time.perf_counter() - t)
print(json.dumps(rtts))
"""
SINK = """
import json, socket, time
s = socket.socket(); s.bind(("0.0.0.0", 7001)); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); n = 0; first = None
while d := c.recv(1 << 20):
    first = first or time.perf_counter(); n += len(d)
print(json.dumps({"bytes": n, "seconds": time.perf_counter() - first}), flush=True)
"""
SOURCE = """
import socket, sys
c = socket.create_connection((sys.argv[1], 7001), timeout=20)
c.sendall(bytes(int(sys.argv[2]))); c.close()
"""
UDP_SINK = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 7002))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
print("ready", flush=True)
n = 0
s.settimeout(5)
s.recv(2048); n += 1            # the first datagram may take a while to come
s.settimeout(0.5)               # then: done when the stream has gone quiet
try:
    while True: s.recv(2048); n += 1
except TimeoutError:
    print(n, flush=True)
"""
UDP_SOURCE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])): s.sendto(b"d" * 100, (sys.argv[1], 7002))
"""


def _start(link: LinkEmulator, ns: str, script: str) -> subprocess.Popen[str]:
    proc = link.popen(ns, [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.root
@needs_root
def test_rtt_between_namespaces_is_twice_the_one_way_delay() -> None:
    with LinkEmulator(LinkProfile(delay_ms=100), seed=1) as link:
        server = _start(link, link.ns_b, ECHO_SERVER)
        out = link.run(
            link.ns_a,
            [sys.executable, "-c", ECHO_CLIENT, link.addr_b],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        server.wait(timeout=10)
    rtts = sorted(json.loads(out.stdout))
    median = rtts[len(rtts) // 2]
    assert median == pytest.approx(0.200, rel=0.10), rtts


@pytest.mark.root
@needs_root
def test_goodput_is_within_10_percent_of_the_rate() -> None:
    rate, size = 8e6, 4_000_000
    with LinkEmulator(LinkProfile(delay_ms=5, rate_bps=rate, queue_limit=200), seed=1) as link:
        sink = _start(link, link.ns_b, SINK)
        link.run(
            link.ns_a,
            [sys.executable, "-c", SOURCE, link.addr_b, str(size)],
            timeout=30,
            check=True,
        )
        assert sink.stdout is not None
        result = json.loads(sink.stdout.readline())
        sink.wait(timeout=10)
    assert result["bytes"] == size
    goodput = size * 8 / result["seconds"]
    assert goodput == pytest.approx(rate, rel=0.10), f"{goodput / 1e6:.2f} Mbit/s"


@pytest.mark.root
@needs_root
def test_lost_packets_are_exactly_those_the_relay_counts_as_lost() -> None:
    sent = 1000
    # The link's rate paces delivery so the receiver never overflows its own buffer.
    profile = LinkProfile(loss=0.2, rate_bps=2e6, queue_limit=2000)
    with LinkEmulator(profile, seed=4) as link:
        sink = _start(link, link.ns_b, UDP_SINK)
        link.run(link.ns_a, [sys.executable, "-c", UDP_SOURCE, link.addr_b, str(sent)], check=True)
        assert sink.stdout is not None
        received = int(sink.stdout.readline())
        sink.wait(timeout=10)
    up = link.stats["up"]
    assert up["forwarded"] == received
    assert up["forwarded"] + up["loss"] == sent
    assert up["loss"] / sent == pytest.approx(0.2, abs=0.05)


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.root
@needs_root
def test_namespaces_are_deleted_even_when_the_body_fails() -> None:
    link = LinkEmulator(LinkProfile())
    with pytest.raises(RuntimeError, match="boom"), link:
        assert link.ns_a in _namespaces()
        raise RuntimeError("boom")
    names = _namespaces()
    assert link.ns_a not in names
    assert link.ns_b not in names
    assert link.stats["up"]["forwarded"] >= 0  # the relay reported before it went


@pytest.mark.root
@needs_root
async def test_async_with_sets_up_and_tears_down_in_a_thread() -> None:
    async with LinkEmulator(LinkProfile(delay_ms=1)) as link:
        assert {link.ns_a, link.ns_b} <= set(_namespaces().split())
    assert link.ns_a not in _namespaces()


@pytest.mark.root
@needs_root
def test_namespaces_of_dead_processes_are_removed() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"rsm-{dead.pid}-0-a"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in remove_stale_namespaces()
        assert name not in _namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


# -- the server side's congestion control ------------------------------------------------

SLOW_SOURCE = """
import socket, time
s = socket.socket(); s.bind(("0.0.0.0", 7003)); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); c.sendall(bytes(4 << 20)); time.sleep(0.5); c.close()
"""
SLOW_SINK = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], 7003), timeout=20)
time.sleep(1.5)  # hold the connection open (window full) while the test looks at it
while c.recv(1 << 20): pass
"""


def _socket_cc(link: LinkEmulator) -> list[str]:
    """The congestion control named by ``ss -ti`` for b's connected sockets towards a."""
    out = link.run(
        link.ns_b,
        ["ss", "-tinH", "state", "established", "dst", link.addr_a],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Each socket: a line with the addresses, then an indented info line naming the cc
    # (after options such as "ts sack", when the connection has them).
    known = set(available_congestion_control())
    return [
        next((w for w in line.split() if w in known), "?")
        for line in out.splitlines()
        if line.startswith(("\t", " "))
    ]


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("cc", ["cubic", "bbr"])
def test_server_namespace_reports_the_chosen_congestion_control(cc: str) -> None:
    if cc not in available_congestion_control() and shutil.which("modprobe") is None:
        pytest.skip(f"{cc} is not available and there is no modprobe")
    with LinkEmulator(LinkProfile(delay_ms=20, rate_bps=20e6), seed=1, server_cc=cc) as link:
        assert link.server_cc_via in ("sysctl", "route")
        if link.server_cc_via == "sysctl":
            assert link.congestion_control(link.ns_b) == cc
        else:  # restricted in a non-root namespace: set on b's route to a
            assert link.route_congestion_control(link.ns_b) == cc
        source = _start(link, link.ns_b, SLOW_SOURCE)
        sink = link.popen(link.ns_a, [sys.executable, "-c", SLOW_SINK, link.addr_b])
        try:
            seen: list[str] = []
            for _ in range(50):  # the connection is up within a few RTTs
                seen = _socket_cc(link)
                if seen:
                    break
                time.sleep(0.02)
            assert seen == [cc], seen
        finally:
            sink.wait(timeout=30)
            source.wait(timeout=30)


def test_an_unknown_congestion_control_is_refused_with_the_reason() -> None:
    if _unavailable() is not None:
        pytest.skip(str(_unavailable()))
    link = LinkEmulator(LinkProfile(), server_cc="no-such-cc")
    with pytest.raises(LinkLabError, match="'no-such-cc' is not available here"):
        link.start()
