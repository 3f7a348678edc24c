"""Dask on the allocation: workers as jobs of the hub's local backend, scaled and shut down."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beamhub.bench.hubproc import Hub
from beamhub.kernels.backends import SchedulerConfig
from beamhub.kernels.dask_cluster import dask_workers_from_env, start_dask
from beamhub.kernels.local import read_jobs

PROJECTS = """
projects:
  sfx: {tiers: [interactive, batch], members: [erin]}
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dask-hub")
    state = workdir / "sched"
    (workdir / "projects.yaml").write_text(PROJECTS)
    config = f"""
c.ReservedNodeSpawner.state_dir = {str(state)!r}
c.ReservedNodeSpawner.backend_options = {{"nodes": 3}}
c.ReservedNodeSpawner.projects_file = {str(workdir / "projects.yaml")!r}
c.ReservedNodeSpawner.mem_mb = 256
"""
    hub = Hub(workdir, config, ["erin"])
    hub.state_dir = state
    hub.projects_file = str(workdir / "projects.yaml")
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()
        hub.cleanup_jobs(state)


@pytest.fixture
def in_erins_server(hub, monkeypatch):
    """The environment the spawner gives erin's server: her token, project, tier, scheduler."""
    code, _ = hub.api("POST", "/users/erin/server", {})
    assert code in (201, 202)
    hub.wait_server("erin", timeout=30)
    config = SchedulerConfig(
        backend="local",
        state_dir=str(hub.state_dir),
        options={"nodes": 3},
        projects_file=hub.projects_file,
    )
    for key, value in config.job_env(project="sfx", tier="interactive", user="erin").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("JUPYTERHUB_API_URL", f"{hub.url}/hub/api")
    # as narrow as the token JupyterHub gives a server (Spawner.server_token_scopes)
    server_token = hub.user_token(
        "erin", ["access:servers!server=erin/", "users:activity!user=erin"]
    )
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", server_token)
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/erin/")
    yield hub
    hub.api("DELETE", "/users/erin/server")


ENDED = {"cancelled": "ended", "completed": "ended"}


def worker_jobs(hub: Hub) -> dict[str, str]:
    jobs = read_jobs(hub.state_dir / "local-jobs.sqlite")
    return {j.job_id: j.state.value for j in jobs if j.spec.name.startswith("dask-worker-")}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


@pytest.mark.timeout(120)
def test_start_dask_computes_scales_down_and_shuts_down_its_jobs(in_erins_server):
    hub = in_erins_server
    client = start_dask(2, timeout=60, memory_mb=256)
    cluster = client.cluster
    try:
        # two workers, each a running job of erin's project and tier on its own virtual node
        jobs = read_jobs(hub.state_dir / "local-jobs.sqlite")
        workers = [j for j in jobs if j.spec.name.startswith("dask-worker-")]
        assert len(workers) == 2
        assert {(j.spec.project, j.spec.tier, j.spec.user) for j in workers} == {
            ("sfx", "interactive", "erin")
        }
        assert all(j.state.value == "running" for j in workers)
        assert len({j.node for j in workers}) == 2

        # something real: a sum over both workers
        futures = client.map(lambda x: x * x, range(100))
        assert client.submit(sum, futures).result(timeout=30) == sum(x * x for x in range(100))
        assert len({f.key for f in futures}) == 100
        who = client.run(lambda: __import__("os").environ.get("BEAMHUB_NODE"))
        assert sorted(who.values()) == sorted(j.node for j in workers)

        # the dashboard is linked through the hub's proxy and answers there
        link = client.dashboard_link
        assert link.startswith("/user/erin/proxy/") and link.endswith("/status")
        status, body = hub.get(link)
        assert status == 200 and b"bokeh" in body.lower()

        # scale down: one worker retires and its job is cancelled
        cluster.scale(1)
        wait_for(lambda: len(client.scheduler_info()["workers"]) == 1, 30, "one worker left")
        # (a retired worker may exit by itself before the cancel reaches it: either way it ended)
        wait_for(
            lambda: (
                sorted(ENDED.get(s, s) for s in worker_jobs(hub).values()) == ["ended", "running"]
            ),
            20,
            "the retired worker's job ended",
        )
        assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
    finally:
        client.close()
        cluster.close()
    # shutdown: no worker job is left holding a node
    wait_for(
        lambda: {ENDED.get(s, s) for s in worker_jobs(hub).values()} == {"ended"},
        20,
        "every worker job ended",
    )


@pytest.mark.timeout(90)
def test_workers_end_with_the_kernel_that_started_them(in_erins_server):
    hub = in_erins_server
    before = set(worker_jobs(hub))
    script = (
        "from beamhub.kernels.dask_cluster import start_dask\n"
        "client = start_dask(1, timeout=60, memory_mb=256)\n"
        "assert client.submit(lambda: 6 * 7).result(timeout=30) == 42\n"
        "print(client.cluster.job_ids()[0])\n"
        # no close(): the kernel just exits, as when its notebook is shut down
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=80,
        env=dict(os.environ),
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    job_id = done.stdout.strip().splitlines()[-1]
    assert job_id not in before
    wait_for(
        lambda: ENDED.get(worker_jobs(hub).get(job_id, ""), "") == "ended",
        20,
        "the kernel's worker job ended with it",
    )


@pytest.mark.timeout(60)
def test_workers_at_a_tier_not_held_are_refused_with_the_reason(in_erins_server, monkeypatch):
    monkeypatch.setenv("BEAMHUB_TIER", "beamtime")  # no approved window for project sfx
    with pytest.raises(TimeoutError, match="only held inside an approved beamtime window"):
        start_dask(1, timeout=5, memory_mb=256)


@pytest.mark.timeout(90)
def test_start_dask_without_a_count_starts_what_the_spawn_form_chose(in_erins_server, monkeypatch):
    hub = in_erins_server
    before = set(worker_jobs(hub))
    # the spawner sets this from the options form (kernels/spawner.py); 1 differs from the default 2
    monkeypatch.setenv("BEAMHUB_DASK_WORKERS", "1")
    client = start_dask(timeout=60, memory_mb=256)
    try:
        assert len(client.scheduler_info()["workers"]) == 1
        assert len(set(worker_jobs(hub)) - before) == 1
        assert client.submit(lambda: 6 * 7).result(timeout=30) == 42
    finally:
        client.cluster.close()
        client.close()


def test_a_bad_dask_worker_count_in_the_environment_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("BEAMHUB_DASK_WORKERS", "lots")
    with pytest.raises(ValueError, match=r"BEAMHUB_DASK_WORKERS: 'lots' is not a number"):
        start_dask()
    assert dask_workers_from_env({}) == 2
    assert dask_workers_from_env({"BEAMHUB_DASK_WORKERS": " 4 "}) == 4
    assert dask_workers_from_env({"BEAMHUB_DASK_WORKERS": "0"}) == 0
