"""A copy of a blob that follows its partial as it grows: ``fetch -o`` without a copy at
the end.

The store keeps every blob it commits (a pull may share it; the next fetch of it then
moves no byte), so ``fetch -o FILE`` gives FILE a copy. Where the file system can reflink,
the copy of the finished blob costs nothing and is made at the end. Where it cannot
(ext4), a copy at the end would write the whole blob a second time after the download,
seconds for 1 GiB. ``Tee`` makes that copy while the bytes arrive instead: it follows the
partial's written prefix into a temp file beside FILE, in the kernel (copy_file_range),
off the loop, syncing as it goes, so that at the commit only the last piece is left.

Nothing unverified becomes visible: the caller renames the temp file to FILE only after
the blob committed (its sha256 checked) and the copy holds exactly its bytes; a partial
thrown away meanwhile (a resumed digest mismatch) starts the copy again from zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import PartialDiscardedError, TransferError
from .blobs import copy_range, create_temp
from .partial import Ingest, Partial

log = logging.getLogger(__name__)

#: copy in steps of this many bytes (fewer hand-offs to the thread than written batches)
_STEP = 8 << 20
#: sync the copy every this many bytes, so the last sync has little left to write
_SYNC_EVERY = 32 << 20


class Tee:
    """Copies the partial of ``key`` into a temp file beside ``dest`` as it grows."""

    def __init__(self, ingest: Ingest, key: str, dest: Path) -> None:
        self.ingest = ingest
        self.key = key
        self.dest = dest.absolute()
        self.copied = 0  # bytes of the blob in the temp file, from 0
        self._fd, self.tmp = create_temp(self.dest.parent, f".{self.dest.name}.", ".resumer-tmp")
        self._task: asyncio.Task[None] | None = None
        self._opened: asyncio.Future[Partial] | None = None
        # One thread of its own: close() waits for it before the file is closed, so no
        # copy can ever write to a descriptor number reused by then.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="resumer-tee")
        self._handed = False  # the temp copy now belongs to the caller

    def start(self) -> None:
        self._opened = self.ingest.when_open(self.key)
        self._task = asyncio.create_task(self._follow(self._opened), name=f"tee {self.key}")

    async def _off_loop(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _follow(self, opened: asyncio.Future[Partial]) -> None:
        partial = await opened
        src = await self._off_loop(os.open, partial.path, os.O_RDONLY)
        try:
            while True:
                try:
                    await self._copy(partial, src)
                    return
                except PartialDiscardedError:
                    # The bytes copied were of content thrown away: start again from 0.
                    self.copied = 0
                    await self._off_loop(os.ftruncate, self._fd, 0)
        finally:
            await self._off_loop(os.close, src)

    async def _copy(self, partial: Partial, src: int) -> None:
        generation = partial.generation
        synced = self.copied
        while True:
            size = partial.size
            if size is not None and self.copied >= size:
                pos = self.copied  # all here: wait for the commit (None) or a reset
            else:
                # In steps of _STEP: one hand-off per few MiB, not per written batch.
                ahead = self.copied + _STEP
                pos = max(self.copied, (ahead if size is None else min(ahead, size)) - 1)
            end = await partial.wait_readable(pos, generation)
            last = end is None
            if end is None:
                end = partial.readable()  # committed: the rest of a blob of unknown size
            if end > self.copied:
                await self._off_loop(copy_range, src, self._fd, self.copied, end)
                self.copied = end
            if last:
                return
            if self.copied - synced >= _SYNC_EVERY:
                await self._off_loop(os.fdatasync, self._fd)
                synced = self.copied

    async def finish(self, size: int) -> tuple[int, Path] | None:
        """After the blob committed: wait for the copy to end; hand over the complete
        temp copy (its descriptor and path) for the caller to sync and rename into place.

        None if the copy has nothing (no partial of the blob ever opened: it was in the
        store already): the caller copies the blob instead. An error of the copy is raised.
        """
        task, opened = self._task, self._opened
        assert task is not None and opened is not None
        if not opened.done():
            return None
        await task
        if self.copied != size:
            raise TransferError(f"{self.dest}: the copy holds {self.copied} of {size} bytes")
        fd, self._fd = self._fd, -1
        self._handed = True
        return fd, self.tmp

    async def close(self) -> None:
        """Stop the copy; remove the temp file unless it became ``dest``."""
        task, self._task = self._task, None
        if self._opened is not None and not self._opened.done():
            self._opened.cancel()  # Ingest forgets a cancelled waiter
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        elif task is not None and not task.cancelled() and task.exception() is not None:
            log.debug("%s: the copy to %s failed: %s", self.key, self.dest, task.exception())
        # A copy still running in the thread (its wait was cancelled) ends first.
        await asyncio.to_thread(self._pool.shutdown, True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self._handed:
            with contextlib.suppress(OSError):
                self.tmp.unlink()
