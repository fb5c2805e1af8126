"""Docker's attempt budget and retry delays (DESIGN.md), with an injected clock.

``max-download-attempts`` N is the total number of attempts per blob in one run; after
failed attempt n the wait is n × retry-delay, shown as a countdown. A new run starts a
fresh budget but keeps the bytes. Every delay below is recorded by a FakeClock and
checked on the server side too: the clock reading when each request arrived.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from badserver import stall, status
from hypothesis import given, settings
from hypothesis import strategies as st
from test_helpers_core import (
    Recorder,
    attempt_rows,
    blob_and_digest,
    open_engine,
    range_start,
    serve,
)

from resumer import cli
from resumer.clock import FakeClock
from resumer.config import Config
from resumer.errors import (
    BudgetExhaustedError,
    ConfigError,
    DigestMismatchError,
    ServerError,
)
from resumer.events import Status
from resumer.retry import LinearDelay

SIZE = 200_000
DATA, DIGEST = blob_and_digest(SIZE, seed=3)
N = 80_000
FAILURES = [500, 503, 429, 408, 502, 504]


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


# --------------------------------------------------------------------------- success at 1, 2, N


@pytest.mark.parametrize("failures", [0, 1, 4], ids=["attempt-1", "attempt-2", "attempt-N"])
async def test_success_within_the_budget(tmp_path: Path, failures: int) -> None:
    clock = FakeClock()
    script = [status(FAILURES[i]) for i in range(failures)]
    async with (
        serve({"b": DATA}, script, clock=clock) as srv,
        open_engine(tmp_path / "root", clock, max_download_attempts=5) as eng,
    ):
        result = await eng.fetch(f"{srv.url}/b", digest=DIGEST, dest=tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == DATA
        assert result.attempts == failures + 1
        assert len(srv.requests) == failures + 1
        rows = await attempt_rows(eng)
        assert [r.attempt_no for r in rows] == list(range(1, failures + 2))
        assert [r.http_status for r in rows] == [*FAILURES[:failures], 200]


# --------------------------------------------------------------------------- exhaustion


@pytest.mark.parametrize("budget", [1, 2, 5])
async def test_failure_after_exactly_n_attempts_names_blob_n_and_last_cause(
    tmp_path: Path, budget: int
) -> None:
    clock = FakeClock()
    # The last failure differs from the others, so the error must name the last one; and
    # the server would answer honestly afterwards, so the budget alone stops the run.
    script = [status(500)] * (budget - 1) + [status(503)]
    async with (
        serve({"b": DATA}, script, clock=clock) as srv,
        open_engine(tmp_path / "root", clock, max_download_attempts=budget) as eng,
    ):
        with pytest.raises(BudgetExhaustedError) as info:
            await eng.fetch(f"{srv.url}/b", digest=DIGEST, dest=tmp_path / "out")
        assert len(srv.requests) == budget
    err = info.value
    assert err.blob == DIGEST and err.attempts == budget
    assert isinstance(err.last, ServerError) and err.last.status == 503
    text = str(err)
    assert DIGEST in text
    assert f"{budget} attempt" in text
    assert "503" in text
    assert not (tmp_path / "out").exists()
    # Waits only between attempts: none after the last one.
    assert sum(clock.sleeps) == sum(LinearDelay(5.0)(n) for n in range(1, budget))


async def test_budget_of_one_means_no_retry(tmp_path: Path) -> None:
    clock = FakeClock()
    async with (
        serve({"b": DATA}, [stall(N)]) as srv,
        open_engine(tmp_path / "root", clock, max_download_attempts=1) as eng,
    ):
        with pytest.raises(BudgetExhaustedError) as info:
            await eng.fetch(f"{srv.url}/b", digest=DIGEST, dest=tmp_path / "out")
        assert len(srv.requests) == 1
    assert info.value.attempts == 1
    assert "stalled" in str(info.value)
    assert clock.sleeps == []


async def test_a_resumed_attempt_counts_like_any_other(tmp_path: Path) -> None:
    async with (
        serve({"b": DATA}, [stall(N), status(500)]) as srv,
        open_engine(tmp_path / "root", max_download_attempts=2) as eng,
    ):
        with pytest.raises(BudgetExhaustedError):
            await eng.fetch(f"{srv.url}/b", digest=DIGEST, dest=tmp_path / "out")
        assert [range_start(r.headers) for r in srv.requests] == [None, N]


@pytest.mark.parametrize("value", [0, -1])
def test_a_budget_below_one_is_refused_with_a_clear_message(value: int) -> None:
    with pytest.raises(ConfigError, match=f"max-download-attempts must be at least 1, got {value}"):
        Config(max_download_attempts=value)


def _cli_fetch_argv(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fetch",
        "http://127.0.0.1:9/b",
        "--digest",
        DIGEST,
        "-o",
        str(tmp_path / "out"),
        "--root",
        str(tmp_path / "root"),
        *extra,
    ]


def test_cli_refuses_max_download_attempts_0_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(_cli_fetch_argv(tmp_path, "--max-download-attempts", "0"))
    assert code == 2
    assert "max-download-attempts must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "root").exists()  # refused before anything was touched


def test_cli_refuses_a_zero_budget_from_the_config_file_and_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "daemon.json"
    conf.write_text(json.dumps({"max-download-attempts": 0}))
    assert cli.main(_cli_fetch_argv(tmp_path, "--config", str(conf))) == 2
    assert "max-download-attempts must be at least 1" in capsys.readouterr().err
    monkeypatch.setenv("RESUMER_MAX_DOWNLOAD_ATTEMPTS", "0")
    assert cli.main(_cli_fetch_argv(tmp_path)) == 2
    assert "max-download-attempts must be at least 1" in capsys.readouterr().err


# --------------------------------------------------------------------------- delays


async def test_delay_sequence_is_5_10_15_seconds_counted_down(tmp_path: Path) -> None:
    clock = FakeClock()
    events = Recorder()
    async with (
        serve({"b": DATA}, [status(500)] * 3, clock=clock) as srv,
        open_engine(tmp_path / "root", clock) as eng,
    ):
        await eng.fetch(f"{srv.url}/b", digest=DIGEST, dest=tmp_path / "out", on_progress=events)
    assert gaps(srv.times) == [5.0, 10.0, 15.0]
    # A countdown of whole seconds, like docker's "Retrying in N seconds".
    assert clock.sleeps == [1.0] * 30
    countdown = events.values(Status.RETRYING)
    assert countdown == [*range(5, 0, -1), *range(10, 0, -1), *range(15, 0, -1)]
    texts = events.texts()
    assert "Retrying in 5 seconds" in texts and "Retrying in 1 second" in texts


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([0.5, 1.0, 2.0, 3.0, 7.5]), st.integers(1, 3))
async def test_custom_retry_delay_is_the_step_of_the_linear_delay(
    tmp_path_factory: pytest.TempPathFactory, step: float, failures: int
) -> None:
    clock = FakeClock()
    root = tmp_path_factory.mktemp("delay")
    async with (
        serve({"b": DATA}, [status(500)] * failures, clock=clock) as srv,
        open_engine(root, clock, retry_delay=step) as eng,
    ):
        await eng.fetch(f"{srv.url}/b", digest=DIGEST, dest=root / "out")
    assert gaps(srv.times) == [n * step for n in range(1, failures + 1)]
    assert sum(clock.sleeps) == sum(n * step for n in range(1, failures + 1))
    assert all(s <= 1.0 for s in clock.sleeps)


async def test_progress_shows_the_countdown_and_where_it_resumes(tmp_path: Path) -> None:
    events = Recorder()
    async with (
        serve({"b": DATA}, [stall(N), status(500)]) as srv,
        open_engine(tmp_path / "root") as eng,
    ):
        await eng.fetch(f"{srv.url}/b", digest=DIGEST, dest=tmp_path / "out", on_progress=events)
    texts = events.texts()
    assert texts.count(f"Resuming from {N}") == 2  # the 500 attempt and the last one
    assert texts.index("Retrying in 5 seconds") < texts.index(f"Resuming from {N}")
    assert "Retrying in 10 seconds" in texts
    assert texts[-2:] == [Status.VERIFYING, Status.DOWNLOAD_COMPLETE]
    assert {e.id for e in events.events} == {DIGEST[7:19]}


# --------------------------------------------------------------------------- digest mismatch


def _corrupt(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


async def test_digest_mismatch_from_byte_zero_is_not_retried(tmp_path: Path) -> None:
    clock = FakeClock()
    bad = _corrupt(DATA, 12_345)
    async with serve({"b": bad}) as srv, open_engine(tmp_path / "root", clock) as eng:
        with pytest.raises(DigestMismatchError) as info:
            await eng.fetch(f"{srv.url}/b", digest=DIGEST, dest=tmp_path / "out")
        assert len(srv.requests) == 1
        (row,) = await attempt_rows(eng)
        assert (row.discard_reason, row.discarded_bytes) == ("digest-mismatch", SIZE)
    assert info.value.resumed is False
    assert clock.sleeps == []
    assert not (tmp_path / "out").exists()
    assert not any((tmp_path / "root" / "blobs" / "sha256").iterdir())


async def test_digest_mismatch_after_a_resume_retries_from_zero_then_fails_for_good(
    tmp_path: Path,
) -> None:
    bad = _corrupt(DATA, N + 5_000)  # the prefix kept before the stall is fine
    async with serve({"b": bad}, [stall(N)]) as srv, open_engine(tmp_path / "root") as eng:
        with pytest.raises(DigestMismatchError) as info:
            await eng.fetch(f"{srv.url}/b", digest=DIGEST, dest=tmp_path / "out")
        # 1: stalled at N; 2: resumed, mismatch → truncate; 3: from zero, mismatch → stop.
        assert [range_start(r.headers) for r in srv.requests] == [None, N, None]
    assert info.value.resumed is False


async def test_digest_mismatch_after_a_resume_truncates_and_retries_from_zero(
    tmp_path: Path,
) -> None:
    bad = _corrupt(DATA, N + 5_000)

    def mirror_fixed(n: int, server) -> None:
        if n == 2:
            server.blobs["b"] = DATA

    async with (
        serve({"b": bad}, [stall(N)], before=mirror_fixed) as srv,
        open_engine(tmp_path / "root") as eng,
    ):
        result = await eng.fetch(f"{srv.url}/b", digest=DIGEST, dest=tmp_path / "out")
        assert [range_start(r.headers) for r in srv.requests] == [None, N, None]
        rows = await attempt_rows(eng)
        assert (rows[1].discard_reason, rows[1].discarded_bytes) == ("digest-mismatch", SIZE)
    assert (tmp_path / "out").read_bytes() == DATA
    assert result.attempts == 3
    assert result.stats.discards.get("digest-mismatch") == SIZE


# --------------------------------------------------------------------------- a new run


async def test_a_new_run_gets_a_fresh_budget_and_keeps_the_bytes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    async with serve({"b": DATA}, [stall(N), status(500), status(500)]) as srv:
        async with open_engine(root, max_download_attempts=2) as eng:
            with pytest.raises(BudgetExhaustedError) as info:
                await eng.fetch(f"{srv.url}/b", digest=DIGEST, dest=tmp_path / "out")
        assert info.value.attempts == 2
        served_before = srv.bytes_served
        # Run 2 needs two attempts (one more 500): only a fresh budget lets it finish.
        async with open_engine(root, max_download_attempts=2) as eng:
            result = await eng.fetch(f"{srv.url}/b", digest=DIGEST, dest=tmp_path / "out")
        assert result.attempts == 2
        start = range_start(srv.requests[2].headers)
        assert start is not None and 0 < start <= N
        # Only what was not kept crossed the wire again.
        assert srv.bytes_served - served_before == SIZE - start
    assert (tmp_path / "out").read_bytes() == DATA
