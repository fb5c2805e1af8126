"""One resumer process per root: an flock on ``ROOT/lock``.

A second process waits (saying so once) or, with a timeout, fails with a clear message.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from .errors import RootLockedError


class RootLock:
    def __init__(self, root: Path) -> None:
        self.path = root / "lock"
        self._fd = -1

    def _try(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def holder(self) -> str:
        with contextlib.suppress(OSError):
            pid = self.path.read_text().strip()
            if pid:
                return f"pid {pid}"
        return "another process"

    async def acquire(
        self, *, timeout: float | None = None, on_wait: Callable[[str], None] | None = None
    ) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not self._try():
            who = self.holder()
            if timeout == 0:
                self._close()
                raise RootLockedError(f"{self.path.parent}: in use by {who}")
            if on_wait is not None:
                on_wait(f"waiting for {who}, which is using {self.path.parent}")
            try:
                await asyncio.wait_for(
                    asyncio.to_thread(fcntl.flock, self._fd, fcntl.LOCK_EX), timeout
                )
            except TimeoutError as exc:
                self._close()
                raise RootLockedError(
                    f"{self.path.parent}: still in use by {who} after {timeout:g} s"
                ) from exc
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1
