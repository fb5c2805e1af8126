"""A tiny offline HTTP server for the demo: serves files from one directory with Range."""

from __future__ import annotations

import socket
from pathlib import Path

from aiohttp import web


class StaticServer:
    """aiohttp's FileResponse honours Range and sends an ETag, like nginx."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = ""
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_static("/", self.root)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        self.url = f"http://127.0.0.1:{self.port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
