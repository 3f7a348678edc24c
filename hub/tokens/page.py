"""The token service's page: a user mints a token for external software (a DAQ, a script), sees the
tokens she holds with their expiry, and revokes them.

It looks like the hub's own pages (JupyterHub's stylesheet, logo and navigation bar), and grants
least privilege by default: per project only the scopes her role holds are offered, and only
``stream.read`` is checked.
"""

from __future__ import annotations

import html
import time
from datetime import UTC, datetime
from typing import Any

from jupyterhub.services.auth import HubOAuthenticated
from tornado import web

from beamhub.auth.api import ApiError
from beamhub.hub.tokens.handlers import MintHandler
from beamhub.hub.tokens.store import IssuedToken

__all__ = ["DEFAULT_SCOPES", "SCOPE_HELP", "PageHandler"]

#: Checked when the page opens: the least a script needs to watch a stream.
DEFAULT_SCOPES = frozenset({"stream.read"})
#: What each scope lets the token's holder do, in the words the page shows.
SCOPE_HELP = {
    "stream.read": "read the project's streams",
    "stream.publish": "create channels and send frames",
    "steer": "steer the instrument and manage the project's channels",
    "reserve": "request beamtime windows",
    "jobs": "submit and cancel jobs",
    "dashboard": "open the team dashboard",
}

_SCRIPT = """
document.querySelectorAll("button[data-revoke]").forEach(function (button) {
  button.addEventListener("click", async function () {
    var note = document.getElementById("revoke-status");
    button.disabled = true;
    var body = new URLSearchParams({_xsrf: document.body.dataset.xsrf, jti: button.dataset.revoke});
    var answer = await fetch("revoke", {method: "POST", body: body, credentials: "same-origin"});
    if (answer.ok) { window.location.assign(window.location.pathname + "?revoked=1"); return; }
    var error = {};
    try { error = await answer.json(); } catch (e) {}
    note.textContent = "Not revoked: " + (error.message || ("HTTP " + answer.status));
    note.hidden = false;
    button.disabled = false;
  });
});
"""


def _when(epoch: float, now: float) -> str:
    stamp = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M UTC")
    left = int(epoch - now)
    if left <= 0:
        return f"{stamp} (expired)"
    span = f"{left // 60} min" if left < 7200 else f"{left // 3600} h"
    return f"{stamp} (in {span})"


class PageHandler(MintHandler):
    """GET shows the page; POST mints from one project's form and shows the token once.

    GET sends a browser without a hub login through the hub's OAuth (a redirect, not the API's
    401); the form POST is cookie-authenticated and must carry the page's ``_xsrf``. A refused
    mint is shown on the page with the service's message. Revoking goes to ``revoke`` (the API's
    own handler, which also revokes a server token's family) from the page's script.
    """

    def get_login_url(self) -> str:
        return HubOAuthenticated.get_login_url(self)  # the hub's login, not the API's 401

    @web.authenticated
    def get(self) -> None:
        notice = "Token revoked." if self.get_query_argument("revoked", "") else ""
        self._html(self._page(notice=notice))

    def post(self) -> None:
        self._form()  # the form's _xsrf must be parsed before cookie authentication checks it
        if not self.get_current_user():
            raise ApiError(
                403, "forbidden", "log in to the hub and submit the form from its page (_xsrf)"
            )
        if not self.get_body_arguments("scopes"):
            self.set_status(400)
            self._html(self._page(error="Choose at least one scope for the token."))
            return
        try:
            token, claims = self.mint()
        except ApiError as exc:
            self.set_status(exc.status)
            self._html(self._page(error=exc.message))
            return
        self._html(self._page(token, claims))

    def _html(self, page: str) -> None:
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Cache-Control", "no-store")  # a minted token is on the page
        self.finish(page)

    # -- the page ------------------------------------------------------------------------------
    def _page(
        self,
        token: str = "",
        claims: dict[str, Any] | None = None,
        *,
        error: str = "",
        notice: str = "",
    ) -> str:
        user = self.get_current_user()["name"]
        esc = html.escape
        hub = self.hub_auth.hub_prefix
        alerts = ""
        if error:
            alerts += f'<div class="alert alert-danger" role="alert">{esc(error)}</div>'
        if notice:
            alerts += f'<div class="alert alert-info" role="status">{esc(notice)}</div>'
        if token and claims:
            alerts += (
                '<div class="alert alert-success" role="status" id="new-token">'
                f"<h2 class='h5'>New token for {esc(claims['project'])}: "
                f"{esc(claims['scope'])}</h2>"
                f"<p>Expires {esc(_when(claims['exp'], time.time()))}. Copy it now: it is not "
                "shown again. Give it to your program as <code>BEAMHUB_TOKEN</code>.</p>"
                '<textarea class="form-control font-monospace" readonly rows="4" id="token">'
                f"{esc(token)}</textarea></div>"
            )
        return (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            "<title>Project tokens - beamhub</title>"
            '<meta name="viewport" content="width=device-width, initial-scale=1.0">'
            f'<link rel="stylesheet" href="{esc(hub)}static/css/style.min.css">'
            f'<link rel="icon" href="{esc(hub)}static/favicon.ico">'
            f'</head><body data-xsrf="{esc(self.xsrf_token.decode())}">'
            f"{self._navbar(user, hub)}"
            '<main class="container">'
            "<h1>Project tokens</h1>"
            '<p class="lead">A token lets a program (a DAQ, a script, <code>beamhub consume'
            "</code>) act for you in one project, with only the scopes you give it, until it "
            "expires or you revoke it.</p>"
            f"{alerts}{self._forms(user)}{self._tokens(user)}"
            f"</main><script>{_SCRIPT}</script></body></html>"
        )

    def _navbar(self, user: str, hub: str) -> str:
        esc = html.escape
        return (
            '<nav class="navbar navbar-expand-sm bg-body-tertiary mb-4">'
            '<div class="container-fluid">'
            f'<span id="jupyterhub-logo" class="navbar-brand"><a href="{esc(hub)}home">'
            f'<img src="{esc(hub)}logo" alt="JupyterHub logo" class="jpy-logo" title="Home">'
            "</a></span>"
            '<ul class="navbar-nav me-auto mb-0">'
            f'<li class="nav-item"><a class="nav-link" href="{esc(hub)}home">Home</a></li>'
            '<li class="nav-item"><a class="nav-link active" aria-current="page" href="">'
            "Project tokens</a></li></ul>"
            f'<span class="navbar-text me-2" id="user-name">{esc(user)}</span>'
            f'<a class="btn btn-sm btn-outline-secondary" href="{esc(hub)}logout">Logout</a>'
            "</div></nav>"
        )

    def _forms(self, user: str) -> str:
        """One form per project: only the role's scopes, only ``stream.read`` checked."""
        esc = html.escape
        cap = self.ctx.delegator.issuer.max_ttl
        xsrf = esc(self.xsrf_token.decode())
        cards = []
        for project, role in sorted(self.ctx.store.user_projects(user).items()):
            allowed = self.ctx.delegator.allowed_scopes(user, project)
            boxes = "".join(
                '<div class="form-check">'
                f'<input class="form-check-input" type="checkbox" name="scopes" '
                f'value="{esc(s)}" id="{esc(project)}-{esc(s)}"'
                f"{' checked' if s in DEFAULT_SCOPES else ''}>"
                f'<label class="form-check-label" for="{esc(project)}-{esc(s)}">'
                f"<code>{esc(s)}</code> — {esc(SCOPE_HELP.get(s, s))}</label></div>"
                for s in allowed
            )
            cards.append(
                f'<section class="card mb-4" aria-label="New token for {esc(project)}">'
                f'<div class="card-header">New token for <strong>{esc(project)}</strong> '
                f'<span class="text-body-secondary">(you are its {esc(role)})</span></div>'
                '<div class="card-body"><form method="post">'
                f'<input type="hidden" name="_xsrf" value="{xsrf}">'
                f'<input type="hidden" name="project" value="{esc(project)}">'
                f'<fieldset class="mb-3"><legend class="form-label fs-6">Scopes</legend>{boxes}'
                "</fieldset>"
                '<div class="row g-3 mb-3"><div class="col-sm-4">'
                f'<label class="form-label" for="{esc(project)}-ttl">Lifetime (seconds, at most '
                f"{cap})</label>"
                f'<input class="form-control" id="{esc(project)}-ttl" name="ttl" type="number" '
                f'min="1" max="{cap}" value="{min(3600, cap)}"></div>'
                '<div class="col-sm-8">'
                f'<label class="form-label" for="{esc(project)}-description">What it is for</label>'
                f'<input class="form-control" id="{esc(project)}-description" name="description" '
                'maxlength="200" placeholder="e.g. DAQ of hutch 2"></div></div>'
                f'<button class="btn btn-primary" type="submit">Request token for {esc(project)}'
                "</button></form></div></section>"
            )
        if not cards:
            return (
                '<div class="alert alert-warning" role="alert">You have no role in any '
                "project, so there is no token to mint; ask a project's PI to add you.</div>"
            )
        return "".join(cards)

    def _tokens(self, user: str) -> str:
        """Her unexpired tokens, newest first; a server's token only as its latest refresh."""
        esc = html.escape
        now = time.time()
        live: list[IssuedToken] = [
            t for t in self.ctx.store.list_for(user) if t.superseded_by is None
        ]
        if not live:
            rows = '<tr><td colspan="6" class="text-body-secondary">No unexpired tokens.</td></tr>'
        else:
            rows = "".join(self._row(t, now) for t in live)
        return (
            '<section class="mb-5" aria-label="Your tokens"><h2 class="h4">Your tokens</h2>'
            '<div class="alert alert-danger" role="alert" id="revoke-status" hidden></div>'
            '<table class="table table-striped align-middle" id="tokens"><thead><tr>'
            "<th>Project</th><th>Scopes</th><th>For</th><th>Expires</th><th>State</th><th></th>"
            f"</tr></thead><tbody>{rows}</tbody></table>"
            f'<p class="text-body-secondary small">Revoking takes effect at the DSN and the '
            f"gateway within {esc(str(self.ctx.revocation_poll))} s. Revoking a server's token "
            "revokes every refresh of it; the server then needs a restart.</p></section>"
        )

    @staticmethod
    def _row(t: IssuedToken, now: float) -> str:
        esc = html.escape
        what = t.description or ("your notebook server" if t.kind == "server" else t.kind)
        if t.revoked_at is not None:
            state = '<span class="badge text-bg-secondary">revoked</span>'
            action = ""
        else:
            state = '<span class="badge text-bg-success">active</span>'
            action = (
                f'<button class="btn btn-sm btn-outline-danger" type="button" '
                f'data-revoke="{esc(t.jti)}" aria-label="Revoke {esc(t.jti)}">Revoke</button>'
            )
        return (
            f'<tr data-jti="{esc(t.jti)}"><td>{esc(t.project)}</td>'
            f"<td><code>{esc(t.scope)}</code></td><td>{esc(what)}</td>"
            f"<td>{esc(_when(t.exp, now))}</td><td>{state}</td><td>{action}</td></tr>"
        )
