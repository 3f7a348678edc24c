"""The beamhub spawner on a real SLURM cluster (the one $SLURM_CONF points at)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from beamhub.bench.hubproc import Hub

pytestmark = pytest.mark.slurm

PROJECTS = """
projects:
  beam: {tiers: [interactive, batch], members: [sam]}
"""


@pytest.fixture(scope="module")
def slurm_hub(slurm_cluster, tmp_path_factory):
    conf = str(slurm_cluster.conf)
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # sbatch/squeue called by dask-jobqueue read it
    workdir = tmp_path_factory.mktemp("slurm-hub")
    (workdir / "projects.yaml").write_text(PROJECTS)
    config = f"""
c.ReservedNodeSpawner.backend = "slurm"
c.ReservedNodeSpawner.backend_options = {{"slurm_conf": {conf!r}, "poll_interval": 0.5}}
c.ReservedNodeSpawner.state_dir = {str(workdir / "sched")!r}
c.ReservedNodeSpawner.projects_file = {str(workdir / "projects.yaml")!r}
c.ReservedNodeSpawner.mem_mb = 256
"""
    hub = Hub(workdir, config, ["sam"])
    hub.start()
    try:
        yield hub
    finally:
        hub.api("DELETE", "/users/sam/server")
        hub.stop()
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf


def squeue_state(job_id: str) -> str:
    out = subprocess.run(
        ["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return out.stdout.strip()


@pytest.mark.timeout(120)
def test_server_runs_as_a_slurm_job_and_survives_a_hub_restart(slurm_hub):
    hub = slurm_hub
    code, _ = hub.api("POST", "/users/sam/server", {})
    assert code in (201, 202)
    events = hub.progress("sam", timeout=60)
    messages = [e.get("message", "") for e in events]
    assert events[-1].get("ready") is True, messages
    assert any(m.startswith("queued at tier interactive") for m in messages), messages
    state = hub.user_model("sam")["servers"][""]["state"]
    assert squeue_state(state["job_id"]) == "RUNNING"
    assert hub.get("/user/sam/api")[0] == 200

    hub.stop()
    hub.start()
    server = hub.wait_server("sam", timeout=30)
    assert server["state"]["job_id"] == state["job_id"]  # re-attached, same SLURM job
    assert hub.get("/user/sam/api")[0] == 200

    assert hub.api("DELETE", "/users/sam/server")[0] in (202, 204)
    deadline = time.monotonic() + 30
    while squeue_state(state["job_id"]) not in ("", "CANCELLED", "COMPLETED"):
        assert time.monotonic() < deadline, squeue_state(state["job_id"])
        time.sleep(0.2)


@pytest.mark.timeout(120)
def test_start_dask_on_slurm_runs_workers_in_the_tiers_partition(slurm_hub, monkeypatch, tmp_path):
    from beamhub.kernels.backends import SchedulerConfig
    from beamhub.kernels.dask_cluster import start_dask

    config = SchedulerConfig(
        backend="slurm",
        state_dir=str(tmp_path),
        options={"slurm_conf": os.environ["SLURM_CONF"], "interface": "lo"},
    )
    for key, value in config.job_env(project="beam", tier="interactive", user="sam").items():
        monkeypatch.setenv(key, value)
    client = start_dask(2, timeout=60, memory_mb=256)
    cluster = client.cluster
    try:
        assert client.submit(sum, range(10)).result(timeout=30) == 45
        jobs = subprocess.run(
            ["squeue", "-h", "-n", "dask-worker", "-o", "%i %P %T %k"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
        rows = [r.split(None, 3) for r in jobs if r.strip()]
        assert len(rows) == 2, rows
        assert {(r[1], r[2]) for r in rows} == {("interactive", "RUNNING")}
        assert all("project=beam" in r[3] and "tier=interactive" in r[3] for r in rows)
        cluster.scale(1)
        deadline = time.monotonic() + 30
        while len(client.scheduler_info()["workers"]) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        client.close()
        cluster.close()
    deadline = time.monotonic() + 30
    while any(squeue_state(r[0]) == "RUNNING" for r in rows):
        assert time.monotonic() < deadline, "worker jobs still running after close()"
        time.sleep(0.2)
