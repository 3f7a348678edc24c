"""Audit anchoring: the chain's head signed by the token service, outside the log file.

:class:`AuditAnchor` runs in the gateway: every ``interval`` seconds in which the log grew (and at
shutdown) it posts the head (record count + last hash) to the token service's
``audit/checkpoints`` with the gateway's own JupyterHub API token; the token service signs it with
its key, which the gateway never holds, and keeps it in its database. :func:`load_checkpoints`
is the other half, for `beamhub audit verify`: it reads the list (a URL or a saved JSON file) and
keeps only checkpoints whose signature verifies with the token service's public JWKS.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote
from urllib.request import urlopen

import jwt
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from beamhub.auth.tokens import ALGORITHM, load_jwks
from beamhub.hub.gateway.audit import AuditLog, Checkpoint

__all__ = [
    "CHECKPOINT_AUDIENCE",
    "DEFAULT_LOG_NAME",
    "AnchorError",
    "AuditAnchor",
    "load_checkpoints",
    "verify_checkpoint",
]

log = logging.getLogger("beamhub.gateway.audit")

#: ``aud`` of a signed checkpoint (hub/tokens/checkpoints.py): never accepted as a project token.
CHECKPOINT_AUDIENCE = "beamhub-audit"
#: The name the gateway's log is checkpointed under.
DEFAULT_LOG_NAME = "gateway"


class AnchorError(Exception):
    """The checkpoints cannot be read, or one does not verify: say which and why."""


class AuditAnchor:
    """Posts ``audit``'s head to ``tokens_url`` + ``audit/checkpoints`` when it moved.

    ``last_error`` holds the last refusal or failure (None after a success); a refusal (409:
    the log is behind or differs from an earlier checkpoint) is logged at ERROR, a token service
    that cannot be reached at WARNING (the next round tries again).
    """

    def __init__(
        self,
        audit: AuditLog,
        tokens_url: str,
        api_token: str,
        name: str = DEFAULT_LOG_NAME,
        interval: float = 10.0,
        timeout: float = 10.0,
    ) -> None:
        if interval <= 0:
            raise ValueError("the audit checkpoint interval must be > 0 seconds")
        self.audit = audit
        self.url = tokens_url.rstrip("/") + "/audit/checkpoints"
        self._api_token = api_token
        self.name = name
        self.interval = interval
        self.timeout = timeout
        self.last_sent: tuple[int, str] | None = None
        self.last_error: str | None = None
        self._task: asyncio.Task | None = None
        self._http: AsyncHTTPClient | None = None

    def __repr__(self) -> str:  # never the API token
        return f"AuditAnchor({self.url!r}, name={self.name!r}, interval={self.interval})"

    async def checkpoint(self) -> bool:
        """Post the head now if it moved since the last success; True if it is anchored."""
        count, digest = self.audit.head()
        if count == 0 or (count, digest) == self.last_sent:
            return count == 0 or self.last_sent == (count, digest)
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True)
        request = HTTPRequest(
            self.url,
            method="POST",
            headers={
                "Authorization": f"token {self._api_token}",
                "Content-Type": "application/json",
            },
            body=json.dumps({"log": self.name, "count": count, "hash": digest}),
            request_timeout=self.timeout,
        )
        try:
            response = await self._http.fetch(request, raise_error=False)
        except (OSError, HTTPClientError) as exc:
            self.last_error = f"the token service at {self.url} cannot be reached: {exc}"
            log.warning("audit checkpoint not posted: %s", self.last_error)
            return False
        if response.code in (200, 201):
            self.last_sent = (count, digest)
            self.last_error = None
            return True
        try:
            said = json.loads(response.body).get("message", "")
        except (ValueError, AttributeError):
            said = ""
        self.last_error = f"the token service refused checkpoint {count} ({response.code}): {said}"
        level = logging.ERROR if response.code == 409 else logging.WARNING
        log.log(level, "audit checkpoint refused: %s", self.last_error)
        return False

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)  # a period, not a readiness signal
            try:
                await self.checkpoint()
            except Exception:  # a background task must not die of one bad round
                log.exception("audit checkpoint round failed")

    def start(self) -> None:
        """Checkpoint every ``interval`` seconds in the running loop."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop the rounds and post the final head."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.checkpoint()
        if self._http is not None:
            self._http.close()
            self._http = None


def _read_json(source: str) -> Any:
    if source.startswith(("http://", "https://")):
        with urlopen(source, timeout=10) as resp:  # noqa: S310 - an admin's URL
            return json.load(resp)
    return json.loads(Path(source).read_text())


def verify_checkpoint(signature: str, keys: dict[str, jwt.PyJWK], name: str) -> Checkpoint:
    """The checkpoint a signature holds, or :class:`AnchorError` if it does not verify."""
    try:
        kid = jwt.get_unverified_header(signature).get("kid")
        key = keys[kid]
        claims = jwt.decode(
            signature,
            key.key,
            algorithms=[ALGORITHM],
            audience=CHECKPOINT_AUDIENCE,
            options={"require": ["log", "count", "hash", "iat"], "verify_iat": False},
        )
    except (jwt.PyJWTError, KeyError) as exc:
        raise AnchorError(f"a checkpoint's signature does not verify ({exc})") from None
    if claims["log"] != name:
        raise AnchorError(f"a checkpoint is for log {claims['log']!r}, not {name!r}")
    return Checkpoint(int(claims["count"]), str(claims["hash"]), float(claims["iat"]))


def load_checkpoints(
    source: str, jwks_source: str | dict[str, Any], name: str = DEFAULT_LOG_NAME
) -> list[Checkpoint]:
    """The checkpoints of log ``name`` from ``source`` (the token service's ``audit/checkpoints``
    URL, or a JSON file saved from it), each taken from its verified signature, by count."""
    if source.startswith(("http://", "https://")) and "?" not in source:
        source = f"{source}?log={quote(name)}"
    try:
        listed = _read_json(source)
        jwks = load_jwks(jwks_source)
    except (OSError, ValueError) as exc:
        raise AnchorError(f"cannot read the checkpoints or the JWKS: {exc}") from exc
    keys = {k["kid"]: jwt.PyJWK(k) for k in jwks.get("keys", []) if "kid" in k}
    entries = listed.get("checkpoints") if isinstance(listed, dict) else None
    if not isinstance(entries, list):
        raise AnchorError(f"{source}: not a checkpoint list ({{'checkpoints': [...]}})")
    marks = []
    for number, entry in enumerate(entries, start=1):
        signature = entry.get("signature") if isinstance(entry, dict) else None
        if not isinstance(signature, str):
            raise AnchorError(f"checkpoint {number} of {source} has no signature")
        try:
            marks.append(verify_checkpoint(signature, keys, name))
        except AnchorError as exc:
            raise AnchorError(f"checkpoint {number} of {source}: {exc}") from None
    return sorted(marks, key=lambda c: c.count)
