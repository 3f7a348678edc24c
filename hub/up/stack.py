"""The running deployment `beamhub up` starts: IdP, JupyterHub (+proxy, services), DSN, detector.

Each part is started in order with a readiness check and stopped in reverse; processes run in their
own sessions and are stopped by process group, and JupyterHub's children are tracked so nothing
outlives the stack.
"""

from __future__ import annotations

import asyncio
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from beamhub.hub.enclave import resolve_path
from beamhub.hub.up import npm
from beamhub.hub.up.deployment import Deployment

__all__ = ["Stack", "StackError", "free_port"]


class StackError(RuntimeError):
    """A part failed to start; the message names it and the log to read."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (used where a child must be told its port in advance)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_ok(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> bool:
    try:
        req = urllib.request.Request(url, headers=headers or {})  # noqa: S310
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback URLs
            return 200 <= resp.status < 300
    except OSError:
        return False


async def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    log: Path,
    proc: subprocess.Popen | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with status {proc.returncode}; see {log}")
        if await asyncio.to_thread(check):
            return
        await asyncio.sleep(0.1)
    raise StackError(f"{what} was not ready within {timeout:.0f}s; see {log}")


def stop_process(proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """SIGTERM the process (it stops its own children), then SIGKILL its group if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in its group
    except ProcessLookupError:
        pass


@dataclass
class Stack:
    """Start with :meth:`start` (async, reports progress), stop with :meth:`stop`."""

    dep: Deployment
    state: Path
    progress: Callable[[str], None] = print
    runtime: dict[str, Any] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _idp: Any = None
    _hub: subprocess.Popen | None = None
    _hub_children: set[int] = field(default_factory=set)
    _dsn: Any = None
    _revocations: Any = None
    _feed: Any = None
    _live: Any = None
    _tokens_api: str = ""  # the token service, direct (not through the proxy)

    STEPS = 6

    def _step(self, n: int, name: str, t0: float, extra: str = "") -> None:
        self.progress(
            f"[{n}/{self.STEPS}] {name} ... ready in {time.monotonic() - t0:.1f} s{extra}"
        )

    async def start(self) -> None:
        dep, state = self.dep, self.state
        (state / "logs").mkdir(parents=True, exist_ok=True)
        ip = dep.hub.ip
        port = dep.hub.port or free_port(ip)
        if dep.hub.port:
            with socket.socket() as probe:
                if probe.connect_ex((ip, port)) == 0:
                    raise StackError(
                        f"{ip}:{port} is already in use (another hub?); set hub.port in "
                        "beamhub.yaml to a free port, or 0 for any free port"
                    )
        public = f"http://{ip}:{port}"
        self.urls["hub"] = f"{public}/hub/"
        self.urls["tokens"] = f"{public}/services/tokens/"
        # known before anything that verifies tokens starts: only the token service opens the
        # signing key, the others fetch its public JWKS from here
        self.runtime["tokens_port"] = free_port(ip)
        self._tokens_api = f"http://{ip}:{self.runtime['tokens_port']}/services/tokens/"

        await asyncio.to_thread(self._install_npm_packages)
        t0 = time.monotonic()
        self.progress(f"[1/{self.STEPS}] identity provider ...")
        await asyncio.to_thread(self._start_idp, public)
        self._step(1, "identity provider", t0, f"  {self.urls['idp']}")

        t0 = time.monotonic()
        self.progress(f"[2/{self.STEPS}] data streaming node ...")
        await self._start_dsn()
        if "dsn" in self.urls:
            self._step(2, "data streaming node", t0, f"  {self.urls['dsn']}")
        else:
            why = self.notes[-1] if self.notes else "disabled in beamhub.yaml"
            self.progress(f"[2/{self.STEPS}] data streaming node ... skipped ({why})")

        t0 = time.monotonic()
        self.progress(f"[3/{self.STEPS}] JupyterHub + proxy ...")
        self._start_hub(ip, port)
        log = state / "logs" / "jupyterhub.log"
        await wait_until(self._hub_check(f"{public}/hub/api/"), 90, "JupyterHub", log, self._hub)
        self._step(3, "JupyterHub", t0, f"  {self.urls['hub']}")

        t0 = time.monotonic()
        self.progress(f"[4/{self.STEPS}] token service ...")
        jwks = f"{public}/services/tokens/jwks.json"
        await wait_until(self._hub_check(jwks), 60, "the token service", log, self._hub)
        if self._revocations is not None:
            await asyncio.to_thread(self._revocations.start)
        self._step(4, "token service", t0, f"  {self.urls['tokens']}")

        t0 = time.monotonic()
        self.progress(f"[5/{self.STEPS}] API gateway ...")
        if self.runtime.get("gateway_command"):
            gw = f"{public}/services/gateway/"
            self.urls["gateway"] = gw
            await wait_until(
                lambda: http_ok(gw + "api/v1/status"), 60, "the gateway", log, self._hub
            )
            self._step(5, "API gateway", t0, f"  {gw}")
        else:
            self.progress(f"[5/{self.STEPS}] API gateway ... skipped ({self._gateway_why})")
        await self._wait_dashboard(public, log)

        t0 = time.monotonic()
        self.progress(f"[6/{self.STEPS}] simulated detector ...")
        why = await self._start_detector()
        if why:
            self.progress(f"[6/{self.STEPS}] simulated detector ... skipped ({why})")
        else:
            self._step(6, "simulated detector", t0, f"  stream {self.dep.detector.channel!r}")
        (state / "runtime-urls.json").write_text(json.dumps(self.urls, indent=2))

    def _hub_check(self, url: str) -> Callable[[], bool]:
        """Readiness of a URL behind the hub; records the hub's children on every poll."""

        def check() -> bool:
            self._remember_hub_children()
            return http_ok(url)

        return check

    # --- parts ------------------------------------------------------------------------------

    def _install_npm_packages(self) -> None:
        """The proxy's and the dev IdP's npm packages into the state dir, on first use."""
        try:
            npm.ensure_installed(self.state, self.progress)
        except npm.NpmError as exc:
            raise StackError(str(exc)) from exc

    def _start_idp(self, public: str) -> None:
        from beamhub.hub.up.idp import EmbeddedIdP

        ident = self.dep.identity
        secret_path = self.state / "idp-client-secret"
        if ident.client_secret:
            secret = ident.client_secret
        else:
            if not secret_path.exists():
                fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(32))
            secret = secret_path.read_text().strip()
        self.runtime.update(client_id=ident.client_id, client_secret=secret)
        if ident.provider != "embedded":
            self.urls["idp"] = ident.provider
            self.runtime.update(
                authorize_url=ident.authorize_url,
                token_url=ident.token_url,
                userdata_url=ident.userdata_url,
                login_service="facility identity provider",
            )
            return
        self._idp = EmbeddedIdP(
            ident.users,
            ident.client_id,
            secret,
            [f"{public}/hub/oauth_callback"],
            self.state,
            port=ident.port,
            log_path=self.state / "logs" / "idp.log",
        )
        self.urls["idp"] = self._idp.start()
        self.runtime.update(self._idp.endpoints())

    async def _start_dsn(self) -> None:
        from beamhub.auth.jwks import RemoteJwksVerifier
        from beamhub.auth.tokens import RevocationCache

        dep = self.dep
        if not dep.dsn.enabled:
            return
        try:
            from beamhub.streaming.dsn import DataStreamingNode
            from beamhub.streaming.template import Template
        except ImportError as exc:
            self.notes.append(f"DSN not started: {exc}")
            return
        revoked_url = self.urls["tokens"] + "revoked"
        self._revocations = RevocationCache(revoked_url, interval=dep.tokens.revocation_poll)
        # the DSN starts before the token service: it fetches the JWKS at its first verification
        verifier = RemoteJwksVerifier(
            self._tokens_api + "jwks.json",
            issuer=dep.tokens.issuer,
            audience=dep.tokens.audience,
            is_revoked=self._revocations.is_revoked,
        )
        template = Template.load(self._resolve(dep.dsn.template) if dep.dsn.template else None)
        self._dsn = DataStreamingNode(verifier, template, data_host=dep.dsn.data_host)
        self.urls["dsn"] = await self._dsn.start(dep.dsn.port)

    def _resolve(self, path: str) -> Path:
        """A file named in beamhub.yaml: beside it, in the working directory, or shipped."""
        source = Path(self.dep.source)
        return resolve_path(path, source.resolve().parent if source.is_file() else None)

    @property
    def _gateway_why(self) -> str:
        return self.runtime.get("gateway_skipped", "disabled in beamhub.yaml")

    def _gateway_command(self) -> list[str] | None:
        if not self.dep.gateway.enabled:
            return None
        cmd = [sys.executable, "-m", "beamhub.hub.gateway.service", "--state-dir", str(self.state)]
        if Path(self.dep.source).is_file():
            cmd += ["--deployment", str(Path(self.dep.source).resolve())]
        cmd += ["--revoked-url", self.urls["tokens"] + "revoked"]
        cmd += ["--jwks", self._tokens_api + "jwks.json"]
        if self.urls.get("dsn"):
            cmd += ["--dsn-url", self.urls["dsn"]]
        admins = [u.username for u in self.dep.identity.users if u.admin]
        for name in admins:
            cmd += ["--admin", name]
        return cmd

    def _dashboard_command(self) -> list[str] | None:
        """The shared dashboard service (widgets/dashboard_service.py) when it can run."""
        board = self.dep.dashboard
        if not board.enabled:
            self.runtime["dashboard_skipped"] = "disabled in beamhub.yaml"
            return None
        if not self.urls.get("dsn"):
            self.runtime["dashboard_skipped"] = "no DSN"
            return None
        cmd = [
            sys.executable,
            "-m",
            "beamhub.widgets.dashboard_service",
            "--state-dir",
            str(self.state),
            "--dsn-url",
            self.urls["dsn"],
            "--tokens-url",
            self._tokens_api,
            "--update-hz",
            str(board.update_hz),
            "--image-px",
            str(board.image_px),
        ]
        if board.analysis:
            cmd += ["--analysis", json.dumps(board.analysis)]
        if self.dep.detector.enabled:
            cmd += ["--project", self.dep.detector.project]
        return cmd

    async def _wait_dashboard(self, public: str, log: Path) -> None:
        t0 = time.monotonic()
        if not self.runtime.get("dashboard_command"):
            why = self.runtime.get("dashboard_skipped", "disabled")
            self.progress(f"[5/{self.STEPS}] shared dashboard ... skipped ({why})")
            return
        url = f"{public}/services/dashboard/"
        self.urls["dashboard"] = url
        await wait_until(lambda: http_ok(url + "api/health"), 60, "the dashboard", log, self._hub)
        self._step(5, "shared dashboard", t0, f"  {url}")

    def _service_subjects(self, dashboard: bool) -> dict[str, dict[str, Any]]:
        """Hub services that ask the token service for their own subject's tokens (mint-for)."""
        from beamhub.hub.tokens.store import ANY_PROJECT
        from beamhub.hub.up.detector_feed import DETECTOR_USER
        from beamhub.widgets.dashboard_service import DASHBOARD_USER

        subjects: dict[str, dict[str, Any]] = {}
        if dashboard:  # a viewer of every project: it subscribes where a member watches
            subjects["dashboard"] = {"subject": DASHBOARD_USER, "projects": {ANY_PROJECT: "viewer"}}
        if self.dep.detector.enabled and self.urls.get("dsn"):
            subjects["beamhub-detector"] = {
                "subject": DETECTOR_USER,
                "projects": {self.dep.detector.project: "operator"},
                "api_token": secrets.token_hex(32),  # beamhub up's own, for its detector feed
            }
        return subjects

    def _start_hub(self, ip: str, port: int) -> None:
        dep = self.dep
        gateway = self._gateway_command()
        self.runtime.update(
            state_dir=str(self.state),
            ip=ip,
            port=port,
            hub_port=free_port(ip),
            proxy_api_port=free_port(ip),
            proxy_auth_token=secrets.token_hex(32),
            mfa_required=dep.mfa_required,
            mfa_methods=dep.identity.mfa_methods,
            admin_users=[u.username for u in dep.identity.users if u.admin],
            auth_refresh_age=dep.hub.auth_refresh_age,
            token_issuer=dep.tokens.issuer,
            token_audience=dep.tokens.audience,
            token_ttl=dep.tokens.ttl,
            max_token_ttl=dep.max_token_ttl,
            revocation_poll=dep.tokens.revocation_poll,
            dsn_url=self.urls.get("dsn", ""),
            admin_api_token=secrets.token_hex(32),
            hub_api_token=secrets.token_hex(32),  # the hub process's own identity (mint-for)
            spawner="beamhub",
            scheduler_backend=dep.scheduler.backend,
            scheduler_options={"nodes": dep.scheduler.nodes},
        )
        if gateway:
            self.runtime.update(gateway_command=gateway, gateway_port=free_port(ip))
        dashboard = self._dashboard_command()
        if dashboard:
            self.runtime.update(dashboard_command=dashboard, dashboard_port=free_port(ip))
        self.runtime["service_subjects"] = self._service_subjects(bool(dashboard))
        path = self.state / "runtime.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds secrets
        with os.fdopen(fd, "w") as f:
            json.dump(self.runtime, f, indent=2)
        hub_dir = self.state / "hub"
        hub_dir.mkdir(exist_ok=True)
        exe = Path(sys.executable).with_name("jupyterhub")
        log = open(self.state / "logs" / "jupyterhub.log", "ab")
        try:
            self._hub = subprocess.Popen(
                [str(exe), "-f", str(Path(__file__).parents[1] / "jupyterhub_config.py")],
                cwd=hub_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={
                    **os.environ,
                    "BEAMHUB_RUNTIME": str(path),
                    "BEAMHUB_HOME": str(self.state),
                },
            )
        finally:
            log.close()

    async def _start_detector(self) -> str:
        """The simulated detector streaming into a DSN channel of its project; "" or why not."""
        det = self.dep.detector
        if not det.enabled:
            return "disabled in beamhub.yaml"
        if self._dsn is None:
            return "no DSN"
        from beamhub.auth.mint_client import MintForClient
        from beamhub.hub.up.detector_feed import DetectorFeed

        identity = self.runtime["service_subjects"]["beamhub-detector"]["api_token"]
        tokens = MintForClient(self._tokens_api, identity)
        self._feed = DetectorFeed(self.dep, tokens, self._dsn, self.urls["dsn"], self.progress)
        why = await self._feed.start()
        if not why:
            self.urls["detector_channel"] = self._feed.channel_id
            if self.dep.detector.print_every_s:
                self._start_live_figures(await asyncio.to_thread(self._feed.read_token))
        self.notes.extend(self._feed.notes)
        return why

    def _start_live_figures(self, token: str) -> None:
        """A monitor consumer of the detector channel printing a live line (hub/up/live_figures.py)."""
        det = self.dep.detector
        from beamhub.hub.up.live_figures import LiveFigures

        dsn, channel_id = self._dsn, self._feed.channel_id
        self._live = LiveFigures(
            self.urls["dsn"],
            channel_id,
            token,
            f"{det.channel} {det.project}",
            every_s=det.print_every_s,
            analysis=self.dep.dashboard.analysis,
            dsn_stats=lambda: dsn.data_plane.stats(channel_id),
            progress=self.progress,
        )
        self._live.start()
        self.notes.append(
            f"live figures of the detector stream printed every {det.print_every_s:g} s "
            "(detector.print_every_s in beamhub.yaml; 0 = off)"
        )

    # --- stop -------------------------------------------------------------------------------

    def _remember_hub_children(self) -> None:
        import psutil

        if self._hub is None:
            return
        try:
            for child in psutil.Process(self._hub.pid).children(recursive=True):
                self._hub_children.add(child.pid)
        except psutil.NoSuchProcess:
            pass

    async def stop(self) -> None:
        """Stop everything in reverse order; safe to call after a partial start."""
        import psutil

        if self._live is not None:
            await asyncio.to_thread(self._live.stop)
        if self._feed is not None:
            await self._feed.stop()
        if self._revocations is not None:
            await asyncio.to_thread(self._revocations.close)
        self._remember_hub_children()
        await asyncio.to_thread(stop_process, self._hub)
        for pid in self._hub_children:  # servers/services in their own sessions
            try:
                proc = psutil.Process(pid)
                proc.terminate()
                proc.wait(5)
            except psutil.TimeoutExpired:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if self._dsn is not None:
            await self._dsn.stop()
        if self._idp is not None:
            await asyncio.to_thread(self._idp.stop)

    async def watch(self, stop: asyncio.Event) -> str:
        """Wait until ``stop`` is set or a part dies; return why."""
        while not stop.is_set():
            self._remember_hub_children()
            if self._hub is not None and self._hub.poll() is not None:
                return f"JupyterHub exited with status {self._hub.returncode}"
            if (
                self._idp is not None
                and self._idp.proc is not None
                and self._idp.proc.poll() is not None
            ):
                return "the identity provider exited"
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
        return "stop requested"
