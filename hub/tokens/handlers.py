"""The token service's JSON API handlers: refresh, mint, mint-for, introspect, revoke, JWKS.

Every handler is a :class:`~beamhub.auth.api.JsonApiHandler` (errors as ``{reason, message,
field?}``, bodies bounded before reading) identified by the hub (JupyterHub's
``HubOAuthenticated``: an ``Authorization: token ...`` header, or the hub login cookie with
``_xsrf`` for form posts). The app that mounts them is in :mod:`beamhub.hub.tokens.service`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from tornado import httputil

from beamhub.auth.api import ApiError, JsonApiHandler
from beamhub.auth.roles import FACILITY_SCOPES, ROLES
from beamhub.auth.tokens import TokenError, TokenVerifier
from beamhub.hub.tokens.metrics import TokenMetrics
from beamhub.hub.tokens.store import Delegator, IssuedToken, MintRefused, TokenStore

__all__ = [
    "AUDIT_CHECKPOINT_SCOPE",
    "CUSTOM_SCOPES",
    "MAX_BODY",
    "MAX_UPLOAD",
    "MINT_FOR_SCOPE",
    "REFRESH_GRACE",
    "BaseHandler",
    "IntrospectHandler",
    "JwksHandler",
    "MintForHandler",
    "MintHandler",
    "NotFoundHandler",
    "OAuthCallbackHandler",
    "RefreshHandler",
    "RevokeHandler",
    "RevokedHandler",
    "ServiceContext",
    "UsersHandler",
]

log = logging.getLogger("beamhub.tokens.service")

#: Largest JSON or form body accepted; bigger bodies get a 413 naming this limit.
MAX_BODY = 16 * 1024
#: tornado's own cap (max_body_size); bodies over MAX_BODY are already refused from their
#: Content-Length by the API base, which then lingers so the proxy relays the JSON 413.
MAX_UPLOAD = 64 * 1024 * 1024

#: JupyterHub custom scope: mint a project token for the subject a request names. A filter narrows
#: it to one subject, e.g. ``custom:beamhub:tokens:mint-for!user=beamhub-dashboard``.
MINT_FOR_SCOPE = "custom:beamhub:tokens:mint-for"
#: JupyterHub custom scope of the gateway's role: post the audit chain's head to be signed
#: (:mod:`beamhub.hub.tokens.checkpoints`).
AUDIT_CHECKPOINT_SCOPE = "custom:beamhub:tokens:audit-checkpoint"
#: JupyterHub custom scope of the hub process: record a user's project roles at login
#: (:class:`UsersHandler`), so that only the token service writes its register.
USERS_SCOPE = "custom:beamhub:tokens:users"
#: For ``c.JupyterHub.custom_scopes``.
CUSTOM_SCOPES = {
    USERS_SCOPE: {
        "description": "Record a user's project roles, admin flag and second factor as the "
        "identity provider reported them at login; tokens are bounded by them.",
    },
    MINT_FOR_SCOPE: {
        "description": "Ask the token service for a project token for the subject the request "
        "names, within that subject's project role and the enclave's lifetime cap.",
    },
    AUDIT_CHECKPOINT_SCOPE: {
        "description": "Post the head of an audit log's hash chain (record count and hash) to "
        "the token service, which signs it and keeps it outside the log.",
    },
}

#: Token kinds by who asks: a user mints ``user`` tokens for herself; mint-for callers mint these.
MINT_FOR_KINDS = ("server", "service")

#: How long after its expiry a delegated token may still be refreshed, and only by its server.
REFRESH_GRACE = 60

_STATUS = {"no_role": 403, "beyond_role": 403, "admin_only": 403, "bad_field": 400}


@dataclass
class ServiceContext:
    delegator: Delegator
    store: TokenStore
    verifier: TokenVerifier
    revocation_poll: float
    refresh_grace: int = REFRESH_GRACE
    metrics: TokenMetrics = field(default_factory=TokenMetrics)


def server_of(model: dict[str, Any]) -> str | None:
    """The server's name if ``model`` (the hub's answer for the caller) is a server's own API
    token, else None. JupyterHub gives a server's token ``access:servers!server=<user>/<name>``
    (c.Spawner.server_token_scopes); a user's own tokens carry ``!user=`` instead."""
    scopes = set(model.get("scopes") or ())
    prefix = f"access:servers!server={model.get('name')}/"
    names = {s[len(prefix) :] for s in scopes if s.startswith(prefix)}
    if len(names) != 1 or f"access:servers!user={model.get('name')}" in scopes:
        return None
    return names.pop()


class BaseHandler(HubOAuthenticated, JsonApiHandler):
    """Hub identity + the one JSON API base; form bodies (the token page) parsed before auth."""

    max_body = MAX_BODY
    service = "the token service"
    #: what a success of this handler counts (:mod:`beamhub.hub.tokens.metrics`)
    metric_event = ""
    #: how many tokens it issued/revoked, and their kind (set by the handler)
    metric_count = 1
    metric_kind = "user"

    def initialize(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self._fields: dict[str, Any] | None = None
        self._refusal = ""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        self._refusal = exc.reason if isinstance(exc, ApiError) else "http"
        super().write_error(status_code, **kwargs)

    def on_finish(self) -> None:
        status, metrics = self.get_status(), self.ctx.metrics
        if 400 <= status < 500:
            endpoint = type(self).__name__.removesuffix("Handler").lower() or "unknown"
            metrics.refused.labels(endpoint, self._refusal or "http").inc()
        elif status < 300 and self.request.method == "POST" and self.metric_event:
            if self.metric_event == "issued":
                metrics.issued.labels(self.metric_kind).inc(self.metric_count)
            elif self.metric_event == "refreshed":
                metrics.refreshed.inc(self.metric_count)
            elif self.metric_event == "revoked":
                metrics.revoked.inc(self.metric_count)
        super().on_finish()

    def get_login_url(self) -> str:
        raise ApiError(
            401,
            "unauthenticated",
            "send 'Authorization: token <JupyterHub API token>' (or log in to the hub)",
        )

    def _form(self) -> bool:
        """Parse a form body into the request's arguments (JupyterHub's XSRF check reads _xsrf
        there; the streamed body never reached tornado's own parser). True for a form body."""
        ctype = self.request.headers.get("Content-Type", "application/json")
        if ctype.split(";")[0].strip() != "application/x-www-form-urlencoded":
            return False
        if not self.request.body_arguments:
            self.request.body = self.raw_body()
            httputil.parse_body_arguments(
                ctype,
                self.request.body,
                self.request.body_arguments,
                self.request.files,
                self.request.headers,
            )
            for name, values in self.request.body_arguments.items():
                self.request.arguments.setdefault(name, []).extend(values)
        return True

    def require_user(self) -> dict[str, Any]:
        """The caller's hub model (user or service), or a 401 that says how to authenticate."""
        self._form()  # before the cookie check, which looks for the form's _xsrf
        model = self.get_current_user()
        if not model:
            raise ApiError(
                401,
                "unauthenticated",
                "send 'Authorization: token <JupyterHub API token>' (or log in to the hub and "
                "post the form from its page, which carries _xsrf)",
            )
        return model

    def is_admin(self, model: dict[str, Any]) -> bool:
        return bool(model.get("admin")) or self.ctx.store.is_admin(model["name"])

    def signed_claims(self, token: str) -> dict[str, Any] | None:
        """The claims of a token this service signed (for us, any expiry), or None."""
        verifier = self.ctx.verifier
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            return jwt.decode(
                token,
                verifier.keys[kid].key,
                algorithms=["ES256"],
                audience=verifier.audience,
                issuer=verifier.issuer,
                options={"verify_exp": False},
            )
        except (jwt.PyJWTError, KeyError):
            return None

    def fields(self, spec: dict[str, tuple[type, ...]], required: set[str]) -> dict[str, Any]:
        """The body (JSON object or form) checked against ``spec``; a 400 naming the field."""
        if self._form():
            data: dict[str, Any] = {
                k: self.get_body_argument(k) for k in self.request.body_arguments
            }
            data.pop("_xsrf", None)
            if "scopes" in data:
                data["scopes"] = self.get_body_arguments("scopes")
            if "ttl" in data:
                try:
                    data["ttl"] = int(data["ttl"])
                except ValueError:
                    raise ApiError(
                        400, "bad_field", "ttl: a whole number of seconds", field="ttl"
                    ) from None
        else:
            data = self.json_body()
        unknown = sorted(set(data) - set(spec))
        if unknown:
            raise ApiError(
                400,
                "unknown_field",
                f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(spec))}",
                field=unknown[0],
            )
        missing = sorted(required - set(data))
        if missing:
            raise ApiError(
                400, "missing_field", f"{', '.join(missing)}: required", field=missing[0]
            )
        for name, value in data.items():
            types = spec[name]
            if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                want = " or ".join(t.__name__ for t in types)
                raise ApiError(
                    400, "bad_field", f"{name}: expected {want}, got {value!r}"[:200], field=name
                )
        return data

    @staticmethod
    def scope_list(data: dict[str, Any]) -> list[str] | None:
        scopes = data.get("scopes")
        if isinstance(scopes, str):
            scopes = scopes.split()
        if scopes is not None and not all(isinstance(s, str) for s in scopes):
            raise ApiError(400, "bad_field", "scopes: a list of scope names", field="scopes")
        return scopes

    def issue(
        self, sub: str, project: str, scopes: list[str] | None, **kw: Any
    ) -> tuple[str, dict]:
        """:meth:`Delegator.issue`, its refusals translated into API errors."""
        try:
            return self.ctx.delegator.issue(sub, project, scopes, **kw)
        except MintRefused as exc:
            status = _STATUS.get(exc.reason, 400)
            raise ApiError(status, exc.reason, exc.message, field=exc.field) from None


class JwksHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Cache-Control", "max-age=60")
        self.write_json(self.ctx.delegator.issuer.jwks())


class RevokedHandler(BaseHandler):
    """Public list of revoked, unexpired jtis: verifiers poll it (jtis are not secrets)."""

    def get(self) -> None:
        self.write_json(
            {"revoked": self.ctx.store.revoked_jtis(), "poll_interval": self.ctx.revocation_poll}
        )


class IntrospectHandler(BaseHandler):
    """RFC 7662-like: ``{"token": ...}`` -> ``{"active": bool, ...claims}``, for the token's
    owner, a hub service or an admin; anyone else learns nothing about a token signed here."""

    def post(self) -> None:
        caller = self.require_user()
        data = self.fields({"token": (str,)}, {"token"})
        signed = self.signed_claims(data["token"])
        if signed is not None and not self._may_see(caller, str(signed.get("sub"))):
            raise ApiError(
                403,
                "not_owner",
                "only the token's owner, a hub service or an admin may introspect it",
                field="token",
            )
        try:
            claims = self.ctx.verifier.verify(data["token"])
        except TokenError as exc:
            self.write_json({"active": False, "reason": exc.reason})
            return
        record = self.ctx.store.get(claims.jti)
        self.write_json(
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

    def _may_see(self, caller: dict[str, Any], sub: str) -> bool:
        return caller["name"] == sub or caller.get("kind") == "service" or self.is_admin(caller)


class RevokeHandler(BaseHandler):
    """``{"jti": ...}``: the token's owner or an admin revokes it. A server's delegated token is
    revoked with its whole family (every refresh of that delegation, before and after it), so no
    earlier or later link keeps working; ``family_revoked`` counts the others revoked now."""

    metric_event = "revoked"

    def post(self) -> None:
        user = self.require_user()
        data = self.fields({"jti": (str,)}, {"jti"})
        record = self.ctx.store.get(data["jti"][:128])
        if record is None:
            raise ApiError(
                404,
                "unknown_jti",
                f"no token with jti {data['jti'][:64]!r} was issued here",
                field="jti",
            )
        if record.sub != user["name"] and not self.is_admin(user):
            raise ApiError(403, "not_owner", "only the token's owner or an admin may revoke it")
        changed = self.ctx.store.revoke(record.jti, by=user["name"])
        others: list[str] = []
        if record.kind == "server":
            others = self.ctx.store.revoke_family(
                record.family_id,
                by=user["name"],
                event="revoke",
                jti=record.jti,
                detail=f"revoked by {user['name']}",
            )
        log.info(
            "revoked jti=%s family=%s by=%s (already=%s, %d more of its family)",
            record.jti,
            record.family_id,
            user["name"],
            not changed,
            len(others),
        )
        self.metric_count = int(changed) + len(others)
        self.write_json(
            {"revoked": record.jti, "already_revoked": not changed, "family_revoked": len(others)}
        )


class RefreshHandler(BaseHandler):
    """A server trades its delegated token for a fresh one, with rotation (OAuth 2.1 style).

    Each token is refreshed at most once: its child supersedes it. Refreshing a superseded or
    revoked token means two holders (one of them not the server): the whole family is revoked,
    recorded in ``token_events`` and logged at WARNING. An expired token is refreshed only
    within ``refresh_grace`` seconds of its expiry, and only by the server it was delegated to
    (that server's own JupyterHub API token).
    """

    metric_event = "refreshed"

    def post(self) -> None:
        caller = self.require_user()
        data = self.fields({"token": (str,)}, {"token"})
        body = self.signed_claims(data["token"])
        if body is None:
            raise ApiError(
                401, "invalid_token", "the token is not one this hub issued", field="token"
            )
        store = self.ctx.store
        record = store.get(str(body.get("jti", "")))
        if record is None or record.kind != "server":
            raise ApiError(400, "not_delegated", "only a server's delegated token can be refreshed")
        if record.sub != caller["name"]:
            raise ApiError(403, "not_owner", "the token belongs to another user")
        server = server_of(caller)
        if server is not None and server != record.server:
            raise ApiError(
                403,
                "not_holder",
                f"the token was delegated to server {record.server!r}, not to {server!r}",
            )
        if record.revoked_at is not None or record.superseded_by is not None:
            self._reused(record, caller)
        late = time.time() - record.exp
        grace = self.ctx.refresh_grace
        if late > grace:
            raise ApiError(
                401,
                "expired",
                f"token {record.jti} expired {late:.0f} s ago, beyond the refresh grace of "
                f"{grace} s; restart the server for a fresh token",
            )
        if late > 0 and server is None:
            raise ApiError(
                403,
                "not_holder",
                f"token {record.jti} has expired: within {grace} s of its expiry only the server "
                "it was delegated to may refresh it, with that server's JupyterHub API token",
            )
        if not store.claim_refresh(record.jti):  # another refresh of it got there first
            self._reused(store.get(record.jti) or record, caller)
        allowed = set(self.ctx.delegator.allowed_scopes(record.sub, record.project))
        kept = [s for s in record.scope.split() if s not in FACILITY_SCOPES]
        scopes = [s for s in kept if s in allowed] or kept
        try:
            token, claims = self.issue(
                record.sub,
                record.project,
                scopes,
                kind="server",
                server=record.server,
                parent=record.jti,
                family=record.family_id,
            )
        except ApiError:
            store.release_refresh(record.jti)
            raise
        log.info(
            "refreshed jti=%s -> jti=%s family=%s user=%s",
            record.jti,
            claims["jti"],
            record.family_id,
            record.sub,
        )
        self.write_json({"token": token, "jti": claims["jti"], "exp": claims["exp"]})

    def _reused(self, record: IssuedToken, caller: dict[str, Any]) -> None:
        """Revoke ``record``'s whole family, record and log it, and refuse with a 401."""
        if record.revoked_at is not None:
            event, reason = "refresh_revoked", "revoked"
            why = f"token {record.jti} was revoked"
        else:
            event, reason = "reuse", "reused"
            why = (
                f"token {record.jti} was already refreshed once; a second refresh means a "
                "second holder"
            )
        who = f"{caller.get('kind', 'user')} {caller['name']}"
        revoked = self.ctx.store.revoke_family(
            record.family_id, by=f"reuse detection ({who})", event=event, jti=record.jti, detail=why
        )
        log.warning(
            "token family revoked: family=%s jti=%s user=%s project=%s event=%s caller=%s "
            "revoked_now=%d",
            record.family_id,
            record.jti,
            record.sub,
            record.project,
            event,
            who,
            len(revoked),
        )
        raise ApiError(
            401,
            reason,
            f"{why}: its whole family {record.family_id} is revoked; restart the server for a "
            "fresh token",
            family=record.family_id,
        )


def _minted(token: str, claims: dict[str, Any]) -> dict[str, Any]:
    return {
        "token": token,
        "jti": claims["jti"],
        "exp": claims["exp"],
        "sub": claims["sub"],
        "project": claims["project"],
        "scope": claims["scope"],
    }


class MintHandler(BaseHandler):
    """``POST api/tokens`` mints a token for external software; ``GET`` lists the caller's."""

    metric_event = "issued"

    FIELDS = {"project": (str,), "scopes": (list, str), "ttl": (int,), "description": (str,)}

    def get(self) -> None:
        user = self.require_user()
        self.write_json({"tokens": [t.to_json() for t in self.ctx.store.list_for(user["name"])]})

    def mint(self) -> tuple[str, dict[str, Any]]:
        user = self.require_user()
        data = self.fields(self.FIELDS, {"project"})
        return self.issue(
            user["name"],
            data["project"],
            self.scope_list(data),
            ttl=data.get("ttl"),
            kind="user",
            description=data.get("description", "")[:200],
            admin=self.is_admin(user),
        )

    def post(self) -> None:
        token, claims = self.mint()
        log.info(
            "minted jti=%s user=%s project=%s", claims["jti"], claims["sub"], claims["project"]
        )
        self.write_json(_minted(token, claims), 201)


class MintForHandler(BaseHandler):
    """``POST api/mint-for``: a project token for the subject the body names ("mint for").

    The caller (the hub, the dashboard service, `beamhub up`'s detector) authenticates with its
    own JupyterHub API token, whose role must hold :data:`MINT_FOR_SCOPE` (unfiltered, or
    ``!user=<subject>``). The token is bounded like any other: the subject's project role from
    the register, the enclave's lifetime cap; its kind is ``server`` or ``service``; it is recorded.
    """

    metric_event = "issued"

    FIELDS = {
        "sub": (str,),
        "project": (str,),
        "scopes": (list, str),
        "ttl": (int,),
        "kind": (str,),
        "server": (str,),
        "description": (str,),
    }

    def post(self) -> None:
        caller = self.require_user()
        data = self.fields(self.FIELDS, {"sub", "project", "kind"})
        sub, project, kind = data["sub"], data["project"], data["kind"]
        held = set(caller.get("scopes") or ())
        if MINT_FOR_SCOPE not in held and f"{MINT_FOR_SCOPE}!user={sub}" not in held:
            raise ApiError(
                403,
                "scope",
                f"{caller.get('kind', 'user')} {caller['name']!r} may not mint tokens for "
                f"{sub!r}: its JupyterHub role lacks the {MINT_FOR_SCOPE} scope (or "
                f"{MINT_FOR_SCOPE}!user={sub}); grant it in c.JupyterHub.load_roles",
            )
        if kind not in MINT_FOR_KINDS:
            raise ApiError(
                400,
                "bad_field",
                f"kind: {kind[:40]!r} is not one of {', '.join(MINT_FOR_KINDS)} "
                "(user tokens are minted by their owner at api/tokens)",
                field="kind",
            )
        self.metric_kind = kind
        if not self.ctx.store.known_user(sub):
            raise ApiError(
                404,
                "unknown_subject",
                f"no subject {sub[:64]!r} is known here: a user must log in to the hub once, "
                "a service subject must be configured (--service-subjects)",
                field="sub",
            )
        if project not in self.ctx.store.known_projects():
            raise ApiError(
                404,
                "unknown_project",
                f"no project {project[:64]!r} is known here: nobody holds a role in it",
                field="project",
            )
        token, claims = self.issue(
            sub,
            project,
            self.scope_list(data),
            ttl=data.get("ttl"),
            kind=kind,
            server=data.get("server", "")[:200],
            description=data.get("description", "")[:200],
        )
        log.info(
            "minted for %s %s: jti=%s sub=%s project=%s kind=%s",
            caller.get("kind", "user"),
            caller["name"],
            claims["jti"],
            sub,
            project,
            kind,
        )
        self.write_json(_minted(token, claims), 201)


class UsersHandler(BaseHandler):
    """``POST api/users``: the hub records a user's roles as of her login (:data:`USERS_SCOPE`).

    Only the hub's own identity holds the scope; what it records bounds every token the user
    (or her server) gets afterwards. Answers 204.
    """

    FIELDS = {"name": (str,), "projects": (dict,), "admin": (bool,), "mfa": (bool,)}

    def post(self) -> None:
        caller = self.require_user()
        if USERS_SCOPE not in set(caller.get("scopes") or ()):
            raise ApiError(
                403,
                "scope",
                f"{caller.get('kind', 'user')} {caller['name']!r} may not record users' roles: "
                f"only the hub's identity holds {USERS_SCOPE}",
            )
        data = self.fields(self.FIELDS, {"name", "projects", "admin", "mfa"})
        name, projects = data["name"], data["projects"]
        if not 0 < len(name) <= 255:
            raise ApiError(400, "bad_field", "name: 1 to 255 characters", field="name")
        for project, role in projects.items():
            if role not in ROLES or not 0 < len(project) <= 128:
                raise ApiError(
                    400,
                    "bad_field",
                    f"projects: {project[:64]!r}: role {str(role)[:32]!r} is not one of "
                    f"{', '.join(ROLES)}",
                    field="projects",
                )
        self.ctx.store.record_user(name, projects, admin=data["admin"], mfa=data["mfa"])
        log.info("roles of %s recorded by %s: %s", name, caller["name"], sorted(projects.items()))
        self.set_status(204)
        self.finish()


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:  # type: ignore[override]
        raise ApiError(
            404, "not_found", f"no endpoint {self.request.path}; see {self.settings['prefix']}"
        )


class OAuthCallbackHandler(HubOAuthCallbackHandler, JsonApiHandler):
    """JupyterHub's OAuth callback (sets the service's login cookie); its errors as JSON too."""

    service = "the token service"
