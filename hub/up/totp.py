"""One-time codes (TOTP, RFC 6238) for the dev identity provider's second factor.

The dev IdP (hub/up/idp.mjs, npm ``otplib``) checks the codes; this module enrols the dev users
(a random secret each, generated on first start, kept 0600 in the state dir), makes the
``otpauth://`` URI an authenticator app scans, and computes the current code for
``beamhub totp USER`` and the tests. SHA-1, 6 digits, 30-second steps: what every app expects.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import struct
import time
from pathlib import Path
from urllib.parse import quote

__all__ = ["DIGITS", "STEP_S", "code", "enrol", "load_secrets", "new_secret", "otpauth_uri"]

STEP_S = 30
DIGITS = 6
#: the file (in the state dir) holding every enrolled dev user's secret
FILE = "idp-totp.json"


def new_secret() -> str:
    """A random 160-bit secret in base32, as authenticator apps take it."""
    return base64.b32encode(secrets.token_bytes(20)).decode()


def code(secret: str, at: float | None = None) -> str:
    """The code for ``secret`` at time ``at`` (default now)."""
    key = base64.b32decode(secret.upper() + "=" * (-len(secret) % 8))
    counter = int((time.time() if at is None else at) // STEP_S)
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    number = struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF
    return f"{number % 10**DIGITS:0{DIGITS}d}"


def otpauth_uri(user: str, secret: str, issuer: str = "beamhub dev") -> str:
    """The URI an authenticator app scans (or takes pasted) to enrol ``user``."""
    label = quote(f"{issuer}:{user}")
    return f"otpauth://totp/{label}?secret={secret}&issuer={quote(issuer)}&digits={DIGITS}"


def load_secrets(state: Path) -> dict[str, str]:
    """The enrolled users' secrets ({} before the first start)."""
    try:
        return json.loads((state / FILE).read_text())
    except FileNotFoundError:
        return {}


def enrol(state: Path, users: list[str]) -> tuple[dict[str, str], list[str]]:
    """Secrets of ``users``, generating the missing ones; returns (all secrets, newly enrolled).

    The file is written 0600 and atomically; users no longer listed keep their secret (harmless,
    and a user put back gets the same authenticator entry).
    """
    known = load_secrets(state)
    new = [u for u in users if u not in known]
    if new:
        known.update({u: new_secret() for u in new})
        tmp = state / (FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(known, f, indent=2)
        os.replace(tmp, state / FILE)
    return {u: known[u] for u in users}, new
