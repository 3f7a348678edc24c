"""The token service (a JupyterHub service): refresh, mint, mint-for, introspect, revoke, JWKS,
and the signed checkpoints of the gateway's audit chain (:mod:`beamhub.hub.tokens.checkpoints`).

Mounted by the hub at ``/services/tokens/``. It is the only process that opens the signing key
(``$STATE/tokens/signing-key.pem``, created here the first time; under `beamhub up` as root the
folder belongs to the token service's own account, ``beamhub-tokens``). The hub records each
user's project roles here at login (``POST api/users``) rather than writing the register itself. Servers refresh their delegated project
token with their own JupyterHub API token (the upstream refresh token stays in the hub's
encrypted auth_state); users mint tokens for external software within their role and the
enclave's TTL cap; the hub, the dashboard and `beamhub up`'s detector ask for tokens of the
subjects they act for with the ``custom:beamhub:tokens:mint-for`` scope. Handlers live in
:mod:`beamhub.hub.tokens.handlers`, the token page in :mod:`beamhub.hub.tokens.page`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tornado import httpserver, web

from beamhub.auth.api import log_request
from beamhub.auth.home import token_dir
from beamhub.auth.metrics import METRICS_ACCESS, HealthzHandler, MetricsHandler
from beamhub.auth.roles import ROLES
from beamhub.auth.tokens import (
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    SigningKey,
    TokenIssuer,
    TokenVerifier,
)
from beamhub.hub.tokens.checkpoints import CheckpointsHandler
from beamhub.hub.tokens.handlers import (
    MAX_UPLOAD,
    REFRESH_GRACE,
    IntrospectHandler,
    JwksHandler,
    MintForHandler,
    MintHandler,
    NotFoundHandler,
    OAuthCallbackHandler,
    RefreshHandler,
    RevokedHandler,
    RevokeHandler,
    ServiceContext,
    UsersHandler,
)
from beamhub.hub.tokens.page import PageHandler
from beamhub.hub.tokens.store import ANY_PROJECT, Delegator, TokenStore

__all__ = ["MAX_UPLOAD", "build_context", "main", "make_app", "parse_service_subjects"]

log = logging.getLogger("beamhub.tokens.service")


def _log_request(handler: web.RequestHandler) -> None:
    """Access log without query strings; verifiers' polls of /revoked and JWKS only at debug."""
    if handler.get_status() < 400 and handler.request.method == "GET":
        if log.isEnabledFor(logging.DEBUG):
            log_request(handler, log)
        return
    log_request(handler, log)


def make_app(
    ctx: ServiceContext, prefix: str = "/services/tokens/", metrics: str = "local-or-token"
) -> web.Application:
    """The service's routes; ``metrics``: who may read ``metrics`` (:mod:`beamhub.auth.metrics`)."""
    p = prefix if prefix.endswith("/") else prefix + "/"
    routes = [
        (p, PageHandler),
        (p + "api/tokens", MintHandler),
        (p + "api/mint-for", MintForHandler),
        (p + "api/refresh", RefreshHandler),
        (p + "api/users", UsersHandler),
        (p + "introspect", IntrospectHandler),
        (p + "revoke", RevokeHandler),
        (p + "revoked", RevokedHandler),
        (p + "audit/checkpoints", CheckpointsHandler),
        (p + "jwks.json", JwksHandler),
        (p + ".well-known/jwks.json", JwksHandler),
    ]
    handlers: list[Any] = [(r, h, {"ctx": ctx}) for r, h in routes]
    handlers.append((p + "oauth_callback", OAuthCallbackHandler))
    handlers.append((p + "healthz", HealthzHandler, {"service": "the token service"}))
    handlers.append(
        (
            p + "metrics",
            MetricsHandler,
            {
                "service": "the token service",
                "access": metrics,
                "verifier": ctx.verifier,
                "render": lambda: _render_metrics(ctx),
            },
        )
    )
    return web.Application(
        handlers,
        default_handler_class=NotFoundHandler,
        default_handler_args={"ctx": ctx},
        prefix=p,
        cookie_secret=os.urandom(32),
        log_function=_log_request,
        xsrf_cookies=False,  # JupyterHub's HubOAuth checks _xsrf itself for cookie-authenticated POSTs
    )


def _render_metrics(ctx: ServiceContext) -> bytes:
    from prometheus_client import generate_latest

    ctx.metrics.signing_keys.set(len(ctx.delegator.issuer.jwks().get("keys", [])))
    return generate_latest(ctx.metrics.registry)


def parse_service_subjects(text: str) -> dict[str, dict[str, str]]:
    """``{"subject": {"project" or "*": "role"}}`` from JSON; ValueError naming what is wrong."""
    try:
        data = json.loads(text or "{}")
    except ValueError as exc:
        raise ValueError(f"--service-subjects: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError('--service-subjects: expected {"subject": {"project": "role"}}')
    for subject, projects in data.items():
        if not isinstance(projects, dict) or not projects:
            raise ValueError(f"--service-subjects: {subject}: expected {{project: role}}")
        for project, role in projects.items():
            if role not in ROLES:
                raise ValueError(
                    f"--service-subjects: {subject}: {project}: role {role!r} is not one of "
                    f"{', '.join(ROLES)} ({ANY_PROJECT!r} as project means every known project)"
                )
    return data


def build_context(
    state_dir: Path,
    issuer_name: str,
    audience: str,
    max_ttl: int,
    ttl: int,
    poll: float,
    service_subjects: dict[str, dict[str, str]] | None = None,
    refresh_grace: int = REFRESH_GRACE,
) -> ServiceContext:
    """Load (or create, the first time) the signing key and record the service subjects' roles."""
    folder = token_dir(state_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = SigningKey.load_or_create(folder / "signing-key.pem")
    issuer = TokenIssuer(key, issuer=issuer_name, audience=audience, max_ttl=max_ttl)
    store = TokenStore(folder / "tokens.sqlite")
    for subject, projects in (service_subjects or {}).items():
        store.record_user(subject, projects, admin=False, mfa=True)
    verifier = TokenVerifier(
        issuer.jwks(),
        issuer=issuer_name,
        audience=audience,
        is_revoked=lambda jti: jti in set(store.revoked_jtis()),
    )
    return ServiceContext(Delegator(issuer, store, ttl), store, verifier, poll, refresh_grace)


def main(argv: list[str] | None = None) -> int:
    """Run as a hub-managed service: listens on $JUPYTERHUB_SERVICE_URL."""
    parser = argparse.ArgumentParser(prog="python -m beamhub.hub.tokens.service")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--issuer", default=DEFAULT_ISSUER)
    parser.add_argument("--audience", default=DEFAULT_AUDIENCE)
    parser.add_argument("--max-ttl", type=int, default=3600)
    parser.add_argument("--ttl", type=int, default=900)
    parser.add_argument("--revocation-poll", type=float, default=5.0)
    parser.add_argument(
        "--refresh-grace",
        type=int,
        default=REFRESH_GRACE,
        help="seconds after its expiry a delegated token may still be refreshed, only by the "
        f"server it was delegated to (default {REFRESH_GRACE})",
    )
    parser.add_argument(
        "--service-subjects",
        default="{}",
        help='token subjects of services and their project roles, JSON: {"beamhub-dashboard": '
        '{"*": "viewer"}, "beamhub-detector": {"p-1001": "operator"}} ("*": every known project)',
    )
    parser.add_argument(
        "--metrics",
        choices=METRICS_ACCESS,
        default="local-or-token",
        help="who may read metrics: a client on this host or a token with the 'metrics' "
        "scope (default), only such a token, or anyone",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s tokens %(levelname)s %(message)s")
    try:
        subjects = parse_service_subjects(args.service_subjects)
    except ValueError as exc:
        parser.error(str(exc))
    ctx = build_context(
        args.state_dir,
        args.issuer,
        args.audience,
        args.max_ttl,
        args.ttl,
        args.revocation_poll,
        subjects,
        args.refresh_grace,
    )
    url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:0"))
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/tokens/")

    async def run() -> None:
        server = httpserver.HTTPServer(
            make_app(ctx, prefix, args.metrics), max_body_size=MAX_UPLOAD
        )
        server.listen(url.port or 0, url.hostname or "127.0.0.1")
        log.info("token service listening on %s%s", url.geturl().rstrip("/"), prefix)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.stop()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
