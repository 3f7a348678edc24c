"""JupyterHub configuration for a beamhub deployment, built from the runtime file `beamhub up` writes.

Used two ways: `jupyterhub -f hub/jupyterhub_config.py` with $BEAMHUB_RUNTIME pointing at the
runtime JSON (what `beamhub up` does), or :func:`configure` called on a traitlets Config.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

from beamhub.hub.tokens import handlers as tokens_api
from beamhub.kernels import jobs_handler as jobs_api

__all__ = ["configure", "crypt_key", "single_user_cmd"]


def crypt_key(state_dir: Path) -> str:
    """JUPYTERHUB_CRYPT_KEY for auth_state encryption: generated once, kept 0600 in the state dir."""
    path = state_dir / "crypt-key"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def single_user_cmd() -> list[str]:
    """The venv's jupyterhub-singleuser, by absolute path (the venv is not on a server's PATH)."""
    exe = Path(sys.executable).with_name("jupyterhub-singleuser")
    return [str(exe) if exe.exists() else "jupyterhub-singleuser"]


#: the beamtime notebooks: package data of ``beamhub.notebooks``, the sibling of ``beamhub.hub``
#: both installed (site-packages/beamhub/notebooks) and in the checkout (notebooks/)
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def provide_notebooks(spawner: Any) -> None:
    """Give each server a root folder with the beamtime notebooks in ``notebooks/``.

    Copies only notebooks the user does not have yet, so her edits survive later spawns.
    """
    root = Path(spawner.format_string(spawner.notebook_dir))
    target = root / "notebooks"
    target.mkdir(parents=True, exist_ok=True)
    for source in sorted(NOTEBOOKS.glob("*.ipynb")):
        if not (target / source.name).exists():
            shutil.copy2(source, target / source.name)


def configure(c: Any, rt: dict[str, Any]) -> None:
    """Fill a traitlets Config ``c`` from the runtime dict ``rt`` written by `beamhub up`."""
    state = Path(rt["state_dir"])
    hub_state = state / "hub"
    hub_state.mkdir(parents=True, exist_ok=True)
    ip = rt["ip"]
    public = f"http://{ip}:{rt['port']}"

    c.JupyterHub.bind_url = public
    c.JupyterHub.hub_bind_url = f"http://{ip}:{rt['hub_port']}"
    c.JupyterHub.db_url = f"sqlite:///{hub_state / 'jupyterhub.sqlite'}"
    c.JupyterHub.cookie_secret_file = str(hub_state / "cookie_secret")
    c.JupyterHub.pid_file = str(hub_state / "jupyterhub.pid")
    # `beamhub up` supervises the proxy and the services as processes of their own: user servers
    # keep running and stay reachable while the hub restarts, and are re-attached when it is back
    c.JupyterHub.cleanup_servers = False
    c.JupyterHub.cleanup_proxy = False
    c.ConfigurableHTTPProxy.should_start = False
    c.ConfigurableHTTPProxy.api_url = f"http://{ip}:{rt['proxy_api_port']}"
    c.ConfigurableHTTPProxy.auth_token = rt["proxy_auth_token"]
    c.CryptKeeper.keys = [crypt_key(state).encode()]

    # --- identity ---------------------------------------------------------------------------
    c.JupyterHub.authenticator_class = "beamhub"
    a = c.BeamhubAuthenticator
    a.client_id = rt["client_id"]
    a.client_secret = rt["client_secret"]
    a.authorize_url = rt["authorize_url"]
    a.token_url = rt["token_url"]
    a.userdata_url = rt["userdata_url"]
    a.oauth_callback_url = f"{public}/hub/oauth_callback"
    a.login_service = rt.get("login_service", "beamhub dev identity provider")
    # the hub's logout also ends the identity provider's session (the dev IdP's end_session)
    a.logout_redirect_url = rt.get("logout_url", "")
    a.mfa_required = rt["mfa_required"]
    a.mfa_methods = rt["mfa_methods"]
    a.admin_users = set(rt.get("admin_users", []))
    a.auth_refresh_age = rt.get("auth_refresh_age", 300)
    a.refresh_pre_spawn = True
    a.enable_auth_state = True
    a.token_ttl = rt["token_ttl"]
    a.token_service_url = f"{public}/services/tokens/"
    # the hub asks the token service directly (not through the proxy) with its own identity
    a.token_service_api_url = f"http://{ip}:{rt['services']['tokens']['port']}/services/tokens/"
    a.token_service_api_token = rt["hub_api_token"]
    a.dsn_url = rt.get("dsn_url", "")

    # --- servers ----------------------------------------------------------------------------
    c.JupyterHub.spawner_class = rt.get("spawner", "simple")
    c.Spawner.cmd = single_user_cmd()
    c.Spawner.args = [
        # the server keeps its project token fresh for every notebook it runs, for its whole life
        "--ServerApp.jpserver_extensions={'beamhub.auth.server_refresher': True}",
        *(["--allow-root"] if os.geteuid() == 0 else []),
    ]
    c.Spawner.default_url = "/lab"
    c.Spawner.start_timeout = 60
    c.Spawner.http_timeout = 60
    # notice a dead server within seconds, not JupyterHub's default 30 s (the fault table)
    c.Spawner.poll_interval = 5
    c.Spawner.server_token_scopes = [
        "access:servers!server",
        "users:activity!user",
        "access:services!service=tokens",
    ]
    c.ReservedNodeSpawner.backend = rt.get("scheduler_backend", "local")
    c.ReservedNodeSpawner.backend_options = rt.get("scheduler_options", {})
    c.ReservedNodeSpawner.state_dir = str(state / "scheduler")
    c.ReservedNodeSpawner.mem_mb = 512  # fits the local backend's 1000 MB virtual nodes
    # the local scheduler lives in the hub process: notebooks submit Dask workers through it
    c.JupyterHub.extra_handlers = jobs_api.HANDLERS
    c.JupyterHub.custom_scopes = {**jobs_api.CUSTOM_SCOPES, **tokens_api.CUSTOM_SCOPES}
    c.SimpleLocalProcessSpawner.home_dir_template = str(state / "users" / "{username}")
    c.Spawner.notebook_dir = str(state / "users" / "{username}")
    c.Spawner.pre_spawn_hook = provide_notebooks
    c.Spawner.environment = {"BEAMHUB_HOME": str(state)}
    # tenancy: each server, job and Dask worker runs as its user's Unix account (bh-<user>,
    # created on first use when the hub is root), in its home; beamhub.yaml `tenancy:` via rt
    for key, value in rt.get("tenancy", {}).items():
        setattr(c.ReservedNodeSpawner, key, value)
    c.ReservedNodeSpawner.notebook_dir = "{home}"
    # the beamtime notebooks are copied as her account into ~/notebooks (never as root into a
    # folder she controls); provide_notebooks stays for the simple spawner
    c.ReservedNodeSpawner.pre_spawn_hook = None
    c.ReservedNodeSpawner.home_files = {"notebooks": str(NOTEBOOKS)}

    # --- services: external, each a process `beamhub up` supervises (see hub/up/stack.py) ----
    subjects: dict[str, dict[str, Any]] = rt.get("service_subjects", {})
    info = {
        "tokens": "mint, refresh, introspect and revoke project tokens",
        "gateway": "the facility API: status, channels, jobs, beamtime",
        "dashboard": "live figures of your project's streams (any role)",
    }
    services = [
        {
            "name": name,
            "url": f"http://{ip}:{svc['port']}",
            "api_token": svc["api_token"],
            # `beamhub up` starts the services after the hub: do not wait 30 s for each
            "timeout": 1,
            "oauth_no_confirm": True,
            "display": True,
            "info": {"description": info.get(name, name)},
        }
        for name, svc in rt["services"].items()
    ]
    c.JupyterHub.services = services
    c.JupyterHub.load_roles = [
        {
            "name": "beamhub-services",
            "description": "the token service and gateway identify callers and their groups",
            "scopes": ["read:users", "read:groups"],
            "services": [s["name"] for s in services if s["name"] != "dashboard"],
        },
    ]
    if "gateway" in rt["services"]:
        # jobs through the gateway run in the hub's scheduler for the token's user: the gateway
        # may name that user on /hub/api/beamhub/jobs, and nothing more (no admin:users)
        c.JupyterHub.load_roles.append(
            {
                "name": "beamhub-gateway-jobs",
                "description": "the gateway submits, lists and cancels jobs for its callers",
                "scopes": [jobs_api.ACT_FOR_SCOPE],
                "services": ["gateway"],
            }
        )
        # its audit chain's head is signed and kept by the token service (the anchor of the log)
        c.JupyterHub.load_roles.append(
            {
                "name": "beamhub-gateway-audit",
                "description": "the gateway posts audit checkpoints to the token service",
                "scopes": [tokens_api.AUDIT_CHECKPOINT_SCOPE, "access:services!service=tokens"],
                "services": ["gateway"],
            }
        )
    if rt.get("admin_api_token"):
        c.JupyterHub.services.append({"name": "beamhub-admin", "api_token": rt["admin_api_token"]})
        c.JupyterHub.load_roles.append(
            {
                "name": "beamhub-admin",
                "scopes": [
                    "admin:users",
                    "admin:servers",
                    "tokens",
                    "access:services",
                    "read:users",
                    "admin:groups",
                ],
                "services": ["beamhub-admin"],
            }
        )
    _mint_for_roles(c, subjects, rt["hub_api_token"])
    _metrics_scraper(c, state)
    _maintenance_banner(c, state)


def _maintenance_banner(c: Any, state: Path) -> None:
    """JupyterHub's announcement banner shows open incidents (all projects' and the viewer's
    projects'; `beamhub incident`) and maintenance of the next 7 days from the calendar
    (`beamhub maintenance`, the gateway's /maintenance), and tells a project member when it
    overlaps her project's approved beamtime; read at each page view."""
    from beamhub.kernels.incidents import IncidentLog, incident_banner
    from beamhub.kernels.maintenance import announcement
    from beamhub.kernels.reservations import ReservationBook

    db = state / "scheduler" / "reservations.sqlite"

    def banner(user: Any) -> str:
        if not db.exists():
            return ""
        groups = [g.name for g in getattr(user, "groups", [])] if user is not None else []
        try:
            book = ReservationBook(db)
            projects = {g.split(":", 1)[0] for g in groups}
            parts = [
                incident_banner(IncidentLog(db).list(), projects),
                announcement(book.maintenance, book.list(), projects),
            ]
            return "<br>".join(p for p in parts if p)
        except Exception:  # a page never fails for its banner
            return ""

    c.JupyterHub.template_vars = {"announcement": banner}
    # the home page shows the server's time left (hub/templates/home.html extends JupyterHub's)
    c.JupyterHub.template_paths = [str(Path(__file__).with_name("templates"))]


def _metrics_scraper(c: Any, state: Path) -> None:
    """With `monitoring:` on, Prometheus reads /hub/metrics with a token that may do nothing
    else (read:metrics); `beamhub up` writes the token before the hub starts
    (:mod:`beamhub.hub.up.monitoring`) and removes it when monitoring is off."""
    from beamhub.hub.up.monitoring import HUB_METRICS_SERVICE, hub_metrics_token_path

    path = hub_metrics_token_path(state)
    if not path.exists():
        return
    c.JupyterHub.services.append(
        {"name": HUB_METRICS_SERVICE, "api_token": path.read_text().strip()}
    )
    c.JupyterHub.load_roles.append(
        {
            "name": HUB_METRICS_SERVICE,
            "description": "Prometheus reads the hub's metrics",
            "scopes": ["read:metrics"],
            "services": [HUB_METRICS_SERVICE],
        }
    )


def _mint_for_roles(c: Any, subjects: dict[str, dict[str, Any]], hub_api_token: str) -> None:
    """Who may ask the token service for someone else's token (the private key stays there).

    The hub process, as its own service ``beamhub-hub``, for every user's server; each service
    in ``subjects`` for its own token subject only (the ``!user=`` filter), e.g. the dashboard
    for ``beamhub-dashboard``. Nobody else: users mint only their own tokens.
    """
    access = "access:services!service=tokens"
    c.JupyterHub.services.append({"name": "beamhub-hub", "api_token": hub_api_token})
    c.JupyterHub.load_roles.append(
        {
            "name": "beamhub-hub-mint-for",
            "description": "the hub process asks for each spawned server's delegated token",
            "scopes": [tokens_api.MINT_FOR_SCOPE, tokens_api.USERS_SCOPE, access],
            "services": ["beamhub-hub"],
        }
    )
    known = {s["name"] for s in c.JupyterHub.services}
    for name, subject in subjects.items():
        if subject.get("api_token"):
            c.JupyterHub.services.append({"name": name, "api_token": subject["api_token"]})
        elif name not in known:
            continue  # a service not started in this deployment
        c.JupyterHub.load_roles.append(
            {
                "name": f"beamhub-mint-for-{name}",
                "description": f"{name} asks for project tokens of {subject['subject']} only",
                "scopes": [f"{tokens_api.MINT_FOR_SCOPE}!user={subject['subject']}", access],
                "services": [name],
            }
        )


if "get_config" in globals():  # loaded by `jupyterhub -f`
    c = get_config()  # type: ignore[name-defined]  # noqa: F821
    configure(c, json.loads(Path(os.environ["BEAMHUB_RUNTIME"]).read_text()))
