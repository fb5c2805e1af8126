"""One attempt of a (Range) GET over aiohttp, following DESIGN.md's response table.

| response                                   | action                                         |
|--------------------------------------------|------------------------------------------------|
| 206, Content-Range start = offset, total ok | append                                         |
| 206 with any other Content-Range           | fail the attempt, write nothing                |
| 200 while asking for offset > 0            | discard the first offset bytes (waste), append |
| 416                                        | complete if offset == size, else start again   |
| 401                                        | UnauthorizedError: caller refreshes once       |
| 404; 403                                   | permanent                                      |
| 408, 429, 5xx, reset, stall                | transient                                      |

Redirects are followed here, by hand: Range and If-Range are kept, Authorization is
dropped when the host changes, and the redirected URL lives only in this attempt.
aiohttp's exceptions end here: they are mapped into resumer.errors.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp

from .clock import Clock
from .errors import (
    AccessDeniedError,
    BrokenServerError,
    ConnectionCutError,
    NotFoundError,
    PermanentError,
    RangeRestartError,
    ServerError,
    StallError,
    TransferError,
    UnauthorizedError,
)
from .source import Endpoint, redact_url

log = logging.getLogger(__name__)

MAX_REDIRECTS = 10
_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED = re.compile(r"^bytes\s+\*/(\d+)$")


class Sink(Protocol):
    """Where an attempt's body goes (an ingest Partial)."""

    offset: int

    async def write(self, data: bytes) -> None: ...

    async def reset(self, validator: str | None = None) -> None: ...

    async def set_validator(self, validator: str | None, size: int | None) -> None: ...


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

    def discard(self, nbytes: int, reason: str) -> None:
        if nbytes <= 0:
            return
        self.discarded_bytes += nbytes
        # The reason that cost the most bytes names the row.
        self.discard_reason = self.discard_reason or reason


def retry_after(value: str | None, clock: Clock) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - clock.time())


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
) -> Outcome:
    """One request/response cycle. Never raises for transfer problems: see ``Outcome.error``."""
    out = Outcome(host=endpoint.host or urlsplit(endpoint.url).netloc, start_offset=sink.offset)
    watchdog = _Watchdog(stall)
    body = asyncio.create_task(
        _attempt(session, endpoint, sink, out, size, validator, watchdog, clock, on_bytes)
    )
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
    offset = sink.offset
    headers = dict(endpoint.headers)
    # Offsets and digests refer to the encoded blob: never let anything decompress it.
    headers["Accept-Encoding"] = "identity"
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    resp = await _open(session, endpoint.url, headers)
    try:
        out.status = resp.status
        await _handle(resp, sink, out, offset, size, validator, watchdog, clock, on_bytes)
    finally:
        resp.close()  # never return a half-read connection to the pool


async def _open(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> aiohttp.ClientResponse:
    origin = urlsplit(url).netloc
    for _ in range(MAX_REDIRECTS + 1):
        try:
            resp = await session.get(
                url, headers=headers, allow_redirects=False, auto_decompress=False
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ConnectionCutError(f"{redact_url(url)}: {_describe(exc)}") from exc
        if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
            resp.release()
            url = urljoin(url, resp.headers["Location"])
            if urlsplit(url).netloc != origin:
                # Credentials are for the registry, never for the storage it redirects to.
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            continue
        return resp
    raise BrokenServerError(f"{redact_url(url)}: more than {MAX_REDIRECTS} redirects")


async def _handle(
    resp: aiohttp.ClientResponse,
    sink: Sink,
    out: Outcome,
    offset: int,
    size: int | None,
    validator: str | None,
    watchdog: _Watchdog,
    clock: Clock,
    on_bytes: _Progress | None,
) -> None:
    where = redact_url(str(resp.url))
    status = resp.status
    if status == 416:
        m = _UNSATISFIED.match(resp.headers.get("Content-Range", ""))
        total = int(m.group(1)) if m else None
        # The registry's 416 body can be shorter than its Content-Length: never read it.
        if total is not None and offset == total and (size is None or size == total):
            out.complete = True
            return
        if offset == 0:
            raise BrokenServerError(f"{where}: 416 for a request from byte 0", status=416)
        out.restarted = True
        await sink.reset()
        raise RangeRestartError(
            f"{where}: 416 at offset {offset} (server size {total}); partial discarded",
            status=416,
        )
    if status == 401:
        raise UnauthorizedError(
            f"{where}: 401 Unauthorized", challenge=resp.headers.get("WWW-Authenticate")
        )
    if status == 403:
        raise AccessDeniedError(f"{where}: 403 Forbidden", status=403)
    if status == 404:
        raise NotFoundError(f"{where}: 404 Not Found", status=404)
    if status in (408, 429) or 500 <= status < 600:
        raise ServerError(
            f"{where}: HTTP {status}",
            status=status,
            retry_after=retry_after(resp.headers.get("Retry-After"), clock),
        )
    if status not in (200, 206):
        raise PermanentError(f"{where}: unexpected HTTP {status}", status=status)

    new_validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
    skip = 0
    if status == 206:
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        total = None if m is None or m.group(3) == "*" else int(m.group(3))
        if m is None or int(m.group(1)) != offset or (size is not None and total != size):
            raise BrokenServerError(
                f"{where}: asked for bytes {offset}-, got Content-Range "
                f"{resp.headers.get('Content-Range')!r}",
                status=206,
            )
        if size is None and total is not None:
            await sink.set_validator(validator or new_validator, total)
            size = total
    else:
        length = resp.content_length
        if size is None and length is not None:
            size = length
        if offset > 0 and validator and new_validator and new_validator != validator:
            # If-Range failed: the resource changed, so the partial is of another object,
            # and so is the size learned before.
            out.restarted = True
            await sink.reset(new_validator)
            offset = 0
            size = length
        elif offset > 0:
            out.range_ignored = True
            skip = offset  # Range ignored: the first offset bytes are waste
        if offset == 0:
            await sink.set_validator(new_validator, size)

    limit = size  # stop at the expected size
    content = resp.content
    wrote = sink.offset

    async def consume(data: bytes) -> None:
        nonlocal skip, wrote
        n = len(data)
        out.wire_bytes += n
        watchdog.progress(n)
        if skip:
            if n <= skip:
                skip -= n
                out.discard(n, "range-ignored")
                return
            out.discard(skip, "range-ignored")
            data = data[skip:]
            skip = 0
            n = len(data)
        if limit is not None and wrote + n > limit:
            keep = limit - wrote
            if keep:
                await sink.write(data[:keep])
                out.kept_bytes += keep
                wrote += keep
            out.discard(n - keep, "overlong-body")
            raise BrokenServerError(f"{where}: body longer than the expected size {limit}")
        await sink.write(data)
        out.kept_bytes += n
        wrote += n
        if on_bytes is not None:
            on_bytes(wrote)

    while True:
        try:
            # readchunk hands over one received buffer as is; readany would join them all.
            data, _ = await content.readchunk()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # aiohttp raises before handing over what arrived ahead of the cut: keep it.
            for piece in _salvage(content):
                await consume(piece)
            if watchdog.stalled:
                raise StallError(f"{where}: {watchdog.stalled}") from exc
            raise ConnectionCutError(f"{where}: {_describe(exc)} at byte {wrote}") from exc
        if not data:
            break
        await consume(data)
    if watchdog.stalled:
        raise StallError(f"{where}: {watchdog.stalled}")
    if limit is not None and wrote < limit:
        raise ConnectionCutError(f"{where}: connection closed at byte {wrote} of {limit}")
    out.complete = True


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
    # aiohttp messages can quote the full URL, query string included: strip it.
    return re.sub(r"(https?://[^\s'\"?]+)\?[^\s'\"]*", r"\1?…", text)


class _Watchdog:
    """Cancels the attempt's task on a stall: one timer, nothing per read on the hot path."""

    def __init__(self, policy: StallPolicy) -> None:
        self.policy = policy
        self.stalled: str | None = None
        self.task: asyncio.Task[None] | None = None
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
