"""``resumer serve`` for tests in-process (an engine the test can look into); as a child
process it is ``resumer.lab.serveproc.ResumerServe``.

Plain helpers and context managers, importable without pytest.
"""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from resumer.config import Config
from resumer.engine import Engine
from resumer.serve.mirror import MirrorSettings, mirror_app, server_options


@dataclass
class InProcess:
    engine: Engine
    url: str
    app: web.Application

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")


@contextlib.asynccontextmanager
async def mirror_in_process(
    root: Path,
    upstream: str,
    *,
    config: Config | None = None,
    settings: MirrorSettings | None = None,
    endpoint_overrides: Mapping[str, str] | None = None,
) -> AsyncIterator[InProcess]:
    """The mirror's app on an engine of ``root``, on 127.0.0.1 and a free port."""
    settings = settings or MirrorSettings(upstream=upstream)
    async with Engine.open(root, config or Config(retry_delay=0)) as engine:
        engine.endpoint_overrides.update(endpoint_overrides or {})
        app = mirror_app(engine, settings)
        runner = web.AppRunner(app, access_log=None, **server_options(settings))
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            yield InProcess(engine, f"http://{host}:{port}", app)
        finally:
            await runner.cleanup()


def http_get(
    url: str, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
