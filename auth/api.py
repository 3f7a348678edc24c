"""The one JSON API base of beamhub's HTTP services: one error shape, bounded bodies, a quiet log.

The gateway, the DSN's control API, the token service, a source's control endpoint and the
dashboard all answer errors as one JSON object (:data:`ERROR_SCHEMA`)::

    {"reason": "scope", "message": "the token lacks the 'steer' scope; ask for ...", "field": ...}

``reason`` is a machine-readable code, ``message`` a sentence for a person that says what was
wrong and what to do, ``field`` (optional) the request field at fault; a few errors add more
(``limit``, ``retry_after``). Domain objects raise their own errors; handlers translate them into
:class:`ApiError`. Anything else becomes a 500 whose message hides the traceback (it goes to the
log). Bodies are streamed: a body whose Content-Length exceeds the handler's ``max_body`` is
refused with a JSON 413 before any of it is read, and a chunked body is cut off at the limit.
After such a refusal the server stops sending and reads (and drops) what the client still sends
for up to :data:`LINGER_S` before it closes (a "lingering close", as Apache and nginx do): closing
with unread data makes the kernel send a TCP reset, which can destroy the 413 before a proxy has
read it (configurable-http-proxy then answers its own HTML 503).
The access log names method, path (never the query string) and status; never a header.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import socket
from typing import Any

import tornado.gen
import tornado.iostream
import tornado.web
from tornado.http1connection import HTTP1Connection

__all__ = [
    "ERROR_SCHEMA",
    "LINGER_S",
    "ApiError",
    "JsonApiHandler",
    "log_request",
    "parse_json_object",
]

log = logging.getLogger("beamhub.api")

#: After refusing a body it did not read: how long to keep reading and dropping it before closing.
LINGER_S = 5.0
_lingering: set[asyncio.Task] = set()  # held until done (the event loop keeps weak references)

#: JSON Schema of every error body (the OpenAPI documents reference it as ``Error``).
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["reason", "message"],
    "properties": {
        "reason": {"type": "string", "description": "machine-readable code, e.g. 'scope'"},
        "message": {"type": "string", "description": "what was wrong and what to do"},
        "field": {"type": "string", "description": "the request field at fault"},
    },
    "additionalProperties": True,
}


class ApiError(tornado.web.HTTPError):
    """An error a person will read, answered as JSON ``{reason, message, field?, ...extra}``.

    ``headers`` (e.g. ``WWW-Authenticate``, ``Retry-After``) are sent with the answer and are not
    part of the body.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(status)
        self.status = status
        self.reason = reason
        self.message = message
        self.field = field
        self.headers = dict(headers or {})
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"reason": self.reason, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        body.update({k: v for k, v in self.extra.items() if v is not None})
        return body

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.reason}: {self.message}"


def parse_json_object(raw: bytes | str, **loads: Any) -> dict[str, Any]:
    """A JSON object from ``raw`` (empty = ``{}``), or a 400 ``malformed_json`` that says why."""
    if not raw or not raw.strip():
        return {}
    try:
        body = json.loads(raw, **loads)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        why = "nested too deep" if isinstance(exc, RecursionError) else str(exc)
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {why}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "malformed_json", "the body must be a JSON object {...}")
    return body


@tornado.web.stream_request_body
class JsonApiHandler(tornado.web.RequestHandler):
    """Base of every JSON API handler: errors in the one shape, bodies bounded before reading.

    Subclasses set ``max_body`` (bytes) and ``service`` (named in 500 messages), read the body
    with :meth:`json_body` or :meth:`raw_body`, and answer with :meth:`write_json`. A subclass
    that overrides ``prepare`` awaits the base's first and returns if ``self._finished``.
    """

    max_body: int = 64 * 1024
    service: str = "the service"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        super().__init__(*args, **kwargs)

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")

    async def prepare(self) -> None:  # type: ignore[override]
        declared = self.request.headers.get("Content-Length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                error = ApiError(400, "bad_request", "Content-Length is not a number")
                await self._refuse_unread(error)
                return
            if size > self.max_body:
                await self._refuse_unread(self._too_large(size))

    def _too_large(self, size: int) -> ApiError:
        return ApiError(
            413,
            "body_too_large",
            f"the request body is {size} bytes; the limit is {self.max_body} bytes",
            limit=self.max_body,
        )

    async def _refuse_unread(self, error: ApiError) -> None:
        """Answer ``error`` with the body unread, then close by lingering (see the module doc).

        Only prepare may call this: tornado lets a handler take the connection (``detach``)
        while the request's headers are being handled, before it reads the body.
        """
        if not isinstance(self.request.connection, HTTP1Connection):
            raise error  # no stream to take over: tornado's own close
        body = json.dumps(error.to_json()).encode()
        self.set_status(error.status)
        for name, value in error.headers.items():
            self.set_header(name, value)
        self.set_header("Connection", "close")
        self.set_header("Content-Length", len(body))
        self.write(body)
        try:
            await self.flush()
        except tornado.iostream.StreamClosedError:
            pass  # the client is gone; the linger below closes at once
        stream = self.detach()  # tornado would close at once, with the body unread: a reset
        self.application.log_request(self)
        task = asyncio.ensure_future(_linger(stream))
        _lingering.add(task)
        task.add_done_callback(_lingering.discard)

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self.max_body:
            self._chunks.append(chunk)

    def raw_body(self) -> bytes:
        """The whole body (at most ``max_body`` bytes), or a 413 for a longer chunked one."""
        if self._size > self.max_body:
            raise self._too_large(self._size)
        return b"".join(self._chunks)

    def json_body(self, **loads: Any) -> dict[str, Any]:
        """The body as a JSON object; empty means ``{}``."""
        return parse_json_object(self.raw_body(), **loads)

    def write_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        if status == 204 or body is None:
            self.clear_header("Content-Type")
            self.finish()
        else:
            self.finish(json.dumps(body))

    def bearer(self) -> str:
        """The bearer token of the Authorization header, or ''."""
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        self.set_status(status_code)  # the standard phrase; tornado took ApiError.reason for it
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        if isinstance(exc, ApiError):
            body = exc.to_json()
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif isinstance(exc, tornado.web.HTTPError) and status_code < 500:
            body = {"reason": "http", "message": exc.log_message or self._reason}
        else:
            body = {
                "reason": "internal",
                "message": f"internal error in {self.service}; its log has the details",
            }
        self.finish(json.dumps(body))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, ApiError):
            return  # an expected refusal: the answer says it all, no traceback
        super().log_exception(typ, value, tb)


async def _linger(stream: tornado.iostream.IOStream, seconds: float = LINGER_S) -> None:
    """Send the rest of the answer, then FIN; drop what the peer still sends until it closes or
    ``seconds`` pass; then close. The answer arrives whole instead of being lost to a reset."""
    start = asyncio.get_running_loop().time()
    try:
        await stream.write(b"")  # resolves once everything written before is on the wire
        stream.socket.shutdown(socket.SHUT_WR)
        while (left := seconds - (asyncio.get_running_loop().time() - start)) > 0:
            read = stream.read_bytes(1 << 16, partial=True)
            await tornado.gen.with_timeout(
                datetime.timedelta(seconds=left),
                read,
                quiet_exceptions=tornado.iostream.StreamClosedError,
            )
    except (tornado.iostream.StreamClosedError, OSError, TimeoutError):
        pass  # the peer closed, went away, or the time is up: all the same here
    finally:
        stream.close()


def log_request(handler: tornado.web.RequestHandler, logger: logging.Logger = log) -> None:
    """Access log line: status, method, path (no query string), time. Never a header or token."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    ms = 1000.0 * handler.request.request_time()
    logger.log(level, "%d %s %s %.2fms", status, handler.request.method, handler.request.path, ms)
