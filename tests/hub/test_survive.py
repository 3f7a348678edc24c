"""Day two of `beamhub up`: a killed service comes back, stopping is total, servers outlive a hub.

Each test runs its own real `beamhub up` (IdP, DSN, proxy, JupyterHub, token service, gateway,
dashboard, detector as supervised processes) and attacks it as an operator's bad day would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from tests.hub.hubstack import (
    BEAMHUB,
    RunningStack,
    login,
    process_env,
    spawn,
    stack_processes,
)

pytestmark = pytest.mark.timeout(300)

YAML = """\
enclave: dev
hub: {port: 0}
tokens: {ttl: 60, revocation_poll: 1.0}
detector: {rate_hz: 5, shape: [64, 64], print_every_s: 1}
"""


def wait_for(check, timeout: float, what: str) -> float:
    """Seconds until ``check()`` is true; fails naming ``what`` after ``timeout``."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.1)
    return time.monotonic() - t0


def status(stack: RunningStack) -> dict:
    return json.loads((stack.state / "status.json").read_text())["services"]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[RunningStack]:
    running = RunningStack(tmp_path, YAML, "survive")
    try:
        yield running
    finally:
        running.stop_and_check()


def _answers(url: str, headers: dict | None = None) -> bool:
    try:
        return requests.get(url, headers=headers, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_every_killed_service_comes_back_within_10_s(stack: RunningStack) -> None:
    stack.start()
    public = stack.hub.replace("/hub/", "")
    probes = {
        "idp": lambda: _answers(stack.urls["idp"] + "/.well-known/openid-configuration"),
        "dsn": lambda: _answers(stack.urls["dsn"] + "/api/health"),
        "proxy": lambda: _answers(stack.hub + "api/"),
        "hub": lambda: _answers(stack.hub + "api/"),
        "tokens": lambda: _answers(stack.tokens + "jwks.json"),
        "gateway": lambda: _answers(public + "/services/gateway/api/v1/status"),
        "dashboard": lambda: _answers(public + "/services/dashboard/api/health"),
        # the restarted feed has published its channel (the one of before: analysis keeps it)
        "detector": lambda: (
            json.loads((stack.state / "detector" / "detector.json").read_text())["pid"]
            == status(stack)["detector"]["pid"]
        ),
    }
    channel = json.loads((stack.state / "detector" / "detector.json").read_text())["channel"]
    for name, probe in probes.items():
        before = status(stack)[name]
        os.kill(before["pid"], signal.SIGKILL)
        back = wait_for(
            lambda n=name, p=probe, old=before["pid"]: (
                status(stack)[n]["state"] == "running" and status(stack)[n]["pid"] != old and p()
            ),
            15,
            f"{name} back after kill -9",
        )
        assert back <= 10, f"{name} answered again only after {back:.1f} s"
        after = status(stack)[name]
        assert after["restarts"] == before["restarts"] + 1, name
        assert after["last_exit"] == -signal.SIGKILL, name
        assert f"{name} exited (signal 9); restart #{after['restarts']}" in stack.output()
    assert stack.proc.poll() is None  # beamhub up itself never stopped
    # the DSN kept the detector's channel across its restart (same id), and frames still flow
    assert (
        json.loads((stack.state / "detector" / "detector.json").read_text())["channel"] == channel
    )
    out = subprocess.run(
        [BEAMHUB, "status", "--state-dir", str(stack.state), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    restarts = {n: s["restarts"] for n, s in json.loads(out.stdout)["services"].items()}
    # each once, the hub too: `beamhub up` gives a new proxy the last one's routes itself
    assert restarts == dict.fromkeys(probes, 1)
    assert "the new proxy has the last one's" in stack.output()


def _server_pid(user: str) -> int:
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if "jupyterhub-singleuser" in " ".join(proc.info["cmdline"] or []):
            try:
                if process_env(proc.info["pid"]).get("JUPYTERHUB_USER") == user:
                    return proc.info["pid"]
            except OSError:
                continue
    raise AssertionError(f"no server process of {user}")


def test_a_user_server_keeps_running_and_answering_while_the_hub_is_down(
    stack: RunningStack,
) -> None:
    stack.start()
    session, _ = login(stack, "alice", "alice-dev")
    spawn(stack, session, "alice")
    pid = _server_pid("alice")
    headers = {"Authorization": f"token {stack.user_api_token('alice')}"}
    url = stack.hub.replace("/hub/", "/user/alice/api/status")
    assert _answers(url, headers)  # also caches alice's token in her server

    hub = status(stack)["hub"]["pid"]
    os.kill(hub, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(hub), 5, "the hub gone")
    assert _answers(url, headers), (
        "alice's server did not answer through the proxy while the hub was down"
    )
    wait_for(lambda: _answers(stack.hub + "api/"), 30, "the hub back")
    model = requests.get(f"{stack.hub}api/users/alice", headers=stack.admin, timeout=10).json()
    assert model["servers"][""]["ready"]
    assert _server_pid("alice") == pid  # never restarted, re-attached
    assert _answers(url, headers)


def test_kill_9_of_beamhub_up_takes_every_service_down(stack: RunningStack) -> None:
    stack.start()
    services = [s["pid"] for s in status(stack).values()]
    assert len(services) == 8
    os.kill(stack.proc.pid, signal.SIGKILL)
    stack.proc.wait(10)
    wait_for(lambda: not stack_processes(stack.state), 15, "every service gone (PDEATHSIG)")
    assert not any(
        psutil.pid_exists(p)
        for p in services
        if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    )
    stack.start()  # the ports are free again and the lock is released
    assert status(stack)["hub"]["state"] == "running"


def _run_piped(config: Path, state: Path, shell_tail: str, timeout: float = 120) -> str:
    proc = subprocess.run(
        f"{BEAMHUB} up {config} 2>&1 {shell_tail}",
        shell=True,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "BEAMHUB_HOME": str(state)},
    )
    return proc.stdout


def test_a_closed_output_pipe_stops_everything(tmp_path: Path) -> None:
    """`beamhub up | head -1`: head exits; beamhub up's next line hits a closed pipe."""
    stack = RunningStack(tmp_path, YAML, "piped")
    t0 = time.monotonic()
    out = _run_piped(stack.config, stack.state, "| head -1")
    assert out.startswith("beamhub up: dev enclave")
    assert time.monotonic() - t0 < 90
    wait_for(lambda: not stack_processes(stack.state), 15, "nothing left after the pipe closed")
    log = (stack.state / "logs" / "up.log").read_text()
    assert "output pipe closed" in log and "beamhub up: stopped" in log
    assert "Traceback" not in log and "BrokenPipeError" not in out


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT])
@pytest.mark.parametrize("delay", [0.5, 3.0, 8.0])
def test_a_signal_at_any_point_of_start_up_leaves_nothing(
    tmp_path: Path, sig: int, delay: float
) -> None:
    stack = RunningStack(tmp_path, YAML, "interrupted")
    with open(stack.out_path, "wb") as out:
        proc = subprocess.Popen(
            [BEAMHUB, "up", str(stack.config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "BEAMHUB_HOME": str(stack.state)},
        )
    try:
        time.sleep(delay)  # the point of start-up to interrupt, not a readiness signal
        proc.send_signal(sig)
        time.sleep(0.2)
        proc.send_signal(sig)  # an impatient second one must not orphan anything
        assert proc.wait(60) in (0, 130), stack.output()[-2000:]
        wait_for(lambda: not stack_processes(stack.state), 15, "nothing left")
        assert "beamhub up: stopped" in stack.output()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for leftover in stack_processes(stack.state):
            leftover.kill()


def test_the_detector_creates_its_channel_again_when_it_is_deleted(stack: RunningStack) -> None:
    stack.start()
    feed = stack.state / "detector" / "detector.json"
    old = json.loads(feed.read_text())["channel"]
    login(stack, "oscar", "oscar-dev")
    token = requests.post(
        stack.tokens + "api/tokens",
        headers={"Authorization": f"token {stack.user_api_token('oscar')}"},
        # an operator's steer scope: channels are deleted by their owner or a pi/operator
        json={
            "project": "p-1001",
            "scopes": ["stream.read", "stream.publish", "steer"],
            "ttl": 300,
        },
        timeout=10,
    ).json()["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    dsn = stack.urls["dsn"]
    assert (
        requests.delete(f"{dsn}/api/channels/{old}", headers=bearer, timeout=10).status_code == 204
    )
    wait_for(lambda: json.loads(feed.read_text())["channel"] != old, 15, "a new detector channel")
    new = json.loads(feed.read_text())["channel"]

    def frames() -> int:
        r = requests.get(f"{dsn}/api/channels/{new}", headers=bearer, timeout=5)
        stats = r.json().get("stats") if r.ok else None
        return (stats or {}).get("head_seq") or 0  # frames the detector sent into it

    wait_for(lambda: frames() > 5, 20, "frames in the new channel")
