"""The fault proxy does exactly what its schedule says, and counts what crossed it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resumer.clock import FakeClock
from resumer.lab.proxy import EventKind, FaultProxy, Faults

SIZE = 1 << 20
PAYLOAD = random.Random(7).randbytes(SIZE)
REPO = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def payload_server(payload: bytes = PAYLOAD, *, request_size: int = 0) -> AsyncIterator[int]:
    """Serve `payload` to every connection (after reading `request_size` bytes), then close."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            if request_size:
                await reader.readexactly(request_size)
            writer.write(payload)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def fetch(port: int, request: bytes = b"") -> tuple[bytes, str]:
    """Read until the end; returns the bytes and how it ended ("eof" or "reset")."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = bytearray()
    try:
        if request:
            writer.write(request)
            await writer.drain()
        while data := await reader.read(65536):
            got += data
        return bytes(got), "eof"
    except ConnectionResetError:
        return bytes(got), "reset"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_cut_delivers_exactly_the_planned_bytes_then_a_reset() -> None:
    points = (0, 1, 1000, 65536, 300_001)
    async with payload_server() as port, FaultProxy("127.0.0.1", port, Faults(cut_at=points)) as p:
        for n in points:
            got, end = await fetch(p.port)
            assert end == "reset"
            assert got == PAYLOAD[:n]
        got, end = await fetch(p.port)  # the explicit list is used up: no more cuts
        assert (got, end) == (PAYLOAD, "eof")
    cuts = [(e.conn, e.offset) for e in p.events if e.kind is EventKind.CUT]
    assert cuts == list(enumerate(points))
    plans = [(c, k, o) for c, k, o, _ in p.schedule()]
    assert plans == [(i, EventKind.PLAN_CUT, n) for i, n in enumerate(points)]
    assert p.counters.cuts == len(points)
    assert p.counters.bytes_down == sum(points) + SIZE


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=0, max_value=SIZE - 1), min_size=1, max_size=4))
def test_property_client_holds_exactly_the_prefix_up_to_each_cut(points: list[int]) -> None:
    async def scenario() -> None:
        faults = Faults(cut_at=tuple(points))
        async with payload_server() as port, FaultProxy("127.0.0.1", port, faults) as p:
            for n in points:
                got, end = await fetch(p.port)
                assert (len(got), end) == (n, "reset")
                assert got == PAYLOAD[:n]
        assert [e.offset for e in p.events if e.kind is EventKind.CUT] == points
        assert p.counters.bytes_down == sum(points)

    asyncio.run(scenario())


async def test_drawn_cut_points_stay_in_range_and_are_logged() -> None:
    faults = Faults(cut_after=(10_000, 20_000))
    async with payload_server() as port, FaultProxy("127.0.0.1", port, faults, seed=3) as p:
        for _ in range(4):
            got, end = await fetch(p.port)
            assert end == "reset"
            assert 10_000 <= len(got) <= 20_000
            assert got == PAYLOAD[: len(got)]
    plans = p.schedule()
    assert all(detail == "drawn from 10000:20000" for *_, detail in plans)
    cut_offsets = [e.offset for e in p.events if e.kind is EventKind.CUT]
    assert cut_offsets == [offset for _, _, offset, _ in plans]


async def test_same_seed_gives_the_same_schedule() -> None:
    faults = Faults(cut_after=(1, SIZE - 1), stall_after=(1, SIZE), stall_for=0.0)

    async def run(seed: int) -> list[tuple[int, EventKind, int, str]]:
        clock = FakeClock()
        async with (
            payload_server() as port,
            FaultProxy("127.0.0.1", port, faults, seed=seed, clock=clock) as p,
        ):
            for _ in range(5):
                await fetch(p.port)
        return p.schedule()

    first, again, other = await run(42), await run(42), await run(43)
    assert len(first) == 10
    assert first == again
    assert first != other


async def test_stall_black_holes_the_connection_but_keeps_it_open() -> None:
    faults = Faults(stall_at=(5000,))
    async with payload_server() as port, FaultProxy("127.0.0.1", port, faults) as p:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        assert await reader.readexactly(5000) == PAYLOAD[:5000]
        await asyncio.wait_for(p.wait_for(EventKind.STALL), 5)
        # The stall is a black hole: no byte, but no EOF or reset either.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.3)
        assert not reader.at_eof()
        assert p.counters.bytes_down == 5000
        assert p.counters.stalls == 1
        writer.close()
    assert [e.offset for e in p.events if e.kind is EventKind.STALL] == [5000]


async def test_timed_stall_resumes_after_its_duration_on_the_injected_clock() -> None:
    clock = FakeClock()
    faults = Faults(stall_at=(70_000,), stall_for=30.0)
    async with payload_server() as port, FaultProxy("127.0.0.1", port, faults, clock=clock) as p:
        got, end = await fetch(p.port)
    assert (got, end) == (PAYLOAD, "eof")
    assert clock.sleeps == [30.0]
    kinds = [(e.kind, e.offset) for e in p.events if e.kind in (EventKind.STALL, EventKind.RESUME)]
    assert kinds == [(EventKind.STALL, 70_000), (EventKind.RESUME, 70_000)]


async def test_rate_limit_holds_within_15_percent() -> None:
    rate, size = 4_000_000.0, 3_000_000
    payload = PAYLOAD * 3
    async with (
        payload_server(payload[:size]) as port,
        FaultProxy("127.0.0.1", port, Faults(rate=rate)) as p,
    ):
        start = time.perf_counter()
        got, end = await fetch(p.port)
        elapsed = time.perf_counter() - start
    assert (len(got), end) == (size, "eof")
    measured = size / elapsed
    assert abs(measured - rate) / rate < 0.15, f"measured {measured:.0f} B/s for {rate:.0f}"


async def test_latency_delays_each_direction() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, FaultProxy("127.0.0.1", port, Faults(latency=0.05)) as p:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
        start = time.perf_counter()
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        rtt = time.perf_counter() - start
        writer.close()
    assert 0.1 <= rtt < 0.2


async def test_counters_count_both_directions_and_connections() -> None:
    request = b"GET /blob\r\n" * 100
    async with (
        payload_server(request_size=len(request)) as port,
        FaultProxy("127.0.0.1", port) as p,
    ):
        for _ in range(3):
            got, end = await fetch(p.port, request)
            assert (got, end) == (PAYLOAD, "eof")
    assert p.stats() == {
        "bytes_down": 3 * SIZE,
        "bytes_up": 3 * len(request),
        "connections": 3,
        "cuts": 0,
        "stalls": 0,
        "refused": 0,
    }


async def test_cut_all_resets_every_open_connection_now() -> None:
    faults = Faults(stall_at=(100, 100))
    async with payload_server() as port, FaultProxy("127.0.0.1", port, faults) as p:
        conns = [await asyncio.open_connection("127.0.0.1", p.port) for _ in range(2)]
        for reader, _ in conns:
            await reader.readexactly(100)
        await asyncio.wait_for(p.wait_for(EventKind.STALL, count=2), 5)
        assert p.cut_all() == 2
        for reader, writer in conns:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 5)
            writer.close()
    assert p.counters.cuts == 2


async def test_outage_resets_connections_and_refuses_new_ones() -> None:
    async with payload_server() as port, FaultProxy("127.0.0.1", port) as p:
        p.begin_outage()
        got, end = await fetch(p.port)
        assert got == b""
        assert end in ("reset", "eof")
        p.end_outage()
        assert await fetch(p.port) == (PAYLOAD, "eof")
    assert p.counters.refused == 1
    assert [e.kind for e in p.events if e.conn == 0] == [EventKind.ACCEPT, EventKind.REFUSED]


async def test_periodic_outages_follow_the_clock() -> None:
    faults = Faults(outage_every=0.2, outage_for=0.05)
    async with payload_server() as port, FaultProxy("127.0.0.1", port, faults) as p:
        await asyncio.wait_for(p.wait_for(EventKind.OUTAGE_END, count=2), 5)
    starts = [e.time for e in p.events if e.kind is EventKind.OUTAGE_START]
    ends = [e.time for e in p.events if e.kind is EventKind.OUTAGE_END]
    assert 0.04 <= ends[0] - starts[0] < 0.15
    assert 0.15 <= starts[1] - starts[0] < 0.3


async def test_standalone_process_prints_its_port_and_final_counters() -> None:
    async with payload_server() as port:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "resumer.lab.proxy",
            "--target",
            f"127.0.0.1:{port}",
            "--cut-at",
            "12345",
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 10)
            assert line.startswith(b"listening on 127.0.0.1:")
            proxy_port = int(line.rsplit(b":", 1)[1])
            got, end = await fetch(proxy_port)
            assert (got, end) == (PAYLOAD[:12345], "reset")
            assert await fetch(proxy_port) == (PAYLOAD, "eof")
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0
    counters = json.loads(out.decode().strip().splitlines()[-1])
    assert counters["bytes_down"] == 12345 + SIZE
    assert counters["connections"] == 2
    assert counters["cuts"] == 1


def test_bad_schedules_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="MIN:MAX"):
        Faults(cut_after=(10, 5))
    with pytest.raises(ValueError, match="outage_for"):
        Faults(outage_every=1.0, outage_for=2.0)


async def test_a_proxy_refuses_to_forward_to_itself() -> None:
    async with payload_server() as port:
        # Take the port the proxy would be given, then ask it to forward there.
        probe = FaultProxy("127.0.0.1", port)
        free = await probe.start()
        await probe.close()
        loop_proxy = FaultProxy("127.0.0.1", free, listen_port=free)
        with pytest.raises(ValueError, match="forward to itself"):
            await loop_proxy.start()
