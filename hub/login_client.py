"""Browserless sign-in to a beamhub hub through the dev identity provider's forms.

hub ``oauth_login`` → the IdP's login form → (its one-time-code form) → consent → the hub's
callback, with a ``requests`` session that keeps every cookie, as a browser would. Used by
`beamhub check`'s second-factor probe, the benchmarks and the tests: one way to sign in.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import urljoin

import requests

__all__ = [
    "LoginError",
    "asks_for_code",
    "form_action",
    "request_server",
    "sign_in",
    "spawn_form_action",
]


class LoginError(RuntimeError):
    """The sign-in could not even reach a form (the hub or the IdP is not there)."""


def form_action(response: requests.Response) -> str:
    """The absolute URL the page's (first) POST form submits to."""
    match = re.search(r'<form method="post" action="([^"]+)"', response.text)
    if not match:
        raise LoginError(
            f"no form on {response.url} ({response.status_code}): {response.text[:300]}"
        )
    return urljoin(response.url, match.group(1))


def asks_for_code(response: requests.Response) -> bool:
    """True if the page is the IdP's one-time-code form."""
    return response.status_code == 200 and 'name="code"' in response.text


def sign_in(
    hub: str,
    user: str,
    password: str,
    otp: str | Callable[[], str] | None = None,
    session: requests.Session | None = None,
    timeout: float = 30.0,
) -> tuple[requests.Session, requests.Response]:
    """Sign ``user`` in at ``hub`` (``http://.../hub/``); the session and the last response.

    Where the IdP asks for a one-time code, ``otp`` (a code, or a function that makes one) is
    sent; without one the code form is the last response. A refusal (the IdP's or the hub's)
    is a response too: the caller reads its status and page.
    """
    s = session or requests.Session()
    r = s.get(hub + "oauth_login", params={"next": "/hub/home"}, timeout=timeout)
    if r.status_code != 200 or "/interaction/" not in r.url:
        raise LoginError(f"no identity provider login form at {r.url} ({r.status_code})")
    r = s.post(
        form_action(r),
        data={"prompt": "login", "login": user, "password": password},
        timeout=timeout,
    )
    if asks_for_code(r):
        if otp is None:
            return s, r
        code = otp() if callable(otp) else otp
        r = s.post(form_action(r), data={"prompt": "otp", "code": code}, timeout=timeout)
    if r.status_code == 200 and "/session/end/confirm" in r.text:
        # another account's IdP session ends first: the page a browser submits by script
        hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', r.text))
        r = s.post(form_action(r), data=hidden, timeout=timeout)
    if r.status_code != 200 or "Authorize" not in r.text:
        return s, r  # refused at the IdP, or no consent needed
    r = s.post(form_action(r), data={"prompt": "consent"}, timeout=timeout)
    return s, r


def spawn_form_action(page: requests.Response) -> str | None:
    """The URL the hub's server options form posts to, or None: the page has no form."""
    import html

    match = re.search(r'id="spawn_form"\s+action="([^"]+)"', page.text)
    return urljoin(page.url, html.unescape(match.group(1))) if match else None


def request_server(
    hub: str,
    session: requests.Session,
    options: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> requests.Response:
    """Ask for the signed-in user's server as she would: the hub's spawn page, its options form
    submitted with ``options`` (the form's defaults for the rest). The hub's last answer."""
    r = session.get(hub + "spawn", timeout=timeout)
    action = spawn_form_action(r) if r.status_code == 200 else None
    if action is not None:
        r = session.post(action, data=options or {}, timeout=timeout)
    return r
