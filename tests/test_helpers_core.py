"""Small shared helpers for the response-table, attempt-budget and no-secrets tests.

Not tests themselves: a scripted server that also notes *when* (on the injected clock)
each request arrived and can change the blob between requests, a Source whose token
can be refreshed, and readers for what a root holds at rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).parent))

from badserver import BlobServer

from resumer.clock import FakeClock
from resumer.config import Config
from resumer.engine import Engine
from resumer.events import Event
from resumer.source import Endpoint
from resumer.store import AttemptRow

#: A small chunk size so that blobs of a few hundred KB span many chunks.
CHUNK = 4096
#: Small enough that a stalled attempt ends quickly; it is a timeout, not a wait.
STALL = 0.3


def make_blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_and_digest(size: int, seed: int) -> tuple[bytes, str]:
    """A test module's blob: ``size`` seeded random bytes, and their digest."""
    data = make_blob(size, seed)
    return data, sha256(data)


def config(**changes: object) -> Config:
    """The test Config: 4 KiB chunks, a short stall timeout, Docker's other defaults."""
    base: dict[str, object] = {"chunk_size": CHUNK, "stall_timeout": STALL}
    base.update(changes)
    return Config(**base)  # type: ignore[arg-type]


class ScriptedServer(BlobServer):
    """A BlobServer that notes the clock at each request and may change before one.

    ``before(n, server)`` runs before request ``n`` (0-based) is handled, so a test can
    swap the blob or its ETag between attempts.
    """

    def __init__(
        self,
        blobs: dict[str, bytes],
        *,
        clock: FakeClock | None = None,
        before: Callable[[int, ScriptedServer], None] | None = None,
        **kw: object,
    ) -> None:
        super().__init__(blobs, **kw)  # type: ignore[arg-type]
        self.clock = clock
        self.before = before
        self.times: list[float] = []
        self.seen = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        n = self.seen
        self.seen += 1
        if self.clock is not None:
            self.times.append(self.clock.now)
        if self.before is not None:
            self.before(n, self)
        return await super()._handle(request)


@contextlib.asynccontextmanager
async def serve(
    blobs: Mapping[str, bytes], script: list[object] | None = None, **kw: object
) -> AsyncIterator[ScriptedServer]:
    srv = ScriptedServer(dict(blobs), script=list(script or []), **kw)  # type: ignore[arg-type]
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


class Recorder:
    """A progress callback that keeps every event."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def texts(self) -> list[str]:
        return [e.text for e in self.events]

    def values(self, status: str) -> list[int | None]:
        return [e.value for e in self.events if e.status == status]


class TokenSource:
    """A Source with a bearer token that ``refresh_auth`` can renew ``refreshes`` times."""

    def __init__(self, url: str, *, prefix: str = "tok", refreshes: int = 1) -> None:
        self.url = url
        self.prefix = prefix
        self.token = f"{prefix}-1"
        self.left = refreshes
        self.refresh_calls = 0

    @property
    def display(self) -> str:
        return self.url.split("?", 1)[0]

    async def endpoints(self) -> list[Endpoint]:
        host = self.url.split("/")[2]
        return [Endpoint(self.url, {"Authorization": f"Bearer {self.token}"}, host)]

    async def refresh_auth(self, endpoint: Endpoint, challenge: str | None) -> bool:
        self.refresh_calls += 1
        if self.left <= 0:
            return False
        self.left -= 1
        self.token = f"{self.prefix}-{self.refresh_calls + 1}"
        return True


async def attempt_rows(engine: Engine, key: str | None = None) -> list[AttemptRow]:
    """The attempts of real requests (accounting rows for reopen discards left out)."""
    return [a for a in await engine.store.attempts(key) if a.attempt_no > 0]


def bytes_at_rest(root: Path) -> bytes:
    """Every byte of the state database, its WAL and its shared-memory index."""
    out = b""
    for p in sorted(root.glob("state.db*")):
        out += p.read_bytes()
    return out


def range_start(headers: Mapping[str, str]) -> int | None:
    """The N of ``Range: bytes=N-``; None without a Range header."""
    rng = headers.get("Range")
    if rng is None:
        return None
    assert rng.startswith("bytes=") and rng.endswith("-"), rng
    return int(rng[6:-1])


@contextlib.asynccontextmanager
async def open_engine(
    root: Path, clock: FakeClock | None = None, **changes: object
) -> AsyncIterator[Engine]:
    """An Engine on ``root`` with the test Config and a FakeClock (no real retry delays)."""
    async with Engine.open(root, config(**changes), clock=clock or FakeClock()) as engine:
        yield engine


async def run_cli_child(*args: str) -> tuple[int, str, str]:
    """``python -m resumer.cli ARGS`` as a child: (exit code, stdout, stderr), within 60 s."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "resumer.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
