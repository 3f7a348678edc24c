"""RevocationCache: a jti listed by the hub is refused by a verifier within one poll interval."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from beamhub.auth.tokens import RevocationCache, SigningKey, TokenError, TokenIssuer, TokenVerifier


class _ListServer:
    def __init__(self) -> None:
        self.revoked: list[str] = []
        self.broken = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"oops" if outer.broken else json.dumps({"revoked": outer.revoked}).encode()
                self.send_response(500 if outer.broken else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/revoked"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def list_server() -> Iterator[_ListServer]:
    server = _ListServer()
    yield server
    server.close()


@pytest.mark.timeout(20)
def test_revoked_jti_refused_within_one_interval(list_server: _ListServer) -> None:
    issuer = TokenIssuer(SigningKey.generate())
    token = issuer.issue("alice", "p-1001", "stream.read", ttl=60)
    interval = 0.3
    with RevocationCache(list_server.url, interval=interval) as cache:
        verifier = TokenVerifier(issuer.jwks(), is_revoked=cache.is_revoked)
        claims = verifier.verify(token)
        list_server.revoked.append(claims.jti)
        revoked_at = time.monotonic()
        while True:
            try:
                verifier.verify(token)
            except TokenError as err:
                assert err.reason == "revoked"
                break
            assert time.monotonic() - revoked_at < 2 * interval + 1.0, "not refused in time"
            time.sleep(0.02)
        assert time.monotonic() - revoked_at <= interval + 0.5


@pytest.mark.timeout(20)
def test_failed_poll_keeps_last_list(list_server: _ListServer) -> None:
    list_server.revoked = ["abc"]
    cache = RevocationCache(list_server.url, interval=60)
    assert cache.poll_once() is True
    list_server.broken = True
    assert cache.poll_once() is False
    assert cache.is_revoked("abc") and not cache.is_revoked("def")


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        RevocationCache("http://127.0.0.1:1/revoked", interval=0)
