"""No task, thread or transfer outlives its owner (DESIGN.md, "No task or future outlives
its loop"), on the paths where one used to:

- a partial's recorder task after ``close()`` failed (a write error);
- a partial's threads when reopening it failed;
- a partial opened by a transfer whose discard record then failed;
- transfers still running when their engine closes.

Each of these left a task suspended in ``Queue.get()`` (or a thread, or a live transfer on a
closed store): in a daemon a leak, and at interpreter exit a segfault on CPython < 3.11.8.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from badserver import BlobServer, stall

from resumer.clock import FakeClock
from resumer.config import Config
from resumer.engine import Engine
from resumer.errors import ResumerError, StoreError

KiB = 1024
CS = 16 * KiB


def _config() -> Config:
    return Config(chunk_size=CS, checkpoint_bytes=4 * CS, retry_delay=0)


def _others() -> list[asyncio.Task[object]]:
    """Pending tasks but ours and the test server's (one per connection it serves)."""
    me = asyncio.current_task()
    return [
        t
        for t in asyncio.all_tasks()
        if t is not me
        and not t.done()
        and not t.get_coro().__qualname__.startswith("RequestHandler.")  # type: ignore[union-attr]
    ]


async def _threads_left(names: set[str], deadline: float = 10.0) -> set[str]:
    """Those of the threads ``names`` still alive after at most ``deadline`` s."""
    end = time.monotonic() + deadline
    while True:
        alive = {t.name for t in threading.enumerate()} & names
        if not alive or time.monotonic() > end:
            return alive
        await asyncio.sleep(0.01)  # polling: a thread's exit has no event to wait on


async def test_close_after_a_write_error_ends_the_recorder(tmp_path: Path) -> None:
    async with Engine.open(tmp_path / "root", _config(), clock=FakeClock()) as engine:
        partial, _ = await engine.ingest.open("sha256:" + "0" * 64, digest=None, size=None)
        recorder = partial._recorder
        assert recorder is not None and not recorder.done()
        # The disk goes away under the partial: its next write fails.
        os.close(partial._fd)
        partial._fd = os.open(os.devnull, os.O_RDONLY)
        await partial.write(b"x" * CS)
        with pytest.raises(StoreError):
            await partial.close()
        assert recorder.done()
        assert partial not in engine.ingest.open_partials
        assert _others() == []


async def test_a_failed_reopen_leaves_no_thread(tmp_path: Path) -> None:
    async with Engine.open(tmp_path / "root", _config(), clock=FakeClock()) as engine:
        key = "sha256:" + "1" * 64
        # A directory where the partial should be: verifying it fails.
        engine.ingest.partial_path(key).mkdir(parents=True)
        before = {t.ident for t in threading.enumerate()}
        # The error is kept (as a task's result keeps it), and with it the partial's frames:
        # its threads must end all the same, not when the garbage collector gets to it.
        with pytest.raises(ResumerError) as failed:
            await engine.ingest.open(key, digest=key, size=None)
        assert not engine.ingest.open_partials
        started = {
            t.name
            for t in threading.enumerate()
            if t.ident not in before and t.name.startswith("resumer-")
        }
        assert started, "the partial's writer thread verified the file"
        assert await _threads_left(started) == set(), failed.value
        assert _others() == []


async def test_a_failed_discard_record_closes_the_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(8 * CS)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    root = tmp_path / "root"
    async with BlobServer({"blob": data}) as srv:
        srv.script = [stall(3 * CS + 100)]
        cfg = Config(chunk_size=CS, checkpoint_bytes=CS, max_download_attempts=1, stall_timeout=0.2)
        async with Engine.open(root, cfg) as engine:
            with pytest.raises(ResumerError):
                await engine.fetch(f"{srv.url}/blob", digest=digest)
        # Corrupt the partial's first chunk, so reopening it discards bytes.
        partial_file = next((root / "ingest").glob("sha256-*"))
        fd = os.open(partial_file, os.O_WRONLY)
        os.pwrite(fd, b"\0" * 16, 0)
        os.close(fd)

        async def broken(*args: object) -> None:
            raise StoreError("database is gone")

        async with Engine.open(root, _config(), clock=FakeClock()) as engine:
            monkeypatch.setattr(engine.store, "record_discard", broken)
            with pytest.raises(StoreError, match="database is gone"):
                await engine.fetch(f"{srv.url}/blob", digest=digest)
            assert not engine.ingest.open_partials
            assert _others() == []


async def test_closing_the_engine_ends_its_running_transfers(tmp_path: Path) -> None:
    data = os.urandom(8 * CS)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with BlobServer({"blob": data}) as srv:
        srv.script = [stall(2 * CS)]  # the transfer hangs mid-body until cancelled
        started = asyncio.Event()
        async with Engine.open(tmp_path / "root", _config(), clock=FakeClock()) as engine:
            engine.ingest.observer = lambda key, offset: started.set()
            fetching = asyncio.create_task(engine.fetch(f"{srv.url}/blob", digest=digest))
            async with asyncio.timeout(30):
                await started.wait()
        # The engine closed under the running fetch: it was cancelled, its partial kept.
        await asyncio.wait([fetching], timeout=10)
        assert fetching.done()
        with pytest.raises(asyncio.CancelledError):
            fetching.result()
        assert _others() == []
        assert next((tmp_path / "root" / "ingest").glob("sha256-*")).stat().st_size > 0


async def test_a_reopen_cancelled_after_its_recorder_started_ends_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation landing in the first segment's opening (the recorder already runs):
    the recorder ends with the half-open partial instead of waiting on its queue for good
    (found by the suite's leak guard when a daemon test cancelled a transfer there)."""
    from resumer.content.partial import Partial

    async def cancelled(self: Partial, *args: object) -> None:
        raise asyncio.CancelledError

    async with Engine.open(tmp_path / "root", _config(), clock=FakeClock()) as engine:
        monkeypatch.setattr(Partial, "_new_segment", cancelled)
        with pytest.raises(asyncio.CancelledError):
            await engine.ingest.open("sha256:" + "2" * 64, digest=None, size=None)
        assert not engine.ingest.open_partials
        assert [t.get_name() for t in _others()] == []
