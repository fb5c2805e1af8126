"""``resumer serve`` for tests: as a child process (the CLI, port 0, the address read from
its ``Serving on ...`` line) or in-process (an engine the test can look into).

Plain helpers and context managers, importable without pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from resumer.config import Config
from resumer.engine import Engine
from resumer.serve.mirror import MirrorSettings, mirror_app, server_options

READY_TIMEOUT = 60.0


@dataclass
class ServeProcess:
    process: subprocess.Popen[str]
    url: str  # http://127.0.0.1:PORT
    log_path: Path

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode


def start_serve(
    root: Path,
    upstream: str,
    *args: str,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
) -> ServeProcess:
    """``resumer serve --listen 127.0.0.1:0`` on ``root``, ready when it says where."""
    log_path = log_path or root.with_name(root.name + ".serve.log")
    cmd = [
        sys.executable,
        "-m",
        "resumer",
        "serve",
        "--root",
        str(root),
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream,
        "-v",
        *args,
    ]
    with log_path.open("a") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=dict(env) if env is not None else None,
        )
    line: list[str] = []
    # readline blocks: a thread reads it so the deadline holds.
    reader = threading.Thread(
        target=lambda: line.append(proc.stdout.readline() if proc.stdout else "")
    )
    reader.start()
    reader.join(READY_TIMEOUT)
    text = line[0] if line else ""
    if not text.startswith("Serving on "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"resumer serve did not start ({text!r}):\n{log_path.read_text()}")
    return ServeProcess(proc, text.split()[-1].strip(), log_path)


@contextlib.contextmanager
def serving(root: Path, upstream: str, *args: str, **kw: Any) -> Iterator[ServeProcess]:
    srv = start_serve(root, upstream, *args, **kw)
    try:
        yield srv
    finally:
        srv.stop()


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


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    """Poll ``predicate`` until true (a condition, not a sleep for its own sake)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


async def async_wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def http_get(
    url: str, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
