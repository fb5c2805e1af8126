"""The daemon's pulls: every unfinished stored pull resumed at start, and each one that
fails for this run (budget spent, link down) run again after a back-off until it is done,
failed for good, or removed (``resumer rm``).

Each pull has its own task, so one that fails (or waits out its back-off) never holds up
another; the transfer manager's slots still bound how many blobs move at once. A new run
is a new ``pull_image`` call: a fresh attempt budget, bytes kept (DESIGN.md, "Attempt
budget"). The pulls a client asks for over the control socket run here too, so the
daemon's stop cancels them like its own and every partial gets its last checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from ..clock import Clock
from ..engine import Engine
from ..errors import ResumerError
from ..pulls import Pulls, PullState
from ..retry import fails_for_good

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """The wait before run n + 1 of a pull whose run n failed: ``first`` × 2^(n-1), at most
    ``cap`` (30 s, 60 s, 2 min … 10 min). Doubling: a link down for hours costs a few
    runs an hour, not one every 30 s; capped: a link that comes back is used within 10 min."""

    first: float = 30.0
    cap: float = 600.0

    def delay(self, failed_runs: int) -> float:
        return float(min(self.cap, self.first * 2.0 ** min(max(failed_runs - 1, 0), 60)))


class Supervisor:
    """Owns every pull task of the daemon; ``close()`` cancels them and waits."""

    def __init__(
        self, engine: Engine, *, clock: Clock | None = None, backoff: Backoff | None = None
    ) -> None:
        self.engine = engine
        self.clock = clock or engine.clock
        self.backoff = backoff or Backoff()
        self.pulls = Pulls(engine.store)
        #: pull id → the task that keeps running it until done
        self._keepers: dict[int, asyncio.Task[None]] = {}
        #: every task of this supervisor: keepers and the pulls clients asked for
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # --- tasks -----------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        """A task owned here: cancelled and awaited by ``close``."""
        if self._closed:
            coro.close()
            raise RuntimeError("supervisor closed")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        # A client's pull whose client left has no one to read its end: read it here
        # (each job logs its own failures; anything else is a bug, logged in full).
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, ResumerError):
            log.error("supervisor: %s crashed", task.get_name(), exc_info=exc)

    async def close(self, timeout: float = 30.0) -> None:
        """Cancel every pull (each partial gets its last checkpoint as the transfers end)
        and wait for them, at most ``timeout`` seconds."""
        self._closed = True
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("supervisor: %s ended with %r", task.get_name(), task.exception())
        if pending:
            # Cancelled but still running: a transfer stuck in a thread. Say so; the
            # engine's close cancels the transfers again.
            log.error("supervisor: %d pulls did not stop within %g s", len(pending), timeout)

    # --- what runs -------------------------------------------------------------------

    async def start(self) -> None:
        """Resume every unfinished stored pull, each in its own task, at once."""
        for stored in await self.pulls.unfinished():
            if stored.state is PullState.FAILED and stored.permanent:
                log.warning(
                    "supervisor: pull %d of %s failed for good (%s): not resumed;"
                    " `resumer resume` runs it again, `resumer rm %d` drops it",
                    stored.id,
                    stored.reference,
                    stored.last_error,
                    stored.id,
                )
                continue
            self._keep(stored.id, failed_runs=0)

    async def adopt_failed(self) -> None:
        """Take on the stored pulls that failed for this run and have no keeper (a
        client's pull that failed): each is run again after the back-off."""
        for stored in await self.pulls.unfinished():
            if stored.state is PullState.FAILED and not stored.permanent:
                self._keep(stored.id, failed_runs=1)

    def _keep(self, pull_id: int, *, failed_runs: int) -> None:
        keeper = self._keepers.get(pull_id)
        if keeper is not None and not keeper.done():
            return
        self._keepers[pull_id] = self.spawn(
            self._run_until_done(pull_id, failed_runs), name=f"supervisor: pull {pull_id}"
        )

    async def _run_until_done(self, pull_id: int, failed_runs: int) -> None:
        try:
            run = 0
            while True:
                if failed_runs:
                    await self._wait(pull_id, failed_runs)
                stored = await self.pulls.get(pull_id)
                if stored is None:
                    log.info("supervisor: pull %d was removed: no more runs", pull_id)
                    return
                if stored.state is PullState.DONE:
                    log.info("supervisor: pull %d of %s is done", pull_id, stored.reference)
                    return
                run += 1
                log.info("supervisor: pull %d of %s: run %d", pull_id, stored.reference, run)
                try:
                    outcome = await self.engine.run_stored(stored)
                except ResumerError as exc:
                    if fails_for_good(exc):
                        log.warning(
                            "supervisor: pull %d of %s failed for good: %s; not retried"
                            " (`resumer resume` runs it again, `resumer rm %d` drops it)",
                            pull_id,
                            stored.reference,
                            exc,
                            pull_id,
                        )
                        return
                    failed_runs += 1
                    log.warning(
                        "supervisor: pull %d of %s: run %d failed: %s",
                        pull_id,
                        stored.reference,
                        run,
                        exc,
                    )
                    continue
                except Exception:  # a bug: logged with its traceback, and run again later
                    failed_runs += 1
                    log.exception(
                        "supervisor: pull %d of %s: run %d crashed", pull_id, stored.reference, run
                    )
                    continue
                s = outcome.stats
                log.info(
                    "supervisor: pull %d of %s: done (%s), payload %d B, wire %d B",
                    pull_id,
                    stored.reference,
                    outcome.digest,
                    s.payload_bytes,
                    s.wire_bytes,
                )
                return
        finally:
            if self._keepers.get(pull_id) is asyncio.current_task():
                del self._keepers[pull_id]

    async def _wait(self, pull_id: int, failed_runs: int) -> None:
        delay = self.backoff.delay(failed_runs)
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock.time() + delay))
        log.warning(
            "supervisor: pull %d: next run at %s (in %g s, after %d failed runs)",
            pull_id,
            at,
            delay,
            failed_runs,
        )
        await self.clock.sleep(delay)

    def keeper(self, pull_id: int) -> asyncio.Task[None] | None:
        """The task that keeps ``pull_id`` going, if any (done once the pull is)."""
        return self._keepers.get(pull_id)

    def keeping(self) -> set[int]:
        """The pulls with a keeper (running or waiting out a back-off)."""
        return {pid for pid, task in self._keepers.items() if not task.done()}
