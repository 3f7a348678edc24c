"""``/metrics`` (Prometheus text format) and ``/healthz`` for every beamhub HTTP service.

The gateway's rule holds for all of them: metrics are for this host or a token with the
``metrics`` scope (``local-or-token``, the default), only such a token (``token``) or anyone
(``public``); each service takes ``--metrics`` to choose. A request counts as "this host" only if
its TCP peer is loopback and every ``X-Forwarded-For`` hop is too: a remote client that reaches a
hub service through configurable-http-proxy (on loopback, which appends the peer it saw) is not
local. Prometheus under `beamhub up` scrapes each service directly on 127.0.0.1.

``/healthz`` answers ``{"status": "ok", "service": ...}`` (200) or ``"failing"`` with what fails
(503), without a token: it tells nothing but whether the service works.
"""

from __future__ import annotations

import inspect
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from beamhub.auth.api import ApiError, JsonApiHandler
from beamhub.auth.roles import METRICS_SCOPE
from beamhub.auth.tokens import TokenError

__all__ = [
    "METRICS_ACCESS",
    "HealthzHandler",
    "MetricsHandler",
    "is_local_request",
]

#: Who may read ``/metrics``: see the module docstring.
METRICS_ACCESS = ("local-or-token", "token", "public")


def _loopback(text: str) -> bool:
    try:
        addr = ipaddress.ip_address(text.strip())
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def is_local_request(peer: str, forwarded: list[str]) -> bool:
    """True if ``peer`` and every X-Forwarded-For hop are loopback addresses."""
    hops = [h for value in forwarded for h in value.split(",") if h.strip()]
    return _loopback(peer) and all(_loopback(h) for h in hops)


class MetricsHandler(JsonApiHandler):
    """Prometheus text of ``registry`` (or of ``render()``, which may be async), for whom
    ``access`` allows; ``verifier`` checks a bearer token's ``metrics`` scope."""

    max_body = 0

    def initialize(
        self,
        *,
        service: str,
        access: str,
        verifier: Any,
        registry: CollectorRegistry | None = None,
        render: Callable[[], bytes | Awaitable[bytes]] | None = None,
    ) -> None:
        if access not in METRICS_ACCESS:
            raise ValueError(f"metrics access {access!r}: use one of {METRICS_ACCESS}")
        self.service = service
        self.access = access
        self.verifier = verifier
        self.registry = registry
        self.render = render

    def _allowed(self) -> None:
        if self.access == "public":
            return
        if self.access == "local-or-token" and is_local_request(
            self.request.remote_ip or "", self.request.headers.get_list("X-Forwarded-For")
        ):
            return
        where = " from this host, or" if self.access == "local-or-token" else ""
        what = (
            f"{self.service}'s metrics are read{where} with a token that has the "
            f"{METRICS_SCOPE!r} scope (a hub admin mints one)"
        )
        token = self.bearer()
        if not token or self.verifier is None:
            raise ApiError(
                401, "unauthenticated", what, headers={"WWW-Authenticate": 'Bearer realm="metrics"'}
            )
        try:
            claims = self.verifier.verify(token)
        except TokenError as exc:
            raise ApiError(exc.status, exc.reason, f"{exc}; {what}") from None
        if METRICS_SCOPE not in claims.scopes:
            raise ApiError(403, "scope", what)

    async def get(self) -> None:
        self._allowed()
        if self.render is not None:
            body = self.render()
            if inspect.isawaitable(body):
                body = await body
        else:
            body = generate_latest(self.registry)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(body)


class HealthzHandler(JsonApiHandler):
    """Liveness for a prober: ``check()`` returns what fails ("" or None: healthy)."""

    max_body = 0

    def initialize(self, *, service: str, check: Callable[[], str | None] | None = None) -> None:
        self.service = service
        self.check = check

    def get(self) -> None:
        problem = self.check() if self.check is not None else None
        if problem:
            self.write_json({"status": "failing", "service": self.service, "problem": problem}, 503)
        else:
            self.write_json({"status": "ok", "service": self.service})
