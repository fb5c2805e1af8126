"""Docker's attempt budget and retry delays (DESIGN.md), with an injected clock.

``max-download-attempts`` N is the total number of attempts per blob in one run; after
failed attempt n that kept no byte the wait is n × retry-delay, shown as a countdown, and
after one that kept bytes the next attempt starts at once. A new run starts a
fresh budget but keeps the bytes. Every delay below is recorded by a FakeClock and
checked on the server side too: the clock reading when each request arrived.
"""

from __future__ import annotations

import email.utils
import itertools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from badserver import stall, status
from conftest import PushImage, ServeApp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_helpers_core import (
    Recorder,
    attempt_rows,
    blob_and_digest,
    open_engine,
    range_start,
    serve,
)
from tokenserver import FakeRegistry, digest_of, make_image

from resumer import cli
from resumer.clock import FakeClock
from resumer.config import Config
from resumer.engine import Engine
from resumer.errors import (
    AccessDeniedError,
    BudgetExhaustedError,
    ConfigError,
    ConnectionCutError,
    DigestMismatchError,
    NotFoundError,
    ServerError,
)
from resumer.events import Status
from resumer.lab.proxy import FaultProxy, Faults
from resumer.retry import LinearDelay

SIZE = 200_000
DATA, DIGEST = blob_and_digest(SIZE, seed=3)
N = 80_000
FAILURES = [500, 503, 429, 408, 502, 504]

#: Docker's one-stream table (plain GET first, one request per attempt): K = 1. K > 1 has
#: its own tests in test_segments.py, and its properties in test_crash_properties.py.
ONE_STREAM: dict[str, object] = {"max_connections_per_blob": 1}


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


# --------------------------------------------------------------------------- success at 1, 2, N


@pytest.mark.parametrize("failures", [0, 1, 4], ids=["attempt-1", "attempt-2", "attempt-N"])
async def test_success_within_the_budget(tmp_path: Path, failures: int) -> None:
    clock = FakeClock()
    script = [status(FAILURES[i]) for i in range(failures)]
    async with (
        serve({"b": DATA}, script, clock=clock) as srv,
        open_engine(tmp_path / "root", clock, max_download_attempts=5, **ONE_STREAM) as eng,
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
        open_engine(tmp_path / "root", max_download_attempts=2, **ONE_STREAM) as eng,
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
    first, second = (i for i, t in enumerate(texts) if t == f"Resuming from {N}")
    # Attempt 1 kept N bytes before its stall: attempt 2 resumes at once, no countdown.
    assert not any(str(t).startswith("Retrying in") for t in texts[:first])
    # Attempt 2 (the 500) kept nothing: 2 × 5 s, counted down, then the last attempt.
    countdown = [t for t in texts[first:second] if str(t).startswith("Retrying in")]
    assert countdown == [f"Retrying in {s} second{'s' if s != 1 else ''}" for s in range(10, 0, -1)]
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
    async with (
        serve({"b": bad}, [stall(N)]) as srv,
        open_engine(tmp_path / "root", **ONE_STREAM) as eng,
    ):
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
        open_engine(tmp_path / "root", **ONE_STREAM) as eng,
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


# =========================================================================== the registry
#
# The same rows for the registry client's own requests, which run under the same attempt
# policy: a manifest GET, the token request a manifest GET needs, and the token request a
# blob's endpoints need. Each kind scripts its failures on a FakeRegistry (a real aiohttp
# server: the 5xx sequences are the misbehaviour a real registry will not show on demand)
# and notes when, on the FakeClock, each scripted request arrived. The real CNCF registry
# comes last, behind a proxy that drops connections.

KINDS = ["manifest", "token", "blob-token"]


class TimedRegistry(FakeRegistry):
    """A FakeRegistry that notes the clock at each manifest and token request, and can
    answer token requests with scripted statuses first (``token_failures``)."""

    def __init__(self, clock: FakeClock, **kw: Any) -> None:
        super().__init__(**kw)
        self.clock = clock
        self.times: dict[str, list[float]] = {"manifest": [], "token": []}
        self.token_failures: list[tuple[int, dict[str, str]]] = []

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        self.times["manifest"].append(self.clock.now)
        return await super()._manifest(request)

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.times["token"].append(self.clock.now)
        if self.token_failures:
            code, headers = self.token_failures.pop(0)
            return web.Response(status=code, headers=headers)
        return await super()._token(request)


@dataclass
class Row:
    """One kind of registry request, ready to fail as a row asks."""

    fake: TimedRegistry
    kind: str
    #: the request, through the engine's registry client
    request: Callable[[], Awaitable[object]]
    #: what BudgetExhaustedError names
    what: str

    def fail(self, script: list[tuple[int, dict[str, str]]]) -> None:
        if self.kind == "manifest":
            self.fake.failures["/v2/app/manifests/v1"] = script
        else:
            self.fake.token_failures = script

    @property
    def times(self) -> list[float]:
        """When each request of this kind arrived, from the row's start."""
        return self.fake.times["manifest" if self.kind == "manifest" else "token"]


MakeRow = Callable[[str, Engine], Awaitable[Row]]


@pytest.fixture
def make_row(serve_app: ServeApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MakeRow:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))  # no credentials from the host

    async def make(kind: str, eng: Engine) -> Row:
        assert isinstance(eng.clock, FakeClock)
        fake = TimedRegistry(eng.clock, auth=None if kind == "manifest" else "bearer")
        fake.base_url = await serve_app(fake.app)
        host = fake.base_url.removeprefix("http://")
        image = make_image()
        fake.put_image("app", "v1", image)
        client = eng.registry()
        ref = f"{host}/app:v1"
        if kind != "blob-token":
            return Row(fake, kind, lambda: client.resolve(ref), f"manifest {ref}")
        # The blob's endpoints need a token of their own: the challenge is known from
        # resolving, and the token has expired since.
        await client.resolve(ref)
        client._tokens.clear()
        fake.times["token"].clear()
        source = client.blob_source(ref, digest_of(image.layers[0]))
        return Row(
            fake,
            kind,
            source.endpoints,
            f"token for repository:app:pull from {fake.base_url}/token",
        )

    return make


def statuses(codes: list[int], retry_after: str | None = None) -> list[tuple[int, dict[str, str]]]:
    return [(c, {"Retry-After": retry_after} if retry_after else {}) for c in codes]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("failures", [0, 1, 4], ids=["attempt-1", "attempt-2", "attempt-N"])
async def test_registry_success_within_the_budget(
    tmp_path: Path, make_row: MakeRow, kind: str, failures: int
) -> None:
    clock = FakeClock()
    async with open_engine(tmp_path / "root", clock, max_download_attempts=5) as eng:
        row = await make_row(kind, eng)
        row.fail(statuses(FAILURES[:failures]))
        await row.request()
    assert len(row.times) == failures + 1
    assert sum(clock.sleeps) == sum(LinearDelay(5.0)(n) for n in range(1, failures + 1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("budget", [1, 2, 5])
async def test_registry_failure_after_exactly_n_attempts_names_what_n_and_last_cause(
    tmp_path: Path, make_row: MakeRow, kind: str, budget: int
) -> None:
    clock = FakeClock()
    async with open_engine(tmp_path / "root", clock, max_download_attempts=budget) as eng:
        row = await make_row(kind, eng)
        # The last failure differs, and the server would answer afterwards: only the
        # budget stops the run.
        row.fail(statuses([500] * (budget - 1) + [503]))
        with pytest.raises(BudgetExhaustedError) as info:
            await row.request()
    assert len(row.times) == budget
    err = info.value
    assert err.blob == row.what and err.attempts == budget
    assert isinstance(err.last, ServerError) and err.last.status == 503
    text = str(err)
    assert row.what in text and f"{budget} attempt" in text and "503" in text
    # Waits only between attempts: none after the last one.
    assert sum(clock.sleeps) == sum(LinearDelay(5.0)(n) for n in range(1, budget))


@pytest.mark.parametrize("kind", KINDS)
async def test_registry_budget_of_one_means_no_retry(
    tmp_path: Path, make_row: MakeRow, kind: str
) -> None:
    clock = FakeClock()
    async with open_engine(tmp_path / "root", clock, max_download_attempts=1) as eng:
        row = await make_row(kind, eng)
        row.fail(statuses([503]))
        with pytest.raises(BudgetExhaustedError) as info:
            await row.request()
    assert info.value.attempts == 1 and len(row.times) == 1
    assert clock.sleeps == []


@pytest.mark.parametrize("kind", KINDS)
async def test_registry_delay_sequence_is_5_10_15_seconds(
    tmp_path: Path, make_row: MakeRow, kind: str
) -> None:
    clock = FakeClock()
    async with open_engine(tmp_path / "root", clock) as eng:
        row = await make_row(kind, eng)
        row.fail(statuses([500] * 3))
        await row.request()
    assert gaps(row.times) == [5.0, 10.0, 15.0]
    assert clock.sleeps == [5.0, 10.0, 15.0]  # no countdown to show: one sleep per wait


# make_row's servers and environment may outlive one example: they serve the next too.
@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.sampled_from(KINDS), st.sampled_from([0.5, 1.0, 2.0, 3.0, 7.5]), st.integers(1, 3))
async def test_registry_custom_retry_delay_is_the_step_of_the_linear_delay(
    tmp_path_factory: pytest.TempPathFactory,
    make_row: MakeRow,
    kind: str,
    step: float,
    failures: int,
) -> None:
    clock = FakeClock()
    async with open_engine(tmp_path_factory.mktemp("delay"), clock, retry_delay=step) as eng:
        row = await make_row(kind, eng)
        row.fail(statuses([500] * failures))
        await row.request()
    assert gaps(row.times) == [n * step for n in range(1, failures + 1)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("retry_after", "waited"),
    [("12", 12.0), ("2", 5.0), ("5", 5.0), ("0", 5.0), ("soon", 5.0), ("date", 30.0)],
)
async def test_registry_retry_after_is_honoured_only_when_longer_than_the_delay(
    tmp_path: Path, make_row: MakeRow, kind: str, retry_after: str, waited: float
) -> None:
    clock = FakeClock(start=1_700_000_000.0)
    if retry_after == "date":
        retry_after = email.utils.formatdate(clock.time() + 30, usegmt=True)
    async with open_engine(tmp_path / "root", clock) as eng:
        row = await make_row(kind, eng)
        row.fail(statuses([503], retry_after))
        await row.request()
    assert gaps(row.times) == [waited]


async def test_registry_a_token_refresh_is_not_an_attempt(
    tmp_path: Path, make_row: MakeRow
) -> None:
    clock = FakeClock()
    async with open_engine(tmp_path / "root", clock, max_download_attempts=2) as eng:
        row = await make_row("token", eng)
        # 401 (refresh: not an attempt), 503 (attempt 1), 200 (attempt 2): within two.
        challenge = row.fake._challenge("app")
        row.fake.failures["/v2/app/manifests/v1"] = [
            (401, {"WWW-Authenticate": challenge}),
            (503, {}),
        ]
        await row.request()
        # The token expires: one more 401 and a refresh, and the budget still holds.
        row.fake.revoke_tokens()
        await row.request()
    manifest_gets = [r for r in row.fake.requests if r.path == "/v2/app/manifests/v1"]
    assert [r.headers.get("Authorization") for r in manifest_gets] == [
        None,
        "Bearer secret-token-1",
        "Bearer secret-token-1",
        "Bearer secret-token-1",
        "Bearer secret-token-2",
    ]
    assert clock.sleeps == [5.0]  # after attempt 1: the refused request was not counted


async def test_registry_refused_again_after_one_refresh_is_access_denied_without_retry(
    tmp_path: Path, make_row: MakeRow
) -> None:
    clock = FakeClock()
    async with open_engine(tmp_path / "root", clock) as eng:
        row = await make_row("token", eng)
        row.fake.valid_tokens = _NeverValid()  # issued, never accepted
        with pytest.raises(AccessDeniedError, match="after a token refresh"):
            await row.request()
    assert len(row.fake.times["manifest"]) == 2 and row.fake.issued == 1
    assert clock.sleeps == []


class _NeverValid(set[str]):
    def add(self, _: str) -> None:
        pass


async def test_registry_unknown_manifest_is_not_retried(tmp_path: Path, make_row: MakeRow) -> None:
    clock = FakeClock()
    async with open_engine(tmp_path / "root", clock) as eng:
        row = await make_row("manifest", eng)
        row.fake.manifests.clear()
        with pytest.raises(NotFoundError):
            await row.request()
    assert len(row.times) == 1 and clock.sleeps == []


# --------------------------------------------------------------------------- the real registry
#
# aiohttp reconnects once by itself when an idempotent request's connection fails before
# the response (ClientSession._retry_connection, aiohttp >= 3.10): an attempt would then
# cost one or two connections. These rows count connections, so they turn that off, as
# aiohttp's own test client does.


def _one_connection_per_attempt(eng: Engine) -> None:
    eng.session._retry_connection = False  # type: ignore[attr-defined]


@pytest.mark.parametrize("drops", [1, 4], ids=["attempt-2", "attempt-N"])
async def test_real_registry_manifest_survives_dropped_connections_within_the_budget(
    tmp_path: Path, pushed_image: PushImage, drops: int
) -> None:
    pushed = pushed_image(repo="library/app", tag="v1")
    clock = FakeClock()
    # Each of the first connections is reset as soon as it is accepted: no response at all.
    faults = Faults(cut_at=(0,) * drops)
    async with (
        FaultProxy("127.0.0.1", pushed.registry.port, faults, seed=1) as proxy,
        open_engine(tmp_path / "root", clock, max_download_attempts=5) as eng,
    ):
        eng.endpoint_overrides["docker.io"] = f"http://127.0.0.1:{proxy.port}"
        _one_connection_per_attempt(eng)
        resolved = await eng.registry().resolve("app:v1")
        assert proxy.counters.cuts == drops
    assert resolved.manifest_digest == pushed.image.manifest_digest
    assert clock.sleeps == [LinearDelay(5.0)(n) for n in range(1, drops + 1)]


async def test_real_registry_manifest_gives_up_after_exactly_n_dropped_connections(
    tmp_path: Path, pushed_image: PushImage
) -> None:
    pushed = pushed_image(repo="library/app", tag="v1")
    clock = FakeClock()
    async with (
        FaultProxy("127.0.0.1", pushed.registry.port, Faults(cut_at=(0, 0, 0)), seed=1) as proxy,
        open_engine(tmp_path / "root", clock, max_download_attempts=2) as eng,
    ):
        eng.endpoint_overrides["docker.io"] = f"http://127.0.0.1:{proxy.port}"
        _one_connection_per_attempt(eng)
        with pytest.raises(BudgetExhaustedError) as info:
            await eng.registry().resolve("app:v1")
        assert proxy.counters.cuts == 2
    err = info.value
    assert err.blob == "manifest docker.io/library/app:v1" and err.attempts == 2
    assert isinstance(err.last, ConnectionCutError)
    assert clock.sleeps == [5.0]
