"""One attempt over aiohttp: the (Range) GETs that fill a partial's holes, following
DESIGN.md's response table.

An attempt is one connection's work from connect to success or failure: it asks for
each hole of the partial in turn, with ``Range: bytes=A-B`` (no Range at all for a
fresh download), until none is left or a request fails.

| response                                   | action                                         |
|--------------------------------------------|------------------------------------------------|
| 206, Content-Range A-B/total as asked       | write at A                                     |
| 206 with any other Content-Range           | fail the attempt, write nothing                |
| 200 while asking for a range               | the whole blob: fill every hole as it passes,  |
|                                            | discard the rest (waste), stop after the last  |
| 416                                        | complete if A == size, else RangeRestartError  |
| anything else                              | the error ``http.status_error`` maps it to     |

Fetch reports an outcome and decides nothing: whether to retry, refresh a token, restart
from zero or give up is the attempt policy's (``retry.py``), applied by ``transfer.py``.
The one exception is a 200 to an If-Range whose validator changed: that body *is* the new
object, so it is read from byte 0 into an emptied partial rather than thrown away.
Redirects, the status → error table and URL redaction are the one HTTP edge's
(``http.py``). aiohttp's exceptions end there and here: they are mapped into
resumer.errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import aiohttp

from . import http, segments
from .clock import Clock
from .errors import (
    BrokenServerError,
    ConnectionCutError,
    RangeRestartError,
    StallError,
    TransferError,
)
from .segments import Segment
from .source import Endpoint, redact_url

if TYPE_CHECKING:
    from .rate import Limiter

log = logging.getLogger(__name__)

#: The engine's Limiter (rate cap, wire budget) for the attempt running in this context:
#: ``attempt(limiter=…)`` sets it around the creation of its body task, which copies it;
#: ``consume`` and ``_DirectBody`` read it where the bytes are read.
_LIMITER: contextvars.ContextVar[Limiter | None] = contextvars.ContextVar(
    "resumer_fetch_limiter", default=None
)

_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED = re.compile(r"^bytes\s+\*/(\d+)$")


class Sink(Protocol):
    """Where an attempt's body goes (an ingest Partial): a map of chunks with holes."""

    @property
    def offset(self) -> int: ...  # the write cursor

    size: int | None

    def holes(self) -> list[tuple[int, int | None]]: ...

    async def begin_segment(self, start: int) -> None: ...

    async def write(self, data: bytes) -> None: ...

    async def reset(self, validator: str | None = None) -> None: ...

    async def set_validator(self, validator: str | None, size: int | None) -> None: ...


@runtime_checkable
class DirectSink(Sink, Protocol):
    """A sink that network reads can land in directly (no buffer allocated per read).

    ``room()`` says whether a read may be taken now; if not, ``on_room`` calls back at
    the next completion. ``recv_buffer`` gives where it lands, ``received`` accepts it.
    """

    async def begin_direct(self) -> None: ...

    def recv_buffer(self, limit: int) -> memoryview: ...

    def received(self, n: int) -> None: ...

    def room(self) -> bool: ...

    def on_room(self, callback: Callable[[], None]) -> None: ...


@runtime_checkable
class SegmentedSink(Sink, Protocol):
    """A sink that takes several streams at once (a partial: ``open_segment``)."""

    key: str
    chunk_size: int

    async def open_segment(self, start: int, end: int | None) -> Any: ...

    async def close_segment(self, seg: Any) -> None: ...


#: RESUMER_DIRECT_BODY=0 reads bodies through aiohttp's StreamReader only (for comparison)
_DIRECT_BODY = os.environ.get("RESUMER_DIRECT_BODY", "1") != "0"


@dataclass(frozen=True)
class StallPolicy:
    """An attempt stalls with no byte for ``timeout`` s, or under ``min_rate`` over ``window`` s."""

    timeout: float = 30.0
    min_rate: int = 1024
    window: float = 60.0


@dataclass
class Outcome:
    """Everything one attempt did, for the attempts table (every wire byte accounted for)."""

    host: str
    status: int | None = None
    start_offset: int = 0
    wire_bytes: int = 0
    kept_bytes: int = 0
    discarded_bytes: int = 0
    discard_reason: str | None = None
    complete: bool = False
    range_ignored: bool = False
    restarted: bool = False  # the partial was thrown away during this attempt
    error: TransferError | None = None
    #: bytes thrown away per reason, exactly
    discards: dict[str, int] = field(default_factory=dict)
    requests: int = 0  # range requests made (one per hole filled, or fewer)

    def discard(self, nbytes: int, reason: str) -> None:
        if nbytes <= 0:
            return
        self.discarded_bytes += nbytes
        self.discards[reason] = self.discards.get(reason, 0) + nbytes
        # The reason that cost the most bytes names the row (all are in ``discards``).
        self.discard_reason = max(self.discards, key=self.discards.__getitem__)


async def attempt(
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    sink: Sink,
    *,
    size: int | None,
    validator: str | None,
    stall: StallPolicy,
    clock: Clock,
    on_bytes: _Progress | None = None,
    out: Outcome | None = None,
    connections: int = 1,
    min_segment: int = 4 << 20,
    slots: asyncio.Semaphore | None = None,
    limiter: Limiter | None = None,
) -> Outcome:
    """One attempt. Never raises for transfer problems: see ``Outcome.error``.

    ``out``, if given, is filled as the bytes arrive (the caller may read it meanwhile).
    ``connections`` > 1 fills the holes over that many connections (``segments.py``)
    when the sink is a partial; ``slots`` caps the extra connections of the process.
    ``limiter``, if given, paces every read (the rate cap) and books it against the run's
    wire budget; a spent budget ends the attempt with WireBudgetExhaustedError.
    """
    if out is None:
        out = Outcome(host=endpoint.host or urlsplit(endpoint.url).netloc)
    out.host = out.host or endpoint.host or urlsplit(endpoint.url).netloc
    out.start_offset = sink.offset
    if (
        connections > 1
        and isinstance(sink, SegmentedSink)
        and segments.may_split(sink.size if sink.size is not None else size, min_segment)
    ):
        token = _LIMITER.set(limiter)  # every connection's task copies the context
        try:
            await _parallel(
                session,
                endpoint,
                sink,
                out,
                validator,
                stall,
                clock,
                on_bytes,
                connections,
                min_segment,
                slots,
            )
        finally:
            _LIMITER.reset(token)
        return out
    watchdog = _Watchdog(stall)
    token = _LIMITER.set(limiter)  # the body task copies the context: it sees the limiter
    try:
        body = asyncio.create_task(
            _attempt(session, endpoint, sink, out, size, validator, watchdog, clock, on_bytes)
        )
    finally:
        _LIMITER.reset(token)
    watchdog.task = body
    try:
        await body
    except TransferError as exc:
        out.error = exc
    except asyncio.CancelledError:
        # Our own watchdog cancelled the body; anything else is a real cancellation.
        if not watchdog.stalled or _current_cancelling():
            raise
        out.error = StallError(f"{redact_url(endpoint.url)}: {watchdog.stalled}")
    finally:
        watchdog.stop()
    return out


async def _parallel(
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    partial: SegmentedSink,
    out: Outcome,
    validator: str | None,
    stall: StallPolicy,
    clock: Clock,
    on_bytes: _Progress | None,
    connections: int,
    min_segment: int,
    slots: asyncio.Semaphore | None,
) -> None:
    async def request(seg: Segment, plan: segments.Plan) -> int | None:
        limiter = _LIMITER.get()
        if limiter is not None:
            # Before every connection's request, not only the attempt's first: a budget
            # spent by the other connections opens no new range (not even one read of it).
            limiter.check()
        watchdog = _Watchdog(stall)
        body = asyncio.create_task(
            _segment_request(
                session, endpoint, seg, plan, out, validator, watchdog, clock, on_bytes
            )
        )
        watchdog.task = body
        try:
            return await body
        except asyncio.CancelledError:
            if not watchdog.stalled or _current_cancelling():
                raise
            raise StallError(f"{redact_url(endpoint.url)}: {watchdog.stalled}") from None
        finally:
            watchdog.stop()

    try:
        await segments.run(
            partial,
            connections=connections,
            min_segment=min_segment,
            slots=slots,
            request=request,
            where=redact_url(endpoint.url),
        )
    except TransferError as exc:
        out.error = exc
        return
    out.complete = True


async def _segment_request(
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    seg: Segment,
    plan: segments.Plan,
    out: Outcome,
    validator: str | None,
    watchdog: _Watchdog,
    clock: Clock,
    on_bytes: _Progress | None,
) -> int | None:
    """GET one segment's range into it: the bytes kept, or None for a 200 to a range not
    from 0 (closed unread: the host ignores Range, the range goes back).

    The range is bounded (``bytes=A-B``) and the 206 must match both ends. Only the first
    range of a blob whose size is not known yet is open (``bytes=A-``): its 206 says the
    size, and then the others may start.
    """
    partial = plan.partial
    start, asked = seg.start, seg.end
    headers = dict(endpoint.headers)
    headers["Accept-Encoding"] = "identity"
    headers["Range"] = f"bytes={start}-{'' if asked is None else asked - 1}"
    if validator:
        headers["If-Range"] = validator
    out.requests += 1
    resp = await _open(session, endpoint.url, headers, verify_tls=endpoint.verify_tls)
    try:
        where = redact_url(str(resp.url))
        out.status = resp.status
        if resp.status == 416:
            m416 = _UNSATISFIED.match(resp.headers.get("Content-Range", ""))
            total416 = int(m416.group(1)) if m416 else None
            # As on one connection (``_handle``): a partial of unknown size asking from its
            # end and told that is the size is complete. Restarting would fetch it again.
            if partial.size is None and asked is None and start == total416:
                await partial.set_validator(validator, total416)
                return 0  # the body of a 416 is never read (the registry's is short)
            raise RangeRestartError(f"{where}: 416 for {headers['Range']}", status=416)
        error = http.status_error(resp.status, where, resp.headers, clock)
        if error is not None:
            raise error
        new_validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        if resp.status == 200:
            out.range_ignored = True
            plan.single = True  # one connection from here: no split, no new one
            if start != 0:
                return None
            length = resp.content_length
            if partial.size is None and length is not None:
                await partial.set_validator(validator or new_validator, length)
                seg.end = asked = length
        else:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            total = None if m is None or m.group(3) == "*" else int(m.group(3))
            last = None if m is None else int(m.group(2)) + 1
            if (
                m is None
                or int(m.group(1)) != start
                or (asked is not None and last != asked)
                or (partial.size is not None and total != partial.size)
            ):
                raise BrokenServerError(
                    f"{where}: asked for {headers['Range']}, got Content-Range "
                    f"{resp.headers.get('Content-Range')!r}",
                    status=206,
                )
            if partial.size is None and total is not None:
                await partial.set_validator(validator or new_validator, total)
            if asked is None:
                seg.end = asked = last
            plan.proven.set()
        kept = 0

        def limit() -> int | None:
            return seg.end if seg.end is not None else asked

        async def take(data: bytes) -> bool:
            nonlocal kept
            n = len(data)
            limiter = await _count(out, watchdog, n)
            stop = limit()
            keep = n if stop is None else max(0, min(n, stop - seg.offset))
            if keep:
                await seg.write(data if keep == n else data[:keep])
                out.kept_bytes += keep
                kept += keep
                if on_bytes is not None:
                    on_bytes(seg.offset)
            if keep < n:
                # Past the end: another connection took the rest of the range meanwhile.
                shrunk = stop is not None and asked is not None and stop < asked
                out.discard(n - keep, "segment-overlap" if shrunk else "overlong-body")
            stop = limit()
            more = stop is None or seg.offset < stop
            if limiter is not None and more:
                limiter.check()  # the run's wire budget: stop once spent (this read is kept)
            return more

        with _paced_reads(resp):
            await _read_pieces(resp.content, take, watchdog, where, lambda: seg.offset)
        stop = limit()
        if stop is not None and seg.offset < stop:
            raise ConnectionCutError(f"{where}: connection closed at byte {seg.offset} of {stop}")
        return kept
    finally:
        resp.close()


class _Progress(Protocol):
    def __call__(self, offset: int) -> None: ...


async def _attempt(
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    sink: Sink,
    out: Outcome,
    size: int | None,
    validator: str | None,
    watchdog: _Watchdog,
    clock: Clock,
    on_bytes: _Progress | None,
) -> None:
    while True:
        holes = sink.holes()
        if not holes:
            out.complete = True
            return
        limiter = _LIMITER.get()
        if limiter is not None:
            limiter.check()  # the run's wire budget, before every request (see _parallel)
        start, end = holes[0]
        size = sink.size if sink.size is not None else size
        await sink.begin_segment(start)
        headers = dict(endpoint.headers)
        # Offsets and digests refer to the encoded blob: never let anything decompress it.
        headers["Accept-Encoding"] = "identity"
        whole = start == 0 and (end is None or end == size)
        if not whole:
            # A hole between good chunks is asked for bounded (it costs only itself); the
            # one that runs to the blob's end as ``bytes=A-``, as every resume always was.
            # Either way the 206 must match both ends: the end is the size-1 we expect.
            last = "" if end is None or end == size else str(end - 1)
            headers["Range"] = f"bytes={start}-{last}"
            if validator:
                headers["If-Range"] = validator
        out.requests += 1
        resp = await _open(session, endpoint.url, headers, verify_tls=endpoint.verify_tls)
        try:
            out.status = resp.status
            with _paced_reads(resp):
                finished = await _handle(
                    resp, sink, out, (start, end), size, validator, watchdog, clock, on_bytes
                )
        finally:
            resp.close()  # never return a half-read connection to the pool
        if finished:
            out.complete = True
            return


async def revalidate(
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    validator: str,
    size: int,
    *,
    timeout: float = 30.0,
) -> bool:
    """Does ``endpoint`` still serve the ``size`` bytes that had ``validator``?

    One byte asked for with ``If-Range``: a 206 for the same total says unchanged; a 200
    (changed, or a weak validator), an error, no answer within ``timeout`` s or anything
    else says "fetch it again".
    """
    headers = dict(endpoint.headers)
    headers.update({"Accept-Encoding": "identity", "Range": "bytes=0-0", "If-Range": validator})
    try:
        async with asyncio.timeout(timeout or None):
            resp = await _open(session, endpoint.url, headers, verify_tls=endpoint.verify_tls)
            try:
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                return resp.status == 206 and m is not None and m.group(3) == str(size)
            finally:
                resp.close()
    except (TransferError, TimeoutError):
        return False


async def _open(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], *, verify_tls: bool = True
) -> aiohttp.ClientResponse:
    # The one HTTP edge: redirects (Range kept, Authorization dropped off-origin).
    limiter = _LIMITER.get()
    # Under a cap, aiohttp reads ahead of us no more than one paced read (``_paced_reads``).
    bufsize = limiter.read_size() if limiter is not None else None
    return await http.open_get(session, url, headers, verify_tls=verify_tls, read_bufsize=bufsize)


@contextlib.contextmanager
def _paced_reads(resp: aiohttp.ClientResponse) -> Iterator[None]:
    """Under a rate cap, each network read of ``resp``'s body takes at most the limiter's
    ``read_size``. aiohttp's read_bufsize (see ``_open``) bounds only what it buffers
    between reads; one read of asyncio's socket transport takes up to 256 KiB, held by
    us until its tokens come, sent by the server ahead of the cap. ``max_size`` is that
    transport's read size (uvloop's and TLS transports have none: they keep theirs)."""
    limiter = _LIMITER.get()
    size = limiter.read_size() if limiter is not None else None
    conn = resp.connection
    transport = conn.transport if conn is not None else None
    was = getattr(transport, "max_size", None)
    if size is None or not isinstance(was, int):
        yield
        return
    transport.max_size = size  # type: ignore[union-attr]
    try:
        yield
    finally:
        transport.max_size = was  # type: ignore[union-attr]


async def _handle(
    resp: aiohttp.ClientResponse,
    sink: Sink,
    out: Outcome,
    asked: tuple[int, int | None],
    size: int | None,
    validator: str | None,
    watchdog: _Watchdog,
    clock: Clock,
    on_bytes: _Progress | None,
) -> bool:
    """Read one response into the sink. True when the blob is known to be complete
    without another look at its holes (a 416 at its very end)."""
    where = redact_url(str(resp.url))
    status = resp.status
    start, end = asked
    if status == 416:
        m = _UNSATISFIED.match(resp.headers.get("Content-Range", ""))
        total = int(m.group(1)) if m else None
        # The registry's 416 body can be shorter than its Content-Length: never read it.
        if total is not None and start == total and (size is None or size == total):
            return True
        if start == 0:
            raise BrokenServerError(f"{where}: 416 for a request from byte 0", status=416)
        # The partial is not of the server's object: the attempt policy restarts it.
        raise RangeRestartError(
            f"{where}: 416 at offset {start} (server size {total}); partial discarded",
            status=416,
        )
    error = http.status_error(status, where, resp.headers, clock)
    if error is not None:
        raise error

    new_validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
    if status == 206:
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        total = None if m is None or m.group(3) == "*" else int(m.group(3))
        if (
            m is None
            or int(m.group(1)) != start
            or (end is not None and int(m.group(2)) != end - 1)
            or (size is not None and total != size)
        ):
            want = f"{start}-{'' if end is None else end - 1}"
            raise BrokenServerError(
                f"{where}: asked for bytes {want}, got Content-Range "
                f"{resp.headers.get('Content-Range')!r}",
                status=206,
            )
        if size is None and total is not None:
            await sink.set_validator(validator or new_validator, total)
            size = total
        plan: list[tuple[int, int | None]] = [(start, int(m.group(2)) + 1)]
    else:
        length = resp.content_length
        if size is None and length is not None:
            size = length
        held = sink.holes() != [(0, size)]
        if held and validator and new_validator and new_validator != validator:
            # If-Range failed: the resource changed, so the partial is of another object,
            # and so is the size learned before.
            out.restarted = True
            await sink.reset(new_validator)
            size = length
            held = False
        elif held:
            out.range_ignored = True  # the whole blob comes: only its holes are kept
            if sink.size is None and size is not None:
                await sink.set_validator(validator or new_validator, size)
        if not held:
            await sink.set_validator(new_validator, size)
            await sink.begin_segment(0)
        plan = [(a, size if b is None else b) for a, b in sink.holes()]
    return await _read_body(resp, sink, out, plan, size, watchdog, on_bytes, where)


async def _read_body(
    resp: aiohttp.ClientResponse,
    sink: Sink,
    out: Outcome,
    plan: list[tuple[int, int | None]],
    size: int | None,
    watchdog: _Watchdog,
    on_bytes: _Progress | None,
    where: str,
) -> bool:
    """Read a body that starts at ``plan[0][0]`` (a 206) or at 0 (a 200), writing the
    bytes that fall in the planned holes and discarding the rest as waste.

    Reading stops after the last hole: what follows is already here. A body that runs
    past the blob's size fails the attempt, and so does one that ends inside a hole.
    True when the body ended a blob of unknown size (its end is the blob's end).
    """
    pos = plan[0][0] if resp.status == 206 else 0
    holes = list(plan)
    # A 200 whose last hole runs to the blob's end is read to its end: a byte past the
    # size fails the attempt. Otherwise reading stops after the last hole.
    to_end = resp.status == 200 and plan[-1][1] in (None, size)

    async def consume(data: bytes) -> bool:
        """Take one received piece; False once every hole is filled (stop reading)."""
        nonlocal pos
        n = len(data)
        limiter = await _count(out, watchdog, n)
        view = memoryview(data)
        while view:
            if not holes:
                out.discard(len(view), "range-ignored" if _inside(pos, size) else "overlong-body")
                if not _inside(pos, size):
                    raise BrokenServerError(f"{where}: body longer than the expected size {size}")
                return False
            a, b = holes[0]
            if pos < a:
                take = min(len(view), a - pos)
                out.discard(take, "range-ignored")
                view, pos = view[take:], pos + take
                continue
            if pos == a and sink.offset != a:
                await sink.begin_segment(a)
            take = len(view) if b is None else min(len(view), b - pos)
            await sink.write(bytes(view[:take]) if take < n else data)
            out.kept_bytes += take
            view, pos = view[take:], pos + take
            if on_bytes is not None:
                on_bytes(pos)
            if b is not None and pos >= b:
                holes.pop(0)
                if holes:
                    holes[0] = (max(holes[0][0], pos), holes[0][1])
        if limiter is not None and holes:
            limiter.check()  # the run's wire budget: stop once spent (this read is kept)
        return bool(holes) or to_end

    if resp.status == 206 or (len(holes) == 1 and holes[0][0] == 0):
        lone = holes[0]
        if _can_read_direct(resp, sink, pos, lone):
            assert isinstance(sink, DirectSink)
            await _read_direct(resp, sink, out, consume, watchdog, on_bytes, where)
            return lone[1] is None

    await _read_pieces(resp.content, consume, watchdog, where, lambda: pos)
    if holes and (holes[0][1] is not None or pos < holes[0][0]):
        want = holes[0][1] if holes[0][1] is not None else holes[0][0]
        raise ConnectionCutError(f"{where}: connection closed at byte {pos} of {want}")
    return bool(holes) and holes[-1][1] is None


async def _count(out: Outcome, watchdog: _Watchdog, n: int) -> Limiter | None:
    """Book ``n`` received bytes: the wire count, the stall watchdog, and the rate cap
    (wait for this read's tokens, booked against the budget first: waiting for them is
    our pause, not the server's silence). The limiter, for the caller's budget check."""
    out.wire_bytes += n
    watchdog.progress(n)
    limiter = _LIMITER.get()
    if limiter is not None:
        await limiter.take(n, lambda: watchdog.progress(0))
    return limiter


async def _read_pieces(
    content: aiohttp.StreamReader,
    take: Callable[[bytes], Awaitable[bool]],
    watchdog: _Watchdog,
    where: str,
    at: Callable[[], int],
) -> None:
    """Hand each received piece of a body to ``take`` until it says stop (False) or the
    body ends. A broken connection first hands on what aiohttp had buffered ahead of
    the cut (it raises before returning it), then fails the attempt: a StallError if the
    watchdog ended it, else a ConnectionCutError naming byte ``at()``."""
    while True:
        try:
            # readchunk hands over one received buffer as is; readany would join them all.
            data, _ = await content.readchunk()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            for piece in _salvage(content):
                if not await take(piece):
                    break
            if watchdog.stalled:
                raise StallError(f"{where}: {watchdog.stalled}") from exc
            raise ConnectionCutError(f"{where}: {_describe(exc)} at byte {at()}") from exc
        if not data or not await take(data):
            break
    if watchdog.stalled:
        raise StallError(f"{where}: {watchdog.stalled}")


def _inside(pos: int, size: int | None) -> bool:
    return size is None or pos < size


def _can_read_direct(
    resp: aiohttp.ClientResponse, sink: Sink, pos: int, hole: tuple[int, int | None]
) -> bool:
    """The plain case only: an identity body of known length that is all ours to keep.

    Everything else (chunked, Range ignored, a length other than expected) reads through
    aiohttp's StreamReader below, where each of those rules lives.
    """
    length = resp.content_length
    conn = resp.connection
    start, end = hole
    return (
        _DIRECT_BODY
        and isinstance(sink, DirectSink)
        and pos == start == sink.offset
        and length is not None
        and length > 0
        and (end is None or start + length == end)
        and "Transfer-Encoding" not in resp.headers
        and conn is not None
        and conn.transport is not None
        and not conn.transport.is_closing()
        and resp.content.exception() is None
        # A body aiohttp already holds in full is complete in its eyes: it may have handed
        # the connection back to its pool, which must never carry our protocol.
        and resp.content.total_bytes < length
    )


async def _read_direct(
    resp: aiohttp.ClientResponse,
    sink: DirectSink,
    out: Outcome,
    consume: Callable[[bytes], Awaitable[bool]],
    watchdog: _Watchdog,
    on_bytes: _Progress | None,
    where: str,
) -> None:
    """Read the rest of the body straight into the sink's slabs.

    aiohttp has parsed the status line and headers (and owns every HTTP rule); what is
    left of an identity body with a Content-Length is a byte count. Taking the transport
    over with a BufferedProtocol skips, per network read, a fresh buffer, the parser's
    copy into another, the StreamReader and a task wake-up.
    """
    conn = resp.connection
    assert conn is not None and conn.transport is not None
    transport = conn.transport
    content = resp.content
    length = resp.content_length
    assert length is not None
    # Synchronously, so no read can land in between: take what aiohttp already buffered
    # (each read_nowait also lets its parser release bytes it held while paused), then
    # switch the transport to our protocol, paused until those bytes are handed on.
    protocol = conn.protocol
    early: list[bytes] = []
    while piece := content.read_nowait():
        early.append(piece)
    body = _DirectBody(sink, protocol, length - sum(map(len, early)), out, watchdog)
    transport.pause_reading()
    transport.set_protocol(body)
    try:
        for piece in early:
            await consume(piece)
        if body.remaining <= 0:
            body.finish()
        else:
            await sink.begin_direct()
            body.on_bytes = on_bytes
            body.start(transport)
        await body.done
    finally:
        body.stop()
        # Hand the connection back: aiohttp closes it when the response is closed, and
        # its connector waits for its own protocol to see that close at shutdown.
        if not body.closed and protocol is not None:
            transport.set_protocol(protocol)
    if watchdog.stalled:
        raise StallError(f"{where}: {watchdog.stalled}")
    if body.error is not None:
        raise body.error
    if body.lost is not None or body.remaining > 0:
        wrote = sink.offset
        cause = _describe(body.lost) if body.lost is not None else "connection closed"
        raise ConnectionCutError(f"{where}: {cause} at byte {wrote} ({body.remaining} short)")
    out.complete = True


#: the most a direct read reserves from the limiter at once (one receive buffer)
_MAX_GRANT = 256 * 1024


class _DirectBody(asyncio.BufferedProtocol):
    """Counts an identity body down to zero, landing each read in the sink."""

    def __init__(
        self,
        sink: DirectSink,
        aiohttp_protocol: asyncio.BaseProtocol | None,
        remaining: int,
        out: Outcome,
        watchdog: _Watchdog,
    ) -> None:
        self.sink = sink
        self.remaining = remaining
        self.out = out
        self.watchdog = watchdog
        self.on_bytes: _Progress | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error: BaseException | None = None
        self.lost: BaseException | None = None
        self.closed = False
        self._aiohttp = aiohttp_protocol
        self._transport: asyncio.Transport | None = None
        self._paused = True
        #: the engine's limiter: each read lands at most its grant (rate tokens, budget)
        self._limiter = _LIMITER.get()
        self._grant = 0
        self._wake: asyncio.TimerHandle | None = None

    def start(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._resume()

    def stop(self) -> None:
        """No more reads (the attempt ends; the connection is closed by our caller)."""
        self._pause()
        self.finish()
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        if self._limiter is not None:
            self._limiter.leave(self)
            if self._grant > 0:
                self._limiter.give_back(self._grant)
                self._grant = 0

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def _pause(self) -> None:
        if not self._paused and self._transport is not None and not self.closed:
            self._paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self.done.done() or self.closed or self._transport is None:
            return
        if not self.sink.room():
            self.sink.on_room(self._resume)
            return
        if self._limiter is not None and self._grant <= 0 and not self._regrant():
            return
        if self._paused:
            self._paused = False
            self._transport.resume_reading()

    def _regrant(self) -> bool:
        """Reserve the next read from the limiter. False when there is none to take now:
        a wake-up is scheduled for when its tokens are due, or the spent wire budget has
        ended the body."""
        limiter = self._limiter
        assert limiter is not None
        self._grant = limiter.grant(min(self.remaining, _MAX_GRANT), self)
        if self._grant > 0:
            return True
        if limiter.spent:
            self.error = limiter.error()
            self.stop()
        elif self._wake is None:
            loop = asyncio.get_running_loop()
            self._wake = loop.call_later(limiter.due(self.remaining, self), self._woken)
        return False

    def _woken(self) -> None:
        self._wake = None
        self.watchdog.progress(0)  # we paused ourselves: not the server's silence
        self._resume()

    # asyncio.BufferedProtocol

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._limiter is None:
            return self.sink.recv_buffer(self.remaining)
        return self.sink.recv_buffer(min(self.remaining, self._grant))

    def buffer_updated(self, nbytes: int) -> None:
        self.remaining -= nbytes
        out = self.out
        out.wire_bytes += nbytes
        out.kept_bytes += nbytes
        self.watchdog.progress(nbytes)
        if self._limiter is not None:
            self._grant -= nbytes
            self._limiter.received(nbytes)
        try:
            self.sink.received(nbytes)
        except BaseException as exc:  # a write error: end the attempt with it
            self.error = exc
            self.stop()
            return
        if self.on_bytes is not None:
            self.on_bytes(self.sink.offset)
        if self.remaining <= 0:
            self.stop()
        elif not self.sink.room():
            self._pause()
            self.sink.on_room(self._resume)
        elif self._limiter is not None and self._grant <= 0 and not self._regrant():
            self._pause()  # until the wake-up _regrant scheduled (or for good: budget)

    def eof_received(self) -> bool | None:
        self.finish()  # short if remaining > 0: our caller says so
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = exc
        self.finish()
        # aiohttp's protocol still tracks this connection: let it see the close too.
        if self._aiohttp is not None:
            self._aiohttp.connection_lost(exc)


def _salvage(content: aiohttp.StreamReader) -> list[bytes]:
    """Bytes aiohttp buffered before the connection broke (it raises before returning them)."""
    pieces: list[bytes] = []
    buffer = getattr(content, "_buffer", None)
    take = getattr(content, "_read_nowait_chunk", None)
    while buffer and take is not None:
        pieces.append(take(-1))
    return pieces


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    # aiohttp messages can quote the full URL, userinfo and query string included.
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+", lambda m: redact_url(m.group(0)), text)


class _Watchdog:
    """Cancels the attempt's task on a stall: one timer, nothing per read on the hot path."""

    def __init__(self, policy: StallPolicy) -> None:
        self.policy = policy
        self.stalled: str | None = None
        self.task: asyncio.Task[Any] | None = None
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._window_start = self._last
        self._window_bytes = 0
        ticks = [x for x in (policy.timeout, policy.window if policy.min_rate else 0) if x > 0]
        self._tick = max(0.01, min([*ticks, 4.0]) / 4)
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(self._tick, self._check)

    def progress(self, n: int) -> None:
        self._last = self._loop.time()
        self._window_bytes += n

    def _check(self) -> None:
        now = self._loop.time()
        p = self.policy
        if p.timeout and now - self._last >= p.timeout:
            self.stalled = f"stalled: no data for {p.timeout:g} s"
        elif p.min_rate and p.window and now - self._window_start >= p.window:
            rate = self._window_bytes / (now - self._window_start)
            if rate < p.min_rate:
                self.stalled = (
                    f"too slow: {rate:.0f} B/s over {p.window:g} s "
                    f"(low-speed limit {p.min_rate} B/s)"
                )
            self._window_start, self._window_bytes = now, 0
        if self.stalled:
            self._timer = None
            if self.task is not None:
                self.task.cancel()
            return
        self._timer = self._loop.call_later(self._tick, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _current_cancelling() -> int:
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0
