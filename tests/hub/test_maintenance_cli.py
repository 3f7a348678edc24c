"""`beamhub maintenance add|list|cancel|ics` and `beamhub scheduler reservation approve --override`,
run as the real CLI on one reservation database."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from icalendar import Calendar

from tests.hub.hubstack import BEAMHUB


def _run(db: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BEAMHUB_SCHEDULER_RESERVATIONS": str(db), "BEAMHUB_HOME": str(db.parent)}
    env.pop("BEAMHUB_SCHEDULER_ADMINS", None)
    return subprocess.run(
        [BEAMHUB, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_maintenance_calendar_from_the_command_line(tmp_path: Path) -> None:
    db = tmp_path / "reservations.sqlite"
    bad = _run(
        db, "maintenance", "add", "--start", "+1h", "--end", "+3h", "--what", "x", "--down", "warp"
    )
    assert bad.returncode == 2 and "field down" in bad.stderr and "'warp'" in bad.stderr
    add = _run(
        db,
        "maintenance",
        "add",
        "--start",
        "+1h",
        "--end",
        "+3h",
        "--what",
        "chiller service",
        "--down",
        "scheduler,storage",
        "--as",
        "ops",
    )
    assert add.returncode == 0, add.stderr
    assert "maintenance 1 scheduled" in add.stdout and "stays up: hub, tokens" in add.stdout
    listed = json.loads(_run(db, "maintenance", "list", "--json").stdout)
    assert [(w["id"], w["down"]) for w in listed] == [(1, ["scheduler", "storage"])]

    req = _run(
        db,
        "scheduler",
        "reservation",
        "request",
        "--project",
        "p-1001",
        "--start",
        "+2h",
        "--end",
        "+4h",
        "--justification",
        "serial crystallography",
        "--as",
        "alice",
    )
    assert req.returncode == 0, req.stderr
    refused = _run(db, "scheduler", "reservation", "approve", "1", "--as", "root")
    assert refused.returncode == 2
    assert "window 1 of project 'p-1001'" in refused.stderr
    assert "maintenance 1 'chiller service'" in refused.stderr
    ok = _run(
        db,
        "scheduler",
        "reservation",
        "approve",
        "1",
        "--as",
        "root",
        "--override",
        "beam only this week",
    )
    assert ok.returncode == 0 and "approved by root" in ok.stdout, ok.stderr

    feed = _run(db, "maintenance", "ics")
    assert feed.returncode == 0
    uids = sorted(str(e["uid"]) for e in Calendar.from_ical(feed.stdout).walk("VEVENT"))
    assert uids == ["beamtime-1@beamhub", "maintenance-1@beamhub"]

    cancel = _run(db, "maintenance", "cancel", "1", "--reason", "moved", "--as", "ops")
    assert cancel.returncode == 0 and "cancelled by ops" in cancel.stdout
    assert "no maintenance scheduled" in _run(db, "maintenance", "list").stdout
    again = _run(db, "maintenance", "cancel", "1")
    assert again.returncode == 2 and "already cancelled" in again.stderr

    # another beamhub's feed (as taken above): its maintenance is imported, its beamtime is not;
    # importing it again adds nothing; a missing file is said plainly
    (tmp_path / "other.ics").write_text(feed.stdout)
    imported = _run(db, "maintenance", "import", str(tmp_path / "other.ics"), "--down", "network")
    assert imported.returncode == 0 and ": 1 added [2]" in imported.stdout, imported.stderr
    again = _run(db, "maintenance", "import", str(tmp_path / "other.ics"), "--down", "network")
    assert "0 added" in again.stdout and "1 already known" in again.stdout
    listed = json.loads(_run(db, "maintenance", "list", "--json").stdout)
    assert [(w["what"], w["down"]) for w in listed] == [
        ("Maintenance: chiller service", ["network"])
    ]
    missing = _run(db, "maintenance", "import", str(tmp_path / "nope.ics"), "--down", "network")
    assert missing.returncode == 2 and "cannot read" in missing.stderr
