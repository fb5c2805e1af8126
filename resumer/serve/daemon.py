"""The daemon of ``resumer serve``: it holds the root, serves the mirror, and drains on
SIGTERM (the CLI cancels the run; every transfer gets its last checkpoint)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from ..config import Config
from ..engine import Engine
from ..errors import UsageError
from .mirror import MirrorSettings, mirror_app, server_options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Listen:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise UsageError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:5000")
        host = host.strip("[]") or "127.0.0.1"
        return cls(host, int(port))

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a name: it may resolve to anything


async def serve(
    root: Path,
    config: Config,
    listen: Listen,
    settings: MirrorSettings,
    *,
    on_ready: Callable[[str], None] = lambda _: None,
    on_wait: Callable[[str], None] | None = None,
) -> None:
    """Serve until cancelled (SIGTERM, SIGINT)."""
    if not listen.loopback:
        log.warning(
            "serve: listening on %s:%d, not loopback: every host that reaches it can pull",
            listen.host,
            listen.port,
        )
    async with Engine.open(root, config, on_wait=on_wait) as engine:
        runner = web.AppRunner(
            mirror_app(engine, settings), access_log=None, **server_options(settings)
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, listen.host, listen.port)
            try:
                await site.start()
            except OSError as exc:
                raise UsageError(
                    f"serve: cannot listen on {listen.host}:{listen.port}: {exc.strerror or exc}"
                ) from exc
            where = _address(runner, listen)
            log.info("serve: mirror of %s on http://%s", settings.upstream, where)
            on_ready(where)
            await asyncio.Event().wait()  # until cancelled
        finally:
            await runner.cleanup()


def _address(runner: web.AppRunner, listen: Listen) -> str:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            host = addr[0]
            return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return f"{listen.host}:{listen.port}"
