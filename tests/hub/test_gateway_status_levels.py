"""The gateway's public status: each service's uptime over 24 h and 7 d from the supervisor's
service records, and the maintenance under way now and next (a real gateway over HTTP)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.hub.gateway_helpers import Keys, call, running_gateway

pytestmark = pytest.mark.timeout(60)
H = 3600.0


async def test_status_shows_uptime_and_current_and_next_maintenance(tmp_path: Path) -> None:
    now = time.time()
    # dsn: up two days ago, down 3 h ago for 1 h; hub: up 10 d ago, stopped 8 d ago, up 12 h ago
    events = [
        ("dsn", "up", now - 48 * H),
        ("dsn", "down", now - 3 * H),
        ("dsn", "up", now - 2 * H),
        ("hub", "up", now - 240 * H),
        ("hub", "stop", now - 192 * H),
        ("hub", "up", now - 12 * H),
    ]
    (tmp_path / "service-events.jsonl").write_text(
        "".join(json.dumps({"time": t, "service": s, "event": e}) + "\n" for s, e, t in events)
        + '{"time": 1, "serv'  # a torn last line (a crash mid-write) is skipped
    )
    services = {"dsn": {"state": "running"}, "hub": {"state": "running"}}
    (tmp_path / "status.json").write_text(json.dumps({"services": services}))
    async with running_gateway(Keys(), tmp_path, state_dir=tmp_path) as s:
        ongoing = s.book.maintenance.add(now - H, now + H, "chiller", ["storage"], "ops")
        later = s.book.maintenance.add(now + 5 * H, now + 6 * H, "network", ["network"], "ops")
        early = s.book.maintenance.add(now + 2 * H, now + 3 * H, "firmware", ["dsn"], "ops")
        s.book.maintenance.cancel(early.id, "ops")  # cancelled: never "next"
        code, status, _ = await call(s.url, "GET", "/status")
    assert code == 200, status
    uptime = status["uptime"]["services"]
    assert status["uptime"]["source"] == "beamhub up's service records"
    # 24 h: dsn down 1 of 24 h; 7 d: recorded for 48 h of which 1 h down; hub up all it was seen
    assert uptime["dsn"]["24h"] == pytest.approx(100 * 23 / 24, abs=0.01)
    assert uptime["dsn"]["7d"] == pytest.approx(100 * 47 / 48, abs=0.01)
    assert uptime["hub"] == {"24h": 100.0, "7d": 100.0}
    assert [m["id"] for m in status["maintenance_now"]] == [ongoing.id]
    assert status["maintenance_next"]["id"] == later.id
    assert status["maintenance_next"]["what"] == "network"
