"""BeamhubAuthenticator: OIDC login with MFA by enclave, project roles, and delegated project tokens.

Only GenericOAuthenticator's hooks are overridden (update_auth_model, get_user_groups,
check_allowed, pre_spawn_start, load_managed_roles); the OAuth flow, auth_state encryption and
refresh-before-spawn are oauthenticator's and JupyterHub's own. The hub never opens the signing
key: a server's delegated token is asked of the token service ("mint for", with the hub's own
service API token), which bounds it by the user's role and records it.
"""

from __future__ import annotations

import asyncio
import html
import os
from typing import Any

from oauthenticator.generic import GenericOAuthenticator
from tornado import web
from traitlets import Bool, Dict, Integer, List, TraitError, Unicode, default, validate

from beamhub.auth.mint_client import MintError, MintForClient
from beamhub.auth.roles import ROLE_SCOPES, ROLES
from beamhub.hub.tokens.store import best_project
from beamhub.kernels.spawn_form import ViewerHasNoServer

__all__ = ["BeamhubAuthenticator", "MfaRequired", "NoProject", "ViewerHasNoServer"]

#: JupyterHub scopes every project member holds: use the token service, the gateway and the
#: shared dashboard (which itself checks project membership).
_SERVICE_ACCESS = [
    "access:services!service=tokens",
    "access:services!service=gateway",
    "access:services!service=dashboard",
]


class _LoginRefused(web.HTTPError):
    """A 403 whose message JupyterHub's error page shows to the person logging in, with a way out:
    at a shared beamline PC the next person must be able to sign in as someone else."""

    def __init__(self, message: str) -> None:
        super().__init__(403, "%s", message, reason="Login refused")
        self.message = message
        self.jupyterhub_message = message
        # logout ends the identity provider's session too (logout_redirect_url), and every sign-in
        # asks for credentials again (prompt=login), so this link really switches the user
        self.jupyterhub_html_message = (
            f"<p>{html.escape(message)}</p>"
            '<p><a class="btn btn-primary" href="logout">Sign in as someone else</a></p>'
        )


class MfaRequired(_LoginRefused):
    """Login refused because the identity provider did not assert a second factor."""


class NoProject(_LoginRefused):
    """Login refused because the user holds no role in any project."""


class BeamhubAuthenticator(GenericOAuthenticator):
    """Log in at the facility's OpenID provider; act for one's projects with short-lived tokens."""

    mfa_required = Bool(
        False,
        help="""Refuse logins whose `amr` claim lacks a second factor (see mfa_methods) and whose
        `acr` is not in mfa_acr_values. Set from the enclave profile by `beamhub up`.

        Example: c.BeamhubAuthenticator.mfa_required = True
        """,
    ).tag(config=True)

    mfa_methods = List(
        Unicode(),
        ["otp", "mfa", "hwk", "swk", "sms"],
        help="RFC 8176 `amr` values that count as a second factor.",
    ).tag(config=True)

    mfa_acr_values = List(
        Unicode(),
        ["mfa", "urn:beamhub:mfa"],
        help="`acr` values that assert MFA on their own (when the IdP sends no `amr`).",
    ).tag(config=True)

    projects_claim = Unicode(
        "projects",
        help="Userinfo claim holding {project: role}; roles: pi, operator, member, viewer.",
    ).tag(config=True)

    role_scopes = Dict(
        dict(ROLE_SCOPES),
        help="""Project-token scopes per project role. pi/operator may steer; member may analyse;
        viewer reads streams and dashboards only.""",
    ).tag(config=True)

    token_ttl = Integer(
        0,
        help="""Seconds a delegated server token lives; 0 = the token service's default (its
        --ttl). Never more than the enclave's cap (the token service refuses).

        Example: c.BeamhubAuthenticator.token_ttl = 900
        """,
    ).tag(config=True)

    token_service_url = Unicode(
        help="Public URL of the token service, e.g. http://127.0.0.1:8000/services/tokens/",
    ).tag(config=True)

    token_service_api_url = Unicode(
        help="""URL at which the hub process itself calls the token service (directly, not
        through the proxy); default token_service_url.

        Example: c.BeamhubAuthenticator.token_service_api_url = "http://127.0.0.1:8123/services/tokens/"
        """,
    ).tag(config=True)

    token_service_api_token = Unicode(
        help="""JupyterHub API token of the hub's own service identity, whose role holds
        custom:beamhub:tokens:mint-for, custom:beamhub:tokens:users (and
        access:services!service=tokens). The hub records each user's project roles at login and
        asks the token service for each server's delegated token with it. Default $BEAMHUB_HUB_API_TOKEN.
        """,
    ).tag(config=True)
    dsn_url = Unicode(help="The DSN control API URL given to servers as BEAMHUB_DSN_URL.").tag(
        config=True
    )

    @default("token_service_api_url")
    def _api_url_default(self) -> str:
        return self.token_service_url

    @default("token_service_api_token")
    def _api_token_default(self) -> str:
        return os.environ.get("BEAMHUB_HUB_API_TOKEN", "")

    @validate("role_scopes")
    def _check_role_scopes(self, proposal: dict) -> dict:
        unknown = set(proposal["value"]) - set(ROLES)
        if unknown:
            raise TraitError(
                f"BeamhubAuthenticator.role_scopes: unknown role(s) {sorted(unknown)}; use {ROLES}"
            )
        return proposal["value"]

    # Defaults that make this authenticator what it is (still overridable in config).
    @default("enable_auth_state")
    def _auth_state_default(self) -> bool:
        return True

    @default("manage_groups")
    def _manage_groups_default(self) -> bool:
        return True

    @default("manage_roles")
    def _manage_roles_default(self) -> bool:
        return True

    @default("reset_managed_roles_on_startup")
    def _reset_managed_roles_default(self) -> bool:
        # load_managed_roles() lists every role this authenticator can grant, so a reset on start
        # only drops roles that no longer exist; assignments are kept (the roles name no users).
        # It must be on: JupyterHub 6.1.1's init_role_assignment reads its table of stale
        # assignments for every managed role that has members, but fills it only when the reset
        # is on, so with it off the hub fails to start (KeyError: 'users') once anyone logged in.
        return True

    @default("username_claim")
    def _username_claim_default(self) -> str:
        return "preferred_username"

    @default("extra_authorize_params")
    def _authorize_params_default(self) -> dict[str, str]:
        # ask for credentials at every sign-in, even with a live IdP session: a shared beamline
        # PC must never sign the next person in as the last one
        return {"prompt": "login"}

    @default("scope")
    def _scope_default(self) -> list[str]:
        return ["openid", "profile", "email", "projects", "offline_access"]

    def mint_client(self) -> MintForClient:
        """The token service's mint-for API, as the hub's own service identity."""
        if not self.token_service_api_url or not self.token_service_api_token:
            raise web.HTTPError(
                500,
                "BeamhubAuthenticator.token_service_api_url and token_service_api_token must be "
                "set (beamhub up writes them) for servers to receive a delegated token",
            )
        return MintForClient(self.token_service_api_url, self.token_service_api_token)

    # --- hooks -------------------------------------------------------------------------------

    def _has_mfa(self, user_info: dict[str, Any]) -> bool:
        amr = user_info.get("amr") or []
        if isinstance(amr, str):
            amr = amr.split()
        return bool(set(amr) & set(self.mfa_methods)) or user_info.get("acr") in self.mfa_acr_values

    def _projects(self, user_info: dict[str, Any]) -> dict[str, str]:
        raw = user_info.get(self.projects_claim) or {}
        if not isinstance(raw, dict):
            self.log.warning(
                "claim %r is not a {project: role} mapping; ignored", self.projects_claim
            )
            return {}
        return {str(p): str(r) for p, r in raw.items() if r in self.role_scopes}

    async def update_auth_model(self, auth_model: dict[str, Any]) -> dict[str, Any]:
        """Record projects, roles and MFA from the IdP's claims in auth_state and the register."""
        auth_state = auth_model["auth_state"]
        user_info = auth_state.get(self.user_auth_state_key) or {}
        projects = self._projects(user_info)
        mfa = self._has_mfa(user_info)
        auth_state["beamhub"] = {"projects": projects, "mfa": mfa, "amr": user_info.get("amr")}
        auth_model["roles"] = [self._role(r) for r in sorted(set(projects.values()))]
        if auth_model.get("admin") is None and self.admin_users:
            auth_model["admin"] = auth_model["name"] in self.admin_users
        await self._record_roles(auth_model["name"], projects, bool(auth_model.get("admin")), mfa)
        return auth_model

    async def _record_roles(self, name: str, projects: dict[str, str], admin: bool, mfa: bool):
        """Tell the token service the roles this login carries (it alone writes its register)."""
        if not self.token_service_api_url or not self.token_service_api_token:
            self.log.warning(
                "roles of %s not recorded: no token service configured "
                "(BeamhubAuthenticator.token_service_api_url/_token); she cannot get tokens",
                name,
            )
            return
        try:
            await asyncio.to_thread(
                self.mint_client().record_user, name, projects, admin=admin, mfa=mfa
            )
        except MintError as exc:
            self.log.error("could not record the roles of %s: %s", name, exc)
            raise web.HTTPError(
                503,
                f"Signing in needs the token service, which did not answer ({exc.message}). "
                "Try again in a minute; if it persists, tell the facility's admins.",
            ) from None

    async def get_user_groups(self, auth_state: dict[str, Any]) -> set[str]:
        """One group per project, one per project role: ``p-1001``, ``p-1001:pi``."""
        projects = auth_state.get("beamhub", {}).get("projects", {})
        return {p for p in projects} | {f"{p}:{r}" for p, r in projects.items()}

    async def check_allowed(self, username: str, auth_model: dict[str, Any]) -> bool:
        """Refuse with a reason: no second factor where the enclave needs one; no project role."""
        if auth_model is None:
            return True
        info = auth_model["auth_state"].get("beamhub", {})
        if self.mfa_required and not info.get("mfa"):
            self.log.warning(
                "login refused for %s: no second factor (amr=%s)", username, info.get("amr")
            )
            raise MfaRequired(
                "This enclave requires multi-factor authentication, but the identity provider "
                f"reported only {info.get('amr') or 'no methods'}. Sign in again with a second "
                "factor (e.g. a one-time code).",
            )
        if info.get("projects") or auth_model.get("admin"):
            return True
        if await super().check_allowed(username, auth_model):
            return True
        self.log.warning("login refused for %s: no project role", username)
        raise NoProject(
            "You hold no role in any beamhub project. Ask your project's PI to add you "
            "(roles: pi, operator, member, viewer).",
        )

    def _role(self, role: str) -> dict[str, Any]:
        scopes = self.role_scopes[role]
        return {
            "name": f"beamhub-{role}",
            "description": f"project {role}: project tokens with {' '.join(scopes)}",
            "scopes": ["self", *_SERVICE_ACCESS],
        }

    async def load_managed_roles(self) -> list[dict[str, Any]]:
        """JupyterHub roles mirroring the project roles: all may use the token service/gateway."""
        return [self._role(role) for role in self.role_scopes]

    async def pre_spawn_start(self, user: Any, spawner: Any) -> None:
        """Put a delegated project token for the server's project into its environment."""
        auth_state = await user.get_auth_state() or {}
        projects = auth_state.get("beamhub", {}).get("projects", {})
        project = (spawner.user_options or {}).get("project") or best_project(projects)
        if not project or project not in projects:
            raise web.HTTPError(
                403, f"{user.name} has no role in project {project!r}; cannot start a server for it"
            )
        if "jobs" not in self.role_scopes.get(projects[project], ()):
            raise ViewerHasNoServer(projects[project], project)
        if spawner.has_trait("project") and not (spawner.user_options or {}).get("project"):
            spawner.project = project  # ReservedNodeSpawner charges the same project
        client = self.mint_client()
        try:
            token, claims = await asyncio.to_thread(
                client.mint,
                user.name,
                project,
                list(self.role_scopes[projects[project]]),
                kind="server",
                ttl=self.token_ttl or None,
                server=spawner.name or "",
            )
        except MintError as exc:
            self.log.error("no delegated token for %s in %s: %s", user.name, project, exc)
            status = exc.status if 400 <= exc.status < 500 else 503
            raise web.HTTPError(
                status, f"cannot start a server for {project}: {exc.message}"
            ) from None
        self.log.info(
            "delegated token jti=%s user=%s project=%s server=%r exp=%s",
            claims["jti"],
            user.name,
            project,
            spawner.name,
            claims["exp"],
        )
        spawner.environment.update(
            {
                "BEAMHUB_TOKEN": token,
                "BEAMHUB_PROJECT": project,
                "BEAMHUB_ROLE": projects[project],
                "BEAMHUB_TOKEN_URL": self.token_service_url,
                "BEAMHUB_DSN_URL": self.dsn_url,
            }
        )
