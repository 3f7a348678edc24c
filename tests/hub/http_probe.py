"""A raw HTTP client for hostile requests: declare a huge body and stream it until answered."""

from __future__ import annotations

import json
import select
import socket
import time
from typing import Any
from urllib.parse import urlsplit

__all__ = ["declare_and_stream"]


def declare_and_stream(
    url: str, length: int, headers: dict[str, str] | None = None, timeout: float = 60.0
) -> tuple[int, Any]:
    """POST ``url`` declaring a ``length``-byte body and send it 1 MiB at a time until the server
    answers (or stops reading); return the status and the parsed JSON body (else the raw text)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = [f"POST {parts.path} HTTP/1.1", f"Host: {host}:{port}"]
    head += [
        f"{k}: {v}" for k, v in {"Content-Type": "application/json", **(headers or {})}.items()
    ]
    head += [f"Content-Length: {length}", "", ""]
    chunk = b"x" * (1 << 20)
    deadline = time.monotonic() + timeout
    answer = b""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall("\r\n".join(head).encode())
        sent = 0
        while sent < length and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 1.0)
            if readable:
                break  # the answer is coming: stop sending, as a browser would
            if writable:
                try:
                    sent += sock.send(chunk[: min(len(chunk), length - sent)])
                except (BrokenPipeError, ConnectionResetError):
                    break
        sock.settimeout(max(1.0, deadline - time.monotonic()))
        try:
            while data := sock.recv(1 << 16):
                answer += data
                if _complete(answer):
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    status_line, _, rest = answer.partition(b"\r\n")
    status = int(status_line.split()[1]) if status_line.startswith(b"HTTP/") else 0
    body = rest.partition(b"\r\n\r\n")[2]
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False
