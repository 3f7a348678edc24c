"""Gateway job get/cancel against an in-process LocalBackend (real processes): project-scoped."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from tests.hub.gateway_helpers import Keys, call, running_gateway

pytestmark = pytest.mark.timeout(60)


async def _state(url: str, path: str, token: str, want: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        code, job, _ = await call(url, "GET", path, token)
        assert code == 200, job
        if job["state"] == want or time.monotonic() > deadline:
            return job
        await asyncio.sleep(0.05)


async def test_get_and_cancel_stay_inside_the_tokens_project(tmp_path: Path) -> None:
    from beamhub.kernels.local import LocalBackend
    from beamhub.kernels.tier_policy import TierPolicy

    keys = Keys()
    sched = LocalBackend(tmp_path / "jobs.db", nodes=1, policy=TierPolicy(), poll_interval=0.05)
    try:
        async with running_gateway(keys, tmp_path, scheduler=sched) as s:
            alice, carol = keys.token("alice", "p1", "jobs"), keys.token("carol", "p2", "jobs")
            job = {
                "name": "sleep",
                "argv": [sys.executable, "-c", "import time; time.sleep(60)"],
                "env": {"SECRET_FOR_THE_JOB": "s3cr3t"},
            }
            code, body, _ = await call(s.url, "POST", "/projects/p1/jobs", alice, job)
            assert code == 201, body
            path = f"/projects/p1/jobs/{body['job_id']}"
            running = await _state(s.url, path, alice, "running")
            assert running["spec"]["user"] == "alice" and "env" not in running["spec"], running
            code, listed, _ = await call(s.url, "GET", "/projects/p1/jobs", alice)
            assert code == 200 and [j["spec"].get("env") for j in listed["jobs"]] == [None], listed
            for method in ("GET", "DELETE"):
                code, err, _ = await call(
                    s.url, method, f"/projects/p2/jobs/{body['job_id']}", carol
                )
                assert code == 404 and err["field"] == "job_id", err
            code, _, _ = await call(s.url, "DELETE", path, alice)
            assert code == 204
            assert (await _state(s.url, path, alice, "cancelled"))["state"] == "cancelled"
            code, err, _ = await call(s.url, "GET", "/projects/p1/jobs/12345", alice)
            assert code == 404 and "12345" in err["message"]
    finally:
        await sched.close(cancel_jobs=True)


async def test_jobs_stay_in_the_tokens_project_even_where_the_policy_lets_others_in(
    tmp_path: Path,
) -> None:
    from beamhub.hub.gateway.policy import load_policy
    from beamhub.kernels.local import LocalBackend
    from beamhub.kernels.tier_policy import TierPolicy

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\nrules:\n  - {id: any-jobs, effect: allow, actions: ['jobs.*'], scope: jobs}\n"
    )
    keys = Keys()
    sched = LocalBackend(tmp_path / "jobs.db", nodes=1, policy=TierPolicy(), poll_interval=0.05)
    try:
        async with running_gateway(keys, tmp_path, scheduler=sched, policy=load_policy(rules)) as s:
            carol = keys.token("carol", "p2", "jobs")
            job = {"name": "x", "argv": [sys.executable, "-c", "pass"], "tier": "batch"}
            for method, path, body in (
                ("POST", "/projects/p1/jobs", job),
                ("GET", "/projects/p1/jobs", None),
                ("GET", "/projects/p1/jobs/1", None),
            ):
                code, err, _ = await call(s.url, method, path, carol, body)
                assert (code, err["reason"], err.get("field")) == (403, "project", "project"), err
                assert "token's project 'p2'" in err["message"]
            assert await sched.list() == []
    finally:
        await sched.close(cancel_jobs=True)
