"""The deployment `beamhub up` runs: every service a supervised process of its own.

In order, each once the one before answers: the dev identity provider, the DSN, the proxy
(configurable-http-proxy), JupyterHub, the token service, the gateway, the dashboard and the
simulated detector. A service that dies is restarted with backoff (:mod:`.supervisor`); the DSN
keeps its channels in the state dir, so they come back on the same endpoints. JupyterHub runs with
an external proxy and external services and without ``cleanup_servers``: while the hub restarts,
user servers keep running and stay reachable through the proxy, and the hub re-attaches them.
Ports are chosen once and kept in ``ports.json``, so a later `beamhub up` gives re-attached
servers the same hub and DSN addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from beamhub.hub.enclave import resolve_path
from beamhub.hub.up import monitoring, npm, totp
from beamhub.hub.up.deployment import Deployment
from beamhub.hub.up.detector_feed import DETECTOR_USER, feed_config
from beamhub.hub.up.idp import EmbeddedIdP, IdPError
from beamhub.hub.up.live_figures import LiveFigures
from beamhub.hub.up.service_accounts import SERVICES, ServiceAccountError, ServiceAccounts
from beamhub.hub.up.supervisor import ServiceSpec, Supervisor, SupervisorError

__all__ = ["Stack", "StackError", "free_port", "http_ok"]

PY = sys.executable
HUB_CONFIG = Path(__file__).parents[1] / "jupyterhub_config.py"


class StackError(RuntimeError):
    """A part failed to start; the message names it and the log to read."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (used where a child must be told its port in advance)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def http_ok(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> bool:
    try:
        req = urllib.request.Request(url, headers=headers or {})  # noqa: S310
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback URLs
            return 200 <= resp.status < 300
    except OSError:
        return False


def _write_secret_json(path: Path, data: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)


#: Keys of the runtime dict that hold secrets: only the hub's copy (hub/runtime.json) has them.
SECRET_KEYS = frozenset(
    {"client_secret", "proxy_auth_token", "api_token", "admin_api_token", "hub_api_token"}
)


def public_runtime(runtime: Any) -> Any:
    """``runtime`` without its secrets: what services other than the hub may read."""
    if isinstance(runtime, dict):
        return {k: public_runtime(v) for k, v in runtime.items() if k not in SECRET_KEYS}
    return runtime


class Stack:
    """Start with :meth:`start` (async, reports progress), stop with :meth:`stop`."""

    STEPS = 7

    def __init__(self, dep: Deployment, state: Path, progress: Callable[[str], None] = print):
        self.dep = dep
        self.state = state
        self.progress = progress
        self.runtime: dict[str, Any] = {}
        self.urls: dict[str, str] = {}
        self.notes: list[str] = []
        self.ports: dict[str, int] = {}
        #: dev users enrolled in TOTP on this start (their secrets are shown once)
        self.new_totp: list[str] = []
        self.sup = Supervisor(state / "status.json", say=progress)
        #: as root each service runs as beamhub-<service> (hub and gateway stay root)
        self.accounts = ServiceAccounts(
            state,
            os.geteuid() == 0 and dep.tenancy.service_accounts,
            say=progress,
            services=tuple(s for s in SERVICES if s != "prometheus" or dep.monitoring.enabled),
        )
        self._live: LiveFigures | None = None
        #: the proxy's routes as last seen (path -> {"target": ..., the hub's data})
        self._routes: dict[str, Any] = {}
        self._routes_task: asyncio.Task | None = None
        self._live_task: asyncio.Task | None = None
        self._stats_token, self._stats_exp = "", 0.0
        self.logs = state / "logs"

    def _step(self, n: int, name: str, t0: float, extra: str = "") -> None:
        self.progress(
            f"[{n}/{self.STEPS}] {name} ... ready in {time.monotonic() - t0:.1f} s{extra}"
        )

    # --- ports ----------------------------------------------------------------------------

    def _choose_ports(self) -> None:
        """Reuse last run's ports where they are free (re-attached servers know them)."""
        ip, dep = self.dep.hub.ip, self.dep
        path = self.state / "ports.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = {}
        fixed = {"public": dep.hub.port, "dsn": dep.dsn.port, "idp": dep.identity.port}
        names = ["public", "hub", "proxy_api", "tokens", "gateway", "dashboard", "dsn", "idp"]
        for name in names:
            if fixed.get(name):
                self.ports[name] = fixed[name]
            elif saved.get(name) and _is_free(ip, saved[name]):
                self.ports[name] = saved[name]
            else:
                self.ports[name] = free_port(ip)
        if dep.hub.port and not _is_free(ip, dep.hub.port):
            raise StackError(
                f"{ip}:{dep.hub.port} is already in use (another hub?); set hub.port in "
                "beamhub.yaml to a free port, or 0 for any free port"
            )
        path.write_text(json.dumps(self.ports, indent=2))

    # --- start ----------------------------------------------------------------------------

    async def start(self) -> None:
        dep, state = self.dep, self.state
        await asyncio.to_thread(self._prepare_accounts)
        self._choose_ports()
        # --- monitoring (hub/up/monitoring.py): Prometheus, before the hub learns its token ---
        await monitoring.start(self)
        # --- end monitoring ---
        ip = dep.hub.ip
        public = f"http://{ip}:{self.ports['public']}"
        self.public = public
        self.urls["hub"] = f"{public}/hub/"
        self.urls["tokens"] = f"{public}/services/tokens/"
        #: the token service, direct (not through the proxy): verifiers fetch its JWKS here
        self.tokens_api = f"http://{ip}:{self.ports['tokens']}/services/tokens/"
        await asyncio.to_thread(self._install_npm_packages)

        t0 = time.monotonic()
        self.progress(f"[1/{self.STEPS}] identity provider ...")
        await self._start_idp()
        self._step(1, "identity provider", t0, f"  {self.urls['idp']}")

        t0 = time.monotonic()
        self.progress(f"[2/{self.STEPS}] data streaming node ...")
        if dep.dsn.enabled:
            await self._start_dsn()
            self._step(2, "data streaming node", t0, f"  {self.urls['dsn']}")
        else:
            self.progress(f"[2/{self.STEPS}] data streaming node ... skipped (disabled)")

        t0 = time.monotonic()
        self.progress(f"[3/{self.STEPS}] JupyterHub + proxy ...")
        self._write_runtime()
        await self._start_proxy()
        await self._start(
            "hub",
            [str(Path(PY).with_name("jupyterhub")), "-f", str(HUB_CONFIG)],
            ready=lambda: http_ok(f"{public}/hub/api/"),
            cwd=state / "hub",
            env={
                "BEAMHUB_RUNTIME": str(state / "hub" / "runtime.json"),
                "BEAMHUB_HOME": str(state),
            },
            timeout=90,
        )
        self._step(3, "JupyterHub", t0, f"  {self.urls['hub']}")
        self._routes_task = asyncio.create_task(self._remember_routes(), name="routes")

        t0 = time.monotonic()
        self.progress(f"[4/{self.STEPS}] token service ...")
        await self._start_service("tokens", self._tokens_argv(), "jwks.json")
        self._step(4, "token service", t0, f"  {self.urls['tokens']}")

        t0 = time.monotonic()
        self.progress(f"[5/{self.STEPS}] API gateway ...")
        if "gateway" in self.runtime["services"]:
            await self._start_service("gateway", self._gateway_argv(), "api/v1/status")
            self.urls["gateway"] = f"{public}/services/gateway/"
            self._step(5, "API gateway", t0, f"  {self.urls['gateway']}")
        else:
            self.progress(f"[5/{self.STEPS}] API gateway ... skipped (disabled in beamhub.yaml)")
        t0 = time.monotonic()
        self.progress(f"[6/{self.STEPS}] shared dashboard ...")
        if "dashboard" in self.runtime["services"]:
            await self._start_service("dashboard", self._dashboard_argv(), "api/health")
            self.urls["dashboard"] = f"{public}/services/dashboard/"
            self._step(6, "shared dashboard", t0, f"  {self.urls['dashboard']}")
        else:
            why = "no DSN" if not dep.dsn.enabled else "disabled in beamhub.yaml"
            self.progress(f"[6/{self.STEPS}] shared dashboard ... skipped ({why})")

        t0 = time.monotonic()
        self.progress(f"[7/{self.STEPS}] simulated detector ...")
        why = await self._start_detector()
        if why:
            self.progress(f"[7/{self.STEPS}] simulated detector ... skipped ({why})")
        else:
            self._step(7, "simulated detector", t0, f"  stream {dep.detector.channel!r}")
        (state / "runtime-urls.json").write_text(json.dumps(self.urls, indent=2))

    def _prepare_accounts(self) -> None:
        """The services' accounts (created on first start, said once) and their folders."""
        why = self.accounts.unreachable() if self.accounts.enabled else None
        if why and self.dep.enclave == "dev":
            self.progress(
                f"beamhub up: WARNING: every service runs as root: {why}. The dev enclave allows "
                "it; any other refuses to start so"
            )
            self.accounts.disable()
        elif why:
            raise StackError(f"service accounts: {why}")
        try:
            created = self.accounts.ensure()
            self.accounts.prepare()
        except (ServiceAccountError, OSError) as exc:
            raise StackError(f"service accounts: {exc}") from exc
        if created:
            self.progress(
                f"beamhub up: created the service accounts {', '.join(created)} (each service "
                "runs as its own; only the token service's reads the signing key)"
            )

    async def _start(
        self,
        name: str,
        argv: list[str],
        *,
        ready: Callable[[], bool] | None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 60.0,
        on_restart: Callable[[], Any] | None = None,
    ) -> None:
        user = self.accounts.user(name)
        env = dict(env or {})
        if user is not None:  # its own folder as HOME and working directory
            env["HOME"] = str(self.accounts.folder(name))
            cwd = cwd or self.accounts.folder(name)
        spec = ServiceSpec(
            name=name,
            argv=argv,
            log_path=self.logs / f"{name}.log",
            env=env,
            cwd=cwd,
            user=user,
            ready=ready,
            ready_timeout=timeout,
            on_restart=on_restart,
        )
        try:
            await self.sup.start(spec)
        except SupervisorError as exc:
            raise StackError(str(exc)) from exc

    def _install_npm_packages(self) -> None:
        """The proxy's and the dev IdP's npm packages into the state dir, on first use."""
        try:
            npm.ensure_installed(self.state, self.progress)
        except npm.NpmError as exc:
            raise StackError(str(exc)) from exc

    async def _start_idp(self) -> None:
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
        enrolled = [u.username for u in ident.users if "otp" in u.amr]
        totp_secrets, self.new_totp = totp.enrol(self.state, enrolled)
        idp = EmbeddedIdP(
            ident.users,
            ident.client_id,
            secret,
            [f"{self.public}/hub/oauth_callback"],
            self.state,
            port=self.ports["idp"],
            post_logout_redirect_uris=[f"{self.public}/hub/login"],
            require_otp=self.dep.mfa_required,
            totp_secrets=totp_secrets,
        )
        try:
            argv, env = await asyncio.to_thread(idp.command)
        except IdPError as exc:
            raise StackError(str(exc)) from exc
        self.accounts.give("idp", Path(argv[-1]))  # its config: dev passwords, TOTP secrets
        await self._start("idp", argv, ready=idp.answers, env=env, timeout=30)
        self.urls["idp"] = idp.issuer
        self.runtime.update(await asyncio.to_thread(idp.endpoints))

    async def _start_dsn(self) -> None:
        dep, ip = self.dep, self.dep.hub.ip
        url = f"http://{ip}:{self.ports['dsn']}"
        argv = [
            PY,
            "-m",
            "beamhub.hub.cli",
            "dsn",
            "--host",
            ip,
            "--port",
            str(self.ports["dsn"]),
            "--data-host",
            dep.dsn.data_host,
            "--state-dir",
            str(self.state),
            "--jwks",
            self.tokens_api + "jwks.json",
            "--issuer",
            dep.tokens.issuer,
            "--audience",
            dep.tokens.audience,
            "--revocations",
            self.tokens_api + "revoked",
            "--revocation-poll",
            str(dep.tokens.revocation_poll),
        ]
        argv += ["--template", str(self._resolve(dep.dsn_template))]
        await self._start("dsn", argv, ready=lambda: http_ok(url + "/api/health"))
        self.urls["dsn"] = url

    def _resolve(self, path: str) -> Path:
        """A file named in beamhub.yaml: beside it, in the working directory, or shipped."""
        source = Path(self.dep.source)
        return resolve_path(path, source.resolve().parent if source.is_file() else None)

    async def _start_proxy(self) -> None:
        ip, ports = self.dep.hub.ip, self.ports
        argv = [
            str(npm.bin_path(self.state, "configurable-http-proxy")),
            "--ip",
            ip,
            "--port",
            str(ports["public"]),
            "--api-ip",
            ip,
            "--api-port",
            str(ports["proxy_api"]),
            "--error-target",
            f"http://{ip}:{ports['hub']}/hub/error",
            "--log-level",
            "warn",
        ]
        api = f"http://{ip}:{ports['proxy_api']}/api/routes"
        auth = {"Authorization": f"token {self.runtime['proxy_auth_token']}"}
        await self._start(
            "proxy",
            argv,
            ready=lambda: http_ok(api, headers=auth),
            env={"CONFIGPROXY_AUTH_TOKEN": self.runtime["proxy_auth_token"]},
            on_restart=self._proxy_restarted,
        )

    def _proxy_api(self, method: str, path: str = "", body: Any = None) -> Any:
        """One call to the proxy's REST API (blocking); the JSON answer or None."""
        url = f"http://{self.dep.hub.ip}:{self.ports['proxy_api']}/api/routes{path}"
        req = urllib.request.Request(
            url,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"token {self.runtime['proxy_auth_token']}"},
        )
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
            raw = resp.read()
        return json.loads(raw) if raw else None

    async def _remember_routes(self) -> None:
        """Keep a copy of the proxy's routes (every 2 s) to give a restarted proxy at once."""
        while True:
            with contextlib.suppress(OSError, ValueError):
                routes = await asyncio.to_thread(self._proxy_api, "GET")
                if isinstance(routes, dict) and routes:
                    self._routes = routes
            await asyncio.sleep(2)

    async def _proxy_restarted(self) -> None:
        """A new proxy knows no routes: give it the ones the last one had (the hub's and every
        server's), so the hub keeps running; without a copy, restart the hub, which adds them."""
        routes = dict(self._routes)
        try:
            for path, data in routes.items():
                body = {k: v for k, v in data.items() if k != "last_activity"}  # the proxy's own
                await asyncio.to_thread(self._proxy_api, "POST", path, body)
            if routes:
                self.progress(f"beamhub up: the new proxy has the last one's {len(routes)} routes")
                return
        except (OSError, ValueError) as exc:
            self.progress(f"beamhub up: could not give the new proxy its routes ({exc})")
        hub = self.sup.children.get("hub")
        if hub is not None and hub.proc is not None:
            self.progress("beamhub up: restarting JupyterHub so that it routes the new proxy")
            await self.sup.restart("hub")

    def _write_runtime(self) -> None:
        """hub/runtime.json: what jupyterhub_config.py reads (0600 in the hub's folder: it holds
        API tokens); runtime.json beside it: the same without any secret, for other services."""
        dep, ip, ports = self.dep, self.dep.hub.ip, self.ports
        services: dict[str, dict[str, Any]] = {
            "tokens": {"port": ports["tokens"], "api_token": secrets.token_hex(32)}
        }
        if dep.gateway.enabled:
            services["gateway"] = {"port": ports["gateway"], "api_token": secrets.token_hex(32)}
        if dep.dashboard.enabled and dep.dsn.enabled:
            services["dashboard"] = {"port": ports["dashboard"], "api_token": secrets.token_hex(32)}
        self.runtime.update(
            state_dir=str(self.state),
            ip=ip,
            port=ports["public"],
            hub_port=ports["hub"],
            proxy_api_port=ports["proxy_api"],
            proxy_auth_token=secrets.token_hex(32),
            services=services,
            mfa_required=dep.mfa_required,
            mfa_methods=dep.identity.mfa_methods,
            admin_users=[u.username for u in dep.identity.users if u.admin],
            auth_refresh_age=dep.hub.auth_refresh_age,
            token_ttl=dep.tokens.ttl,
            max_token_ttl=dep.max_token_ttl,
            revocation_poll=dep.tokens.revocation_poll,
            dsn_url=self.urls.get("dsn", ""),
            admin_api_token=secrets.token_hex(32),
            hub_api_token=secrets.token_hex(32),  # the hub process's own identity (mint-for)
            spawner="beamhub",
            scheduler_backend=dep.scheduler.backend,
            scheduler_options=dep.scheduler.backend_options(),
            tenancy=dep.tenancy.spawner_options(),
            service_subjects=self._service_subjects("dashboard" in services),
        )
        (self.state / "hub").mkdir(mode=0o700, exist_ok=True)
        _write_secret_json(self.state / "hub" / "runtime.json", self.runtime)
        (self.state / "runtime.json").write_text(json.dumps(public_runtime(self.runtime), indent=2))

    def _service_subjects(self, dashboard: bool) -> dict[str, dict[str, Any]]:
        """Hub services that ask the token service for their own subject's tokens (mint-for)."""
        from beamhub.hub.tokens.store import ANY_PROJECT
        from beamhub.widgets.dashboard_service import DASHBOARD_USER

        subjects: dict[str, dict[str, Any]] = {}
        if dashboard:  # a viewer of every project: it subscribes where a member watches
            subjects["dashboard"] = {"subject": DASHBOARD_USER, "projects": {ANY_PROJECT: "viewer"}}
        if self.dep.detector.enabled and self.dep.dsn.enabled:
            subjects["beamhub-detector"] = {
                "subject": DETECTOR_USER,
                "projects": {self.dep.detector.project: "operator"},
                "api_token": secrets.token_hex(32),  # beamhub up's own, for its detector feed
            }
        return subjects

    def _service_env(self, name: str) -> dict[str, str]:
        """What JupyterHub gives a managed service, for one `beamhub up` runs itself."""
        ip, svc = self.dep.hub.ip, self.runtime["services"][name]
        scopes = json.dumps([f"access:services!service={name}"])
        return {
            "JUPYTERHUB_SERVICE_NAME": name,
            "JUPYTERHUB_SERVICE_URL": f"http://{ip}:{svc['port']}",
            "JUPYTERHUB_SERVICE_PREFIX": f"/services/{name}/",
            "JUPYTERHUB_API_TOKEN": svc["api_token"],
            "JUPYTERHUB_CLIENT_ID": f"service-{name}",
            "JUPYTERHUB_API_URL": f"http://{ip}:{self.ports['hub']}/hub/api",
            "JUPYTERHUB_BASE_URL": "/",
            "JUPYTERHUB_HOST": "",
            "JUPYTERHUB_OAUTH_CALLBACK_URL": f"/services/{name}/oauth_callback",
            "JUPYTERHUB_OAUTH_ACCESS_SCOPES": scopes,
            "JUPYTERHUB_OAUTH_SCOPES": scopes,
            "JUPYTERHUB_PUBLIC_URL": f"{self.public}/services/{name}/",
            "BEAMHUB_HOME": str(self.state),
        }

    async def _start_service(self, name: str, argv: list[str], probe: str) -> None:
        url = f"{self.public}/services/{name}/{probe}"
        await self._start(name, argv, ready=lambda: http_ok(url), env=self._service_env(name))

    def _tokens_argv(self) -> list[str]:
        dep, rt = self.dep, self.runtime
        subjects = {s["subject"]: s["projects"] for s in rt["service_subjects"].values()}
        return [
            PY,
            "-m",
            "beamhub.hub.tokens.service",
            "--state-dir",
            str(self.state),
            "--issuer",
            dep.tokens.issuer,
            "--audience",
            dep.tokens.audience,
            "--max-ttl",
            str(dep.max_token_ttl),
            "--ttl",
            str(dep.tokens.ttl),
            "--revocation-poll",
            str(dep.tokens.revocation_poll),
            "--service-subjects",
            json.dumps(subjects),
        ]

    def _gateway_argv(self) -> list[str]:
        argv = [PY, "-m", "beamhub.hub.gateway.service", "--state-dir", str(self.state)]
        if Path(self.dep.source).is_file():
            argv += ["--deployment", str(Path(self.dep.source).resolve())]
        argv += ["--revoked-url", self.tokens_api + "revoked"]
        argv += ["--jwks", self.tokens_api + "jwks.json"]
        if self.urls.get("dsn"):
            argv += ["--dsn-url", self.urls["dsn"]]
        for user in self.dep.identity.users:
            if user.admin:
                argv += ["--admin", user.username]
        return argv

    def _dashboard_argv(self) -> list[str]:
        board = self.dep.dashboard
        argv = [
            PY,
            "-m",
            "beamhub.widgets.dashboard_service",
            "--state-dir",
            str(self.state),
            "--dsn-url",
            self.urls["dsn"],
            "--tokens-url",
            self.tokens_api,
            "--update-hz",
            str(board.update_hz),
            "--image-px",
            str(board.image_px),
        ]
        if board.analysis:
            argv += ["--analysis", json.dumps(board.analysis)]
        if self.dep.detector.enabled:
            argv += ["--project", self.dep.detector.project]
        return argv

    # --- the detector and its live figures ------------------------------------------------

    async def _start_detector(self) -> str:
        """The simulated detector (its own process) streaming into a DSN channel; "" or why not."""
        det = self.dep.detector
        if not det.enabled:
            return "disabled in beamhub.yaml"
        if not self.dep.dsn.enabled:
            return "no DSN"
        channel_file = self.accounts.folder("detector") / "detector.json"
        channel_file.unlink(missing_ok=True)
        config = self.state / "detector-config.json"
        cfg = feed_config(
            dsn_url=self.urls["dsn"],
            tokens_url=self.tokens_api,
            project=det.project,
            stream=det.channel,
            rate_hz=det.rate_hz,
            shape=list(det.shape),
            hit_fraction=det.hit_fraction,
            issuer=self.dep.tokens.issuer,
            audience=self.dep.tokens.audience,
            channel_file=str(channel_file),
        )
        config.write_text(json.dumps(cfg, indent=2))
        identity = self.runtime["service_subjects"]["beamhub-detector"]["api_token"]
        await self._start(
            "detector",
            [PY, "-m", "beamhub.hub.up.detector_feed", str(config)],
            ready=channel_file.exists,
            env={"BEAMHUB_MINT_TOKEN": identity},
        )
        feed = json.loads(channel_file.read_text())
        self.urls["detector_channel"] = feed["channel"]
        self.notes.extend(feed.get("notes", []))
        if det.print_every_s:
            self._live_task = asyncio.create_task(self._follow_live_figures(), name="live")
            self.notes.append(
                f"live figures of the detector stream printed every {det.print_every_s:g} s "
                "(detector.print_every_s in beamhub.yaml; 0 = off)"
            )
        return ""

    def _read_token(self) -> str:
        """A stream.read token of the detector's project, for the live figures. Blocking."""
        from beamhub.auth.mint_client import MintForClient

        identity = self.runtime["service_subjects"]["beamhub-detector"]["api_token"]
        token, _ = MintForClient(self.tokens_api, identity).mint(
            DETECTOR_USER,
            self.dep.detector.project,
            ["stream.read"],
            kind="service",
            description="beamhub up: live figures",
        )
        return token

    async def _follow_live_figures(self) -> None:
        """Print live figures of the detector's channel; follow it when the feed re-creates it."""
        det, current = self.dep.detector, ""
        while True:
            try:
                channel = json.loads(
                    (self.accounts.folder("detector") / "detector.json").read_text()
                )["channel"]
            except (OSError, ValueError, KeyError):
                channel = current
            alive = self._live is not None and self._live.alive
            if channel and (channel != current or not alive):
                if self._live is not None:
                    await asyncio.to_thread(self._live.stop)
                try:
                    token = await asyncio.to_thread(self._read_token)
                except Exception as exc:  # the token service may be restarting
                    self.progress(f"beamhub up: live figures paused: {exc}")
                    await asyncio.sleep(5)
                    continue
                self._live = LiveFigures(
                    self.urls["dsn"],
                    channel,
                    token,
                    f"{det.channel} {det.project}",
                    every_s=det.print_every_s,
                    analysis=self.dep.dashboard.analysis,
                    dsn_stats=lambda c=channel: self._dsn_stats(c),
                    progress=self.progress,
                )
                self._live.start()
                current = channel
                self.urls["detector_channel"] = channel
            await asyncio.sleep(2)

    def _dsn_stats(self, channel: str) -> dict[str, Any] | None:
        """The channel's DSN counters for the live line (None while they cannot be read)."""
        import jwt

        try:
            if self._stats_exp - time.time() < 10:  # tokens are short-lived: take a fresh one
                self._stats_token = self._read_token()
                claims = jwt.decode(self._stats_token, options={"verify_signature": False})
                self._stats_exp = float(claims["exp"])
            req = urllib.request.Request(  # noqa: S310 - our own DSN on loopback
                f"{self.urls['dsn']}/api/channels/{channel}",
                headers={"Authorization": f"Bearer {self._stats_token}"},
            )
            with urllib.request.urlopen(req, timeout=2) as resp:  # noqa: S310
                return json.load(resp).get("stats")
        except Exception:  # the DSN or the token service is restarting: "unavailable"
            return None

    # --- stop -----------------------------------------------------------------------------

    def user_servers(self) -> int:
        """How many user servers the hub's database says are running (they outlive the stack)."""
        import sqlite3

        db = self.state / "hub" / "jupyterhub.sqlite"
        if not db.exists():
            return 0
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            try:
                (n,) = conn.execute(
                    "SELECT COUNT(*) FROM spawners WHERE server_id IS NOT NULL"
                ).fetchone()
            except sqlite3.Error:
                return 0
        return int(n)

    async def stop(self) -> None:
        """Stop every service in reverse order; safe after a partial start. Servers stay."""
        if self._routes_task is not None:
            self._routes_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._routes_task
        if self._live_task is not None:
            self._live_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._live_task
        if self._live is not None:
            await asyncio.to_thread(self._live.stop)
        await self.sup.stop()

    async def watch(self, stop: asyncio.Event) -> str:
        """Wait until ``stop`` is set (a crashed service is the supervisor's business)."""
        await stop.wait()
        return "stop requested"
