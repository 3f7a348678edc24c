"""RemoteJwksVerifier: verify project tokens with the token service's published JWKS, fetched lazily.

A verifier that starts before the token service (the DSN inside `beamhub up` starts first, so
servers can be told its URL) cannot read the public key at construction, and must never read the
private key file to derive it. This one fetches the JWKS at the first verification and again when
a token names a key id it does not know (key rotation), at most every ``refetch_s`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from beamhub.auth.tokens import (
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    Claims,
    TokenError,
    TokenVerifier,
    load_jwks,
)

__all__ = ["RemoteJwksVerifier"]

log = logging.getLogger("beamhub.tokens.jwks")


class RemoteJwksVerifier:
    """Same ``verify()`` as :class:`~beamhub.auth.tokens.TokenVerifier`; keys from ``jwks_url``.

    While the JWKS cannot be fetched, tokens are refused with status 503 (reason
    ``jwks_unavailable``): the caller should retry, nothing is wrong with its token.
    """

    def __init__(
        self,
        jwks_url: str,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        leeway: int = 5,
        is_revoked: Callable[[str], bool] | None = None,
        *,
        refetch_s: float = 30.0,
    ) -> None:
        self.jwks_url = jwks_url
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.is_revoked = is_revoked or (lambda jti: False)
        self.refetch_s = refetch_s
        self._verifier: TokenVerifier | None = None
        self._fetched_at = float("-inf")
        self._lock = threading.Lock()

    def _load(self, force: bool) -> TokenVerifier:
        with self._lock:
            now = time.monotonic()
            stale = force and now - self._fetched_at >= self.refetch_s
            if self._verifier is not None and not stale:
                return self._verifier
            try:
                jwks = load_jwks(self.jwks_url)
                verifier = TokenVerifier(
                    jwks,
                    issuer=self.issuer,
                    audience=self.audience,
                    leeway=self.leeway,
                    is_revoked=self.is_revoked,
                )
            except (OSError, ValueError, TypeError) as exc:
                if self._verifier is not None:
                    log.warning(
                        "JWKS %s unavailable (%s); keeping the known keys", self.jwks_url, exc
                    )
                    return self._verifier
                raise TokenError(
                    503,
                    "jwks_unavailable",
                    f"the token service's public keys ({self.jwks_url}) are not available yet "
                    f"({exc}); retry in a few seconds",
                ) from None
            self._fetched_at = now
            self._verifier = verifier
            log.info("loaded JWKS from %s (key ids %s)", self.jwks_url, sorted(verifier.keys))
            return verifier

    @property
    def keys(self) -> dict:
        return self._load(force=False).keys

    def verify(
        self, token: str | None, *, project: str | None = None, scope: str | None = None
    ) -> Claims:
        """Return the claims, or raise :class:`TokenError` saying what was wrong."""
        verifier = self._load(force=False)
        try:
            return verifier.verify(token, project=project, scope=scope)
        except TokenError as exc:
            if exc.reason != "unknown_key":
                raise
        return self._load(force=True).verify(token, project=project, scope=scope)
