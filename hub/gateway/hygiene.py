"""Request hygiene of the gateway: who the client is, and how often it failed to authenticate.

The client address is the TCP peer, unless the peer is a configured trusted proxy: then the
``X-Forwarded-For`` entries are taken from the right, one per trusted hop, until an address that is
not a trusted proxy (as nginx's ``real_ip_recursive``). Under `beamhub up`, configurable-http-proxy
on loopback is the trusted proxy, so policy ``source`` rules see the real client; an address in
front of it cannot be forged by a remote client, since the proxy appends the peer it saw.

Failed authentications (a missing, malformed, expired, revoked, … token) are limited per client
address with a token bucket: once an address has spent its burst, its requests that fail are
answered 429 with Retry-After instead of 401 (a valid token is never refused by this). They are
audited in aggregate: one record per address per interval with the count, never one per request.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from beamhub.hub.gateway.ratelimit import Limit, TokenBucket

__all__ = [
    "LOOPBACK",
    "AuthFailureGuard",
    "FailureTally",
    "client_address",
    "is_loopback",
    "parse_networks",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: The loopback networks: configurable-http-proxy's address under `beamhub up`.
LOOPBACK = ("127.0.0.0/8", "::1/128")


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (or single addresses) as networks; ValueError naming the bad one."""
    nets = []
    for text in texts:
        try:
            nets.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"trusted proxy {text!r} is not an address or CIDR") from None
    return tuple(nets)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_loopback(text: str) -> bool:
    addr = _address(text)
    return addr is not None and addr.is_loopback


def client_address(peer: str, forwarded: Iterable[str], trusted: tuple[Network, ...]) -> str:
    """The client's address: ``peer``, or (when ``peer`` is a trusted proxy) the rightmost
    X-Forwarded-For entry that is not one; a malformed entry stops the walk."""
    hops = [h.strip() for value in forwarded for h in value.split(",") if h.strip()]
    current = peer
    while hops and trusted:
        addr = _address(current)
        if addr is None or not any(addr in net for net in trusted):
            break
        candidate = hops.pop()
        if _address(candidate) is None:
            break
        current = candidate
    return current


@dataclass
class FailureTally:
    """Failed authentications of one address since the last audit record."""

    count: int = 0
    limited: int = 0
    reasons: Counter = field(default_factory=Counter)
    first: str = ""
    paths: Counter = field(default_factory=Counter)


class AuthFailureGuard:
    """Per-address buckets of failed authentications, and their tallies for the audit log.

    ``limit``: ``rate`` failures per second refill, ``burst`` back to back; ``interval``: how
    often the tallies become audit records (:meth:`drain`). Thread-safe; idle full buckets are
    dropped beyond ``max_keys`` addresses.
    """

    def __init__(
        self,
        limit: Limit = Limit(1.0, 20),
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if interval <= 0:
            raise ValueError("the failed-authentication audit interval must be > 0 seconds")
        self.limit = limit
        self.interval = interval
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._tallies: dict[str, FailureTally] = {}
        self._lock = threading.Lock()

    def _bucket(self, address: str, now: float) -> TokenBucket:
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = self._buckets[address] = TokenBucket(self.limit, now)
            if len(self._buckets) > self.max_keys:
                for key in list(self._buckets)[: len(self._buckets) // 4]:
                    old = self._buckets[key]
                    old.refill(now)
                    if old.tokens >= old.limit.burst:
                        del self._buckets[key]
        else:
            self._buckets.move_to_end(address)
            bucket.refill(now)
        return bucket

    def failed(self, address: str, reason: str, path: str) -> float:
        """Count one failure of ``address``; the seconds it must wait (0: answer it 401)."""
        now = self.clock()
        with self._lock:
            bucket = self._bucket(address, now)
            wait = bucket.wait()
            if wait == 0:
                bucket.tokens -= 1.0
            tally = self._tallies.get(address)
            if tally is None:
                tally = self._tallies[address] = FailureTally(
                    first=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                )
            tally.count += 1
            tally.limited += wait > 0
            tally.reasons[reason] += 1
            tally.paths[path] += 1
            return wait

    def drain(self) -> dict[str, FailureTally]:
        """The tallies since the last drain (and forget them)."""
        with self._lock:
            tallies, self._tallies = self._tallies, {}
        return tallies

    @staticmethod
    def describe(tally: FailureTally, interval: float) -> str:
        reasons = ", ".join(f"{r} x{n}" for r, n in tally.reasons.most_common(5))
        paths = ", ".join(f"{p} x{n}" for p, n in tally.paths.most_common(3))
        return (
            f"{tally.count} failed authentication(s) since {tally.first} (within {interval:g} s), "
            f"{tally.limited} of them answered 429; reasons: {reasons}; paths: {paths}"
        )
