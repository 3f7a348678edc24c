"""Signed checkpoints of the gateway's audit chain: the anchor outside the log file.

The gateway posts its chain head (record count + hash) every few seconds with its own JupyterHub
API token (``custom:beamhub:tokens:audit-checkpoint``); the token service signs it with its key (the gateway
never holds it) and keeps it in its database. Checkpoints only move forward: a head behind the last
one (a truncated log) or a different hash for a counted record (a rewritten chain) is refused and
logged. ``GET audit/checkpoints?log=NAME`` lists them for `beamhub audit verify`; they are public,
like the JWKS that verifies them (a count and a hash reveal no record).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import jwt

from beamhub.auth.api import ApiError
from beamhub.auth.tokens import ALGORITHM, TokenIssuer
from beamhub.hub.tokens.handlers import AUDIT_CHECKPOINT_SCOPE, BaseHandler

__all__ = [
    "AUDIT_CHECKPOINT_SCOPE",
    "CHECKPOINT_AUDIENCE",
    "CheckpointsHandler",
    "sign_checkpoint",
]

log = logging.getLogger("beamhub.tokens.service")

#: ``aud`` of a signed checkpoint: no verifier of project tokens accepts one as a token (the
#: same value as beamhub.hub.gateway.anchor.CHECKPOINT_AUDIENCE, which verifies them).
CHECKPOINT_AUDIENCE = "beamhub-audit"
_LOG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HASH = re.compile(r"^[0-9a-f]{64}$")


def sign_checkpoint(issuer: TokenIssuer, log_name: str, count: int, digest: str, at: float) -> str:
    """A compact JWS over (log, count, hash, iat) with the token service's key."""
    claims = {
        "iss": issuer.issuer,
        "aud": CHECKPOINT_AUDIENCE,
        "log": log_name,
        "count": count,
        "hash": digest,
        "iat": int(at),
    }
    return jwt.encode(
        claims,
        issuer.key.private_key,
        algorithm=ALGORITHM,
        headers={"kid": issuer.key.kid, "typ": "audit-checkpoint+jwt"},
    )


class CheckpointsHandler(BaseHandler):
    """``GET audit/checkpoints?log=gateway`` lists; ``POST {log, count, hash}`` signs and keeps."""

    FIELDS = {"log": (str,), "count": (int,), "hash": (str,)}

    def get(self) -> None:
        name = self.get_query_argument("log", "gateway")
        if not _LOG_NAME.match(name):
            raise ApiError(400, "bad_field", "log: a short name, e.g. gateway", field="log")
        self.write_json({"log": name, "checkpoints": self.ctx.store.checkpoints(name)})

    def post(self) -> None:
        caller = self.require_user()
        if AUDIT_CHECKPOINT_SCOPE not in set(caller.get("scopes") or ()):
            raise ApiError(
                403,
                "scope",
                f"{caller.get('kind', 'user')} {caller['name']!r} may not post audit "
                f"checkpoints: its JupyterHub role lacks {AUDIT_CHECKPOINT_SCOPE}",
            )
        data = self.fields(self.FIELDS, set(self.FIELDS))
        name, count, digest = data["log"], data["count"], data["hash"]
        if not _LOG_NAME.match(name):
            raise ApiError(400, "bad_field", "log: a short name, e.g. gateway", field="log")
        if count < 1:
            raise ApiError(400, "bad_field", "count: the number of records, >= 1", field="count")
        if not _HASH.match(digest):
            raise ApiError(400, "bad_field", "hash: 64 lowercase hex digits", field="hash")
        kept = self.ctx.store.checkpoints(name)
        last = kept[-1] if kept else None
        same = next((c for c in kept if c["count"] == count), None)
        if same is not None:
            if same["hash"] != digest:
                self._refuse(
                    "checkpoint_conflict",
                    f"record {count} of log {name!r} was checkpointed with another hash: the "
                    "chain was rewritten",
                    name,
                )
            self.write_json(same)
            return
        if last is not None and count < last["count"]:
            self._refuse(
                "checkpoint_behind",
                f"log {name!r} has {count} records but was checkpointed at {last['count']}: "
                "records were removed",
                name,
            )
        at = time.time()
        signature = sign_checkpoint(self.ctx.delegator.issuer, name, count, digest, at)
        self.ctx.store.add_checkpoint(name, count, digest, at, caller["name"], signature)
        log.info("audit checkpoint log=%s count=%d by=%s", name, count, caller["name"])
        self.write_json(
            {"log": name, "count": count, "hash": digest, "at": at, "signature": signature}, 201
        )

    def _refuse(self, reason: str, why: str, name: str) -> Any:
        log.error("audit checkpoint refused: %s; run `beamhub audit verify`", why)
        raise ApiError(
            409,
            reason,
            f"{why}; run `beamhub audit verify` on the log, keep it as evidence and start a new "
            "one under another name",
            field="count",
            log=name,
        )
