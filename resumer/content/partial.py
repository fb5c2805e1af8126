"""Partial blobs under ``ROOT/ingest/``: chunk maps written at offsets, verified on reopen.

The shape follows containerd's content store: a writer keyed by a ref that starts *or
resumes*, and one ``commit`` where content becomes visible. What we add is a chunk hash
record per chunk, so reopening verifies the partial instead of trusting it.

A partial is a map of chunks, not a prefix. Each chunk is whole, a prefix (the bytes a
cut left of it, recorded with their length), or a hole. Data is written at its offset
(pwrite) into a file preallocated for its segment; a transfer fills the holes in
*segments*, each a byte range ``[start, end)`` written in order from ``begin_segment``.

Invariants kept here (DESIGN.md):
1. Recorded before trusted; synced before counted as durable. Each chunk's xxh3 is
   recorded once written; the durable offset (the contiguous written prefix) only
   advances after fdatasync. A record written before its data is synced may outlive
   that data in a power cut, so each chunk also keeps the record the last finished
   fdatasync covered (its *synced* record), made durable with that sync's offset.
2. Never trust a partial file; never throw away a good chunk: reopen verifies every
   recorded chunk (against its synced record when the latest does not match), turns
   bad or unrecorded ones into holes and keeps the good chunks around them. sha256 is
   kept over the contiguous verified prefix, off the loop, and completed from disk as
   the holes are filled.
3. Verified before visible: commit = fdatasync, size and digest check, rename, fsync dir.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from ..clock import Clock
from ..config import Config
from ..digest import to_signed
from ..errors import (
    DigestMismatchError,
    DiskFullError,
    PartialDiscardedError,
    StoreError,
    TransferError,
    disk_error,
)
from ..layout import Layout, fsync_dir, make_dirs
from ..store import AttemptTally, Store, TransferState

log = logging.getLogger(__name__)

#: batches in the writer thread's queue at once
_MAX_INFLIGHT = 2  # more reads faster but a kill loses what is queued
#: how many checkpoint intervals the data may run ahead of the last fdatasync
_MAX_SYNC_LAG = 4
#: written batches whose chunk records may wait for SQLite: bounds a kill's loss if the
#: recorder falls behind the writer
_MAX_UNRECORDED = 4
#: the most one network read may land at once (the unit a kill can lose, see make_session)
_RECV_MAX = 256 * 1024
#: receive slabs per partial: one filling, the rest being written and hashed
_MAX_SLABS = _MAX_INFLIGHT + 2
#: a slab is one batch (= one chunk), but never more than this
_MAX_SLAB = 4 << 20
#: a filling slab goes to the writer after this long even if not full, and its
#: unfinished chunk is tail-recorded: on a slow link a kill then costs about this much
#: of each transfer's data, not half a chunk (on a fast link slabs fill sooner anyway).
#: A stream that goes quiet meanwhile (a rate-limited server sends in bursts) is handed
#: on by a timer, not at its next read: else each of K streams keeps up to a chunk that
#: no sync and no record can cover.
_HANDOFF_SECONDS = 0.03
#: (idx, xxh3, length or None for a whole chunk)
_Chunk = tuple[int, int, int | None]
#: a byte range [start, end) of a partial; end None = up to an end not known yet
Span = tuple[int, int | None]
#: chunks to record, a durable offset to advance to (after fdatasync), and the records
#: that fdatasync covered (each chunk's fallback on reopen)
_Record = tuple[list[_Chunk], int | None, list[_Chunk]]


def key_filename(key: str) -> str:
    return key.replace(":", "-").replace("/", "_")


@dataclass(frozen=True)
class Reopened:
    """What reopening a partial found."""

    offset: int  # verified bytes kept (all chunks, not only a prefix)
    discarded: int  # bytes on disk that were found bad or unrecorded and are now holes
    reason: str | None  # the reason that cost the most: "corrupt-chunk" or "unrecorded-tail"
    #: bytes per reason, exactly (a reopen can find both)
    discards: dict[str, int] = field(default_factory=dict)
    holes: int = 0  # how many holes the kept chunks leave


class Ingest:
    """The partials and the content store of one root."""

    def __init__(self, root: Path, store: Store, config: Config, clock: Clock) -> None:
        self.root = root
        self.dir = root / "ingest"
        # The root is an OCI image layout; commit renames into its blobs/sha256/.
        self.layout = Layout(root)
        self.content = self.layout.content
        self.blobs = self.layout.blobs_dir
        self.store = store
        self.config = config
        self.clock = clock
        make_dirs(self.dir)
        make_dirs(self.blobs)
        #: partials open in this process (a simulated crash closes their files)
        self.open_partials: set[Partial] = set()
        #: waiting for the partial of a key to open (``when_open``)
        self._openers: dict[str, list[asyncio.Future[Partial]]] = {}
        #: called with (key, offset) after each accepted write; None on the hot path
        self.observer: Callable[[str, int], None] | None = None

    def when_open(self, key: str) -> asyncio.Future[Partial]:
        """The partial of ``key`` once it is open in this process (now, if it is)."""
        fut: asyncio.Future[Partial] = asyncio.get_running_loop().create_future()
        for partial in self.open_partials:
            if partial.key == key:
                fut.set_result(partial)
                return fut
        self._openers.setdefault(key, []).append(fut)
        return fut

    def _opened(self, partial: Partial) -> None:
        for fut in self._openers.pop(partial.key, []):
            if not fut.done():
                fut.set_result(partial)
        # Waiters that gave up (cancelled) on other keys are forgotten here too.
        for key in [k for k, futs in self._openers.items() if all(f.done() for f in futs)]:
            del self._openers[key]

    def sync_interval(self) -> int:
        """Bytes a partial may write before its next fdatasync.

        ``checkpoint-bytes`` is the most a power cut may cost the whole process, not each
        transfer: with n partials open, each syncs every 1/n of it (never below a chunk,
        the unit a sync could save). A cut then loses about one interval in all, however
        many layers download at once, for n times the syncs per byte of each.
        """
        share = self.config.checkpoint_bytes // max(1, len(self.open_partials))
        return max(share, self.config.chunk_size)

    def blob_path(self, digest: str) -> Path:
        return self.content.path(digest)

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        return self.content.has(digest, size)

    def partial_path(self, key: str) -> Path:
        return self.dir / key_filename(key)

    async def open(
        self,
        key: str,
        *,
        digest: str | None,
        size: int | None,
        media_type: str | None = None,
        source: str | None = None,
        validator: str | None = None,
    ) -> tuple[Partial, Reopened]:
        """Start or resume the partial for ``key``, verifying what is already on disk."""
        row = await self.store.transfer(key)
        path = self.partial_path(key)
        if row is None or row.state is TransferState.COMMITTED or not path.exists():
            row = await self.store.create_transfer(
                key,
                digest=digest,
                size=size,
                media_type=media_type,
                source=source,
                validator=validator,
                chunk_size=self.config.chunk_size,
            )
            hashes: dict[int, tuple[int, int | None]] = {}
            synced: dict[int, tuple[int, int | None]] = {}
            if digest is not None:
                hashes = await self._adopt_orphan(key, path, row.chunk_size, size)
        else:
            hashes = await self.store.chunk_map(key)
            synced = await self.store.synced_chunk_map(key)
            if size is None:
                size = row.size
        partial = Partial(
            self,
            key,
            path,
            digest=digest,
            size=size,
            chunk_size=row.chunk_size,
            validator=row.validator,
        )
        reopened = await partial._reopen(hashes, synced)
        self._opened(partial)
        if reopened.discarded:
            log.info(
                "%s: kept %d verified bytes; %d bytes found bad or unrecorded (%s) are now"
                " %d hole(s), to be fetched again",
                key,
                reopened.offset,
                reopened.discarded,
                ", ".join(f"{r} {n}" for r, n in sorted(reopened.discards.items())),
                reopened.holes,
            )
        return partial, reopened

    async def _adopt_orphan(
        self, key: str, path: Path, chunk_size: int, size: int | None
    ) -> dict[int, tuple[int, int | None]]:
        """Take back a partial that gc kept aside for lack of a record (a lost or emptied
        state.db): what each chunk holds is recorded as it is now and kept (see
        ``_adopt_file``: a partial written at K offsets has gaps, and none is adopted).

        Nothing vouches for those bytes, so they count as a resumed download: the final
        sha256 is the guard, and a mismatch restarts from zero (Docker's rule for a
        resumed mismatch). A link that delivered them once need not deliver them again.
        """
        orphan = self.dir / "orphans" / path.name
        if not orphan.is_file():
            return {}
        loop = asyncio.get_running_loop()
        chunks = await loop.run_in_executor(None, _adopt_file, orphan, path, chunk_size, size)
        if chunks:
            await self.store.checkpoint(key, chunks, None)
        log.warning(
            "%s: adopted partial kept aside without a record: %d bytes in %d chunk(s),"
            " unverified until the digest check",
            key,
            sum(chunk_size if n is None else n for _, _, n in chunks),
            len(chunks),
        )
        return {i: (h, n) for i, h, n in chunks}


class _Slab:
    """A receive buffer reused across network reads (see Partial, "writing")."""

    __slots__ = ("buf", "fill", "refs", "sent", "view")

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.fill = 0  # bytes received into it
        self.sent = 0  # bytes of it handed to the worker threads
        self.refs = 0  # handed-off jobs (write, hash) not yet finished


class Partial:
    """An open partial blob. Writes are batched and handed to one worker thread."""

    def __init__(
        self,
        ingest: Ingest,
        key: str,
        path: Path,
        *,
        digest: str | None,
        size: int | None,
        chunk_size: int,
        validator: str | None,
    ) -> None:
        self.ingest = ingest
        self.key = key
        self.path = path
        self.digest = digest
        self.size = size
        self.chunk_size = chunk_size
        self.validator = validator
        self.durable = 0  # the contiguous prefix known to be written and fdatasync'd
        self.resumed_from = 0  # verified bytes found on open
        self._resumed_in_run = False  # set by mark_resumed
        self._cfg = ingest.config
        self._store = ingest.store
        self._clock = ingest.clock
        self._fd = -1
        # The chunk map, on the loop's side: bytes of each chunk present from its start.
        # _acc counts what was accepted (handed on or waiting to be); _done what a
        # finished write put on disk (or reopen verified), which is what a sync covers.
        self._acc: list[int] = []
        self._done: list[int] = []
        self._prefix_at = (0, 0)  # (chunk, bytes) of _done's whole-chunk prefix, cached
        self._held = 0  # sum of _acc once settled
        # sha256 covers [0, _hash_pos): batches that start there are hashed as they go
        # (the hasher thread keeps their order); anything else is caught up from disk.
        self._sha: Any = hashlib.sha256()
        self._hash_pos = 0
        # Byte counts that only grow (a sync is paced by bytes, wherever they landed).
        self._written = 0  # bytes the worker thread has written
        self._sent = 0  # bytes handed to the worker threads
        self._synced = 0  # of _written, what the last finished fdatasync covered
        self._synced_request = 0  # of _written, what the last started fdatasync covers
        # one hand-off per chunk: a crash costs at most a few
        self._batch = min(chunk_size, _MAX_SLAB)
        # Batches handed to the writer (and the hasher) and not yet done, oldest first.
        # Several in flight keep the socket read while the threads write and hash.
        self._inflight: collections.deque[asyncio.Future[list[_Chunk]]] = collections.deque()
        self._hashing: collections.deque[asyncio.Future[None]] = collections.deque()
        self._unrecorded = 0  # chunks written whose records have not reached SQLite
        #: the latest record of each chunk written since the last fdatasync started: the
        #: next sync covers them, and then they become those chunks' synced records
        self._unsynced: dict[int, _Chunk] = {}
        #: the streams writing into holes: the main one (``write``/``begin_segment``),
        #: and those of a parallel attempt (``open_segment``)
        self._main = Segment(self, 0, None)
        self._segments: list[Segment] = [self._main]
        #: called once at the next completion (room for a read, a send, or an error)
        self._waiters: list[Callable[[], None]] = []
        self._sync_fut: asyncio.Future[None] | None = None
        self._last_sync = 0.0
        #: hands on what a quiet stream gathered (see _HANDOFF_SECONDS)
        self._handoff_timer: asyncio.TimerHandle | None = None
        self._records: asyncio.Queue[_Record | None] = asyncio.Queue()
        self._recorder: asyncio.Task[None] | None = None
        self._record_error: BaseException | None = None
        self._committed = False
        self._closed = False  # released: no more writes (committed or not)
        #: the open attempt's (id, wire bytes, kept bytes, held) so far, booked with each
        #: chunk record: an attempt the process dies in still says what it moved
        self.tally: Callable[[], AttemptTally] | None = None
        #: readers of the growing partial, woken when more is written (or it ends)
        self._growth: list[asyncio.Future[None]] = []
        self._generation = 0  # bumped when the content is thrown away (reset)
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="resumer-write")
        self._hash_pool = ThreadPoolExecutor(1, thread_name_prefix="resumer-hash")
        self._sync_pool = ThreadPoolExecutor(1, thread_name_prefix="resumer-sync")

    # --- opening ---------------------------------------------------------------------

    async def _reopen(
        self,
        hashes: dict[int, tuple[int, int | None]],
        synced: dict[int, tuple[int, int | None]],
    ) -> Reopened:
        try:
            return await self._verify_and_open(hashes, synced)
        except BaseException:
            # Nobody gets a half-open partial: its recorder (started before the first
            # segment opens, which may be where a cancellation lands), threads and file
            # end here. A recorder left waiting on its queue would outlive the loop.
            try:
                await self._stop_recorder()
            finally:
                self._release()
            raise

    async def _verify_and_open(
        self,
        hashes: dict[int, tuple[int, int | None]],
        synced: dict[int, tuple[int, int | None]],
    ) -> Reopened:
        loop = asyncio.get_running_loop()
        verify = functools.partial(
            _verify_map, self.path, hashes, self.chunk_size, self.size, synced
        )
        try:
            found = await loop.run_in_executor(self._writer_pool, verify)
        except OSError as exc:
            raise disk_error(f"cannot verify partial {self.path}", exc) from exc
        have = found.have
        held = sum(have)
        kept = {i for i, n in enumerate(have) if n}
        stale = [i for i in hashes if i not in kept]
        prefix = _prefix(have, self.chunk_size, self.size)
        if stale or found.discarded or found.fell_back:
            validator = self.validator if held else None
            await self._store.forget_chunks(
                self.key, stale, prefix, validator, fell_back=found.fell_back
            )
        else:
            await self._store.checkpoint(self.key, [], prefix)
        if held == 0:
            self.validator = None
        self._sha, self._hash_pos = found.sha, found.sha_upto
        self._acc, self._done = list(have), list(have)
        self._prefix_at = (0, 0)
        self._held = self.resumed_from = held
        self.durable = prefix
        self._fd = await loop.run_in_executor(self._writer_pool, _open_partial, self.path)
        self.ingest.open_partials.add(self)
        self._last_sync = self._clock.monotonic()
        self._recorder = asyncio.create_task(self._record_loop(), name=f"record {self.key}")
        holes = self.holes()
        first = holes[0][0] if holes else held
        self._segments.remove(self._main)
        self._main = await self._new_segment(first, None)
        return Reopened(held, found.discarded, found.reason, found.discards, len(holes))

    # --- the chunk map -----------------------------------------------------------------

    def _done_prefix(self) -> int:
        """The contiguous written bytes from 0. Cached: ``_done`` only grows (until a
        reset), so each call goes on from the last whole chunk instead of from 0 (a
        reader asks after every write; 4096 chunks of 256 KiB made that quadratic)."""
        idx, end = self._prefix_at
        done = self._done
        while idx < len(done):
            full = self._chunk_len(idx)
            if done[idx] < full or full == 0:
                break
            end += full
            idx += 1
        self._prefix_at = (idx, end)
        return end + (done[idx] if idx < len(done) else 0)

    def _chunk_len(self, idx: int) -> int:
        if self.size is None:
            return self.chunk_size
        return max(0, min(self.chunk_size, self.size - idx * self.chunk_size))

    @property
    def offset(self) -> int:
        """The main stream's write cursor: where its next accepted byte goes."""
        return self._main.offset

    def _settle(self) -> None:
        """Book every stream's accepted bytes into the chunk map."""
        for seg in self._segments:
            seg.settle()

    @property
    def held(self) -> int:
        """Bytes present (verified on open, or accepted since), wherever they are."""
        return self._held + sum(seg.offset - seg.settled for seg in self._segments)

    def holes(self) -> list[Span]:
        """The byte ranges still to fetch, in order; the last may end where the blob does
        (None while its size is unknown)."""
        self._settle()
        return _holes(self._acc, self.chunk_size, self.size)

    async def begin_segment(self, start: int) -> None:
        """Write the main stream's next accepted bytes from ``start`` (a hole's start).

        Everything accepted before is written out first: a stream's cursor and its
        per-chunk hash move only while nothing of it is in flight.
        """
        self._settle()
        if start == self.offset:
            return
        await self.flush()
        self._segments.remove(self._main)
        self._main = await self._new_segment(start, None)

    async def open_segment(self, start: int, end: int | None) -> Segment:
        """A stream of its own for ``[start, end)`` (a parallel attempt's connection),
        beside the others; ``close_segment`` when it is done."""
        return await self._new_segment(start, end)

    async def close_segment(self, seg: Segment) -> None:
        """Hand on what ``seg`` gathered and book it; its stream ends (its writes may
        still be in flight: ``flush`` waits for those)."""
        try:
            await seg.hand_off()
        finally:
            seg.settle()
            if seg in self._segments and seg is not self._main:
                self._segments.remove(seg)

    async def _new_segment(self, start: int, end: int | None) -> Segment:
        cs = self.chunk_size
        idx, fill = divmod(start, cs)
        self._settle()
        have = self._acc[idx] if idx < len(self._acc) else 0
        if fill and have < fill:
            raise TransferError(f"{self.key}: cannot write at {start}: the chunk before is a hole")
        seg = Segment(self, start, end)
        loop = asyncio.get_running_loop()
        if fill:
            # Carry on the xxh3 of the chunk whose first bytes are already here: once
            # they are on disk (another stream may have handed them on just now).
            await self._drain_hashing()
            head = await loop.run_in_executor(
                self._writer_pool, _read_range, self.path, idx * cs, fill
            )
            seg.xxh.update(head)
        if self._hash_pos < start and len(self._segments) <= 1:
            await self._catch_up_sha(start)
        # Its blocks are reserved as it writes (Segment.reserve), not here for the whole
        # range: K ranges reserved at once filled a small disk before their data came.
        self._segments.append(seg)
        return seg

    async def _catch_up_sha(self, limit: int | None) -> None:
        """Feed sha256 from disk with the chunks present after its position, up to a hole
        or ``limit``: what was written out of order (a repaired hole's neighbours)."""
        start = self._hash_pos
        if start < 0:
            return  # another catch-up is running
        # No batch is hashed from memory meanwhile: with other streams still writing,
        # one that starts at the old position would be hashed twice.
        self._hash_pos = -1
        try:
            await self._drain_hashing()
            # What is on disk now, not what was accepted: another stream's bytes may
            # still wait in its buffers.
            end = self._done_prefix()
            if limit is not None:
                end = min(end, limit)
            if end > start:
                await asyncio.get_running_loop().run_in_executor(
                    self._hash_pool, _hash_range, self._sha, self.path, start, end
                )
                start = end
        finally:
            self._hash_pos = start

    # --- readers of a growing partial ----------------------------------------------------

    def readable(self) -> int:
        """Bytes from 0 that are written, in order: what a reader may have while the blob
        grows (they are our own writes; the digest check comes at commit, and every OCI
        client checks it again)."""
        return self._done_prefix()

    async def read_growing(self, start: int = 0, block: int = 1 << 20) -> AsyncIterator[bytes]:
        """The blob's bytes from ``start``, as they are written, to its end.

        Ends with ``TransferError`` if the content is thrown away meanwhile (a reset: the
        bytes already given were of another object) or the partial closes before the end.
        The file stays open for the reader, so a commit's rename does not disturb it.
        """
        loop = asyncio.get_running_loop()
        generation = self._generation
        fd = await loop.run_in_executor(None, os.open, self.path, os.O_RDONLY)
        try:
            pos = start
            while (end := await self.wait_readable(pos, generation)) is not None:
                n = min(block, end - pos)
                data = await loop.run_in_executor(None, os.pread, fd, n, pos)
                if generation != self._generation or not data:
                    raise PartialDiscardedError(f"{self.key}: partial discarded while being read")
                pos += len(data)
                yield data
        finally:
            os.close(fd)

    @property
    def generation(self) -> int:
        """Changes whenever the content is thrown away (a reader's bytes are then void)."""
        return self._generation

    async def wait_readable(self, pos: int, generation: int) -> int | None:
        """Wait until more than ``pos`` bytes are readable; the readable end, or None when
        the blob is committed and ends at ``pos``. ``PartialDiscardedError`` once the
        content of ``generation`` is thrown away; ``TransferError`` if the partial closes
        without a commit first."""
        loop = asyncio.get_running_loop()
        while True:
            if generation != self._generation:
                raise PartialDiscardedError(f"{self.key}: partial discarded while being read")
            end = self.readable()
            if pos < end:
                return end
            if self._committed and self.size is not None and pos >= self.size:
                return None
            if self._closed and not self._committed:
                raise TransferError(f"{self.key}: partial closed at {pos} of {self.size}")
            fut = loop.create_future()
            self._growth.append(fut)
            await fut

    def _wake_readers(self) -> None:
        waiting, self._growth = self._growth, []
        for fut in waiting:
            _wake(fut)

    async def _drain_hashing(self) -> None:
        while self._inflight or self._hashing:
            pending: list[asyncio.Future[Any]] = [*self._inflight, *self._hashing]
            await asyncio.wait(pending)

    # --- writing ---------------------------------------------------------------------
    #
    # Two ways in, one pipeline. ``write(bytes)`` gathers received pieces into a batch;
    # the direct path (``recv_buffer``/``received``) lets the network read land straight in
    # a reused slab, so a 1 GiB fetch allocates no buffer per read (each fresh ≥ 128 KiB
    # ``bytes`` is an mmap and page faults) and copies nothing in Python. Either way a batch
    # goes to two single-thread executors at once: the writer (writev + per-chunk xxh3,
    # then chunk records) and the hasher (sha256, which releases the GIL, so the two
    # overlap on two cores). One thread each keeps each stage in order. Completions arrive
    # as done callbacks on the loop, which record chunks, start fdatasyncs and hand the
    # next batch on: nothing on the receive path ever waits for the disk unless a bound
    # below is reached.
    #
    # Bounds (a kill loses what is accepted but not recorded; a power cut what is not
    # synced): ≤ _MAX_INFLIGHT batches in the writer, ≤ _MAX_UNRECORDED chunk records
    # waiting for SQLite, ≤ _MAX_SYNC_LAG checkpoint intervals handed off past the durable
    # offset, ≤ _MAX_SLABS slabs of memory.

    async def write(self, data: bytes) -> None:
        """Append ``data`` to the main stream (see ``Segment.write``)."""
        await self._main.write(data)

    async def _hand_off(self) -> None:
        for seg in list(self._segments):
            await seg.hand_off()

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        while not ready():
            self._raise_error()
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(functools.partial(_wake, fut))
            await fut
        self._raise_error()

    def _raise_error(self) -> None:
        if self._record_error is not None:
            raise self._record_error

    # direct path: network reads land in slabs -------------------------------------------

    async def begin_direct(self) -> None:
        await self._main.begin_direct()

    def recv_buffer(self, limit: int) -> memoryview:
        return self._main.recv_buffer(limit)

    def received(self, n: int) -> None:
        self._main.received(n)

    def room(self) -> bool:
        return self._main.room()

    def on_room(self, callback: Callable[[], None]) -> None:
        self._waiters.append(callback)

    # the pipeline ---------------------------------------------------------------------

    def _can_send(self) -> bool:
        streams = len(self._segments)
        if len(self._inflight) >= _MAX_INFLIGHT + streams - 1:
            return False
        if self._unrecorded >= _MAX_UNRECORDED + streams - 1:
            return False
        if not self._cfg.checkpoints:
            return True
        # Bound what a power cut can cost: never run far ahead of the disk.
        return self._sent - self._synced < _MAX_SYNC_LAG * self.ingest.sync_interval()

    def _submit(
        self, seg: Segment, views: Sequence[bytes | memoryview], slab: _Slab | None
    ) -> None:
        loop = asyncio.get_running_loop()
        n = sum(len(v) for v in views)
        # A stream's batches leave in order from its cursor: this one starts where the
        # ones it handed on before end.
        at = seg.start + seg.sent
        seg.sent += n
        self._sent += n
        seg.last_flush = self._clock.monotonic()
        seg.handed = loop.time()
        wfut = loop.run_in_executor(self._writer_pool, self._write_batch, seg, views, n)
        self._inflight.append(wfut)
        refs = 1
        if at == self._hash_pos:
            # In order with the sha256: hash from memory, beside the writer.
            self._hash_pos += n
            hfut = loop.run_in_executor(self._hash_pool, _hash_views, self._sha, views)
            self._hashing.append(hfut)
            hfut.add_done_callback(functools.partial(self._on_hashed, seg, slab))
            refs = 2
        if slab is not None:
            slab.refs += refs
        # Record the batch's chunks the moment it is written, not at the next hand-off:
        # what a crash costs is what is not yet recorded.
        wfut.add_done_callback(functools.partial(self._on_written, seg, slab, at, n))

    def _on_written(
        self,
        seg: Segment,
        slab: _Slab | None,
        at: int,
        n: int,
        fut: asyncio.Future[list[_Chunk]],
    ) -> None:
        self._inflight.remove(fut)
        seg.unref(slab)
        if fut.cancelled():
            # Never written (its thread pool was shut down under it): nothing after it
            # can be trusted to land, and whoever waits for room must hear so.
            self._fail(StoreError(f"partial {self.path}: a write was cancelled"))
            self._pump()
            return
        exc = fut.exception()
        if exc is not None:
            self._fail(_disk_error(self._store, f"cannot write partial {self.path}", exc))
        else:
            done = fut.result()
            # On disk now, recorded or not (checkpoints may be off): what a sync covers
            # and what readers of the growing partial may have.
            _mark(self._done, at, at + n, self.chunk_size)
            if self._growth:
                self._wake_readers()
            if done and self._cfg.checkpoints:
                self._unrecorded += len(done)
                self._records.put_nowait((done, None, []))
                for chunk in done:
                    self._unsynced[chunk[0]] = chunk
            self._maybe_sync()
        self._pump()

    def _on_hashed(self, seg: Segment, slab: _Slab | None, fut: asyncio.Future[None]) -> None:
        self._hashing.remove(fut)
        seg.unref(slab)
        if not fut.cancelled() and fut.exception() is not None:
            self._fail(StoreError(f"partial {self.path}: hashing failed: {fut.exception()}"))
        self._pump()

    def _fail(self, exc: BaseException) -> None:
        if self._record_error is None:
            self._record_error = exc

    def _pump(self) -> None:
        """After a completion: hand on full slabs that waited, and what quiet streams
        gathered long enough ago; wake whoever waits."""
        stale = asyncio.get_running_loop().time() - _HANDOFF_SECONDS
        for seg in self._segments:
            slab = seg.slab
            if slab is not None and slab.sent < slab.fill == len(slab.buf) and self._can_send():
                seg.send_slab(slab)
            if seg.handed <= stale and seg.unsent() and self._can_send():
                seg.send_unsent()
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for wake in waiters:
                wake()

    def _arm_handoff(self) -> None:
        """A stream holds bytes it has not handed on: make sure they go within about
        _HANDOFF_SECONDS even if it receives nothing more (one timer per partial)."""
        if self._handoff_timer is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._handoff_timer = loop.call_later(_HANDOFF_SECONDS, self._on_handoff_timer)

    def _on_handoff_timer(self) -> None:
        self._handoff_timer = None
        if self._closed or self._record_error is not None:
            return
        # _pump hands on what waited long enough, if the pipeline has room (else the
        # next completion's _pump will); whatever is left is looked at again later.
        self._pump()
        if any(seg.unsent() for seg in self._segments):
            self._arm_handoff()

    def _maybe_sync(self) -> None:
        if not self._cfg.checkpoints or self._written <= self._synced_request:
            return
        if self._sync_fut is not None:
            return  # one at a time; the next starts when it ends and covers everything
        due = (
            self._written - self._synced_request >= self.ingest.sync_interval()
            or self._clock.monotonic() - self._last_sync >= self._cfg.checkpoint_seconds
        )
        if due:
            self._start_sync()

    def _start_sync(self) -> None:
        # Everything counted in _written, and every chunk in _done, was written by a
        # finished write: this sync covers at least that much. The claim it makes is the
        # contiguous prefix (chunks past a hole are durable too, but claiming less is safe).
        # Likewise every record in _unsynced: it came from a finished write, and was
        # queued for SQLite before the sync's own record will be.
        written = self._written
        upto = self._done_prefix()
        covered, self._unsynced = list(self._unsynced.values()), {}
        self._synced_request = written
        self._last_sync = self._clock.monotonic()
        fut = asyncio.get_running_loop().run_in_executor(self._sync_pool, os.fdatasync, self._fd)
        fut.add_done_callback(functools.partial(self._on_synced, upto, written, covered))
        self._sync_fut = fut

    def _on_synced(
        self, upto: int, written: int, covered: list[_Chunk], fut: asyncio.Future[None]
    ) -> None:
        self._sync_fut = None
        if fut.cancelled():
            self._fail(StoreError(f"partial {self.path}: a sync was cancelled"))
            self._pump()
            return
        exc = fut.exception()
        if exc is not None:
            self._fail(_disk_error(self._store, f"cannot sync partial {self.path}", exc))
        else:
            # Synced before counted as durable.
            self._synced = max(self._synced, written)
            self.durable = max(self.durable, upto)
            self._records.put_nowait(([], self.durable, covered))
            self._maybe_sync()
        self._pump()

    async def _record_loop(self) -> None:
        while True:
            item = await self._records.get()
            if item is None:
                return
            chunks, durable, synced = item
            # Coalesce whatever queued up meanwhile into one transaction (the store writes
            # the chunk records before the synced ones, so queue order is kept).
            while not self._records.empty():
                nxt = self._records.get_nowait()
                if nxt is None:
                    self._records.put_nowait(None)
                    break
                chunks = chunks + nxt[0]
                durable = nxt[1] if nxt[1] is not None else durable
                synced = synced + nxt[2]
            try:
                tally = self.tally() if self.tally is not None else None
                await self._store.checkpoint(self.key, chunks, durable, tally, synced)
            except StoreError as exc:
                self._fail(exc)
                self._pump()
                return
            self._unrecorded -= len(chunks)
            self._pump()

    def _write_batch(
        self, seg: Segment, batch: Sequence[bytes | memoryview], total: int
    ) -> list[_Chunk]:
        """Writer thread: write at the stream's cursor, hash each chunk with xxh3, report
        chunks. One thread for every stream keeps each stream's batches in order."""
        fd = self._fd
        if self._store.disk_full:
            # Another write found the disk full: what space is left (the released
            # reserve) is for recording that, not for more partial data.
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        views = list(batch)
        pos = seg.wpos
        seg.reserve(fd, pos + total)
        while views:
            n = os.pwritev(fd, views, pos)
            pos += n
            if n == sum(len(v) for v in views):
                break
            views = _advance(views, n)
        seg.wpos = pos
        xxh = seg.xxh
        done: list[_Chunk] = []
        if self._cfg.checkpoints:
            clen = self._chunk_len(seg.next_chunk)
            for piece in batch:
                mv = memoryview(piece)
                while mv:
                    take = min(len(mv), clen - seg.chunk_fill)
                    xxh.update(mv[:take])
                    seg.chunk_fill += take
                    mv = mv[take:]
                    if seg.chunk_fill == clen:
                        # A whole chunk; the blob's last, short one says its length.
                        length = None if clen == self.chunk_size else clen
                        done.append((seg.next_chunk, to_signed(xxh.intdigest()), length))
                        xxh.reset()
                        seg.next_chunk += 1
                        seg.chunk_fill = 0
                        clen = self._chunk_len(seg.next_chunk)
            if seg.chunk_fill:
                # The unfinished chunk's prefix, as written so far: a kill keeps it (reopen
                # verifies it like any chunk). The whole chunk's record replaces it later.
                done.append((seg.next_chunk, to_signed(xxh.intdigest()), seg.chunk_fill))
        self._written += total
        return done

    async def flush(self, *, sync: bool = False) -> None:
        """Write out everything accepted; with ``sync``, checkpoint it durably too."""
        await self._hand_off()
        # wait, not gather: a cancelled attempt must not cancel a batch being written
        await self._drain_hashing()
        while self._sync_fut is not None:
            await asyncio.wait([self._sync_fut])
        if sync and self._cfg.checkpoints and self._written > self.durable:
            self._start_sync()
            while self._sync_fut is not None:
                await asyncio.wait([self._sync_fut])
        self._raise_error()

    async def reset(self, validator: str | None = None) -> None:
        """Throw the partial away and start again from byte zero."""
        await self.flush()
        await self._drain_records()
        await asyncio.get_running_loop().run_in_executor(
            self._writer_pool, os.ftruncate, self._fd, 0
        )
        self._sha = hashlib.sha256()
        self._hash_pos = 0
        self._generation += 1
        self._wake_readers()
        self._acc, self._done = [], []
        self._unsynced = {}
        self._prefix_at = (0, 0)
        self._held = self.durable = 0
        self._main = Segment(self, 0, None)
        self._segments = [self._main]
        # From here the content starts at byte zero: a later mismatch is not a resume's.
        self.resumed_from = 0
        self._resumed_in_run = False
        self.validator = validator
        await self._store.forget_chunks(self.key, None, 0, validator)
        self._recorder = asyncio.create_task(self._record_loop(), name=f"record {self.key}")

    async def set_validator(self, validator: str | None, size: int | None) -> None:
        self.validator = validator
        if size is not None:
            self.size = size
        await self._store.set_size(self.key, self.size, validator)

    async def _drain_records(self) -> None:
        if self._recorder is not None and not self._recorder.done():
            self._records.put_nowait(None)
            await self._recorder
        self._recorder = None
        if self._record_error is not None:
            raise self._record_error

    async def close(self) -> None:
        """Checkpoint what is written and release the file; the partial stays for later."""
        try:
            if self._fd >= 0:
                await self.flush(sync=True)
                await self._drain_records()
        finally:
            try:
                await self._stop_recorder()
            finally:
                self._release()

    async def _stop_recorder(self) -> None:
        """However close went, the recorder ends with the partial, and is awaited.

        On a clean close ``_drain_records`` already did this. After an error it is still
        waiting on its queue: it records what is queued (as a drain would) and ends, or is
        cancelled if we are.
        """
        task, self._recorder = self._recorder, None
        if task is None:
            return
        if not task.done():
            self._records.put_nowait(None)
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError:
                task.cancel()
                await asyncio.wait([task])  # a cancelled recorder ends at once
                raise
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s: recording checkpoints failed: %s", self.key, task.exception())

    def _release(self) -> None:
        self._closed = True
        if self._handoff_timer is not None:
            self._handoff_timer.cancel()
            self._handoff_timer = None
        self.ingest.open_partials.discard(self)
        self._wake_readers()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        self._writer_pool.shutdown(wait=False)
        self._hash_pool.shutdown(wait=False)
        self._sync_pool.shutdown(wait=False)

    # --- commit ----------------------------------------------------------------------

    @property
    def sha256(self) -> str:
        return "sha256:" + str(self._sha.copy().hexdigest())

    async def commit(self) -> Path:
        """Verify size and digest, then make the blob visible: the only way in."""
        await self.flush()
        await self._drain_records()
        holes = self.holes()
        if self.size is not None and holes:
            raise TransferError(
                f"{self.key}: {self.held} of the expected {self.size} bytes are here"
                f" (holes at {_spans(holes)})"
            )
        if self.size is None:
            self.size = self.held  # a blob of unknown size ends where its data does
        await self._catch_up_sha(None)
        if self._hash_pos != self.size:
            raise TransferError(f"{self.key}: only {self._hash_pos} bytes could be hashed")
        digest = self.sha256
        expected = self.digest or digest
        if digest != expected:
            resumed = self.resumed_from > 0 or self._resumed_in_run
            raise DigestMismatchError(
                f"{self.key}: downloaded content has digest {digest}, expected {expected}",
                resumed=resumed,
            )
        fd, self._fd = self._fd, -1  # commit_file syncs and closes it, even on failure
        try:
            dest = await self.ingest.content.commit_file(
                fd, self.path, expected, self.size, executor=self._writer_pool
            )
        except DiskFullError:
            self._store.disk_full = True
            raise
        self._committed = True  # readers finish from the same inode, now the blob
        self._release()
        await self._store.finish_transfer(self.key, TransferState.COMMITTED, digest=expected)
        return dest

    def mark_resumed(self) -> None:
        """An attempt in this run continued from an offset > 0 (Docker's mismatch rule)."""
        self._resumed_in_run = True


class Segment:
    """One stream of bytes into a partial: from ``start``, in order, up to ``end`` (None:
    the blob's end). The main stream (``Partial.write``) is one; a parallel attempt opens
    one per connection (``Partial.open_segment``). Each gathers its own batches and slabs
    and keeps its own writer-thread cursor and per-chunk xxh3; the partial's one pipeline
    (writer, hasher, records, syncs) serves them all.

    ``end`` may shrink while the stream runs: another connection took the rest of it.
    """

    def __init__(self, partial: Partial, start: int, end: int | None) -> None:
        self.p = partial
        self.start = start
        self.end = end
        self.offset = start  # bytes accepted up to here
        self.settled = start  # booked into the partial's chunk map up to here
        self.sent = 0  # bytes of this stream handed to the worker threads
        self.pending: list[bytes] = []
        self.pending_len = 0
        self.last_flush = partial._clock.monotonic()
        #: the loop's time of the last hand-off (the timer's clock, see _arm_handoff)
        self.handed = asyncio.get_running_loop().time()
        self.slab: _Slab | None = None
        self.free_slabs: list[_Slab] = []
        self.nslabs = 0
        # The writer thread's cursor and the chunk it is hashing with xxh3: they change
        # only in that thread (a stream's batches reach it in order).
        self.wpos = start
        self.reserved = start  # blocks reserved up to here (writer thread, see reserve)
        self.xxh = xxhash.xxh3_64()
        self.next_chunk, self.chunk_fill = divmod(start, partial.chunk_size)

    def reserve(self, fd: int, upto: int) -> None:
        """Writer thread, before writing up to ``upto``: keep the blocks of the next
        ``_RESERVE_AHEAD`` bytes of the range reserved, in steps of at least half that
        (extents that long do not fragment, however many streams write beside it).

        Never the whole range at once: with K streams that reserved K ranges before their
        data came, and a small disk filled with reservations (3.2 MiB of data kept on
        12 MiB with K = 4, against 9.7 MiB with one stream). A window holds at most
        ``_RESERVE_AHEAD`` unwritten per stream, and ``_preallocate`` holds none once
        the disk is near full.
        """
        stop = self.end if self.end is not None else self.p.size
        if stop is None:
            return  # the blob's end is not known: nothing to reserve up to
        if self.reserved >= min(stop, upto + _RESERVE_AHEAD // 2):
            return  # still far enough ahead
        start = max(self.reserved, self.wpos)
        end = min(stop, upto + _RESERVE_AHEAD)
        if end > start:
            _preallocate(fd, start, end)
        # Advanced even when nothing was reserved (a disk near full): the next try is
        # half a window on, not at every batch.
        self.reserved = end

    def settle(self) -> None:
        """Book the accepted bytes into the partial's chunk map."""
        start, end = self.settled, self.offset
        if end > start:
            _mark(self.p._acc, start, end, self.p.chunk_size)
            self.p._held += end - start
        self.settled = end

    def unref(self, slab: _Slab | None) -> None:
        if slab is None:
            return
        slab.refs -= 1
        if slab.refs == 0 and slab is not self.slab:
            self.free_slabs.append(slab)

    async def write(self, data: bytes) -> None:
        """Append ``data``; it reaches the worker threads in batches of ≥ one chunk."""
        slab = self.slab
        if slab is not None and slab.sent < slab.fill:
            await self.hand_off()  # bytes of a direct phase go first
        self.pending.append(data)
        self.pending_len += len(data)
        self.offset += len(data)
        if self.p.ingest.observer is not None:
            self.p.ingest.observer(self.p.key, self.offset)
        if self.pending_len >= self.p._batch or (
            self.p._clock.monotonic() - self.last_flush >= _HANDOFF_SECONDS
        ):
            await self.hand_off()
        elif self.pending:
            self.p._arm_handoff()

    def unsent(self) -> bool:
        """Whether bytes accepted here wait to be handed on."""
        slab = self.slab
        return bool(self.pending) or (slab is not None and slab.sent < slab.fill)

    def send_unsent(self) -> None:
        """Hand on every byte accepted here, in order (slab bytes come before pieces
        gathered after them: ``write`` hands the slab on first)."""
        slab = self.slab
        if slab is not None and slab.sent < slab.fill:
            self.send_slab(slab)
        if self.pending:
            batch, self.pending, self.pending_len = self.pending, [], 0
            self.p._submit(self, batch, None)

    async def hand_off(self) -> None:
        # Checked again after each wait: _pump (or the timer) may have handed the bytes
        # on meanwhile.
        slab = self.slab
        if slab is not None and slab.sent < slab.fill:
            await self.p._wait_until(self.p._can_send)
            if slab.sent < slab.fill:
                self.send_slab(slab)
        if self.pending:
            await self.p._wait_until(self.p._can_send)
            if self.pending:
                batch, self.pending, self.pending_len = self.pending, [], 0
                self.p._submit(self, batch, None)

    async def begin_direct(self) -> None:
        """Hand off gathered pieces, so bytes received directly come after them."""
        await self.hand_off()

    def recv_buffer(self, limit: int) -> memoryview:
        """Where the next network read of at most ``limit`` bytes lands (``room()`` first)."""
        slab = self.slab
        if slab is None or slab.fill == len(slab.buf):
            slab = self._next_slab()
        end = slab.fill + min(limit, _RECV_MAX, len(slab.buf) - slab.fill)
        return slab.view[slab.fill : end]

    def received(self, n: int) -> None:
        """``n`` bytes landed in the buffer ``recv_buffer`` gave; raises a write error."""
        self.p._raise_error()
        slab = self.slab
        assert slab is not None
        slab.fill += n
        self.offset += n
        if self.p.ingest.observer is not None:
            self.p.ingest.observer(self.p.key, self.offset)
        if (
            slab.fill == len(slab.buf)
            or self.p._clock.monotonic() - self.last_flush >= _HANDOFF_SECONDS
        ) and self.p._can_send():
            self.send_slab(slab)
        elif slab.sent < slab.fill:
            self.p._arm_handoff()

    def room(self) -> bool:
        """Whether another network read can be taken now (else wait for ``on_room``)."""
        if self.p._record_error is not None:
            return True  # let the reader call received() and meet the error
        slab = self.slab
        if slab is not None:
            if slab.fill < len(slab.buf):
                return True
            if slab.sent < slab.fill:
                return False  # the full slab waits for the writer; _pump hands it on
            if slab.refs == 0:
                return True
        return bool(self.free_slabs) or self.nslabs < _MAX_SLABS

    def on_room(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, at the next completion (it re-checks ``room()``)."""
        self.p._waiters.append(callback)

    def _next_slab(self) -> _Slab:
        old = self.slab
        if old is not None and old.refs == 0:
            slab = old  # written and hashed already: reuse it while its pages are warm
        elif self.free_slabs:
            slab = self.free_slabs.pop()
        else:
            slab = _Slab(self.p._batch)
            self.nslabs += 1
        # An old slab still being written returns to the free list in _unref.
        slab.fill = slab.sent = 0
        self.slab = slab
        return slab

    def send_slab(self, slab: _Slab) -> None:
        region = slab.view[slab.sent : slab.fill]
        slab.sent = slab.fill
        self.p._submit(self, [region], slab)


def _disk_error(store: Store, doing: str, exc: BaseException) -> StoreError:
    if isinstance(exc, OSError):
        error = disk_error(doing, exc)
        if isinstance(error, DiskFullError):
            store.disk_full = True
        return error
    return StoreError(f"{doing}: {exc}")


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _hash_views(sha: Any, views: Sequence[bytes | memoryview]) -> None:
    """Hasher thread: sha256 releases the GIL, so it runs beside the writer."""
    for v in views:
        sha.update(v)


def _advance(views: list[Any], n: int) -> list[Any]:
    out: list[Any] = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(memoryview(v)[n:] if n else v)
        n = 0
    return out


@dataclass
class _Found:
    """What ``_verify_map`` found in a partial file."""

    have: list[int]  # bytes present from the start of each chunk (0: a hole)
    sha: Any  # sha256 over [0, sha_upto)
    sha_upto: int
    discarded: int = 0
    discards: dict[str, int] = field(default_factory=dict)
    #: chunks kept at their synced record because the latest did not verify
    fell_back: list[int] = field(default_factory=list)

    @property
    def reason(self) -> str | None:
        return max(self.discards, key=self.discards.__getitem__) if self.discards else None

    def lose(self, nbytes: int, reason: str) -> None:
        if nbytes > 0:
            self.discarded += nbytes
            self.discards[reason] = self.discards.get(reason, 0) + nbytes


def _verify_map(
    path: Path,
    hashes: dict[int, tuple[int, int | None]],
    chunk_size: int,
    size: int | None,
    synced: dict[int, tuple[int, int | None]] | None = None,
) -> _Found:
    """Worker thread: check every recorded chunk against its xxh3; the rest are holes.

    A chunk whose latest record does not verify is checked against its ``synced``
    record, if it has one that differs: the one a finished fdatasync covered. A power
    cut takes the data a newer record describes (it reached SQLite before the data
    reached the disk), never what that sync made durable, so the chunk keeps that prefix.

    What is lost is booked as the bytes of each chunk that were written (up to its last
    non-zero byte, as ``_adopt_file`` reads them) and do not verify: a gap between
    segments was never received, so it is no waste.

    Nothing is cut at the first bad chunk: each chunk stands on its own. sha256 is fed
    with the contiguous verified prefix as it is read. Bytes on disk past the last good
    chunk (unrecorded, or bad) are truncated away; bad chunks inside stay as they are,
    to be overwritten when their hole is filled. The file is synced at the end, so what
    was verified (perhaps from the page cache, after a kill) is durable from here on.
    """
    found = _Found([], hashlib.sha256(), 0)
    try:
        f = open(path, "r+b")  # noqa: SIM115 - closed below, after the truncate
    except FileNotFoundError:
        return found  # _open_partial creates it, durably
    with f:
        fd = f.fileno()
        on_disk = os.fstat(fd).st_size
        if size is not None and on_disk > size:
            found.lose(on_disk - size, "unrecorded-tail")
            on_disk = size
        nchunks = -(-on_disk // chunk_size)
        have = [0] * nchunks
        in_prefix = True
        for idx in range(nchunks):
            start = idx * chunk_size
            there = min(chunk_size, on_disk - start)
            record = hashes.get(idx)
            good, data = _verify_chunk(fd, start, record, chunk_size, size)
            if not good and record is not None and synced and idx in synced:
                good, data = _verify_chunk(fd, start, synced[idx], chunk_size, size)
                if good:
                    found.fell_back.append(idx)
            if good and in_prefix:
                found.sha.update(data)
                found.sha_upto += good
            have[idx] = good
            if good < there:
                # Only bytes that were written were received: with K > 1 a chunk may be
                # part of a gap no stream reached (sparse, zeros), never fetched at all.
                written, _ = _written_prefix(fd, start, there)
                if record is not None:  # its bytes were received, whatever the disk kept
                    written = max(written, min(there, record[1] or chunk_size))
                reason = "corrupt-chunk" if record is not None and good == 0 else "unrecorded-tail"
                found.lose(written - good, reason)
            full = chunk_size if size is None else min(chunk_size, size - start)
            if good < full:
                in_prefix = False
        while have and have[-1] == 0:
            have.pop()
        last = (len(have) - 1) * chunk_size + have[-1] if have else 0
        if os.fstat(fd).st_size != last:
            f.truncate(last)
        os.fdatasync(fd)
    found.have = have
    return found


def _verify_chunk(
    fd: int, start: int, record: tuple[int, int | None] | None, chunk_size: int, size: int | None
) -> tuple[int, bytes]:
    """The bytes of the chunk at ``start`` that ``record`` (xxh3, length) vouches for, and
    those bytes; (0, b"") if it vouches for none."""
    if record is None:
        return 0, b""
    want_hash, length = record
    want = chunk_size if length is None else length
    if size is not None:
        want = min(want, size - start)
    if want <= 0:
        return 0, b""
    data = os.pread(fd, want, start)
    if len(data) == want and to_signed(xxhash.xxh3_64_intdigest(data)) == want_hash:
        return want, data
    return 0, b""


def _prefix(have: Sequence[int], chunk_size: int, size: int | None) -> int:
    """The contiguous bytes from 0 in a chunk map."""
    end = 0
    for idx, n in enumerate(have):
        end += n
        full = chunk_size if size is None else min(chunk_size, size - idx * chunk_size)
        if n < full:
            break
    return end


def _holes(have: Sequence[int], chunk_size: int, size: int | None) -> list[Span]:
    """The missing byte ranges of a chunk map, merged, in order."""
    holes: list[Span] = []
    nchunks = len(have) if size is None else max(len(have), -(-size // chunk_size))
    start: int | None = None
    for idx in range(nchunks):
        base = idx * chunk_size
        n = have[idx] if idx < len(have) else 0
        full = chunk_size if size is None else min(chunk_size, size - base)
        if n and start is not None:
            holes.append((start, base))  # a hole ends where present bytes begin
            start = None
        if n < full and start is None:
            start = base + n
    if size is None:
        holes.append((start if start is not None else _prefix_end(have, chunk_size), None))
    elif start is not None:
        holes.append((start, size))
    return holes


def _prefix_end(have: Sequence[int], chunk_size: int) -> int:
    return (len(have) - 1) * chunk_size + have[-1] if have else 0


def _mark(have: list[int], start: int, end: int, chunk_size: int) -> None:
    """Book bytes [start, end) as present (each chunk fills from its start, in order)."""
    idx = start // chunk_size
    while start < end:
        base = idx * chunk_size
        upto = min(end, base + chunk_size)
        _grow(have, idx)
        have[idx] = max(have[idx], upto - base)
        start = upto
        idx += 1


def _grow(have: list[int], idx: int) -> None:
    if idx >= len(have):
        have.extend([0] * (idx + 1 - len(have)))


def _spans(spans: Sequence[Span]) -> str:
    shown = ", ".join(f"{a}-{'' if b is None else b - 1}" for a, b in spans[:4])
    return shown + (f" and {len(spans) - 4} more" if len(spans) > 4 else "")


def _read_range(path: Path, start: int, length: int) -> bytes:
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), length, start)
    if len(data) != length:
        raise OSError(errno.EIO, f"{path}: {len(data)} of {length} bytes at {start}")
    return data


def _hash_range(sha: Any, path: Path, start: int, end: int) -> None:
    """Hasher thread: feed sha256 with [start, end) of the file, in 1 MiB reads."""
    with open(path, "rb") as f:
        fd = f.fileno()
        pos = start
        while pos < end:
            data = os.pread(fd, min(1 << 20, end - pos), pos)
            if not data:
                raise OSError(errno.EIO, f"{path}: ends at {pos}, expected {end} bytes")
            sha.update(data)
            pos += len(data)


_FALLOC_FL_KEEP_SIZE = 1
#: how far ahead of its cursor a stream keeps blocks reserved (see Segment.reserve)
_RESERVE_AHEAD = 8 << 20
#: no block is reserved unless the file system has this much free beyond it: near full,
#: every byte of space goes to data as it comes, none to a reservation
_RESERVE_SPARE = 64 << 20
_libc: Any = None


def _preallocate(fd: int, start: int, end: int) -> None:
    """Writer thread: reserve the blocks of [start, end) so a stream's writes neither
    fragment nor meet a disk filled by others half way. KEEP_SIZE: the file's length
    still says what was written. Only with ``_RESERVE_SPARE`` free beyond them: on a
    disk that is nearly full a reservation is space no data can use, and what a run
    keeps there is what it wrote. Best effort: a file system that cannot (FUSE, tmpfs
    on old kernels) or a disk without the room just writes as it goes, and meets ENOSPC
    where it meets it."""
    global _libc
    if _libc is False:
        return
    try:
        st = os.fstatvfs(fd)
        if st.f_bavail * st.f_frsize < (end - start) + _RESERVE_SPARE:
            return
        if _libc is None:
            import ctypes
            import ctypes.util

            _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            _libc.fallocate.argtypes = [
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_longlong,
                ctypes.c_longlong,
            ]
        # A failure (EOPNOTSUPP, ENOSPC) is ignored: the writes go on without it.
        _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, start, end - start)
    except (OSError, AttributeError):
        _libc = False  # no fallocate(2) here: never try again


def _adopt_file(orphan: Path, path: Path, chunk_size: int, size: int | None) -> list[_Chunk]:
    """Worker thread: move ``orphan`` back to ``path``; a record for what each chunk holds.

    No record says which bytes were written, but the way they are written does: each
    chunk fills from its start, in order (a stream writes in order, and starts mid-chunk
    only after the bytes before it), so what a chunk holds is a prefix of it. The rest of
    it was never written, and reads as zeros: sparse, reserved by ``_preallocate``, or
    past the end of the file. So each chunk is adopted up to its last non-zero byte (a
    prefix record, or a whole one); a chunk of zeros is a hole. Written bytes that are
    really zeros at a chunk's end only cost fetching them again. An unwritten gap is
    never adopted (a partial written at K offsets has one in each segment), so the final
    digest, still the guard, fails only on bytes that were written wrong.

    Sparse regions are skipped without reading them (SEEK_DATA), where the file system
    can say; where it cannot, the zeros read tell the same.
    """
    os.replace(orphan, path)
    fsync_dir(path.parent)
    fsync_dir(orphan.parent)
    chunks: list[_Chunk] = []
    with open(path, "rb") as f:
        fd = f.fileno()
        limit = os.fstat(fd).st_size
        if size is not None:
            limit = min(limit, size)  # bytes past the blob's end are none of it
        pos = 0
        while pos < limit:
            pos = _next_data(fd, pos)
            if pos >= limit:
                break
            idx = pos // chunk_size
            start = idx * chunk_size
            held, data = _written_prefix(fd, start, min(chunk_size, limit - start))
            if held:
                length = None if held == chunk_size else held
                chunks.append((idx, to_signed(xxhash.xxh3_64_intdigest(data)), length))
            pos = start + chunk_size
    return chunks


def _written_prefix(fd: int, start: int, n: int) -> tuple[int, bytes]:
    """How much of the ``n`` bytes at ``start`` (a chunk) was written, and those bytes.

    A chunk fills from its start, in order, so what was written is a prefix, and the
    rest reads as zeros (sparse, reserved, or past the end): the prefix runs to the last
    non-zero byte. A sparse chunk is not read at all (SEEK_DATA, where it works)."""
    if _next_data(fd, start) >= start + n:
        return 0, b""
    data = os.pread(fd, n, start)
    held = len(data.rstrip(b"\0"))
    return held, data[:held]


def _next_data(fd: int, pos: int) -> int:
    """The first offset at or after ``pos`` that may hold data (the file's length when
    none does); ``pos`` itself where the file system cannot tell."""
    try:
        return os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # nothing but a hole from pos to the end
            return os.fstat(fd).st_size
        return pos  # no SEEK_DATA here (EINVAL): read it all


def _open_partial(path: Path) -> int:
    """Open the partial for writing at offsets; a new one's directory entry is synced
    first, so the durable offsets recorded for it never outlive the file (durable once
    recorded)."""
    try:
        return os.open(path, os.O_RDWR)
    except FileNotFoundError:
        # 0o666 & ~umask, as open() does: the partial becomes a blob others must read.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        fsync_dir(path.parent)
        return fd
