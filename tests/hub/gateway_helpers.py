"""Test helpers for the API gateway: keys and tokens, a gateway with a real DSN, real HTTP calls."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tornado.httpclient import AsyncHTTPClient

from beamhub.auth.tokens import SigningKey, TokenIssuer, TokenVerifier
from beamhub.hub.gateway.app import Gateway
from beamhub.hub.gateway.audit import AuditLog
from beamhub.hub.gateway.ratelimit import Limit, RateLimiter
from beamhub.kernels.reservations import ReservationBook
from beamhub.streaming.dsn import DataStreamingNode

ALL_SCOPES = "stream.read stream.publish steer reserve jobs dashboard"


class FakeClock:
    """A monotonic clock the test advances by hand: rate-limit timing is what is under test."""

    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


class Keys:
    """The hub's signing key; tokens for any user/project/scopes; a revocation set."""

    def __init__(self) -> None:
        self.key = SigningKey.generate()
        self.issuer = TokenIssuer(self.key, max_ttl=86400)
        self.revoked: set[str] = set()
        self.verifier = TokenVerifier(self.key.jwks(), is_revoked=self.revoked.__contains__)

    def token(self, user: str = "oscar", project: str = "p1", scopes: str = ALL_SCOPES) -> str:
        return self.issuer.issue(user, project, scopes, ttl=600)


@dataclass
class Stack:
    gateway: Gateway
    url: str
    dsn: DataStreamingNode | None
    audit_path: Path
    book: ReservationBook
    clock: FakeClock


@contextlib.asynccontextmanager
async def running_gateway(
    keys: Keys,
    tmp: Path,
    *,
    dsn: bool = True,
    burst: int = 1000,
    project_burst: int = 10000,
    rate: float = 0.25,
    **kw: Any,
) -> AsyncIterator[Stack]:
    """A gateway on 127.0.0.1:0 in this event loop, with a real DSN, audit log and reservations."""
    node = None
    if dsn:
        node = DataStreamingNode(keys.verifier, reap_interval=0.2)
        await node.start(0)
    clock = FakeClock()
    audit_path = tmp / "audit.jsonl"
    audit = AuditLog(audit_path, fsync="never")
    book = ReservationBook(tmp / "reservations.db", admins=["admin"])
    gateway = Gateway(
        keys.verifier,
        limiter=RateLimiter(Limit(rate, burst), Limit(rate, project_burst), clock=clock),
        audit=audit,
        dsn_url=node.url if node else None,
        reservations=book,
        admin_users=["admin"],
        maintenance=[
            {
                "start": "2026-12-01T06:00:00Z",
                "end": "2026-12-01T10:00:00Z",
                "what": "leadership system maintenance",
            }
        ],
        **kw,
    )
    url = await gateway.start_async(0)
    try:
        yield Stack(gateway, url, node, audit_path, book, clock)
    finally:
        await gateway.stop_async()
        audit.close()
        if node is not None:
            await node.stop()


async def call(
    url: str,
    method: str,
    path: str,
    token: str | None = None,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    """One real HTTP request; returns (status, parsed JSON or None, response headers)."""
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    if data is None and method in ("POST", "PUT", "PATCH"):
        data = b""
    resp = await AsyncHTTPClient().fetch(
        url + path,
        method=method,
        headers=hdrs,
        body=data,
        raise_error=False,
        allow_nonstandard_methods=True,
        request_timeout=20,
    )
    parsed = None
    if resp.body:
        parsed = (
            json.loads(resp.body) if "json" in resp.headers.get("Content-Type", "") else resp.body
        )
    return resp.code, parsed, resp.headers
