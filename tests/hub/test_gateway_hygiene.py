"""Gateway hygiene (finding 6 and part of 8) against a real gateway: failed authentications are
limited per client address (429) and audited in aggregate; huge bodies are a JSON 413 unread;
X-Forwarded-For counts only from a trusted proxy; /metrics is for this host or a metrics token.
The last tests go through `beamhub up`'s real proxy (configurable-http-proxy)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import jsonschema
import pytest
import requests

from beamhub.auth.api import ERROR_SCHEMA
from beamhub.hub.gateway.hygiene import AuthFailureGuard, client_address, parse_networks
from beamhub.hub.gateway.ratelimit import Limit
from tests.hub.gateway_helpers import Keys, call, running_gateway
from tests.hub.http_probe import declare_and_stream
from tests.hub.hubstack import RunningStack, login

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def keys() -> Keys:
    return Keys()


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_client_address_only_through_trusted_proxies() -> None:
    loop = parse_networks(["127.0.0.0/8"])
    assert client_address("127.0.0.1", ["10.1.2.3"], ()) == "127.0.0.1"  # no trusted proxy
    assert client_address("203.0.113.9", ["10.1.2.3"], loop) == "203.0.113.9"  # not a proxy
    assert client_address("127.0.0.1", ["10.1.2.3"], loop) == "10.1.2.3"
    # a remote client's own X-Forwarded-For is left of the address the proxy appended
    assert client_address("127.0.0.1", ["6.6.6.6, 198.51.100.4"], loop) == "198.51.100.4"
    assert client_address("127.0.0.1", ["junk"], loop) == "127.0.0.1"


async def test_failed_authentications_are_limited_per_address_and_audited_once(
    keys: Keys, tmp_path: Path
) -> None:
    guard = AuthFailureGuard(Limit(0.001, 5), interval=3600)
    async with running_gateway(
        keys, tmp_path, auth_failures=guard, trusted_proxies=["127.0.0.1/32"]
    ) as s:
        answers = [await call(s.url, "GET", "/whoami", "bad-token") for _ in range(8)]
        assert [code for code, _, _ in answers] == [401] * 5 + [429] * 3
        code, body, headers = answers[-1]
        jsonschema.validate(body, ERROR_SCHEMA)
        assert body["reason"] == "rate_limited" and body["bucket"] == "address"
        assert int(headers["Retry-After"]) >= 1 and body["retry_after"] > 0
        # a valid token from the same address is not refused for others' failures
        assert (await call(s.url, "GET", "/whoami", keys.token()))[0] == 200
        # another client behind the trusted proxy has its own budget
        other = {"X-Forwarded-For": "198.51.100.7"}
        code, _, _ = await call(s.url, "GET", "/whoami", "bad-token", headers=other)
        assert code == 401
        assert not [r for r in _records(s.audit_path) if r["outcome"] == "deny"]  # not yet
    failed = [r for r in _records(s.audit_path) if r["rule"] == "auth-failures"]
    assert {r["source"]: r["count"] for r in failed} == {"127.0.0.1": 8, "198.51.100.7": 1}
    mine = next(r for r in failed if r["source"] == "127.0.0.1")
    assert "3 of them answered 429" in mine["reason"] and "malformed x8" in mine["reason"]


async def test_one_audit_record_per_address_per_interval(keys: Keys, tmp_path: Path) -> None:
    guard = AuthFailureGuard(Limit(1.0, 100), interval=0.3)
    async with running_gateway(keys, tmp_path, auth_failures=guard) as s:
        for batch in (3, 2):
            seen = len([r for r in _records(s.audit_path) if r["rule"] == "auth-failures"])
            for _ in range(batch):
                assert (await call(s.url, "GET", "/whoami", "bad"))[0] == 401
            deadline = time.monotonic() + 5
            while (
                len(records := [r for r in _records(s.audit_path) if r["rule"] == "auth-failures"])
                == seen
            ):
                assert time.monotonic() < deadline, "no aggregated record within the interval"
                await asyncio.sleep(0.05)
            assert records[-1]["count"] == batch and records[-1]["status"] == 401


async def test_forwarded_address_reaches_policy_only_from_a_trusted_proxy(
    keys: Keys, tmp_path: Path
) -> None:
    admin = keys.token("admin", "ops", "admin")
    far = {"X-Forwarded-For": "8.8.8.8"}
    async with running_gateway(keys, tmp_path / "untrusted") as s:
        code, body, _ = await call(s.url, "POST", "/reservations/1/approve", admin, {}, headers=far)
        assert code == 404  # the forged header is ignored: 127.0.0.1 may approve; no window 1
    async with running_gateway(keys, tmp_path / "trusted", trusted_proxies=["127.0.0.1"]) as s:
        code, body, _ = await call(s.url, "POST", "/reservations/1/approve", admin, {}, headers=far)
        assert code == 403 and "8.8.8.8" in body["decision"]["reason"], body
    assert _records(tmp_path / "trusted" / "audit.jsonl")[-1]["source"] == "8.8.8.8"


async def test_metrics_for_this_host_or_a_metrics_token(keys: Keys, tmp_path: Path) -> None:
    async with running_gateway(keys, tmp_path, trusted_proxies=["127.0.0.1"]) as s:
        base = s.url.replace("/api/v1", "")
        code, text, _ = await call(base, "GET", "/metrics")
        assert code == 200 and b"beamhub_gateway_requests" in text
        remote = {"X-Forwarded-For": "203.0.113.9"}
        code, body, headers = await call(base, "GET", "/metrics", headers=remote)
        assert code == 401 and body["reason"] == "missing" and "WWW-Authenticate" in headers
        code, body, _ = await call(base, "GET", "/metrics", keys.token(), headers=remote)
        assert code == 403 and body["reason"] == "scope" and "'metrics'" in body["message"]
        code, _, _ = await call(
            base, "GET", "/metrics", keys.token(scopes="metrics"), headers=remote
        )
        assert code == 200
    async with running_gateway(keys, tmp_path / "strict", metrics_access="token") as s:
        base = s.url.replace("/api/v1", "")
        assert (await call(base, "GET", "/metrics"))[0] == 401
        assert (await call(base, "GET", "/metrics", keys.token(scopes="metrics")))[0] == 200
        code, body, _ = await call(base, "GET", "/healthz")  # liveness needs no token
        assert code == 200 and body == {"status": "ok", "service": "the gateway"}


async def test_a_100_mb_declared_body_is_a_json_413_unread(keys: Keys, tmp_path: Path) -> None:
    async with running_gateway(keys, tmp_path) as s:
        status, body = await asyncio.to_thread(
            declare_and_stream, s.url + "/projects/p1/channels", 100 << 20
        )
        assert status == 413 and body["reason"] == "body_too_large", body


# --- through `beamhub up`'s proxy -----------------------------------------------------------


@pytest.fixture(scope="module")
def alice(dev_stack: RunningStack) -> str:
    assert login(dev_stack, "alice", "alice-dev")[1].status_code == 200
    return dev_stack.user_api_token("alice")


def _mint(stack: RunningStack, api_token: str, scopes: list[str]) -> str:
    r = requests.post(
        stack.tokens + "api/tokens",
        headers={"Authorization": f"token {api_token}"},
        json={"project": "p-1001", "scopes": scopes},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return r.json()["token"]


def test_the_proxy_forwards_the_real_client_to_policy(dev_stack: RunningStack, alice: str) -> None:
    gateway = dev_stack.urls["gateway"] + "api/v1"
    admin = _mint(dev_stack, alice, ["admin"])
    bearer = {"Authorization": f"Bearer {admin}"}
    r = requests.get(
        gateway + "/whoami", headers={**bearer, "X-Forwarded-For": "10.20.30.40"}, timeout=10
    )
    assert r.status_code == 200 and r.json()["roles"] == ["admin"]
    jti = r.json()["jti"]
    audit = dev_stack.state / "audit.jsonl"
    assert [x["source"] for x in _records(audit) if x["jti"] == jti] == ["10.20.30.40"]
    far = {**bearer, "X-Forwarded-For": "203.0.113.50"}
    r = requests.post(gateway + "/reservations/999999/approve", headers=far, json={}, timeout=10)
    assert r.status_code == 403 and "203.0.113.50" in r.json()["decision"]["reason"], r.text


def test_a_flood_of_bad_tokens_through_the_proxy(dev_stack: RunningStack) -> None:
    gateway = dev_stack.urls["gateway"] + "api/v1/whoami"
    flood = {"Authorization": "Bearer not-a-token", "X-Forwarded-For": "198.51.100.77"}
    codes = [requests.get(gateway, headers=flood, timeout=10) for _ in range(40)]
    assert {r.status_code for r in codes[:20]} == {401}
    limited = [r for r in codes if r.status_code == 429]
    assert len(limited) >= 15, [r.status_code for r in codes]
    jsonschema.validate(limited[-1].json(), ERROR_SCHEMA)
    assert int(limited[-1].headers["Retry-After"]) >= 1
    audit = dev_stack.state / "audit.jsonl"
    per_request = [
        x for x in _records(audit) if x["source"] == "198.51.100.77" and "count" not in x
    ]
    assert per_request == []  # never one record per failed request


def test_huge_bodies_and_metrics_through_the_proxy(dev_stack: RunningStack) -> None:
    gateway = dev_stack.urls["gateway"]
    status, body = declare_and_stream(gateway + "api/v1/projects/p-1001/channels", 100 << 20)
    assert status == 413 and body["reason"] == "body_too_large", (status, str(body)[:300])
    assert requests.get(gateway + "metrics", timeout=10).status_code == 200  # from this host
    r = requests.get(gateway + "metrics", headers={"X-Forwarded-For": "203.0.113.51"}, timeout=10)
    assert r.status_code == 401 and r.json()["reason"] == "missing"
