"""Test helpers for the DSN control plane: keys and tokens, a running DSN, real HTTP calls."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import zmq
from tornado.httpclient import AsyncHTTPClient

from beamhub.auth.tokens import (
    ALGORITHM,
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    SigningKey,
    TokenIssuer,
    TokenVerifier,
)
from beamhub.streaming.dsn import DataStreamingNode
from beamhub.streaming.template import Template

__all__ = [
    "Tokens",
    "api",
    "assert_nothing_provisioned",
    "free_port",
    "register",
    "running_dsn",
    "secure",
    "wait_until",
]


class Tokens:
    """One signing key (the hub's) and ways to make good and bad tokens with it."""

    def __init__(self) -> None:
        self.key = SigningKey.generate()
        self.issuer = TokenIssuer(self.key, max_ttl=86400)
        self.verifier = TokenVerifier(self.key.jwks())

    def issue(
        self,
        project: str = "p1",
        scopes: str = "stream.read stream.publish",
        *,
        ttl: int = 600,
        sub: str = "alice",
        audience: str | None = None,
    ) -> str:
        return self.issuer.issue(sub, project, scopes, ttl=ttl, audience=audience)

    def expired(self, project: str = "p1", scopes: str = "stream.read stream.publish") -> str:
        """Signed by the right key, but it ran out a minute ago (beyond the verifier's leeway)."""
        now = int(time.time())
        claims = {
            "iss": DEFAULT_ISSUER,
            "sub": "alice",
            "aud": DEFAULT_AUDIENCE,
            "project": project,
            "scope": scopes,
            "iat": now - 600,
            "nbf": now - 600,
            "exp": now - 60,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(
            claims, self.key.private_key, algorithm=ALGORITHM, headers={"kid": self.key.kid}
        )

    def forged(self, project: str = "p1", scopes: str = "stream.read stream.publish") -> str:
        """A well-formed token signed by another key that claims the real key's id."""
        other = SigningKey(SigningKey.generate().private_key, kid=self.key.kid)
        return TokenIssuer(other).issue("mallory", project, scopes, ttl=600)

    def tampered(self, project: str = "p1") -> str:
        """A genuine stream.read token whose payload was edited to add stream.publish."""
        header, payload, signature = self.issue(project, "stream.read").split(".")
        body = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        body["scope"] = "stream.read stream.publish steer"
        edited = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
        return f"{header}.{edited}.{signature}"


async def api(
    base: str,
    method: str,
    path: str,
    token: str | None = None,
    body: Any = None,
    *,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    """One real HTTP call to the DSN; returns (status, parsed JSON body or None)."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (None if body is None else json.dumps(body))
    if data is None and method in ("POST", "PUT"):
        data = b""
    resp = await AsyncHTTPClient().fetch(
        base + path,
        method=method,
        headers=headers,
        body=data,
        raise_error=False,
        allow_nonstandard_methods=True,
        request_timeout=20,
    )
    return resp.code, (json.loads(resp.body) if resp.body else None)


async def register(
    base: str, channel_id: str, token: str, face: str, consumer_id: str | None = None
) -> dict:
    """Register a fresh CURVE keypair on a channel's face over real HTTP; the answer plus
    ``public``/``secret`` (bytes) to :func:`secure` a socket with."""
    public, secret = zmq.curve_keypair()
    body = {"face": face, "public_key": public.decode()}
    if consumer_id is not None:
        body["consumer_id"] = consumer_id
    code, answer = await api(base, "POST", f"/api/channels/{channel_id}/credentials", token, body)
    assert code == 201, answer
    return {**answer, "public": public, "secret": secret}


def secure(sock: zmq.Socket, cred: dict) -> zmq.Socket:
    """Make ``sock`` a CURVE client with a registered credential (from :func:`register`)."""
    sock.curve_serverkey = cred["server_key"].encode()
    sock.curve_publickey = cred["public"]
    sock.curve_secretkey = cred["secret"]
    return sock


async def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """Poll a (possibly async) condition without blocking the event loop; fail after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last value {value!r})")
        await asyncio.sleep(interval)


def free_port() -> int:
    """A port nothing listens on (bound then released): a dead source's address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def running_dsn(
    tokens: Tokens, template: Template | None = None, reap_interval: float = 0.1
) -> AsyncIterator[DataStreamingNode]:
    """A DSN with a real data plane on 127.0.0.1 and an ephemeral control port; stopped after."""
    node = DataStreamingNode(tokens.verifier, template, reap_interval=reap_interval)
    await node.start(0)
    try:
        yield node
    finally:
        await node.stop()


def assert_nothing_provisioned(node: DataStreamingNode) -> None:
    """Neither the control plane nor the data plane holds any channel."""
    assert node.channels == {}
    assert node.data_plane.channels() == []
