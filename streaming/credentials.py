"""Client side of channel credentials: make a CURVE keypair here, register its public half.

Every DSN channel is a CURVE channel: a process whose public key the channel does not know can
neither receive frames (work, monitor), nor send them (producer), nor report. A client makes its own
keypair (the secret half never leaves it) and registers the public half with
``POST {dsn}/api/channels/{id}/credentials`` and its project token: ``consumer`` keys need
``stream.read`` and are bound to one consumer id (the DSN accepts that id's reports only from that
key); ``producer`` keys are a write (the channel's owner, an operator or the PI).
:meth:`beamhub.streaming.consumer.StreamConsumer.from_dsn` and
:meth:`beamhub.streaming.source.SourceRunner.from_dsn` call :func:`register_key` themselves.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import zmq

__all__ = [
    "ChannelLookupError",
    "ClientCredential",
    "api_call",
    "register_key",
    "resolve_channel",
]

#: the DSN's channel ids; anything else a caller passes is a stream name
CHANNEL_ID_PREFIX = "ch-"


class ChannelLookupError(RuntimeError):
    """The DSN control API did not give us the channel (``status`` is the HTTP status or 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ClientCredential:
    """A registered client keypair (z85) and where it may connect."""

    face: str
    public: bytes
    secret: bytes = field(repr=False)  # never in a repr
    server_key: bytes | None  # None: a channel without CURVE (a data plane used directly)
    endpoints: dict[str, Any]
    consumer_id: str | None = None


def api_call(
    dsn_url: str, method: str, path: str, token: str, body: Any = None, *, timeout: float = 10.0
) -> dict | None:
    """One call to the DSN control API with the project token; the JSON answer (``None`` for an
    empty one, e.g. 204 to DELETE), or :class:`ChannelLookupError` carrying the DSN's message."""
    url = f"{dsn_url.rstrip('/')}{path}"
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"dsn_url: {dsn_url!r} must start with http:// or https://")
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 - scheme checked above
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - scheme checked above
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise ChannelLookupError(
            exc.code, f"DSN refused {method} {path} (HTTP {exc.code}): {_why(exc)}"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ChannelLookupError(0, f"cannot reach the DSN at {dsn_url}: {exc}") from exc
    if not raw.strip():
        return None  # 204 No Content (DELETE), or an empty 200
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ChannelLookupError(
            response.status,
            f"the DSN at {dsn_url} answered {method} {path} with something that is not JSON "
            f"({raw[:80]!r}); is {dsn_url} the DSN's control API?",
        ) from exc


def resolve_channel(dsn_url: str, channel: str, token: str, *, timeout: float = 10.0) -> str:
    """A channel id as given (``ch-...``), or the id of the token's project channel that streams
    ``channel``: the one way notebooks, widgets and the CLI turn a stream name into a channel.

    Several live channels streaming the same name are ambiguous (another member may have made
    one): the error lists their ids and owners instead of guessing.
    """
    if not isinstance(channel, str) or not channel:
        raise ValueError("channel: give a channel id (ch-...) or a stream name, e.g. 'detector'")
    if channel.startswith(CHANNEL_ID_PREFIX):
        return channel
    answer = api_call(dsn_url, "GET", "/api/channels", token, timeout=timeout) or {}
    listed = [c for c in answer.get("channels", []) if isinstance(c, dict)]
    named = [c for c in listed if c.get("stream") == channel]
    live = [c for c in named if c.get("state") != "failed"] or named
    if len(live) == 1:
        return str(live[0]["id"])
    if not live:
        streams = sorted({str(c.get("stream")) for c in listed})
        project = f"project {listed[0].get('project')}" if listed else "this token's project"
        raise ChannelLookupError(
            404,
            f"no channel streams {channel!r} in {project}; its streams: {streams or 'none'}. "
            "Give one of these names or a channel id (ch-...), or a token of the project "
            "whose channel it is",
        )
    which = ", ".join(f"{c['id']} (owner {c.get('owner')})" for c in live)
    raise ChannelLookupError(
        409, f"{len(live)} channels stream {channel!r}: {which}; give the channel id instead"
    )


def _why(exc: urllib.error.HTTPError) -> str:
    """The DSN's error message (``{"reason", "message"}``), or the raw body if it is not one."""
    detail = exc.read(2000).decode("utf-8", "replace")
    try:
        answer = json.loads(detail)
    except ValueError:
        return detail or str(exc.reason)
    if isinstance(answer, dict) and isinstance(answer.get("message"), str):
        return f"{answer['message']} ({answer.get('reason', 'error')})"
    return detail


def register_key(
    dsn_url: str,
    channel_id: str,
    token: str,
    face: str,
    *,
    consumer_id: str | None = None,
    keypair: tuple[bytes, bytes] | None = None,
    timeout: float = 10.0,
) -> ClientCredential:
    """Register a (new, unless given) CURVE keypair's public half on a channel's ``face``."""
    public, secret = keypair or zmq.curve_keypair()
    body: dict[str, Any] = {"face": face, "public_key": public.decode()}
    if consumer_id is not None:
        body["consumer_id"] = consumer_id
    path = f"/api/channels/{urllib.request.quote(channel_id, safe='')}/credentials"
    answer = api_call(dsn_url, "POST", path, token, body, timeout=timeout)
    return ClientCredential(
        face=face,
        public=public,
        secret=secret,
        server_key=answer["server_key"].encode() if answer.get("server_key") else None,
        endpoints=answer["endpoints"],
        consumer_id=answer.get("consumer_id"),
    )
