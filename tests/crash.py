"""Simulated process death for in-process property tests.

The engine runs in its own thread and event loop. A "kill" stops that loop dead: no
``finally`` block, no last checkpoint, nothing awaited again. Then we do what the kernel
does for a dead process: worker threads finish the syscalls they are in, file
descriptors close (dropping the root flock), the database connection goes away. Page
cache contents survive, as they do after SIGKILL.

A dead process's loop and coroutines are kept, untouched, until the test ends
(``GRAVEYARD``). Then ``dispose_graveyard`` (called by the autouse guard in conftest.py)
unwinds them as ``asyncio.run`` does at its end, while the interpreter is fully alive:
left to the garbage collector at interpreter exit, a coroutine suspended in
``Queue.get()`` takes a Future's repr after ``_asyncio`` has cleared its globals, and
CPython 3.11 before 3.11.8 segfaults there (gh-113566; DESIGN.md, "No task or future
outlives its loop").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resumer.clock import FakeClock
from resumer.config import Config
from resumer.engine import Engine, FetchResult

#: Seconds a dead process's tasks get to unwind at disposal (they fail fast: their
#: files, database and lock are gone). More means something is stuck: disposal says so.
DISPOSE_TIMEOUT = 30.0


@dataclass
class Grave:
    """A dead process: its stopped loop (with every task it had) and its engine."""

    loop: asyncio.AbstractEventLoop
    engine: Engine | None
    #: what the dead tasks reported while they were unwound (their exception handler)
    last_words: list[dict[str, Any]] = field(default_factory=list)


# Abandoned loops and coroutines are kept alive until the test ends: if they were
# collected during the test, Python would close the coroutines and run their finally
# blocks, which a dead process never does.
GRAVEYARD: list[Grave] = []


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
        # A live process ends when Engine.open returns: nothing of it may still run.
        leftover = [repr(t) for t in asyncio.all_tasks(loop) if not t.done()]
        _close_loop(loop)
        assert not leftover, f"tasks outlived Engine.open: {leftover}"
    return outcome


async def _until(task: asyncio.Task[None], outcome: RunOutcome, loop: Any) -> None:
    with contextlib.suppress(BaseException):
        await task


def _bury(loop: asyncio.AbstractEventLoop, engine: Engine | None) -> None:
    GRAVEYARD.append(Grave(loop, engine))
    if engine is None:
        return
    for partial in list(engine.ingest.open_partials):
        # The batch being written completes (a syscall in progress does); queued ones die.
        partial._writer_pool.shutdown(wait=True, cancel_futures=True)
        partial._hash_pool.shutdown(wait=True, cancel_futures=True)
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


def _close_conn(conn: Any) -> Callable[[], Any]:
    def close() -> Any:
        if conn._connection is not None:
            conn._connection.close()
            conn._connection = None
        from aiosqlite.core import _STOP_RUNNING_SENTINEL

        return _STOP_RUNNING_SENTINEL

    return close


# --- disposal, after the test -------------------------------------------------------------


def dispose_graveyard() -> list[str]:
    """Unwind and close every dead process's loop; return what could not be unwound.

    Call it once the test is over: the dead coroutines' ``finally`` blocks run now (their
    files, database and lock are gone, so they fail fast and change nothing on disk that
    a test still looks at). Runs in a thread of its own, as the engine did, so that a
    running loop in the caller's thread is no obstacle.
    """
    graves = GRAVEYARD[:]
    GRAVEYARD.clear()
    problems: list[str] = []
    if not graves:
        return problems

    def work() -> None:
        for grave in graves:
            try:
                problems.extend(_dispose(grave))
            except BaseException as exc:  # report it; never leave the other loops behind
                problems.append(f"disposing a dead loop failed: {exc!r}")

    t = threading.Thread(target=work, name="crash-dispose")
    t.start()
    t.join()
    return problems


def _dispose(grave: Grave) -> list[str]:
    loop = grave.loop
    # What the dead tasks say while unwinding is noise (closed database, closed files):
    # keep it with the grave instead of logging it as the live engine's errors.
    loop.set_exception_handler(lambda _loop, ctx: grave.last_words.append(ctx))
    stuck = _unwind(loop, DISPOSE_TIMEOUT)
    problems = [f"a dead process's task did not unwind: {t!r}" for t in stuck]
    if grave.engine is not None:
        for partial in list(grave.engine.ingest.open_partials):
            # A partial whose close never ran: its threads end here, not at exit.
            for pool in (partial._writer_pool, partial._hash_pool, partial._sync_pool):
                pool.shutdown(wait=True, cancel_futures=True)
    if not stuck:
        _close_loop(loop)
    return problems


def _unwind(loop: asyncio.AbstractEventLoop, timeout: float) -> list[asyncio.Task[Any]]:
    """Cancel every task of ``loop`` (and those their cancellation starts) and run the loop
    until they are done, as ``asyncio.run`` does at its end. Returns the tasks still
    pending after ``timeout`` seconds."""
    deadline = loop.time() + timeout
    while True:
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        if not tasks:
            return []
        remaining = deadline - loop.time()
        if remaining <= 0:
            return tasks
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.wait(tasks, timeout=remaining))
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a dead process's last error is nobody's


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Close ``loop`` as ``asyncio.run`` does: no task, async generator or executor
    thread left behind."""
    try:
        if _unwind(loop, DISPOSE_TIMEOUT):
            raise RuntimeError("tasks still pending on a loop being closed")
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()
