"""Token buckets: exact to the bucket, Retry-After rounded up, per token and per project."""

from __future__ import annotations

import pytest

from beamhub.hub.gateway.ratelimit import Limit, RateLimiter


class FakeClock:
    """A monotonic clock the test advances by hand (time itself is the thing under test)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("burst", [1, 5, 17])
def test_burst_is_exact(burst: int) -> None:
    clock = FakeClock()
    limiter = RateLimiter(Limit(rate=2.0, burst=burst), None, clock=clock)
    verdicts = [limiter.check("jti-a", "p1") for _ in range(burst + 1)]
    assert [v.allowed for v in verdicts] == [True] * burst + [False]
    assert verdicts[-1].bucket == "token"
    assert verdicts[-1].retry_after == pytest.approx(0.5)
    assert verdicts[-1].retry_after_header == "1"


def test_refill_after_retry_after() -> None:
    clock = FakeClock()
    limiter = RateLimiter(Limit(rate=0.25, burst=2), None, clock=clock)
    assert limiter.check("j", None).allowed and limiter.check("j", None).allowed
    refused = limiter.check("j", None)
    assert not refused.allowed and refused.retry_after == pytest.approx(4.0)
    assert refused.retry_after_header == "4"
    clock.now += 3.9
    assert not limiter.check("j", None).allowed
    clock.now += 0.1
    assert limiter.check("j", None).allowed
    assert not limiter.check("j", None).allowed


def test_retry_after_rounds_up() -> None:
    clock = FakeClock()
    limiter = RateLimiter(Limit(rate=0.4, burst=1), None, clock=clock)
    assert limiter.check("j", None).allowed
    clock.now += 1.0  # 0.4 token back; 0.6 missing at 0.4/s = 1.5 s
    refused = limiter.check("j", None)
    assert refused.retry_after == pytest.approx(1.5)
    assert refused.retry_after_header == "2"


def test_tokens_are_independent_but_share_the_project_bucket() -> None:
    clock = FakeClock()
    limiter = RateLimiter(Limit(rate=1.0, burst=2), Limit(rate=1.0, burst=3), clock=clock)
    assert limiter.check("a", "p1").allowed
    assert limiter.check("a", "p1").allowed
    assert limiter.check("a", "p1").bucket == "token"  # a's own bucket is empty
    assert limiter.check("b", "p1").allowed  # third for the project
    refused = limiter.check("b", "p1")
    assert not refused.allowed and refused.bucket == "project"
    assert limiter.check("c", "p2").allowed  # another project is untouched


def test_refused_request_takes_nothing() -> None:
    clock = FakeClock()
    limiter = RateLimiter(Limit(rate=1.0, burst=5), Limit(rate=1.0, burst=1), clock=clock)
    assert limiter.check("a", "p1").allowed
    for _ in range(3):
        assert limiter.check("a", "p1").bucket == "project"
    # the token bucket lost only the one allowed request: 4 left for another project
    assert all(limiter.check("a", f"q{i}").allowed for i in range(4))
    assert limiter.check("a", "q9").bucket == "token"


def test_full_idle_buckets_are_evicted_busy_ones_kept() -> None:
    clock = FakeClock()
    limiter = RateLimiter(Limit(rate=1.0, burst=1), None, clock=clock, max_keys=8)
    busy_allowed = 0
    for i in range(40):
        limiter.check(f"idle{i}", None)
        busy_allowed += limiter.check("busy", None).allowed
        clock.now += 0.1
    # only buckets that refilled completely (idle >= 1 s) go; the last second's keys stay
    assert not any(f"t:idle{i}" in limiter._buckets for i in range(25))
    assert len(limiter._buckets) <= 12
    assert busy_allowed == 4  # 1 at start + 0.1/step refills over 39 steps: never reset
    assert "t:busy" in limiter._buckets


@pytest.mark.parametrize("rate,burst", [(0, 1), (-1, 1), (1, 0), (1, 1.5)])
def test_bad_limits_are_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match=r"rate|burst"):
        Limit(rate, burst)  # type: ignore[arg-type]
