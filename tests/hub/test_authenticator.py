"""BeamhubAuthenticator's hooks on their own, and refresh against the real dev OpenID provider."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urljoin, urlparse

import pytest
import requests
from tornado import web
from traitlets import TraitError

from beamhub.auth.tokens import TokenVerifier
from beamhub.hub.authenticator import BeamhubAuthenticator, MfaRequired, NoProject
from beamhub.hub.up import totp
from beamhub.hub.up.deployment import UserSpec
from beamhub.hub.up.idp import EmbeddedIdP
from tests.hub.hubstack import RunningStack


def _auth(tmp_path: Path, **kw) -> BeamhubAuthenticator:
    return BeamhubAuthenticator(token_ttl=60, **kw)


def _model(name: str, info: dict) -> dict:
    return {"name": name, "admin": None, "auth_state": {"oauth_user": info}}


async def test_projects_roles_and_mfa_from_claims(tmp_path: Path) -> None:
    auth = _auth(tmp_path, mfa_required=True)
    info = {"projects": {"p-1": "pi", "p-2": "viewer", "p-3": "overlord"}, "amr": ["pwd", "otp"]}
    model = await auth.update_auth_model(_model("ann", info))
    state = model["auth_state"]["beamhub"]
    assert state["projects"] == {"p-1": "pi", "p-2": "viewer"}  # unknown roles are dropped
    assert state["mfa"] is True
    assert [r["name"] for r in model["roles"]] == ["beamhub-pi", "beamhub-viewer"]
    assert await auth.get_user_groups(model["auth_state"]) == {"p-1", "p-1:pi", "p-2", "p-2:viewer"}
    assert await auth.check_allowed("ann", model) is True


@pytest.mark.parametrize(
    ("claims", "mfa"),
    [
        ({"amr": ["pwd"]}, False),
        ({"amr": "pwd otp"}, True),
        ({"amr": ["pwd", "hwk"]}, True),
        ({"acr": "mfa"}, True),
        ({"acr": "pwd"}, False),
        ({}, False),
    ],
)
async def test_mfa_detection(tmp_path: Path, claims: dict, mfa: bool) -> None:
    auth = _auth(tmp_path, mfa_required=True)
    model = await auth.update_auth_model(_model("u", {"projects": {"p": "member"}, **claims}))
    assert model["auth_state"]["beamhub"]["mfa"] is mfa
    if mfa:
        assert await auth.check_allowed("u", model)
    else:
        with pytest.raises(MfaRequired) as err:
            await auth.check_allowed("u", model)
        assert err.value.status_code == 403
        assert "multi-factor" in err.value.jupyterhub_message


async def test_no_project_refused_unless_admin(tmp_path: Path) -> None:
    auth = _auth(tmp_path, admin_users={"root-ish"})
    model = await auth.update_auth_model(_model("nobody", {"projects": "not-a-mapping"}))
    with pytest.raises(NoProject, match="no role in any beamhub project"):
        await auth.check_allowed("nobody", model)
    admin = await auth.update_auth_model(_model("root-ish", {}))
    assert await auth.check_allowed("root-ish", admin) is True


def test_role_scopes_validated(tmp_path: Path) -> None:
    with pytest.raises(TraitError, match="unknown role"):
        _auth(tmp_path, role_scopes={"boss": ["steer"]})


def _spawn_target(model: dict, options: dict | None = None) -> tuple[SimpleNamespace, ...]:
    async def get_auth_state() -> dict:
        return model["auth_state"]

    user = SimpleNamespace(name=model["name"], get_auth_state=get_auth_state)
    spawner = SimpleNamespace(
        user_options=options or {}, name="", environment={}, has_trait=lambda n: False
    )
    return user, spawner


@pytest.mark.timeout(180)
async def test_pre_spawn_start_asks_the_token_service(dev_stack: RunningStack) -> None:
    """The hub's own identity (runtime hub_api_token) asks the real token service for the server's
    token; the hub process never opens the signing key."""
    rt = dev_stack.runtime
    auth = _auth(
        dev_stack.state,
        token_service_url=dev_stack.tokens,
        token_service_api_url=f"http://{rt['ip']}:{rt['services']['tokens']['port']}/services/tokens/",
        token_service_api_token=rt["hub_api_token"],
        dsn_url="http://dsn",
    )
    model = await auth.update_auth_model(
        _model("ann", {"projects": {"p-1001": "member", "p-2002": "pi"}})
    )
    user, spawner = _spawn_target(model)
    await auth.pre_spawn_start(user, spawner)
    env = spawner.environment
    assert env["BEAMHUB_PROJECT"] == "p-2002"  # the strongest role wins without user_options
    jwks = requests.get(dev_stack.tokens + "jwks.json", timeout=10).json()
    claims = TokenVerifier(jwks).verify(env["BEAMHUB_TOKEN"], project="p-2002", scope="steer")
    assert claims.sub == "ann" and claims.exp - claims.iat == 60  # token_ttl
    introspect = requests.post(
        dev_stack.tokens + "introspect",
        headers={"Authorization": f"token {rt['hub_api_token']}"},
        json={"token": env["BEAMHUB_TOKEN"]},
        timeout=10,
    )
    assert introspect.json()["kind"] == "server"  # recorded, refreshable by ann's server
    _, spawner = _spawn_target(model, {"project": "p-0"})
    with pytest.raises(Exception, match="no role in project 'p-0'"):
        await auth.pre_spawn_start(user, spawner)


async def test_pre_spawn_start_without_a_token_service_fails_clearly(tmp_path: Path) -> None:
    auth = _auth(tmp_path, token_service_url="http://127.0.0.1:9/services/tokens/")
    model = await auth.update_auth_model(_model("ann", {"projects": {"p-1": "member"}}))
    user, spawner = _spawn_target(model)
    with pytest.raises(web.HTTPError, match="token_service_api_token must be set"):
        await auth.pre_spawn_start(user, spawner)
    auth.token_service_api_token = "not-a-real-token"
    with pytest.raises(web.HTTPError) as err:
        await auth.pre_spawn_start(user, spawner)
    assert err.value.status_code == 503
    assert "cannot reach the token service at http://127.0.0.1:9/" in err.value.log_message
    assert "BEAMHUB_TOKEN" not in spawner.environment


@pytest.mark.timeout(60)
async def test_refresh_user_uses_the_refresh_token_at_the_real_idp(tmp_path: Path) -> None:
    users = [UserSpec("ann", "ann-pw", amr=["pwd", "otp"], projects={"p-1": "operator"})]
    redirect = "http://127.0.0.1:9/hub/oauth_callback"
    secret = totp.new_secret()
    idp = EmbeddedIdP(
        users, "hub", "s3cret", [redirect], tmp_path, require_otp=True, totp_secrets={"ann": secret}
    )
    await asyncio.to_thread(idp.start)
    try:
        ep = idp.endpoints()
        auth = _auth(
            tmp_path, client_id="hub", client_secret="s3cret", oauth_callback_url=redirect, **ep
        )
        # the authorization-code flow by hand (browserless), then the hub's own code exchange
        s = requests.Session()
        r = s.get(
            ep["authorize_url"],
            params={
                "client_id": "hub",
                "response_type": "code",
                "scope": "openid profile email projects",
                "redirect_uri": redirect,
            },
            timeout=10,
        )
        action = urljoin(r.url, re.search(r'action="([^"]+)"', r.text).group(1))
        r = s.post(
            action, data={"prompt": "login", "login": "ann", "password": "ann-pw"}, timeout=10
        )
        action = urljoin(r.url, re.search(r'action="([^"]+)"', r.text).group(1))
        r = s.post(action, data={"prompt": "otp", "code": totp.code(secret)}, timeout=10)
        action = urljoin(r.url, re.search(r'action="([^"]+)"', r.text).group(1))
        r = s.post(action, data={"prompt": "consent"}, allow_redirects=False, timeout=10)
        while not r.headers["location"].startswith(redirect):
            r = s.get(urljoin(r.url, r.headers["location"]), allow_redirects=False, timeout=10)
        code = parse_qs(urlparse(r.headers["location"]).query)["code"][0]
        params = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect}
        if not auth.basic_auth:  # as oauthenticator's build_access_tokens_request_params does
            params.update(client_id="hub", client_secret="s3cret")
        token_info = await auth.get_token_info(None, params)
        model = await auth._token_to_auth_model(token_info)
        assert model["name"] == "ann" and model["auth_state"]["beamhub"]["mfa"] is True
        state = model["auth_state"]
        state["token_response"]["access_token"] = "no-longer-valid"  # as if it had expired

        async def get_auth_state() -> dict:
            return state

        user = SimpleNamespace(name="ann", get_auth_state=get_auth_state)
        refreshed = await auth.refresh_user(user)
        assert isinstance(refreshed, dict), "refresh_user must renew with the refresh token"
        new_state = refreshed["auth_state"]
        assert new_state["access_token"] not in ("no-longer-valid", state["access_token"])
        assert new_state["beamhub"]["projects"] == {"p-1": "operator"}
    finally:
        await asyncio.to_thread(idp.stop)
