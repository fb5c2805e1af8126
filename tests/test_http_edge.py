"""http.py, the one HTTP edge: the status table row by row, Retry-After, redirects, and
the errors a request can end in. Redirects run against aiohttp servers on 127.0.0.1; only
a change of scheme on one host:port, which no test server can serve both ways, uses a
recording stand-in for the session.
"""

from __future__ import annotations

import email.utils
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ServeApp
from multidict import CIMultiDict

from resumer import http
from resumer.clock import FakeClock
from resumer.errors import (
    BrokenServerError,
    ConnectFailedError,
    ConnectionCutError,
    ForbiddenError,
    NotFoundError,
    PermanentError,
    ServerError,
    UnauthorizedError,
    UntrustedCertificateError,
)

WHERE = "https://registry.example/v2/app/manifests/v1"


# --------------------------------------------------------------------------- status → error


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [
        (200, None, None),
        (206, None, None),
        (401, UnauthorizedError, False),
        (403, ForbiddenError, False),
        (404, NotFoundError, False),
        (408, ServerError, True),
        (429, ServerError, True),
        (500, ServerError, True),
        (502, ServerError, True),
        (503, ServerError, True),
        (504, ServerError, True),
        (599, ServerError, True),
        (400, PermanentError, False),
        (410, PermanentError, False),
        (416, PermanentError, False),  # the fetcher's own rule comes first; here, unexpected
        (418, PermanentError, False),
        (201, PermanentError, False),
        (204, PermanentError, False),
        (304, PermanentError, False),
        (600, PermanentError, False),
    ],
)
def test_every_row_of_the_status_table(
    status: int, kind: type[Exception] | None, retryable: bool | None
) -> None:
    error = http.status_error(status, WHERE, {}, FakeClock())
    if kind is None:
        assert error is None
        return
    assert type(error) is kind
    assert error.retryable is retryable
    assert error.status == status
    assert str(error).startswith(f"{WHERE}: ")
    assert str(status) in str(error)


@pytest.mark.parametrize("status", sorted(http.REDIRECTS))
def test_a_redirect_without_location_is_permanent_and_says_so(status: int) -> None:
    error = http.status_error(status, WHERE, {}, FakeClock())
    assert type(error) is PermanentError
    assert "without a Location" in str(error)


def test_401_and_403_carry_every_challenge_and_the_registry_detail() -> None:
    headers: CIMultiDict[str] = CIMultiDict()
    headers.add("WWW-Authenticate", 'Basic realm="r"')
    headers.add("www-authenticate", 'Bearer realm="https://auth/token"')
    error = http.status_error(401, WHERE, headers, FakeClock(), detail=": UNAUTHORIZED x")
    assert isinstance(error, UnauthorizedError)
    assert error.challenge == 'Basic realm="r", Bearer realm="https://auth/token"'
    assert str(error) == f"{WHERE}: access denied (HTTP 401 Unauthorized): UNAUTHORIZED x"
    forbidden = http.status_error(403, WHERE, {}, FakeClock())
    assert isinstance(forbidden, ForbiddenError) and forbidden.challenge is None
    assert "access denied" in str(forbidden)
    missing = http.status_error(404, WHERE, {}, FakeClock(), detail=": MANIFEST_UNKNOWN")
    assert str(missing) == f"{WHERE}: not found (HTTP 404): MANIFEST_UNKNOWN"


def test_a_server_error_carries_retry_after() -> None:
    error = http.status_error(503, WHERE, {"Retry-After": "12"}, FakeClock())
    assert isinstance(error, ServerError) and error.retry_after == 12.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("12", 12.0),
        ("0", 0.0),
        (" 7 ", 7.0),
        (None, None),
        ("", None),
        ("soon", None),
        ("1.5", None),  # delta-seconds are whole digits
        ("-3", None),
    ],
)
def test_retry_after_takes_delta_seconds(value: str | None, seconds: float | None) -> None:
    assert http.retry_after(value, FakeClock()) == seconds


def test_retry_after_takes_an_http_date_on_the_injected_clock() -> None:
    clock = FakeClock(start=1_700_000_000.0)
    assert http.retry_after(email.utils.formatdate(clock.time() + 30, usegmt=True), clock) == 30
    assert http.retry_after(email.utils.formatdate(clock.time() - 30, usegmt=True), clock) == 0


def test_describe_redacts_every_url_in_a_message() -> None:
    exc = OSError("cannot reach https://user:pw@host:5000/v2/x?sig=s3cr3t#frag, nor s3://b/k?X=1")
    text = http.describe(exc)
    assert "https://host:5000/v2/x" in text and "s3://b/k" in text
    assert "pw" not in text and "s3cr3t" not in text and "X=1" not in text
    assert http.describe(TimeoutError()) == "TimeoutError"
    assert http.redact_url("http://u:p@h/x?q=1") == "http://h/x"


# --------------------------------------------------------------------------- redirects


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


def recorder(seen: list[tuple[str, dict[str, str]]], routes: dict[str, str]) -> web.Application:
    """An app that notes each request and redirects the paths in ``routes`` (307)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append((request.path, dict(request.headers)))
        if request.path in routes:
            raise web.HTTPTemporaryRedirect(routes[request.path])
        return web.Response(body=b"payload")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    return app


HEADERS = {"Authorization": "Bearer t", "Range": "bytes=10-", "If-Range": '"v1"'}


async def test_a_redirect_on_the_same_origin_keeps_every_header(
    serve_app: ServeApp, session: aiohttp.ClientSession
) -> None:
    seen: list[tuple[str, dict[str, str]]] = []
    base = await serve_app(recorder(seen, {"/a": "/b", "/b": "/c"}))
    resp = await http.open_get(session, f"{base}/a", HEADERS)
    resp.close()
    assert resp.status == 200 and resp.url.path == "/c"
    assert [path for path, _ in seen] == ["/a", "/b", "/c"]
    for _, headers in seen:
        assert {k: headers.get(k) for k in HEADERS} == HEADERS


async def test_a_redirect_to_another_host_drops_authorization_and_keeps_range(
    serve_app: ServeApp, session: aiohttp.ClientSession
) -> None:
    storage_seen: list[tuple[str, dict[str, str]]] = []
    storage = await serve_app(recorder(storage_seen, {"/back": ""}))
    seen: list[tuple[str, dict[str, str]]] = []
    base = await serve_app(recorder(seen, {"/blob": f"{storage}/signed?sig=s3cr3t"}))
    resp = await http.open_get(session, f"{base}/blob", HEADERS)
    resp.close()
    [(_, first)], [(_, second)] = seen, storage_seen
    assert first["Authorization"] == "Bearer t"
    assert "Authorization" not in second
    assert second["Range"] == "bytes=10-" and second["If-Range"] == '"v1"'


class _Answer:
    def __init__(self, status: int, location: str | None = None) -> None:
        self.status = status
        self.headers = {"Location": location} if location else {}

    def release(self) -> None:
        pass


class _RecordingSession:
    """Stands in for a ClientSession: answers in order, notes headers and TLS checks."""

    def __init__(self, answers: list[_Answer]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, dict[str, str], Any]] = []

    async def get(self, url: str, *, headers: dict[str, str], ssl: Any, **_: Any) -> _Answer:
        self.calls.append((url, dict(headers), ssl))
        return self.answers.pop(0)


async def test_a_redirect_to_plain_http_on_the_same_host_drops_authorization() -> None:
    fake = _RecordingSession([_Answer(302, "http://reg.example/x"), _Answer(200)])
    await http.open_get(fake, "https://reg.example/x", {"Authorization": "Bearer t"})  # type: ignore[arg-type]
    assert [("Authorization" in h) for _, h, _ in fake.calls] == [True, False]


async def test_an_unverified_certificate_is_accepted_on_the_first_host_only() -> None:
    away, back = _Answer(307, "https://storage.example/b"), _Answer(307, "https://reg.example/c")
    fake = _RecordingSession([away, back, _Answer(200)])
    await http.open_get(fake, "https://reg.example/a", {}, verify_tls=False)  # type: ignore[arg-type]
    assert [verify for _, _, verify in fake.calls] == [False, True, False]


async def test_more_than_max_redirects_is_a_broken_server(
    serve_app: ServeApp, session: aiohttp.ClientSession
) -> None:
    seen: list[tuple[str, dict[str, str]]] = []
    base = await serve_app(recorder(seen, {"/loop": "/loop"}))
    with pytest.raises(BrokenServerError, match=f"more than {http.MAX_REDIRECTS} redirects"):
        await http.open_get(session, f"{base}/loop", {})
    assert len(seen) == http.MAX_REDIRECTS + 1


async def test_a_redirect_to_another_scheme_is_permanent_and_leaks_nothing(
    serve_app: ServeApp, session: aiohttp.ClientSession
) -> None:
    seen: list[tuple[str, dict[str, str]]] = []
    base = await serve_app(recorder(seen, {"/x": "ftp://user:secret@x/y?sig=s3cr3t"}))
    with pytest.raises(PermanentError, match="unsupported scheme") as info:
        await http.open_get(session, f"{base}/x", {})
    assert "secret" not in str(info.value) and "s3cr3t" not in str(info.value)


async def test_a_redirect_to_a_malformed_url_is_a_broken_server(
    serve_app: ServeApp, session: aiohttp.ClientSession
) -> None:
    async def bad(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "http://[::1/x"})

    app = web.Application()
    app.router.add_get("/x", bad)
    base = await serve_app(app)
    with pytest.raises(BrokenServerError, match="malformed"):
        await http.open_get(session, f"{base}/x", {})


async def test_no_response_at_all_is_a_connect_failure_and_retryable(
    session: aiohttp.ClientSession,
) -> None:
    server = TestServer(web.Application(), host="127.0.0.1")
    await server.start_server()
    port = server.port
    await server.close()
    with pytest.raises(ConnectFailedError) as info:
        await http.open_get(session, f"http://u:pw@127.0.0.1:{port}/x?sig=s3cr3t", {})
    assert isinstance(info.value, ConnectionCutError) and info.value.retryable
    assert isinstance(info.value.__cause__, aiohttp.ClientError)
    assert "pw" not in str(info.value) and "s3cr3t" not in str(info.value)


# --------------------------------------------------------------------------- small bodies


async def test_get_small_refuses_a_body_over_the_limit_and_reads_the_start_of_errors(
    serve_app: ServeApp, session: aiohttp.ClientSession
) -> None:
    async def big(request: web.Request) -> web.Response:
        status = 500 if request.path == "/error" else 200
        headers = CIMultiDict([("WWW-Authenticate", "Basic a"), ("WWW-Authenticate", "Bearer b")])
        return web.Response(status=status, body=b"x" * 200_000, headers=headers)

    app = web.Application()
    app.router.add_get("/{tail:.*}", big)
    base = await serve_app(app)
    with pytest.raises(PermanentError, match="more than 1000"):
        await http.get_small(session, f"{base}/ok", {}, limit=1000)
    answer = await http.get_small(session, f"{base}/error", {}, limit=1000)
    assert answer.status == 500 and len(answer.body) == http.ERROR_BODY_LIMIT
    assert http.challenge_of(answer.headers) == "Basic a, Bearer b"


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that nothing trusts: (cert, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_an_untrusted_certificate_is_permanent_and_says_what_to_do(
    self_signed: tuple[Path, Path], session: aiohttp.ClientSession
) -> None:
    cert, key = self_signed
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runner = web.AppRunner(recorder([], {}))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    try:
        with pytest.raises(UntrustedCertificateError) as info:
            await http.open_get(session, f"https://127.0.0.1:{port}/x", {}, cert_hint="do X")
        assert "TLS certificate not trusted" in str(info.value)
        assert str(info.value).endswith("; do X") and not info.value.retryable
        resp = await http.open_get(session, f"https://127.0.0.1:{port}/x", {}, verify_tls=False)
        resp.close()
        assert resp.status == 200
    finally:
        await runner.cleanup()
