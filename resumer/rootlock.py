"""One resumer process per root: an flock on ``ROOT/lock``.

A second process waits (saying so once) or, with a timeout, fails with a clear message.

The wait polls ``LOCK_NB`` with an async sleep, never a blocking ``flock`` in a thread:
such a thread cannot be cancelled, so Ctrl-C or SIGTERM would hang until the other
process let go, and an abandoned thread could take the lock after we gave up and hold
it for as long as the process lives. Between polls nothing is held, so a cancelled wait
leaves nothing behind. The price is up to ``POLL_MAX`` seconds of latency after the
holder exits, which is nothing next to a pull.

A root that cannot be used (not a directory, read-only, not writable by this user) is a
``RootUnusableError`` naming the root and the cause, found before anything is downloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from .errors import RootLockedError, RootUnusableError, StoreError

#: the longest pause between two tries of a held lock (the first tries come sooner)
POLL_MAX = 0.25
_POLL_FIRST = 0.01


class RootLock:
    def __init__(
        self,
        root: Path,
        *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = root / "lock"
        self._fd = -1
        self._sleep = sleep
        self._monotonic = monotonic

    def _try(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:  # ENOLCK (some network file systems) and the like
            raise StoreError(f"cannot lock {self.path}: {exc.strerror or exc}") from exc
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
        self._open()
        try:
            if not self._try():
                who = self.holder()
                if timeout == 0:
                    raise RootLockedError(f"{self.path.parent}: in use by {who}")
                if on_wait is not None:
                    on_wait(f"waiting for {who}, which is using {self.path.parent}")
                await self._wait(timeout, who)
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
            self._probe()
        except BaseException:  # cancelled (Ctrl-C, SIGTERM), timed out, unusable
            self._close()
            raise

    async def _wait(self, timeout: float | None, who: str) -> None:
        deadline = None if timeout is None else self._monotonic() + timeout
        pause = _POLL_FIRST
        while not self._try():
            if deadline is None:
                step = pause
            else:
                left = deadline - self._monotonic()
                if left <= 0:
                    raise RootLockedError(
                        f"{self.path.parent}: still in use by {who} after {timeout:g} s"
                    )
                step = min(pause, left)
            await self._sleep(step)  # cancellable: nothing is held meanwhile
            pause = min(pause * 2, POLL_MAX)

    def _open(self) -> None:
        root = self.path.parent
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise RootUnusableError(
                f"cannot use root {root}: {_why(exc, root, f'cannot write {self.path}')}"
            ) from exc

    def _probe(self) -> None:
        """Can this process create files in the root? (``os.access`` lies for root.)"""
        root = self.path.parent
        probe = root / f".probe-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise RootUnusableError(
                f"cannot use root {root}: {_why(exc, root, 'cannot create files in it')}"
            ) from exc
        os.close(fd)
        probe.unlink(missing_ok=True)

    def release(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


def _why(exc: OSError, root: Path, what: str) -> str:
    """Why the root cannot be written (``what`` failed), and what to do about it."""
    if exc.errno == errno.EROFS:
        return f"{root} is on a read-only file system; pass --root DIR on a writable one"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"{what}: permission denied for uid {os.getuid()}; "
            "pass --root DIR that you own, or fix its permissions"
        )
    if exc.errno in (errno.ENOTDIR, errno.ENOENT):
        return f"{root} is not a directory"
    if exc.errno == errno.EISDIR:
        return f"{root / 'lock'} is a directory, not resumer's lock file"
    return f"{what}: {exc.strerror or exc}"
