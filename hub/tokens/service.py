"""The token service (a JupyterHub service): refresh, mint, introspect, revoke, revocation list, JWKS.

Mounted by the hub at ``/services/tokens/``. Servers refresh their delegated project token with
their own JupyterHub API token (the upstream refresh token stays in the hub's encrypted
auth_state); users mint tokens for external software within their role and the enclave's TTL cap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jwt
from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from tornado import httpserver, httputil, web

from beamhub.auth.tokens import (
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    SigningKey,
    TokenError,
    TokenIssuer,
    TokenVerifier,
)
from beamhub.hub.tokens.store import Delegator, TokenStore

__all__ = ["MAX_BODY", "ApiError", "MintHandler", "ServiceContext", "main", "make_app"]

log = logging.getLogger("beamhub.tokens.service")

#: Largest JSON or form body accepted; bigger bodies get 413 with this limit in the message.
MAX_BODY = 16 * 1024
#: Beyond this the connection is closed unread (the proxy then answers 502/503).
MAX_UPLOAD = 64 * 1024 * 1024


class ApiError(web.HTTPError):
    """An error a caller sees as JSON ``{"error": reason, "message": message}``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(status)
        self.error = reason
        self.message = message


@dataclass
class ServiceContext:
    delegator: Delegator
    store: TokenStore
    verifier: TokenVerifier
    revocation_poll: float


@web.stream_request_body
class BaseHandler(HubOAuthenticated, web.RequestHandler):
    """Bodies are streamed and only the first MAX_BODY bytes kept, so any size gets a clean 413."""

    def initialize(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self._chunks: list[bytes] = []
        self._size = 0

    def data_received(self, chunk: bytes) -> None:
        # Past the limit, count but keep nothing; the handler answers 413 once the body is in
        # (refusing mid-upload would close the connection, which the proxy reports as a 503).
        self._size += len(chunk)
        if self._size <= MAX_BODY:
            self._chunks.append(chunk)

    def _body(self) -> bytes:
        if self._size > MAX_BODY:
            raise ApiError(
                413, "too_large", f"the body is {self._size} bytes; the limit is {MAX_BODY}"
            )
        if self._chunks and not self.request.body:
            self.request.body = b"".join(self._chunks)
            httputil.parse_body_arguments(
                self.request.headers.get("Content-Type", ""),
                self.request.body,
                self.request.body_arguments,
                self.request.files,
                self.request.headers,
            )
            for name, values in self.request.body_arguments.items():
                self.request.arguments.setdefault(name, []).extend(values)
        return self.request.body or b""

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            body = {"error": exc.error, "message": exc.message}
        elif isinstance(exc, web.HTTPError):
            body = {"error": "http_error", "message": exc.log_message or self._reason}
        else:
            body = {"error": "internal", "message": "internal error; the service log has details"}
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def require_user(self) -> dict[str, Any]:
        model = self.get_current_user()
        if not model:
            raise ApiError(
                401,
                "unauthenticated",
                "send 'Authorization: token <JupyterHub API token>' (or log in to the hub)",
            )
        return model

    def is_admin(self, model: dict[str, Any]) -> bool:
        return bool(model.get("admin")) or self.ctx.store.is_admin(model["name"])

    def json_body(self, fields: dict[str, tuple[type, ...]], required: set[str]) -> dict[str, Any]:
        """Parse a JSON object body; 4xx naming the field for anything unexpected."""
        body = self._body()
        if len(body) > MAX_BODY:
            raise ApiError(
                413, "too_large", f"the body is {len(body)} bytes; the limit is {MAX_BODY}"
            )
        ctype = self.request.headers.get("Content-Type", "application/json").split(";")[0].strip()
        if ctype == "application/x-www-form-urlencoded":
            data: Any = {k: self.get_body_argument(k) for k in self.request.body_arguments}
            data.pop("_xsrf", None)
            if "scopes" in data:
                data["scopes"] = self.get_body_arguments("scopes")
            if "ttl" in data:
                try:
                    data["ttl"] = int(data["ttl"])
                except ValueError:
                    raise ApiError(400, "bad_field", "ttl: a whole number of seconds") from None
        else:
            try:
                data = json.loads(body or b"{}")
            except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep
                raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ApiError(400, "malformed_json", "the body must be a JSON object")
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ApiError(
                400,
                "unknown_field",
                f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}",
            )
        missing = sorted(required - set(data))
        if missing:
            raise ApiError(400, "missing_field", f"{', '.join(missing)}: required")
        for name, value in data.items():
            types = fields[name]
            if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                want = " or ".join(t.__name__ for t in types)
                raise ApiError(400, "bad_field", f"{name}: expected {want}, got {value!r}"[:200])
        return data


class JwksHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Cache-Control", "max-age=60")
        self.finish(self.ctx.delegator.issuer.jwks())


class RevokedHandler(BaseHandler):
    """Public list of revoked, unexpired jtis: verifiers poll it (jtis are not secrets)."""

    def get(self) -> None:
        self.finish(
            {"revoked": self.ctx.store.revoked_jtis(), "poll_interval": self.ctx.revocation_poll}
        )


class IntrospectHandler(BaseHandler):
    """RFC 7662-like: ``{"token": ...}`` -> ``{"active": bool, ...claims}``; any hub identity."""

    def post(self) -> None:
        self.require_user()
        data = self.json_body({"token": (str,)}, {"token"})
        try:
            claims = self.ctx.verifier.verify(data["token"])
        except TokenError as exc:
            self.finish({"active": False, "reason": exc.reason})
            return
        record = self.ctx.store.get(claims.jti)
        self.finish(
            {
                "active": True,
                "sub": claims.sub,
                "project": claims.project,
                "scope": " ".join(sorted(claims.scopes)),
                "aud": claims.aud,
                "iss": claims.iss,
                "iat": claims.iat,
                "nbf": claims.nbf,
                "exp": claims.exp,
                "jti": claims.jti,
                "token_type": "at+jwt",
                "kind": record.kind if record else "unknown",
            }
        )


class RevokeHandler(BaseHandler):
    """``{"jti": ...}``: the token's owner or an admin revokes it."""

    def post(self) -> None:
        user = self.require_user()
        data = self.json_body({"jti": (str,)}, {"jti"})
        record = self.ctx.store.get(data["jti"][:128])
        if record is None:
            raise ApiError(
                404, "unknown_jti", f"no token with jti {data['jti'][:64]!r} was issued here"
            )
        if record.sub != user["name"] and not self.is_admin(user):
            raise ApiError(403, "not_owner", "only the token's owner or an admin may revoke it")
        changed = self.ctx.store.revoke(record.jti, by=user["name"])
        log.info("revoked jti=%s by=%s (already=%s)", record.jti, user["name"], not changed)
        self.finish({"revoked": record.jti, "already_revoked": not changed})


class RefreshHandler(BaseHandler):
    """A server trades its current (or expired) delegated token for a fresh one."""

    def post(self) -> None:
        user = self.require_user()
        data = self.json_body({"token": (str,)}, {"token"})
        key = self.ctx.verifier
        try:
            kid = jwt.get_unverified_header(data["token"]).get("kid")
            body = jwt.decode(
                data["token"],
                key.keys[kid].key,
                algorithms=["ES256"],
                audience=key.audience,
                issuer=key.issuer,
                options={"verify_exp": False},
            )
        except (jwt.PyJWTError, KeyError) as exc:
            raise ApiError(401, "invalid_token", "the token is not one this hub issued") from exc
        record = self.ctx.store.get(body.get("jti", ""))
        if record is None or record.kind != "server":
            raise ApiError(400, "not_delegated", "only a server's delegated token can be refreshed")
        if record.sub != user["name"]:
            raise ApiError(403, "not_owner", "the token belongs to another user")
        if record.revoked_at is not None:
            raise ApiError(401, "revoked", f"token {record.jti} was revoked; restart the server")
        try:
            # the scopes the user's role still allows (roles are re-read at each hub login/refresh)
            allowed = set(self.ctx.delegator.allowed_scopes(record.sub, record.project))
            scopes = [s for s in record.scope.split() if s in allowed] or record.scope.split()
            token, claims = self.ctx.delegator.issue(
                record.sub,
                record.project,
                scopes,
                kind="server",
                server=record.server,
                parent=record.jti,
            )
        except ValueError as exc:  # the user's role changed since
            raise ApiError(403, "not_allowed", str(exc)) from exc
        log.info("refreshed jti=%s -> jti=%s user=%s", record.jti, claims["jti"], record.sub)
        self.finish({"token": token, "jti": claims["jti"], "exp": claims["exp"]})


class MintHandler(BaseHandler):
    """``POST api/tokens`` mints a token for external software; ``GET`` lists the caller's."""

    FIELDS = {"project": (str,), "scopes": (list, str), "ttl": (int,), "description": (str,)}

    def get(self) -> None:
        user = self.require_user()
        self.finish({"tokens": [t.to_json() for t in self.ctx.store.list_for(user["name"])]})

    def mint(self) -> tuple[str, dict[str, Any]]:
        user = self.require_user()
        data = self.json_body(self.FIELDS, {"project"})
        scopes = data.get("scopes")
        if isinstance(scopes, str):
            scopes = scopes.split()
        if scopes is not None and not all(isinstance(s, str) for s in scopes):
            raise ApiError(400, "bad_field", "scopes: a list of scope names")
        try:
            return self.ctx.delegator.issue(
                user["name"],
                data["project"],
                scopes,
                ttl=data.get("ttl"),
                kind="user",
                description=data.get("description", "")[:200],
            )
        except ValueError as exc:
            raise ApiError(403 if "role" in str(exc) else 400, "not_allowed", str(exc)) from exc

    def post(self) -> None:
        token, claims = self.mint()
        log.info(
            "minted jti=%s user=%s project=%s", claims["jti"], claims["sub"], claims["project"]
        )
        self.set_status(201)
        self.finish(
            {
                "token": token,
                "jti": claims["jti"],
                "exp": claims["exp"],
                "project": claims["project"],
                "scope": claims["scope"],
            }
        )


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        raise ApiError(
            404, "not_found", f"no endpoint {self.request.path}; see {self.settings['prefix']}"
        )


def _log_request(handler: web.RequestHandler) -> None:
    """Access log without query strings; verifiers' polls of /revoked and JWKS only at debug."""
    status = handler.get_status()
    quiet = status < 400 and handler.request.method == "GET"
    level = logging.DEBUG if quiet else logging.INFO if status < 500 else logging.ERROR
    ms = 1000.0 * handler.request.request_time()
    log.log(level, "%d %s %s %.1fms", status, handler.request.method, handler.request.path, ms)


def make_app(ctx: ServiceContext, prefix: str = "/services/tokens/") -> web.Application:
    p = prefix if prefix.endswith("/") else prefix + "/"
    from beamhub.hub.tokens.page import PageHandler

    routes = [
        (p, PageHandler),
        (p + "api/tokens", MintHandler),
        (p + "api/refresh", RefreshHandler),
        (p + "introspect", IntrospectHandler),
        (p + "revoke", RevokeHandler),
        (p + "revoked", RevokedHandler),
        (p + "jwks.json", JwksHandler),
        (p + ".well-known/jwks.json", JwksHandler),
    ]
    handlers: list[Any] = [(r, h, {"ctx": ctx}) for r, h in routes]
    handlers.append((p + "oauth_callback", HubOAuthCallbackHandler))
    return web.Application(
        handlers,
        default_handler_class=NotFoundHandler,
        default_handler_args={"ctx": ctx},
        prefix=p,
        cookie_secret=os.urandom(32),
        log_function=_log_request,
        xsrf_cookies=False,  # JupyterHub's HubOAuth checks _xsrf itself for cookie-authenticated POSTs
    )


def build_context(
    state_dir: Path, issuer_name: str, audience: str, max_ttl: int, ttl: int, poll: float
) -> ServiceContext:
    key = SigningKey.load_or_create(state_dir / "signing-key.pem")
    issuer = TokenIssuer(key, issuer=issuer_name, audience=audience, max_ttl=max_ttl)
    store = TokenStore(state_dir / "tokens.sqlite")
    verifier = TokenVerifier(
        issuer.jwks(),
        issuer=issuer_name,
        audience=audience,
        is_revoked=lambda jti: jti in set(store.revoked_jtis()),
    )
    return ServiceContext(Delegator(issuer, store, ttl), store, verifier, poll)


def main(argv: list[str] | None = None) -> int:
    """Run as a hub-managed service: listens on $JUPYTERHUB_SERVICE_URL."""
    parser = argparse.ArgumentParser(prog="python -m beamhub.hub.tokens.service")
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--issuer", default=DEFAULT_ISSUER)
    parser.add_argument("--audience", default=DEFAULT_AUDIENCE)
    parser.add_argument("--max-ttl", type=int, default=3600)
    parser.add_argument("--ttl", type=int, default=900)
    parser.add_argument("--revocation-poll", type=float, default=5.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s tokens %(levelname)s %(message)s")
    ctx = build_context(
        args.state_dir, args.issuer, args.audience, args.max_ttl, args.ttl, args.revocation_poll
    )
    url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:0"))
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/tokens/")

    async def run() -> None:
        server = httpserver.HTTPServer(make_app(ctx, prefix), max_body_size=MAX_UPLOAD)
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
