"""The token service over the real hub: refresh before expiry, revocation at the DSN, mint-for,
bad input, and every error in the one JSON shape (auth/api.py ERROR_SCHEMA)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import jsonschema
import jwt
import pytest
import requests

from beamhub.auth.api import ERROR_SCHEMA
from beamhub.auth.token_client import RefreshError, TokenRefresher
from beamhub.auth.tokens import TokenVerifier
from tests.hub.hubstack import RunningStack, login, server_env, spawn

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def bob_server(dev_stack: RunningStack) -> dict[str, str]:
    """bob (member of p-1001) logged in with his server running: its real environment."""
    session, r = login(dev_stack, "bob", "bob-dev")
    assert r.status_code == 200
    spawn(dev_stack, session, "bob")
    return server_env(dev_stack, "bob")


@pytest.fixture(scope="module")
def bob_token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the refreshers of bob's server share the newest token (rotation: each token
    refreshes once), as its kernels do through TokenRefresher.from_env()."""
    return tmp_path_factory.mktemp("bob-server") / "token.jwt"


def _claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def _dsn_status(stack: RunningStack, token: str) -> requests.Response:
    return requests.get(
        stack.urls["dsn"] + "/api/channels",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def test_server_token_refreshed_before_expiry(
    dev_stack: RunningStack, bob_server: dict, bob_token_file: Path
) -> None:
    first = bob_server["BEAMHUB_TOKEN"]
    old = _claims(first)
    assert old["scope"] == "dashboard jobs stream.publish stream.read"
    refresher = TokenRefresher(
        first,
        bob_server["BEAMHUB_TOKEN_URL"],
        bob_server["JUPYTERHUB_API_TOKEN"],
        margin=0.9,
        update_env=False,
        token_file=bob_token_file,
    )
    with refresher:
        deadline = time.monotonic() + 20
        while refresher.refreshes == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert refresher.refreshes >= 1, refresher.last_error
    new = _claims(refresher.token)
    assert new["jti"] != old["jti"] and new["exp"] >= old["exp"]
    assert time.time() < old["exp"], "the refresh came only after the old token expired"
    assert (new["sub"], new["project"], new["scope"]) == (old["sub"], old["project"], old["scope"])
    assert _dsn_status(dev_stack, refresher.token).status_code == 200


def test_revoked_token_refused_by_dsn_within_one_interval(
    dev_stack: RunningStack, bob_server: dict, bob_token_file: Path
) -> None:
    refresher = TokenRefresher(
        bob_server["BEAMHUB_TOKEN"],
        bob_server["BEAMHUB_TOKEN_URL"],
        bob_server["JUPYTERHUB_API_TOKEN"],
        update_env=False,
        token_file=bob_token_file,  # the newest token of bob's server, not its first again
    )
    token = refresher.refresh_now()
    jti = _claims(token)["jti"]
    assert _dsn_status(dev_stack, token).status_code == 200
    gateway = dev_stack.urls["gateway"] + "api/v1/projects/p-1001/channels"
    bearer = {"Authorization": f"Bearer {token}"}
    r = requests.get(gateway, headers=bearer, timeout=10)
    assert r.status_code == 200, r.text
    bob = {"Authorization": f"token {dev_stack.user_api_token('bob')}"}
    # carol (another project) may not revoke bob's token; bob may
    assert login(dev_stack, "carol", "carol-dev")[1].status_code == 200
    carol = {"Authorization": f"token {dev_stack.user_api_token('carol')}"}
    r = requests.post(dev_stack.tokens + "revoke", headers=carol, json={"jti": jti}, timeout=10)
    assert r.status_code == 403 and r.json()["reason"] == "not_owner"
    r = requests.post(dev_stack.tokens + "revoke", headers=bob, json={"jti": jti}, timeout=10)
    assert r.status_code == 200 and r.json()["revoked"] == jti
    assert r.json()["already_revoked"] is False
    assert r.json()["family_revoked"] >= 1  # the server's earlier tokens go with it
    revoked_at = time.monotonic()
    assert jti in requests.get(dev_stack.tokens + "revoked", timeout=10).json()["revoked"]
    interval = dev_stack.runtime["revocation_poll"]
    while (r := _dsn_status(dev_stack, token)).status_code == 200:
        assert time.monotonic() - revoked_at < interval + 2.0, "DSN still accepts a revoked token"
        time.sleep(0.05)
    assert r.status_code == 401 and r.json()["reason"] == "revoked"
    assert time.monotonic() - revoked_at <= interval + 1.0
    while (r := requests.get(gateway, headers=bearer, timeout=10)).status_code == 200:
        assert time.monotonic() - revoked_at < interval + 2.0, "gateway still accepts it"
        time.sleep(0.05)
    assert r.status_code == 401 and "revoked" in r.text, r.text
    # the server cannot refresh its way around a revocation
    with pytest.raises(RefreshError) as err:
        refresher.refresh_now()
    assert err.value.status == 401 and "revoked" in str(err.value)
    # introspection says inactive, and why
    r = requests.post(
        dev_stack.tokens + "introspect", headers=bob, json={"token": token}, timeout=10
    )
    assert r.json() == {"active": False, "reason": "revoked"}


def test_mint_for_external_software_within_role_and_cap(dev_stack: RunningStack) -> None:
    assert login(dev_stack, "bob", "bob-dev")[1].status_code == 200
    bob = {"Authorization": f"token {dev_stack.user_api_token('bob')}"}
    body = {"project": "p-1001", "scopes": "stream.publish", "ttl": 600, "description": "DAQ"}
    r = requests.post(dev_stack.tokens + "api/tokens", headers=bob, json=body, timeout=10)
    assert r.status_code == 201, r.text
    minted = r.json()
    claims = _claims(minted["token"])
    assert claims["scope"] == "stream.publish" and claims["exp"] - claims["iat"] == 600
    r = requests.post(
        dev_stack.tokens + "introspect", headers=bob, json={"token": minted["token"]}, timeout=10
    )
    assert (
        r.json()["active"] is True
        and r.json()["kind"] == "user"
        and r.json()["jti"] == minted["jti"]
    )
    listed = requests.get(dev_stack.tokens + "api/tokens", headers=bob, timeout=10).json()["tokens"]
    assert minted["jti"] in {t["jti"] for t in listed}
    assert all("token" not in t for t in listed)  # values are never stored
    cap = dev_stack.runtime["max_token_ttl"]
    r = requests.post(
        dev_stack.tokens + "api/tokens",
        headers=bob,
        json={"project": "p-1001", "ttl": cap + 1},
        timeout=10,
    )
    assert r.status_code == 400 and str(cap) in r.json()["message"]
    r = requests.post(
        dev_stack.tokens + "api/tokens", headers=bob, json={"project": "p-2002"}, timeout=10
    )
    assert r.status_code == 403 and "no role in project" in r.json()["message"]
    # an admin (alice, admin in the dev deployment) may revoke anyone's token
    assert login(dev_stack, "alice", "alice-dev")[1].status_code == 200
    alice = {"Authorization": f"token {dev_stack.user_api_token('alice')}"}
    r = requests.post(
        dev_stack.tokens + "revoke", headers=alice, json={"jti": minted["jti"]}, timeout=10
    )
    assert r.status_code == 200 and r.json()["revoked"] == minted["jti"]
    listed = requests.get(dev_stack.tokens + "api/tokens", headers=bob, timeout=10).json()["tokens"]
    assert {t["jti"]: t["revoked"] for t in listed}[minted["jti"]] is True


def test_token_page_mints_with_the_browser_session(dev_stack: RunningStack) -> None:
    session, r = login(dev_stack, "oscar", "oscar-dev")
    assert r.status_code == 200
    r = session.get(dev_stack.tokens, timeout=20)  # the service's own OAuth round trip
    assert r.status_code == 200 and '<span class="navbar-text me-2" id="user-name">oscar<' in r.text
    assert "<h1>Project tokens</h1>" in r.text, r.text[:500]
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', r.text).group(1)
    r = session.post(
        dev_stack.tokens,
        data={"_xsrf": xsrf, "project": "p-1001", "scopes": ["steer"], "ttl": "60"},
        timeout=20,
    )
    assert r.status_code == 200, r.text[:500]
    token = re.search(r'<textarea[^>]*id="token">([^<]+)</textarea>', r.text).group(1)
    assert _claims(token)["scope"] == "steer" and _claims(token)["sub"] == "oscar"
    r = session.post(dev_stack.tokens, data={"project": "p-1001", "ttl": "60"}, timeout=20)
    assert r.status_code in (401, 403), "a cookie POST without _xsrf must be refused"


def test_jwks_and_revocation_list_are_public(dev_stack: RunningStack) -> None:
    jwks = requests.get(dev_stack.tokens + "jwks.json", timeout=10)
    assert jwks.status_code == 200 and jwks.json()["keys"][0]["alg"] == "ES256"
    assert (
        requests.get(dev_stack.tokens + ".well-known/jwks.json", timeout=10).json() == jwks.json()
    )
    revoked = requests.get(dev_stack.tokens + "revoked", timeout=10).json()
    assert isinstance(revoked["revoked"], list) and revoked["poll_interval"] == 1.0


ENDPOINTS = ["api/tokens", "api/refresh", "introspect", "revoke"]
BAD_BODIES = [
    ("malformed_json", b"{not json", "application/json"),
    ("malformed_json", b"[1, 2]", "application/json"),
    ("malformed_json", b"\xff\xfe", "application/json"),
    ("malformed_json", b"[" * 5000 + b"]" * 5000, "application/json"),  # nested too deep
    (
        "unknown_field",
        b'{"token": "x", "jti": "x", "project": "p", "bogus": 1}',
        "application/json",
    ),
    ("body_too_large", b'{"token": "' + b"a" * 20000 + b'"}', "application/json"),
    ("missing_field", b"{}", "application/json"),
]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(("error", "body", "ctype"), BAD_BODIES)
def test_bad_input_is_a_clear_4xx(
    dev_stack: RunningStack, endpoint: str, error: str, body: bytes, ctype: str, bob_server: dict
) -> None:
    headers = {
        "Authorization": f"token {bob_server['JUPYTERHUB_API_TOKEN']}",
        "Content-Type": ctype,
    }
    r = requests.post(dev_stack.tokens + endpoint, data=body, headers=headers, timeout=10)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    jsonschema.validate(r.json(), ERROR_SCHEMA)
    if error == "missing_field" and endpoint == "api/tokens":
        assert r.json()["message"] == "project: required"
    else:
        assert r.json()["reason"] == error, r.text
    assert r.json()["message"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_wrong_types_and_no_credentials(
    dev_stack: RunningStack, endpoint: str, bob_server: dict
) -> None:
    auth = {"Authorization": f"token {bob_server['JUPYTERHUB_API_TOKEN']}"}
    field = {
        "api/tokens": "project",
        "api/refresh": "token",
        "introspect": "token",
        "revoke": "jti",
    }
    r = requests.post(
        dev_stack.tokens + endpoint, json={field[endpoint]: 42}, headers=auth, timeout=10
    )
    assert r.status_code == 400 and r.json()["reason"] == "bad_field"
    assert r.json()["message"].startswith(f"{field[endpoint]}: expected str")
    r = requests.post(dev_stack.tokens + endpoint, json={field[endpoint]: "x"}, timeout=10)
    assert r.status_code == 401 and r.json()["reason"] == "unauthenticated"


def test_other_bad_requests(dev_stack: RunningStack, bob_server: dict) -> None:
    auth = {"Authorization": f"token {bob_server['JUPYTERHUB_API_TOKEN']}"}
    t = dev_stack.tokens
    r = requests.get(t + "nope", timeout=10)
    assert r.status_code == 404 and r.json()["reason"] == "not_found"
    r = requests.post(t + "revoke", json={"jti": "0" * 32}, headers=auth, timeout=10)
    assert r.status_code == 404 and r.json()["reason"] == "unknown_jti"
    r = requests.post(t + "api/refresh", json={"token": "garbage"}, headers=auth, timeout=10)
    assert r.status_code == 401 and r.json()["reason"] == "invalid_token"
    r = requests.post(
        t + "api/tokens", json={"project": "p-1001", "ttl": True}, headers=auth, timeout=10
    )
    assert r.status_code == 400 and r.json()["message"].startswith("ttl: expected int")
    r = requests.post(
        t + "api/tokens", json={"project": "p-1001", "scopes": [1]}, headers=auth, timeout=10
    )
    assert r.status_code == 400 and "scopes" in r.json()["message"]
    r = requests.post(t + "introspect", json={"token": "garbage"}, headers=auth, timeout=10)
    assert r.json() == {"active": False, "reason": "malformed"}
    r = requests.post(t + "api/tokens", data=b"x" * (2 * 1024 * 1024), headers=auth, timeout=30)
    assert 400 <= r.status_code < 500


MINT_FOR = "custom:beamhub:tokens:mint-for"


def _mint_for(stack: RunningStack, api_token: str, **body) -> requests.Response:
    r = requests.post(
        stack.tokens + "api/mint-for",
        headers={"Authorization": f"token {api_token}"},
        json=body,
        timeout=10,
    )
    if r.status_code >= 400:
        jsonschema.validate(r.json(), ERROR_SCHEMA)
    return r


def test_mint_for_is_refused_without_the_scope(dev_stack: RunningStack, bob_server: dict) -> None:
    """Users, servers and the admin service lack the scope; a scope narrowed to one subject
    (the detector's ``!user=beamhub-detector``) reaches no other subject."""
    rt = dev_stack.runtime
    want = {"sub": "bob", "project": "p-1001", "scopes": ["stream.read"], "kind": "service"}
    callers = {
        "bob": dev_stack.user_api_token("bob"),
        "bob's server": bob_server["JUPYTERHUB_API_TOKEN"],
        "beamhub-admin": rt["admin_api_token"],
        "beamhub-detector": rt["service_subjects"]["beamhub-detector"]["api_token"],
    }
    for who, api_token in callers.items():
        r = _mint_for(dev_stack, api_token, **want)
        assert r.status_code == 403 and r.json()["reason"] == "scope", (who, r.text)
        assert MINT_FOR in r.json()["message"] and "'bob'" in r.json()["message"]
    r = _mint_for(dev_stack, "not-a-hub-token", **want)
    assert r.status_code == 401 and r.json()["reason"] == "unauthenticated"


def test_mint_for_is_bounded_by_role_and_ttl_and_recorded(
    dev_stack: RunningStack, bob_server: dict
) -> None:
    rt = dev_stack.runtime
    hub = rt["hub_api_token"]
    want = {"sub": "bob", "project": "p-1001", "scopes": ["stream.read"], "kind": "service"}
    r = _mint_for(dev_stack, hub, **want, ttl=20, description="mint-for test")
    assert r.status_code == 201, r.text
    minted = r.json()
    jwks = requests.get(dev_stack.tokens + "jwks.json", timeout=10).json()
    claims = TokenVerifier(jwks).verify(minted["token"], project="p-1001", scope="stream.read")
    assert (claims.sub, claims.exp - claims.iat, minted["sub"]) == ("bob", 20, "bob")
    # recorded like any other token: its subject lists it and may revoke it
    bob = {"Authorization": f"token {dev_stack.user_api_token('bob')}"}
    listed = requests.get(dev_stack.tokens + "api/tokens", headers=bob, timeout=10).json()
    row = {t["jti"]: t for t in listed["tokens"]}[minted["jti"]]
    assert (row["kind"], row["description"]) == ("service", "mint-for test")
    # without scopes: every scope of the subject's role, no more
    r = _mint_for(dev_stack, hub, sub="bob", project="p-1001", kind="server")
    assert r.status_code == 201 and r.json()["scope"] == "dashboard jobs stream.publish stream.read"
    cap = rt["max_token_ttl"]
    refusals = [
        ({"scopes": ["steer"]}, 403, "beyond_role", "scopes", "steer"),
        ({"ttl": cap + 1}, 400, "bad_field", "ttl", str(cap)),
        ({"kind": "user"}, 400, "bad_field", "kind", "server, service"),
        ({"sub": "nobody-ever"}, 404, "unknown_subject", "sub", "nobody-ever"),
        ({"project": "p-9999"}, 404, "unknown_project", "project", "p-9999"),
        ({"project": "p-2002"}, 403, "no_role", "project", "no role in project 'p-2002'"),
    ]
    assert login(dev_stack, "carol", "carol-dev")[1].status_code == 200  # p-2002 is known
    for change, status, reason, field, said in refusals:
        r = _mint_for(dev_stack, hub, **{**want, **change})
        assert (r.status_code, r.json()["reason"]) == (status, reason), (change, r.text)
        assert r.json()["field"] == field and said in r.json()["message"], (change, r.text)
    r = _mint_for(dev_stack, hub, project="p-1001", kind="service")
    assert r.status_code == 400 and r.json() == {
        "reason": "missing_field",
        "message": "sub: required",
        "field": "sub",
    }


def test_a_narrowed_mint_for_scope_reaches_its_own_subject(dev_stack: RunningStack) -> None:
    """beamhub up's detector identity mints for beamhub-detector, an operator of its project."""
    detector = dev_stack.runtime["service_subjects"]["beamhub-detector"]
    project = next(iter(detector["projects"]))
    want = {"sub": detector["subject"], "project": project, "kind": "service"}
    r = _mint_for(dev_stack, detector["api_token"], **want, scopes=["steer", "stream.publish"])
    assert r.status_code == 201, r.text
    assert _claims(r.json()["token"])["sub"] == "beamhub-detector"
    r = _mint_for(dev_stack, detector["api_token"], **want, scopes=["reserve", "stream.admin"])
    assert r.status_code == 403 and r.json()["reason"] == "beyond_role"


def test_token_service_errors_are_in_the_one_shape(
    dev_stack: RunningStack, bob_server: dict
) -> None:
    """A sample of every kind of refusal, valid against ERROR_SCHEMA (auth/api.py)."""
    auth = {"Authorization": f"token {bob_server['JUPYTERHUB_API_TOKEN']}"}
    t = dev_stack.tokens
    answers = [
        requests.get(t + "nope", timeout=10),
        requests.post(t + "revoke", json={"jti": "x"}, timeout=10),
        requests.post(t + "revoke", json={"jti": "0" * 32}, headers=auth, timeout=10),
        requests.post(t + "api/tokens", data=b"x" * (2 * 1024 * 1024), headers=auth, timeout=30),
        requests.post(t + "api/tokens", json={"project": "p-2002"}, headers=auth, timeout=10),
        requests.get(t + "oauth_callback", timeout=10),  # no code, no state
    ]
    for r in answers:
        assert 400 <= r.status_code < 500, (r.request.method, r.url, r.status_code, r.text[:300])
        assert r.headers["Content-Type"].startswith("application/json"), r.url
        jsonschema.validate(r.json(), ERROR_SCHEMA)
        assert "error" not in r.json()  # the old token-service shape is gone
    assert answers[3].status_code == 413 and answers[3].json()["limit"] == 16 * 1024


def test_a_real_server_refreshes_its_expired_token_within_the_grace(
    dev_stack: RunningStack, bob_server: dict
) -> None:
    """The server's own JupyterHub API token (from its real environment) is what identifies the
    holder of an expired delegated token; bob's personal token is not his server."""
    body = {"sub": "bob", "project": "p-1001", "kind": "server", "server": "", "ttl": 1}
    r = _mint_for(dev_stack, dev_stack.runtime["hub_api_token"], **body)
    assert r.status_code == 201, r.text
    expired = r.json()
    while time.time() <= expired["exp"] + 1:  # wait for the state: the token has expired
        time.sleep(0.1)
    personal = {"Authorization": f"token {dev_stack.user_api_token('bob')}"}
    r = requests.post(
        dev_stack.tokens + "api/refresh",
        headers=personal,
        json={"token": expired["token"]},
        timeout=10,
    )
    assert r.status_code == 403 and r.json()["reason"] == "not_holder", r.text
    server = {"Authorization": f"token {bob_server['JUPYTERHUB_API_TOKEN']}"}
    r = requests.post(
        dev_stack.tokens + "api/refresh",
        headers=server,
        json={"token": expired["token"]},
        timeout=10,
    )
    assert r.status_code == 200, r.text
