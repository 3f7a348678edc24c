"""The supervisor of `beamhub up` with real processes: restart with backoff, stop, parent death."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import requests

from beamhub.hub.up.stack import free_port
from beamhub.hub.up.supervisor import ServiceSpec, Supervisor, SupervisorError

pytestmark = pytest.mark.timeout(60)


def _http_spec(tmp_path: Path, port: int, name: str = "web") -> ServiceSpec:
    def ready() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/", timeout=1).ok
        except requests.RequestException:
            return False

    return ServiceSpec(
        name=name,
        argv=[sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        log_path=tmp_path / f"{name}.log",
        cwd=tmp_path,
        ready=ready,
        ready_timeout=20,
    )


async def _wait(check, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_a_killed_child_is_restarted_and_status_says_so(tmp_path: Path) -> None:
    said: list[str] = []
    sup = Supervisor(tmp_path / "status.json", say=said.append, backoff=(0.2, 0.4))
    port = free_port()
    child = await sup.start(_http_spec(tmp_path, port))
    first = child.proc.pid
    try:
        os.kill(first, signal.SIGKILL)
        await _wait(lambda: child.state == "running" and child.proc.pid != first)
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).ok
        status = json.loads((tmp_path / "status.json").read_text())["services"]["web"]
        assert status["restarts"] == 1 and status["last_exit"] == -signal.SIGKILL
        assert status["pid"] == child.proc.pid
        assert any("web exited (signal 9); restart #1" in line for line in said), said
        assert any("web is back" in line for line in said), said
    finally:
        await sup.stop()
    assert not psutil.pid_exists(child.proc.pid) or psutil.Process(child.proc.pid).status() == (
        psutil.STATUS_ZOMBIE
    )
    assert json.loads((tmp_path / "status.json").read_text())["services"]["web"]["state"] == (
        "stopped"
    )


async def test_a_child_that_dies_while_starting_is_an_error_naming_its_log(
    tmp_path: Path,
) -> None:
    sup = Supervisor(tmp_path / "status.json", say=lambda _: None)
    spec = ServiceSpec(
        name="broken",
        argv=[sys.executable, "-c", "import sys; print('no config'); sys.exit(3)"],
        log_path=tmp_path / "broken.log",
        ready=lambda: False,
    )
    with pytest.raises(SupervisorError, match=r"broken exited with status 3.*broken\.log"):
        await sup.start(spec)
    await sup.stop()
    assert "no config" in (tmp_path / "broken.log").read_text()


async def test_stop_ends_the_childs_whole_process_group(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "status.json", say=lambda _: None)
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('up', flush=True); time.sleep(60)"
    spec = ServiceSpec(
        name="parent", argv=[sys.executable, "-c", script], log_path=tmp_path / "p.log"
    )
    child = await sup.start(spec)
    await _wait(lambda: "up" in (tmp_path / "p.log").read_text())
    grandchildren = psutil.Process(child.proc.pid).children(recursive=True)
    assert grandchildren
    await sup.stop()
    _gone, alive = psutil.wait_procs(grandchildren, timeout=5)
    assert not alive


def test_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    """kill -9 of the supervising process: PR_SET_PDEATHSIG takes its children down too."""
    program = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from beamhub.hub.up.supervisor import ServiceSpec, Supervisor

        async def main():
            sup = Supervisor(Path({str(tmp_path / "status.json")!r}), say=lambda _: None)
            child = await sup.start(ServiceSpec(
                name="sleeper", argv=[sys.executable, "-c", "import time; time.sleep(120)"],
                log_path=Path({str(tmp_path / "s.log")!r})))
            print(child.proc.pid, flush=True)
            await asyncio.sleep(120)

        asyncio.run(main())
        """
    )
    boss = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(boss.stdout.readline())
        assert psutil.pid_exists(pid)
        boss.kill()
        boss.wait(10)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the child outlived its supervisor"
            time.sleep(0.05)
    finally:
        boss.kill()
