"""Manifest and token requests have a stall watchdog too: a registry that accepts the
connection and then sends nothing (before its headers, or in the middle of its body)
fails the attempt as a stall, within the one attempt policy, instead of hanging the pull
of an unattended gateway for good."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from resumer import http
from resumer.clock import FakeClock
from resumer.config import Config
from resumer.errors import BudgetExhaustedError, StallError
from resumer.registry import RegistryClient

STALL = 0.3  # a timeout, not a wait: each stall ends after this much real time


@pytest.fixture
async def stalling() -> AsyncIterator[tuple[str, list[str]]]:
    """A server whose /headers never answers and whose /body stops after 10 bytes."""
    release = asyncio.Event()
    seen: list[str] = []

    async def headers(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        await release.wait()
        return web.Response()

    async def body(request: web.Request) -> web.StreamResponse:
        seen.append(request.path)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b'{"schemaV')
        await release.wait()
        return resp

    app = web.Application()
    app.router.add_get("/headers", headers)
    app.router.add_get("/body", body)
    app.router.add_get("/v2/{tail:.*}", body)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}", seen
    finally:
        release.set()
        await runner.cleanup()


@pytest.mark.parametrize("path", ["/headers", "/body"])
async def test_a_small_request_that_stalls_is_a_stall_error(
    stalling: tuple[str, list[str]], path: str
) -> None:
    host, _ = stalling
    async with aiohttp.ClientSession() as session:
        with pytest.raises(StallError, match=r"stalled: no data for 0\.3 s"):
            async with asyncio.timeout(10):  # the guard of this test, not the watchdog
                await http.get_small(
                    session, f"http://{host}{path}", {}, limit=1 << 20, stall_timeout=STALL
                )


async def test_a_stalling_registry_spends_the_budget_instead_of_hanging(
    stalling: tuple[str, list[str]], tmp_path: Path
) -> None:
    host, seen = stalling
    clock = FakeClock()
    config = Config(stall_timeout=STALL, max_download_attempts=2, insecure_registries=(host,))
    async with aiohttp.ClientSession() as session:
        client = RegistryClient(session, config, clock=clock, docker_config_dir=tmp_path)
        with pytest.raises(BudgetExhaustedError) as info:
            async with asyncio.timeout(30):
                await client.resolve(f"{host}/lab/app:v1")
    assert isinstance(info.value.last, StallError)
    assert info.value.attempts == 2
    assert len([p for p in seen if p.startswith("/v2/lab/app/manifests/")]) == 2
    assert sum(clock.sleeps) == 5.0  # Docker's delay after attempt 1, on the injected clock
