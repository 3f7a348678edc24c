"""The one JSON API base, on a real tornado server over real sockets."""

from __future__ import annotations

import socket
import threading

import pytest
import requests
import tornado.web

from beamhub.auth.api import ApiError, JsonApiHandler
from tests.httpserver import ServerThread

pytestmark = pytest.mark.timeout(60)


class EchoHandler(JsonApiHandler):
    max_body = 1024
    service = "the echo service"

    def post(self) -> None:
        body = self.json_body()
        if "boom" in body:
            raise RuntimeError("secret detail")
        if "refuse" in body:
            raise ApiError(403, "scope", "no", field="refuse", headers={"Retry-After": "3"})
        self.write_json({"got": body}, 201)


@pytest.fixture(scope="module")
def url():
    app = tornado.web.Application([(r"/echo", EchoHandler)])
    with ServerThread(app) as server:
        yield f"http://127.0.0.1:{server.port}/echo"


def test_a_json_object_is_echoed(url: str) -> None:
    r = requests.post(url, json={"a": 1}, timeout=5)
    assert (r.status_code, r.json()) == (201, {"got": {"a": 1}})


@pytest.mark.parametrize(
    ("data", "why"),
    [(b"{", "not valid JSON"), (b"[1]", "JSON object"), (b"[" * 100000, "nested too deep")],
)
def test_malformed_bodies_are_400_in_the_one_shape(url: str, data: bytes, why: str) -> None:
    r = requests.post(url, data=data[:1000] if why != "nested too deep" else b"[" * 1000, timeout=5)
    assert r.status_code == 400
    assert r.json()["reason"] == "malformed_json" and why in r.json()["message"]


def test_domain_error_keeps_field_and_headers(url: str) -> None:
    r = requests.post(url, json={"refuse": 1}, timeout=5)
    assert r.status_code == 403 and r.headers["Retry-After"] == "3"
    assert r.reason == "Forbidden"  # the standard phrase in the status line, not the code
    assert r.json() == {"reason": "scope", "message": "no", "field": "refuse"}


def test_unexpected_exception_is_a_500_without_the_traceback(url: str) -> None:
    r = requests.post(url, json={"boom": 1}, timeout=5)
    assert r.status_code == 500
    assert r.json()["reason"] == "internal" and "the echo service" in r.json()["message"]
    assert "secret detail" not in r.text


def test_oversized_body_refused_from_content_length_before_it_is_sent(url: str) -> None:
    """Declare 1 GB, send nothing: the 413 arrives at once (the server did not wait for it)."""
    port = int(url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        answer = s.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413"), answer
    assert '"reason": "body_too_large"' in answer and '"limit": 1024' in answer


def test_chunked_body_over_the_limit_is_413(url: str) -> None:
    r = requests.post(url, data=iter([b'{"a": "' + b"x" * 600, b"x" * 600 + b'"}']), timeout=5)
    assert r.status_code == 413 and r.json()["reason"] == "body_too_large"


def test_refused_body_that_is_sent_anyway_gets_the_413_and_no_reset(url: str) -> None:
    """A client (or a proxy) that sends the whole over-limit body while the 413 is answered: the
    server reads and drops it instead of closing on unread data (a TCP reset that destroys the
    answer; configurable-http-proxy then shows its own 503)."""
    port = int(url.split(":")[2].split("/")[0])
    size = 4 << 20
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
        failures: list[OSError] = []

        def send_body() -> None:
            try:
                s.sendall(b"x" * size)
                s.shutdown(socket.SHUT_WR)  # all sent: the server may close now
            except OSError as exc:
                failures.append(exc)

        sender = threading.Thread(target=send_body)
        sender.start()
        answer = b""
        while chunk := s.recv(65536):  # the server closes once it has the body (or gives up)
            answer += chunk
        sender.join(10)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"reason": "body_too_large"' in answer
    assert not failures, f"the server reset the connection while the body was sent: {failures}"
