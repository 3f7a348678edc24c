"""The beamhub spawner in a real JupyterHub (subprocess, proxy, SQLite) on the local backend."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from beamhub.bench.hubproc import Hub
from beamhub.kernels.hub_backend import HubScheduler
from beamhub.kernels.local import read_jobs
from beamhub.kernels.reservations import ReservationBook
from beamhub.kernels.scheduler import JobSpec, JobState, SchedulerError

PROJECTS = """
projects:
  beam:   {tiers: [interactive, batch], members: [alice, broken, slowpoke]}
  beam2:  {tiers: [interactive, batch], members: [dave]}
  other:  {tiers: [batch], members: [carol]}
  filler: {tiers: [batch], members: [bob]}
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("spawner-hub")
    state = workdir / "sched"
    (workdir / "projects.yaml").write_text(PROJECTS)
    config = f"""
c.ReservedNodeSpawner.state_dir = {str(state)!r}
c.ReservedNodeSpawner.backend_options = {{"nodes": 2}}
c.ReservedNodeSpawner.projects_file = {str(workdir / "projects.yaml")!r}
c.ReservedNodeSpawner.mem_mb = 256
c.ReservedNodeSpawner.queue_timeout = 4

def _break_singleuser(spawner):
    # test configuration: this user's server command does not exist, so the job dies at once
    if spawner.user.name == "broken":
        spawner.cmd = ["/nonexistent/jupyterhub-singleuser"]
    if spawner.user.name == "slowpoke":  # runs, reports a port, never serves it
        spawner.cmd = ["/bin/sleep", "600"]

c.Spawner.pre_spawn_hook = _break_singleuser
"""
    hub = Hub(workdir, config, ["alice", "bob", "carol", "broken", "dave", "slowpoke"])
    hub.state_dir = state
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()
        hub.cleanup_jobs(state)


def jobs_api(hub: Hub, token: str, method: str, path: str = "", body: dict | None = None):
    req = urllib.request.Request(
        f"{hub.url}/hub/api/beamhub/jobs{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def jobs_named(hub: Hub, prefix: str) -> list:
    return [
        j for j in read_jobs(hub.state_dir / "local-jobs.sqlite") if j.spec.name.startswith(prefix)
    ]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def spawn(hub: Hub, user: str, options: dict | None = None) -> tuple[int, list[dict]]:
    """Request a spawn; the progress stream tells how it went (a refusal may come before the
    POST's answer, which is then 201, or after it, 202: the stream reports both)."""
    code, body = hub.api("POST", f"/users/{user}/server", options or {})
    if code not in (201, 202):
        return code, [body]
    return code, hub.progress(user)


def stop_server(hub: Hub, user: str) -> None:
    code, _ = hub.api("DELETE", f"/users/{user}/server")
    assert code in (202, 204), code
    wait_for(lambda: "" not in hub.user_model(user)["servers"], 20, f"{user}'s server stops")


@pytest.mark.timeout(60)
def test_spawn_reports_progress_and_server_answers(hub):
    code, events = spawn(hub, "alice")
    assert code == 202  # the spawn waits for the scheduler, the API answers at once
    messages = [e.get("message", "") for e in events]
    assert events[-1].get("ready") is True, messages
    assert any(m.startswith("queued at tier interactive") for m in messages), messages
    assert any(m.startswith("starting on n") for m in messages), messages
    status, body = hub.get("/user/alice/api")
    assert status == 200 and b"version" in body
    state = hub.user_model("alice")["servers"][""]["state"]
    assert state["tier"] == "interactive" and state["project"] == "beam"
    (job,) = [j for j in jobs_named(hub, "jupyter-alice") if j.job_id == state["job_id"]]
    assert job.state.value == "running" and job.node == state["node"]
    stop_server(hub, "alice")
    (job,) = [j for j in jobs_named(hub, "jupyter-alice") if j.job_id == state["job_id"]]
    assert job.state.value == "cancelled"


@pytest.mark.timeout(30)
def test_user_without_the_tier_is_refused_with_the_reason(hub):
    _, events = spawn(hub, "carol", {"tier": "interactive"})
    assert events[-1].get("failed") is True, events
    assert events[-1]["message"] == (
        "Spawn failed: user 'carol' does not hold tier 'interactive' in project 'other' "
        "(held: batch); ask the project's PI or an admin to grant it"
    )
    _, events = spawn(hub, "carol", {"tier": "beamtime"})
    assert events[-1].get("failed") is True, events
    assert "only held inside an approved beamtime window" in events[-1]["message"]
    assert not jobs_named(hub, "jupyter-carol")  # refused before anything was queued


@pytest.mark.timeout(30)
def test_job_that_dies_before_reporting_its_port_fails_promptly(hub):
    t0 = time.monotonic()
    _, events = spawn(hub, "broken")
    elapsed = time.monotonic() - t0
    assert events[-1].get("failed") is True, events
    message = events[-1]["message"]
    assert "failed, exit code 127 before its server was ready" in message, message
    assert "/nonexistent/jupyterhub-singleuser" in message and "not found" in message
    assert elapsed < 10, f"took {elapsed:.1f} s to fail"
    assert "" not in hub.user_model("broken")["servers"]
    (job,) = jobs_named(hub, "jupyter-broken")
    assert job.state.value == "failed"


@pytest.mark.timeout(90)
def test_hub_restart_reattaches_to_the_running_server(hub):
    _, events = spawn(hub, "alice")
    assert events[-1].get("ready") is True, events
    before = hub.user_model("alice")["servers"][""]["state"]
    hub.stop()
    # the hub is down; the job and its server are not
    direct = f"http://{before['host']}:{before['port']}/user/alice/api"
    with urllib.request.urlopen(direct, timeout=5) as resp:
        assert resp.status == 200
    hub.start()
    server = hub.wait_server("alice", timeout=20)
    assert server["state"]["job_id"] == before["job_id"]
    assert server["state"]["port"] == before["port"]
    status, _ = hub.get("/user/alice/api")
    assert status == 200
    running = [j for j in jobs_named(hub, "jupyter-alice") if j.state.value == "running"]
    assert [j.job_id for j in running] == [before["job_id"]]  # re-attached, no new job
    stop_server(hub, "alice")


@pytest.mark.timeout(90)
def test_beamtime_window_preempts_batch_and_outside_it_the_spawn_says_why(hub):
    token = hub.user_token("bob")
    batch = []
    for i in range(2):  # every virtual node busy with batch work
        code, body = jobs_api(
            hub,
            token,
            "POST",
            body={
                "name": f"batch-{i}",
                "project": "filler",
                "tier": "batch",
                "requeue": True,
                "argv": ["/bin/sleep", "600"],
                "mem_mb": 256,
            },
        )
        assert code == 201, body
        batch.append(body["job_id"])
    wait_for(
        lambda: all(j.state.value == "running" for j in jobs_named(hub, "batch-")),
        10,
        "batch jobs fill the nodes",
    )
    try:
        # outside a window: interactive may not preempt batch → a prompt refusal with the reason
        t0 = time.monotonic()
        code, events = spawn(hub, "dave")
        assert events[-1].get("failed") is True, events
        assert "No node for dave's server at tier interactive" in events[-1]["message"]
        assert "all 2 busy" in events[-1]["message"]
        assert time.monotonic() - t0 < 12
        # inside an approved window: beamtime preempts one batch job, which is requeued
        book = ReservationBook(hub.state_dir / "reservations.sqlite")
        now = time.time()
        wid = book.request(
            "beam2", now - 1, now + 3600, "beamtime", "serial crystallography", "dave"
        )
        book.approve(wid, "admin")
        code, events = spawn(hub, "dave")
        messages = [e.get("message", "") for e in events]
        assert events[-1].get("ready") is True, messages
        assert any(m.startswith("queued at tier beamtime") for m in messages), messages
        assert any(m.startswith("preempting 1 batch job on n") for m in messages), messages
        status, _ = hub.get("/user/dave/api")
        assert status == 200
        states = sorted((j.state.value, j.requeues) for j in jobs_named(hub, "batch-"))
        assert states == [("pending", 1), ("running", 0)]
        stop_server(hub, "dave")
        wait_for(
            lambda: all(j.state.value == "running" for j in jobs_named(hub, "batch-")),
            10,
            "the requeued batch job runs again once the node is free",
        )
    finally:
        for job_id in batch:
            jobs_api(hub, token, "DELETE", f"/{job_id}")


@pytest.mark.timeout(30)
def test_jobs_api_refuses_bad_input_and_other_users_jobs(hub):
    bob, carol = hub.user_token("bob"), hub.user_token("carol")
    code, body = jobs_api(
        hub,
        bob,
        "POST",
        body={"argv": ["/bin/true"], "tier": "batch", "project": "filler", "cores": 4},
    )
    assert code == 400 and "unknown job field(s) ['cores']" in body["message"]
    assert (body["status"], body["reason"], body["field"]) == (400, "unknown_field", "cores")
    code, body = jobs_api(
        hub, bob, "POST", body={"argv": "sleep 10", "tier": "batch", "project": "filler"}
    )
    assert code == 400 and body["message"].startswith("argv must be a non-empty list")
    assert (body["reason"], body["field"]) == ("scheduler", "argv")
    code, body = jobs_api(
        hub, bob, "POST", body={"argv": ["/bin/true"], "tier": "interactive", "project": "filler"}
    )
    assert code == 403 and body["message"].startswith("user 'bob' does not hold tier")
    assert (body["status"], body["reason"], body["field"]) == (403, "scheduler", "tier")
    code, body = jobs_api(hub, bob, "GET", "?user=carol")  # bob may not act for carol
    assert (code, body["reason"], body["field"]) == (403, "forbidden", "user"), body
    code, body = jobs_api(hub, bob, "DELETE", "/424242")
    assert (code, body["reason"], body["field"]) == (404, "no_such_job", "job_id"), body
    code, body = jobs_api(
        hub,
        bob,
        "POST",
        body={"argv": ["/bin/sleep", "30"], "tier": "batch", "project": "filler", "name": "mine"},
    )
    assert code == 201
    job_id = body["job_id"]
    try:
        assert jobs_api(hub, carol, "DELETE", f"/{job_id}")[0] == 404  # not hers
        assert jobs_api(hub, carol, "GET", f"/{job_id}") == (200, {})
        code, seen = jobs_api(hub, bob, "GET", f"?id={job_id}")
        assert code == 200 and seen[job_id]["spec"]["user"] == "bob"
        assert "env" not in seen[job_id]["spec"]  # a server's env holds its API token
    finally:
        assert jobs_api(hub, bob, "DELETE", f"/{job_id}")[0] == 204


@pytest.mark.timeout(30)
async def test_hub_scheduler_submits_through_the_jobs_api_and_names_the_field_at_fault(hub):
    """HubScheduler is the one client of the jobs API: a refusal is a SchedulerError with the
    hub's status and the field as its own attribute, not parsed out of the message."""
    sched = HubScheduler(f"{hub.url}/hub/api", hub.user_token("bob"))
    assert "token" not in repr(sched)

    def job(**changes) -> JobSpec:
        fields = dict(name="via-hub", project="filler", user="bob", tier="batch")
        fields.update(argv=["/bin/sleep", "30"], mem_mb=256, **changes)
        return JobSpec(**fields)

    try:
        with pytest.raises(SchedulerError) as err:
            await sched.submit(job(tier="interactive"))
        assert (err.value.status, err.value.field) == (403, "tier")
        assert err.value.message.startswith("user 'bob' does not hold tier 'interactive'")
        with pytest.raises(SchedulerError) as err:
            await sched.submit(job(walltime_s=10**7))
        assert (err.value.status, err.value.field) == (400, "walltime_s")
        with pytest.raises(SchedulerError) as err:
            await sched.for_user("carol").list()
        assert (err.value.status, err.value.field) == (403, "user")
        job_id = await sched.submit(job())
        info = await sched.wait(job_id, {JobState.RUNNING}, timeout=10)
        assert (info.spec.user, info.spec.project, info.spec.tier) == ("bob", "filler", "batch")
        assert job_id in {i.job_id for i in await sched.list("filler")}
        assert await sched.list("beam") == []
        await sched.cancel(job_id)
        assert (await sched.wait(job_id, {JobState.CANCELLED}, timeout=10)).done
        with pytest.raises(SchedulerError) as err:
            await sched.cancel("424242")
        assert (err.value.status, err.value.field) == (404, "job_id")
    finally:
        await sched.close()


@pytest.mark.timeout(90)
def test_hub_killed_mid_spawn_leaves_no_orphan_job(hub):
    code, _ = hub.api("POST", "/users/slowpoke/server", {})
    assert code == 202

    def recorded_job() -> str | None:
        """The job id in the hub's database: the spawner commits it right after submit(),
        which already started the job, so a running job alone does not mean it is recorded."""
        server = hub.user_model("slowpoke")["servers"].get("")
        return (server or {}).get("state", {}).get("job_id")

    job_id = wait_for(recorded_job, 20, "slowpoke's job is recorded in the hub's database")
    wait_for(
        lambda: [j.state.value for j in jobs_named(hub, "jupyter-slowpoke")] == ["running"],
        20,
        "slowpoke's job runs",
    )
    hub.kill()  # SIGKILL: no cleanup at all, the spawn was still waiting for the server
    (job,) = jobs_named(hub, "jupyter-slowpoke")
    assert (job.job_id, job.state.value) == (job_id, "running")
    hub.start()
    # the restarted hub finds the recorded job, sees that no server answers within
    # Spawner.http_timeout and stops it (stop() waits for the job to end) before it forgets
    # the server, instead of leaving the job on its node until its wall time
    wait_for(lambda: "" not in hub.user_model("slowpoke")["servers"], 60, "no server left")
    wait_for(
        lambda: [j.state.value for j in jobs_named(hub, "jupyter-slowpoke")] == ["cancelled"],
        10,
        "the half-spawned server's job is cancelled",
    )
