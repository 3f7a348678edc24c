"""Project access tokens: short-lived ES256 JWTs, their keys, JWKS and local verification.

Part of the bottom layer (nothing of ours above it, no JupyterHub) so the DSN, the gateway and Dask workers can verify
tokens with only the public JWKS. Claims follow the SciTokens/WLCG JWT profile where it fits
(``wlcg.ver``, space-separated ``scope``, ``sub``, ``aud``, ``iss``, ``iat``, ``nbf``, ``exp``,
``jti``) plus ``project``, so existing WLCG verifiers can read them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from beamhub.auth.roles import KNOWN_SCOPES

__all__ = [
    "ALGORITHM",
    "DEFAULT_AUDIENCE",
    "KNOWN_SCOPES",
    "Claims",
    "RevocationCache",
    "SigningKey",
    "TokenError",
    "TokenIssuer",
    "TokenVerifier",
    "load_jwks",
]

ALGORITHM = "ES256"
DEFAULT_AUDIENCE = "beamhub"
DEFAULT_ISSUER = "beamhub-dev"


class TokenError(Exception):
    """A token that must be refused. ``status`` is 401 (who are you?) or 403 (not allowed)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Claims:
    """A verified token's claims; never holds the token itself."""

    sub: str
    project: str
    scopes: frozenset[str]
    aud: str
    iss: str
    iat: int
    nbf: int
    exp: int
    jti: str

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    @property
    def expires_in(self) -> float:
        return self.exp - time.time()

    def log_fields(self) -> dict[str, str]:
        """What logs may name: never the token, always the jti."""
        return {"user": self.sub, "project": self.project, "jti": self.jti}


class SigningKey:
    """A P-256 private key with a stable key id; the issuer's half of the pair."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, kid: str | None = None) -> None:
        self.private_key = private_key
        self.kid = kid or _thumbprint(private_key.public_key())

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SigningKey:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(
                f"{path}: not an EC private key; generate one with `beamhub token keygen`"
            )
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> SigningKey:
        """Load the key at ``path``, creating it (mode 0600) the first time."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        key = cls.generate()
        # processes starting together (hub, token service, DSN) must end up with one key: write
        # a temporary file, then link it into place; whoever links second loads the winner's key
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        key.save(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return cls.load(path)
        finally:
            tmp.unlink(missing_ok=True)
        return key

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)

    def public_jwk(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.private_key.public_key()))
        jwk.update({"kid": self.kid, "alg": ALGORITHM, "use": "sig"})
        return jwk

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.public_jwk()]}


def _thumbprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint, so a key id never needs to be stored separately."""
    import base64
    import hashlib

    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public_key))
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()[:16]


def _normalise_scopes(scopes: str | Iterable[str]) -> list[str]:
    if isinstance(scopes, str):
        scopes = scopes.replace(",", " ").split()
    out = sorted({s.strip() for s in scopes if s.strip()})
    if not out:
        raise ValueError("a token needs at least one scope, e.g. stream.read")
    return out


class TokenIssuer:
    """Mints project access tokens. Only the hub (and the admin CLI) hold one."""

    def __init__(
        self,
        key: SigningKey,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        max_ttl: int = 3600,
    ) -> None:
        self.key = key
        self.issuer = issuer
        self.audience = audience
        self.max_ttl = max_ttl

    def issue(
        self,
        sub: str,
        project: str,
        scopes: str | Iterable[str],
        ttl: int = 900,
        audience: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed token; ``ttl`` above ``max_ttl`` is an error, not silently capped."""
        if not sub or not project:
            raise ValueError("a token needs a subject (user) and a project")
        if ttl <= 0 or ttl > self.max_ttl:
            raise ValueError(f"ttl {ttl}s is outside 1..{self.max_ttl}s allowed by this issuer")
        now = int(time.time())
        claims: dict[str, Any] = dict(extra or {})
        claims.update(
            {
                "wlcg.ver": "1.0",
                "iss": self.issuer,
                "sub": sub,
                "aud": audience or self.audience,
                "project": project,
                "scope": " ".join(_normalise_scopes(scopes)),
                "iat": now,
                "nbf": now,
                "exp": now + int(ttl),
                "jti": uuid.uuid4().hex,
            }
        )
        return jwt.encode(
            claims,
            self.key.private_key,
            algorithm=ALGORITHM,
            headers={"kid": self.key.kid, "typ": "at+jwt"},
        )

    def jwks(self) -> dict[str, Any]:
        return self.key.jwks()


def load_jwks(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A JWKS from a dict, a JSON file, or an http(s) URL (e.g. the hub's published JWKS)."""
    if isinstance(source, Mapping):
        return dict(source)
    text = str(source)
    if text.startswith(("http://", "https://")):
        from urllib.request import urlopen

        with urlopen(text, timeout=10) as resp:  # noqa: S310 - the URL is admin configuration
            return json.load(resp)
    return json.loads(Path(text).read_text())


class TokenVerifier:
    """Verifies tokens locally with public keys only; cannot mint.

    ``is_revoked(jti)`` is consulted on every verification; the hub's revocation list feeds it.
    """

    def __init__(
        self,
        jwks: Mapping[str, Any],
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
        leeway: int = 5,
        is_revoked: Callable[[str], bool] | None = None,
    ) -> None:
        self.keys = {k["kid"]: jwt.PyJWK(k) for k in jwks.get("keys", []) if "kid" in k}
        if not self.keys:
            raise ValueError("the JWKS has no keys with a 'kid'; publish the issuer's JWKS first")
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.is_revoked = is_revoked or (lambda jti: False)

    def verify(
        self, token: str | None, *, project: str | None = None, scope: str | None = None
    ) -> Claims:
        """Return the claims, or raise :class:`TokenError` saying what was wrong."""
        if not token:
            raise TokenError(401, "missing", "no token: send 'Authorization: Bearer <token>'")
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise TokenError(401, "malformed", "the token is not a JWT") from None
        key = self.keys.get(kid)
        if key is None:
            raise TokenError(401, "unknown_key", f"token signed by unknown key id {kid!r}")
        try:
            body = jwt.decode(
                token,
                key.key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iat", "nbf", "jti", "sub", "aud", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError(401, "expired", "the token has expired; get a fresh one") from None
        except jwt.ImmatureSignatureError:
            raise TokenError(401, "not_yet_valid", "the token is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise TokenError(
                401,
                "audience",
                f"the token is not for this service (aud must be {self.audience!r})",
            ) from None
        except jwt.InvalidIssuerError:
            raise TokenError(
                401, "issuer", f"the token was not issued by {self.issuer!r}"
            ) from None
        except jwt.InvalidSignatureError:
            raise TokenError(401, "signature", "the token's signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise TokenError(401, "invalid", f"the token is invalid: {exc}") from None
        if not isinstance(body.get("project"), str) or not isinstance(body.get("scope"), str):
            raise TokenError(401, "invalid", "the token lacks 'project' or 'scope' claims")
        claims = Claims(
            sub=body["sub"],
            project=body["project"],
            scopes=frozenset(body["scope"].split()),
            aud=body["aud"] if isinstance(body["aud"], str) else self.audience,
            iss=body["iss"],
            iat=int(body["iat"]),
            nbf=int(body["nbf"]),
            exp=int(body["exp"]),
            jti=body["jti"],
        )
        if self.is_revoked(claims.jti):
            raise TokenError(401, "revoked", f"token {claims.jti} has been revoked")
        if project is not None and claims.project != project:
            raise TokenError(
                403, "project", f"the token is for project {claims.project!r}, not {project!r}"
            )
        if scope is not None and scope not in claims.scopes:
            raise TokenError(403, "scope", f"the token lacks the {scope!r} scope")
        return claims


class RevocationCache:
    """Polls the hub's revocation list (``GET .../revoked``) so verifiers refuse revoked jtis.

    Pass ``cache.is_revoked`` to :class:`TokenVerifier`. A jti revoked at the hub is refused here
    within one ``interval`` (plus one request). If a poll fails, the last list is kept and the failure
    is logged; ``last_success`` tells how fresh the list is.
    """

    def __init__(self, url: str, interval: float = 5.0, timeout: float = 5.0) -> None:
        if interval <= 0:
            raise ValueError("the revocation poll interval must be > 0 seconds")
        self.url = url
        self.interval = interval
        self.timeout = timeout
        self.last_success: float | None = None
        self._revoked: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = logging.getLogger("beamhub.tokens.revocation")

    def poll_once(self) -> bool:
        """Fetch the list now; True on success."""
        from urllib.request import urlopen

        try:
            with urlopen(self.url, timeout=self.timeout) as resp:  # noqa: S310 - admin configuration
                body = json.load(resp)
            revoked = body["revoked"]
            if not isinstance(revoked, list) or not all(isinstance(j, str) for j in revoked):
                raise ValueError("'revoked' is not a list of jti strings")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._log.warning(
                "revocation list %s unavailable (%s); keeping the last one", self.url, exc
            )
            return False
        self._revoked = frozenset(revoked)
        self.last_success = time.time()
        return True

    def is_revoked(self, jti: str) -> bool:
        return jti in self._revoked

    def start(self) -> RevocationCache:
        """Poll once now, then every ``interval`` seconds on a daemon thread."""
        if self._thread is None:
            self.poll_once()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="revocation-poll", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll_once()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 1)
            self._thread = None

    def __enter__(self) -> RevocationCache:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
