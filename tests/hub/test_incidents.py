"""Incidents: `beamhub incident open|update|close|list` as the real CLI on one database, the
gateway's public status over real HTTP, and the hub's banner of a real `beamhub up` stack."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import requests

from beamhub.kernels.incidents import IncidentLog
from tests.hub.gateway_helpers import Keys, call, running_gateway
from tests.hub.hubstack import BEAMHUB


def _run(db: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BEAMHUB_SCHEDULER_RESERVATIONS": str(db), "BEAMHUB_HOME": str(db.parent)}
    return subprocess.run(
        [BEAMHUB, "incident", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_incidents_from_the_command_line(tmp_path: Path) -> None:
    db = tmp_path / "reservations.sqlite"
    bad = _run(db, "open", "--title", "x", "--severity", "high", "--services", "dsn")
    assert bad.returncode == 2 and "field severity" in bad.stderr and "critical" in bad.stderr
    bad = _run(db, "open", "--title", "x", "--severity", "minor", "--services", "dsn,warp")
    assert bad.returncode == 2 and "field services" in bad.stderr and "'warp'" in bad.stderr
    first = _run(
        *(db, "open", "--title", "Lustre slow", "--severity", "minor", "--services", "storage"),
        *("--as", "ops"),
    )
    assert first.returncode == 0, first.stderr
    second = _run(
        *(db, "open", "--title", "DSN relay down", "--severity", "critical"),
        *("--services", "dsn,network", "--projects", "p-1001", "--message", "investigating"),
    )
    assert second.returncode == 0 and "incident 2 opened" in second.stdout, second.stderr
    listed = json.loads(_run(db, "list", "--json").stdout)
    assert [i["id"] for i in listed] == [2, 1]  # the critical one first
    assert listed[0]["projects"] == ["p-1001"] and listed[0]["services"] == ["dsn", "network"]

    up = _run(db, "update", "2", "--message", "relay replaced", "--severity", "major")
    assert up.returncode == 0 and "(major)" in up.stdout
    assert _run(db, "update", "2").returncode == 2  # --message is required
    closed = _run(db, "close", "1", "--message", "OST rebalanced", "--as", "ops")
    assert closed.returncode == 0 and "closed by ops" in closed.stdout
    again = _run(db, "close", "1")
    assert again.returncode == 2 and "already closed by ops" in again.stderr
    late = _run(db, "update", "1", "--message", "x")
    assert late.returncode == 2 and "open a new one" in late.stderr

    everything = {i["id"]: i for i in json.loads(_run(db, "list", "--all", "--json").stdout)}
    assert everything[1]["status"] == "closed" and everything[2]["severity"] == "major"
    timeline = [(u["message"], u.get("severity")) for u in everything[2]["updates"]]
    assert timeline == [("investigating", "critical"), ("relay replaced", "major")]
    assert [i["id"] for i in json.loads(_run(db, "list", "--json").stdout)] == [2]


async def test_open_incidents_are_on_the_public_status(tmp_path: Path) -> None:
    keys = Keys()
    async with running_gateway(keys, tmp_path) as s:
        incidents = IncidentLog(s.book.db_path)
        a = incidents.open("Hub login slow", "minor", ["hub"], "ops")
        b = incidents.open("Nodes lost", "critical", "scheduler", "ops", projects="p1")
        code, status, _ = await call(s.url, "GET", "/status")  # public: no token
        assert code == 200
        assert [(i["id"], i["severity"]) for i in status["incidents"]] == [
            (b.id, "critical"),
            (a.id, "minor"),
        ]
        assert status["incidents"][0]["projects"] == ["p1"]
        assert "opened_by" not in status["incidents"][0]  # who opened it stays private
        assert all("by" not in u for u in status["incidents"][0]["updates"])
        incidents.close(b.id, "ops", "nodes back")
        code, status, _ = await call(s.url, "GET", "/status")
        assert [i["title"] for i in status["incidents"]] == ["Hub login slow"]


def test_an_incident_reaches_the_hub_banner_of_a_real_stack(dev_stack) -> None:
    """Opened on the hub machine, the banner shows it at the next page view (to anyone, as it
    names no project), with its latest update; closed, it is gone."""
    env = {**os.environ, "BEAMHUB_HOME": str(dev_stack.state)}
    for name in ("BEAMHUB_SCHEDULER_RESERVATIONS", "BEAMHUB_SCHEDULER_STATE_DIR"):
        env.pop(name, None)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [BEAMHUB, "incident", *args], capture_output=True, text=True, env=env, timeout=60
        )

    opened = cli("open", "--title", "Detector link flapping", "--severity", "major")
    assert opened.returncode == 2 and "--services" in opened.stderr
    opened = cli(
        *("open", "--title", "Detector link flapping", "--severity", "major"),
        *("--services", "dsn,network"),
    )
    assert opened.returncode == 0, opened.stderr
    iid = opened.stdout.split()[1]
    try:
        assert cli("update", iid, "--message", "switch port replaced").returncode == 0
        page = requests.get(dev_stack.hub + "login", timeout=10)
        assert page.status_code == 200
        text = page.content.decode()
        assert (
            "Detector link flapping (affects: dsn, network) — latest: switch port replaced" in text
        )
        assert "Incident (major)" in text
    finally:
        assert cli("close", iid).returncode == 0
    assert "Detector link flapping" not in requests.get(dev_stack.hub + "login", timeout=10).text
