"""resumer.rate on its own: the token bucket's math and the wire budget, on a FakeClock.

The cap is a property over windows: for any sequence of takes, the tokens granted over
any window of w seconds (net of those given back) are at most rate × w + burst. Waiting
never polls: a grant that fails says when to come back, and that is later than now.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resumer.clock import FakeClock
from resumer.config import Config, KiB, MiB, build
from resumer.errors import (
    BudgetExhaustedError,
    ConfigError,
    LayerDownloadError,
    WireBudgetExhaustedError,
)
from resumer.rate import (
    MAX_BURST,
    Limiter,
    TokenBucket,
    WireBudget,
    default_burst,
    limiter_for,
    limits_text,
)
from resumer.retry import fails_for_good

# --------------------------------------------------------------------------- bucket


def test_the_burst_is_small_a_tenth_of_a_second_at_most_256_kib() -> None:
    assert default_burst(2 * MiB) == 2 * MiB // 10
    assert default_burst(100 * MiB) == MAX_BURST == 256 * KiB
    assert default_burst(1 * MiB) <= 1 * MiB / 10 + 1
    assert default_burst(64 * KiB) == 16 * KiB  # a floor of 16 KiB: few wake-ups
    assert default_burst(1000) == 1000  # below 16 KiB/s: one second's worth
    assert default_burst(1) == 1


def test_a_bucket_starts_full_then_refills_at_its_rate() -> None:
    clock = FakeClock()
    b = TokenBucket(1000, burst=500, clock=clock)
    assert b.grant(800, least=1) == 500
    assert b.grant(1, least=1) == 0
    assert b.due(100) == pytest.approx(0.1)
    clock.now += 0.1
    assert b.grant(800, least=1) == 100
    clock.now += 10  # it never holds more than the burst
    assert b.available() == 500


def test_a_grant_waits_for_its_least_and_gives_back_up_to_the_burst() -> None:
    clock = FakeClock()
    b = TokenBucket(10_000, burst=100, clock=clock)
    assert b.least == 50  # half the burst
    assert b.grant(100) == 100
    clock.now += 0.004  # 40 tokens: fewer than the least a waiter wakes for
    assert b.grant(200) == 0
    assert b.grant(30) == 30  # who wants fewer gets them
    b.give_back(130)  # neither read happened
    assert b.available() == 100  # never beyond the burst
    assert b.granted == 0  # net of what came back


async def test_take_sleeps_until_its_tokens_are_due_and_never_polls() -> None:
    clock = FakeClock()
    b = TokenBucket(100_000, burst=10_000, clock=clock)
    grants = 0

    def counted() -> None:
        nonlocal grants
        grants += 1

    start = clock.now
    await b.take(1_010_000, counted)
    # The burst at once, then the rest at the rate.
    assert clock.now - start == pytest.approx(10.0, abs=0.01)
    # Each sleep ends with a grant: no wake-up finds nothing to take.
    assert len(clock.sleeps) <= grants
    assert all(s > 0 for s in clock.sleeps)


@st.composite
def schedules(draw: st.DrawFn) -> list[tuple[str, float, int]]:
    ops = st.tuples(
        st.sampled_from(["grant", "grant", "grant", "back"]),
        st.sampled_from([0.0, 0.0, 0.0001, 0.003, 0.05, 0.2, 1.5]),
        st.integers(1, 400_000),
    )
    return draw(st.lists(ops, min_size=1, max_size=80))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([1_000, 50_000, 1 * MiB, 2 * MiB, 30 * MiB]),
    st.none() | st.sampled_from([1, 4096, 64 * KiB]),
    schedules(),
)
def test_tokens_granted_over_any_window_are_at_most_rate_times_window_plus_burst(
    rate: int, burst: int | None, schedule: list[tuple[str, float, int]]
) -> None:
    clock = FakeClock()
    b = TokenBucket(rate, burst=burst, clock=clock)
    events: list[tuple[float, int]] = []  # (time, tokens taken: + granted, − given back)
    outstanding = 0
    for op, dt, n in schedule:
        clock.now += dt
        if op == "grant":
            got = b.grant(n)
            assert 0 <= got <= min(n, b.burst)
            if got == 0:
                assert b.due(n) > 0  # a failed grant never says "now": no busy loop
            outstanding += got
            events.append((clock.now, got))
        elif outstanding:
            back = min(n, outstanding)
            b.give_back(back)
            outstanding -= back
            events.append((clock.now, -back))
    for i, j in itertools.combinations_with_replacement(range(len(events)), 2):
        t0, t1 = events[i][0], events[j][0]
        net = sum(n for _, n in events[i : j + 1])
        assert net <= rate * (t1 - t0) + b.burst + 1e-6 * rate


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([10_000, 1 * MiB]),
    st.lists(st.integers(1, 300_000), min_size=1, max_size=6),
)
async def test_concurrent_takes_share_the_rate_and_the_total_holds(
    rate: int, sizes: list[int]
) -> None:
    clock = FakeClock()
    b = TokenBucket(rate, clock=clock)
    start = clock.now
    await asyncio.gather(*(b.take(n) for n in sizes))
    total = sum(sizes)
    took = clock.now - start
    # No more than rate × time + burst, and no slower than the rate either (± one wake).
    assert total <= rate * took + b.burst + 1
    assert took <= max(0.0, (total - b.burst) / rate) + 0.002 * len(clock.sleeps) + 1e-9


def test_a_rate_of_zero_is_no_bucket() -> None:
    assert limiter_for(0, 0) is None
    lim = limiter_for(0, 1000)
    assert lim is not None and lim.bucket is None and lim.budget is not None
    with pytest.raises(ConfigError):
        TokenBucket(0)


# --------------------------------------------------------------------------- wire budget


def test_a_direct_read_is_granted_at_most_what_is_left_of_the_budget() -> None:
    lim = Limiter(wire_bytes=1000)
    assert lim.grant(600) == 600
    assert lim.grant(600) == 400  # 600 reserved by the first
    assert lim.grant(1) == 0 and not lim.spent
    assert lim.due(1) > 0  # others hold the rest: come back later, not now
    lim.received(600)
    lim.give_back(300)  # the second read stopped 300 short of its grant
    lim.received(100)
    assert lim.used == 700 and not lim.spent
    assert lim.grant(10_000) == 300
    lim.received(300)
    assert lim.spent and lim.used == 1000
    assert lim.grant(1) == 0


async def test_a_read_that_crosses_the_budget_is_kept_then_the_attempt_stops() -> None:
    lim = Limiter(wire_bytes=1000)
    await lim.take(900)
    lim.check()
    await lim.take(256)  # it had arrived: booked, and the caller keeps it
    assert lim.used == 1156
    with pytest.raises(WireBudgetExhaustedError) as info:
        lim.check()
    assert (info.value.budget, info.value.used) == (1000, 1156)


async def test_the_limiter_with_both_caps_the_rate_and_books_the_budget() -> None:
    clock = FakeClock()
    lim = Limiter(rate=1000, wire_bytes=5000, burst=100, clock=clock)
    start = clock.now
    await lim.take(2100)
    assert clock.now - start == pytest.approx(2.0, abs=0.01)
    assert lim.used == 2100
    assert lim.grant(5000) == 0  # the budget has room, the bucket not yet
    clock.now += 0.1
    assert lim.grant(5000) == 100


def test_the_budget_error_names_the_budget_the_bytes_used_and_the_next_run() -> None:
    err = WireBudget(10 * MiB).error()
    err.used = 0  # (the message is made at construction)
    text = str(WireBudgetExhaustedError(10 * MiB, 10 * MiB + 4096))
    assert "wire-byte budget" in text
    assert str(10 * MiB) in text and str(10 * MiB + 4096) in text
    assert "--max-wire-bytes" in text
    assert "kept" in text and "again" in text and "continue" in text
    assert not WireBudgetExhaustedError.retryable
    assert err.exit_code == 1


def test_a_spent_wire_budget_does_not_fail_a_pull_for_good() -> None:
    err = WireBudgetExhaustedError(100, 100)
    assert not fails_for_good(err)
    assert not fails_for_good(LayerDownloadError(0, "sha256:" + "a" * 64, err))
    assert not fails_for_good(BudgetExhaustedError("b", 5, err))


# --------------------------------------------------------------------------- config


def test_sizes_come_from_flags_environment_and_file_with_units(tmp_path: Path) -> None:
    conf = tmp_path / "daemon.json"
    conf.write_text(json.dumps({"max-download-rate": "512K", "max-wire-bytes": 1 << 30}))
    c = build({}, config_file=conf, environ={})
    assert (c.max_download_rate, c.max_wire_bytes) == (512 * KiB, 1 << 30)
    c = build(
        {},
        config_file=conf,
        environ={"RESUMER_MAX_DOWNLOAD_RATE": "2M", "RESUMER_MAX_WIRE_BYTES": "1.5G"},
    )
    assert (c.max_download_rate, c.max_wire_bytes) == (2 * MiB, 3 * (1 << 29))
    c = build(
        {"max_download_rate": "1G", "max_wire_bytes": "0"},
        config_file=conf,
        environ={"RESUMER_MAX_DOWNLOAD_RATE": "2M"},
    )
    assert (c.max_download_rate, c.max_wire_bytes) == (1 << 30, 0)
    assert (Config().max_download_rate, Config().max_wire_bytes) == (0, 0)  # unlimited


@pytest.mark.parametrize("value", ["-1", "fast", "1X", "nan"])
def test_a_bad_rate_is_refused_naming_the_flag(value: str) -> None:
    with pytest.raises(ConfigError, match="--max-download-rate"):
        build({"max_download_rate": value}, environ={})


def test_a_rate_every_transfer_would_fail_as_too_slow_under_is_refused() -> None:
    with pytest.raises(ConfigError, match="low-speed-limit"):
        Config(max_download_rate=2048)  # 3 transfers × 1024 B/s > 2048 B/s
    Config(max_download_rate=2048, low_speed_limit=0)  # the low-speed check off: fine
    Config(max_download_rate=3072)


def test_progress_lines_name_the_limits() -> None:
    assert limits_text(0, 0) == []
    assert limits_text(2 * MiB, 0) == ["Rate limit: 2 MiB/s (every transfer together)"]
    assert limits_text(0, 10 * MiB) == ["Wire budget: 10 MiB for this run"]


def test_waiters_are_served_in_turn_so_none_starves() -> None:
    """A reader that asks again the moment tokens are there (as a transport callback
    does) must not beat one whose wake-up comes later in the loop's turn: the next tokens
    are the first waiter's, whoever asks."""
    clock = FakeClock()
    b = TokenBucket(100_000, burst=20_000, clock=clock)
    got = {"eager": 0, "late": 0}
    for _ in range(2000):
        clock.now += 0.001  # 100 tokens a step: both ask, the eager one always first
        for who in ("eager", "late"):
            got[who] += b.grant(50_000, who=who)
    total = got["eager"] + got["late"]
    assert total <= 100_000 * 2.0 + b.burst
    assert abs(got["eager"] - got["late"]) <= b.burst, got
    b.leave("eager")
    b.leave("late")
    assert not b._line  # nobody waits any more


@given(st.integers(min_value=1, max_value=1 << 40))
def test_a_capped_read_is_ten_ms_of_the_rate_within_16_and_256_kib(rate: int) -> None:
    """What one network read may take ahead of its tokens (fetch._paced_reads)."""
    size = Limiter(rate=rate).read_size()
    assert size is not None and 16 * KiB <= size <= 256 * KiB
    if 16 * KiB <= rate / 100 <= 256 * KiB:
        assert abs(size - rate / 100) <= 1
    assert Limiter(wire_bytes=rate).read_size() is None  # no cap: the session's reads
