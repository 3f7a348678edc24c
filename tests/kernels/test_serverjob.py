"""The job-side port report and the environment the spawner hands to jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from beamhub.kernels.backends import SchedulerConfig


@pytest.mark.timeout(30)
def test_report_names_the_port_the_server_then_binds(tmp_path):
    report = tmp_path / "port.json"
    probe = (
        "import os, socket, urllib.parse;"
        "u = urllib.parse.urlsplit(os.environ['JUPYTERHUB_SERVICE_URL']);"
        "s = socket.socket(); s.bind((u.hostname, u.port)); print(u.port, u.path)"
    )
    env = {
        **os.environ,
        "BEAMHUB_BIND_IP": "127.0.0.1",
        "BEAMHUB_NODE": "n7",
        "JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:0/user/x/",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "beamhub.kernels.serverjob",
            str(report),
            "--",
            sys.executable,
            "-c",
            probe,
        ],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert data["host"] == "127.0.0.1" and data["node"] == "n7"
    port, path = done.stdout.split()[-2:]
    assert int(port) == data["port"] and path == "/user/x/"


@pytest.mark.timeout(30)
def test_missing_command_dies_before_any_report(tmp_path):
    report = tmp_path / "port.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "beamhub.kernels.serverjob",
            str(report),
            "--",
            "/nonexistent/server",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 127
    assert "cannot start '/nonexistent/server': not found" in done.stderr
    assert not report.exists()


def test_job_env_round_trips_the_scheduler_config():
    config = SchedulerConfig(
        backend="local",
        state_dir="/x/sched",
        options={"nodes": 3},
        tiers_file="/x/tiers.yaml",
        projects_file="/x/p.yaml",
    )
    env = config.job_env(project="p1", tier="beamtime", user="ann")
    assert env["BEAMHUB_PROJECT"] == "p1" and env["BEAMHUB_TIER"] == "beamtime"
    back = SchedulerConfig.from_env(env)
    assert back.via == "hub"  # a job of the local backend submits through the hub
    assert (back.backend, back.state_dir, back.options, back.tiers_file, back.projects_file) == (
        "local",
        "/x/sched",
        {"nodes": 3},
        "/x/tiers.yaml",
        "/x/p.yaml",
    )
    with pytest.raises(Exception, match="BEAMHUB_SCHEDULER_OPTIONS is not JSON"):
        SchedulerConfig.from_env({"BEAMHUB_SCHEDULER_OPTIONS": "{nodes: 3"})


def test_backend_options_typo_is_refused_naming_the_option(tmp_path):
    from types import SimpleNamespace

    from traitlets import TraitError

    from beamhub.kernels.backends import check_backend_options
    from beamhub.kernels.scheduler import SchedulerError
    from beamhub.kernels.spawner import ReservedNodeSpawner

    with pytest.raises(TraitError, match=r"'nodez' not known to the local backend; it takes"):
        ReservedNodeSpawner(user=SimpleNamespace(name="ann"), backend_options={"nodez": 3})
    with pytest.raises(SchedulerError, match=r"'slurm_conf' not known to the local backend"):
        check_backend_options("local", {"slurm_conf": "/etc/slurm.conf"})
    check_backend_options("slurm", {"slurm_conf": "/etc/slurm.conf"})
    check_backend_options("local", {"nodes": 2})
