"""A dependency that is down: the gateway answers 503 with Retry-After for what needs it, and its
public status still answers and says what is down (with the supervisor's state of each service)."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web

from beamhub.hub.gateway.audit import AuditLog
from beamhub.hub.gateway.jobs import RETRY_AFTER_S
from beamhub.hub.gateway.service import build_gateway
from beamhub.kernels.hub_backend import HubScheduler
from beamhub.kernels.scheduler import JobInfo, JobSpec, JobState, Scheduler
from beamhub.streaming.dsn import DataStreamingNode
from tests.hub.gateway_helpers import ALL_SCOPES, Keys, call, running_gateway

pytestmark = pytest.mark.timeout(60)

CHANNEL = "/projects/p1/channels/ch-00ff"
DSN_CALLS = [
    ("GET", "/projects/p1/channels", None),
    ("POST", "/projects/p1/channels", {"stream": "det"}),
    ("GET", CHANNEL, None),
    ("DELETE", CHANNEL, None),
    ("POST", f"{CHANNEL}/renew", {"ttl": 60}),
    ("POST", f"{CHANNEL}/steer/run", {"running": False}),
    ("PUT", f"{CHANNEL}/steer/params/gain", {"value": 2}),
]
JOB = {"name": "j", "argv": [sys.executable, "-c", "pass"]}
JOB_CALLS = [
    ("GET", "/projects/p1/jobs", None),
    ("POST", "/projects/p1/jobs", JOB),
    ("GET", "/projects/p1/jobs/7", None),
    ("DELETE", "/projects/p1/jobs/7", None),
]


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_unavailable(answer: tuple, reason: str, what: str) -> None:
    code, body, headers = answer
    assert code == 503, (what, code, body)
    assert body["reason"] == reason, (what, body)
    assert body["message"].endswith(f"retry in {RETRY_AFTER_S} s"), (what, body)
    assert body["retry_after"] == RETRY_AFTER_S
    assert headers["Retry-After"] == str(RETRY_AFTER_S), (what, dict(headers))
    assert headers["Content-Type"].startswith("application/json")


async def test_a_stopped_dsn_is_a_503_for_channels_and_status_says_so(tmp_path: Path) -> None:
    keys = Keys()
    supervisor = {
        "pid": 4242,
        "updated": 1.0,
        "services": {
            "dsn": {
                "state": "restarting",
                "pid": None,
                "restarts": 2,
                "since": 10.0,
                "last_exit": -9,
                "last_exit_at": 11.0,
                "log": "/secret/path/dsn.log",
            },
            "gateway": {"state": "running", "pid": 99, "restarts": 0, "last_exit": None},
        },
    }
    (tmp_path / "status.json").write_text(json.dumps(supervisor))
    async with running_gateway(keys, tmp_path, state_dir=tmp_path) as s:
        operator = keys.token("oscar", "p1", ALL_SCOPES)
        code, status, _ = await call(s.url, "GET", "/status")
        assert code == 200 and status["dependencies"]["dsn"] == {"state": "up"}, status
        assert status["streams"]["dsn"] == "up"
        await s.dsn.stop()  # the DSN is gone: its port refuses connections

        for method, path, body in DSN_CALLS:
            answer = await call(s.url, method, path, operator, body)
            assert_unavailable(answer, "dsn_unavailable", f"{method} {path}")
            assert s.dsn.url.split("//")[1] in answer[1]["message"]  # names where it looked

        code, status, _ = await call(s.url, "GET", "/status")
        assert code == 200, status
        assert status["streams"] == {"dsn": "down"}
        assert status["dependencies"]["dsn"]["state"] == "down"
        assert "cannot be reached" in status["dependencies"]["dsn"]["message"]
        assert status["down"] == ["dsn"]
        assert status["services"]["dsn"] == {
            "state": "restarting",
            "pid": None,
            "restarts": 2,
            "since": 10.0,
            "last_exit": -9,
            "last_exit_at": 11.0,
        }  # the supervisor's view, without the path of its log
        assert status["services"]["gateway"]["state"] == "running"
        assert status["audit"] == {"torn_tails": 0}

        # the DSN back on the same port: the gateway forwards again, the status says up
        port = int(s.dsn.url.rsplit(":", 1)[1])
        again = DataStreamingNode(keys.verifier, reap_interval=0.2)
        await again.start(port)
        try:
            code, created, _ = await call(
                s.url, "POST", "/projects/p1/channels", operator, {"stream": "det"}
            )
            assert code == 201, created
            supervisor["services"]["dsn"].update(state="running", pid=4343)
            (tmp_path / "status.json").write_text(json.dumps(supervisor))
            code, status, _ = await call(s.url, "GET", "/status")
            assert status["streams"] == {"dsn": "up", "channels": 1}
            assert status["down"] == [] and status["services"]["dsn"]["pid"] == 4343
        finally:
            await again.stop()

        # a missing or garbled status.json leaves the status answering, without services
        for text in (None, "{not json", '["a list"]'):
            target = tmp_path / "status.json"
            if text is None:
                target.unlink()
            else:
                target.write_text(text)
            code, status, _ = await call(s.url, "GET", "/status")
            assert code == 200 and "services" not in status, (text, status)


async def test_an_unreachable_hub_is_a_503_for_jobs_and_status_says_so(tmp_path: Path) -> None:
    keys = Keys()
    hub = HubScheduler(f"http://127.0.0.1:{closed_port()}/hub/api", "gateway-service-token")
    async with running_gateway(keys, tmp_path, scheduler=hub) as s:
        alice = keys.token("alice", "p1", "jobs")
        for method, path, body in JOB_CALLS:
            answer = await call(s.url, method, path, alice, body)
            assert_unavailable(answer, "hub_unavailable", f"{method} {path}")
            assert "the hub's jobs API" in answer[1]["message"]
        code, status, _ = await call(s.url, "GET", "/status")
        assert code == 200, status
        assert status["dependencies"]["hub"]["state"] == "down"
        assert status["dependencies"]["dsn"] == {"state": "up"}
        assert status["down"] == ["hub"]
        assert "services" not in status  # no supervisor's status.json in this state dir


class StubHub(tornado.web.RequestHandler):
    """Stands in for a hub whose jobs API fails (its own 5xx), which a real hub cannot be made
    to do on demand: 500 with JupyterHub's JSON, or 503 when its scheduler is down."""

    def initialize(self, code: int) -> None:
        self.code = code

    def get(self, *_: str) -> None:
        self.set_status(self.code)
        self.finish({"status": self.code, "message": "squeue failed: slurmctld is down"})

    post = delete = get


@pytest.mark.parametrize(
    ("hub_code", "code", "reason"),
    [(500, 502, "scheduler_failed"), (503, 503, "scheduler_unavailable")],
)
async def test_the_hubs_own_failure_is_never_a_500(
    tmp_path: Path, hub_code: int, code: int, reason: str
) -> None:
    keys = Keys()
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(
        tornado.web.Application([(r"/hub/api/beamhub/jobs(/.*)?", StubHub, {"code": hub_code})])
    )
    server.add_sockets(sockets)
    hub = HubScheduler(f"http://127.0.0.1:{sockets[0].getsockname()[1]}/hub/api", "t")
    try:
        async with running_gateway(keys, tmp_path, scheduler=hub) as s:
            alice = keys.token("alice", "p1", "jobs")
            for method, path, body in JOB_CALLS:
                got, answer, headers = await call(s.url, method, path, alice, body)
                assert (got, answer["reason"]) == (code, reason), (method, path, answer)
                assert "slurmctld is down" in answer["message"]
                assert ("Retry-After" in headers) == (code == 503)
    finally:
        server.stop()


class PolicylessScheduler(Scheduler):
    """A scheduler with no tier policy, in this process: it keeps what it is given."""

    name = "policyless"

    def __init__(self) -> None:
        self.jobs: dict[str, JobInfo] = {}

    async def submit(self, spec: JobSpec) -> str:
        spec.validate()
        job_id = str(len(self.jobs) + 1)
        self.jobs[job_id] = JobInfo(job_id=job_id, spec=spec, state=JobState.PENDING)
        return job_id

    async def status(self, job_ids: list[str]) -> dict[str, JobInfo]:
        unknown = JobState.UNKNOWN
        return {j: self.jobs.get(j, JobInfo(job_id=j, spec=None, state=unknown)) for j in job_ids}

    async def cancel(self, job_id: str) -> None:
        self.jobs[job_id].state = JobState.CANCELLED

    async def list(self, project: str | None = None) -> list[JobInfo]:
        return [j for j in self.jobs.values() if project in (None, j.spec.project)]

    async def events(self):  # type: ignore[override]
        return
        yield

    async def close(self) -> None:
        return None


async def test_without_a_tier_policy_the_tier_must_be_named(tmp_path: Path) -> None:
    keys = Keys()
    sched = PolicylessScheduler()
    async with running_gateway(keys, tmp_path, scheduler=sched) as s:
        alice = keys.token("alice", "p1", "jobs")
        code, body, _ = await call(s.url, "POST", "/projects/p1/jobs", alice, JOB)
        assert (code, body["reason"], body["field"]) == (400, "missing_field", "tier"), body
        assert sched.jobs == {}  # never silently "interactive"
        code, body, _ = await call(s.url, "POST", "/projects/p1/jobs", alice, {**JOB, "tier": "b"})
        assert code == 201 and body == {"job_id": "1", "project": "p1", "tier": "b"}, body
        assert sched.jobs["1"].spec.user == "alice"


def test_gateway_policy_is_found_beside_beamhub_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gateway.policy resolves like dsn.template: beamhub.yaml's folder first, whatever the cwd."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "rules.yaml").write_text(
        "version: 1\nrules:\n  - {id: only-status, effect: allow, actions: [status.read]}\n"
    )
    (site / "beamhub.yaml").write_text("gateway: {policy: rules.yaml}\n")
    (tmp_path / "jwks.json").write_text(json.dumps(Keys().key.jwks()))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("JUPYTERHUB_API_URL", raising=False)
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    argv = ["--deployment", str(site / "beamhub.yaml"), "--state-dir", str(tmp_path / "state")]
    argv += ["--jwks", str(tmp_path / "jwks.json")]
    gateway, _, _, closers = build_gateway(argv)
    try:
        assert gateway.policy.source == str(site / "rules.yaml")
        assert [rule.id for rule in gateway.policy.rules] == ["only-status"]
        assert gateway.state_dir == tmp_path / "state"
    finally:
        for closer in closers:
            closer.close()
    # the shipped default policy, named relative to the package, is found too
    (site / "beamhub.yaml").write_text("gateway: {policy: hub/gateway/policies/default.yaml}\n")
    gateway, _, _, closers = build_gateway(argv)
    for closer in closers:
        closer.close()
    assert gateway.policy.source.endswith("hub/gateway/policies/default.yaml")


async def test_status_counts_a_torn_audit_tail_set_aside_at_start(tmp_path: Path) -> None:
    keys = Keys()
    with AuditLog(tmp_path / "audit.jsonl") as log:
        log.append(user="u", action="status.read", outcome="allow")
        log.append(user="u", action="status.read", outcome="allow")
    data = (tmp_path / "audit.jsonl").read_bytes()
    (tmp_path / "audit.jsonl").write_bytes(data[:-30])  # the crash tore record 2
    async with running_gateway(keys, tmp_path) as s:
        code, status, _ = await call(s.url, "GET", "/status")
        assert code == 200 and status["audit"] == {"torn_tails": 1}, status
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [r["seq"] for r in records] == [1, 2]  # record 1, then the status request's
