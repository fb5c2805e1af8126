"""Parallel segments (``resumer/segments.py``): one attempt over K connections, each a
bounded Range drawn from the partial's holes; idle connections steal the largest range
still running. Against the scripted BlobServer (a real aiohttp server on 127.0.0.1),
whose misbehaviour is per request."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from badserver import Behaviour, cut, stall
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_helpers_core import CHUNK, attempt_rows, make_blob, open_engine, serve, sha256

from resumer.clock import FakeClock
from resumer.errors import BudgetExhaustedError, ConnectionCutError
from resumer.source import UrlSource
from resumer.transfer import BlobRequest

SIZE = 1000 * CHUNK + 123  # a short last chunk
DATA = make_blob(SIZE, seed=33)
DIGEST = sha256(DATA)
K = 4
MIN_SEGMENT = 16 * CHUNK
#: what one connection may read past its range's end after a split: what was in flight
OVERLAP = 512 * 1024


def segmented(**changes: object) -> dict[str, object]:
    return {"max_connections_per_blob": K, "min_segment_size": MIN_SEGMENT, **changes}


def ranges(srv: object) -> list[str | None]:
    return [r.headers.get("Range") for r in srv.requests]  # type: ignore[attr-defined]


async def test_k_connections_fill_the_blob_with_bounded_ranges(tmp_path: Path) -> None:
    async with serve({"b": DATA}) as srv, open_engine(tmp_path / "root", **segmented()) as eng:
        req = BlobRequest(DIGEST, UrlSource(f"{srv.url}/b"), digest=DIGEST, size=SIZE)
        result = await eng.transfers.fetch(req)
        assert result.path.read_bytes() == DATA
        asked = ranges(srv)
        # The first asks for the blob; the others each split a running range.
        assert asked[0] == f"bytes=0-{SIZE - 1}"
        assert len(asked) >= K  # and a connection that finishes steals again
        for rng in asked[1:]:
            assert rng is not None and rng.startswith("bytes=")
            first, last = (int(x) for x in rng[6:].split("-"))
            assert first % CHUNK == 0 and first < last < SIZE
        (row,) = await attempt_rows(eng)  # one attempt, however many connections
        assert result.attempts == 1
        assert row.kept_bytes == SIZE
        # Bytes read twice: only what was in flight past a range split off.
        assert SIZE <= result.stats.wire_bytes <= SIZE + (K - 1) * OVERLAP
        assert set(result.stats.discards) <= {"segment-overlap"}


async def test_a_blob_below_two_segments_stays_on_one_connection(tmp_path: Path) -> None:
    small = DATA[: 2 * MIN_SEGMENT - 1]
    digest = sha256(small)
    async with serve({"b": small}) as srv, open_engine(tmp_path / "root", **segmented()) as eng:
        req = BlobRequest(digest, UrlSource(f"{srv.url}/b"), digest=digest, size=len(small))
        result = await eng.transfers.fetch(req)
        assert result.path.read_bytes() == small
        # One plain GET, as with K = 1 (and Docker): no Range for a blob that cannot split.
        assert ranges(srv) == [None]


async def test_a_206_that_does_not_match_both_ends_writes_nothing(tmp_path: Path) -> None:
    """The second connection's 206 starts elsewhere: that connection fails and writes
    nothing; the others take its range, and the blob is the right one."""
    script = [Behaviour("honest"), Behaviour("wrong-range")]
    async with (
        serve({"b": DATA}, script) as srv,
        open_engine(tmp_path / "root", **segmented()) as eng,
    ):
        req = BlobRequest(DIGEST, UrlSource(f"{srv.url}/b"), digest=DIGEST, size=SIZE)
        result = await eng.transfers.fetch(req)
        assert result.path.read_bytes() == DATA
        wrong = srv.requests[1]
        assert wrong.behaviour == "wrong-range"
        # Nothing of its body was kept: every byte kept came from honest answers.
        (row,) = await attempt_rows(eng)
        assert row.kept_bytes == SIZE


async def test_a_server_that_ignores_range_ends_on_one_connection(tmp_path: Path) -> None:
    script = [Behaviour("ignore-range")] * 10
    async with (
        serve({"b": DATA}, script) as srv,
        open_engine(tmp_path / "root", **segmented()) as eng,
    ):
        req = BlobRequest(DIGEST, UrlSource(f"{srv.url}/b"), digest=DIGEST, size=SIZE)
        result = await eng.transfers.fetch(req)
        assert result.path.read_bytes() == DATA
        # Its 200 to the first range is the whole blob: read once, nobody else starts.
        assert [r.status for r in srv.requests] == [200]
        assert result.stats.wire_bytes == SIZE and result.stats.wasted_bytes == 0
        assert eng.hosts.ignores_range(req.source.display.split("/")[2])


async def test_a_link_down_for_good_gives_up_after_the_same_delays_as_one_connection(
    tmp_path: Path,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    delays: dict[int, list[float]] = {}
    for k in (1, K):
        clock = FakeClock()
        root = tmp_path / f"root{k}"
        async with open_engine(root, clock, **segmented(max_connections_per_blob=k)) as eng:
            req = BlobRequest(
                DIGEST, UrlSource(f"http://127.0.0.1:{port}/b"), digest=DIGEST, size=SIZE
            )
            with pytest.raises(BudgetExhaustedError) as info:
                await eng.transfers.fetch(req)
            assert info.value.attempts == 5
            assert isinstance(info.value.last, ConnectionCutError)
        delays[k] = clock.sleeps
    assert sum(delays[1]) == 5 + 10 + 15 + 20
    assert delays[K] == delays[1]  # neither K times sooner nor later


async def test_cuts_on_every_connection_lose_only_what_was_in_flight(tmp_path: Path) -> None:
    """Every connection of the first attempt is cut after some bytes: each one's range
    is free again for the others, or for the next attempt, which starts at once (bytes
    were kept); no range is fetched twice beyond what was in flight."""
    script = [cut(200 * CHUNK)] + [cut(50 * CHUNK)] * 12
    async with (
        serve({"b": DATA}, script) as srv,
        open_engine(tmp_path / "root", **segmented(max_download_attempts=20)) as eng,
    ):
        req = BlobRequest(DIGEST, UrlSource(f"{srv.url}/b"), digest=DIGEST, size=SIZE)
        result = await eng.transfers.fetch(req)
        assert result.path.read_bytes() == DATA
        assert result.stats.wire_bytes <= SIZE + (K + len(script)) * OVERLAP
        assert set(result.stats.discards) <= {"segment-overlap"}


faults = st.lists(
    st.one_of(
        st.builds(cut, st.integers(1, SIZE // 2)),
        st.builds(stall, st.integers(1, SIZE // 2)),
        st.just(Behaviour("honest")),
    ),
    max_size=8,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(script=faults)
@example(script=[cut(10 * CHUNK), stall(7 * CHUNK), cut(CHUNK + 1)])
def test_any_cuts_and_stalls_across_k_connections_end_byte_identical(
    tmp_path_factory: pytest.TempPathFactory, script: list[Behaviour]
) -> None:
    """For any schedule of cuts and stalls over the K connections: the blob is byte-
    identical, no wrong blob is committed, and no range is fetched twice except what was
    in flight at a cut or a split."""
    import asyncio

    async def run() -> None:
        root = tmp_path_factory.mktemp("root")
        async with (
            serve({"b": DATA}, list(script)) as srv,
            open_engine(root, **segmented(max_download_attempts=20)) as eng,
        ):
            req = BlobRequest(DIGEST, UrlSource(f"{srv.url}/b"), digest=DIGEST, size=SIZE)
            result = await eng.transfers.fetch(req)
            assert result.path.read_bytes() == DATA
            blobs = list((root / "blobs" / "sha256").iterdir())
            assert [b.name for b in blobs] == [DIGEST[7:]]
            extra = result.stats.wire_bytes - SIZE
            assert 0 <= extra <= (len(script) + K) * OVERLAP, (extra, script)

    asyncio.run(run())


async def test_the_rate_cap_and_the_wire_budget_hold_across_k_connections(
    tmp_path: Path,
) -> None:
    """One token bucket and one byte budget for every connection: K connections neither
    go past the cap nor past the budget (each by at most a read per connection)."""
    import time

    from resumer.errors import WireBudgetExhaustedError

    rate = 2 * 1024 * 1024
    async with serve({"b": DATA}) as srv:
        root = tmp_path / "root"
        async with open_engine(root, **segmented(max_wire_bytes=SIZE // 2)) as eng:
            req = BlobRequest(DIGEST, UrlSource(f"{srv.url}/b"), digest=DIGEST, size=SIZE)
            with pytest.raises(WireBudgetExhaustedError):
                await eng.transfers.fetch(req)
            spent = sum(a.wire_bytes for a in await attempt_rows(eng))
        assert SIZE // 2 <= spent <= SIZE // 2 + K * 256 * 1024
        async with open_engine(root, **segmented(max_download_rate=rate)) as eng:
            started = time.monotonic()
            result = await eng.transfers.fetch(req)
            took = time.monotonic() - started
        assert result.path.read_bytes() == DATA
        # What the second run still needed, at the cap: never faster than the bucket
        # allows (its burst aside).
        assert took >= (result.stats.wire_bytes - 256 * 1024) / rate * 0.95, took


@pytest.mark.parametrize("connections", [1, K])
async def test_a_spent_wire_budget_opens_no_new_range(tmp_path: Path, connections: int) -> None:
    """The budget is checked before each request of an attempt, not only before the
    attempt: with it spent, no connection asks the server for anything."""
    from resumer import fetch
    from resumer.clock import SystemClock
    from resumer.errors import WireBudgetExhaustedError
    from resumer.rate import Limiter
    from resumer.source import Endpoint

    async with (
        serve({"b": DATA}) as srv,
        open_engine(tmp_path / "root", **segmented(max_wire_bytes=SIZE)) as eng,
    ):
        partial, _ = await eng.ingest.open(DIGEST, digest=DIGEST, size=SIZE)
        try:
            limiter = Limiter(rate=0, wire_bytes=CHUNK)
            await limiter.take(CHUNK)  # spent by another transfer of the run
            out = await fetch.attempt(
                eng.session,
                Endpoint(f"{srv.url}/b"),
                partial,
                size=SIZE,
                validator=None,
                stall=fetch.StallPolicy(),
                clock=SystemClock(),
                connections=connections,
                min_segment=MIN_SEGMENT,
                limiter=limiter,
            )
        finally:
            await partial.close()
        assert isinstance(out.error, WireBudgetExhaustedError), out.error
        assert srv.reached == 0
