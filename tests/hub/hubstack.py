"""Test helpers: run `beamhub up` as a real subprocess and log in through the real OpenID provider."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

from beamhub.hub.login_client import request_server, sign_in
from beamhub.hub.up import totp

BEAMHUB = str(Path(sys.executable).with_name("beamhub"))


#: Folders made by :func:`service_dir` in this session (removed at its end by tests/conftest.py).
SERVICE_DIRS: list[Path] = []


def service_dir(name: str) -> Path:
    """A fresh folder for a stack's state (or a venv its services run from), outside pytest's
    temporary root: as root, `beamhub up` runs its services as beamhub-* accounts, which must
    pass through every folder above, and pytest keeps /tmp/pytest-of-root 0700 (another test
    session resets it). 0711 here: passage, no listing."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=f"beamhub-test-{name}-", dir="/tmp"))
    path.chmod(0o711)
    SERVICE_DIRS.append(path)
    return path


class RunningStack:
    """A `beamhub up` child process with its URLs, runtime secrets and every descendant seen."""

    def __init__(self, workdir: Path, yaml_text: str, name: str) -> None:
        self.state = service_dir(name) / "state"
        self.config = workdir / f"{name}.yaml"
        self.config.write_text(f"state_dir: {self.state}\n{yaml_text}")
        self.out_path = workdir / f"{name}.out"
        self.proc: subprocess.Popen | None = None
        self.seen: set[int] = set()
        self.urls: dict[str, str] = {}
        self.runtime: dict = {}

    def start(self, timeout: float = 120.0) -> RunningStack:
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                [BEAMHUB, "up", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "BEAMHUB_HOME": str(self.state)},
            )
        deadline = time.monotonic() + timeout
        while "beamhub up: running" not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"beamhub up did not start:\n{self.output()[-4000:]}")
            time.sleep(0.2)
        self.urls = json.loads((self.state / "runtime-urls.json").read_text())
        self.runtime = json.loads((self.state / "hub" / "runtime.json").read_text())
        self.remember()
        return self

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def remember(self) -> None:
        """Record every descendant now alive (servers started later are recorded when asked)."""
        if self.proc is None:
            return
        try:
            self.seen |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass

    @property
    def hub(self) -> str:
        return self.urls["hub"]

    @property
    def tokens(self) -> str:
        return self.urls["tokens"]

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"token {self.runtime['admin_api_token']}"}

    def user_api_token(self, user: str) -> str:
        r = requests.post(
            f"{self.hub}api/users/{user}/tokens",
            headers=self.admin,
            json={"expires_in": 900, "note": "test"},
            timeout=10,
        )
        assert r.status_code == 201, r.text
        return r.json()["token"]

    def stop(
        self, timeout: float = 60.0, sig: int = signal.SIGTERM, keep_servers: bool = False
    ) -> int | None:
        """Send `beamhub up` ``sig`` (SIGTERM, or SIGINT as Ctrl-C does); return its status.

        User servers outlive `beamhub up` by design (the next one re-attaches them): unless
        ``keep_servers``, they are stopped through the hub's API first, so nothing is left.
        """
        if self.proc is None:
            return None
        self.remember()
        if self.proc.poll() is None:
            if not keep_servers:
                self.stop_servers()
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def stop_servers(self, timeout: float = 60.0) -> None:
        """Stop every running user server through the hub's API and wait until they are gone."""
        try:
            users = requests.get(f"{self.hub}api/users", headers=self.admin, timeout=10).json()
        except (requests.RequestException, ValueError, KeyError):
            return
        for user in users:
            for name in user.get("servers") or {}:
                requests.delete(
                    f"{self.hub}api/users/{user['name']}/servers/{name}",
                    headers=self.admin,
                    timeout=30,
                )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            users = requests.get(f"{self.hub}api/users", headers=self.admin, timeout=10).json()
            if not any(u.get("servers") for u in users):
                return
            time.sleep(0.25)

    def survivors(self) -> list[psutil.Process]:
        alive = []
        for pid in sorted(self.seen):
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        return alive

    def kill_survivors(self) -> None:
        for p in self.survivors():
            p.kill()

    def stop_and_check(self) -> None:
        """Stop (user servers first) and fail if any process of this stack survives."""
        self.stop()
        leftovers = {p.pid: p for p in [*self.survivors(), *stack_processes(self.state)]}
        for proc in leftovers.values():
            proc.kill()
        assert not leftovers, f"`beamhub up` left processes behind: {list(leftovers.values())}"


def stack_processes(state: Path) -> list[psutil.Process]:
    """Every live process of the stack on ``state`` (by $BEAMHUB_HOME), user servers excepted."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            env = process_env(proc.info["pid"])
        except OSError:
            continue
        if env.get("BEAMHUB_HOME") != str(state) or "JUPYTERHUB_USER" in env:
            continue
        if "_jobwrap.py" in " ".join(proc.info["cmdline"] or []):
            continue  # a user server's job wrapper
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


#: (state dir, user) -> the last TOTP time step a test used (the IdP refuses a reused code)
_LAST_OTP_STEP: dict[tuple[str, str], int] = {}


def otp_code(stack: RunningStack, user: str) -> str:
    """A one-time code the dev IdP accepts now for ``user`` (never one a test already used).

    The IdP takes one step either side of now, so up to three logins per 30 s need no waiting.
    """
    secret = totp.load_secrets(stack.state)[user]
    key = (str(stack.state), user)
    while True:
        now = int(time.time() // totp.STEP_S)
        step = max(now - 1, _LAST_OTP_STEP.get(key, -10) + 1)
        if step <= now + 1:
            _LAST_OTP_STEP[key] = step
            return totp.code(secret, at=step * totp.STEP_S + 1)
        time.sleep(0.5)  # every usable code is spent: the next step brings a new one


def login(
    stack: RunningStack,
    user: str,
    password: str,
    otp: str | None = None,
    session: requests.Session | None = None,
) -> tuple[requests.Session, requests.Response]:
    """Browserless OIDC login (:func:`beamhub.hub.login_client.sign_in`); where the IdP asks for
    a one-time code, ``otp`` is sent, or else the right code is computed from the secrets
    `beamhub up` enrolled in the state dir."""
    return sign_in(
        stack.hub,
        user,
        password,
        otp if otp is not None else (lambda: otp_code(stack, user)),
        session,
    )


def spawn(
    stack: RunningStack,
    session: requests.Session,
    user: str,
    timeout: float = 90,
    options: dict[str, str] | None = None,
) -> dict:
    """Start the user's server through the hub's spawn page (its options form submitted with
    ``options``, the form's defaults for the rest); return the ready server model."""
    r = request_server(stack.hub, session, options)
    assert r.status_code == 200, (r.status_code, r.url, r.text[-2000:])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        model = requests.get(f"{stack.hub}api/users/{user}", headers=stack.admin, timeout=10).json()
        server = model["servers"].get("")
        if server and server["ready"]:
            stack.remember()
            return server
        time.sleep(0.25)
    raise AssertionError(f"{user}'s server was not ready within {timeout}s")


def process_env(pid: int) -> dict[str, str]:
    """The real environment of a running process (/proc/PID/environ)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def server_env(stack: RunningStack, user: str) -> dict[str, str]:
    """The environment of ``user``'s running single-user server, found among the stack's processes."""
    stack.remember()
    for pid in sorted(stack.seen):
        try:
            env = process_env(pid)
            cmdline = " ".join(psutil.Process(pid).cmdline())
        except (OSError, psutil.Error):
            continue
        if env.get("JUPYTERHUB_USER") == user and "jupyterhub-singleuser" in cmdline:
            return env
    raise AssertionError(f"no running server process of {user} under `beamhub up`")
