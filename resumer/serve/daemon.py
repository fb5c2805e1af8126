"""The daemon of ``resumer serve``: it holds the root, serves the mirror and the control
socket (control.py), keeps the stored pulls going (supervisor.py), and drains on SIGTERM.

The drain, in order: stop accepting (the control socket's file goes first, so a new
``resumer pull`` waits for the lock instead of talking to a daemon that is leaving);
cancel every pull (each transfer ends with its last checkpoint, and the pull is stored
as unfinished, so the next start resumes it); let each control client have its final
line; close the HTTP side; then the engine closes its transfers, store and lock. Every
step is bounded, so the process exits 0 within ``DRAIN_TIMEOUT`` or so.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from ..clock import Clock
from ..config import Config
from ..engine import Engine
from ..errors import UsageError
from .control import ControlServer
from .mirror import MirrorSettings, mirror_app, server_options
from .supervisor import Backoff, Supervisor

log = logging.getLogger(__name__)

#: how long the pulls get to reach their last checkpoint once cancelled
DRAIN_TIMEOUT = 20.0


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
    stop: asyncio.Event | None = None,
    clock: Clock | None = None,
    backoff: Backoff | None = None,
) -> None:
    """Serve until ``stop`` is set (SIGTERM, SIGINT) or the task is cancelled; either
    way the pulls are drained and checkpointed before it returns."""
    if not listen.loopback:
        log.warning(
            "serve: listening on %s:%d, not loopback: every host that reaches it can pull",
            listen.host,
            listen.port,
        )
    async with Engine.open(root, config, on_wait=on_wait) as engine:
        supervisor = Supervisor(engine, clock=clock, backoff=backoff)
        control = ControlServer(engine, supervisor)
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
            await control.start()
            await supervisor.start()
            where = _address(runner, listen)
            log.info("serve: mirror of %s on http://%s", settings.upstream, where)
            on_ready(where)
            await (stop or asyncio.Event()).wait()
            log.info("serve: stopping: draining the pulls")
        finally:
            await _drain(control, supervisor, runner)
    log.info("serve: stopped")


async def _drain(control: ControlServer, supervisor: Supervisor, runner: web.AppRunner) -> None:
    # Shielded: a second signal (or the cancel that started the drain) must not leave a
    # pull task or a connection behind; each step has its own bound.
    async def steps() -> None:
        control.stop_accepting()
        await supervisor.close(timeout=DRAIN_TIMEOUT)
        await control.close(timeout=DRAIN_TIMEOUT / 4)
        await runner.cleanup()

    drain = asyncio.ensure_future(steps())
    try:
        await asyncio.shield(drain)
    except asyncio.CancelledError:
        await drain  # finish it, then let the cancel go on
        raise


def _address(runner: web.AppRunner, listen: Listen) -> str:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            host = addr[0]
            return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return f"{listen.host}:{listen.port}"
