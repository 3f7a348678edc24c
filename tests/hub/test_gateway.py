"""API gateway over real HTTP: status, DSN channels, policy, rate limits, audit, reservations."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import openapi_spec_validator
import pytest

from beamhub.auth.api import ERROR_SCHEMA
from beamhub.hub.gateway.api import HTTP_METHODS
from beamhub.hub.gateway.app import load_openapi
from beamhub.hub.gateway.audit import verify_log
from tests.hub.gateway_helpers import ALL_SCOPES, Keys, call, running_gateway

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def keys() -> Keys:
    return Keys()


async def test_status_is_public_and_the_api_is_published(keys: Keys, tmp_path: Path) -> None:
    async with running_gateway(keys, tmp_path) as s:
        code, body, _ = await call(s.url, "GET", "/status")
        assert code == 200
        assert body["enclave"] == "dev"
        assert body["streams"] == {"dsn": "up", "channels": 0}
        assert body["maintenance"][0]["what"] == "leadership system maintenance"
        assert body["reservations"] == [] and body["nodes"] == []
        code, doc, _ = await call(s.url, "GET", "/openapi.json")
        assert code == 200 and doc["openapi"].startswith("3.")
        assert doc["paths"].keys() == load_openapi()["paths"].keys()
        code, index, _ = await call(s.url, "GET", "/")
        assert code == 200 and index["openapi"] == "/api/v1/openapi.json"
        code, body, _ = await call(s.url, "GET", "/no/such/thing")
        assert code == 404 and "openapi.json" in body["message"]
        code, text, _ = await call(s.url.replace("/api/v1", ""), "GET", "/metrics")
        assert code == 200 and b'beamhub_gateway_requests_total{action="status.read"' in text


async def _declare_and_send_nothing(url: str, path: str, token: str, length: int) -> tuple:
    """POST to ``path`` declaring a ``length``-byte body and send none of it; the whole answer."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST /api/v1{path} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n".encode()
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # the server closes: the body is unread
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), json.loads(body), headers


async def test_errors_answer_in_the_one_documented_shape(keys: Keys, tmp_path: Path) -> None:
    """401, 403, 404, 405, 400, 413 (nothing sent) and 429: each body valid against the one
    error schema, which is the one the OpenAPI document publishes."""
    assert load_openapi()["components"]["schemas"]["Error"] == ERROR_SCHEMA
    one_shape = jsonschema.Draft202012Validator(ERROR_SCHEMA)
    async with running_gateway(keys, tmp_path, burst=1) as s:
        viewer = keys.token("vera", "p1", "stream.read")
        admin = keys.token("admin", "p1", ALL_SCOPES + " admin")
        channel = {"stream": "x"}
        answers = {
            "no token": await call(s.url, "GET", "/whoami"),
            "policy": await call(s.url, "POST", "/projects/p1/channels", viewer, channel),
            "no route": await call(s.url, "GET", "/no/such/thing"),
            "method": await call(s.url, "PATCH", "/status"),
            "malformed": await call(s.url, "POST", "/projects/p1/channels", admin, raw=b"{"),
            "too large": await _declare_and_send_nothing(
                s.url, "/projects/p1/channels", admin, 80_000_000
            ),
            "rate limit": await call(
                s.url, "GET", "/whoami", admin
            ),  # its 1-request burst is spent
        }
    expected = {
        "no token": (401, "missing"),
        "policy": (403, "policy"),
        "no route": (404, "not_found"),
        "method": (405, "method_not_allowed"),
        "malformed": (400, "malformed_json"),
        "too large": (413, "body_too_large"),
        "rate limit": (429, "rate_limited"),
    }
    for case, (code, body, headers) in answers.items():
        assert (code, body["reason"]) == expected[case], (case, code, body)
        assert headers["Content-Type"].startswith("application/json"), case
        errors = [e.message for e in one_shape.iter_errors(body)]
        assert not errors, (case, body, errors)
        assert body["message"].strip() and "error" not in body, (case, body)
    assert answers["too large"][1]["limit"] == 64 * 1024
    assert answers["rate limit"][1]["retry_after"] > 0


async def test_served_openapi_is_valid_and_every_error_is_the_one_schema(
    keys: Keys, tmp_path: Path
) -> None:
    async with running_gateway(keys, tmp_path, dsn=False) as s:
        code, doc, _ = await call(s.url, "GET", "/openapi.json")
    assert code == 200
    openapi_spec_validator.validate(doc)  # raises, naming the fault, if not valid OpenAPI 3
    assert doc["components"]["schemas"]["Error"] == ERROR_SCHEMA
    error = {"$ref": "#/components/responses/Error"}
    unavailable = {"$ref": "#/components/responses/Unavailable"}
    content = doc["components"]["responses"]["Error"]["content"]
    assert content == {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    assert doc["components"]["responses"]["Unavailable"]["content"] == content
    assert "Retry-After" in doc["components"]["responses"]["Unavailable"]["headers"]
    seen, with_503 = 0, set()
    for path, item in doc["paths"].items():
        for method, spec in item.items():
            if method not in HTTP_METHODS:
                continue
            responses = spec["responses"]
            assert responses.get("default") == error, (path, method)
            for status, answer in responses.items():
                if status == "503":
                    assert answer == unavailable, (path, method)
                    with_503.add(spec["x-handler"])
                elif status[0] in "45":
                    assert answer == error, (path, method, status)
            seen += 1
    assert seen == len(_endpoints())
    # every operation that needs the DSN or the jobs API documents its 503
    needs = {
        "channels",
        "channel",
        "channel_renew",
        "steer_run",
        "steer_param",
        "jobs",
        "job",
        "job_output",
    }
    assert with_503 == needs


async def test_channel_lifecycle_forwarded_to_the_real_dsn(keys: Keys, tmp_path: Path) -> None:
    async with running_gateway(keys, tmp_path) as s:
        token = keys.token("oscar", "p1", "stream.read stream.publish")
        code, ch, _ = await call(s.url, "POST", "/projects/p1/channels", token, {"stream": "det"})
        assert code == 201, ch
        assert list(s.dsn.channels) == [ch["id"]]
        assert s.dsn.channels[ch["id"]].project == "p1"
        assert s.dsn.channels[ch["id"]].owner == "oscar"
        code, listed, _ = await call(s.url, "GET", "/projects/p1/channels", token)
        assert code == 200 and [c["id"] for c in listed["channels"]] == [ch["id"]]
        code, one, _ = await call(s.url, "GET", f"/projects/p1/channels/{ch['id']}", token)
        assert code == 200 and "stats" in one
        code, renewed, _ = await call(
            s.url, "POST", f"/projects/p1/channels/{ch['id']}/renew", token, {"ttl": 60}
        )
        assert code == 200 and renewed["id"] == ch["id"]
        code, status, _ = await call(s.url, "GET", "/status")
        assert status["streams"]["channels"] == 1
        # the DSN's own refusals (its admin template) come back unchanged
        code, refused, _ = await call(
            s.url, "POST", "/projects/p1/channels", token, {"stream": "det", "hwm": 10**9}
        )
        assert code == 400 and refused["field"] == "hwm"
        code, _, _ = await call(s.url, "DELETE", f"/projects/p1/channels/{ch['id']}", token)
        assert code == 204 and s.dsn.channels == {}


async def test_policy_denial_names_the_rule(keys: Keys, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nrules:\n"
        "  - {id: read-own, effect: allow, actions: ['channels.*'], project: own,"
        " scope: stream.read}\n"
        "  - {id: no-mallory, effect: deny, actions: ['*'], who: {users: [mallory]},"
        " description: mallory is suspended}\n"
    )
    from beamhub.hub.gateway.policy import load_policy

    async with running_gateway(keys, tmp_path, policy=load_policy(rules)) as s:
        viewer = keys.token("vera", "p1", "stream.read")
        code, body, _ = await call(s.url, "GET", "/projects/p2/channels", viewer)
        assert code == 403 and body["reason"] == "policy"
        assert body["decision"]["rule"] == "default-deny"
        assert "nearest rule 'read-own'" in body["decision"]["reason"]
        assert "not 'p2'" in body["message"]
        mallory = keys.token("mallory", "p1", "stream.read")
        code, body, _ = await call(s.url, "GET", "/projects/p1/channels", mallory)
        assert code == 403
        assert body["decision"] == {
            "decision": "deny",
            "rule": "no-mallory",
            "reason": "mallory is suspended",
        }
        assert s.dsn.channels == {}
    records = [json.loads(line) for line in s.audit_path.read_text().splitlines()]
    assert [(r["user"], r["rule"], r["outcome"], r["status"]) for r in records] == [
        ("vera", "default-deny", "deny", 403),
        ("mallory", "no-mallory", "deny", 403),
    ]


async def test_default_policy_viewer_cannot_create_operator_can(keys: Keys, tmp_path: Path) -> None:
    async with running_gateway(keys, tmp_path) as s:
        viewer = keys.token("vera", "p1", "stream.read dashboard")
        code, body, _ = await call(s.url, "POST", "/projects/p1/channels", viewer, {"stream": "x"})
        assert code == 403 and "channels-manage-own-project" in body["decision"]["reason"]
        assert s.dsn.channels == {}
        operator = keys.token("oscar", "p1", "stream.read stream.publish steer")
        code, _, _ = await call(s.url, "POST", "/projects/p1/channels", operator, {"stream": "x"})
        assert code == 201 and len(s.dsn.channels) == 1


@pytest.mark.parametrize("burst", [1, 4])
async def test_rate_limit_is_exact_to_the_bucket(keys: Keys, tmp_path: Path, burst: int) -> None:
    async with running_gateway(keys, tmp_path, burst=burst, rate=0.25) as s:
        token = keys.token()
        codes = [(await call(s.url, "GET", "/whoami", token))[0] for _ in range(burst)]
        assert codes == [200] * burst
        code, body, headers = await call(s.url, "GET", "/whoami", token)
        assert code == 429 and body["bucket"] == "token"
        assert headers["Retry-After"] == "4"  # one token at 0.25/s, rounded up
        other = keys.token("oscar", "p1")  # another token of the project still passes
        assert (await call(s.url, "GET", "/whoami", other))[0] == 200
        s.clock.now += 3.9
        assert (await call(s.url, "GET", "/whoami", token))[0] == 429
        s.clock.now += 0.1
        assert (await call(s.url, "GET", "/whoami", token))[0] == 200
    records = [json.loads(line) for line in s.audit_path.read_text().splitlines()]
    assert [r["rule"] for r in records if r["outcome"] == "deny"] == ["ratelimit.token"] * 2


async def test_project_bucket_is_shared_by_its_tokens(keys: Keys, tmp_path: Path) -> None:
    async with running_gateway(keys, tmp_path, burst=100, project_burst=3) as s:
        tokens = [keys.token(f"u{i}", "p1") for i in range(4)]
        codes = [(await call(s.url, "GET", "/whoami", t))[0] for t in tokens]
        assert codes == [200, 200, 200, 429]
        assert (await call(s.url, "GET", "/whoami", keys.token("carol", "p2")))[0] == 200


async def test_tokens_refused_and_audited_never_logged(keys: Keys, tmp_path: Path) -> None:
    async with running_gateway(keys, tmp_path) as s:
        code, body, headers = await call(s.url, "GET", "/projects/p1/channels")
        assert code == 401 and body["reason"] == "missing"
        assert headers["WWW-Authenticate"].startswith("Bearer ")
        code, body, _ = await call(s.url, "GET", "/projects/p1/channels", "not-a-jwt")
        assert code == 401 and body["reason"] == "malformed"
        token = keys.token()
        code, me, _ = await call(s.url, "GET", "/whoami", token)
        assert code == 200
        keys.revoked.add(me["jti"])  # what the hub's revocation list feeds the verifier
        code, body, _ = await call(s.url, "GET", "/whoami", token)
        assert code == 401 and body["reason"] == "revoked"
    text = s.audit_path.read_text()
    assert token not in text and token.split(".")[2] not in text
    records = [json.loads(line) for line in text.splitlines()]
    # failed authentications: one aggregated record per address, with the count and reasons
    (failed,) = [r for r in records if r["outcome"] == "deny"]
    assert failed["rule"] == "auth-failures" and failed["count"] == 3
    assert failed["source"] == "127.0.0.1" and failed["jti"] is None
    assert "missing x1" in failed["reason"] and "revoked x1" in failed["reason"]


async def test_audit_chain_verifies_and_a_flipped_byte_is_found(keys: Keys, tmp_path: Path) -> None:
    async with running_gateway(keys, tmp_path) as s:
        token = keys.token()
        for path in ("/whoami", "/projects/p2/channels", "/projects/p1/reservations", "/whoami"):
            await call(s.url, "GET", path, token)
        await call(s.url, "GET", "/status")
    result = verify_log(s.audit_path)
    assert result.ok and result.records == 5
    records = [json.loads(line) for line in s.audit_path.read_text().splitlines()]
    assert [r["outcome"] for r in records] == ["allow", "deny", "allow", "allow", "allow"]
    assert records[1]["resource"] == "GET /api/v1/projects/p2/channels"
    assert records[4]["user"] is None and records[4]["source"] == "127.0.0.1"
    data = bytearray(s.audit_path.read_bytes())
    start = data.index(b"\n", data.index(b"\n") + 1) + 1  # record 3 begins here
    data[start + data[start:].index(b"p1")] ^= 0x01  # "p1" → "q1" in record 3
    s.audit_path.write_bytes(bytes(data))
    result = verify_log(s.audit_path)
    assert not result.ok and result.line == 3 and result.records == 2
    cli = subprocess.run(
        [sys.executable, "-m", "beamhub.hub.cli", "audit", "verify", str(s.audit_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 1 and "BROKEN at line 3" in cli.stdout


async def test_reservation_request_then_admin_approval(keys: Keys, tmp_path: Path) -> None:
    async with running_gateway(keys, tmp_path) as s:
        pi = keys.token("alice", "p1", "reserve stream.read")
        start = time.time() + 3600
        request = {
            "start": start,
            "end": start + 7200,
            "tier": "beamtime",
            "justification": "SFX on lysozyme microcrystals, 120 Hz, 2 h",
        }
        code, window, _ = await call(s.url, "POST", "/projects/p1/reservations", pi, request)
        assert code == 201 and window["status"] == "requested" and window["requested_by"] == "alice"
        code, body, _ = await call(s.url, "POST", f"/reservations/{window['id']}/approve", pi, {})
        assert code == 403 and "reservations-approve-admin" in body["decision"]["reason"]
        assert s.book.get(window["id"]).status == "requested"
        # an admin's narrow token carries its scopes' power only, never the admin's
        narrow = keys.token("admin", "facility", "stream.read")
        code, body, _ = await call(s.url, "POST", f"/reservations/{window['id']}/approve", narrow)
        assert code == 403 and "roles ['admin']" in body["decision"]["reason"], body
        # the admin scope without being a facility admin is no admin either
        code, body, _ = await call(
            s.url,
            "POST",
            f"/reservations/{window['id']}/approve",
            keys.token("alice", "p1", "admin"),
        )
        assert code == 403 and body["reason"] == "policy"
        admin = keys.token("admin", "facility", "admin")
        code, body, _ = await call(s.url, "POST", f"/reservations/{window['id']}/approve", admin)
        assert code == 200 and body["status"] == "approved" and body["decided_by"] == "admin"
        code, body, _ = await call(s.url, "POST", f"/reservations/{window['id']}/approve", admin)
        assert code == 409 and "already approved" in body["message"]
        code, status, _ = await call(s.url, "GET", "/status")
        assert [(w["project"], w["state"]) for w in status["reservations"]] == [("p1", "approved")]
        assert "justification" not in status["reservations"][0]
        iso = {
            "start": "2031-03-01T08:00:00Z",
            "end": "2031-03-01T20:00:00",
            "justification": "time-resolved pump-probe series",
        }
        code, second, _ = await call(s.url, "POST", "/projects/p1/reservations", pi, iso)
        assert code == 201 and second["end"] - second["start"] == 12 * 3600
        code, body, _ = await call(
            s.url,
            "POST",
            f"/reservations/{second['id']}/deny",
            admin,
            {"reason": "the beamline is closed in March"},
        )
        assert code == 200 and body["status"] == "denied"
        code, mine, _ = await call(s.url, "GET", "/projects/p1/reservations", pi)
        assert [w["state"] for w in mine["reservations"]] == ["approved", "denied"]
        short = dict(iso, justification="because")
        code, body, _ = await call(s.url, "POST", "/projects/p1/reservations", pi, short)
        assert code == 400 and body["field"] == "justification"
        back = dict(iso, start="2031-03-02T08:00:00Z", justification="x" * 30)
        code, body, _ = await call(s.url, "POST", "/projects/p1/reservations", pi, back)
        assert code == 400 and body["field"] == "end" and "before it starts" in body["message"]


def _endpoints() -> list[tuple[str, str, bool]]:
    """Every (method, concrete path, takes a body) of the published API."""
    values = {
        "project": "p1",
        "channel_id": "ch-00ff",
        "window_id": "1",
        "maintenance_id": "1",
        "name": "gain",
        "job_id": "7",
    }
    out = []
    for path, methods in load_openapi()["paths"].items():
        concrete = path
        for name, value in values.items():
            concrete = concrete.replace("{" + name + "}", value)
        for method, spec in methods.items():
            if method in HTTP_METHODS:
                out.append((method.upper(), concrete, "x-body" in spec))
    return out


async def test_bad_input_on_every_endpoint_is_4xx_never_500(keys: Keys, tmp_path: Path) -> None:
    async with running_gateway(keys, tmp_path) as s:
        admin = keys.token("admin", "p1", ALL_SCOPES + " admin")
        seen = 0
        for method, path, takes_body in _endpoints():
            bad_json = "malformed_json" if takes_body else "unexpected_body"
            cases = [
                ("malformed", b"{not json", bad_json),
                ("array", b"[1, 2]", bad_json),
                ("NaN", b'{"x": NaN}', bad_json),
                ("nested", b"[" * 3000 + b"]" * 3000, bad_json),
                ("oversized", b'{"a": "' + b"x" * 70_000 + b'"}', "body_too_large"),
            ]
            if takes_body and not path.endswith("/steer/run") and "/params/" not in path:
                cases.append(("unknown field", b'{"colour": "red"}', "unknown_field"))
            for case, raw, reason in cases:
                code, body, _ = await call(s.url, method, path, admin, raw=raw)
                assert 400 <= code < 500, (method, path, case, code, body)
                assert body["reason"] == reason, (method, path, case, body)
                assert body["message"], (method, path, case)
                seen += 1
            code, body, _ = await call(s.url, method, path + "?debug=1", admin)
            assert code == 400 and body["reason"] == "unknown_parameter", (method, path)
        assert seen >= 70  # 15 endpoints x 4-5 cases
        code, body, _ = await call(s.url, "PATCH", "/status")
        assert code == 405 and "allowed: GET" in body["message"]
        huge = b"x" * (70 << 20)  # refused from its Content-Length, before it is read
        code, body, _ = await call(s.url, "POST", "/projects/p1/channels", admin, raw=huge)
        assert code == 413 and body["reason"] == "body_too_large"


async def test_unexpected_error_is_a_generic_500(keys: Keys, tmp_path: Path, caplog) -> None:
    class BrokenScheduler:
        async def list(self, project):
            raise RuntimeError("database on fire")

    async with running_gateway(keys, tmp_path, scheduler=BrokenScheduler()) as s:
        token = keys.token()
        code, body, _ = await call(s.url, "GET", "/projects/p1/jobs", token)
        assert code == 500 and body["reason"] == "internal"
        assert "fire" not in json.dumps(body)
    assert any(
        "database on fire" in r.getMessage()
        or (r.exc_info and "database on fire" in str(r.exc_info[1]))
        for r in caplog.records
    )


@pytest.mark.timeout(90)
def test_service_process_revocation_and_sigterm(tmp_path: Path) -> None:
    """`python -m beamhub.hub.gateway.service` as beamhub up starts it: prints its URL, polls /revoked, stops on
    SIGTERM with exit 0 and a verifiable audit log."""
    import http.server
    import os
    import signal
    import threading
    import urllib.request

    from beamhub.auth.tokens import SigningKey, TokenIssuer

    key = SigningKey.generate()
    issuer = TokenIssuer(key)
    (tmp_path / "jwks.json").write_text(json.dumps(key.jwks()))  # the public half only
    token = issuer.issue("oscar", "p1", "stream.read", ttl=600)
    jti = json.loads(__import__("base64").urlsafe_b64decode(token.split(".")[1] + "==="))["jti"]
    revoked: list[str] = []

    class Revoked(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"revoked": revoked}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Revoked)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    deployment = tmp_path / "beamhub.yaml"
    deployment.write_text("tokens: {revocation_poll: 0.2}\n")
    env = dict(
        os.environ, BEAMHUB_HOME=str(tmp_path), JUPYTERHUB_SERVICE_PREFIX="/services/gateway/"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "beamhub.hub.gateway.service",
            "--deployment",
            str(deployment),
            "--port",
            "0",
            "--revoked-url",
            f"http://127.0.0.1:{server.server_port}/revoked",
            "--jwks",
            str(tmp_path / "jwks.json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split("listening on ")[1].split()[0]
        assert url.endswith("/services/gateway/api/v1")

        def get(path: str, tok: str | None = None) -> int:
            req = urllib.request.Request(url + path)
            if tok:
                req.add_header("Authorization", f"Bearer {tok}")
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert get("/status") == 200
        assert get("/whoami", token) == 200
        revoked.append(jti)
        deadline = time.monotonic() + 10
        while get("/whoami", token) != 401:
            assert time.monotonic() < deadline, "revoked token still accepted after 10 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.shutdown()
        server.server_close()
    result = verify_log(tmp_path / "audit.jsonl")
    assert result.ok and result.records >= 3
    records = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert records[-1]["outcome"] == "deny" and "revoked" in records[-1]["reason"]


@pytest.mark.timeout(60)
async def test_jobs_run_at_the_beamtime_tier_once_the_window_is_approved(
    keys: Keys, tmp_path: Path
) -> None:
    """Gateway → kernels.local.LocalBackend (real processes) whose tier policy reads the same
    ReservationBook the gateway's approval step writes."""
    from beamhub.kernels.local import LocalBackend
    from beamhub.kernels.reservations import ReservationBook
    from beamhub.kernels.tier_policy import TierPolicy

    book = ReservationBook(tmp_path / "windows.db", admins=["admin"])
    sched = LocalBackend(
        tmp_path / "jobs.db", nodes=2, policy=TierPolicy(reservations=book), poll_interval=0.05
    )
    try:
        async with running_gateway(keys, tmp_path, scheduler=sched) as s:
            s.gateway.reservations = book
            pi = keys.token("alice", "p1", "jobs reserve")
            job = {
                "name": "hitfind",
                "argv": [sys.executable, "-c", "print('ok')"],
                "tier": "beamtime",
                "walltime_s": 600,
            }
            code, body, _ = await call(s.url, "POST", "/projects/p1/jobs", pi, job)
            assert code == 403 and body["field"] == "tier"
            assert "approved beamtime window" in body["message"]
            now = time.time()
            code, window, _ = await call(
                s.url,
                "POST",
                "/projects/p1/reservations",
                pi,
                {
                    "start": now - 1,
                    "end": now + 600,
                    "justification": "live hit finding during the LCLS shift",
                },
            )
            assert code == 201
            admin = keys.token("admin", "ops", "admin")
            code, _, _ = await call(s.url, "POST", f"/reservations/{window['id']}/approve", admin)
            assert code == 200
            code, body, _ = await call(s.url, "POST", "/projects/p1/jobs", pi, job)
            assert code == 201 and body["tier"] == "beamtime", body
            plain = {"name": "default-tier", "argv": [sys.executable, "-c", "pass"]}
            code, second, _ = await call(s.url, "POST", "/projects/p1/jobs", pi, plain)
            assert code == 201 and second["tier"] == "beamtime"  # inside the window
            deadline = time.monotonic() + 30
            while True:
                code, listed, _ = await call(s.url, "GET", "/projects/p1/jobs", pi)
                states = {j["job_id"]: j["state"] for j in listed["jobs"]}
                if states.get(body["job_id"]) == "completed" or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert states[body["job_id"]] == "completed", states
            code, status, _ = await call(s.url, "GET", "/status")
            assert code == 200 and len(status["nodes"]) == 2
            assert {n["state"] for n in status["nodes"]} <= {"idle", "busy"}
            assert [(w["project"], w["state"]) for w in status["reservations"]] == [
                ("p1", "active")
            ]
            other = keys.token("carol", "p2", "jobs")
            code, body, _ = await call(s.url, "POST", "/projects/p1/jobs", other, job)
            assert code == 403 and body["decision"]["rule"] == "default-deny"
    finally:
        await sched.close(cancel_jobs=True)


def test_openapi_is_the_single_source_of_routes_and_schemas() -> None:
    """Every documented operation has an implementation; the channel schema is the DSN's."""
    from beamhub.hub.gateway.ops import Operations
    from beamhub.hub.gateway.policy import ACTIONS
    from beamhub.streaming.template import REQUEST_FIELDS

    doc = load_openapi()
    table = Operations.__new__(Operations)
    Operations.__init__(table, gateway=None)  # type: ignore[arg-type]
    for path, methods in doc["paths"].items():
        for method, spec in methods.items():
            if method not in HTTP_METHODS:
                continue
            assert method.upper() in table._table[spec["x-handler"]], (path, method)
            assert spec["x-action"] in ACTIONS, (path, spec["x-action"])
            if "x-body" in spec:
                assert spec["x-body"] in doc["components"]["schemas"], (path, method)
    channel = doc["components"]["schemas"]["ChannelRequest"]["properties"]
    assert set(channel) == set(REQUEST_FIELDS)


async def test_steering_needs_the_steer_scope_and_reaches_the_dsn(
    keys: Keys, tmp_path: Path
) -> None:
    async with running_gateway(keys, tmp_path) as s:
        operator = keys.token("oscar", "p1", "stream.read stream.publish steer")
        code, ch, _ = await call(s.url, "POST", "/projects/p1/channels", operator, {"stream": "d"})
        assert code == 201
        member = keys.token("bob", "p1", "stream.read stream.publish")
        run = f"/projects/p1/channels/{ch['id']}/steer/run"
        code, body, _ = await call(s.url, "POST", run, member, {"running": False})
        assert code == 403 and "steer-own-project" in body["decision"]["reason"]
        # allowed by policy, forwarded; the DSN answers that this channel has no source control
        code, body, _ = await call(s.url, "POST", run, operator, {"running": False})
        assert code == 409 and body["reason"] == "no_source_control"
        param = f"/projects/p1/channels/{ch['id']}/steer/params/gain"
        code, body, _ = await call(s.url, "PUT", param, operator, {"value": 2})
        assert code == 409 and body["reason"] == "no_source_control"


@pytest.mark.timeout(90)
def test_bench_gateway_prints_the_agreed_json() -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "beamhub.bench.gateway",
            "--json",
            "--rounds",
            "2",
            "--seconds",
            "0.1",
        ],
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert [r["path"] for r in report["results"]] == ["bare", "full"]
    for row in report["results"]:
        assert row["req_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
    assert report["token_verify_us"] > 0
    assert report["audit_records"] >= 2  # the full path audited its requests, the bare did not


def test_start_and_stop_on_a_background_thread(keys: Keys) -> None:
    import socket
    import urllib.request

    from beamhub.hub.gateway.app import Gateway

    gateway = Gateway(keys.verifier)
    url = gateway.start(port=0)
    with urllib.request.urlopen(url + "/status", timeout=10) as resp:
        assert resp.status == 200 and json.load(resp)["enclave"] == "dev"
    port = int(url.split(":")[2].split("/")[0])
    gateway.stop()
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))
