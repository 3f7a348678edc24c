"""The token service's small page: a user mints a token for external software (a DAQ, a script)."""

from __future__ import annotations

import html
from typing import Any

from jupyterhub.services.auth import HubOAuthenticated
from tornado import web

from beamhub.auth.api import ApiError
from beamhub.hub.tokens.handlers import MintHandler

__all__ = ["PageHandler"]


class PageHandler(MintHandler):
    """A small page: pick a project, scopes and TTL; the token is shown once.

    GET sends a browser without a hub login through the hub's OAuth (a redirect, not the API's
    401); the form POST is cookie-authenticated and must carry the page's ``_xsrf``. Errors stay
    in the API's JSON shape.
    """

    def get_login_url(self) -> str:
        return HubOAuthenticated.get_login_url(self)  # the hub's login, not the API's 401

    @web.authenticated
    def get(self) -> None:
        self._html(self._page())

    def post(self) -> None:
        self._form()  # the form's _xsrf must be parsed before cookie authentication checks it
        if not self.get_current_user():
            raise ApiError(
                403, "forbidden", "log in to the hub and submit the form from its page (_xsrf)"
            )
        token, claims = self.mint()
        self._html(self._page(token, claims))

    def _html(self, page: str) -> None:
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish(page)

    def _page(self, token: str = "", claims: dict[str, Any] | None = None) -> str:
        user = self.get_current_user()["name"]
        projects = self.ctx.store.user_projects(user)
        esc = html.escape
        rows = "".join(
            f"<li>{esc(p)} ({esc(r)}): "
            + " ".join(
                f'<label><input type="checkbox" name="scopes" value="{esc(s)}" checked>{esc(s)}</label>'
                for s in self.ctx.delegator.allowed_scopes(user, p)
            )
            + f' <button name="project" value="{esc(p)}">Mint for {esc(p)}</button></li>'
            for p, r in sorted(projects.items())
        )
        shown = ""
        if token and claims:
            shown = (
                f"<h2>New token (jti {esc(claims['jti'])}, expires {claims['exp']})</h2>"
                f'<p>Copy it now; it is not shown again.</p><textarea readonly cols=100 rows=4 id="token">'
                f"{esc(token)}</textarea>"
            )
        cap = self.ctx.delegator.issuer.max_ttl
        return (
            f"<!DOCTYPE html><html><head><title>beamhub tokens</title></head><body>"
            f"<h1>Project tokens for {esc(user)}</h1>{shown}"
            f'<form method="post"><input type="hidden" name="_xsrf" value="{esc(self.xsrf_token.decode())}">'
            f'<label>TTL (s, max {cap}) <input name="ttl" type="number" min="1" max="{cap}" '
            f'value="{min(3600, cap)}"></label>'
            f'<label>Description <input name="description" maxlength="200"></label>'
            f"<ul>{rows or '<li>you have no project role</li>'}</ul></form></body></html>"
        )
