"""The CLI against a real `beamhub up`, as a user's shell meets it: the DSN found from the state
folder, the detector's channel by its name, the monitor face by default."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests

from tests.hub.hubstack import RunningStack, login

pytestmark = pytest.mark.timeout(180)

CLI = [sys.executable, "-m", "beamhub.hub.cli"]


def _read_token(stack: RunningStack, user: str = "alice") -> str:
    assert login(stack, user, f"{user}-dev")[1].status_code == 200
    r = requests.post(
        stack.tokens + "api/tokens",
        headers={"Authorization": f"token {stack.user_api_token(user)}"},
        json={"project": "p-1001", "scopes": "stream.read", "ttl": 300},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return r.json()["token"]


def test_consume_the_detector_by_name_from_the_running_stack(dev_stack: RunningStack) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BEAMHUB_DSN_URL"}
    env.update(BEAMHUB_HOME=str(dev_stack.state), BEAMHUB_TOKEN=_read_token(dev_stack))
    urls = subprocess.run(
        [*CLI, "urls", "dsn"], env=env, capture_output=True, text=True, timeout=30
    )
    assert urls.returncode == 0 and urls.stdout.strip() == dev_stack.urls["dsn"], urls.stderr
    done = subprocess.run(
        [*CLI, "consume", "--channel", "detector", "--count", "3", "--timeout", "60", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    assert "consuming monitor stream" in done.stderr, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["frames"] == 3 and summary["malformed"] == 0, summary
