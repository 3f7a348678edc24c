"""Tenancy findings against the real token service and gateway of a `beamhub up`: a token's power
is its scopes (admin only by scope, for hub admins, for minutes), refresh rotates and detects
reuse, expired tokens are refreshed only by their server within the grace, and only the owner, a
service or an admin may introspect a token."""

from __future__ import annotations

import time

import jsonschema
import jwt
import pytest
import requests

from beamhub.auth.api import ERROR_SCHEMA
from beamhub.auth.roles import ADMIN_MAX_TTL
from beamhub.auth.token_client import RefreshError, TokenRefresher
from tests.hub.http_probe import declare_and_stream
from tests.hub.hubstack import RunningStack, login

pytestmark = pytest.mark.timeout(180)


def _claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def _post(stack: RunningStack, path: str, api_token: str, body: dict) -> requests.Response:
    r = requests.post(
        stack.tokens + path,
        headers={"Authorization": f"token {api_token}"},
        json=body,
        timeout=10,
    )
    if r.status_code >= 400:
        jsonschema.validate(r.json(), ERROR_SCHEMA)
    return r


def _revoked(stack: RunningStack) -> set[str]:
    return set(requests.get(stack.tokens + "revoked", timeout=10).json()["revoked"])


@pytest.fixture(scope="module")
def users(dev_stack: RunningStack) -> dict[str, str]:
    """Personal hub API tokens of alice (pi, hub admin), bob (member) and carol (other project)."""
    for name in ("alice", "bob", "carol"):
        assert login(dev_stack, name, f"{name}-dev")[1].status_code == 200
    return {name: dev_stack.user_api_token(name) for name in ("alice", "bob", "carol")}


#: The scopes JupyterHub gives the API token of oscar's default server (c.Spawner.server_token_scopes,
#: resolved at spawn)
SERVER_SCOPES = [
    "access:servers!server=oscar/",
    "users:activity!user=oscar",
    "access:services!service=tokens",
]


@pytest.fixture(scope="module")
def oscar_server(dev_stack: RunningStack) -> dict[str, str]:
    """The identity of oscar's default server (operator of p-1001): a hub API token with exactly
    the scopes JupyterHub gives a server's token, and where a server refreshes. (A spawned
    server's own environment is used in test_delegation.py.)"""
    assert login(dev_stack, "oscar", "oscar-dev")[1].status_code == 200
    r = requests.post(
        f"{dev_stack.hub}api/users/oscar/tokens",
        headers=dev_stack.admin,
        json={"expires_in": 900, "note": "Server at /user/oscar/", "scopes": SERVER_SCOPES},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return {"JUPYTERHUB_API_TOKEN": r.json()["token"], "BEAMHUB_TOKEN_URL": dev_stack.tokens}


def _server_token(stack: RunningStack, user: str, ttl: int = 60) -> dict:
    """A fresh delegated family for ``user``'s default server, as the hub mints one at spawn."""
    body = {"sub": user, "project": "p-1001", "kind": "server", "server": "", "ttl": ttl}
    r = _post(stack, "api/mint-for", stack.runtime["hub_api_token"], body)
    assert r.status_code == 201, r.text
    return r.json()


# --- finding 5: a narrow token carries only its scopes' power ----------------------------------


def test_admin_scope_only_for_hub_admins_on_request_and_short(
    dev_stack: RunningStack, users: dict
) -> None:
    alice, bob = users["alice"], users["bob"]
    r = _post(dev_stack, "api/tokens", alice, {"project": "p-1001"})
    assert r.status_code == 201 and "admin" not in r.json()["scope"].split()  # never by default
    r = _post(dev_stack, "api/tokens", alice, {"project": "p-1001", "scopes": ["admin"]})
    assert r.status_code == 201, r.text
    claims = _claims(r.json()["token"])
    assert claims["scope"] == "admin" and claims["exp"] - claims["iat"] <= ADMIN_MAX_TTL
    r = _post(dev_stack, "api/tokens", alice, {"project": "p-1001", "scopes": "admin", "ttl": 900})
    assert r.status_code == 400 and str(ADMIN_MAX_TTL) in r.json()["message"]
    r = _post(dev_stack, "api/tokens", bob, {"project": "p-1001", "scopes": ["admin"]})
    assert r.status_code == 403 and r.json()["reason"] == "admin_only"
    # never part of a server's delegated token, whoever asks
    body = {"sub": "alice", "project": "p-1001", "kind": "server", "scopes": ["admin"]}
    r = _post(dev_stack, "api/mint-for", dev_stack.runtime["hub_api_token"], body)
    assert r.status_code == 403 and "never delegated" in r.json()["message"]


def test_a_stream_read_token_of_an_admin_cannot_approve_beamtime(
    dev_stack: RunningStack, users: dict
) -> None:
    """Finding 5's exact repro: alice's stream.read-only token approved a beamtime window."""
    gateway = dev_stack.urls["gateway"] + "api/v1"
    mint = {"project": "p-1001", "scopes": ["reserve", "stream.read"]}
    pi = _post(dev_stack, "api/tokens", users["alice"], mint).json()["token"]
    start = time.time() + 86400 * 30
    request = {
        "start": start,
        "end": start + 3600,
        "justification": "tenancy review: approval needs the admin scope",
    }
    r = requests.post(
        f"{gateway}/projects/p-1001/reservations",
        headers={"Authorization": f"Bearer {pi}"},
        json=request,
        timeout=10,
    )
    assert r.status_code == 201, r.text
    approve = f"{gateway}/reservations/{r.json()['id']}/approve"
    narrow = _post(
        dev_stack, "api/tokens", users["alice"], {"project": "p-1001", "scopes": ["stream.read"]}
    )
    r = requests.post(
        approve, headers={"Authorization": f"Bearer {narrow.json()['token']}"}, json={}, timeout=10
    )
    assert r.status_code == 403 and r.json()["reason"] == "policy", r.text
    r = requests.get(
        dev_stack.urls["gateway"] + "api/v1/whoami",
        headers={"Authorization": f"Bearer {narrow.json()['token']}"},
        timeout=10,
    )
    assert r.json()["roles"] == []
    admin = _post(
        dev_stack, "api/tokens", users["alice"], {"project": "p-1001", "scopes": ["admin"]}
    )
    r = requests.post(
        approve, headers={"Authorization": f"Bearer {admin.json()['token']}"}, json={}, timeout=10
    )
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text


# --- finding 4: refresh rotates; reuse revokes the family ---------------------------------------


def test_a_revoked_child_cannot_be_sidestepped_through_its_parent(
    dev_stack: RunningStack, oscar_server: dict, users: dict
) -> None:
    """Finding 4's exact repro: T1 refreshed into T2, T2 revoked; refreshing T1 must fail."""
    api = oscar_server["JUPYTERHUB_API_TOKEN"]
    t1 = _server_token(dev_stack, "oscar")
    r = _post(dev_stack, "api/refresh", api, {"token": t1["token"]})
    assert r.status_code == 200, r.text
    t2 = r.json()
    oscar = dev_stack.user_api_token("oscar")
    r = _post(dev_stack, "revoke", oscar, {"jti": t2["jti"]})
    assert r.status_code == 200 and r.json()["revoked"] == t2["jti"]
    assert r.json()["family_revoked"] == 1  # T1 went with it
    r = _post(dev_stack, "api/refresh", api, {"token": t1["token"]})
    assert r.status_code == 401 and r.json()["reason"] in ("revoked", "reused"), r.text
    assert {t1["jti"], t2["jti"]} <= _revoked(dev_stack)
    r = _post(dev_stack, "api/refresh", api, {"token": t2["token"]})
    assert r.status_code == 401 and r.json()["reason"] == "revoked"


def test_reusing_a_superseded_token_revokes_its_whole_family(
    dev_stack: RunningStack, oscar_server: dict
) -> None:
    api = oscar_server["JUPYTERHUB_API_TOKEN"]
    t1 = _server_token(dev_stack, "oscar")
    t2 = _post(dev_stack, "api/refresh", api, {"token": t1["token"]}).json()
    t3 = _post(dev_stack, "api/refresh", api, {"token": t2["token"]}).json()
    assert len({t1["jti"], t2["jti"], t3["jti"]}) == 3
    assert not {t1["jti"], t2["jti"], t3["jti"]} & _revoked(dev_stack)
    # someone who kept T2 refreshes it again: a second holder, the family goes
    r = _post(dev_stack, "api/refresh", api, {"token": t2["token"]})
    assert r.status_code == 401 and r.json()["reason"] == "reused", r.text
    assert r.json()["family"] == t1["jti"] and "family" in r.json()["message"]
    assert {t1["jti"], t2["jti"], t3["jti"]} <= _revoked(dev_stack)
    r = _post(dev_stack, "api/refresh", api, {"token": t3["token"]})  # the newest too
    assert r.status_code == 401 and r.json()["reason"] == "revoked"
    gateway = dev_stack.urls["gateway"] + "api/v1/whoami"
    deadline = time.monotonic() + dev_stack.runtime["revocation_poll"] + 3
    while (
        r := requests.get(gateway, headers={"Authorization": f"Bearer {t3['token']}"}, timeout=10)
    ).status_code == 200:
        assert time.monotonic() < deadline, "the gateway still accepts a revoked family"
        time.sleep(0.1)
    assert r.status_code == 401 and r.json()["reason"] == "revoked"


def test_an_expired_token_is_refreshed_within_the_grace_only_by_its_server(
    dev_stack: RunningStack, oscar_server: dict, users: dict
) -> None:
    expired = _server_token(dev_stack, "oscar", ttl=1)
    while time.time() <= expired["exp"] + 1:  # wait for the state: the token has expired
        time.sleep(0.1)
    oscar_own = dev_stack.user_api_token("oscar")  # oscar's personal token, not his server's
    r = _post(dev_stack, "api/refresh", oscar_own, {"token": expired["token"]})
    assert r.status_code == 403 and r.json()["reason"] == "not_holder", r.text
    r = _post(dev_stack, "api/refresh", users["carol"], {"token": expired["token"]})
    assert r.status_code == 403 and r.json()["reason"] == "not_owner"
    r = _post(
        dev_stack, "api/refresh", oscar_server["JUPYTERHUB_API_TOKEN"], {"token": expired["token"]}
    )
    assert r.status_code == 200, r.text
    assert _claims(r.json()["token"])["exp"] > time.time()


def test_refreshers_of_one_server_share_the_newest_token(
    dev_stack: RunningStack, oscar_server: dict, tmp_path
) -> None:
    """Two kernels start from the same env token; rotation must not see them as a reuse."""
    first = _server_token(dev_stack, "oscar", ttl=60)["token"]
    shared = tmp_path / "token.jwt"
    args = (first, oscar_server["BEAMHUB_TOKEN_URL"], oscar_server["JUPYTERHUB_API_TOKEN"])
    one = TokenRefresher(*args, update_env=False, token_file=shared)
    two = TokenRefresher(*args, update_env=False, token_file=shared)
    newer = one.refresh_now()
    assert two.token == newer and two.refreshes == 0  # adopted from the token file
    newest = two.refresh_now()  # refreshes the newest token, not its own first one
    assert newest != newer and one.token == newest
    three = TokenRefresher(*args, update_env=False, token_file=shared)  # a kernel started late
    assert three.token == newest
    assert not {_claims(t)["jti"] for t in (first, newer, newest)} & _revoked(dev_stack)
    alone = TokenRefresher(*args, update_env=False)  # no shared file: T0 again is a reuse
    with pytest.raises(RefreshError) as err:
        alone.refresh_now()
    assert err.value.status == 401 and "family" in str(err.value)


# --- finding 8 (part): introspection only for the owner, services and admins --------------------


def test_introspection_only_for_owner_services_and_admins(
    dev_stack: RunningStack, users: dict
) -> None:
    minted = _post(dev_stack, "api/tokens", users["bob"], {"project": "p-1001"}).json()
    body = {"token": minted["token"]}
    r = _post(dev_stack, "introspect", users["carol"], body)
    assert r.status_code == 403 and r.json()["reason"] == "not_owner"
    for who in (users["bob"], users["alice"], dev_stack.runtime["admin_api_token"]):
        r = _post(dev_stack, "introspect", who, body)
        assert r.status_code == 200 and r.json()["active"] is True and r.json()["sub"] == "bob"
    r = _post(dev_stack, "introspect", users["carol"], {"token": "garbage"})
    assert r.json() == {"active": False, "reason": "malformed"}


# --- finding 6 (part): the token service refuses a huge body from its Content-Length ------------


def test_token_service_refuses_a_100_mb_body_through_the_proxy(
    dev_stack: RunningStack, users: dict
) -> None:
    status, body = declare_and_stream(
        dev_stack.tokens + "api/tokens",
        100 * 1024 * 1024,
        {"Authorization": f"token {users['bob']}"},
    )
    assert status == 413, (status, body[:300])
    assert body["reason"] == "body_too_large"
