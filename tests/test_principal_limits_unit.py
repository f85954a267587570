"""The per-principal token bucket on a stand-in clock: rates, bursts, debt and separation."""

from __future__ import annotations

import pytest

from rnnstream.server.core import ResourceExhausted
from rnnstream.server.core._principals import PrincipalLimits, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_admits_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.try_take(1, 0.0) for _ in range(5)] == [0.0] * 5
    assert bucket.try_take(1, 0.0) == pytest.approx(0.1)  # one token comes every 0.1 s
    assert bucket.try_take(1, 0.05) == pytest.approx(0.05)
    assert bucket.try_take(1, 0.1) == 0.0
    # Idle time refills up to the burst and no further.
    assert bucket.try_take(5, 100.0) == 0.0
    assert bucket.try_take(1, 100.0) == pytest.approx(0.1)


def test_bucket_cost_above_burst_waits_for_a_full_bucket() -> None:
    bucket = TokenBucket(rate=2, burst=4, now=0.0)
    assert bucket.try_take(3, 0.0) == 0.0
    assert bucket.try_take(10, 0.0) == pytest.approx(1.5)  # until full: 3 tokens at 2/s
    assert bucket.try_take(10, 1.5) == 0.0
    assert bucket.level == pytest.approx(-6)  # paid off at the rate before the next take
    assert bucket.try_take(1, 3.0) == pytest.approx(2.0)  # -3 at 3.0 s: 4 tokens to go


def test_debt_makes_concurrent_waiters_share_the_rate() -> None:
    # Ten streams of one principal each take a frame at once: the waits spread them out at
    # the rate, so together they get no more than one principal's share.
    bucket = TokenBucket(rate=100, burst=1, now=0.0)
    waits = [bucket.take(1, 0.0) for _ in range(10)]
    assert waits == pytest.approx([0.0] + [i / 100 for i in range(1, 10)])


def test_principals_have_separate_buckets() -> None:
    clock = Clock()
    limits = PrincipalLimits(rate=10, burst=2, clock=clock)
    assert [limits.try_admit("bob", 1) for _ in range(2)] == [0.0, 0.0]
    assert limits.try_admit("bob", 1) > 0
    # Bob's flood leaves alice's bucket full.
    for _ in range(50):
        limits.pace("bob", 1)
    assert limits.try_admit("alice", 2) == 0.0
    assert limits.pace("bob", 1) == pytest.approx(5.1)  # 51 frames in debt at 10/s


def test_no_rate_means_no_limit_and_no_state() -> None:
    limits = PrincipalLimits(rate=0, burst=0)
    assert all(limits.try_admit("bob", 1000) == 0.0 for _ in range(100))
    assert limits.pace("bob", 10**9) == 0.0
    assert not limits._buckets


def test_refusal_names_the_limit_and_the_wait() -> None:
    clock = Clock()
    limits = PrincipalLimits(rate=4, burst=2, clock=clock)
    limits.admit("bob", 2)
    with pytest.raises(ResourceExhausted) as refused:
        limits.admit("bob", 1)
    assert refused.value.retry_after == pytest.approx(0.25)
    assert refused.value.message == (
        "principal 'bob' is over its rate limit (4 frames/s, bursts of 2); retry in 250 ms"
    )
    clock.now += 0.25
    limits.admit("bob", 1)


def test_quiet_principals_are_forgotten() -> None:
    clock = Clock()
    limits = PrincipalLimits(rate=1000, burst=10, clock=clock)
    for i in range(2000):
        limits.try_admit(f"p{i}", 1)
        clock.now += 0.01  # each bucket is full again 10 ms after its one take
    assert len(limits._buckets) < 1024
