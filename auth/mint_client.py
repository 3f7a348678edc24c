"""MintForClient: ask the token service for a project token for a named subject ("mint for").

Only the token service holds the signing key. A process that needs project tokens for someone
else — the hub for each spawned server, the shared dashboard for its monitor subscriptions,
`beamhub up`'s simulated detector — authenticates to the token service with its own JupyterHub
API token, whose role holds the ``custom:beamhub:tokens:mint-for`` scope (possibly narrowed to one
subject with ``!user=<subject>``). The token service bounds every token by the subject's project
role, the enclave's maximum lifetime and the kind (``server`` or ``service``), and records it.
"""

from __future__ import annotations

from typing import Any

import jwt

from beamhub.auth.service_call import ServiceError, post_json

__all__ = ["MintError", "MintForClient"]

#: Kinds of token a caller may mint for someone else (``user`` tokens are minted by their owner).
MINT_FOR_KINDS = ("server", "service")


class MintError(RuntimeError):
    """The token service refused (``status`` 4xx, ``reason`` its code) or was unreachable (0)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


class MintForClient:
    """``mint(sub, project, scopes, kind)`` -> ``(token, claims)`` through ``POST api/mint-for``.

    ``service_url`` is the token service's base URL (``.../services/tokens/``), ``api_token`` the
    caller's own JupyterHub API token. Blocking (urllib): call it from a thread in event loops.
    """

    def __init__(self, service_url: str, api_token: str, *, timeout: float = 10.0) -> None:
        if not service_url:
            raise ValueError("MintForClient needs the token service's URL (.../services/tokens/)")
        if not api_token:
            raise ValueError(
                "MintForClient needs a JupyterHub API token whose role holds the "
                "custom:beamhub:tokens:mint-for scope"
            )
        self.url = service_url.rstrip("/") + "/api/mint-for"
        self.users_url = service_url.rstrip("/") + "/api/users"
        self._api_token = api_token
        self.timeout = timeout

    def __repr__(self) -> str:  # never the API token
        return f"MintForClient({self.url!r})"

    def mint(
        self,
        sub: str,
        project: str,
        scopes: list[str] | None = None,
        *,
        kind: str = "service",
        ttl: int | None = None,
        server: str = "",
        description: str = "",
    ) -> tuple[str, dict[str, Any]]:
        """A signed token for ``sub`` in ``project`` and its (unverified) claims."""
        body: dict[str, Any] = {"sub": sub, "project": project, "kind": kind}
        if scopes is not None:
            body["scopes"] = list(scopes)
        if ttl is not None:
            body["ttl"] = ttl
        if server:
            body["server"] = server
        if description:
            body["description"] = description
        answer = self._post(self.url, body)
        token = answer.get("token") if isinstance(answer, dict) else None
        if not isinstance(token, str):
            raise MintError(0, "bad_answer", f"the token service at {self.url} sent no token")
        # our own new token: the claims are read to schedule renewal, verifiers check the signature
        return token, jwt.decode(token, options={"verify_signature": False})

    def record_user(self, name: str, projects: dict[str, str], *, admin: bool, mfa: bool) -> None:
        """Record ``name``'s project roles as of her login (the hub's identity only)."""
        body = {"name": name, "projects": projects, "admin": admin, "mfa": mfa}
        self._post(self.users_url, body)

    def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return post_json(url, self._api_token, body, self.timeout)
        except ServiceError as exc:
            if exc.status == 0:
                raise MintError(
                    0, exc.reason, f"cannot reach the token service at {url}: {exc}"
                ) from exc
            raise MintError(
                exc.status,
                exc.reason,
                f"the token service refused ({exc.status} {exc.reason}): {exc.message}",
            ) from None
