"""DESIGN.md's retry delay after progress, end to end, with an injected clock.

After failed attempt n that kept no byte, wait n × retry-delay (the countdown, as
before); after an attempt that kept bytes, the link was up until the cut: reconnect at
once. Every attempt counts against the budget either way. The clock readings when each
request reached the server are the delays as the server saw them.
"""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import pytest
from badserver import Behaviour, cut, status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_helpers_core import Recorder, blob_and_digest, open_engine, range_start, serve

from resumer.clock import FakeClock
from resumer.errors import BudgetExhaustedError, ConnectionCutError, ServerError
from resumer.events import Status
from resumer.retry import AttemptBudget, AttemptPolicy, LinearDelay

SIZE = 400_000
DATA, DIGEST = blob_and_digest(SIZE, seed=11)
STEP = 16 * 1024  # bytes a cut after progress lets through

#: Docker's one-stream table (plain GET first, one request per attempt): K = 1. K > 1 has
#: its own tests in test_segments.py, and its properties in test_crash_properties.py.
ONE_STREAM: dict[str, object] = {"max_connections_per_blob": 1}


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def countdowns(events: Recorder) -> list[int]:
    """The first value of each "Retrying in N seconds" countdown, in order."""
    starts: list[int] = []
    last: int | None = None
    for e in events.events:
        if e.status == Status.RETRYING:
            assert e.value is not None
            if last is None or e.value >= last:
                starts.append(e.value)
            last = e.value
        else:
            last = None
    return starts


async def test_a_cut_after_progress_reconnects_at_once(tmp_path: Path) -> None:
    clock = FakeClock()
    events = Recorder()
    async with (
        serve({"b": DATA}, [cut(STEP)], clock=clock) as srv,
        open_engine(tmp_path / "root", clock, **ONE_STREAM) as eng,
    ):
        result = await eng.fetch(
            f"{srv.url}/b", digest=DIGEST, dest=tmp_path / "out", on_progress=events
        )
    assert (tmp_path / "out").read_bytes() == DATA
    assert result.attempts == 2
    assert [range_start(r.headers) for r in srv.requests] == [None, STEP]
    assert gaps(srv.times) == [0.0]
    assert clock.sleeps == []
    assert countdowns(events) == []  # no "Retrying in" at all


async def test_a_cut_that_kept_no_byte_waits_n_times_the_step(tmp_path: Path) -> None:
    clock = FakeClock()
    events = Recorder()
    # cut(0): headers, then the connection closes before the first body byte.
    async with (
        serve({"b": DATA}, [cut(0), status(503), cut(0)], clock=clock) as srv,
        open_engine(tmp_path / "root", clock) as eng,
    ):
        result = await eng.fetch(
            f"{srv.url}/b", digest=DIGEST, dest=tmp_path / "out", on_progress=events
        )
    assert (tmp_path / "out").read_bytes() == DATA
    assert result.attempts == 4
    assert gaps(srv.times) == [5.0, 10.0, 15.0]
    assert countdowns(events) == [5, 10, 15]
    assert clock.sleeps == [1.0] * 30  # counted down in whole seconds, as before


async def test_progress_between_empty_attempts_keeps_the_ramp_by_attempt_number(
    tmp_path: Path,
) -> None:
    """The wait after attempt n that kept nothing is n × step whatever came before."""
    clock = FakeClock()
    script = [status(500), cut(STEP), status(500), cut(STEP), cut(0)]
    async with (
        serve({"b": DATA}, script, clock=clock) as srv,
        open_engine(tmp_path / "root", clock, max_download_attempts=6) as eng,
    ):
        await eng.fetch(f"{srv.url}/b", digest=DIGEST, dest=tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == DATA
    assert gaps(srv.times) == [5.0, 0.0, 15.0, 0.0, 25.0]


def _kinds() -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(["progress", "cut-empty", "503", "500"]), max_size=7)


def _behaviour(kind: str) -> Behaviour:
    if kind == "progress":
        return cut(STEP)
    if kind == "cut-empty":
        return cut(0)
    return status(int(kind))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(_kinds(), st.sampled_from([0.5, 1.0, 5.0]), st.integers(1, 8))
async def test_any_mix_of_failures_waits_by_the_rule_and_counts_every_attempt(
    tmp_path_factory: pytest.TempPathFactory, kinds: list[str], step: float, budget: int
) -> None:
    clock = FakeClock()
    events = Recorder()
    root = tmp_path_factory.mktemp("mix")
    async with (
        serve({"b": DATA}, [_behaviour(k) for k in kinds], clock=clock) as srv,
        open_engine(root / "root", clock, retry_delay=step, max_download_attempts=budget) as eng,
    ):
        url = f"{srv.url}/b"
        if len(kinds) >= budget:
            with pytest.raises(BudgetExhaustedError) as info:
                await eng.fetch(url, digest=DIGEST, dest=root / "out", on_progress=events)
            assert info.value.attempts == budget  # every attempt counted, progress or not
            tried = kinds[:budget]
        else:
            result = await eng.fetch(url, digest=DIGEST, dest=root / "out", on_progress=events)
            assert (root / "out").read_bytes() == DATA
            assert result.attempts == len(kinds) + 1
            tried = kinds
    exhausted = len(kinds) >= budget
    assert len(srv.requests) == len(tried) + (0 if exhausted else 1)
    # A wait after each failed attempt but the last of an exhausted budget.
    waited = tried[: budget - 1] if exhausted else tried
    expected = [0.0 if k == "progress" else n * step for n, k in enumerate(waited, 1)]
    assert gaps(srv.times) == expected
    assert sum(clock.sleeps) == pytest.approx(sum(expected))
    # A countdown for each wait, none for a reconnect after progress.
    assert len(countdowns(events)) == sum(1 for d in expected if d > 0)


def _refusing_port() -> socket.socket:
    """A bound port nobody listens on: every connect is refused (a link down for good)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


async def test_a_link_down_for_good_gives_up_after_the_same_steps_as_before(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    events = Recorder()
    sock = _refusing_port()
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/b"
        async with open_engine(tmp_path / "root", clock) as eng:
            with pytest.raises(BudgetExhaustedError) as info:
                await eng.fetch(url, digest=DIGEST, dest=tmp_path / "out", on_progress=events)
    finally:
        sock.close()
    assert info.value.attempts == 5
    assert isinstance(info.value.last, ConnectionCutError)
    assert countdowns(events) == [5, 10, 15, 20]
    assert clock.sleeps == [1.0] * 50
    assert not (tmp_path / "out").exists()


async def test_a_link_that_dies_after_progress_keeps_the_ramp_for_what_follows(
    tmp_path: Path,
) -> None:
    """Up, cut with bytes kept (at once), then nothing more gets through: 10, 15, 20 s."""
    clock = FakeClock()
    events = Recorder()
    async with (
        serve({"b": DATA}, [cut(STEP)] + [status(503)] * 10, clock=clock) as srv,
        open_engine(tmp_path / "root", clock) as eng,
    ):
        with pytest.raises(BudgetExhaustedError) as info:
            await eng.fetch(
                f"{srv.url}/b", digest=DIGEST, dest=tmp_path / "out", on_progress=events
            )
    assert info.value.attempts == 5
    assert gaps(srv.times) == [0.0, 10.0, 15.0, 20.0]
    assert countdowns(events) == [10, 15, 20]
    # The bytes of the first attempt are kept for the next run.
    async with open_engine(tmp_path / "root", FakeClock()) as eng:
        row = await eng.store.transfer(DIGEST)
        assert row is not None and row.offset >= STEP - 4096


def test_retry_after_still_wins_after_progress() -> None:
    p = AttemptPolicy("b", AttemptBudget(5), LinearDelay(5.0))
    p.begin()
    verdict = p.after_failure(ServerError("503", status=503, retry_after=12.0), kept_bytes=4096)
    assert verdict.delay == 12.0
    p.begin()
    assert p.after_failure(ConnectionCutError("cut"), kept_bytes=1).delay == 0.0
    p.begin()
    assert p.after_failure(ConnectionCutError("cut"), kept_bytes=0).delay == 15.0
