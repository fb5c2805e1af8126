"""DESIGN.md's HTTP Range response table, row by row, against servers the tests start.

Misbehaviour comes from the scripted BlobServer (a real aiohttp server on 127.0.0.1);
the happy path and a resume also run against nginx and the real CNCF registry. Every
retry delay goes through a FakeClock: nothing here sleeps for a retry. A stalled attempt
ends on a 0.3 s stall timeout, which is the behaviour under test, not a wait.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
from pathlib import Path

import aiohttp
import pytest
from badserver import Behaviour, cut, stall, status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_helpers_core import (
    CHUNK,
    TokenSource,
    attempt_rows,
    blob_and_digest,
    make_blob,
    open_engine,
    range_start,
    run_cli_child,
    serve,
    sha256,
)

from resumer.clock import FakeClock
from resumer.errors import AccessDeniedError, NotFoundError
from resumer.lab.proxy import FaultProxy, Faults
from resumer.source import UrlSource
from resumer.store import Store
from resumer.transfer import BlobRequest

SIZE = 300_000
DATA, DIGEST = blob_and_digest(SIZE, seed=2)
N = 100_000  # where a first attempt is interrupted

#: Docker's one-stream table (plain GET first, one request per attempt): K = 1. K > 1 has
#: its own tests in test_segments.py, and its properties in test_crash_properties.py.
ONE_STREAM: dict[str, object] = {"max_connections_per_blob": 1}


async def fetch_ok(engine, srv, dest: Path, *, name: str = "b", **kw):
    result = await engine.fetch(f"{srv.url}/{name}", digest=srv.digest(name), dest=dest, **kw)
    assert dest.read_bytes() == srv.blobs[name]
    assert result.digest == srv.digest(name)
    return result


# --------------------------------------------------------------------------- 206


async def test_resumed_request_sends_range_and_identity_then_appends(tmp_path: Path) -> None:
    async with (
        serve({"b": DATA}, [cut(N)]) as srv,
        open_engine(tmp_path / "root", **ONE_STREAM) as eng,
    ):
        result = await fetch_ok(eng, srv, tmp_path / "out")
        first, second = srv.requests
        assert first.headers.get("Accept-Encoding") == "identity"
        assert "Range" not in first.headers
        assert second.headers.get("Range") == f"bytes={N}-"
        assert second.headers.get("Accept-Encoding") == "identity"
        assert second.status == 206
        # Not one byte twice: the server sent exactly the blob.
        assert srv.bytes_served == SIZE
        rows = await attempt_rows(eng)
        assert [(r.http_status, r.start_offset, r.end_offset) for r in rows] == [
            (200, 0, N),
            (206, N, SIZE),
        ]
        assert result.stats.resumes == 1 and result.stats.wasted_bytes == 0


@pytest.mark.parametrize(
    "interrupt",
    [
        pytest.param(cut, id="reset"),
        pytest.param(stall, id="stall"),
    ],
)
async def test_interrupted_body_is_transient_and_resumes_from_the_bytes_received(
    tmp_path: Path, interrupt
) -> None:
    async with serve({"b": DATA}, [interrupt(N)]) as srv, open_engine(tmp_path / "root") as eng:
        result = await fetch_ok(eng, srv, tmp_path / "out")
        first = (await attempt_rows(eng))[0]
        assert first.error
        assert (first.wire_bytes, first.kept_bytes, first.end_offset) == (N, N, N)
        assert range_start(srv.requests[1].headers) == N
        assert srv.bytes_served == SIZE
        assert result.stats.wire_bytes == SIZE and result.stats.wasted_bytes == 0


async def test_below_the_low_speed_limit_is_a_stall_and_resumes(tmp_path: Path) -> None:
    # No stall timeout at all: only the low-speed rule can end the silent attempt.
    async with (
        serve({"b": DATA}, [stall(N)]) as srv,
        open_engine(
            tmp_path / "root", stall_timeout=0, low_speed_limit=1000, low_speed_time=0.3
        ) as eng,
    ):
        async with asyncio.timeout(20):
            await fetch_ok(eng, srv, tmp_path / "out")
        first = (await attempt_rows(eng))[0]
        assert "too slow" in (first.error or "")
        assert range_start(srv.requests[1].headers) == N


def _run_cuts(offsets: list[int], root: Path) -> tuple[list[int | None], list[int], bytes]:
    async def go() -> tuple[list[int | None], list[int], bytes]:
        async with (
            serve({"b": DATA}, [cut(o) for o in offsets]) as srv,
            open_engine(root, max_download_attempts=len(offsets) + 1, **ONE_STREAM) as eng,
        ):
            await eng.fetch(f"{srv.url}/b", digest=DIGEST, dest=root / "out")
            rows = await attempt_rows(eng)
            starts = [range_start(r.headers) for r in srv.requests]
            ends = [r.end_offset or 0 for r in rows]
            return starts, ends, (root / "out").read_bytes()

    return asyncio.run(go())


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(1, SIZE - 1), min_size=1, max_size=3))
def test_any_cuts_give_the_exact_blob_and_each_retry_asks_from_the_recorded_offset(
    tmp_path_factory: pytest.TempPathFactory, offsets: list[int]
) -> None:
    root = tmp_path_factory.mktemp("cuts")
    starts, ends, out = _run_cuts(offsets, root)
    assert out == DATA
    # Whatever the client kept, it asks for exactly the rest: never a gap, never a re-read.
    for start, prev_end in zip(starts[1:], ends, strict=False):
        assert (start or 0) == prev_end


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, SIZE - 1))
def test_any_cut_resumes_exactly_where_the_server_stopped(
    tmp_path_factory: pytest.TempPathFactory, offset: int
) -> None:
    starts, _, out = _run_cuts([offset], tmp_path_factory.mktemp("cut"))
    assert out == DATA
    assert starts == [None, offset]


async def test_wrong_content_range_fails_the_attempt_and_writes_nothing(tmp_path: Path) -> None:
    script = [stall(N), Behaviour("wrong-range")]
    async with serve({"b": DATA}, script) as srv, open_engine(tmp_path / "root") as eng:
        result = await fetch_ok(eng, srv, tmp_path / "out")
        bad, good = (await attempt_rows(eng))[1:]
        assert bad.http_status == 206
        assert "Content-Range" in (bad.error or "")
        assert (bad.start_offset, bad.end_offset, bad.kept_bytes) == (N, N, 0)
        # The retry asks for the same offset again: nothing of the bad answer was appended.
        assert range_start(srv.requests[2].headers) == N
        assert (good.http_status, good.error) == (206, None)
        assert result.attempts == 3


# --------------------------------------------------------------------------- 200


async def test_range_ignored_discards_prefix_as_waste(tmp_path: Path) -> None:
    script = [stall(N), Behaviour("ignore-range")]
    async with serve({"b": DATA}, script) as srv, open_engine(tmp_path / "root") as eng:
        result = await fetch_ok(eng, srv, tmp_path / "out")
        assert srv.requests[1].headers.get("Range") == f"bytes={N}-"
        assert srv.requests[1].status == 200
        row = (await attempt_rows(eng))[1]
        assert row.http_status == 200
        assert row.discard_reason == "range-ignored"
        assert row.discarded_bytes == N
        assert row.kept_bytes == SIZE - N
        assert row.wire_bytes == SIZE
        assert result.stats.wasted_bytes == N
        assert result.stats.discards == {"range-ignored": N}
        assert result.stats.wire_bytes == N + SIZE
        assert len(srv.requests) == 2


# --------------------------------------------------------------------------- 416


async def _complete_partial(root: Path, data: bytes, *, size: int | None) -> None:
    """Leave a partial holding every byte, as a run killed right before commit does."""
    async with open_engine(root) as eng:
        partial, _ = await eng.ingest.open(sha256(data), digest=sha256(data), size=size)
        await partial.write(data)
        await partial.close()


async def test_a_partial_without_holes_commits_without_a_request(tmp_path: Path) -> None:
    """Its size known, a partial whose chunks are all here needs nothing from the server."""
    root = tmp_path / "root"
    await _complete_partial(root, DATA, size=SIZE)
    async with serve({"b": DATA}) as srv, open_engine(root) as eng:
        result = await fetch_ok(eng, srv, tmp_path / "out")
        assert srv.requests == [] and srv.bytes_served == 0
        (row,) = await attempt_rows(eng)
        assert (row.http_status, row.error, row.wire_bytes) == (None, None, 0)
        assert result.stats.wire_bytes == 0 and result.attempts == 1


@pytest.mark.parametrize("kind", ["honest", "short-416"])
@pytest.mark.parametrize("connections", [1, 4])  # 4: the segmented path must agree
async def test_416_at_the_expected_size_commits_without_downloading(
    tmp_path: Path, kind: str, connections: int
) -> None:
    """Its size not known, a whole partial asks from its end; a 416 there says complete."""
    root = tmp_path / "root"
    await _complete_partial(root, DATA, size=None)
    async with (
        serve({"b": DATA}, [Behaviour(kind)]) as srv,
        open_engine(root, max_connections_per_blob=connections) as eng,
    ):
        # short-416: a Content-Length the body never fills; reading it would hang.
        async with asyncio.timeout(10):
            result = await fetch_ok(eng, srv, tmp_path / "out")
        assert [(r.status, r.headers.get("Range")) for r in srv.requests] == [
            (416, f"bytes={SIZE}-")
        ]
        assert srv.bytes_served == 0
        (row,) = await attempt_rows(eng)
        assert (row.http_status, row.error, row.wire_bytes) == (416, None, 0)
        assert result.stats.wire_bytes == 0 and result.attempts == 1


async def test_416_below_the_server_size_discards_the_partial_and_restarts(
    tmp_path: Path,
) -> None:
    script = [stall(N), status(416)]
    async with serve({"b": DATA}, script) as srv, open_engine(tmp_path / "root") as eng:
        result = await fetch_ok(eng, srv, tmp_path / "out")
        assert range_start(srv.requests[1].headers) == N
        assert range_start(srv.requests[2].headers) is None  # from byte zero
        rows = await attempt_rows(eng)
        assert rows[1].http_status == 416
        assert rows[1].discard_reason == "partial-discarded"
        assert rows[1].discarded_bytes == N
        assert rows[2].start_offset == 0
        assert result.stats.wasted_bytes == N


# --------------------------------------------------------------------------- 401/403/404


async def _fetch_with(eng, source):
    return await eng.transfers.fetch(BlobRequest(DIGEST, source, digest=DIGEST))


async def test_401_refreshes_the_token_once_and_is_not_counted_as_an_attempt(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    async with (
        serve({"b": DATA}, [status(401)]) as srv,
        open_engine(tmp_path / "root", clock, max_download_attempts=1) as eng,
    ):
        source = TokenSource(f"{srv.url}/b")
        result = await _fetch_with(eng, source)
        assert result.path.read_bytes() == DATA
        assert source.refresh_calls == 1
        assert [r.headers.get("Authorization") for r in srv.requests] == [
            "Bearer tok-1",
            "Bearer tok-2",
        ]
        # With a budget of one attempt, the download still ran: the 401 cost none.
        assert result.attempts == 1
        assert clock.sleeps == []


@pytest.mark.parametrize(
    "script",
    [
        pytest.param([status(401), status(401)], id="401-again-after-a-refresh"),
        pytest.param([status(403)] * 4, id="403-that-persists-after-one-refresh"),
    ],
)
async def test_refused_again_after_one_refresh_is_permanent_access_denied_without_retry(
    tmp_path: Path, script: list[Behaviour]
) -> None:
    clock = FakeClock()
    async with (
        serve({"b": DATA}, script) as srv,
        open_engine(tmp_path / "root", clock) as eng,
    ):
        source = TokenSource(f"{srv.url}/b", refreshes=5)
        with pytest.raises(AccessDeniedError):
            await _fetch_with(eng, source)
        assert len(srv.requests) == 2
        assert source.refresh_calls == 1
        assert clock.sleeps == []


async def test_401_with_nothing_to_refresh_is_access_denied_at_once(tmp_path: Path) -> None:
    async with serve({"b": DATA}, [status(401)]) as srv, open_engine(tmp_path / "root") as eng:
        with pytest.raises(AccessDeniedError):
            await eng.fetch(f"{srv.url}/b", digest=DIGEST, dest=tmp_path / "out")
        assert len(srv.requests) == 1
        assert not (tmp_path / "out").exists()


async def test_404_is_not_found_after_exactly_one_request(tmp_path: Path) -> None:
    clock = FakeClock()
    async with serve({"b": DATA}) as srv, open_engine(tmp_path / "root", clock) as eng:
        with pytest.raises(NotFoundError):
            await eng.fetch(f"{srv.url}/missing", digest=DIGEST, dest=tmp_path / "out")
        assert len(srv.requests) == 1
        assert clock.sleeps == []
        (row,) = await attempt_rows(eng)
        assert row.http_status == 404


# --------------------------------------------------------------------------- 408/429/5xx


@pytest.mark.parametrize("code", [408, 429, 500, 502, 503])
async def test_transient_status_is_retried_after_the_linear_delay(
    tmp_path: Path, code: int
) -> None:
    clock = FakeClock()
    async with (
        serve({"b": DATA}, [status(code)], clock=clock) as srv,
        open_engine(tmp_path / "root", clock, **ONE_STREAM) as eng,
    ):
        result = await fetch_ok(eng, srv, tmp_path / "out")
        assert [r.status for r in srv.requests] == [code, 200]
        assert srv.times[1] - srv.times[0] == 5.0
        assert result.attempts == 2
        assert [r.http_status for r in await attempt_rows(eng)] == [code, 200]


@pytest.mark.parametrize(
    ("retry_after", "waited"),
    [("12", 12.0), ("2", 5.0), ("5", 5.0), ("0", 5.0), ("soon", 5.0)],
)
async def test_retry_after_is_honoured_only_when_longer_than_the_delay(
    tmp_path: Path, retry_after: str, waited: float
) -> None:
    clock = FakeClock()
    async with (
        serve({"b": DATA}, [status(503, retry_after)], clock=clock) as srv,
        open_engine(tmp_path / "root", clock) as eng,
    ):
        await fetch_ok(eng, srv, tmp_path / "out")
        assert srv.times[1] - srv.times[0] == waited
        assert sum(clock.sleeps) == waited


async def test_retry_after_as_an_http_date_is_honoured(tmp_path: Path) -> None:
    clock = FakeClock(start=1_700_000_000.0)
    when = email.utils.formatdate(clock.time() + 30, usegmt=True)
    async with (
        serve({"b": DATA}, [status(429, when)], clock=clock) as srv,
        open_engine(tmp_path / "root", clock) as eng,
    ):
        await fetch_ok(eng, srv, tmp_path / "out")
        assert srv.times[1] - srv.times[0] == 30.0


# --------------------------------------------------------------------------- overlong


async def test_overlong_body_from_byte_zero_stops_at_the_expected_size(tmp_path: Path) -> None:
    script = [Behaviour("overlong", extra=b"EXTRA")]
    async with serve({"b": DATA}, script) as srv, open_engine(tmp_path / "root") as eng:
        req = BlobRequest(DIGEST, UrlSource(f"{srv.url}/b"), digest=DIGEST, size=SIZE)
        result = await eng.transfers.fetch(req)
        assert result.path.read_bytes() == DATA
        first, second = await attempt_rows(eng)
        assert first.error and "longer" in first.error
        assert (first.kept_bytes, first.discarded_bytes, first.discard_reason) == (
            SIZE,
            5,
            "overlong-body",
        )
        # The next attempt finds the partial without holes: it commits with no request.
        assert len(srv.requests) == 1
        assert (second.http_status, second.error, second.wire_bytes) == (None, None, 0)
        assert result.stats.discards == {"overlong-body": 5}


async def test_overlong_body_on_a_resume_stops_at_the_expected_size(tmp_path: Path) -> None:
    script = [stall(N), Behaviour("overlong", extra=b"0123456789")]
    async with serve({"b": DATA}, script) as srv, open_engine(tmp_path / "root") as eng:
        result = await fetch_ok(eng, srv, tmp_path / "out")
        rows = await attempt_rows(eng)
        assert rows[1].discard_reason == "overlong-body"
        assert rows[1].discarded_bytes == 10
        assert rows[1].end_offset == SIZE
        assert (rows[2].http_status, rows[2].wire_bytes) == (None, 0)  # no hole: no request
        assert result.stats.wasted_bytes == 10


# --------------------------------------------------------------------------- redirects


async def test_redirect_keeps_range_and_drops_authorization_on_another_host(
    tmp_path: Path,
) -> None:
    async with serve({"b": DATA}, [stall(N)]) as storage, serve({"b": DATA}) as origin:
        signed = f"{storage.url}/b?X-Amz-Signature=SECRET"
        origin.script = [Behaviour("redirect", location=signed)] * 2
        async with open_engine(tmp_path / "root", **ONE_STREAM) as eng:
            await eng.fetch(
                f"{origin.url}/b",
                digest=DIGEST,
                dest=tmp_path / "out",
                headers={"Authorization": "Bearer TOKEN"},
            )
        assert (tmp_path / "out").read_bytes() == DATA
        # Resolved again for every attempt, each time with the registry's credentials.
        assert [r.headers.get("Authorization") for r in origin.requests] == ["Bearer TOKEN"] * 2
        # Another port is another host: the storage never sees the token.
        assert [r.headers.get("Authorization") for r in storage.requests] == [None, None]
        assert [range_start(r.headers) for r in storage.requests] == [None, N]
        assert range_start(origin.requests[1].headers) == N


async def test_redirect_on_the_same_host_keeps_authorization(tmp_path: Path) -> None:
    async with serve({"b": DATA, "mirror/b": DATA}) as srv:
        srv.script = [Behaviour("redirect", location=f"{srv.url}/mirror/b?sig=1")]
        async with open_engine(tmp_path / "root") as eng:
            await eng.fetch(
                f"{srv.url}/b",
                digest=DIGEST,
                dest=tmp_path / "out",
                headers={"Authorization": "Bearer TOKEN"},
            )
        assert [(r.path, r.headers.get("Authorization")) for r in srv.requests] == [
            ("b", "Bearer TOKEN"),
            ("mirror/b", "Bearer TOKEN"),
        ]


async def test_redirected_url_is_not_recorded_in_the_attempts(tmp_path: Path) -> None:
    async with serve({"b": DATA}, [status(500)]) as storage, serve({"b": DATA}) as origin:
        origin.script = [Behaviour("redirect", location=f"{storage.url}/b?X-Amz-Signature=SECRET")]
        async with open_engine(tmp_path / "root") as eng:
            await eng.fetch(f"{origin.url}/b", digest=DIGEST, dest=tmp_path / "out")
            rows = await attempt_rows(eng)
        assert rows[0].http_status == 500
        assert "500" in (rows[0].error or "")
        for row in rows:
            assert "SECRET" not in repr(row) and "Signature" not in repr(row)


# --------------------------------------------------------------------------- fetch without digest


def _cli_args(url: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fetch",
        url,
        "-o",
        str(tmp_path / "out"),
        "--root",
        str(tmp_path / "root"),
        "--stall-timeout",
        "0.3",
        "--retry-delay",
        "0",
        "--chunk-size",
        str(CHUNK),
        "--progress",
        "plain",
        *extra,
    ]


async def _attempts_at_rest(root: Path):
    store = await Store.open(root / "state.db")
    try:
        return await store.attempts()
    finally:
        await store.close()


async def test_fetch_without_digest_resumes_with_if_range_and_prints_the_digest(
    tmp_path: Path,
) -> None:
    async with serve({"b": DATA}, [stall(N)]) as srv:
        code, out, err = await run_cli_child(*_cli_args(f"{srv.url}/b", tmp_path))
        assert code == 0, err
        assert (tmp_path / "out").read_bytes() == DATA
        assert f"Digest: {DIGEST}" in out
        second = srv.requests[1]
        assert second.headers.get("Range") == f"bytes={N}-"
        assert second.headers.get("If-Range") == '"v1"'
        assert second.status == 206
        assert srv.bytes_served == SIZE


async def test_fetch_without_digest_resumes_in_a_new_run(tmp_path: Path) -> None:
    async with serve({"b": DATA}, [stall(N)]) as srv:
        url = f"{srv.url}/b"
        code, _, _ = await run_cli_child(*_cli_args(url, tmp_path, "--max-download-attempts", "1"))
        assert code == 1
        assert not (tmp_path / "out").exists()
        code, out, err = await run_cli_child(*_cli_args(url, tmp_path))
        assert code == 0, err
        assert f"Digest: {DIGEST}" in out
        # Keyed by the URL: the second run continued the first run's partial.
        start = range_start(srv.requests[1].headers)
        assert start is not None and 0 < start <= N
        assert srv.requests[1].headers.get("If-Range") == '"v1"'
        assert srv.bytes_served == SIZE + (N - start)


def _change_at(request_no: int, new: bytes):
    def before(n: int, server) -> None:
        if n == request_no:
            server.blobs["b"] = new
            server.etag = '"v2"'

    return before


@pytest.mark.parametrize(
    "new_size",
    [SIZE, SIZE + 50_000, SIZE - 50_000],
)
async def test_fetch_without_digest_restarts_from_zero_when_the_etag_changes(
    tmp_path: Path, new_size: int
) -> None:
    new = make_blob(new_size, seed=99)
    async with serve({"b": DATA}, [stall(N)], before=_change_at(1, new)) as srv:
        code, out, err = await run_cli_child(*_cli_args(f"{srv.url}/b", tmp_path))
        assert code == 0, err
        assert (tmp_path / "out").read_bytes() == new
        assert f"Digest: {sha256(new)}" in out
        second = srv.requests[1]
        assert second.headers.get("If-Range") == '"v1"'
        assert second.status == 200  # If-Range failed: the whole new object
        rows = [r for r in await _attempts_at_rest(tmp_path / "root") if r.attempt_no]
        assert rows[1].start_offset == N
        assert rows[1].discard_reason == "partial-discarded"
        assert rows[1].discarded_bytes == N


# --------------------------------------------------------------------------- real servers


async def test_nginx_happy_path(nginx, tmp_path: Path) -> None:
    (nginx.docroot / "blob").write_bytes(DATA)
    async with open_engine(tmp_path / "root", **ONE_STREAM) as eng:
        result = await eng.fetch(f"{nginx.url}/blob", digest=DIGEST, dest=tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == DATA
        assert result.attempts == 1 and result.stats.wire_bytes == SIZE
        (row,) = await attempt_rows(eng)
        assert row.http_status == 200


async def _resume_through_stalling_proxy(
    host: str, port: int, path: str, root: Path, digest: str, data: bytes
) -> tuple[list, FaultProxy]:
    # The proxy stops forwarding after 40 000 bytes of the first connection (headers
    # included) and keeps the socket open: the stall timeout ends the attempt.
    async with (
        FaultProxy(host, port, Faults(stall_at=(40_000,))) as proxy,
        open_engine(root, **ONE_STREAM) as eng,
    ):
        await eng.fetch(
            f"http://127.0.0.1:{proxy.port}{path}", digest=digest, dest=root.parent / "out"
        )
        rows = await attempt_rows(eng)
    assert (root.parent / "out").read_bytes() == data
    return rows, proxy


async def test_nginx_resume_after_a_stall(nginx, tmp_path: Path) -> None:
    (nginx.docroot / "blob").write_bytes(DATA)
    rows, proxy = await _resume_through_stalling_proxy(
        "127.0.0.1", nginx.port, "/blob", tmp_path / "root", DIGEST, DATA
    )
    assert [r.http_status for r in rows] == [200, 206]
    assert 30_000 < rows[1].start_offset < 40_000
    assert rows[0].end_offset == rows[1].start_offset
    # Headers aside, the blob crossed the wire once.
    assert SIZE <= proxy.counters.bytes_down < SIZE + 2_000


async def test_nginx_range_started_partial(nginx, tmp_path: Path) -> None:
    (nginx.docroot / "blob").write_bytes(DATA)
    root = tmp_path / "root"
    async with open_engine(root) as eng:
        partial, _ = await eng.ingest.open(DIGEST, digest=DIGEST, size=SIZE)
        await partial.write(DATA[: 20 * CHUNK])
        await partial.close()
    async with open_engine(root) as eng:
        result = await eng.fetch(f"{nginx.url}/blob", digest=DIGEST, dest=tmp_path / "out")
        (row,) = await attempt_rows(eng)
    assert (tmp_path / "out").read_bytes() == DATA
    assert (row.http_status, row.start_offset) == (206, 20 * CHUNK)
    assert result.stats.wire_bytes == SIZE - 20 * CHUNK


async def _push_blob(base: str, repo: str, data: bytes) -> str:
    digest = sha256(data)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v2/{repo}/blobs/uploads/") as r:
            assert r.status == 202, await r.text()
            location = r.headers["Location"]
        if location.startswith("/"):
            location = base + location
        sep = "&" if "?" in location else "?"
        async with session.put(
            f"{location}{sep}digest={digest}",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        ) as r:
            assert r.status == 201, await r.text()
    return digest


async def test_registry_happy_path(registry, tmp_path: Path) -> None:
    digest = await _push_blob(registry.url, "lab/blob", DATA)
    async with open_engine(tmp_path / "root", **ONE_STREAM) as eng:
        result = await eng.fetch(
            f"{registry.url}/v2/lab/blob/blobs/{digest}", digest=digest, dest=tmp_path / "out"
        )
        (row,) = await attempt_rows(eng)
    assert (tmp_path / "out").read_bytes() == DATA
    assert result.stats.wire_bytes == SIZE
    assert row.http_status == 200


async def test_registry_resume_after_a_stall(registry, tmp_path: Path) -> None:
    digest = await _push_blob(registry.url, "lab/blob", DATA)
    rows, proxy = await _resume_through_stalling_proxy(
        "127.0.0.1", registry.port, f"/v2/lab/blob/blobs/{digest}", tmp_path / "root", digest, DATA
    )
    assert [r.http_status for r in rows] == [200, 206]
    assert rows[1].start_offset > 30_000
    assert SIZE <= proxy.counters.bytes_down < SIZE + 4_000


async def test_registry_416_at_the_end_of_the_blob_means_complete(registry, tmp_path: Path) -> None:
    digest = await _push_blob(registry.url, "lab/blob", DATA)
    root = tmp_path / "root"
    await _complete_partial(root, DATA, size=None)  # else no request is needed
    async with open_engine(root) as eng:
        # The registry answers 416 with a body shorter than its Content-Length.
        async with asyncio.timeout(10):
            result = await eng.fetch(
                f"{registry.url}/v2/lab/blob/blobs/{digest}", digest=digest, dest=tmp_path / "out"
            )
        (row,) = await attempt_rows(eng)
    assert (tmp_path / "out").read_bytes() == DATA
    assert (row.http_status, row.error, row.wire_bytes) == (416, None, 0)
    assert result.attempts == 1
    assert hashlib.sha256((tmp_path / "out").read_bytes()).hexdigest() == digest[7:]
