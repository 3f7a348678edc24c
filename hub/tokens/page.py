"""The token service's small page: a user mints a token for external software (a DAQ, a script)."""

from __future__ import annotations

import html
from typing import Any

from tornado import web

from beamhub.hub.tokens.service import ApiError, MintHandler

__all__ = ["PageHandler"]


class PageHandler(MintHandler):
    """A small page: pick a project, scopes and TTL; the token is shown once."""

    @web.authenticated
    def get(self) -> None:
        self.write(self._page())

    def post(self) -> None:
        self._body()  # the form's _xsrf must be parsed before cookie authentication checks it
        if not self.get_current_user():
            raise ApiError(
                403, "forbidden", "log in to the hub and submit the form from its page (_xsrf)"
            )
        token, claims = self.mint()
        self.write(self._page(token, claims))

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
