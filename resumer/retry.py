"""The attempt budget and the retry delay: two small objects, sleep injected.

Docker's semantics: ``max-download-attempts`` N is the total number of attempts per
blob in one run; after failed attempt n the wait is n × step (5, 10, 15 … s), or the
server's Retry-After when that is longer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .clock import Clock
from .errors import (
    BudgetExhaustedError,
    ConfigError,
    DiskFullError,
    ResumerError,
    TransientError,
)


@dataclass(frozen=True)
class AttemptBudget:
    """How many attempts one blob gets in one run. Finite and required."""

    max_attempts: int

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"max-download-attempts must be at least 1, got {self.max_attempts}")

    def allows_another(self, attempts_made: int) -> bool:
        return attempts_made < self.max_attempts


@dataclass(frozen=True)
class LinearDelay:
    """Wait n × step after failed attempt n; Retry-After wins when it is longer."""

    step: float = 5.0

    def __call__(self, failed_attempt: int, retry_after: float | None = None) -> float:
        delay = failed_attempt * self.step
        if retry_after is not None and retry_after > delay:
            return retry_after
        return delay


def fails_for_good(error: BaseException) -> bool:
    """Whether a pull that ended with ``error`` needs a change upstream or on disk before
    a new run can finish it (a 404 manifest, access denied, a corrupt destination), as
    opposed to a spent budget, a cut link or a full disk, which a later run may get past."""
    cause = getattr(error, "cause", error)  # LayerDownloadError names its transfer's error
    if not isinstance(cause, ResumerError):
        return False
    return not isinstance(cause, BudgetExhaustedError | TransientError | DiskFullError)


def should_retry(error: BaseException) -> bool:
    """Whether the error class allows another attempt (the budget decides if one is left)."""
    return isinstance(error, ResumerError) and error.retryable


async def countdown(seconds: float, clock: Clock, tick: Callable[[int], None]) -> None:
    """Sleep ``seconds``, calling ``tick(remaining)`` once per whole second, like docker."""
    remaining = seconds
    while remaining > 0:
        tick(math.ceil(remaining))
        step = min(1.0, remaining)
        await clock.sleep(step)
        remaining -= step
