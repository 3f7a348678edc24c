"""The maintenance calendar through the gateway over real HTTP: admins schedule and cancel it,
approving beamtime over it is refused naming both windows (an admin's override is audited), and
both calendars are published as an iCalendar feed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from icalendar import Calendar

from tests.hub.gateway_helpers import Keys, call, running_gateway

H = 3600


@pytest.fixture
def keys() -> Keys:
    return Keys()


async def test_maintenance_blocks_beamtime_until_an_audited_override(
    keys: Keys, tmp_path: Path
) -> None:
    async with running_gateway(keys, tmp_path) as s:
        admin = keys.token("admin", "facility", "admin")
        pi = keys.token("alice", "p1", "reserve stream.read")
        now = time.time()
        # an approved beamtime first: new maintenance over it names the project it affects
        early = {"start": now + H, "end": now + 2 * H, "justification": "SFX on lysozyme, 1 h run"}
        code, first, _ = await call(s.url, "POST", "/projects/p1/reservations", pi, early)
        assert code == 201
        code, _, _ = await call(s.url, "POST", f"/reservations/{first['id']}/approve", admin, {})
        assert code == 200

        upgrade = {
            "start": now + 1.5 * H,
            "end": now + 5 * H,
            "what": "Lustre upgrade",
            "down": ["storage", "dashboard"],
        }
        code, body, _ = await call(s.url, "POST", "/maintenance", pi, upgrade)
        assert code == 403 and body["reason"] == "policy"  # a PI is no facility admin
        code, body, _ = await call(s.url, "POST", "/maintenance", admin, dict(upgrade, down=["x"]))
        assert code == 400 and body["field"] == "down.0" and "storage" in body["message"], body
        code, m, _ = await call(s.url, "POST", "/maintenance", admin, upgrade)
        assert code == 201, m
        assert m["affected_projects"] == ["p1"] and m["affected"][0]["id"] == first["id"]
        assert "dsn" in m["stays_up"] and m["down"] == ["storage", "dashboard"]

        code, listed, _ = await call(s.url, "GET", "/maintenance")  # public, no token
        assert code == 200 and [w["id"] for w in listed["maintenance"]] == [m["id"]]
        assert "created_by" not in listed["maintenance"][0]
        code, status, _ = await call(s.url, "GET", "/status")
        assert "Lustre upgrade" in [w["what"] for w in status["maintenance"]]

        later = {
            "start": now + 3 * H,
            "end": now + 4 * H,
            "justification": "pump-probe series, 1 h",
        }
        code, second, _ = await call(s.url, "POST", "/projects/p1/reservations", pi, later)
        assert code == 201
        approve = f"/reservations/{second['id']}/approve"
        code, body, _ = await call(s.url, "POST", approve, admin, {})
        assert code == 409 and body["field"] == "override", body
        assert f"window {second['id']} of project 'p1'" in body["message"]
        assert f"maintenance {m['id']} 'Lustre upgrade'" in body["message"]
        assert s.book.get(second["id"]).status == "requested"

        why = "the crystals do not keep; storage team agreed"
        code, body, _ = await call(s.url, "POST", approve, admin, {"override": why})
        assert code == 200 and body["status"] == "approved", body
        assert body["reason"] == f"approved over maintenance {m['id']}: {why}"
        records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        overrides = [r for r in records if r["action"] == "reservations.override_maintenance"]
        assert len(overrides) == 1 and why in overrides[0]["reason"]
        assert overrides[0]["user"] == "admin" and overrides[0]["project"] == "p1"

        # the feed: both calendars, public, parsed by an RFC 5545 reader
        code, raw, headers = await call(s.url, "GET", "/calendar.ics")
        assert code == 200 and headers["Content-Type"].startswith("text/calendar")
        cal = Calendar.from_ical(raw)
        summaries = sorted(str(e["summary"]) for e in cal.walk("VEVENT"))
        assert summaries == [
            "Beamtime: project p1 (beamtime)",
            "Beamtime: project p1 (beamtime)",
            "Maintenance: Lustre upgrade",
        ]
        assert b"lysozyme" not in raw  # justifications stay private

        cancel = f"/maintenance/{m['id']}/cancel"
        code, body, _ = await call(s.url, "POST", cancel, admin, {"reason": "vendor postponed"})
        assert code == 200 and body["state"] == "cancelled"
        code, body, _ = await call(s.url, "POST", cancel, admin, {})
        assert code == 409 and "already cancelled" in body["message"]
        code, listed, _ = await call(s.url, "GET", "/maintenance")
        assert listed["maintenance"] == []
        code, raw, _ = await call(s.url, "GET", "/calendar.ics")
        assert b"STATUS:CANCELLED" in raw  # subscribers drop it


def test_maintenance_reaches_the_hub_banner_and_the_gateway_of_a_real_stack(dev_stack) -> None:
    """`beamhub maintenance add` on the hub machine: JupyterHub's announcement banner shows it at
    the next page view, the gateway lists it; cancelled, both drop it (the stack is shared)."""
    import os
    import subprocess

    import requests

    from tests.hub.hubstack import BEAMHUB

    env = {**os.environ, "BEAMHUB_HOME": str(dev_stack.state)}
    for name in ("BEAMHUB_SCHEDULER_RESERVATIONS", "BEAMHUB_SCHEDULER_STATE_DIR"):
        env.pop(name, None)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [BEAMHUB, "maintenance", *args], capture_output=True, text=True, env=env, timeout=60
        )

    add = cli("add", "--start", "+1h", "--end", "+2h", "--what", "DSN relay swap", "--down", "dsn")
    assert add.returncode == 0, add.stderr
    mid = add.stdout.split()[1]
    try:
        page = requests.get(dev_stack.hub + "login", timeout=10)
        assert page.status_code == 200
        assert "announcement" in page.text and "DSN relay swap (down: dsn;" in page.text
        gateway = dev_stack.urls["gateway"] + "api/v1/maintenance"
        listed = requests.get(gateway, timeout=10).json()["maintenance"]
        assert [w["what"] for w in listed] == ["DSN relay swap"]
    finally:
        assert cli("cancel", mid).returncode == 0
    assert "DSN relay swap" not in requests.get(dev_stack.hub + "login", timeout=10).text
