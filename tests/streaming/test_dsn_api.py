"""DSN control API over real HTTP with the real data plane: create → inspect (live stats while
frames flow) → renew → delete; defaults from the template; expiry reaps the data path too."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import jsonschema
import numpy as np
import pytest
import zmq
from tornado.httpclient import AsyncHTTPClient

from beamhub.auth.api import ERROR_SCHEMA
from beamhub.streaming.wire import FrameHeader, send_frame
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


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def send(sock: zmq.Socket, seqs, n: int = 1024) -> None:
    for seq in seqs:
        send_frame(
            sock,
            FrameHeader("det", seq, "<f4", (n,), t_ns=time.time_ns()),
            np.full(n, seq, dtype="<f4"),
        )


@pytest.mark.parametrize("mode", ["l4", "l7"])
async def test_create_inspect_renew_delete(tokens: Tokens, zctx: zmq.Context, mode: str) -> None:
    token = tokens.issue(ttl=600)
    async with running_dsn(tokens) as node:
        code, made = await api(
            node.url,
            "POST",
            "/api/channels",
            token,
            {"stream": "det", "mode": mode, "hwm": 32, "ttl": 300},
        )
        assert code == 201, made
        cid = made["id"]
        assert (made["project"], made["stream"], made["mode"]) == ("p1", "det", mode)
        assert made["params"]["hwm"] == 32
        assert made["params"]["max_frame_bytes"] == 64 * 1024 * 1024  # the template's default
        assert made["params"]["source_cidrs"] == ["127.0.0.0/8"]
        assert made["expires_at"] <= time.time() + 300
        eps = made["endpoints"]
        assert eps["producer"].startswith("tcp://127.0.0.1:") and eps["work"] != eps["producer"]
        assert node.data_plane.channels() == [cid]

        code, listing = await api(node.url, "GET", "/api/channels", token)
        assert code == 200 and [c["id"] for c in listing["channels"]] == [cid]

        work = secure(zctx.socket(zmq.PULL), await register(node.url, cid, token, "consumer", "w"))
        work.connect(eps["work"])
        producer = secure(zctx.socket(zmq.PUSH), await register(node.url, cid, token, "producer"))
        producer.connect(eps["producer"])
        send(producer, range(5))

        async def stats(at_least: int) -> dict | None:
            code, body = await api(node.url, "GET", f"/api/channels/{cid}", token)
            assert code == 200
            return body if body["stats"]["messages"] >= at_least else None

        first = await wait_until(lambda: stats(5))
        assert first["stats"]["messages"] == 5
        assert first["stats"]["bytes"] >= 5 * 4096
        assert 0 < first["expires_in"] <= 300
        send(producer, range(5, 10))
        second = await wait_until(lambda: stats(10))
        assert second["stats"]["messages"] == 10
        assert second["stats"]["bytes"] >= 2 * first["stats"]["bytes"]
        assert "drops" in second["stats"] and "consumers" in second["stats"]
        got = [
            np.frombuffer(work.recv_multipart()[1], "<f4")[0] for _ in range(10) if work.poll(5000)
        ]
        assert got == list(range(10))

        renewer = tokens.issue(ttl=1200)
        code, renewed = await api(
            node.url, "POST", f"/api/channels/{cid}/renew", renewer, {"ttl": 900}
        )
        assert code == 200, renewed
        assert renewed["expires_at"] > made["expires_at"]
        assert renewed["expires_at"] <= time.time() + 900
        assert renewed["expires_at"] <= tokens.verifier.verify(renewer).exp

        code, body = await api(node.url, "DELETE", f"/api/channels/{cid}", token)
        assert (code, body) == (204, None)
        assert_nothing_provisioned(node)
        with pytest.raises(KeyError):
            node.data_plane.stats(cid)
        code, body = await api(node.url, "GET", f"/api/channels/{cid}", token)
        assert (code, body["reason"]) == (404, "not_found")
        code, body = await api(node.url, "DELETE", f"/api/channels/{cid}", token)
        assert code == 404


async def test_channel_lives_no_longer_than_its_token(tokens: Tokens) -> None:
    short = tokens.issue(ttl=30)
    async with running_dsn(tokens) as node:
        code, made = await api(node.url, "POST", "/api/channels", short, {"stream": "det"})
        assert code == 201
        exp = tokens.verifier.verify(short).exp
        assert made["expires_at"] == exp  # the template allows a day; the token only 30 s
        # renewing never goes beyond the renewing token's own expiry ...
        longer = tokens.issue(ttl=120)
        code, body = await api(node.url, "POST", f"/api/channels/{made['id']}/renew", longer)
        assert code == 200 and body["expires_at"] == tokens.verifier.verify(longer).exp
        # ... and a renewal with a shorter-lived token does not cut the lifetime short
        code, again = await api(node.url, "POST", f"/api/channels/{made['id']}/renew", short)
        assert code == 200 and again["expires_at"] == body["expires_at"]
        code, bad = await api(
            node.url, "POST", f"/api/channels/{made['id']}/renew", longer, {"ttl": 0}
        )
        assert (code, bad["field"], bad["limit"]) == (400, "ttl", 86400)


async def test_expired_channels_are_reaped_with_their_data_path(tokens: Tokens, caplog) -> None:
    caplog.set_level(logging.INFO, logger="beamhub.dsn")
    async with running_dsn(tokens, reap_interval=0.1) as node:
        by_token = tokens.issue(ttl=2)  # the token runs out first
        by_ttl = tokens.issue(ttl=600)  # the requested ttl runs out first
        keep = tokens.issue("p2", ttl=600)
        a = (await api(node.url, "POST", "/api/channels", by_token, {"stream": "a"}))[1]["id"]
        b = (await api(node.url, "POST", "/api/channels", by_ttl, {"stream": "b", "ttl": 1}))[1][
            "id"
        ]
        c = (await api(node.url, "POST", "/api/channels", keep, {"stream": "c"}))[1]["id"]
        assert sorted(node.data_plane.channels()) == sorted([a, b, c])
        await wait_until(lambda: node.data_plane.channels() == [c], timeout=10)
        assert list(node.channels) == [c]
        code, health = await api(node.url, "GET", "/api/health")
        assert (code, health["status"], health["channels"]) == (200, "ok", 1)
        assert health["failed_channels"] == 0 and health["boot_id"] == node.boot_id
        assert (await api(node.url, "GET", f"/api/channels/{b}", by_ttl))[0] == 404
    expired = [r.getMessage() for r in caplog.records if '"channel.expired"' in r.getMessage()]
    assert len(expired) == 2 and any(a in m for m in expired) and any(b in m for m in expired)


async def test_source_control_can_be_attached_later(tokens: Tokens) -> None:
    token = tokens.issue(scopes="stream.read stream.publish steer")
    async with running_dsn(tokens) as node:
        code, made = await api(
            node.url,
            "POST",
            "/api/channels",
            token,
            {"stream": "det", "source_cidrs": ["127.0.0.0/24"]},
        )
        cid = made["id"]
        assert made["params"]["source_control"] is None
        path = f"/api/channels/{cid}/source_control"
        code, body = await api(
            node.url, "PUT", path, token, {"source_control": "http://127.0.0.1:8200"}
        )
        assert (code, body["params"]["source_control"]) == (200, "http://127.0.0.1:8200")
        code, body = await api(
            node.url, "PUT", path, token, {"source_control": "http://127.0.1.5:8200"}
        )
        assert (code, body["field"], body["limit"]) == (403, "source_control", ["127.0.0.0/24"])
        code, body = await api(
            node.url,
            "PUT",
            path,
            tokens.issue(scopes="stream.read"),
            {"source_control": "http://127.0.0.2:1"},
        )
        assert code == 403
        # a member (publish, no steer) cannot redirect steering to a listener of her own: the
        # relay would hand her every steering caller's token
        member = tokens.issue(scopes="stream.read stream.publish")
        code, body = await api(
            node.url, "PUT", path, member, {"source_control": "http://127.0.0.1:9999"}
        )
        assert (code, body["reason"], body["field"]) == (403, "scope", "source_control")
        code, body = await api(
            node.url,
            "POST",
            "/api/channels",
            member,
            {"stream": "m", "source_control": "http://127.0.0.1:9999"},
        )
        assert (code, body["reason"], body["field"]) == (403, "scope", "source_control")
        assert node.channels[cid].params.source_control == "http://127.0.0.1:8200"
        assert [c.params.stream for c in node.channels.values()] == ["det"]


async def test_health_template_and_unknown_routes(tokens: Tokens) -> None:
    async with running_dsn(tokens) as node:
        code, body = await api(node.url, "GET", "/api/health")
        assert (code, body) == (
            200,
            {"status": "ok", "channels": 0, "failed_channels": 0, "boot_id": node.boot_id},
        )
        code, body = await api(node.url, "GET", "/api/template", tokens.issue())
        assert code == 200 and body["name"] == "default" and body["modes"] == ["l4", "l7"]
        code, body = await api(node.url, "GET", "/api/nothing-here", tokens.issue())
        assert (code, body["reason"]) == (404, "not_found")
        code, body = await api(node.url, "GET", "/api/channels/ch-00ff", tokens.issue())
        assert (code, body["reason"]) == (404, "not_found")
        code, body = await api(node.url, "PATCH", "/api/channels", tokens.issue(), {})
        assert (code, body["reason"]) == (405, "http") and body["message"]


async def _headers_only(url: str, method: str, path: str, headers: dict[str, str]):
    """Send only a request's headers (no body); return (status, headers, JSON body)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        head, _, body = (await asyncio.wait_for(reader.read(), 20)).partition(b"\r\n\r\n")
    finally:
        writer.close()
    status_line, *header_lines = head.decode().split("\r\n")
    answer_headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), answer_headers, json.loads(body)


async def test_every_error_answers_in_the_one_shape(tokens: Tokens) -> None:
    """401 (with its RFC 6750 challenge), 403, 404, 405, 400, 409 and 413 all answer
    {reason, message, field?, limit?} as auth.api's ERROR_SCHEMA says; nothing is provisioned."""
    client = AsyncHTTPClient()

    async def call(method: str, path: str, token: str | None = None, body: bytes | None = None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        resp = await client.fetch(
            node.url + path,
            method=method,
            headers=headers,
            body=body if body is not None or method not in ("POST", "PUT") else b"",
            raise_error=False,
            allow_nonstandard_methods=True,
            request_timeout=20,
        )
        assert resp.headers["Content-Type"] == "application/json", (method, path)
        return resp.code, resp.headers, json.loads(resp.body)

    async with running_dsn(tokens) as node:
        good, read_only = tokens.issue(), tokens.issue(scopes="stream.read")
        code, made = await api(node.url, "POST", "/api/channels", good, {"stream": "det"})
        assert code == 201, made
        cid = made["id"]
        answers = {
            "no token": await call("POST", "/api/channels", None, b"{}"),
            "expired token": await call("GET", "/api/channels", tokens.expired()),
            "no publish scope": await call("POST", "/api/channels", read_only, b"{}"),
            "unknown route": await call("GET", "/api/nothing-here", good),
            "unknown channel": await call("GET", "/api/channels/ch-00ff", good),
            "wrong method": await call("PATCH", "/api/channels", good, b"{}"),
            "malformed JSON": await call("POST", "/api/channels", good, b"{not json"),
            "outside the template": await call(
                "POST", "/api/channels", good, json.dumps({"stream": "x", "hwm": 0}).encode()
            ),
            "no source control": await call("GET", f"/api/channels/{cid}/steer/params", good),
            "too large": await _headers_only(
                node.url,
                "POST",
                "/api/channels",
                {"Authorization": f"Bearer {good}", "Content-Length": str(2 << 20)},
            ),
        }
        got = {case: (code, body["reason"]) for case, (code, _, body) in answers.items()}
        assert got == {
            "no token": (401, "missing"),
            "expired token": (401, "expired"),
            "no publish scope": (403, "scope"),
            "unknown route": (404, "not_found"),
            "unknown channel": (404, "not_found"),
            "wrong method": (405, "http"),
            "malformed JSON": (400, "malformed_json"),
            "outside the template": (400, "out_of_range"),
            "no source control": (409, "no_source_control"),
            "too large": (413, "body_too_large"),
        }
        for case, (_, _, body) in answers.items():
            jsonschema.validate(body, ERROR_SCHEMA)
            assert "error" not in body, case  # the old shape is gone
            assert body["message"].strip(), case
        assert answers["too large"][2]["limit"] == 1 << 20
        template = answers["outside the template"][2]
        assert (template["field"], template["limit"]) == ("hwm", {"min": 1, "max": 10000})
        challenges = {case: answers[case][1].get("WWW-Authenticate") for case in answers}
        assert challenges.pop("no token") == 'Bearer realm="beamhub-dsn"'
        assert (
            challenges.pop("expired token") == 'Bearer realm="beamhub-dsn", error="invalid_token"'
        )
        assert set(challenges.values()) == {None}  # only a 401 challenges
        assert list(node.channels) == [cid] and node.data_plane.channels() == [cid]


async def test_the_control_plane_raises_domain_errors_not_http_ones(tokens: Tokens) -> None:
    """Callers in the same process (beamhub up's detector feed) catch the template's refusal by
    its field; the HTTP answer is the handlers' business."""
    import tornado.web

    from beamhub.streaming.template import TemplateViolation

    async with running_dsn(tokens) as node:
        claims = tokens.verifier.verify(tokens.issue())
        with pytest.raises(TemplateViolation) as info:
            await node.create_channel(claims, {"stream": "d", "mode": "l4", "hwm": 0})
        assert not isinstance(info.value, tornado.web.HTTPError)
        assert (info.value.field, info.value.status) == ("hwm", 400)
        assert_nothing_provisioned(node)


async def test_concurrent_creates_respect_the_channel_bound(tokens: Tokens) -> None:
    """Creates racing on the event loop (provisioning runs on a thread) cannot exceed the bound."""
    from beamhub.streaming.template import Template

    bounded = Template.from_mapping(
        {
            **Template.load().describe(),
            "max_channels_per_project": 3,
            "max_channels_per_user": 3,  # the project's bound is tested here, not the user's
            "manager_reserve": 0,
            "hwm": {"min": 1, "max": 100, "default": 10},
            "max_frame_bytes": {"max": 1 << 20, "default": 1 << 20},
        }
    )
    async with running_dsn(tokens, bounded) as node:
        token = tokens.issue()
        results = await asyncio.gather(
            *(api(node.url, "POST", "/api/channels", token, {"stream": f"s{i}"}) for i in range(6))
        )
        codes = sorted(code for code, _ in results)
        assert codes == [201, 201, 201, 403, 403, 403]
        assert len(node.data_plane.channels()) == 3


async def test_beamhub_dsn_command_serves_and_stops_cleanly(tmp_path) -> None:
    """`beamhub dsn` as a real process: prints where it listens, accepts a token from
    `beamhub token issue` (same BEAMHUB_HOME), refuses it once its jti is on the revocation list
    it polls, and exits 0 on SIGTERM with its channels removed. The revocation list is served by a
    small tornado app standing in for the hub's token service (tested in tests/hub)."""
    import os
    import re
    import signal
    import sys

    import jwt
    import tornado.httpserver
    import tornado.netutil
    import tornado.web

    revoked: list[str] = []

    class Revoked(tornado.web.RequestHandler):
        def get(self) -> None:
            self.write({"revoked": revoked})

    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/revoked", Revoked)]))
    server.add_sockets(sockets)
    revoked_url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/revoked"

    env = {**os.environ, "BEAMHUB_HOME": str(tmp_path)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "beamhub.hub.cli",
        "dsn",
        "--port",
        "0",
        "--revocations",
        revoked_url,
        "--revocation-poll",
        "0.2",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        url = None
        while url is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line, "beamhub dsn exited before printing its URL"
            if m := re.search(r"control API (http://127\.0\.0\.1:\d+)", line):
                url = m.group(1)

        async def issue() -> str:
            cmd = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "beamhub.hub.cli",
                "token",
                "issue",
                "--project",
                "p9",
                "--scope",
                "stream.publish stream.read",
                "--ttl",
                "60",
                env=env,
                stdout=asyncio.subprocess.PIPE,
            )
            out = (await asyncio.wait_for(cmd.communicate(), 20))[0].decode().strip()
            assert cmd.returncode == 0
            return out

        token, doomed = await issue(), await issue()
        code, made = await api(url, "POST", "/api/channels", token, {"stream": "det"})
        assert code == 201 and made["project"] == "p9"
        assert (await api(url, "GET", "/api/channels", doomed))[0] == 200
        revoked.append(jwt.decode(doomed, options={"verify_signature": False})["jti"])
        code, body = await wait_until(
            lambda: _refused(api(url, "GET", "/api/channels", doomed)), timeout=10
        )
        assert (code, body["reason"]) == (401, "revoked")
        assert (await api(url, "GET", "/api/channels", token))[0] == 200
        assert (await api(url, "GET", "/api/health"))[1]["channels"] == 1
        proc.send_signal(signal.SIGTERM)
        out = (await asyncio.wait_for(proc.stdout.read(), 20)).decode()
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert "channel.dsn_stopped" in out and made["id"] in out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        server.stop()


async def _refused(call) -> tuple[int, dict] | None:
    code, body = await call
    return (code, body) if code != 200 else None
