"""A throwaway JupyterHub (subprocess, configurable-http-proxy, SQLite) for tests and benchmarks.

configurable-http-proxy is the one `beamhub up` uses: installed on first use into the beamhub
state dir (:mod:`beamhub.hub.up.npm`), so this works from a wheel as well as from the checkout.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from beamhub.auth.home import state_dir
from beamhub.hub.up import npm

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hub:
    """Start/stop/restart a JupyterHub process; call its REST API with an admin service token.

    ``node_state``: where the npm packages are (installed on first use); default the beamhub
    state dir (``$BEAMHUB_HOME``, else ``~/.beamhub``), shared with `beamhub up`.
    """

    def __init__(
        self,
        workdir: Path,
        spawner_config: str,
        users: list[str],
        node_state: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.node_state = Path(node_state) if node_state is not None else state_dir()
        self.chp = npm.bin_path(self.node_state, "configurable-http-proxy")
        self.token = secrets.token_hex(16)
        self.port, self.hub_port, self.api_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.users = users
        self.config = workdir / "jupyterhub_config.py"
        self.config.write_text(self._config_text(spawner_config))
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "hub.log"

    def _config_text(self, spawner_config: str) -> str:
        return f"""
c = get_config()  # noqa
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {self.port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {self.hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.api_port}"
c.ConfigurableHTTPProxy.command = [{str(self.chp)!r}]
c.ConfigurableHTTPProxy.auth_token = {secrets.token_hex(16)!r}
c.JupyterHub.db_url = "sqlite:///{self.workdir / "jupyterhub.sqlite"}"
c.JupyterHub.cookie_secret = bytes.fromhex({secrets.token_hex(32)!r})
c.JupyterHub.pid_file = "{self.workdir / "hub.pid"}"
c.JupyterHub.cleanup_servers = False
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allowed_users = {set(self.users)!r}
c.JupyterHub.services = [{{"name": "beamhub-test", "api_token": {self.token!r}}}]
c.JupyterHub.load_roles = [{{
    "name": "beamhub-test-admin",
    "scopes": ["admin:users", "admin:servers", "read:users", "access:servers", "tokens",
               "read:users:activity", "admin:server_state"],
    "services": ["beamhub-test"],
}}]
c.JupyterHub.spawner_class = "beamhub"
c.Spawner.http_timeout = 20
c.Spawner.poll_interval = 2
# POST /users/x/server answers 202 at once, so callers can follow the progress stream
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}
from beamhub.kernels import jobs_handler as jobs_api
c.JupyterHub.extra_handlers = jobs_api.HANDLERS
{spawner_config}
"""

    # -- process -------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        """Start the hub (installing the proxy first if needed); wait until its API answers."""
        npm.ensure_installed(self.node_state, lambda line: print(line, file=sys.stderr, flush=True))
        env = dict(os.environ)
        env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "jupyterhub"), "-f", str(self.config)],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hub exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if self.api("GET", "/")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"hub did not answer within {timeout} s:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM the hub (it stops its proxy; servers keep running: cleanup_servers=False)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc = None

    def cleanup_jobs(self, state_dir: Path) -> None:
        """Cancel every job the hub's local backend left running (after ``stop``)."""
        import asyncio

        from beamhub.kernels.local import LocalBackend

        db = Path(state_dir) / "local-jobs.sqlite"
        if db.exists():
            asyncio.run(LocalBackend(db_path=db).close(cancel_jobs=True))

    def user_token(self, user: str, scopes: list[str] | None = None) -> str:
        """A new API token of ``user``; ``scopes`` narrows it (e.g. to a server token's)."""
        request: dict = {"note": "beamhub test"}
        if scopes is not None:
            request["scopes"] = scopes
        code, body = self.api("POST", f"/users/{user}/tokens", request)
        if code != 201:
            raise RuntimeError(f"cannot create a token for {user}: {code} {body}")
        return body["token"]

    def kill(self) -> None:
        """SIGKILL the hub alone (a crash): its proxy and servers are left as they are."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=5)
            self.proc = None

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # -- REST API ------------------------------------------------------------------------------
    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 10):
        req = urllib.request.Request(
            f"{self.url}/hub/api{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode(errors="replace")

    def get(self, url_path: str, timeout: float = 10) -> tuple[int, bytes]:
        """GET a path through the public proxy with the admin token (e.g. /user/x/api)."""
        req = urllib.request.Request(
            f"{self.url}{url_path}", headers={"Authorization": f"token {self.token}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def progress(self, user: str, timeout: float = 60) -> list[dict]:
        """Read the spawn's progress event stream until it reports ready or failed."""
        req = urllib.request.Request(
            f"{self.url}/hub/api/users/{user}/server/progress",
            headers={"Authorization": f"token {self.token}"},
        )
        events = []
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for line in resp:
                line = line.decode().strip()
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                events.append(event)
                if event.get("ready") or event.get("failed"):
                    break
        return events

    def user_model(self, user: str) -> dict:
        code, model = self.api("GET", f"/users/{user}")
        assert code == 200, (code, model)
        return model

    def wait_server(self, user: str, timeout: float = 30) -> dict:
        """Poll until the user's default server is ready (or its spawn failed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            server = self.user_model(user)["servers"].get("")
            if server is None:
                raise AssertionError(f"{user}'s spawn ended without a server:\n{self.tail()}")
            if server.get("ready"):
                return server
            time.sleep(0.1)
        raise AssertionError(f"{user}'s server not ready within {timeout} s:\n{self.tail()}")
