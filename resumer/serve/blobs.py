"""Blobs for the mirror's clients: from the store when committed, else as they arrive.

A committed blob goes out with sendfile(2), a Range as an offset and a count. A blob not
here yet starts (or joins) one upstream transfer, which the mirror owns (``Feeds``): a
client that goes away does not stop it, and shutdown cancels and awaits it. Every client
follows the transfer's partial as its prefix grows (``Partial.wait_readable``), from
its own Range. Bytes go out before the sha256 check, which every OCI client makes itself;
but never bytes of another content: when the transfer throws its bytes away (a resumed
digest mismatch) or ends without a commit, each client streaming them is cut off (the
connection aborted, so its short body cannot pass for a whole one).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any

from aiohttp import web

from ..content.partial import Partial
from ..engine import Engine
from ..errors import NotFoundError, PartialDiscardedError, ResumerError, TransferError
from ..source import Source
from ..transfer import BlobRequest, BlobResult
from .names import Span, Unsatisfiable, parse_range

log = logging.getLogger(__name__)

#: bytes read from a growing partial per write to a client
_BLOCK = 1 << 20
#: how long the sendfile thread waits for the socket before checking for a stop
_POLL_MS = 500


class Feeds:
    """The upstream transfers the mirror started, one per digest, owned here."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._tasks: dict[str, asyncio.Task[BlobResult]] = {}

    def start(self, digest: str, source: Source, size: int | None) -> asyncio.Task[BlobResult]:
        """The running transfer of ``digest``, or a new one (after one that ended)."""
        task = self._tasks.get(digest)
        if task is None or task.done():
            req = BlobRequest(digest, source, digest=digest, size=size)
            task = asyncio.create_task(self.engine.transfers.fetch(req), name=f"mirror {digest}")
            task.add_done_callback(self._ended)
            self._tasks[digest] = task
        return task

    def running(self, digest: str) -> bool:
        task = self._tasks.get(digest)
        return task is not None and not task.done()

    def _ended(self, task: asyncio.Task[BlobResult]) -> None:
        for digest, mine in list(self._tasks.items()):
            if mine is task:
                del self._tasks[digest]
        if not task.cancelled() and task.exception() is not None:
            # Retrieved here, so the loop does not log it as never retrieved.
            log.warning("serve: %s failed for this run: %s", task.get_name(), task.exception())

    async def close(self) -> None:
        """Cancel every transfer (each keeps its partial) and wait until all have ended."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


def blob_headers(digest: str, extra: Mapping[str, str]) -> dict[str, str]:
    return {
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": digest,
        "Accept-Ranges": "bytes",
        **extra,
    }


def ranged(
    request: web.Request, size: int, headers: dict[str, str]
) -> tuple[int, Span | None] | web.Response:
    """The status and span for ``request``'s Range on a blob of ``size`` bytes, with the
    headers they need set in ``headers``; or the 416 to send."""
    asked = parse_range(request.headers.get("Range"), size)
    if isinstance(asked, Unsatisfiable):
        return web.Response(status=416, headers={**headers, "Content-Range": asked.content_range})
    if asked is None:
        headers["Content-Length"] = str(size)
        return 200, None
    headers["Content-Range"] = asked.content_range
    headers["Content-Length"] = str(asked.length)
    return 206, asked


async def send_committed(
    request: web.Request,
    engine: Engine,
    digest: str,
    headers: dict[str, str],
    senders: Executor | None = None,
) -> web.StreamResponse:
    """A committed blob from the store: sendfile(2) from the offset the Range asks, in a
    thread of ``senders`` (the default executor if None)."""
    path = engine.ingest.blob_path(digest)
    loop = asyncio.get_running_loop()
    try:
        f = await loop.run_in_executor(None, open, path, "rb")
    except FileNotFoundError:
        raise web.HTTPNotFound() from None  # pruned meanwhile: the caller answers
    try:
        size = os.fstat(f.fileno()).st_size
        decided = ranged(request, size, headers)
        if isinstance(decided, web.Response):
            return decided
        status, span = decided
        resp = web.StreamResponse(status=status, headers=headers)
        if request.method == "HEAD":
            await resp.prepare(request)
            return resp
        offset, count = (span.start, span.length) if span else (0, size)
        await resp.prepare(request)
        transport = request.transport
        if transport is None or transport.is_closing():
            return resp  # the client left before the body
        sock = transport.get_extra_info("socket")
        try:
            if sock is not None and transport.get_write_buffer_size() == 0:
                await _sendfile_off_loop(senders, sock, f.fileno(), offset, count)
            else:
                await loop.sendfile(transport, f, offset, count)
        except NotImplementedError:  # TLS or an odd transport: the plain way
            await _copy_plain(resp, f, offset, count)
        except OSError as exc:
            log.info("serve: %s: client gone after %s (%s)", digest, request.remote, exc)
            return resp
        await resp.write_eof()
        return resp
    finally:
        await loop.run_in_executor(None, f.close)


async def _sendfile_off_loop(
    senders: Executor | None, sock: Any, file_fd: int, offset: int, count: int
) -> None:
    """sendfile(2) from a thread that waits for the socket itself (poll), as nginx does
    with epoll: no hand-off to the event loop per socket buffer's worth (``loop.sendfile``
    wakes the loop each time the buffer drains, which cost a third of the throughput).
    The socket stays non-blocking and the loop writes nothing to it meanwhile (the
    headers went first). A cancel stops the thread at its next wait."""
    stop = threading.Event()
    done = asyncio.get_running_loop().run_in_executor(
        senders, _sendfile_loop, sock, file_fd, offset, count, stop
    )
    try:
        await asyncio.shield(done)
    finally:
        stop.set()
        await asyncio.wait([done])


def _sendfile_loop(sock: Any, file_fd: int, offset: int, count: int, stop: threading.Event) -> None:
    sock_fd = sock.fileno()
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    # Full segments while the body goes out: with TCP_NODELAY (aiohttp sets it) every
    # bit of room in the send buffer left as its own small segment, and the client paid
    # for each (curl spent twice nginx's system time). Uncorked at the end: the tail goes.
    _set_cork(sock, 1)
    try:
        _send_all(poller, sock_fd, file_fd, offset, count, stop)
    finally:
        _set_cork(sock, 0)


def _set_cork(sock: Any, on: int) -> None:
    with contextlib.suppress(OSError):  # not TCP (a unix socket): nothing to batch
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, on)


def _send_all(
    poller: select.poll, sock_fd: int, file_fd: int, offset: int, count: int, stop: threading.Event
) -> None:
    while count > 0 and not stop.is_set():
        try:
            sent = os.sendfile(sock_fd, file_fd, offset, min(count, 1 << 30))
        except BlockingIOError:
            for _, events in poller.poll(_POLL_MS):
                if events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    raise ConnectionResetError(errno.ECONNRESET, "client gone") from None
            continue
        if sent == 0:
            raise OSError(errno.EIO, "blob shrank while being sent")
        offset += sent
        count -= sent
    if count > 0:
        raise ConnectionAbortedError(errno.ECONNABORTED, "stopped")


async def _copy_plain(resp: web.StreamResponse, f: Any, offset: int, count: int) -> None:
    loop = asyncio.get_running_loop()
    while count > 0:
        data = await loop.run_in_executor(None, os.pread, f.fileno(), min(_BLOCK, count), offset)
        if not data:
            raise OSError(errno.EIO, "blob shrank while being sent")
        await resp.write(data)
        offset += len(data)
        count -= len(data)


async def wait_for_partial(
    engine: Engine, digest: str, task: asyncio.Task[BlobResult]
) -> Partial | BlobResult:
    """The transfer's partial once open, or its result if it ended first (the blob was
    committed already, or the transfer failed: its error is raised)."""
    opened = engine.ingest.when_open(digest)
    try:
        waits: list[asyncio.Future[Any]] = [opened, task]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not opened.done():
            opened.cancel()  # Ingest forgets a cancelled waiter
    if not opened.done() or opened.cancelled():
        return task.result()
    partial = opened.result()
    # The partial opens before the first request upstream: a 200 now could not become
    # the 404 that comes next. The first byte (or the end of the transfer) decides.
    while True:
        first = asyncio.ensure_future(partial.wait_readable(0, partial.generation))
        try:
            waits = [first, task]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not first.done():
                first.cancel()
                await asyncio.wait([first])
        if first.cancelled():
            break  # the transfer ended first
        if first.exception() is None:
            return partial
        if not isinstance(first.exception(), PartialDiscardedError):
            break  # closed without a byte: the transfer is ending
    await asyncio.wait([task])
    return task.result()


async def send_growing(
    request: web.Request,
    partial: Partial,
    digest: str,
    size: int | None,
    headers: dict[str, str],
    on_cut: Callable[[], None] = lambda: None,
) -> web.StreamResponse:
    """Stream the blob from its growing partial, from the client's Range; with a length
    when ``size`` is known, else chunked and whole."""
    status, span = 200, None
    if size is not None:
        decided = ranged(request, size, headers)
        if isinstance(decided, web.Response):
            return decided
        status, span = decided
    resp = web.StreamResponse(status=status, headers=headers)
    await resp.prepare(request)
    if request.method == "HEAD":
        return resp
    pos = span.start if span else 0
    stop = span.end + 1 if span else size
    loop = asyncio.get_running_loop()
    generation = partial.generation
    fd = await loop.run_in_executor(None, _open_either, partial, digest)
    try:
        while stop is None or pos < stop:
            end = await partial.wait_readable(pos, generation)
            if end is None:
                break  # committed, and it ends here
            n = min(_BLOCK, end - pos) if stop is None else min(_BLOCK, end - pos, stop - pos)
            data = await loop.run_in_executor(None, os.pread, fd, n, pos)
            # Checked after the read, with no await before the write: bytes read from a
            # content thrown away meanwhile are never sent.
            if partial.generation != generation or not data:
                raise PartialDiscardedError(f"{digest}: discarded while being served")
            await resp.write(data)
            pos += len(data)
    except (PartialDiscardedError, TransferError) as exc:
        log.warning("serve: %s: cutting off a client at byte %d: %s", digest, pos, exc)
        on_cut()
        if request.transport is not None:
            request.transport.abort()
        return resp
    except (ConnectionError, OSError) as exc:
        log.info("serve: %s: client gone at byte %d (%s)", digest, pos, exc)
        return resp
    finally:
        await loop.run_in_executor(None, os.close, fd)
    await resp.write_eof()
    return resp


def _open_either(partial: Partial, digest: str) -> int:
    """The partial's file, or the committed blob if the commit renamed it meanwhile (the
    same inode: the same bytes)."""
    try:
        return os.open(partial.path, os.O_RDONLY)
    except FileNotFoundError:
        return os.open(partial.ingest.blob_path(digest), os.O_RDONLY)


def upstream_error(exc: BaseException) -> tuple[int, str, str]:
    """The OCI error for a transfer or upstream request that failed."""
    cause = getattr(exc, "cause", exc)
    if isinstance(cause, NotFoundError):
        return 404, "BLOB_UNKNOWN", "blob unknown to upstream"
    if isinstance(exc, ResumerError):
        return 503, "UNAVAILABLE", "upstream unavailable for this blob; try again"
    return 500, "UNKNOWN", "internal error"
