"""The token service's Prometheus metrics: tokens issued, refreshed, revoked, and refusals.

Counted where a request ends (``BaseHandler.on_finish``), so every handler is counted the same
way: a success of a minting endpoint is one token issued (labelled by kind: ``user``, ``server``,
``service``), a refresh one refreshed, a revocation the tokens it revoked (a server token's whole
family); any 4xx is a refusal labelled by endpoint and the error's ``reason`` (``no_role``,
``beyond_role``, ``reused``, ``unauthenticated``, ...), the same code the caller read.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["TokenMetrics"]


class TokenMetrics:
    """One registry per service context (tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.issued = Counter(
            "beamhub_tokens_issued",
            "project tokens minted, by kind (user, server, service)",
            ["kind"],
            registry=self.registry,
        )
        self.refreshed = Counter(
            "beamhub_tokens_refreshed",
            "delegated tokens refreshed (each supersedes its parent)",
            registry=self.registry,
        )
        self.revoked = Counter(
            "beamhub_tokens_revoked",
            "tokens revoked through the API, families included",
            registry=self.registry,
        )
        self.refused = Counter(
            "beamhub_tokens_refused",
            "requests refused (4xx), by endpoint and the error's reason code",
            ["endpoint", "reason"],
            registry=self.registry,
        )
        self.signing_keys = Gauge(
            "beamhub_tokens_signing_keys",
            "keys in the published JWKS",
            registry=self.registry,
        )
