"""One attempt over several connections: each a bounded Range drawn from the holes.

DESIGN.md, "Segments and repair". One TCP stream on a lossy, high-latency link is capped
near MSS / (RTT · √loss); K streams get about K times that. The shape is aria2's:

- The first connection asks for the first hole, as a bounded Range. Its 206 proves that
  the server honours Range; only then do up to K − 1 more connections start (a server
  that ignores Range, or a host that is down, never sees K connections).
- A connection that finishes its range claims the next free hole; when none is left it
  *steals*: it splits the largest range still running, at a chunk boundary, and takes
  the second half. The connection it stole from stops where its range now ends. So the
  last range never runs alone on one slow connection. Nothing smaller than
  ``min_segment`` is split off.
- A 200 to a range from 0 is the whole blob: that connection goes on alone, the others
  start nowhere. A 200 to any other range is closed unread (the host ignores Range) and
  gives that range back.
- The attempt ends when every connection has ended. A connection that fails ends (its
  range is free again, for the others); the attempt fails only when none is left, with
  the bytes all of them kept, so the policy's rules (budget, delay, at once after
  progress) are the same as for one connection: a link down for good fails the first
  connection, and the attempt, exactly as with K = 1.

Every byte a connection reads past the (shrunk) end of its range is counted as waste
(``segment-overlap``): at most what was in flight when its range was split.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .errors import ConnectionCutError, TransferError


class Segment(Protocol):
    """A stream into the partial (``content.partial.Segment``)."""

    start: int
    end: int | None
    offset: int

    async def write(self, data: bytes) -> None: ...


class Partial(Protocol):
    """What a parallel attempt needs of the partial (``content.partial.Partial``)."""

    key: str
    size: int | None
    chunk_size: int

    def holes(self) -> list[tuple[int, int | None]]: ...

    async def open_segment(self, start: int, end: int | None) -> Any: ...  # a Segment

    async def set_validator(self, validator: str | None, size: int | None) -> None: ...

    async def close_segment(self, seg: Any) -> None: ...


log = logging.getLogger(__name__)


class Plan:
    """Which byte ranges the connections of one attempt are filling."""

    def __init__(self, partial: Partial, min_segment: int) -> None:
        self.partial = partial
        self.min_segment = min_segment
        self.active: list[Segment] = []
        #: no more connections and no more steals (the server ignores Range)
        self.single = False
        #: set by a request at its first 206: the server honours Range, more may start
        self.proven = asyncio.Event()
        #: ranges claimed whose segment is still being opened (they are taken too)
        self.opening: list[tuple[int, int]] = []

    def free(self) -> list[tuple[int, int]]:
        """The holes no running range covers."""
        size = self.partial.size
        assert size is not None
        spans = [(a, size if b is None else b) for a, b in self.partial.holes()]
        taken = sorted(
            [(s.offset, s.end if s.end is not None else size) for s in self.active] + self.opening
        )
        out: list[tuple[int, int]] = []
        for a, b in spans:
            for ta, tb in taken:
                if tb <= a or ta >= b:
                    continue
                if ta > a:
                    out.append((a, ta))
                a = max(a, tb)
                if a >= b:
                    break
            if a < b:
                out.append((a, b))
        return out

    def claim(self) -> tuple[int, int | None] | None:
        """The next range to fetch: a free hole, else the second half of the largest
        running range (split at a chunk boundary), else None. While the size is not
        known only the first connection gets a range (open-ended: its answer says it)."""
        if self.partial.size is None:
            holes = self.partial.holes()
            busy = self.active or self.opening
            return holes[0] if holes and not busy else None
        free = self.free()
        if free:
            self.opening.append(free[0])
            return free[0]
        if self.single or not self.active:
            return None
        victim = max(self.active, key=_remaining)
        rest = _remaining(victim)
        if rest < 2 * self.min_segment:
            return None
        cs = self.partial.chunk_size
        mid = -(-(victim.offset + rest // 2) // cs) * cs
        assert victim.end is not None
        if not victim.offset < mid < victim.end:
            return None
        stolen = (mid, victim.end)
        victim.end = mid
        self.opening.append(stolen)
        log.debug("%s: split %d-%d at %d", self.partial.key, victim.offset, stolen[1], mid)
        return stolen

    def give_back(self, start: int, end: int | None) -> None:
        """A range unused (its connection met a server ignoring Range): the range it was
        split from runs on to its old end, if its connection is still there."""
        for seg in self.active:
            if seg.end == start and end is not None:
                seg.end = end
                return


def _remaining(seg: Segment) -> int:
    return (seg.end or seg.offset) - seg.offset


#: one connection's request for a segment: the bytes it kept, or None (a 200 to a range
#: not from 0, closed unread). Raises TransferError when it fails.
Request = Callable[[Segment, Plan], Awaitable[int | None]]


def may_split(size: int | None, min_segment: int) -> bool:
    """Could a blob of ``size`` ever go over more than one connection? Not below two
    segments: such a blob takes the one-connection path, a plain GET as Docker's."""
    return size is None or size >= 2 * min_segment


async def run(
    partial: Partial,
    *,
    connections: int,
    min_segment: int,
    slots: asyncio.Semaphore | None,
    request: Request,
    where: str,
) -> None:
    """Fill the partial's holes over up to ``connections`` connections (see the module
    docstring). Raises the last connection's error when holes are left."""
    plan = Plan(partial, min_segment)
    errors: list[TransferError] = []

    async def connection(first: bool) -> None:
        while (claim := plan.claim()) is not None:
            start, end = claim
            try:
                seg = await partial.open_segment(start, end)
            finally:
                if claim in plan.opening:
                    plan.opening.remove(claim)
            plan.active.append(seg)
            cancelled = False
            try:
                kept = await request(seg, plan)
            except TransferError as exc:
                errors.append(exc)
                return
            except asyncio.CancelledError:
                # The transfer is being stopped: the stream stays with the partial, whose
                # close hands on and checkpoints what it gathered. Waiting for room here
                # could wait for good (a process that died has no pipeline left).
                cancelled = True
                raise
            finally:
                # Closed (its bytes handed on) before its range looks free: the next
                # stream there may start mid-chunk, after those bytes.
                try:
                    if not cancelled:
                        await partial.close_segment(seg)
                finally:
                    plan.active.remove(seg)
            if kept is None:  # a 200 to a range not from 0: handed back
                plan.give_back(start, end)
                return

    async def extra() -> None:
        await plan.proven.wait()
        if plan.single:
            return
        if slots is None:
            await connection(False)
            return
        async with slots:  # the process-wide cap on extra connections
            await connection(False)

    tasks = [asyncio.create_task(connection(True), name=f"segment 1 {partial.key}")]
    size = partial.size
    if connections > 1 and may_split(size, min_segment):
        tasks += [
            asyncio.create_task(extra(), name=f"segment {i + 2} {partial.key}")
            for i in range(connections - 1)
        ]
    first = tasks[0]

    def first_ended(_: object) -> None:
        # Ended without proving Range (it failed, or met a 200): the others, still
        # waiting, must not start.
        if not plan.proven.is_set():
            plan.single = True
            plan.proven.set()

    first.add_done_callback(first_ended)
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if partial.holes():
        if errors:
            raise errors[-1]
        raise ConnectionCutError(f"{where}: every connection ended with bytes missing")
