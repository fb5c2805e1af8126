"""retry.AttemptPolicy on its own: every Action, the budget, the delays, the refresh.

The policy is pure bookkeeping, so these tests drive it with errors directly; the same
rules are checked end to end, against servers, in test_attempt_budget.py.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import resumer.errors as errors_module
from resumer.clock import FakeClock
from resumer.errors import (
    AccessDeniedError,
    BudgetExhaustedError,
    ConnectFailedError,
    ConnectionCutError,
    DigestMismatchError,
    ForbiddenError,
    NotFoundError,
    RangeRestartError,
    ResumerError,
    ServerError,
    StallError,
    UnauthorizedError,
)
from resumer.retry import (
    Action,
    AttemptBudget,
    AttemptPolicy,
    LinearDelay,
    Verdict,
    run,
    should_retry,
)


def policy(n: int = 5, step: float = 5.0, what: str = "sha256:abc") -> AttemptPolicy:
    return AttemptPolicy(what, AttemptBudget(n), LinearDelay(step))


def unauthorized() -> UnauthorizedError:
    return UnauthorizedError("http://h/b: access denied (HTTP 401)", challenge='Bearer realm="r"')


# --------------------------------------------------------------------------- RETRY


def test_a_transient_failure_is_retried_after_n_times_the_step() -> None:
    p = policy(step=5.0)
    delays = []
    for n in range(1, 5):
        assert p.begin() == n
        verdict = p.after_failure(ServerError("HTTP 500", status=500))
        assert verdict.action is Action.RETRY
        delays.append(verdict.delay)
    assert delays == [5.0, 10.0, 15.0, 20.0]
    assert p.attempts == 4


@pytest.mark.parametrize(("after", "delay"), [(12.0, 12.0), (2.0, 5.0), (5.0, 5.0), (None, 5.0)])
def test_retry_after_wins_only_when_longer(after: float | None, delay: float) -> None:
    p = policy()
    p.begin()
    verdict = p.after_failure(ServerError("HTTP 503", status=503, retry_after=after))
    assert (verdict.action, verdict.delay) == (Action.RETRY, delay)


@pytest.mark.parametrize(
    "error",
    [ConnectionCutError("cut"), ConnectFailedError("refused"), StallError("stalled")],
)
def test_cuts_and_stalls_are_retried(error: ResumerError) -> None:
    p = policy()
    p.begin()
    assert p.after_failure(error).action is Action.RETRY


# --------------------------------------------------------------------------- REFRESH


@pytest.mark.parametrize(
    "refused", [unauthorized(), ForbiddenError("403", challenge=None)], ids=["401", "403"]
)
def test_401_and_403_ask_for_one_refresh_that_is_not_an_attempt(refused: ResumerError) -> None:
    p = policy(n=1)
    p.begin()
    assert p.after_failure(refused) == Verdict(Action.REFRESH)
    assert p.attempts == 0  # uncounted: a budget of one is still whole
    assert p.begin() == 1


def test_refused_again_without_progress_gives_up_with_access_denied_naming_what() -> None:
    p = policy(what="sha256:abc")
    p.begin()
    assert p.after_failure(unauthorized()).action is Action.REFRESH
    p.begin()
    verdict = p.after_failure(ForbiddenError("http://h/b: access denied (HTTP 403)"))
    assert verdict.action is Action.GIVE_UP
    assert isinstance(verdict.error, AccessDeniedError)
    assert str(verdict.error).startswith("sha256:abc: http://h/b")
    assert str(verdict.error).endswith("(after a token refresh)")
    assert not verdict.error.retryable
    assert p.attempts == 0


def test_progress_re_arms_the_refresh() -> None:
    p = policy()
    p.begin()
    assert p.after_failure(unauthorized()).action is Action.REFRESH
    p.begin()
    # The link dropped after 1000 good bytes: the token may expire again later.
    assert p.after_failure(ConnectionCutError("cut"), kept_bytes=1000).action is Action.RETRY
    p.begin()
    assert p.after_failure(unauthorized()).action is Action.REFRESH
    p.begin()
    assert p.after_failure(unauthorized()).action is Action.GIVE_UP


def test_a_refresh_with_nothing_new_to_send_is_refused() -> None:
    p = policy()
    p.begin()
    refused = unauthorized()
    assert p.after_failure(refused).action is Action.REFRESH
    verdict = p.refused(refused)
    assert verdict.action is Action.GIVE_UP and isinstance(verdict.error, AccessDeniedError)
    assert "(after a token refresh)" in str(verdict.error)


def test_a_refresh_that_fails_counts_as_the_attempt_and_is_not_used_up() -> None:
    p = policy()
    p.begin()
    assert p.after_failure(unauthorized()).action is Action.REFRESH
    # The token server answered 503: no new token, so no refusal either.
    verdict = p.after_failure(ServerError("token server: HTTP 503", status=503))
    assert (verdict.action, verdict.delay, p.attempts) == (Action.RETRY, 5.0, 1)
    p.begin()
    assert p.after_failure(unauthorized()).action is Action.REFRESH


def test_a_token_server_refusal_is_final() -> None:
    p = policy()
    p.begin()
    refusal = AccessDeniedError("the token server refused anonymous access", status=401)
    assert p.after_failure(refusal) == Verdict(Action.GIVE_UP, error=refusal)


# --------------------------------------------------------------------------- RESTART


@pytest.mark.parametrize(
    "error",
    [
        DigestMismatchError("hashes to sha256:x", resumed=True),
        RangeRestartError("416 at offset 10 (server size 5)", status=416),
    ],
    ids=["mismatch-after-resume", "416-below-size"],
)
def test_a_restart_from_zero_is_counted_and_waits_like_a_retry(error: ResumerError) -> None:
    p = policy()
    p.begin()
    p.after_failure(ServerError("HTTP 500", status=500))
    p.begin()
    verdict = p.after_failure(error)
    assert (verdict.action, verdict.delay, p.attempts) == (Action.RESTART, 10.0, 2)


def test_a_restart_within_a_spent_budget_gives_up() -> None:
    p = policy(n=1)
    p.begin()
    error = DigestMismatchError("hashes to sha256:x", resumed=True)
    verdict = p.after_failure(error)
    assert isinstance(verdict.error, BudgetExhaustedError) and verdict.error.last is error


# --------------------------------------------------------------------------- GIVE_UP


@pytest.mark.parametrize(
    "error",
    [
        DigestMismatchError("hashes to sha256:x", resumed=False),
        NotFoundError("404", status=404),
        errors_module.UntrustedCertificateError("certificate"),
        errors_module.PermanentError("unexpected HTTP 418", status=418),
    ],
)
def test_a_permanent_error_gives_up_with_itself_at_once(error: ResumerError) -> None:
    p = policy()
    p.begin()
    assert p.after_failure(error) == Verdict(Action.GIVE_UP, error=error)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_the_budget_gives_up_after_exactly_n_attempts_naming_what_n_and_the_last_cause(
    n: int,
) -> None:
    p = policy(n=n, what="sha256:abc")
    verdicts = []
    for i in range(n):
        p.begin()
        cause = ServerError("HTTP 503" if i == n - 1 else "HTTP 500", status=500)
        verdicts.append(p.after_failure(cause))
    assert [v.action for v in verdicts] == [Action.RETRY] * (n - 1) + [Action.GIVE_UP]
    error = verdicts[-1].error
    assert isinstance(error, BudgetExhaustedError)
    assert (error.blob, error.attempts, error.last) == ("sha256:abc", n, cause)
    assert str(error) == f"sha256:abc: gave up after {n} attempt(s); last error: HTTP 503"


def test_a_give_up_verdict_always_carries_its_error_and_only_it_does() -> None:
    with pytest.raises(ValueError):
        Verdict(Action.GIVE_UP)
    with pytest.raises(ValueError):
        Verdict(Action.RETRY, error=NotFoundError("x"))


# --------------------------------------------------------------------------- retryable per class


def _resumer_errors() -> list[type[ResumerError]]:
    return [
        c
        for _, c in inspect.getmembers(errors_module, inspect.isclass)
        if issubclass(c, ResumerError)
    ]


def test_retryable_is_a_property_of_the_class_never_of_one_instance() -> None:
    resumed = DigestMismatchError("x", resumed=True)
    fresh = DigestMismatchError("x", resumed=False)
    assert "retryable" not in vars(resumed) and "retryable" not in vars(fresh)
    assert resumed.retryable is fresh.retryable is False
    for cls in _resumer_errors():
        assert isinstance(cls.retryable, bool), cls
    retried = {c for c in _resumer_errors() if c.retryable}
    assert retried == {c for c in _resumer_errors() if issubclass(c, errors_module.TransientError)}


def test_should_retry_keeps_transfer_s_rule_for_a_resumed_mismatch() -> None:
    # transfer.run_transfer still asks should_retry; a resumed mismatch restarts from zero.
    assert should_retry(DigestMismatchError("x", resumed=True))
    assert not should_retry(DigestMismatchError("x", resumed=False))
    assert should_retry(ConnectionCutError("x")) and not should_retry(NotFoundError("x"))
    assert not should_retry(ValueError("not ours"))


# --------------------------------------------------------------------------- wait and run


async def test_wait_counts_down_with_a_tick_and_sleeps_once_without() -> None:
    clock = FakeClock()
    ticks: list[int] = []
    await policy().wait(Verdict(Action.RETRY, 3.0), clock, ticks.append)
    assert (ticks, clock.sleeps) == ([3, 2, 1], [1.0, 1.0, 1.0])
    await policy().wait(Verdict(Action.RETRY, 12.0), clock)
    await policy().wait(Verdict(Action.RETRY, 0.0), clock)
    assert clock.sleeps[3:] == [12.0]


async def test_run_retries_refreshes_and_reports_each_failure() -> None:
    clock = FakeClock()
    script: list[ResumerError | None] = [ServerError("500", status=500), unauthorized(), None]
    seen: list[ResumerError] = []
    refreshes: list[ResumerError] = []

    async def attempt(n: int) -> int:
        error = script.pop(0)
        if error is not None:
            raise error
        return n

    async def refresh(refused: ResumerError) -> bool:
        refreshes.append(refused)
        return True

    p = policy(n=2)
    assert await run(p, attempt, clock, refresh=refresh, on_failure=seen.append) == 2
    assert [type(e) for e in seen] == [ServerError, UnauthorizedError]
    assert len(refreshes) == 1 and clock.sleeps == [5.0]


async def test_run_raises_the_permanent_error_itself_and_a_new_one_chained() -> None:
    clock = FakeClock()

    async def not_found(n: int) -> None:
        raise NotFoundError("404") from KeyError("cause")

    with pytest.raises(NotFoundError) as info:
        await run(policy(), not_found, clock)
    assert isinstance(info.value.__cause__, KeyError)  # its own cause is kept

    async def refused(n: int) -> None:
        raise unauthorized()

    with pytest.raises(AccessDeniedError) as denied:
        await run(policy(), refused, clock)  # no refresh callback: nothing to renew
    assert isinstance(denied.value.__cause__, UnauthorizedError)


# --------------------------------------------------------------------------- properties


@dataclass(frozen=True)
class Failure:
    kind: str
    retry_after: float | None = None
    kept: int = 0

    def error(self) -> ResumerError:
        if self.kind == "401":
            return unauthorized()
        if self.kind == "403":
            return ForbiddenError("403")
        if self.kind == "restart":
            return DigestMismatchError("mismatch", resumed=True)
        if self.kind == "404":
            return NotFoundError("404")
        if self.kind == "cut":
            return ConnectionCutError("cut")
        return ServerError("503", status=503, retry_after=self.retry_after)


failures = st.builds(
    Failure,
    st.sampled_from(["5xx", "5xx", "cut", "401", "403", "restart", "404"]),
    st.none() | st.sampled_from([0.0, 3.0, 12.0, 100.0]),
    st.sampled_from([0, 0, 1, 4096]),
)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 8),
    st.sampled_from([0.0, 0.5, 5.0]),
    st.lists(failures, max_size=40),
)
def test_any_failure_sequence_stays_within_the_budget_with_linear_delays(
    n: int, step: float, sequence: list[Failure]
) -> None:
    p = policy(n=n, step=step)
    counted = 0  # what the budget should have seen: refused requests are not attempts
    armed = True  # the model of "one refresh per stretch without progress"
    for failure in sequence:
        p.begin()
        assert p.attempts <= n
        verdict = p.after_failure(failure.error(), kept_bytes=failure.kept)
        armed = armed or failure.kept > 0
        if failure.kind in ("401", "403"):
            assert p.attempts == counted  # a refresh never counts
            if armed:
                assert verdict.action is Action.REFRESH
                armed = False
                continue
            assert isinstance(verdict.error, AccessDeniedError)
            break
        counted += 1
        assert p.attempts == counted <= n
        if failure.kind == "404":
            assert isinstance(verdict.error, NotFoundError)
            break
        if counted == n:
            assert isinstance(verdict.error, BudgetExhaustedError)
            assert verdict.error.attempts == n
            break
        # DESIGN.md's rule: at once after an attempt that kept bytes, n × step after
        # failed attempt n that kept none; a longer Retry-After wins either way.
        linear = 0.0 if failure.kept > 0 else counted * step
        after = failure.retry_after if failure.kind == "5xx" else None
        expected = after if after is not None and after > linear else linear
        assert verdict.delay == expected
        assert verdict.action is (Action.RESTART if failure.kind == "restart" else Action.RETRY)
