"""`beamhub up` smoke test: progress and URLs printed, hub answers, one instance only, clean SIGTERM."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests

from beamhub.hub.up.lock import AlreadyRunning, UpLock
from tests.hub.hubstack import BEAMHUB, RunningStack, service_dir

pytestmark = pytest.mark.timeout(180)


def test_progress_urls_and_logins_printed(moderate_stack: RunningStack) -> None:
    out = moderate_stack.output()
    for n, part in ((1, "identity provider"), (3, "JupyterHub"), (4, "token service")):
        assert f"[{n}/7] {part} ... ready in " in out
    steps = re.findall(r"^\[(\d)/7\] .* \.\.\.$", out, re.M)  # each step announced once
    assert steps == sorted(set(steps)) and steps[-1] == "7", steps
    assert "[2/7] data streaming node ... ready" not in out  # dsn.enabled: false
    for url in (moderate_stack.hub, moderate_stack.tokens, moderate_stack.urls["idp"]):
        assert url in out
    assert "alice    / alice-dev" in out
    assert "the moderate enclave requires MFA" in out
    assert "WARNING: the embedded dev identity provider" in out
    r = requests.get(moderate_stack.hub + "api/", timeout=10)
    assert r.status_code == 200 and "version" in r.json()
    assert requests.get(moderate_stack.tokens + "jwks.json", timeout=10).status_code == 200


def test_second_instance_refuses(moderate_stack: RunningStack) -> None:
    proc = subprocess.run(
        [BEAMHUB, "up", str(moderate_stack.config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "BEAMHUB_HOME": str(moderate_stack.state)},
    )
    assert proc.returncode == 1
    assert "already running" in proc.stderr
    assert f"pid {moderate_stack.proc.pid}" in proc.stderr
    assert moderate_stack.hub in proc.stderr
    assert moderate_stack.proc.poll() is None  # the first one is untouched


def test_bad_deployment_file_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "beamhub.yaml"
    bad.write_text("hub: {port: 0, colour: blue}\n")
    proc = subprocess.run([BEAMHUB, "up", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "hub.colour: unknown key" in proc.stderr


def test_lock_is_released_when_its_process_dies(tmp_path: Path) -> None:
    path = tmp_path / "beamhub-up.lock"
    child = subprocess.Popen(
        [
            "python3",
            "-c",
            f"import fcntl,os,time; fd=os.open({str(path)!r}, os.O_RDWR|os.O_CREAT);"
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'{\"pid\": 1}'); print('x', flush=True);"
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout.readline() == b"x\n"
        with pytest.raises(AlreadyRunning):
            UpLock(path).acquire()
    finally:
        child.kill()
        child.wait()
    lock = UpLock(path)
    lock.acquire()  # a dead holder never blocks the next run
    lock.release()


def test_sigterm_stops_everything_without_orphans(moderate_stack: RunningStack) -> None:
    """Runs last in this session's moderate stack: stops it and checks every process it started."""
    moderate_stack.remember()
    assert len(moderate_stack.seen) >= 3  # IdP, JupyterHub, proxy, token service (+ servers)
    t0 = time.monotonic()
    status = moderate_stack.stop(timeout=60)
    assert status == 0, moderate_stack.output()[-2000:]
    assert time.monotonic() - t0 < 45
    assert moderate_stack.survivors() == []
    assert "beamhub up: stopped" in moderate_stack.output()
    with pytest.raises(requests.ConnectionError):
        requests.get(moderate_stack.hub + "api/", timeout=5)
    lock = UpLock(moderate_stack.state / "beamhub-up.lock")
    lock.acquire()
    lock.release()


def test_busy_hub_port_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "beamhub.yaml"
        cfg.write_text(f"state_dir: {service_dir('busy') / 'state'}\nhub: {{port: {port}}}\n")
        proc = subprocess.run([BEAMHUB, "up", str(cfg)], capture_output=True, text=True, timeout=90)
    assert proc.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in proc.stderr
    assert "stopped" in proc.stdout
