"""DSN control-plane security over real HTTP: bad tokens and out-of-template requests are refused
with 401/403 (or 400) and a reason, and nothing is provisioned in either plane."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import numpy as np
import pytest
import zmq
from tornado.httpclient import AsyncHTTPClient

from beamhub.streaming.template import TEMPLATE_DIR, Template
from beamhub.streaming.wire import FrameHeader, recv_frame, send_frame
from tests.streaming.dsn_helpers import (
    Tokens,
    api,
    assert_nothing_provisioned,
    register,
    running_dsn,
    secure,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)
BODY = {"stream": "det", "mode": "l7", "hwm": 16}


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


BAD_TOKENS = [
    # (case, how to make the token, status, reason)
    ("no token", lambda t: None, 401, "missing"),
    ("not a JWT", lambda t: "not-a-jwt", 401, "malformed"),
    ("expired", lambda t: t.expired(), 401, "expired"),
    ("forged signature (other key, same kid)", lambda t: t.forged(), 401, "signature"),
    ("tampered payload", lambda t: t.tampered(), 401, "signature"),
    ("unknown key", lambda t: Tokens().issue(), 401, "unknown_key"),
    ("wrong audience", lambda t: t.issue(audience="another-service"), 401, "audience"),
    ("missing scope", lambda t: t.issue(scopes="stream.read steer"), 403, "scope"),
]


@pytest.mark.parametrize(
    ("case", "make", "status", "reason"), BAD_TOKENS, ids=[c[0] for c in BAD_TOKENS]
)
async def test_bad_token_refused_and_nothing_provisioned(
    tokens: Tokens, case: str, make, status: int, reason: str
) -> None:
    async with running_dsn(tokens) as node:
        token = make(tokens)
        code, body = await api(node.url, "POST", "/api/channels", token, BODY)
        assert (code, body["reason"]) == (status, reason), body
        if status == 401:  # RFC 6750 challenge
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            resp = await AsyncHTTPClient().fetch(
                node.url + "/api/channels", headers=headers, raise_error=False
            )
            why = "" if token is None else ', error="invalid_token"'
            assert resp.headers["WWW-Authenticate"] == f'Bearer realm="beamhub-dsn"{why}'
        assert body["message"]
        assert_nothing_provisioned(node)
        code, health = await api(node.url, "GET", "/api/health")
        assert (code, health["status"], health["channels"]) == (200, "ok", 0)


async def test_bad_tokens_refused_on_every_route(tokens: Tokens) -> None:
    """Reading, renewing, deleting and steering all need a valid token too."""
    async with running_dsn(tokens) as node:
        code, made = await api(node.url, "POST", "/api/channels", tokens.issue(), BODY)
        assert code == 201
        cid = made["id"]
        routes = [
            ("GET", "/api/channels"),
            ("GET", f"/api/channels/{cid}"),
            ("POST", f"/api/channels/{cid}/renew"),
            ("DELETE", f"/api/channels/{cid}"),
            ("GET", f"/api/channels/{cid}/steer/params"),
            ("GET", "/api/template"),
        ]
        for method, path in routes:
            for token in (None, tokens.expired(), tokens.forged()):
                code, body = await api(node.url, method, path, token)
                assert code == 401, (method, path, body)
        assert list(node.channels) == [cid] and node.data_plane.channels() == [cid]


async def test_other_project_cannot_see_or_touch_a_channel(tokens: Tokens) -> None:
    async with running_dsn(tokens) as node:
        code, made = await api(node.url, "POST", "/api/channels", tokens.issue("p1"), BODY)
        assert code == 201 and made["project"] == "p1"
        cid = made["id"]
        other = tokens.issue("p2", "stream.read stream.publish steer")
        for method, path in [
            ("GET", f"/api/channels/{cid}"),
            ("POST", f"/api/channels/{cid}/renew"),
            ("DELETE", f"/api/channels/{cid}"),
            ("PUT", f"/api/channels/{cid}/steer/params/rate_hz"),
        ]:
            code, body = await api(node.url, method, path, other, {"value": 1})
            assert (code, body["reason"]) == (403, "project"), (method, body)
        code, listing = await api(node.url, "GET", "/api/channels", other)
        assert (code, listing) == (200, {"channels": []})
        assert node.data_plane.channels() == [cid]
        assert node.channels[cid].expires_at == made["expires_at"]  # the renew did nothing


async def test_missing_scope_on_reads_and_deletes(tokens: Tokens) -> None:
    async with running_dsn(tokens) as node:
        code, made = await api(node.url, "POST", "/api/channels", tokens.issue(), BODY)
        cid = made["id"]
        publish_only = tokens.issue("p1", "stream.publish")
        read_only = tokens.issue("p1", "stream.read")
        assert (await api(node.url, "GET", f"/api/channels/{cid}", publish_only))[0] == 403
        assert (await api(node.url, "GET", "/api/channels", publish_only))[0] == 403
        code, body = await api(node.url, "DELETE", f"/api/channels/{cid}", read_only)
        assert (code, body["reason"]) == (403, "scope")
        assert node.data_plane.channels() == [cid]


@pytest.mark.parametrize(
    ("change", "status", "field", "limit"),
    [
        ({"hwm": 0}, 400, "hwm", {"min": 1, "max": 10000}),
        ({"max_frame_bytes": 1 << 30}, 400, "max_frame_bytes", 1 << 26),
        ({"max_rate_hz": 1e6}, 400, "max_rate_hz", 10000.0),
        ({"source_cidrs": ["10.0.0.0/8"]}, 403, "source_cidrs", ["127.0.0.0/8"]),
        ({"consumer_cidrs": ["0.0.0.0/0"]}, 403, "consumer_cidrs", ["127.0.0.0/8"]),
        ({"mode": "l5"}, 400, "mode", ["l4", "l7"]),
        ({"ttl": 10**9}, 400, "ttl", 86400),
        ({"shm_segment": "x"}, 400, "shm_segment", None),
    ],
)
async def test_out_of_template_refused_by_name(
    tokens: Tokens, change: dict, status: int, field: str, limit
) -> None:
    async with running_dsn(tokens) as node:
        code, body = await api(
            node.url, "POST", "/api/channels", tokens.issue(), {**BODY, **change}
        )
        assert (code, body["field"]) == (status, field), body
        if limit is not None:
            assert body["limit"] == limit
        assert field in body["message"]
        assert_nothing_provisioned(node)


async def test_moderate_template_requires_encryption_and_l7(tokens: Tokens) -> None:
    moderate = Template.load(TEMPLATE_DIR / "moderate.yaml")
    key = zmq.curve_keypair()[0].decode()
    async with running_dsn(tokens, moderate) as node:
        token = tokens.issue()
        code, body = await api(
            node.url, "POST", "/api/channels", token, {"stream": "det", "encryption": False}
        )
        assert (code, body["reason"], body["field"]) == (403, "encryption_required", "encryption")
        code, body = await api(node.url, "POST", "/api/channels", token, {"stream": "det"})
        assert (code, body["field"]) == (403, "producer_keys")
        code, body = await api(
            node.url,
            "POST",
            "/api/channels",
            token,
            {"stream": "det", "mode": "l4", "producer_keys": [key], "consumer_keys": [key]},
        )
        assert (code, body["field"], body["limit"]) == (403, "mode", ["l7"])
        assert_nothing_provisioned(node)
        code, made = await api(
            node.url,
            "POST",
            "/api/channels",
            token,
            {"stream": "det", "producer_keys": [key], "consumer_keys": [key]},
        )
        assert code == 201, made
        assert made["params"]["encryption"] is True and made["endpoints"]["server_key"]


async def test_malformed_body_and_channel_count(tokens: Tokens) -> None:
    small = Template.from_mapping(
        {
            **Template.load().describe(),
            "max_channels_per_project": 2,
            "max_channels_per_user": 2,  # the project's bound is tested here, not the user's
            "manager_reserve": 0,
            "hwm": {"min": 1, "max": 100, "default": 10},
            "max_frame_bytes": {"max": 1 << 20, "default": 1 << 20},
        }
    )
    async with running_dsn(tokens, small) as node:
        token = tokens.issue()
        code, body = await api(node.url, "POST", "/api/channels", token, raw=b"{not json")
        assert (code, body["reason"]) == (400, "malformed_json")
        code, body = await api(
            node.url, "POST", "/api/channels", token, raw=b"[" * 3000 + b"]" * 3000
        )
        assert (code, body["reason"]) == (400, "malformed_json")
        code, body = await api(node.url, "POST", "/api/channels", token, ["det"])
        assert code == 400
        assert_nothing_provisioned(node)
        for _ in range(2):
            assert (await api(node.url, "POST", "/api/channels", token, {"stream": "d"}))[0] == 201
        code, body = await api(node.url, "POST", "/api/channels", token, {"stream": "d"})
        assert (code, body["reason"], body["limit"]) == (403, "max_channels", 2)
        assert len(node.data_plane.channels()) == 2
        other = tokens.issue("p2")  # the bound is per project
        assert (await api(node.url, "POST", "/api/channels", other, {"stream": "d"}))[0] == 201


async def test_logs_name_the_jti_never_the_token(tokens: Tokens, caplog) -> None:
    caplog.set_level(logging.INFO, logger="beamhub.dsn")
    token = tokens.issue()
    refused = tokens.issue(scopes="stream.read")
    async with running_dsn(tokens) as node:
        code, made = await api(node.url, "POST", "/api/channels", token, BODY)
        assert code == 201
        assert (await api(node.url, "POST", "/api/channels", refused, BODY))[0] == 403
        assert (await api(node.url, "DELETE", f"/api/channels/{made['id']}", token))[0] == 204
    text = "\n".join(r.getMessage() for r in caplog.records)
    verified = tokens.verifier.verify(token)
    assert '"event": "channel.created"' in text and '"event": "channel.deleted"' in text
    assert verified.jti in text and '"project": "p1"' in text and '"user": "alice"' in text
    assert '"reason": "scope"' in text
    for secret in (token, refused, token.split(".")[2], refused.split(".")[2]):
        assert secret not in text


async def test_source_outside_allowlist_cannot_reach_the_data_plane(tokens: Tokens) -> None:
    """A channel for producers on 127.0.0.2 only: a producer from 127.0.0.1 gets nothing through,
    one bound to 127.0.0.2 does (ZeroMQ's 'tcp://SOURCE:0;DEST' picks the source address)."""
    async with running_dsn(tokens) as node:
        code, made = await api(
            node.url,
            "POST",
            "/api/channels",
            tokens.issue(),
            {**BODY, "source_cidrs": ["127.0.0.2/32"]},
        )
        assert code == 201, made
        cid, producer = made["id"], made["endpoints"]["producer"]
        dest = producer.removeprefix("tcp://")
        # both hold a registered key: only the address tells them apart
        key = await register(node.url, cid, tokens.issue(), "producer")
        reader = await register(node.url, cid, tokens.issue(), "consumer", "reader")
        ctx = zmq.Context()
        try:
            work = secure(ctx.socket(zmq.PULL), reader)  # a consumer, so the gateway forwards
            work.setsockopt(zmq.LINGER, 0)
            work.connect(made["endpoints"]["work"])
            outsider = secure(ctx.socket(zmq.PUSH), key)
            outsider.setsockopt(zmq.LINGER, 0)
            outsider.connect(f"tcp://127.0.0.1:0;{dest}")
            for seq in range(5):
                with contextlib.suppress(zmq.Again):  # no peer ever attaches: would block
                    send_frame(
                        outsider,
                        FrameHeader("det", seq, "<u1", (8,)),
                        np.zeros(8, "u1"),
                        flags=zmq.NOBLOCK,
                    )
            insider = secure(ctx.socket(zmq.PUSH), key)
            insider.setsockopt(zmq.LINGER, 0)
            insider.connect(f"tcp://127.0.0.2:0;{dest}")
            # the outsider's handshake is refused by ZAP: it is counted and nothing arrives
            stats = await wait_until(
                lambda: (
                    (s := node.data_plane.stats(cid))["refused_connections"]["producer"] > 0 and s
                )
            )
            assert stats["messages"] == 0
            for seq in range(5):
                send_frame(insider, FrameHeader("det", seq, "<u1", (8,)), np.zeros(8, "u1"))
            stats = await wait_until(
                lambda: (s := node.data_plane.stats(cid))["messages"] >= 5 and s
            )
            assert stats["messages"] == 5
            got = []
            while len(got) < 6 and await asyncio.to_thread(work.poll, 500):
                got.append(recv_frame(work).header.seq)
            assert got == [0, 1, 2, 3, 4]  # the insider's frames, and nothing from the outsider
        finally:
            ctx.destroy(linger=0)
