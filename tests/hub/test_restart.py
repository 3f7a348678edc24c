"""Day two: `beamhub up` starts again on the same state dir after users have logged in."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from tests.hub.hubstack import RunningStack, login, process_env, spawn

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
        stack.stop_and_check()


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


def _server_pid(stack: RunningStack, user: str) -> int:
    """The pid of ``user``'s jupyterhub-singleuser process (found by its environment)."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if "jupyterhub-singleuser" not in " ".join(proc.info["cmdline"] or []):
            continue
        try:
            if process_env(proc.info["pid"]).get("JUPYTERHUB_USER") == user:
                return proc.info["pid"]
        except OSError:
            continue
    raise AssertionError(f"no server process of {user}")


def test_running_servers_outlive_a_stop_and_are_reattached(stack: RunningStack) -> None:
    stack.start()
    session, r = login(stack, "alice", "alice-dev")
    assert r.status_code == 200
    spawn(stack, session, "alice")
    pid = _server_pid(stack, "alice")
    token = {"Authorization": f"token {stack.user_api_token('alice')}"}
    status_url = stack.hub.replace("/hub/", "/user/alice/api/status")
    assert requests.get(status_url, headers=token, timeout=10).status_code == 200

    assert stack.stop(sig=signal.SIGINT, keep_servers=True) == 0, stack.output()[-3000:]
    assert "1 user server(s) keep running" in stack.output()
    assert psutil.pid_exists(pid), "alice's server died with the stack"

    stack.start()
    model = requests.get(f"{stack.hub}api/users/alice", headers=stack.admin, timeout=10).json()
    assert model["servers"][""]["ready"], model
    assert _server_pid(stack, "alice") == pid  # the same process, re-attached, not a new one
    r = requests.get(status_url, headers=token, timeout=10)
    assert r.status_code == 200, r.text  # reachable through the new proxy
