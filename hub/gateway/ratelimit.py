"""Token-bucket rate limits per token (jti) and per project, exact to the bucket, for HTTP 429."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Limit", "RateLimiter", "RateVerdict", "TokenBucket"]


@dataclass(frozen=True)
class Limit:
    """``rate`` tokens per second refill, at most ``burst`` requests back to back."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate limit: rate must be > 0 requests/s, not {self.rate!r}")
        if int(self.burst) != self.burst or self.burst < 1:
            raise ValueError(f"rate limit: burst must be an integer >= 1, not {self.burst!r}")


class TokenBucket:
    """A bucket of ``burst`` tokens refilled at ``rate``/s; one request takes one token."""

    __slots__ = ("last", "limit", "tokens")

    def __init__(self, limit: Limit, now: float) -> None:
        self.limit = limit
        self.tokens = float(limit.burst)
        self.last = now

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.last)
        self.tokens = min(float(self.limit.burst), self.tokens + elapsed * self.limit.rate)
        self.last = now

    def wait(self) -> float:
        """Seconds until one whole token is available (0 if one is there now); after refill()."""
        # a tiny epsilon absorbs float error: burst N then N requests must all pass
        if self.tokens >= 1.0 - 1e-9:
            return 0.0
        return (1.0 - self.tokens) / self.limit.rate


@dataclass(frozen=True)
class RateVerdict:
    """Allowed, or refused with which bucket was empty and how long to wait."""

    allowed: bool
    bucket: str = ""
    retry_after: float = 0.0

    @property
    def retry_after_header(self) -> str:
        """``Retry-After`` in whole seconds, rounded up (RFC 9110 allows only integers)."""
        return str(max(1, math.ceil(self.retry_after)))


class RateLimiter:
    """Per-token and per-project buckets; a request passes only if both have a token.

    A refused request takes nothing from either bucket. Buckets of idle keys are dropped once
    more than ``max_keys`` exist (a full bucket is the same as no bucket). ``clock`` is a
    monotonic clock in seconds, injectable for tests. Thread-safe.
    """

    def __init__(
        self,
        per_token: Limit | None,
        per_project: Limit | None,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self.per_token = per_token
        self.per_project = per_project
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def _bucket(self, key: str, limit: Limit, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(limit, now)
            if len(self._buckets) > self.max_keys:
                self._evict(now)
        else:
            self._buckets.move_to_end(key)
            bucket.refill(now)
        return bucket

    def _evict(self, now: float) -> None:
        for key in list(self._buckets)[: len(self._buckets) // 4]:
            bucket = self._buckets[key]
            bucket.refill(now)
            if bucket.tokens >= bucket.limit.burst:
                del self._buckets[key]

    def check(self, jti: str | None, project: str | None) -> RateVerdict:
        """Take one token from the request's buckets, or say which is empty and for how long."""
        now = self.clock()
        with self._lock:
            buckets: list[tuple[str, TokenBucket]] = []
            if self.per_token is not None and jti:
                buckets.append(("token", self._bucket(f"t:{jti}", self.per_token, now)))
            if self.per_project is not None and project:
                buckets.append(("project", self._bucket(f"p:{project}", self.per_project, now)))
            waits = [(bucket.wait(), name) for name, bucket in buckets]
            worst = max(waits, default=(0.0, ""))
            if worst[0] > 0:
                return RateVerdict(False, worst[1], worst[0])
            for _, bucket in buckets:
                bucket.tokens -= 1.0
            return RateVerdict(True)

    def reset(self) -> None:
        with self._lock:
            self._buckets.clear()
