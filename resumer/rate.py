"""What every transfer of a process shares on the wire: one rate cap, one byte budget.

- ``TokenBucket``: ``max-download-rate`` bytes/s for every transfer of the process
  together. Tokens refill at ``rate`` up to ``burst``, which is kept small (a tenth of a
  second of the rate, at most 256 KiB) so that the cap holds over short windows too:
  over any window of w seconds, at most ``rate × w + burst`` bytes are granted.
- ``WireBudget``: ``max-wire-bytes`` body bytes for one run. Once spent, every transfer
  stops with ``WireBudgetExhaustedError`` (not retryable); the partials are kept, so the
  next run continues from them.
- ``Limiter``: both, as fetch.py asks them where it reads bytes. The engine owns one and
  hands it to every attempt (``TransferContext.limiter``). Under a cap it also says how
  much one network read may take (``read_size``): the cap counts bytes where we read
  them, so whatever a read takes ahead of its tokens was sent ahead of the cap. Reads of
  256 KiB, a dozen connections each holding one while it waits its turn, swung the rate
  the server saw by MiBs.

The math runs on an injected ``Clock`` (tests use a FakeClock). Waiting never polls:
``take`` sleeps until the tokens it needs are due, and a paused direct read asks ``due``
when to resume (fetch.py schedules that with ``loop.call_later``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable

from .clock import Clock, SystemClock
from .config import KiB, format_size
from .errors import ConfigError, WireBudgetExhaustedError

#: the largest burst: one network read (fetch.py's receive buffers are 256 KiB)
MAX_BURST = 256 * KiB
#: a waiter wakes for at least this many tokens (or the burst, if smaller): few wake-ups
MIN_GRANT = 16 * KiB
#: how long a reader waits when the budget's remaining bytes are all reserved by others
_RESERVED_RETRY = 0.05
#: under a cap, one network read takes at most this many seconds of the rate, within
#: these bounds (256 KiB is also the session's read size, uncapped)
READ_AHEAD = 0.01
MIN_READ_SIZE = 16 * KiB
MAX_READ_SIZE = 256 * KiB


def default_burst(rate: float) -> int:
    """A tenth of a second of ``rate``, at most 256 KiB, and at least 16 KiB (or ``rate``
    itself when that is smaller: a bucket must hold at least one second's worth to refill
    below 16 KiB/s in whole bytes)."""
    return max(1, int(min(MAX_BURST, max(rate / 10, min(rate, MIN_GRANT)))))


def format_rate(rate: float) -> str:
    """``2 MiB/s``, ``1536 KiB/s``, ``1000 B/s``."""
    return f"{format_size(int(rate))}/s"


def limits_text(rate: int, wire_bytes: int) -> list[str]:
    """The lines progress shows for the limits in force ("Rate limit: 2 MiB/s")."""
    lines = []
    if rate > 0:
        lines.append(f"Rate limit: {format_rate(rate)} (every transfer together)")
    if wire_bytes > 0:
        lines.append(f"Wire budget: {format_size(wire_bytes)} for this run")
    return lines


class TokenBucket:
    """``rate`` bytes/s with a bucket of ``burst`` bytes, on ``clock``.

    Fair: a reader that found too few tokens waits in line (``who``, any hashable), and
    the next tokens are the first waiter's, whoever asks. Without that, a reader that asks
    from a transport callback the moment its grant runs out beats one whose wake-up goes
    through the event loop's ready queue, every time, and starves it. A waiter leaves the
    line when it is granted, or with ``leave(who)`` when it stops waiting.
    """

    def __init__(self, rate: float, *, burst: int | None = None, clock: Clock | None = None):
        if not rate > 0:
            raise ConfigError(f"a rate limit must be above 0 bytes/s, got {rate!r}")
        self.rate = float(rate)
        self.burst = default_burst(rate) if burst is None else burst
        if self.burst < 1:
            raise ConfigError(f"a burst must be at least 1 byte, got {self.burst}")
        self.clock: Clock = clock or SystemClock()
        self._tokens = float(self.burst)
        self._at = self.clock.monotonic()
        #: tokens granted since the bucket was made, net of those given back (for tests)
        self.granted = 0
        self._line: deque[Hashable] = deque()
        #: the fewest tokens each waiter in line needs: when the first is served
        self._floors: dict[Hashable, int] = {}

    @property
    def least(self) -> int:
        """The fewest tokens a waiter wakes for (unless it wants fewer): at most half the
        burst, so that the tokens that arrive while it wakes up are not lost to the cap."""
        return max(1, min(self.burst // 2, MIN_GRANT))

    def _refill(self) -> None:
        now = self.clock.monotonic()
        if now > self._at:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = max(self._at, now)

    def available(self) -> int:
        self._refill()
        return int(self._tokens)

    def grant(self, want: int, least: int | None = None, who: Hashable | None = None) -> int:
        """Take up to ``want`` tokens now, if at least ``min(want, least)`` are there
        (``least`` defaults to ``self.least``) and it is ``who``'s turn; how many were
        taken (0: ``who`` waits in line, ask ``due`` when to come back)."""
        if want <= 0:
            return 0
        self._refill()
        floor = min(want, self.least if least is None else max(1, least))
        # A hair of slack: time in floating point makes 0.1 s at 1000 B/s 99.99… tokens.
        tokens = int(self._tokens + 1e-6)
        line = self._line
        # Someone else's turn, unless the bucket is full (more would be lost meanwhile).
        not_ours = bool(line) and line[0] != who and tokens < self.burst
        if tokens < floor or not_ours:
            if who is not None:
                if who not in self._floors:
                    line.append(who)
                self._floors[who] = floor
            return 0
        self.leave(who)
        got = min(want, tokens)
        self._tokens -= got
        self.granted += got
        return got

    def leave(self, who: Hashable | None) -> None:
        """``who`` no longer waits (granted, or it stopped reading)."""
        if who is not None and self._floors.pop(who, None) is not None:
            self._line.remove(who)

    def give_back(self, n: int) -> None:
        """Return ``n`` granted tokens that were not used (never beyond the burst)."""
        if n <= 0:
            return
        self._refill()
        self._tokens = min(float(self.burst), self._tokens + n)
        self.granted -= n

    def due(self, want: int, who: Hashable | None = None) -> float:
        """Seconds until ``grant(want, who=who)`` may succeed (0: now). A waiter behind
        another comes back once there are tokens for the first waiter and for itself."""
        self._refill()
        floor = min(max(1, want), self.least)
        line = self._line
        if line and line[0] != who:
            floor += self._floors[line[0]]
        need = floor - self._tokens - 1e-6
        if need <= 0:
            return 0.0
        # Rounded up to the millisecond: a wake-up a hair too early would find too few
        # tokens and sleep again for nothing.
        return max(0.001, -(-need / self.rate * 1000 // 1) / 1000)

    async def take(self, n: int, on_grant: Callable[[], None] | None = None) -> None:
        """Wait until ``n`` tokens are granted, in pieces of at most ``burst``, sleeping
        on the clock until each is due; ``on_grant()`` after each piece."""
        who = object()
        try:
            while n > 0:
                got = self.grant(n, who=who)
                if got:
                    n -= got
                    if on_grant is not None:
                        on_grant()
                    continue
                await self.clock.sleep(self.due(n, who))
        finally:
            self.leave(who)


class WireBudget:
    """At most ``limit`` body bytes received in one run, by every transfer together.

    ``used`` counts what was received; ``reserved`` what readers were granted and have not
    received yet (a direct read lands at most its grant, so the budget is never overrun
    there). ``spent`` once ``used`` reaches ``limit``.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ConfigError(f"max-wire-bytes must be at least 1 byte, got {limit}")
        self.limit = limit
        self.used = 0
        self.reserved = 0

    @property
    def spent(self) -> bool:
        return self.used >= self.limit

    def free(self) -> int:
        """Bytes neither received nor reserved."""
        return max(0, self.limit - self.used - self.reserved)

    def error(self) -> WireBudgetExhaustedError:
        return WireBudgetExhaustedError(self.limit, self.used)


class Limiter:
    """The rate cap and the wire budget as fetch.py asks them, one per engine.

    Two ways to read, matching fetch.py's two paths:
    - the StreamReader path has its bytes before it asks: ``await take(n)`` books them
      against the budget and waits for their tokens; ``check()`` then stops the attempt
      if the budget is spent (that read, the one that crossed the limit, is kept);
    - the direct path asks before it reads: ``grant(want)`` reserves what it may read now
      (0: ask ``spent``, else try again after ``due(want)``), ``received(n)`` books each
      read, ``give_back(n)`` returns what a stopped read did not use.
    """

    def __init__(
        self,
        *,
        rate: float = 0,
        wire_bytes: int = 0,
        burst: int | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.bucket = TokenBucket(rate, burst=burst, clock=clock) if rate > 0 else None
        self.budget = WireBudget(wire_bytes) if wire_bytes > 0 else None

    @property
    def spent(self) -> bool:
        return self.budget is not None and self.budget.spent

    def read_size(self) -> int | None:
        """The most one network read may take under the rate cap (None: no cap)."""
        if self.bucket is None:
            return None
        return max(MIN_READ_SIZE, min(MAX_READ_SIZE, int(self.bucket.rate * READ_AHEAD)))

    @property
    def used(self) -> int:
        """Body bytes booked against the budget (0 without one)."""
        return self.budget.used if self.budget is not None else 0

    def error(self) -> WireBudgetExhaustedError:
        assert self.budget is not None
        return self.budget.error()

    def check(self) -> None:
        """Raise ``WireBudgetExhaustedError`` if the run's budget is spent."""
        if self.budget is not None and self.budget.spent:
            raise self.budget.error()

    async def take(self, n: int, on_grant: Callable[[], None] | None = None) -> None:
        """``n`` bytes already received: book them, then wait for their tokens."""
        if self.budget is not None:
            self.budget.used += n
        if self.bucket is not None:
            await self.bucket.take(n, on_grant)

    def grant(self, want: int, who: Hashable | None = None) -> int:
        """Reserve up to ``want`` bytes for ``who`` to read now (tokens and budget); 0 if
        none (``who`` then waits in the bucket's line: ``leave(who)`` when it stops)."""
        if self.budget is not None:
            want = min(want, self.budget.free())
        if want <= 0:
            return 0
        got = self.bucket.grant(want, who=who) if self.bucket is not None else want
        if self.budget is not None:
            self.budget.reserved += got
        return got

    def received(self, n: int) -> None:
        """``n`` bytes of a grant were read."""
        if self.budget is not None:
            self.budget.reserved = max(0, self.budget.reserved - n)
            self.budget.used += n

    def give_back(self, n: int) -> None:
        """``n`` granted bytes will not be read."""
        if n <= 0:
            return
        if self.bucket is not None:
            self.bucket.give_back(n)
        if self.budget is not None:
            self.budget.reserved = max(0, self.budget.reserved - n)

    def due(self, want: int, who: Hashable | None = None) -> float:
        """When a ``grant(want, who)`` that returned 0 (budget not spent) may succeed."""
        if self.budget is not None and self.budget.free() <= 0:
            return _RESERVED_RETRY  # others hold the rest: they read it or give it back
        return self.bucket.due(want, who) if self.bucket is not None else 0.0

    def leave(self, who: Hashable) -> None:
        """``who`` stopped reading: it no longer waits for tokens."""
        if self.bucket is not None:
            self.bucket.leave(who)


def limiter_for(rate: int, wire_bytes: int, clock: Clock | None = None) -> Limiter | None:
    """The engine's limiter for ``max-download-rate`` and ``max-wire-bytes`` (None: neither)."""
    if rate <= 0 and wire_bytes <= 0:
        return None
    return Limiter(rate=rate, wire_bytes=wire_bytes, clock=clock)
