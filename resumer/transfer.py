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
from typing import TYPE_CHECKING

from .clock import Clock
from .config import Config
from .content.partial import Ingest, Partial, Reopened
from .errors import (
    ConnectionCutError,
    DigestMismatchError,
    TransferError,
)
from .events import Event, Stats, Status, ignore
from .fetch import Outcome, StallPolicy, attempt
from .hosts import HostHealth
from .retry import Action, AttemptPolicy, give_up
from .source import Endpoint, Source
from .store import Store, TransferState

if TYPE_CHECKING:  # the session's type only: requests go through fetch.py
    import aiohttp

    from .rate import Limiter

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
    #: which host to try first: one record per engine, shared with the registry client
    hosts: HostHealth
    #: The pull for attempts whose request names none (``BlobRequest.pull_id`` wins).
    pull_id: int | None = None
    #: The engine's one rate cap and wire budget, for every attempt (None: neither).
    limiter: Limiter | None = None
    #: extra connections of parallel attempts, for the whole process (set in __post_init__)
    connection_slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.connection_slots = asyncio.Semaphore(self.config.max_extra_connections)


def _existing(ctx: TransferContext, req: BlobRequest) -> BlobResult | None:
    """The blob's result if it is already committed in the store (no transfer needed)."""
    if req.digest and ctx.ingest.has_blob(req.digest, req.size):
        path = ctx.ingest.blob_path(req.digest)
        return BlobResult(path, req.digest, path.stat().st_size, existed=True)
    return None


async def run_transfer(ctx: TransferContext, req: BlobRequest, emit: Emit) -> BlobResult:
    """Download one blob to commit, within the attempt budget of this run."""
    existing = _existing(ctx, req)
    if existing is not None:
        return existing
    partial, reopened = await ctx.ingest.open(
        req.key,
        digest=req.digest,
        size=req.size,
        media_type=req.media_type,
        source=req.source.display,
    )
    return await _Transfer(ctx, req, emit, partial).run(reopened)


class _Transfer:
    """One blob's attempts in one run: each step a method, every decision the policy's.

    The loop (containerd's ``content.Copy`` with Docker's budget): pick a host, make an
    attempt (fetch.py fills the partial's holes), commit when it says complete, book
    the attempt, then retry, refresh, restart or give up as ``AttemptPolicy`` says.
    """

    def __init__(self, ctx: TransferContext, req: BlobRequest, emit: Emit, partial: Partial):
        cfg = ctx.config
        self.ctx, self.req, self.emit, self.partial = ctx, req, emit, partial
        self.store, self.clock = ctx.store, ctx.clock
        self.pull_id = req.pull_id if req.pull_id is not None else ctx.pull_id
        self.stats = Stats()
        # Budget, delays, refresh, restart and give-up: decided by the one policy.
        self.policy = AttemptPolicy.for_config(req.key, cfg)
        self.stall = StallPolicy(cfg.stall_timeout, cfg.low_speed_limit, cfg.low_speed_time)
        self.committed = False
        self.open_attempt: tuple[int, int] | None = None  # (attempt id, start) until ended
        self._last_progress = 0.0

    async def run(self, reopened: Reopened) -> BlobResult:
        req, partial, stats, policy = self.req, self.partial, self.stats, self.policy
        try:
            # Inside the try: the partial is open (its recorder task, threads and file)
            # and is closed on every way out, including a failure or a cancel right here.
            for reason, nbytes in reopened.discards.items():
                stats.discard(nbytes, reason)
                await self.store.record_discard(req.key, self.ctx.run_id, nbytes, reason)
            while True:
                limiter = self.ctx.limiter
                if limiter is not None and limiter.spent and partial.holes():
                    raise limiter.error()  # the run's wire budget: no new request
                endpoint = _pick(self.ctx.hosts, await req.source.endpoints())
                out, path = await self._attempt(endpoint)
                err = out.error
                verdict = None
                _note_host(self.ctx.hosts, endpoint.host, out, err)
                if path is None:
                    assert err is not None
                    log.info("%s: attempt %d failed: %s", req.key, policy.attempts, err)
                    verdict = policy.after_failure(err, kept_bytes=out.kept_bytes)
                    if verdict.action is Action.RESTART and partial.held:
                        # Not the server's object (a 416 below its size): from zero.
                        out.discard(partial.held, "partial-discarded")
                        await partial.reset()
                await self._end_attempt(out)
                if path is not None:
                    return self._done(path)
                assert err is not None and verdict is not None
                stats.attempts = policy.attempts  # a refresh is not an attempt
                if verdict.action is Action.REFRESH:
                    challenge = getattr(err, "challenge", None)
                    if await req.source.refresh_auth(endpoint, challenge):
                        continue
                    verdict = policy.refused(err)
                if verdict.action is Action.GIVE_UP:
                    give_up(verdict, err)
                tick = functools.partial(self._retrying, req.id)
                await policy.wait(verdict, self.clock, tick)
        except BaseException as exc:
            if not self.committed:
                # Shielded: a second cancel must not interrupt the last checkpoint.
                keep = _keep_partial(self.store, partial, req.key, exc, self.open_attempt)
                await _wait_through_cancels(asyncio.ensure_future(keep))
            raise

    async def _attempt(self, endpoint: Endpoint) -> tuple[Outcome, Path | None]:
        """One attempt to the end, and the commit if it completed the blob."""
        req, partial, stats = self.req, self.partial, self.stats
        start = partial.held
        if start > 0:
            partial.mark_resumed()
            stats.resumes += 1
            self.emit(Event(req.id, Status.RESUMING, start, partial.size, value=start))
        attempt_no = self.policy.begin()
        stats.attempts = self.policy.attempts
        attempt_id = await self.store.start_attempt(
            req.key,
            run_id=self.ctx.run_id,
            attempt_no=attempt_no,
            host=endpoint.host,
            start_offset=start,
            pull_id=self.pull_id,
        )
        self.open_attempt = (attempt_id, start)
        out = Outcome(host=endpoint.host)
        partial.tally = functools.partial(_tally, attempt_id, out, partial)
        try:
            await attempt(
                self.ctx.session,
                endpoint,
                partial,
                size=partial.size,
                # A digest already pins the content; If-Range only guards URL-keyed ones.
                validator=None if req.digest else partial.validator,
                stall=self.stall,
                clock=self.clock,
                on_bytes=self._on_bytes,
                out=out,
                limiter=self.ctx.limiter,
                # One connection to a host that ignores Range (DESIGN.md).
                connections=1
                if self.ctx.hosts.ignores_range(endpoint.host)
                else self.ctx.config.max_connections_per_blob,
                min_segment=self.ctx.config.min_segment_size,
                slots=self.ctx.connection_slots,
            )
            await partial.flush()
        finally:
            partial.tally = None
        if out.restarted:
            out.discard(start, "partial-discarded")
        stats.wire_bytes += out.wire_bytes
        if out.error is not None or not out.complete:
            return out, None
        self.emit(Event(req.id, Status.VERIFYING))
        try:
            path = await partial.commit()
        except DigestMismatchError as exc:
            # Wrong content, resumed or not: none of it is worth keeping.
            out.error = exc
            out.discard(partial.held, "digest-mismatch")
            await partial.reset()
            return out, None
        self.committed = True
        return out, path

    async def _end_attempt(self, out: Outcome) -> None:
        """Book the attempt: every discard, per reason, once all of them are known."""
        assert self.open_attempt is not None
        for reason, nbytes in out.discards.items():
            self.stats.discard(nbytes, reason)
        await self.store.end_attempt(
            self.open_attempt[0],
            end_offset=self.partial.held,
            wire_bytes=out.wire_bytes,
            kept_bytes=out.kept_bytes,
            discards=out.discards,
            http_status=out.status,
            error=str(out.error) if out.error else None,
        )
        self.open_attempt = None

    def _done(self, path: Path) -> BlobResult:
        size = path.stat().st_size
        self.stats.payload_bytes += size
        self.emit(Event(self.req.id, Status.DOWNLOAD_COMPLETE))
        digest = self.req.digest or self.partial.sha256
        return BlobResult(path, digest, size, self.stats, self.policy.attempts)

    def _on_bytes(self, offset: int) -> None:  # the cursor; progress shows all bytes held
        now = self.clock.monotonic()
        held = self.partial.held
        if now - self._last_progress >= 0.1 or held == self.partial.size:
            self._last_progress = now
            self.emit(Event(self.req.id, Status.DOWNLOADING, held, self.partial.size))

    def _retrying(self, layer_id: str, seconds: int) -> None:
        self.emit(Event(layer_id, Status.RETRYING, value=seconds))


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


def _pick(hosts: HostHealth, endpoints: list[Endpoint]) -> Endpoint:
    """The endpoint to try: the healthiest host, Range honoured first."""
    if not endpoints:
        raise TransferError("no endpoint to fetch from")
    return hosts.order(endpoints)[0]


def _note_host(hosts: HostHealth, host: str, out: Outcome, err: TransferError | None) -> None:
    """Tell the shared host record what this attempt learned about ``host``."""
    if out.range_ignored:
        hosts.range_ignored(host)
    if isinstance(err, ConnectionCutError) and out.status is None and out.wire_bytes == 0:
        hosts.failed(host)  # no answer at all
    elif out.status is not None:
        hosts.succeeded(host)


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
