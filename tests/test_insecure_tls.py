"""Insecure registries as dockerd treats them: HTTPS without verification, else plain HTTP.

A registry is insecure when ``--insecure-registry`` / ``insecure-registries`` lists it or
it is on loopback. Its first request probes ``https://HOST/v2/`` without certificate
verification: a TLS answer keeps HTTPS (unverified, on that host:port only), a server that
does not speak TLS means plain HTTP, remembered for the client's lifetime. A registry that
is not insecure is HTTPS with verification, and a bad certificate is a clear error.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import RegistryFactory, ServeApp
from servers import SKOPEO_BIN, Registry, require, skopeo_copy
from test_pull_real import assert_readable, pull_cli

from resumer.config import Config
from resumer.errors import (
    BudgetExhaustedError,
    ConnectionCutError,
    UntrustedCertificateError,
)
from resumer.fetch import _open
from resumer.http import open_get
from resumer.lab.images import LayerSpec, build_image, write_oci_layout
from resumer.registry import RegistryClient, parse_reference
from resumer.registry.client import _CERT_HINT

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

DIGEST = "sha256:" + "c" * 64
ServeTls = Callable[[web.Application], Awaitable[int]]


def _self_signed(where: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that nothing trusts."""
    where.mkdir(parents=True, exist_ok=True)
    cert, key = where / "cert.pem", where / "key.pem"
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


def _tls_registry(factory: RegistryFactory, where: Path) -> Registry:
    cert, key = _self_signed(where)
    return factory(extra_config={"http": {"tls": {"certificate": str(cert), "key": str(key)}}})


def _push(registry: Registry, work: Path, repo: str = "lab/app", tag: str = "v1") -> str:
    require(SKOPEO_BIN)
    image = build_image(
        work / "build", (LayerSpec(size=300_000), LayerSpec(compression="zstd")), seed=7
    )
    layout = write_oci_layout(work / "layout", image, tag)
    skopeo_copy(
        f"oci:{layout}:{tag}",
        f"docker://{registry.host}/{repo}:{tag}",
        "--preserve-digests",
        "--dest-tls-verify=false",
    )
    return tag


# ---- the CLI against the real registry over HTTPS -------------------------------------------


def test_loopback_registry_over_https_with_a_self_signed_certificate_is_pulled(
    registry_factory: RegistryFactory, tmp_path: Path
) -> None:
    registry = _tls_registry(registry_factory, tmp_path / "tls")
    tag = _push(registry, tmp_path / "image")
    reference = f"{registry.host}/lab/app:{tag}"
    dest = tmp_path / "dest"
    run = pull_cli(reference, tmp_path / "root", tmp_path, dest=dest)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    (tmp_path / "scratch").mkdir()
    assert_readable(dest, tag, reference, tmp_path / "scratch")


# ---- the client, offline --------------------------------------------------------------------


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


@pytest.fixture
def make_client(session: aiohttp.ClientSession, tmp_path: Path) -> Callable[..., RegistryClient]:
    def make(config: Config | None = None) -> RegistryClient:
        return RegistryClient(
            session, config or Config(retry_delay=0), docker_config_dir=tmp_path / "none"
        )

    return make


@pytest.fixture
async def serve_tls(tmp_path: Path) -> AsyncIterator[ServeTls]:
    """``await serve_tls(app) -> port``: the app over HTTPS with an untrusted certificate."""
    cert, key = _self_signed(tmp_path / "tls-app")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> int:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        runners.append(runner)
        server = site._server
        assert isinstance(server, asyncio.Server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for runner in runners:
        await runner.cleanup()


def _v2_app(hits: list[str]) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=200 if request.path == "/v2/" else 404)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    return app


def test_insecure_is_listed_or_loopback(make_client: Callable[..., RegistryClient]) -> None:
    client = make_client(Config(insecure_registries=("reg.lan:5000", "10.0.0.0/8")))
    assert client.is_insecure("reg.lan:5000")
    assert not client.is_insecure("reg.lan:5001")
    assert client.is_insecure("10.1.2.3:443")
    assert client.is_insecure("127.0.0.1:5000")
    assert client.is_insecure("localhost")
    assert client.is_insecure("[::1]:5000")
    assert not client.is_insecure("example.com")
    assert not client.is_insecure("192.0.2.7:5000")
    # Verification is skipped only for HTTPS to an insecure host.
    assert not client.verify_tls("https://reg.lan:5000/v2/")
    assert client.verify_tls("https://reg.lan:5001/v2/")
    assert client.verify_tls("https://example.com/v2/")
    assert client.verify_tls("http://reg.lan:5000/v2/")


async def test_secure_registry_endpoints_are_https_and_verified_without_a_probe(
    make_client: Callable[..., RegistryClient],
) -> None:
    source = make_client().blob_source("quay.io/org/app:v1", DIGEST)
    [endpoint] = await source.endpoints()  # offline: a probe would fail here
    assert endpoint.url == f"https://quay.io/v2/org/app/blobs/{DIGEST}"
    assert endpoint.verify_tls


async def test_an_insecure_registry_speaking_tls_is_https_unverified(
    make_client: Callable[..., RegistryClient], serve_tls: ServeTls
) -> None:
    hits: list[str] = []
    port = await serve_tls(_v2_app(hits))
    client = make_client()
    source = client.blob_source(f"127.0.0.1:{port}/lab/app:v1", DIGEST)
    [endpoint] = await source.endpoints()
    assert endpoint.url == f"https://127.0.0.1:{port}/v2/lab/app/blobs/{DIGEST}"
    assert not endpoint.verify_tls
    await source.endpoints()
    assert hits == ["/v2/"]  # probed once, remembered
    assert client.origin_url(parse_reference(f"127.0.0.1:{port}/x")).startswith("https://")


async def test_an_insecure_registry_speaking_plain_http_is_http(
    make_client: Callable[..., RegistryClient], serve_app: ServeApp
) -> None:
    hits: list[str] = []
    base = await serve_app(_v2_app(hits))
    host = base.removeprefix("http://")
    source = make_client().blob_source(f"{host}/lab/app:v1", DIGEST)
    [endpoint] = await source.endpoints()
    assert endpoint.url == f"http://{host}/v2/lab/app/blobs/{DIGEST}"
    assert endpoint.verify_tls
    assert hits == []  # the failed handshake decided it; no plain-HTTP request was spent


async def test_a_server_that_hangs_up_on_tls_is_plain_http(
    make_client: Callable[..., RegistryClient],
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        [endpoint] = await make_client().blob_source(f"127.0.0.1:{port}/a:b", DIGEST).endpoints()
    finally:
        server.close()
        await server.wait_closed()
    assert endpoint.url.startswith(f"http://127.0.0.1:{port}/")


async def test_a_refused_probe_decides_nothing(
    make_client: Callable[..., RegistryClient],
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    client = make_client(Config(retry_delay=0))
    # One attempt policy for manifests too: the budget is spent, the last cause a cut.
    with pytest.raises(BudgetExhaustedError) as info:
        await client.resolve(f"127.0.0.1:{port}/lab/app:v1")
    assert isinstance(info.value.last, ConnectionCutError)
    # The blob source still hands out an endpoint (HTTPS, unverified) and probes again later.
    [endpoint] = await client.blob_source(f"127.0.0.1:{port}/a:b", DIGEST).endpoints()
    assert endpoint.url.startswith(f"https://127.0.0.1:{port}/")
    assert not endpoint.verify_tls


async def test_an_untrusted_certificate_is_a_permanent_error_that_says_what_to_do(
    session: aiohttp.ClientSession, serve_tls: ServeTls
) -> None:
    port = await serve_tls(_v2_app([]))
    url = f"https://127.0.0.1:{port}/v2/"
    # Verified, as for a registry that is not insecure; the registry's own hint.
    with pytest.raises(UntrustedCertificateError) as info:
        await open_get(session, url, {}, cert_hint=_CERT_HINT)
    error = info.value
    assert not error.retryable
    assert "certificate" in str(error).lower()
    assert "--insecure-registry" in str(error)


async def test_fetch_skips_verification_only_on_the_registry_host(
    session: aiohttp.ClientSession, serve_tls: ServeTls
) -> None:
    async def blob(request: web.Request) -> web.Response:
        return web.Response(body=b"payload")

    storage = web.Application()
    storage.router.add_get("/blob", blob)
    storage_port = await serve_tls(storage)

    async def redirect(request: web.Request) -> web.Response:
        if request.path == "/here":
            return web.Response(body=b"payload")
        raise web.HTTPTemporaryRedirect(f"https://127.0.0.1:{storage_port}/blob")

    registry = web.Application()
    registry.router.add_get("/{tail:.*}", redirect)
    registry_port = await serve_tls(registry)

    resp = await _open(session, f"https://127.0.0.1:{registry_port}/here", {}, verify_tls=False)
    assert resp.status == 200
    resp.close()
    # The redirect leaves the registry's host:port: the storage host is verified (and an
    # untrusted certificate is permanent: another attempt meets the same one).
    with pytest.raises(UntrustedCertificateError, match=r"(?i)certificate"):
        await _open(session, f"https://127.0.0.1:{registry_port}/away", {}, verify_tls=False)
    # And a verified endpoint is verified on its own host.
    with pytest.raises(UntrustedCertificateError, match=r"(?i)certificate"):
        await _open(session, f"https://127.0.0.1:{registry_port}/here", {}, verify_tls=True)
