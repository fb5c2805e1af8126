"""The one attempt policy: budget, delays, and refresh / restart / give up.

Docker's semantics (DESIGN.md, "Semantics kept from Docker's download manager"):
``max-download-attempts`` N is the total number of attempts per blob in one run; after
failed attempt n that kept no byte the wait is n × step (5, 10, 15 … s); after one that
kept bytes (the link was up until the cut) the next starts at once. The server's
Retry-After wins when it is longer. Every attempt counts against the budget either way.
The same policy runs blob transfers and the registry client's manifest and token
requests, so every request resumer retries follows one set of rules:

| failure (in this order)                          | verdict                             |
|--------------------------------------------------|-------------------------------------|
| 401, or 403 on the request, with a refresh left  | REFRESH: not an attempt             |
| 401 or 403 again, no byte kept since the refresh | GIVE_UP: AccessDeniedError          |
| a digest mismatch after a resumed download, or a | RESTART from byte 0, after the same |
| 416 below the size (RangeRestartError)           | delay as RETRY (an attempt)         |
| an error whose class is not retryable            | GIVE_UP: that error                 |
| a retryable one with the budget spent            | GIVE_UP: BudgetExhaustedError       |
| a retryable one otherwise                        | RETRY after n × step, or Retry-After|
|                                                  | when that is longer                 |

A caller counts each attempt with ``begin()``, reports each failure to
``after_failure()`` and does what the verdict says; ``run()`` is that loop for a request
that has nothing to keep between attempts (a manifest, a token). A blob transfer keeps
its own loop (it owns the partial) and asks the same questions::

    policy = AttemptPolicy.for_config(req.key, config)
    while True:
        n = policy.begin()                      # the attempt number for the attempts row
        ...one attempt; on success return...
        verdict = policy.after_failure(err, kept_bytes=out.kept_bytes)
        if verdict.action is Action.REFRESH:
            if await source.refresh_auth(endpoint, getattr(err, "challenge", None)):
                continue                        # at once, not an attempt
            verdict = policy.refused(err)
        if verdict.action is Action.GIVE_UP:
            give_up(verdict, err)
        await policy.wait(verdict, clock, tick)  # RETRY / RESTART: the countdown
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

from .clock import Clock
from .config import Config
from .errors import (
    AccessDeniedError,
    BudgetExhaustedError,
    ConfigError,
    DigestMismatchError,
    DiskFullError,
    ForbiddenError,
    RangeRestartError,
    ResumerError,
    TransientError,
    UnauthorizedError,
    WireBudgetExhaustedError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


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


class Action(enum.Enum):
    #: Try again after ``delay``; the next attempt counts against the budget.
    RETRY = "retry"
    #: Refresh the credentials, then try again at once. Not an attempt: the policy has
    #: already uncounted the one that was refused. If the refresh has nothing new to
    #: send, ask ``refused()``; if it fails, report its error to ``after_failure()``.
    REFRESH = "refresh"
    #: Try again from byte 0 after ``delay``, counted like RETRY: the partial's bytes must
    #: not be kept (a resumed download hashed wrong, or a 416 below the size). The caller
    #: makes sure the partial is empty before the next attempt.
    RESTART = "restart"
    #: Stop and raise ``error``: permanent, budget spent, or refused after a refresh.
    GIVE_UP = "give-up"


@dataclass(frozen=True)
class Verdict:
    """What to do after a failed attempt."""

    action: Action
    #: seconds to wait before the next attempt (RETRY and RESTART only)
    delay: float = 0.0
    #: GIVE_UP only: the error to raise (the failure itself, BudgetExhaustedError naming
    #: what, the attempts and the last cause, or AccessDeniedError after a refresh)
    error: ResumerError | None = None

    def __post_init__(self) -> None:
        if (self.action is Action.GIVE_UP) != (self.error is not None):
            raise ValueError("a GIVE_UP verdict, and only one, carries the error to raise")


class AttemptPolicy:
    """One run's attempts at one thing (a blob, a manifest, a token): counts them and
    judges each failure. Not shared: a new run, or another request, gets a new policy."""

    def __init__(self, what: str, budget: AttemptBudget, delay: LinearDelay) -> None:
        #: names the blob or request in BudgetExhaustedError and AccessDeniedError
        self.what = what
        self.budget = budget
        self.delay = delay
        #: attempts counted so far in this run (refreshes are not attempts)
        self.attempts = 0
        # One refresh per stretch without progress: a token can expire again later in a
        # long download, but a refusal right after a refresh is final.
        self._refresh_left = True
        # A REFRESH was answered and no attempt has begun since: a failure now is the
        # refresh's own (its token request), not a refusal.
        self._refreshing = False

    @classmethod
    def for_config(cls, what: str, config: Config) -> AttemptPolicy:
        """The engine's budget and delay (``max-download-attempts``, ``retry-delay``)."""
        return cls(
            what, AttemptBudget(config.max_download_attempts), LinearDelay(config.retry_delay)
        )

    def begin(self) -> int:
        """Count an attempt that is about to start; returns its number, from 1."""
        self._refreshing = False
        self.attempts += 1
        return self.attempts

    def after_failure(self, error: ResumerError, *, kept_bytes: int = 0) -> Verdict:
        """Judge the failure of the attempt begun last. ``kept_bytes``: bytes that attempt
        kept (progress re-arms the token refresh and means "reconnect at once")."""
        if self._refreshing:
            # The refresh failed before its request went out: it is not used up, and the
            # attempt it interrupted counts after all, failed with the refresh's error.
            self._refreshing = False
            self._refresh_left = True
            self.attempts += 1
        if kept_bytes > 0:
            self._refresh_left = True
        if asks_for_refresh(error):
            self.attempts = max(0, self.attempts - 1)  # a refused request is not an attempt
            if self._refresh_left:
                self._refresh_left = False
                self._refreshing = True
                return Verdict(Action.REFRESH)
            return self.refused(error)
        restart = restarts_from_zero(error)
        if not restart and not error.retryable:
            return Verdict(Action.GIVE_UP, error=error)
        if not self.budget.allows_another(self.attempts):
            return Verdict(
                Action.GIVE_UP, error=BudgetExhaustedError(self.what, self.attempts, error)
            )
        # DESIGN.md's retry delay: an attempt that kept bytes had the link up until the
        # cut, so reconnect at once; the linear ramp (n × step after failed attempt n) is
        # for attempts that moved nothing. Retry-After wins when longer, either way.
        n = 0 if kept_bytes > 0 else max(1, self.attempts)
        wait = self.delay(n, getattr(error, "retry_after", None))
        return Verdict(Action.RESTART if restart else Action.RETRY, wait)

    def refused(self, error: ResumerError) -> Verdict:
        """GIVE_UP after a refusal that a refresh cannot help: the refresh was used up
        without progress since, or it had nothing new to send."""
        self._refreshing = False
        return Verdict(
            Action.GIVE_UP,
            error=AccessDeniedError(
                f"{self.what}: {error} (after a token refresh)",
                status=getattr(error, "status", None) or 401,
            ),
        )

    async def wait(
        self, verdict: Verdict, clock: Clock, tick: Callable[[int], None] | None = None
    ) -> None:
        """Sleep the verdict's delay on ``clock``; with ``tick``, as docker's countdown
        ("Retrying in N seconds"), ``tick(remaining)`` once per whole second."""
        if verdict.delay <= 0:
            return
        if tick is None:
            await clock.sleep(verdict.delay)
        else:
            await countdown(verdict.delay, clock, tick)


def asks_for_refresh(error: BaseException) -> bool:
    """A 401, or a 403 on the request itself (not a token server's refusal)."""
    return isinstance(error, UnauthorizedError | ForbiddenError)


def restarts_from_zero(error: BaseException) -> bool:
    """The next attempt starts from byte 0: the partial's bytes cannot be kept."""
    if isinstance(error, DigestMismatchError):
        return error.resumed  # from byte 0, the same bytes would hash the same way
    return isinstance(error, RangeRestartError)


async def run(
    policy: AttemptPolicy,
    attempt: Callable[[int], Awaitable[T]],
    clock: Clock,
    *,
    refresh: Callable[[ResumerError], Awaitable[bool]] | None = None,
    on_failure: Callable[[ResumerError], None] | None = None,
    tick: Callable[[int], None] | None = None,
) -> T:
    """``attempt(n)`` until it returns, as ``policy`` judges each ResumerError it raises.

    For requests that keep nothing between attempts (manifests, tokens): RESTART is a
    RETRY for them. ``refresh(error)`` renews credentials after a 401/403 and says
    whether the next request will carry something new; without it, a refusal is final.
    ``on_failure`` sees every failure first (host health). Anything but a ResumerError
    propagates at once.
    """
    while True:
        n = policy.begin()
        try:
            return await attempt(n)
        except ResumerError as exc:
            if on_failure is not None:
                on_failure(exc)
            verdict = policy.after_failure(exc)
            if verdict.action is Action.REFRESH:
                verdict = await _refresh(policy, exc, refresh)
            if verdict.action is Action.GIVE_UP:
                give_up(verdict, exc)
            if verdict.delay:
                log.info(
                    "%s: attempt %d failed (%s); retrying in %g s",
                    policy.what,
                    n,
                    exc,
                    verdict.delay,
                )
            await policy.wait(verdict, clock, tick)


async def _refresh(
    policy: AttemptPolicy,
    refused: ResumerError,
    refresh: Callable[[ResumerError], Awaitable[bool]] | None,
) -> Verdict:
    """Carry out a REFRESH verdict: the verdict that follows it."""
    if refresh is None:
        return policy.refused(refused)
    try:
        renewed = await refresh(refused)
    except ResumerError as exc:
        verdict = policy.after_failure(exc)
        # A refresh that is itself refused (401/403 from the token server) is final.
        return policy.refused(refused) if verdict.action is Action.REFRESH else verdict
    return Verdict(Action.RETRY) if renewed else policy.refused(refused)


def give_up(verdict: Verdict, cause: ResumerError) -> NoReturn:
    """Raise a GIVE_UP verdict's error; chained to ``cause`` when it is a new one."""
    error = verdict.error
    assert error is not None
    if error is cause:
        raise cause  # keeps its own __cause__ (the aiohttp or OS error)
    raise error from cause


def fails_for_good(error: BaseException) -> bool:
    """Whether a pull that ended with ``error`` needs a change upstream or on disk before
    a new run can finish it (a 404 manifest, access denied, a corrupt destination), as
    opposed to a spent budget (of attempts or of wire bytes), a cut link or a full disk,
    which a later run may get past."""
    cause = getattr(error, "cause", error)  # LayerDownloadError names its transfer's error
    if not isinstance(cause, ResumerError):
        return False
    return not isinstance(
        cause, BudgetExhaustedError | WireBudgetExhaustedError | TransientError | DiskFullError
    )


def should_retry(error: BaseException) -> bool:
    """Whether another attempt may help (the budget decides if one is left): the error's
    class says so, or it restarts from zero. Kept for transfer.run_transfer until it asks
    ``AttemptPolicy`` instead."""
    return isinstance(error, ResumerError) and (error.retryable or restarts_from_zero(error))


async def countdown(seconds: float, clock: Clock, tick: Callable[[int], None]) -> None:
    """Sleep ``seconds``, calling ``tick(remaining)`` once per whole second, like docker."""
    remaining = seconds
    while remaining > 0:
        tick(math.ceil(remaining))
        step = min(1.0, remaining)
        await clock.sleep(step)
        remaining -= step
