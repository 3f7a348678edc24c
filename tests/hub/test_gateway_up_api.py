"""The gateway under a real `beamhub up` answers as its OpenAPI document says: a job's output comes
back (bounded), the public status shows the nodes and what runs on them, the served document is
valid OpenAPI, and a schema-driven run (Schemathesis, bounded) meets no server error."""

from __future__ import annotations

import sys
import time

import openapi_spec_validator
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup

from tests.hub.hubstack import RunningStack, login

pytestmark = pytest.mark.timeout(240)


def _token(stack: RunningStack, user: str, project: str, scopes: str) -> str:
    assert login(stack, user, f"{user}-dev")[1].status_code == 200
    r = requests.post(
        stack.tokens + "api/tokens",
        headers={"Authorization": f"token {stack.user_api_token(user)}"},
        json={"project": project, "scopes": scopes, "ttl": 600},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return r.json()["token"]


def _api(stack: RunningStack) -> str:
    return stack.urls["gateway"] + "api/v1"


def _call(stack: RunningStack, method: str, path: str, token: str | None = None, body=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = requests.request(method, _api(stack) + path, json=body, headers=headers, timeout=30)
    return r.status_code, (r.json() if r.content else None)


def _wait(stack: RunningStack, token: str, path: str, done, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        code, body = _call(stack, "GET", path, token)
        assert code == 200, body
        if done(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def test_job_output_and_the_nodes_it_runs_on(dev_stack: RunningStack) -> None:
    alice = _token(dev_stack, "alice", "p-1001", "jobs")
    jobs = "/projects/p-1001/jobs"
    # the README's example: print(42), then its output
    code, made = _call(
        dev_stack, "POST", jobs, alice, {"name": "hi", "argv": ["python3", "-c", "print(42)"]}
    )
    assert code == 201, made
    path = f"{jobs}/{made['job_id']}"
    job = _wait(dev_stack, alice, path, lambda j: j["state"] in ("completed", "failed"))
    assert job["state"] == "completed" and job["exit_code"] == 0, job
    code, out = _call(dev_stack, "GET", path + "/output", alice)
    assert code == 200, out
    assert out == {"job_id": made["job_id"], "text": "42\n", "size": 3, "truncated": False}

    # bounded: 200 000 bytes printed, the last 64 KiB come back, ending where the job ended
    big = "import sys; sys.stdout.write('x' * 199_995 + 'tail\\n')"
    code, made = _call(
        dev_stack, "POST", jobs, alice, {"name": "big", "argv": [sys.executable, "-c", big]}
    )
    assert code == 201, made
    path = f"{jobs}/{made['job_id']}"
    _wait(dev_stack, alice, path, lambda j: j["state"] in ("completed", "failed"))
    code, out = _call(dev_stack, "GET", path + "/output", alice)
    assert code == 200 and out["size"] == 200_000 and out["truncated"] is True, out
    assert len(out["text"]) == 64 * 1024 and out["text"].endswith("xtail\n")

    # another project's token sees no such job; a token without `jobs` is refused by policy
    carol = _token(dev_stack, "carol", "p-2002", "jobs")
    code, body = _call(dev_stack, "GET", f"/projects/p-2002/jobs/{made['job_id']}/output", carol)
    assert code == 404 and body["reason"] == "no_such_job", body
    reader = _token(dev_stack, "alice", "p-1001", "stream.read")
    code, body = _call(dev_stack, "GET", path + "/output", reader)
    assert code == 403 and body["reason"] == "policy", body

    # a running job shows on the public status, on its node, without its user or command
    code, made = _call(
        dev_stack,
        "POST",
        jobs,
        alice,
        {"name": "secret-name", "argv": [sys.executable, "-c", "import time; time.sleep(60)"]},
    )
    assert code == 201, made
    path = f"{jobs}/{made['job_id']}"
    try:
        job = _wait(dev_stack, alice, path, lambda j: j["state"] == "running")
        assert job["state"] == "running", job
        code, status = _call(dev_stack, "GET", "/status")
        assert code == 200
        names = [n["name"] for n in status["nodes"]]
        assert names == ["n1", "n2", "n3", "n4"], status["nodes"]
        [node] = [n for n in status["nodes"] if n["name"] == job["node"]]
        assert node["state"] == "busy" and node["jobs"] == len(node["running"]) >= 1, node
        mine = [r for r in node["running"] if r["since"] == job["start_time"]]
        assert mine == [
            {
                "project": "p-1001",
                "tier": job["spec"]["tier"],
                "kind": "job",
                "since": mine[0]["since"],
            }
        ], node
        assert "alice" not in str(status["nodes"]) and "secret-name" not in str(status["nodes"])
    finally:
        assert _call(dev_stack, "DELETE", path, alice)[0] == 204


def test_the_served_document_is_valid_openapi(dev_stack: RunningStack) -> None:
    r = requests.get(_api(dev_stack) + "/openapi.json", timeout=10)  # through the hub's proxy
    assert r.status_code == 200
    doc = r.json()
    openapi_spec_validator.validate(doc)  # raises, naming the fault
    assert doc["servers"] == [{"url": "/services/gateway/api/v1"}]
    assert "/projects/{project}/jobs/{job_id}/output" in doc["paths"]


def test_no_server_error_for_what_the_document_allows(dev_stack: RunningStack) -> None:
    """Schemathesis generates requests from the served document for every operation (a few per
    operation, no shrinking: under 2 minutes) with a member's read token; none may get a 5xx."""
    token = _token(dev_stack, "bob", "p-1001", "stream.read")
    schema = schemathesis.openapi.from_url(_api(dev_stack) + "/openapi.json")
    schema.config.update(base_url=_api(dev_stack), headers={"Authorization": f"Bearer {token}"})
    failures: list[str] = []
    calls = 0

    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=6,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def run(case) -> None:
            nonlocal calls
            calls += 1
            try:
                case.call_and_validate(checks=[not_a_server_error], timeout=30)
            except FailureGroup as exc:  # schemathesis' failures: keep going, report them all
                failures.append(f"{case.method} {case.formatted_path}: {str(exc)[:300]}")

        run()
    assert calls >= 6 * 10, calls  # every operation was exercised
    assert not failures, "\n".join(failures)
