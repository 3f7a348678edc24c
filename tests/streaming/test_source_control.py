"""The source control endpoint over real HTTP, checked against the frames on a real ZeroMQ socket."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPConnection

import jsonschema
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from beamhub.auth.api import ERROR_SCHEMA
from beamhub.auth.tokens import SigningKey, TokenIssuer, TokenVerifier
from beamhub.hub.commands.source import start_simulated_source
from beamhub.streaming.source import SourceRunner
from beamhub.streaming.source_control import SourceControlServer


def http(method: str, url: str, body=None, token: str | None = None) -> tuple[int, dict]:
    data = (
        None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    )
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        assert exc.headers["Content-Type"].startswith("application/json")
        return exc.code, json.loads(exc.read())


@pytest.fixture
def source(receiver):
    src = start_simulated_source(
        receiver.endpoint,
        "sfx",
        shape=(384, 384),
        seed=11,
        rate_hz=100.0,
        hit_fraction=0.5,
        sndhwm=1000,
    )
    yield src
    src.stop()


def test_schema_and_params_are_readable(source):
    status, body = http("GET", f"{source.control_url}/schema")
    assert status == 200
    names = [p["name"] for p in body["params"]]
    assert {
        "rate_hz",
        "hit_fraction",
        "beam_intensity",
        "detector_distance_mm",
        "sample_position_um",
    } <= set(names)
    status, body = http("GET", f"{source.control_url}/params")
    assert status == 200
    assert body["values"]["hit_fraction"] == 0.5
    assert body["rev"] == 0 and body["run"] == 1 and body["running"] is True
    assert isinstance(body["seq"], int)


def test_distance_change_answers_rev_and_first_seq_and_frames_follow(source, receiver):
    receiver.recv()  # the stream flows
    status, answer = http(
        "PUT", f"{source.control_url}/params/detector_distance_mm", {"value": 180}
    )
    assert status == 200
    assert answer == {
        "name": "detector_distance_mm",
        "value": 180.0,
        "rev": 1,
        "first_seq": answer["first_seq"],
    }
    first = answer["first_seq"]
    frames = receiver.until_seq(first + 40)
    det = source.generator
    before = [f for f in frames if f.header.seq < first]
    after = [f for f in frames if f.header.seq >= first]
    assert after[0].header.seq == first
    assert all(
        f.header.rev == 0 and f.header.meta["params"]["detector_distance_mm"] == 100.0
        for f in before
    )
    assert all(
        f.header.rev == 1 and f.header.meta["params"]["detector_distance_mm"] == 180.0
        for f in after
    )
    checked = 0
    for f in after:
        for peak, two_theta in zip(
            f.header.meta["peaks"], f.header.meta["two_theta_deg"], strict=True
        ):
            r = math.hypot(peak[0] - det.beam_center[0], peak[1] - det.beam_center[1])
            assert r == pytest.approx(
                180.0 * 1000 * math.tan(math.radians(two_theta)) / 100.0, abs=0.01
            )
            checked += 1
    assert checked > 50


def test_moving_the_sample_out_of_the_jet_lowers_the_hit_rate(source, receiver):
    receiver.recv()
    status, answer = http("PUT", f"{source.control_url}/params/sample_position_um", {"value": 150})
    assert status == 200 and answer["rev"] == 1
    frames = receiver.until_seq(answer["first_seq"] + 60)
    before = [f.header.meta["hit"] for f in frames if f.header.seq < answer["first_seq"]]
    after = [f.header for f in frames if f.header.seq >= answer["first_seq"]]
    assert len(after) == 61
    assert sum(h.meta["hit"] for h in after) <= 2  # expected 0.5 * exp(-9) * 61 ~ 0.004
    assert all(h.meta["effective_hit_fraction"] < 1e-3 for h in after)
    if len(before) >= 20:
        assert sum(before) > 0


def test_out_of_schema_and_malformed_requests_are_refused_by_name(source):
    url = source.control_url
    status, body = http("PUT", f"{url}/params/hit_fraction", {"value": 1.5})
    assert status == 400
    assert body["field"] == "hit_fraction" and body["limit"] == {"max": 1.0}
    assert body["reason"] == "invalid" and "maximum" in body["message"]
    status, body = http("PUT", f"{url}/params/rate_hz", {"value": 0})
    assert (status, body["field"], body["limit"]) == (400, "rate_hz", {"min": 0.1})
    status, body = http("PUT", f"{url}/params/beam_intensity", {"value": "high"})
    assert (status, body["field"]) == (400, "beam_intensity")
    status, body = http("PUT", f"{url}/params/no_such_knob", {"value": 1})
    assert (status, body["field"]) == (404, "no_such_knob")
    status, body = http("PUT", f"{url}/params/hit_fraction", b"{not json")
    assert (status, body["reason"]) == (400, "malformed_json")
    status, body = http("PUT", f"{url}/params/hit_fraction", b"[" * 3000 + b"]" * 3000)
    assert (status, body["reason"]) == (400, "malformed_json")
    status, body = http("PUT", f"{url}/params/hit_fraction", {"val": 0.1})
    assert (status, body["field"]) == (400, "value")
    status, body = http("POST", f"{url}/run", {"action": "pause"})
    assert (status, body["field"]) == (400, "action")
    status, body = http("GET", f"{url}/nowhere")
    assert (status, body["reason"]) == (404, "not_found") and "/schema" in body["message"]
    status, body = http("GET", f"{url}/params")
    assert body["rev"] == 0 and body["values"]["hit_fraction"] == 0.5  # nothing changed


def test_run_stop_and_start_over_http(source, receiver):
    url = source.control_url
    last = receiver.recv().header.seq
    assert http("POST", f"{url}/run", {"action": "stop"}) == (200, {"run": 1, "running": False})
    status, body = http("GET", f"{url}/params")
    stopped_at = body["seq"]
    assert status == 200 and body["running"] is False
    tail = receiver.until_seq(stopped_at - 1) if stopped_at - 1 > last else []
    assert not receiver.sock.poll(300)  # nothing more arrives while stopped
    assert http("GET", f"{url}/params")[1]["seq"] == stopped_at
    assert http("POST", f"{url}/run", {"action": "start"}) == (200, {"run": 2, "running": True})
    frame = receiver.recv()
    assert frame.header.run == 2 and frame.header.seq == stopped_at  # seq continues
    assert all(f.header.run == 1 for f in tail)


@pytest.fixture(scope="module")
def keys():
    key = SigningKey.generate()
    return TokenIssuer(key), TokenVerifier(key.jwks())


def test_writes_need_a_steer_token_for_the_project(receiver, keys):
    issuer, verifier = keys
    src = start_simulated_source(
        receiver.endpoint,
        "sfx",
        shape=(128, 128),
        seed=1,
        rate_hz=20.0,
        verifier=verifier,
        project="p1",
        sndhwm=1000,
    )
    try:
        url = f"{src.control_url}/params/hit_fraction"
        steer = issuer.issue(sub="ana", project="p1", scopes="steer", ttl=60)
        read_only = issuer.issue(sub="ana", project="p1", scopes="stream.read", ttl=60)
        other = issuer.issue(sub="ana", project="p2", scopes="steer", ttl=60)
        forged = steer[:-4] + ("AAAA" if not steer.endswith("AAAA") else "BBBB")
        assert http("PUT", url, {"value": 0.1})[0] == 401
        assert http("PUT", url, {"value": 0.1}, token=forged)[0] == 401
        status, body = http("PUT", url, {"value": 0.1}, token=read_only)
        assert status == 403 and body["reason"] == "scope"
        assert http("PUT", url, {"value": 0.1}, token=other)[1]["reason"] == "project"
        assert http("POST", f"{src.control_url}/run", {"action": "stop"})[0] == 401
        assert http("GET", f"{src.control_url}/params")[1]["rev"] == 0  # nothing changed
        status, body = http("PUT", url, {"value": 0.1}, token=steer)
        assert status == 200 and body["rev"] == 1
        status, body = http("POST", f"{src.control_url}/run", {"action": "stop"}, token=steer)
        assert status == 200 and body["running"] is False
    finally:
        src.stop()


async def test_control_server_runs_inside_an_existing_event_loop(receiver):
    from beamhub.streaming.simulator import SimulatedDetector

    runner = SourceRunner(
        SimulatedDetector((128, 128), seed=2, rate_hz=50.0),
        stream="s",
        connect=receiver.endpoint,
        sndhwm=1000,
    ).start()
    server = SourceControlServer(runner)
    url = await server.start()
    client = AsyncHTTPClient()
    try:
        resp = await client.fetch(f"{url}/run", method="POST", body='{"action": "start"}')
        assert json.loads(resp.body) == {"run": 1, "running": True}
        resp = await client.fetch(f"{url}/params/rate_hz", method="PUT", body='{"value": 80}')
        answer = json.loads(resp.body)
        assert answer["rev"] == 1 and answer["value"] == 80.0
        with pytest.raises(HTTPClientError) as info:
            await client.fetch(f"{url}/params/rate_hz", method="PUT", body='{"value": 1e9}')
        assert info.value.code == 400
        assert json.loads(info.value.response.body)["limit"] == {"max": 1000.0}
    finally:
        await server.stop()
        runner.stop()
    frame = receiver.recv()
    assert frame.header.run == 1


def raw_answer(base_url: str, method: str, path: str, headers: dict[str, str]):
    """Send only a request's headers (no body) and return (status, headers, JSON body)."""
    url = urllib.parse.urlsplit(base_url)
    conn = HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.putrequest(method, path)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.headers, json.loads(resp.read())
    finally:
        conn.close()


def test_oversized_request_body_is_refused(source):
    # announce a 2 MiB body and send only the headers: the server must refuse on Content-Length
    # alone (writing the whole body would race the server's close: EPIPE instead of the answer)
    status, _, body = raw_answer(
        source.control_url,
        "PUT",
        "/params/hit_fraction",
        {"Content-Type": "application/json", "Content-Length": str(2 << 20)},
    )
    assert (status, body["reason"], body["limit"]) == (413, "body_too_large", 1 << 20)
    assert http("GET", f"{source.control_url}/params")[1]["rev"] == 0  # nothing changed


def test_every_error_answers_in_the_one_shape(receiver, keys):
    """401 (with its RFC 6750 challenge), 403, 404, 405, 400 and 413 all answer
    {reason, message, field?} as auth.api's ERROR_SCHEMA says, and steer nothing."""
    issuer, verifier = keys
    src = start_simulated_source(
        receiver.endpoint,
        "sfx",
        shape=(64, 64),
        seed=4,
        rate_hz=20.0,
        verifier=verifier,
        project="p1",
        sndhwm=1000,
    )
    steer = issuer.issue(sub="ana", project="p1", scopes="steer", ttl=60)
    read_only = issuer.issue(sub="ana", project="p1", scopes="stream.read", ttl=60)
    url = src.control_url
    try:
        answers = {}
        status, body = http("PUT", f"{url}/params/hit_fraction", {"value": 0.1})
        answers["no token"] = (status, body, "missing")
        status, body = http("PUT", f"{url}/params/hit_fraction", {"value": 0.1}, read_only)
        answers["no steer scope"] = (status, body, "scope")
        answers["unknown route"] = (*http("GET", f"{url}/nowhere"), "not_found")
        status, body = http("PUT", f"{url}/params/no_such_knob", {"value": 1}, steer)
        answers["unknown parameter"] = (status, body, "unknown_param")
        answers["wrong method"] = (*http("DELETE", f"{url}/schema"), "http")
        status, body = http("PUT", f"{url}/params/hit_fraction", b"{not json", steer)
        answers["malformed JSON"] = (status, body, "malformed_json")
        status, _, body = raw_answer(
            url, "PUT", "/params/hit_fraction", {"Content-Length": str(2 << 20)}
        )
        answers["too large"] = (status, body, "body_too_large")
        got = {case: (status, body["reason"]) for case, (status, body, _) in answers.items()}
        assert got == {
            "no token": (401, "missing"),
            "no steer scope": (403, "scope"),
            "unknown route": (404, "not_found"),
            "unknown parameter": (404, "unknown_param"),
            "wrong method": (405, "http"),
            "malformed JSON": (400, "malformed_json"),
            "too large": (413, "body_too_large"),
        }
        for case, (_, body, _) in answers.items():
            jsonschema.validate(body, ERROR_SCHEMA)
            assert "error" not in body, case  # the old shape is gone
            assert body["message"].strip(), case
        assert answers["unknown parameter"][1]["field"] == "no_such_knob"
        req = urllib.request.Request(f"{url}/run", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.headers["WWW-Authenticate"] == 'Bearer realm="beamhub-source"'
        assert http("GET", f"{url}/params")[1]["rev"] == 0  # nothing was steered
    finally:
        src.stop()
