"""Transfers: one blob taken to commit through attempts, deduplicated and rate-limited.

``run_transfer`` is the resume loop (containerd's ``content.Copy`` plus Docker's attempt
budget). ``TransferManager`` keeps one transfer per digest however many watchers want it,
caps how many run at once, and cancels one only when its last watcher lets go; a
cancelled transfer keeps its partial (nothing lost on failure).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .clock import Clock
from .config import Config
from .content.partial import Ingest, Partial
from .errors import (
    AccessDeniedError,
    BudgetExhaustedError,
    ConnectionCutError,
    DigestMismatchError,
    TransferError,
    UnauthorizedError,
)
from .events import Event, Stats, Status, ignore
from .fetch import Outcome, StallPolicy, attempt
from .retry import AttemptBudget, LinearDelay, countdown, should_retry
from .source import Endpoint, Source
from .store import Store, TransferState

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]


class TransferStatus(enum.Enum):
    WAITING = "waiting"  # queued behind max-concurrent-downloads
    RUNNING = "running"  # attempts in progress
    DONE = "done"  # committed
    FAILED = "failed"  # budget exhausted or permanent error; partial kept


@dataclass(frozen=True)
class BlobRequest:
    """What to transfer. ``key`` is the digest, or ``url:…`` when the digest is unknown.

    ``pull_id`` says which stored pull wants the blob, for the ``attempts`` rows. It is not
    part of the dedup key: a transfer shared by two pulls runs once and its attempts
    name the pull that started it.
    """

    key: str
    source: Source
    digest: str | None = None
    size: int | None = None
    media_type: str | None = None
    pull_id: int | None = field(default=None, compare=False)

    @property
    def id(self) -> str:
        """The 12-hex layer id docker shows."""
        return self.key.split(":", 1)[-1][:12]


@dataclass
class BlobResult:
    path: Path
    digest: str
    size: int
    stats: Stats = field(default_factory=Stats)
    attempts: int = 0
    existed: bool = False


@dataclass
class TransferContext:
    """What every transfer of one engine shares."""

    session: aiohttp.ClientSession
    store: Store
    ingest: Ingest
    config: Config
    clock: Clock
    run_id: str
    #: The pull for attempts whose request names none (``BlobRequest.pull_id`` wins).
    pull_id: int | None = None


def _existing(ctx: TransferContext, req: BlobRequest) -> BlobResult | None:
    """The blob's result if it is already committed in the store (no transfer needed)."""
    if req.digest and ctx.ingest.has_blob(req.digest, req.size):
        path = ctx.ingest.blob_path(req.digest)
        return BlobResult(path, req.digest, path.stat().st_size, existed=True)
    return None


async def run_transfer(ctx: TransferContext, req: BlobRequest, emit: Emit) -> BlobResult:
    """Download one blob to commit, within the attempt budget of this run."""
    cfg, store, clock = ctx.config, ctx.store, ctx.clock
    existing = _existing(ctx, req)
    if existing is not None:
        return existing
    pull_id = req.pull_id if req.pull_id is not None else ctx.pull_id
    stats = Stats()
    partial, reopened = await ctx.ingest.open(
        req.key,
        digest=req.digest,
        size=req.size,
        media_type=req.media_type,
        source=req.source.display,
    )
    budget = AttemptBudget(cfg.max_download_attempts)
    delay = LinearDelay(cfg.retry_delay)
    stall = StallPolicy(cfg.stall_timeout, cfg.low_speed_limit, cfg.low_speed_time)
    chooser = _EndpointChooser()
    attempts = 0
    refreshed = False
    committed = False
    open_attempt: tuple[int, int] | None = None  # (attempt id, start offset) until ended
    last_progress = [0.0]

    def on_bytes(offset: int) -> None:  # the cursor; progress shows all bytes held
        now = clock.monotonic()
        held = partial.held
        if now - last_progress[0] >= 0.1 or held == partial.size:
            last_progress[0] = now
            emit(Event(req.id, Status.DOWNLOADING, held, partial.size))

    try:
        # Inside the try: the partial is open (its recorder task, threads and file) and
        # is closed on every way out, including a failure or a cancel right here.
        for reason, nbytes in reopened.discards.items():
            stats.discard(nbytes, reason)
            await store.record_discard(req.key, ctx.run_id, nbytes, reason)
        while True:
            endpoint = chooser.pick(await req.source.endpoints())
            start = partial.held
            if start > 0:
                partial.mark_resumed()
                stats.resumes += 1
                emit(Event(req.id, Status.RESUMING, start, partial.size, value=start))
            attempts += 1
            stats.attempts += 1
            attempt_id = await store.start_attempt(
                req.key,
                run_id=ctx.run_id,
                attempt_no=attempts,
                host=endpoint.host,
                start_offset=start,
                pull_id=pull_id,
            )
            open_attempt = (attempt_id, start)
            out = Outcome(host=endpoint.host)
            partial.tally = functools.partial(_tally, attempt_id, out, partial)
            out = await attempt(
                ctx.session,
                endpoint,
                partial,
                size=partial.size,
                # A digest already pins the content; If-Range only guards URL-keyed ones.
                validator=None if req.digest else partial.validator,
                stall=stall,
                clock=clock,
                on_bytes=on_bytes,
                out=out,
            )
            await partial.flush()
            partial.tally = None
            err: TransferError | None = out.error
            if out.restarted:
                out.discard(start, "partial-discarded")
            stats.wire_bytes += out.wire_bytes
            if err is None and out.complete:
                emit(Event(req.id, Status.VERIFYING))
                try:
                    path = await partial.commit()
                except DigestMismatchError as exc:
                    err = exc
                    wasted = partial.held
                    await partial.reset()
                    out.discard(wasted, "digest-mismatch")
                else:
                    committed = True
            # Booked once, per reason, after every discard of the attempt is known.
            for reason, nbytes in out.discards.items():
                stats.discard(nbytes, reason)
            await store.end_attempt(
                attempt_id,
                end_offset=partial.held,
                wire_bytes=out.wire_bytes,
                kept_bytes=out.kept_bytes,
                discards=out.discards,
                http_status=out.status,
                error=str(err) if err else None,
            )
            open_attempt = None
            if committed:
                size = path.stat().st_size
                stats.payload_bytes += size
                emit(Event(req.id, Status.DOWNLOAD_COMPLETE))
                digest = req.digest or partial.sha256
                return BlobResult(path, digest, size, stats, attempts)
            assert err is not None
            log.info("%s: attempt %d failed: %s", req.key, attempts, err)
            if out.kept_bytes:
                refreshed = False  # progress was made: a later expiry may refresh again
            if out.range_ignored:
                chooser.range_ignored(endpoint)
            if isinstance(err, UnauthorizedError) or (
                isinstance(err, AccessDeniedError) and err.status == 403
            ):
                # A token refresh is not an attempt (DESIGN.md response table).
                attempts -= 1
                stats.attempts -= 1
                challenge = err.challenge if isinstance(err, UnauthorizedError) else None
                if not refreshed and await req.source.refresh_auth(endpoint, challenge):
                    refreshed = True
                    continue
                raise AccessDeniedError(f"{req.key}: {err} (after a token refresh)", status=401)
            if isinstance(err, ConnectionCutError) and out.wire_bytes == 0:
                chooser.failed(endpoint)
            if not should_retry(err):
                raise err
            if not budget.allows_another(attempts):
                raise BudgetExhaustedError(req.key, attempts, err)
            wait = delay(attempts, getattr(err, "retry_after", None))
            await countdown(wait, clock, lambda n: emit(Event(req.id, Status.RETRYING, value=n)))
    except BaseException as exc:
        if not committed:
            # Shielded: a second cancel must not interrupt the last checkpoint.
            keep = asyncio.ensure_future(_keep_partial(store, partial, req.key, exc, open_attempt))
            await _wait_through_cancels(keep)
        raise


def _tally(attempt_id: int, out: Outcome, partial: Partial) -> tuple[int, int, int, int]:
    return (attempt_id, out.wire_bytes, out.kept_bytes, partial.held)


async def _wait_through_cancels(fut: asyncio.Future[None]) -> None:
    """Await ``fut`` to the end even if we are cancelled meanwhile; re-raise that after."""
    cancelled = False
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancelled = True
    fut.result()
    if cancelled:
        raise asyncio.CancelledError


async def _keep_partial(
    store: Store,
    partial: Partial,
    key: str,
    exc: BaseException,
    open_attempt: tuple[int, int] | None,
) -> None:
    """Nothing lost on failure: checkpoint what we have, and say why we stopped.

    An attempt interrupted mid-flight (cancelled) is ended too, so that only a process
    that died leaves an attempt open. Its wire bytes are not known here: it records the
    bytes it kept, a lower bound.
    """
    cancelled = isinstance(exc, asyncio.CancelledError)
    try:
        await partial.close()
    finally:
        if open_attempt is not None:
            attempt_id, start = open_attempt
            kept = max(0, partial.held - start)
            await store.end_attempt(
                attempt_id,
                end_offset=partial.held,
                wire_bytes=kept,
                kept_bytes=kept,
                discards={},
                http_status=None,
                error="cancelled" if cancelled else str(exc),
            )
        if cancelled:
            await store.finish_transfer(key, TransferState.PARTIAL, error="cancelled")
        else:
            await store.finish_transfer(key, TransferState.FAILED, error=str(exc))


def _settled(task: asyncio.Task[BlobResult]) -> asyncio.Future[None]:
    """A future that ends when ``task`` has ended, however it ended."""

    async def wait() -> None:
        await asyncio.wait([task])
        if not task.cancelled():
            # Its error was its watchers' to see; the last one left: mark it seen, or the
            # loop logs "Task exception was never retrieved" with a traceback.
            task.exception()

    return asyncio.ensure_future(wait())


class _EndpointChooser:
    """Prefers endpoints that connect and honour Range; falls back in order."""

    def __init__(self) -> None:
        self._failed: set[str] = set()
        self._ignores_range: set[str] = set()

    def pick(self, endpoints: list[Endpoint]) -> Endpoint:
        if not endpoints:
            raise TransferError("no endpoint to fetch from")
        for ep in endpoints:
            if ep.host not in self._failed and ep.host not in self._ignores_range:
                return ep
        for ep in endpoints:
            if ep.host not in self._failed:
                return ep
        self._failed.clear()  # everything failed once: start the round again
        return endpoints[0]

    def failed(self, ep: Endpoint) -> None:
        self._failed.add(ep.host)

    def range_ignored(self, ep: Endpoint) -> None:
        self._ignores_range.add(ep.host)


class _Shared:
    def __init__(self, req: BlobRequest) -> None:
        self.req = req
        self.watchers: list[Emit] = []
        self.task: asyncio.Task[BlobResult] | None = None
        self.status = TransferStatus.WAITING
        self.queued = False  # "Waiting" was announced and the slot is not taken yet

    def emit(self, event: Event) -> None:
        for w in list(self.watchers):
            w(event)


class TransferManager:
    """One transfer per digest across all pulls; at most N running at once."""

    def __init__(self, ctx: TransferContext) -> None:
        self.ctx = ctx
        self._sem = asyncio.Semaphore(ctx.config.max_concurrent_downloads)
        self._active: dict[str, _Shared] = {}
        self.running = 0
        self.max_running = 0  # the most that ever ran at once (observable for tests)
        self.started: dict[str, int] = {}  # transfers started per key

    async def fetch(self, req: BlobRequest, emit: Emit = ignore) -> BlobResult:
        """Watch (starting if needed) the transfer of ``req``; cancelling only unwatches."""
        shared = self._active.get(req.key)
        if shared is None or shared.task is None or shared.task.done():
            shared = _Shared(req)
            self._active[req.key] = shared
            shared.task = asyncio.create_task(self._run(shared), name=f"transfer {req.key}")
        shared.watchers.append(emit)
        if shared.queued:
            # Joined a transfer that is queued: it has told the others, tell this one too.
            emit(Event(req.id, Status.WAITING))
        try:
            assert shared.task is not None
            return await asyncio.shield(shared.task)
        except asyncio.CancelledError:
            shared.watchers.remove(emit)
            if not shared.watchers and shared.task is not None:
                if not shared.task.done():
                    shared.task.cancel()  # the partial is kept by run_transfer
                await _wait_through_cancels(_settled(shared.task))
            raise
        finally:
            if emit in shared.watchers:
                shared.watchers.remove(emit)
            if (
                self._active.get(req.key) is shared
                and shared.task is not None
                and shared.task.done()
                and not shared.watchers
            ):
                del self._active[req.key]

    async def close(self) -> None:
        """Cancel the transfers still running and wait until each has ended (keeping its
        partial): no transfer outlives the engine that owns this manager."""
        tasks = [s.task for s in self._active.values() if s.task is not None and not s.task.done()]
        if not tasks:
            return
        for task in tasks:
            task.cancel()

        async def settle() -> None:
            await asyncio.wait(tasks)

        await _wait_through_cancels(asyncio.ensure_future(settle()))

    async def _run(self, shared: _Shared) -> BlobResult:
        req = shared.req
        # Already committed: no slot, no "Waiting", not counted as started.
        existing = _existing(self.ctx, req)
        if existing is not None:
            shared.status = TransferStatus.DONE
            return existing
        if self._sem.locked():
            shared.queued = True
            shared.emit(Event(req.id, Status.WAITING))
        try:
            await self._sem.acquire()
        finally:
            shared.queued = False
        try:
            shared.status = TransferStatus.RUNNING
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.started[req.key] = self.started.get(req.key, 0) + 1
            try:
                result = await run_transfer(self.ctx, req, shared.emit)
            except BaseException:
                shared.status = TransferStatus.FAILED
                raise
            finally:
                self.running -= 1
            shared.status = TransferStatus.DONE
            return result
        finally:
            self._sem.release()
