"""The reverse (steering) channel through the DSN, against a real simulated detector and its real
control endpoint (streaming.source_control): only `steer` tokens of the channel's project steer;
the source's answer (rev, first_seq) passes through and later frames carry the new revision."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import ClassVar

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
import zmq

from beamhub.auth.tokens import TokenError, TokenVerifier
from beamhub.streaming.controlplane import RELAY_ISSUER
from beamhub.streaming.simulator import SimulatedDetector
from beamhub.streaming.source import CurveKeys, SourceRunner
from beamhub.streaming.source_control import SourceControlServer
from beamhub.streaming.wire import recv_frame
from tests.streaming.dsn_helpers import Tokens, api, free_port, register, running_dsn, secure

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


@contextlib.asynccontextmanager
async def detector_on_channel(node, tokens: Tokens):
    """A channel, a simulated detector streaming into it, its control endpoint attached, and a
    work consumer; yields (channel id, runner, work socket)."""
    publish = tokens.issue("p1", "stream.read stream.publish")
    code, made = await api(node.url, "POST", "/api/channels", publish, {"stream": "det"})
    assert code == 201, made
    cid = made["id"]
    producer = await register(node.url, cid, publish, "producer")
    runner = SourceRunner(
        SimulatedDetector((64, 64), seed=3, rate_hz=100.0),
        stream="det",
        connect=made["endpoints"]["producer"],
        curve=CurveKeys(producer["public"], producer["secret"], producer["server_key"].encode()),
    )
    control = SourceControlServer(
        runner, verifier=tokens.verifier, project="p1", relay_jwks=f"{node.url}/api/relay-jwks"
    )
    ctx = zmq.Context()
    work = secure(ctx.socket(zmq.PULL), await register(node.url, cid, publish, "consumer", "w"))
    work.setsockopt(zmq.LINGER, 0)
    work.connect(made["endpoints"]["work"])
    try:
        runner.start()
        runner.start_run()
        url = await control.start()
        attach = tokens.issue("p1", "stream.read stream.publish steer")  # only steerers may
        code, body = await api(
            node.url, "PUT", f"/api/channels/{cid}/source_control", attach, {"source_control": url}
        )
        assert code == 200, body
        yield cid, runner, work
    finally:
        await control.stop()
        runner.stop()
        ctx.destroy(linger=0)


def frames_until(work: zmq.Socket, seq: int, timeout_ms: int = 5000) -> list:
    """Receive frames until one with sequence number >= seq arrives (runs on a thread)."""
    out = []
    while not out or out[-1].header.seq < seq:
        if not work.poll(timeout_ms):
            raise AssertionError(f"no frame with seq >= {seq}; got {[f.header.seq for f in out]}")
        out.append(recv_frame(work))
    return out


async def test_steer_token_steers_and_answer_passes_through(tokens: Tokens, caplog) -> None:
    caplog.set_level(logging.INFO, logger="beamhub.dsn")
    steer = tokens.issue("p1", "stream.read steer")
    async with (
        running_dsn(tokens) as node,
        detector_on_channel(node, tokens) as (cid, runner, work),
    ):
        base = f"/api/channels/{cid}/steer"
        code, schema = await api(node.url, "GET", f"{base}/schema", tokens.issue("p1"))
        assert code == 200
        assert {"rate_hz", "hit_fraction", "detector_distance_mm"} <= {
            p["name"] for p in schema["params"]
        }
        code, params = await api(node.url, "GET", f"{base}/params", tokens.issue("p1"))
        assert code == 200 and params["values"]["hit_fraction"] == 0.3 and params["rev"] == 0

        code, answer = await api(
            node.url, "PUT", f"{base}/params/hit_fraction", steer, {"value": 0.8}
        )
        assert code == 200, answer
        assert (answer["name"], answer["value"], answer["rev"]) == ("hit_fraction", 0.8, 1)
        assert answer["first_seq"] >= 0
        assert runner.status()["values"]["hit_fraction"] == 0.8  # the source itself changed
        frames = await asyncio.to_thread(frames_until, work, answer["first_seq"] + 2)
        for frame in frames:
            assert frame.header.rev == (1 if frame.header.seq >= answer["first_seq"] else 0)

        code, refused = await api(node.url, "PUT", f"{base}/params/rate_hz", steer, {"value": 1e6})
        assert (code, refused["field"]) == (400, "rate_hz"), refused
        source_url = node.channels[cid].params.source_control  # the source's own answer, direct
        assert await api(source_url, "PUT", "/params/rate_hz", steer, {"value": 1e6}) == (
            400,
            refused,
        )
        assert "1000" in str(refused["limit"])
        code, run = await api(node.url, "POST", f"{base}/run", steer, {"action": "stop"})
        assert (code, run["running"]) == (200, False) and runner.status()["running"] is False
        # the source's change log says what changed and who asked (the relay credential's sub),
        # refused changes left out: live views mark these on their time plots
        code, params = await api(node.url, "GET", f"{base}/params", tokens.issue("p1"))
        assert code == 200
        logged = [
            (c["kind"], c.get("name"), c.get("value"), c["by"], c["rev"]) for c in params["changes"]
        ]
        assert logged == [
            ("run_start", None, None, "", 0),  # the test's own runner.start_run(): no caller
            ("param", "hit_fraction", 0.8, "alice", 1),
            ("run_stop", None, None, "alice", 1),
        ], logged
        assert params["changes"][1]["first_seq"] == answer["first_seq"]

    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "beamhub.dsn.audit")
    claims = tokens.verifier.verify(steer)
    assert '"event": "steer"' in text and '"action": "params/hit_fraction"' in text
    assert f'"jti": "{claims.jti}"' in text and '"user": "alice"' in text
    assert '"rev": 1' in text and '"action": "run"' in text
    assert steer not in text and steer.split(".")[2] not in text


async def test_steering_refused_without_scope_or_for_another_project(tokens: Tokens) -> None:
    async with running_dsn(tokens) as node, detector_on_channel(node, tokens) as (cid, runner, _):
        base = f"/api/channels/{cid}/steer"
        cases = [
            (tokens.issue("p1", "stream.read stream.publish"), 403, "scope"),
            (tokens.issue("p2", "stream.read steer"), 403, "project"),
            (tokens.forged("p1", "steer"), 401, "signature"),
            (tokens.expired("p1", "steer"), 401, "expired"),
            (None, 401, "missing"),
        ]
        for token, status, reason in cases:
            code, body = await api(
                node.url, "PUT", f"{base}/params/hit_fraction", token, {"value": 0.9}
            )
            assert (code, body["reason"]) == (status, reason), body
            code, body = await api(node.url, "POST", f"{base}/run", token, {"action": "stop"})
            assert (code, body["reason"]) == (status, reason), body
        code, body = await api(node.url, "GET", f"{base}/params", tokens.issue("p2"))
        assert (code, body["reason"]) == (403, "project")
        status = runner.status()
        assert status["rev"] == 0 and status["values"]["hit_fraction"] == 0.3 and status["running"]


async def test_dead_or_missing_source_control(tokens: Tokens) -> None:
    steer = tokens.issue("p1", "stream.read stream.publish steer")
    async with running_dsn(tokens) as node:
        dead = f"http://127.0.0.1:{free_port()}"
        code, made = await api(
            node.url, "POST", "/api/channels", steer, {"stream": "det", "source_control": dead}
        )
        assert code == 201, made
        base = f"/api/channels/{made['id']}/steer"
        code, body = await api(node.url, "PUT", f"{base}/params/rate_hz", steer, {"value": 5})
        assert (code, body["reason"]) == (502, "source_unreachable"), body
        assert dead in body["message"]
        code, body = await api(node.url, "GET", f"{base}/schema", steer)
        assert code == 502
        code, made = await api(node.url, "POST", "/api/channels", steer, {"stream": "det"})
        code, body = await api(node.url, "GET", f"/api/channels/{made['id']}/steer/params", steer)
        assert (code, body["reason"]) == (409, "no_source_control")
        code, body = await api(
            node.url,
            "PUT",
            f"/api/channels/{made['id']}/steer/params/x%2F..%2Fadmin",
            steer,
            {"value": 1},
        )
        assert code == 404


class _Listener(tornado.web.RequestHandler):
    """A source's control endpoint that only records what the DSN sends it."""

    seen: ClassVar[list[str]] = []

    def put(self, name: str) -> None:
        self.seen.append(self.request.headers.get("Authorization", ""))
        self.write({"name": name, "value": 1, "rev": 1, "first_seq": 0})


async def test_relay_presents_a_credential_it_minted_never_the_callers_token(
    tokens: Tokens,
) -> None:
    """Audience that source, scope steer, <= 60 s, naming the caller; signed by the DSN's own key
    (published at /api/relay-jwks), which the hub's verifier does not know."""
    app = tornado.web.Application([(r"/params/([^/]+)", _Listener)])
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    steer = tokens.issue("p1", "stream.read stream.publish steer", sub="pia")
    try:
        async with running_dsn(tokens) as node:
            code, made = await api(
                node.url, "POST", "/api/channels", steer, {"stream": "det", "source_control": url}
            )
            assert code == 201, made
            code, answer = await api(
                node.url, "PUT", f"/api/channels/{made['id']}/steer/params/x", steer, {"value": 1}
            )
            assert (code, answer["rev"]) == (200, 1), answer
            code, jwks = await api(node.url, "GET", "/api/relay-jwks")
            assert code == 200 and jwks["keys"][0]["alg"] == "ES256"
    finally:
        server.stop()
    (header,) = _Listener.seen
    credential = header.removeprefix("Bearer ")
    assert credential != steer and steer.split(".")[2] not in header
    claims = TokenVerifier(jwks, issuer=RELAY_ISSUER, audience=url).verify(
        credential, project="p1", scope="steer"
    )
    assert claims.sub == "pia" and claims.scopes == {"steer"}
    assert claims.exp - claims.iat <= 60
    with pytest.raises(TokenError) as info:  # the hub's keys do not sign it: no project power
        tokens.verifier.verify(credential)
    assert info.value.reason == "unknown_key"
    with pytest.raises(TokenError) as info:  # and it is for that source only
        TokenVerifier(jwks, issuer=RELAY_ISSUER, audience="http://127.0.0.1:1").verify(credential)
    assert info.value.reason == "audience"


async def test_source_refuses_a_relay_credential_for_another_source(tokens: Tokens) -> None:
    async with running_dsn(tokens) as node, detector_on_channel(node, tokens) as (cid, runner, _):
        other = node.channels[cid]
        forged_for = dataclasses.replace(other.params, source_control="http://127.0.0.1:1")
        claims = tokens.verifier.verify(tokens.issue("p1", "steer", sub="pia"))
        elsewhere = node.relay_credential(
            dataclasses.replace(other, params=forged_for), claims, "steer"
        )
        code, body = await api(
            other.params.source_control, "PUT", "/params/hit_fraction", elsewhere, {"value": 0.9}
        )
        assert (code, body["reason"]) == (401, "audience"), body
        assert runner.status()["rev"] == 0
