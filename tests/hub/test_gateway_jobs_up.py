"""The gateway under a real `beamhub up`: jobs forwarded to the hub's scheduler for the token's
user, scoped to the token's project, audited; the maintenance windows of beamhub.yaml; and errors
in the one JSON shape even through configurable-http-proxy."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from urllib.parse import urlparse

import psutil
import pytest
import requests

from beamhub.kernels.jobs_handler import ACT_FOR_SCOPE
from tests.hub.conftest import DEV_MAINTENANCE
from tests.hub.hubstack import RunningStack, login, process_env

pytestmark = pytest.mark.timeout(180)


def _project_token(stack: RunningStack, user: str, project: str) -> str:
    """Log ``user`` in at the IdP, then mint a project token with the jobs scope."""
    assert login(stack, user, f"{user}-dev")[1].status_code == 200
    hub = {"Authorization": f"token {stack.user_api_token(user)}"}
    r = requests.post(
        stack.tokens + "api/tokens",
        headers=hub,
        timeout=10,
        json={"project": project, "scopes": "jobs", "ttl": 600},
    )
    assert r.status_code == 201, r.text
    return r.json()["token"]


def _gw(stack: RunningStack, method: str, path: str, token: str, body: dict | None = None):
    r = requests.request(
        method,
        stack.urls["gateway"] + "api/v1" + path,
        json=body,
        timeout=30,
        headers={"Authorization": f"Bearer {token}"},
    )
    return r.status_code, (r.json() if r.content else None)


def _wait_state(stack: RunningStack, token: str, path: str, states: set[str], timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        code, job = _gw(stack, "GET", path, token)
        assert code == 200, job
        if job["state"] in states or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


@pytest.fixture(scope="module")
def tokens(dev_stack: RunningStack) -> dict[str, str]:
    return {
        "alice": _project_token(dev_stack, "alice", "p-1001"),
        "carol": _project_token(dev_stack, "carol", "p-2002"),
    }


def test_submit_list_complete_and_cancel_through_the_gateway(
    dev_stack: RunningStack, tokens: dict[str, str]
) -> None:
    alice = tokens["alice"]
    job = {"name": "gw-print", "argv": [sys.executable, "-c", "print(42)"], "mem_mb": 128}
    code, body = _gw(dev_stack, "POST", "/projects/p-1001/jobs", alice, job)
    assert code == 201, body
    assert body["project"] == "p-1001" and body["tier"]
    done = _wait_state(
        dev_stack, alice, f"/projects/p-1001/jobs/{body['job_id']}", {"completed", "failed"}, 60
    )
    assert done["state"] == "completed" and done["exit_code"] == 0, done
    assert done["spec"]["user"] == "alice" and done["spec"]["project"] == "p-1001"
    assert "env" not in done["spec"]
    code, listed = _gw(dev_stack, "GET", "/projects/p-1001/jobs", alice)
    assert code == 200
    assert {j["job_id"]: j["state"] for j in listed["jobs"]}[body["job_id"]] == "completed"

    sleeper = {
        "name": "gw-sleep",
        "argv": [sys.executable, "-c", "import time; time.sleep(600)"],
        "mem_mb": 128,
    }
    code, long = _gw(dev_stack, "POST", "/projects/p-1001/jobs", alice, sleeper)
    assert code == 201, long
    path = f"/projects/p-1001/jobs/{long['job_id']}"
    assert _wait_state(dev_stack, alice, path, {"running"}, 30)["state"] == "running"
    code, none = _gw(dev_stack, "DELETE", path, alice)
    assert (code, none) == (204, None)
    assert _wait_state(dev_stack, alice, path, {"cancelled"}, 30)["state"] == "cancelled"

    # every decision audited with the token's jti and the user, never the token
    audit = (dev_stack.state / "audit.jsonl").read_text()
    assert alice not in audit
    records = [json.loads(line) for line in audit.splitlines()]
    cancels = [r for r in records if r["action"] == "jobs.cancel" and r["outcome"] == "allow"]
    assert cancels and cancels[-1]["user"] == "alice" and cancels[-1]["project"] == "p-1001"


def test_another_project_cannot_see_or_cancel_it(
    dev_stack: RunningStack, tokens: dict[str, str]
) -> None:
    alice, carol = tokens["alice"], tokens["carol"]
    job = {"name": "gw-private", "argv": [sys.executable, "-c", "print(1)"], "mem_mb": 128}
    code, body = _gw(dev_stack, "POST", "/projects/p-1001/jobs", alice, job)
    assert code == 201, body
    job_id = body["job_id"]
    code, listed = _gw(dev_stack, "GET", "/projects/p-2002/jobs", carol)
    assert code == 200 and job_id not in {j["job_id"] for j in listed["jobs"]}
    for method in ("GET", "DELETE"):
        code, err = _gw(dev_stack, method, f"/projects/p-2002/jobs/{job_id}", carol)
        assert code == 404 and err["reason"] == "no_such_job", err
    # alice's own token is for p-1001: her job is not in p-2002 either
    code, err = _gw(dev_stack, "GET", f"/projects/p-2002/jobs/{job_id}", alice)
    assert code == 403 and err["reason"] == "policy", err
    code, err = _gw(dev_stack, "GET", f"/projects/p-1001/jobs/{job_id}", carol)
    assert code == 403 and err["reason"] == "policy", err


def test_hub_refusals_come_back_as_clear_4xx(dev_stack: RunningStack, tokens: dict) -> None:
    """The hub's refusal keeps its status and its field (a key of its own, not in the prose)."""
    alice = tokens["alice"]
    bad = {"name": "gw-bad", "argv": ["/bin/true"], "tier": "no-such-tier"}
    code, err = _gw(dev_stack, "POST", "/projects/p-1001/jobs", alice, bad)
    assert 400 <= code < 500 and err["reason"] == "scheduler" and "no-such-tier" in err["message"]
    assert err["field"] == "tier" and not err["message"].startswith("tier:"), err
    long = {"name": "gw-long", "argv": ["/bin/true"], "walltime_s": 10**7}
    code, err = _gw(dev_stack, "POST", "/projects/p-1001/jobs", alice, long)
    assert (code, err["reason"], err["field"]) == (400, "scheduler", "walltime_s"), err
    assert err["message"].startswith("walltime_s=10000000 is over tier"), err
    code, err = _gw(dev_stack, "GET", "/projects/p-1001/jobs/999999", alice)
    assert code == 404 and "999999" in err["message"]
    assert (err["reason"], err["field"]) == ("no_such_job", "job_id"), err
    code, err = _gw(dev_stack, "POST", "/projects/p-1001/jobs", alice, {"name": "x", "argv": "ls"})
    assert code == 400 and err["field"] == "argv"


def test_only_the_gateway_may_name_another_user(dev_stack: RunningStack) -> None:
    assert login(dev_stack, "bob", "bob-dev")[1].status_code == 200
    bob = {"Authorization": f"token {dev_stack.user_api_token('bob')}"}
    jobs = dev_stack.hub + "api/beamhub/jobs"
    r = requests.get(jobs, params={"user": "alice"}, headers=bob, timeout=10)
    assert r.status_code == 403 and r.json()["field"] == "user", r.text
    body = {"user": "alice", "name": "x", "argv": ["/bin/true"], "project": "p-1001"}
    r = requests.post(jobs, json=body, headers=bob, timeout=10)
    assert r.status_code == 403 and "may not act for 'alice'" in r.json()["message"]
    r = requests.get(jobs, params={"user": "bob"}, headers=bob, timeout=10)  # himself: fine
    assert r.status_code == 200
    # the gateway service's own hub token holds the act-for scope and no admin scope
    (gateway,) = [
        p
        for p in psutil.Process(dev_stack.proc.pid).children(recursive=True)
        if "beamhub.hub.gateway.service" in " ".join(p.cmdline())
    ]
    service = {"Authorization": f"token {process_env(gateway.pid)['JUPYTERHUB_API_TOKEN']}"}
    scopes = requests.get(dev_stack.hub + "api/user", headers=service, timeout=10).json()["scopes"]
    assert ACT_FOR_SCOPE in scopes and not any(s.startswith("admin") for s in scopes), scopes
    r = requests.post(
        dev_stack.hub + "api/users/alice/tokens", headers=service, json={}, timeout=10
    )
    assert r.status_code == 403


def test_status_lists_the_maintenance_window_and_what_is_up(dev_stack: RunningStack) -> None:
    r = requests.get(dev_stack.urls["gateway"] + "api/v1/status", timeout=10)
    assert r.status_code == 200
    status = r.json()
    assert status["maintenance"] == DEV_MAINTENANCE
    # the gateway checks the services it needs: the DSN and the hub's API answer
    assert status["dependencies"]["dsn"] == {"state": "up"}, status
    assert status["dependencies"]["hub"] == {"state": "up"}, status
    assert status["down"] == [] and status["audit"]["torn_tails"] == 0, status


def _post_oversized(url: str, size: int) -> tuple[int, dict[str, str], bytes]:
    """POST ``size`` bytes (declared by Content-Length) while reading the answer, as a browser
    does; stop sending once the answer has come. Returns (status, headers, body)."""
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(
            f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
        )
        answered = threading.Event()

        def send_body() -> None:
            chunk, sent = b"x" * (1 << 16), 0
            try:
                while sent < size and not answered.is_set():
                    sent += s.send(chunk[: size - sent])
            except OSError:
                pass  # the far end stopped reading: what matters is the answer

        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536) or b"<closed>"
            assert not data.endswith(b"<closed>"), f"closed without an answer: {data[:300]!r}"
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin1").split("\r\n")
        headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            more = s.recv(65536)
            assert more, f"the answer was cut short: {head!r} {body!r}"
            body += more
        answered.set()
        sender.join(30)
    return int(lines[0].split()[1]), headers, body


def test_oversized_body_through_the_proxy_is_the_gateways_json_413(
    dev_stack: RunningStack,
) -> None:
    """80 MB to the gateway through the hub's configurable-http-proxy: the gateway's JSON 413,
    never the proxy's HTML 503 (which it shows when the gateway resets the connection)."""
    url = dev_stack.urls["gateway"] + "api/v1/projects/p-1001/jobs"
    assert urlparse(url).port == urlparse(dev_stack.hub).port  # the proxy, not the gateway
    for _ in range(3):  # the reset raced the answer: once is not enough to show it is gone
        status, headers, body = _post_oversized(url, 80_000_000)
        assert status == 413, (status, headers, body[:300])
        assert headers["content-type"].startswith("application/json"), headers
        error = json.loads(body)
        assert error["reason"] == "body_too_large" and error["limit"] == 64 * 1024, error
        assert "80000000 bytes" in error["message"]
