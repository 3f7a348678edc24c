"""Login through the real OpenID provider: delegated token in the server, MFA, projects and roles."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlparse

import jwt
import pytest
import requests

from beamhub.auth.tokens import TokenVerifier
from tests.hub.hubstack import RunningStack, login, server_env, spawn

pytestmark = pytest.mark.timeout(180)


def _mint(stack: RunningStack, user: str, project: str, scopes: list[str], ttl: int = 120):
    """Log ``user`` in (dev password: USER-dev), then mint through the token service's API."""
    assert login(stack, user, f"{user}-dev")[1].status_code == 200
    headers = {"Authorization": f"token {stack.user_api_token(user)}"}
    return requests.post(
        stack.tokens + "api/tokens",
        headers=headers,
        json={"project": project, "scopes": scopes, "ttl": ttl},
        timeout=10,
    )


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_login_spawn_delegated_token_works_for_its_project_only(dev_stack: RunningStack) -> None:
    session, r = login(dev_stack, "alice", "alice-dev")
    assert r.status_code == 200 and r.url.endswith("/hub/home"), (r.status_code, r.url)
    spawn(dev_stack, session, "alice")
    env = server_env(dev_stack, "alice")
    assert env["BEAMHUB_PROJECT"] == "p-1001"
    assert env["BEAMHUB_TOKEN_URL"] == dev_stack.tokens
    assert env["BEAMHUB_DSN_URL"] == dev_stack.urls["dsn"]
    token = env["BEAMHUB_TOKEN"]
    # the published JWKS verifies it; the claims are the pi's scopes, for 30 s (tokens.ttl)
    jwks = requests.get(dev_stack.tokens + "jwks.json", timeout=10).json()
    claims = TokenVerifier(jwks).verify(token)
    assert (claims.sub, claims.project) == ("alice", "p-1001")
    assert claims.scopes == {
        "stream.read",
        "stream.publish",
        "steer",
        "reserve",
        "jobs",
        "dashboard",
    }
    assert claims.exp - claims.iat == 30
    assert "refresh_token" not in " ".join(env)  # the upstream token stays in the hub
    # her server starts in her own home (her Unix account's when the hub is root), which holds
    # the beamtime notebooks
    notebooks = Path(env["HOME"]) / "notebooks"
    assert sorted(p.name for p in notebooks.glob("*.ipynb")) == [
        "01-first-look.ipynb",
        "02-live-analysis.ipynb",
        "03-steer-the-experiment.ipynb",
    ]
    # the DSN accepts it for p-1001 ...
    dsn = dev_stack.urls["dsn"]
    r = requests.get(dsn + "/api/channels", headers=_bearer(token), timeout=10)
    assert r.status_code == 200
    assert dev_stack.urls["detector_channel"] in {c["id"] for c in r.json()["channels"]}
    # ... and refuses it for p-2002's channel
    carol = _mint(dev_stack, "carol", "p-2002", ["stream.read", "stream.publish"]).json()["token"]
    r = requests.post(
        dsn + "/api/channels", headers=_bearer(carol), json={"stream": "c"}, timeout=10
    )
    assert r.status_code == 201, r.text
    other = r.json()["id"]
    r = requests.get(f"{dsn}/api/channels/{other}", headers=_bearer(token), timeout=10)
    assert r.status_code == 403 and r.json()["reason"] == "project", r.text
    assert requests.get(f"{dsn}/api/channels/{other}", headers=_bearer(carol), timeout=10).ok


def test_projects_become_groups_and_roles_auth_state_encrypted(dev_stack: RunningStack) -> None:
    _, r = login(dev_stack, "oscar", "oscar-dev")
    assert r.status_code == 200
    model = requests.get(
        f"{dev_stack.hub}api/users/oscar", headers=dev_stack.admin, timeout=10
    ).json()
    assert set(model["groups"]) == {"p-1001", "p-1001:operator"}
    assert model["roles"] == ["beamhub-operator"]
    state = model["auth_state"]
    # the dev enclave asks for no second factor, so the IdP reports only the password
    assert state["beamhub"] == {"projects": {"p-1001": "operator"}, "mfa": False, "amr": ["pwd"]}
    assert state["refresh_token"]
    db = sqlite3.connect(dev_stack.state / "hub" / "jupyterhub.sqlite")
    (blob,) = db.execute("SELECT encrypted_auth_state FROM users WHERE name='oscar'").fetchone()
    db.close()
    assert blob and state["refresh_token"].encode() not in blob and b"operator" not in blob


def test_password_checked_by_the_provider(dev_stack: RunningStack) -> None:
    _, r = login(dev_stack, "alice", "not-her-password")
    assert r.status_code == 401 and "wrong password" in r.text


def test_user_without_project_refused_with_reason(dev_stack: RunningStack) -> None:
    _, r = login(dev_stack, "mallory", "mallory-dev")
    assert r.status_code == 403
    assert "no role in any beamhub project" in r.text


def test_moderate_refuses_login_without_mfa(moderate_stack: RunningStack) -> None:
    _, r = login(moderate_stack, "bob", "bob-dev")  # not enrolled: password only
    assert r.status_code == 403
    assert "requires multi-factor authentication" in r.text and "pwd" in r.text
    _, r = login(moderate_stack, "alice", "alice-dev")  # password, then a computed TOTP code
    assert r.status_code == 200 and r.url.endswith("/hub/home")
    model = requests.get(
        f"{moderate_stack.hub}api/users/alice", headers=moderate_stack.admin, timeout=10
    ).json()
    assert model["auth_state"]["beamhub"]["amr"] == ["pwd", "otp"]  # only after a checked code


def test_moderate_refuses_wrong_and_reused_codes_and_locks_out(
    moderate_stack: RunningStack,
) -> None:
    from tests.hub.hubstack import otp_code

    _, r = login(moderate_stack, "carol", "carol-dev", otp="000000")
    assert r.status_code == 401 and "Wrong or expired code" in r.text
    assert "attempt(s) left" in r.text
    good = otp_code(moderate_stack, "carol")
    _, r = login(moderate_stack, "carol", "carol-dev", otp=good)
    assert r.status_code == 200 and r.url.endswith("/hub/home")
    _, r = login(moderate_stack, "carol", "carol-dev", otp=good)  # the same code again
    assert r.status_code == 401 and "already used" in r.text
    for _ in range(4):  # with the reused one: five wrong codes in a row
        login(moderate_stack, "carol", "carol-dev", otp="123x56")
    _, r = login(moderate_stack, "carol", "carol-dev")  # a right code, but locked out by now
    assert r.status_code == 429 and "locked" in r.text


def test_viewer_cannot_create_a_channel_or_steer_operator_can(dev_stack: RunningStack) -> None:
    dsn = dev_stack.urls["dsn"]
    detector = dev_stack.urls["detector_channel"]
    r = _mint(dev_stack, "vera", "p-1001", ["stream.read", "steer"])
    assert r.status_code == 403 and r.json()["reason"] == "beyond_role"
    assert "beyond vera's role" in r.json()["message"]
    vera = _mint(dev_stack, "vera", "p-1001", ["stream.read", "dashboard"]).json()["token"]
    r = requests.post(
        dsn + "/api/channels", headers=_bearer(vera), json={"stream": "v"}, timeout=10
    )
    assert r.status_code == 403 and r.json()["reason"] == "scope"
    steer = f"{dsn}/api/channels/{detector}/steer/params/hit_fraction"
    r = requests.put(steer, headers=_bearer(vera), json={"value": 0.5}, timeout=10)
    assert r.status_code == 403 and r.json()["reason"] == "scope"
    assert requests.get(f"{dsn}/api/channels/{detector}", headers=_bearer(vera), timeout=10).ok

    oscar = _mint(dev_stack, "oscar", "p-1001", ["stream.publish", "steer"]).json()["token"]
    assert jwt.decode(oscar, options={"verify_signature": False})["scope"] == "steer stream.publish"
    r = requests.post(
        dsn + "/api/channels", headers=_bearer(oscar), json={"stream": "o"}, timeout=10
    )
    assert r.status_code == 201, r.text
    r = requests.put(steer, headers=_bearer(oscar), json={"value": 0.5}, timeout=10)
    assert r.status_code == 200, r.text
    params = requests.get(
        f"{dsn}/api/channels/{detector}/steer/params", headers=_bearer(vera), timeout=10
    ).json()
    assert params["values"]["hit_fraction"] == 0.5


def _idp_has_session(stack: RunningStack, session: requests.Session) -> bool:
    """Ask the IdP with prompt=none: a code comes back only if it still has a session."""
    r = session.get(
        stack.runtime["authorize_url"],
        params={
            "client_id": stack.runtime["client_id"],
            "response_type": "code",
            "scope": "openid",
            "redirect_uri": stack.hub + "oauth_callback",
            "prompt": "none",
        },
        allow_redirects=False,
        timeout=10,
    )
    while r.status_code in (302, 303) and not r.headers["location"].startswith(stack.hub):
        r = session.get(urljoin(r.url, r.headers["location"]), allow_redirects=False, timeout=10)
    query = parse_qs(urlparse(r.headers["location"]).query)
    assert "code" in query or query.get("error") == ["login_required"], query
    return "code" in query


def test_a_refused_person_can_sign_in_as_someone_else(dev_stack: RunningStack) -> None:
    """At a shared beamline PC: mallory is refused; bob signs in next in the same browser."""
    s, r = login(dev_stack, "mallory", "mallory-dev")
    assert r.status_code == 403 and "Sign in as someone else" in r.text
    # every sign-in asks for credentials (prompt=login), even with mallory's IdP session alive
    s, r = login(dev_stack, "bob", "bob-dev", session=s)
    assert r.status_code == 200 and r.url.endswith("/hub/home"), (r.status_code, r.url)
    assert requests.get(f"{dev_stack.hub}api/user", cookies=s.cookies, timeout=10).status_code in (
        200,
        403,
    )  # the hub's own cookie now belongs to bob


def test_logout_ends_the_identity_providers_session_too(dev_stack: RunningStack) -> None:
    s, r = login(dev_stack, "vera", "vera-dev")
    assert r.status_code == 200
    assert _idp_has_session(dev_stack, s)
    r = s.get(dev_stack.hub + "logout", timeout=20)  # -> the IdP's end_session confirmation
    assert "/session/end" in r.url and "Sign out" in r.text
    form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', r.text))
    action = re.search(r'<form[^>]*action="([^"]+)"', r.text).group(1)
    r = s.post(urljoin(r.url, action), data={**form, "logout": "yes"}, timeout=20)
    assert r.url.startswith(dev_stack.hub + "login"), r.url  # back at the hub's login page
    assert not _idp_has_session(dev_stack, s)


def test_a_viewer_gets_the_dashboard_not_a_server_or_jobs(dev_stack: RunningStack) -> None:
    session, r = login(dev_stack, "vera", "vera-dev")
    assert r.status_code == 200
    r = session.get(dev_stack.hub + "spawn", timeout=30)
    assert r.status_code == 403
    assert "watch the experiment on the shared dashboard" in r.text
    assert 'href="/services/dashboard/"' in r.text
    model = requests.get(f"{dev_stack.hub}api/users/vera", headers=dev_stack.admin, timeout=10)
    assert not model.json()["servers"]  # nothing was started
    vera = {"Authorization": f"token {dev_stack.user_api_token('vera')}"}
    r = requests.post(
        f"{dev_stack.hub}api/beamhub/jobs",
        headers=vera,
        json={"project": "p-1001", "argv": ["true"]},
        timeout=30,
    )
    assert r.status_code == 403 and r.json()["reason"] == "role", r.text
