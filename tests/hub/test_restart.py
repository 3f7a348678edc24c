"""Day two: `beamhub up` starts again on the same state dir after users have logged in."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.hub.hubstack import RunningStack, login

pytestmark = pytest.mark.timeout(300)

RESTART_YAML = """\
enclave: dev
hub: {port: 0}
dsn: {enabled: false}
detector: {enabled: false}
gateway: {enabled: false}
"""

#: user -> (groups, project roles, hub admin) that logging in through the IdP gives her
EXPECTED = {
    "alice": ({"p-1001", "p-1001:pi"}, ["beamhub-pi"], True),
    "bob": ({"p-1001", "p-1001:member"}, ["beamhub-member"], False),
    "carol": ({"p-2002", "p-2002:pi"}, ["beamhub-pi"], False),
}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[RunningStack]:
    stack = RunningStack(tmp_path, RESTART_YAML, "restart")
    try:
        yield stack
    finally:
        stack.stop()
        leftovers = stack.survivors()
        stack.kill_survivors()
        assert not leftovers, f"`beamhub up` left processes behind: {leftovers}"


def _users(stack: RunningStack) -> dict[str, tuple[set[str], list[str], bool]]:
    """Each user's groups, roles other than JupyterHub's admin role, and admin flag."""
    r = requests.get(f"{stack.hub}api/users", headers=stack.admin, timeout=10)
    assert r.status_code == 200, r.text
    return {
        u["name"]: (set(u["groups"]), sorted(set(u["roles"]) - {"admin"}), u["admin"])
        for u in r.json()
    }


def test_stack_starts_again_after_logins_with_the_same_users_and_roles(
    stack: RunningStack,
) -> None:
    stack.start()
    for user in EXPECTED:
        _, r = login(stack, user, f"{user}-dev")
        assert r.status_code == 200 and r.url.endswith("/hub/home"), (user, r.status_code)
    assert _users(stack) == EXPECTED

    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, then a service manager's stop
        assert stack.stop(sig=sig) == 0, stack.output()[-3000:]
        stack.start()  # raised with the log tail if the hub failed to start (KeyError: 'users')
        assert _users(stack) == EXPECTED, sig
        # and a known user logs in again on the restarted hub, keeping her roles
        _, r = login(stack, "bob", "bob-dev")
        assert r.status_code == 200 and r.url.endswith("/hub/home"), r.status_code
        assert _users(stack)["bob"] == EXPECTED["bob"]
