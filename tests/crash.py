"""Simulated process death for in-process property tests.

The engine runs in its own thread and event loop. A "kill" stops that loop dead: no
``finally`` block, no last checkpoint, nothing awaited again. Then we do what the kernel
does for a dead process: worker threads finish the syscalls they are in, file
descriptors close (dropping the root flock), the database connection goes away. Page
cache contents survive, as they do after SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resumer.clock import FakeClock
from resumer.config import Config
from resumer.engine import Engine, FetchResult

# Abandoned loops and coroutines are kept alive: if they were collected, Python would
# close the coroutines and run their finally blocks, which a dead process never does.
GRAVEYARD: list[Any] = []


@dataclass
class RunOutcome:
    result: FetchResult | None = None
    error: BaseException | None = None
    killed: bool = False
    #: the partial's offset when the process died: what had arrived and been accepted
    killed_at: int = 0


def run_fetch(
    root: Path,
    url: str,
    digest: str,
    config: Config,
    *,
    kill_at: int | None = None,
    dest: Path | None = None,
) -> RunOutcome:
    """Run one ``Engine.fetch`` in a thread; die when the partial's offset reaches kill_at."""
    outcome = RunOutcome()
    loop = asyncio.new_event_loop()
    box: dict[str, Any] = {}

    async def main() -> None:
        async with Engine.open(root, config, clock=FakeClock()) as engine:
            box["engine"] = engine
            if kill_at is not None:

                def observer(key: str, offset: int) -> None:
                    if offset >= kill_at and not outcome.killed:
                        outcome.killed = True
                        outcome.killed_at = offset
                        loop.stop()

                engine.ingest.observer = observer
            outcome.result = await engine.fetch(url, digest=digest, dest=dest)

    def thread() -> None:
        task = loop.create_task(main())
        box["task"] = task
        with contextlib.suppress(RuntimeError):  # "loop stopped before Future completed"
            loop.run_until_complete(_until(task, outcome, loop))

    t = threading.Thread(target=thread)
    t.start()
    t.join()
    task = box["task"]
    if outcome.killed and not task.done():
        _bury(loop, box.get("engine"))
    else:
        outcome.killed = False
        if task.exception() is not None:
            outcome.error = task.exception()
        loop.close()
    return outcome


async def _until(task: asyncio.Task[None], outcome: RunOutcome, loop: Any) -> None:
    with contextlib.suppress(BaseException):
        await task


def _bury(loop: asyncio.AbstractEventLoop, engine: Engine | None) -> None:
    GRAVEYARD.append(loop)
    GRAVEYARD.extend(asyncio.all_tasks(loop))
    if engine is None:
        return
    for partial in list(engine.ingest.open_partials):
        # The batch being written completes (a syscall in progress does); queued ones die.
        partial._writer_pool.shutdown(wait=True, cancel_futures=True)
        partial._sync_pool.shutdown(wait=True)
        if partial._fd >= 0:
            os.close(partial._fd)
            partial._fd = -1
    if engine.lock is not None:
        engine.lock.release()
    conn = engine.store._conn
    conn._running = False
    # Closing the sqlite connection is what process exit does; pending queued statements
    # that never ran are lost, as they would be.
    conn._tx.put_nowait((None, _close_conn(conn)))
    conn._thread.join(timeout=10)
    GRAVEYARD.append(engine)


def _close_conn(conn: Any) -> Callable[[], Any]:
    def close() -> Any:
        if conn._connection is not None:
            conn._connection.close()
            conn._connection = None
        from aiosqlite.core import _STOP_RUNNING_SENTINEL

        return _STOP_RUNNING_SENTINEL

    return close
