"""The shared dashboard as a JupyterHub service: hub login, project membership check, live bokeh page.

``beamhub up`` runs it as ``python -m widgets.dashboard_service --state-dir DIR`` under
``/services/dashboard/``; JupyterHub passes ``JUPYTERHUB_SERVICE_URL``/``_PREFIX`` and the OAuth
client settings. What a browser (and the browser tests) sees:

* ``/services/dashboard/`` — hub OAuth login, then a redirect to the page of the caller's project
  (strongest role first); a user in no project gets 403.
* ``/services/dashboard/p/<project>/`` — members of any role: ``<main id="dashboard"
  data-project=... data-role=...>`` with one ``<section class="stream" id="stream-<channel>">`` per
  DSN channel: numbers ``.frames-analysed``, ``.hit-rate``, ``.peaks-per-frame``,
  ``.frames-lost``, ``.latency-p50``, ``.latency-p99``, ``.rate-hz`` and bokeh figures (hit rate and
  peaks per frame over time, radial profile, downsampled detector image with the found peaks)
  updated from ``data.json`` at ``update_hz`` (default 2 Hz). ``#steering`` (a link to the
  steering notebook) exists only for roles that may steer (pi, operator): viewers and members get
  no controls. Non-members: 403 with ``<p id="forbidden">You are not a member of project X``.
* ``p/<project>/data.json`` — the same numbers and figure data as JSON (401/403 JSON otherwise).
* ``api/status`` — subscriptions (one monitor consumer per channel, shared by all viewers), open
  consumers, the DSN's own count of monitor viewers, and active viewer pages, for the caller's
  projects (admins: all). ``api/health`` and ``healthz`` — unauthenticated liveness; ``metrics``
  — viewers and subscriptions in Prometheus text format, for this host.
* ``admin/allocation`` — hub admins only: the allocation report page (bokeh plots) that
  `beamhub report allocation --publish` last wrote to ``<state>/reports/allocation.html``.

JSON errors have the one shape of :mod:`beamhub.auth.api` (``{"reason", "message", "field"?}``).
The dashboard never opens the signing key: it asks the token service for its ``stream.read``
tokens (subject :data:`DASHBOARD_USER`) with its own JupyterHub API token, whose role holds
``custom:beamhub:tokens:mint-for!user=beamhub-dashboard``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from tornado import httpserver, web

from beamhub.auth.api import ApiError, JsonApiHandler, log_request
from beamhub.auth.home import state_dir
from beamhub.auth.metrics import METRICS_ACCESS, HealthzHandler, MetricsHandler
from beamhub.auth.mint_client import MintForClient
from beamhub.widgets.dashboard import Dashboard, TokenSource
from beamhub.widgets.dashboard_metrics import render_metrics
from beamhub.widgets.live_image import PALETTES

__all__ = [
    "DASHBOARD_USER",
    "build_app",
    "main",
    "mint_for_tokens",
    "project_roles",
    "source_text",
    "stream_figures",
]

log = logging.getLogger("beamhub.dashboard")
HERE = Path(__file__).resolve().parent

#: The token subject the dashboard reads streams as (a viewer of each project it serves).
DASHBOARD_USER = "beamhub-dashboard"
#: Roles that may steer: only they see the steering section.
STEER_ROLES = ("pi", "operator")
ROLE_ORDER = ("pi", "operator", "member", "viewer")
#: A page asks for at most this many image tiles per second (zooming, panning, new hits).
MAX_TILE_HZ = 10


def project_roles(user: dict[str, Any]) -> dict[str, str]:
    """{project: role} from the hub groups the authenticator manages (``p-1001:viewer``)."""
    roles: dict[str, str] = {}
    for group in user.get("groups") or []:
        project, _, role = group.rpartition(":")
        if project and role in ROLE_ORDER:
            best = roles.get(project)
            if best is None or ROLE_ORDER.index(role) < ROLE_ORDER.index(best):
                roles[project] = role
    return roles


def mint_for_tokens(client: MintForClient) -> TokenSource:
    """``stream.read`` tokens of :data:`DASHBOARD_USER` (a viewer of every project) from the token
    service, which records them (so they can be listed and revoked like any other)."""

    def mint(project: str) -> tuple[str, float]:
        token, claims = client.mint(
            DASHBOARD_USER,
            project,
            ["stream.read"],
            kind="service",
            description="shared dashboard: monitor subscription",
        )
        log.info("dashboard token jti=%s project=%s exp=%s", claims["jti"], project, claims["exp"])
        return token, float(claims["exp"])

    return mint


def stream_figures(channel_id: str, stream: str, shape: tuple[int, int] | None = None) -> Any:
    """Bokeh figures of one stream; their models are named ``<channel>:<what>``.

    ``shape`` (height, width) fixes the image plot's ranges to the detector's pixels. The image
    plot zooms and pans (wheel, drag, box); each change of its ranges fires a
    ``beamhub-viewport`` DOM event, on which the page asks for a tile of what is in view."""
    from bokeh.layouts import column, row
    from bokeh.models import ColumnDataSource, CustomJS, LabelSet, LinearColorMapper, Range1d
    from bokeh.plotting import figure

    def src(what: str, **cols: list) -> ColumnDataSource:
        return ColumnDataSource(data=cols, name=f"{channel_id}:{what}")

    series = src("series", t=[], hit_rate=[], peaks_per_frame=[])
    events = src("events", t=[], kind=[], text=[], by=[], label=[])
    kw = {
        "height": 220,
        "width": 420,
        "x_axis_type": "datetime",
        "x_axis_label": "time (local)",
        "tools": "xpan,xwheel_zoom,reset",
    }
    hits = figure(title=f"{stream}: hit rate", y_range=(0, 1), y_axis_label="hit rate", **kw)
    hits.line("t", "hit_rate", source=series, line_width=2)
    peaks = figure(title=f"{stream}: peaks per frame", y_axis_label="peaks / frame", **kw)
    peaks.line("t", "peaks_per_frame", source=series, line_width=2, color="darkorange")
    for fig in (hits, peaks):  # steering changes and run starts/stops: who changed what
        fig.vspan(x="t", source=events, line_color="#7b3294", line_dash="dashed", line_width=1.5)
        fig.add_layout(
            LabelSet(
                x="t",
                y=4,
                y_units="screen",
                text="label",
                source=events,
                angle=1.5708,
                text_font_size="8pt",
                text_color="#7b3294",
                x_offset=-2,
            )
        )
    profile = figure(
        title=f"{stream}: radial profile",
        height=220,
        width=420,
        x_axis_label="radius (px)",
        toolbar_location=None,
    )
    profile.line("r", "value", source=src("profile", r=[], value=[]), line_width=2)
    h, w = shape or (1, 1)
    image = figure(
        title=f"{stream}: waiting for a frame",
        height=480,
        width=480,
        x_range=Range1d(0, w, name=f"{channel_id}:xrange"),
        y_range=Range1d(0, h, name=f"{channel_id}:yrange"),
        tools="pan,wheel_zoom,box_zoom,reset",
        active_scroll="wheel_zoom",
        x_axis_label="column (px)",
        y_axis_label="row (px, from the top)",
        name=f"{channel_id}:imagefig",
    )
    image.image(
        "image",
        x="x",
        y="y",
        dw="dw",
        dh="dh",
        color_mapper=LinearColorMapper(palette=PALETTES["Viridis256"], name=f"{channel_id}:mapper"),
        source=src("image", image=[], x=[], y=[], dw=[], dh=[]),
    )
    image.scatter(
        "x",
        "y",
        source=src("peaks", x=[], y=[]),
        size=12,
        marker="circle",
        fill_alpha=0,
        line_color="red",
        line_width=1.5,
    )
    moved = CustomJS(
        args={"channel": channel_id},
        code='document.dispatchEvent(new CustomEvent("beamhub-viewport", {detail: channel}))',
    )
    for rng in (image.x_range, image.y_range):
        rng.js_on_change("start", moved)
        rng.js_on_change("end", moved)
    return row(column(hits, peaks, profile), image)


def source_text(source: dict[str, Any] | None) -> str:
    """One line of the source's current steering values (the page's JS writes the same)."""
    if not source:
        return ""
    values = ", ".join(f"{k} = {v}" for k, v in source["values"].items())
    return f"detector settings (revision {source['rev']}): {values}"


class _Handler(web.RequestHandler):
    def initialize(self, dashboard: Dashboard, options: dict[str, Any]) -> None:
        self.dashboard = dashboard
        self.options = options

    def user_roles(self) -> tuple[dict[str, Any], dict[str, str]] | None:
        user = self.current_user
        return None if not user else (user, project_roles(user))

    def forbidden(self, message: str) -> None:
        self.set_status(403)
        self.render("dashboard_error.html", message=message, prefix=self.options["prefix"])


class _Page(HubOAuthenticated, _Handler):
    """HTML pages: an unauthenticated browser is sent through the hub's OAuth login."""


class _Json(JsonApiHandler, _Handler):
    """JSON endpoints in the one API shape (auth/api.py)."""

    service = "the shared dashboard"


class _Api(HubOAuthenticated, _Json):
    """JSON endpoints behind the hub login: 401/403 as JSON, never a redirect."""

    def get_login_url(self) -> str:
        raise ApiError(401, "unauthenticated", _LOGIN_FIRST)

    def require(self) -> tuple[dict[str, Any], dict[str, str]]:
        found = self.user_roles()
        if found is None:
            raise ApiError(401, "unauthenticated", _LOGIN_FIRST)
        return found


_LOGIN_FIRST = "log in to the hub first (or send 'Authorization: token <JupyterHub API token>')"


class RootHandler(_Page):
    @web.authenticated
    def get(self) -> None:
        _, roles = self.user_roles() or ({}, {})
        if not roles:
            self.forbidden(
                "You are not a member of any beamhub project; ask a project's PI to "
                "add you (any role, viewer included, may watch its dashboard)."
            )
            return
        best = min(roles, key=lambda p: (ROLE_ORDER.index(roles[p]), p))
        self.redirect(f"{self.options['prefix']}p/{best}/")


class ProjectPageHandler(_Page):
    @web.authenticated
    async def get(self, project: str) -> None:
        from bokeh.embed import components

        user, roles = self.user_roles() or ({}, {})
        role = roles.get(project)
        if role is None:
            self.forbidden(
                f"You are not a member of project {project}. Its dashboard is for its "
                "members (pi, operator, member, viewer); ask its PI to add you."
            )
            return
        feed = self.dashboard.feed(project)
        await asyncio.to_thread(feed.wait_discovered, 5.0)
        viewer = secrets.token_hex(8)
        self.dashboard.touch(project, viewer, user["name"])
        snap = feed.snapshot()
        figures = {
            s["channel"]: stream_figures(
                s["channel"],
                s["stream"],
                (s["image"]["height"], s["image"]["width"]) if s["image"] else None,
            )
            for s in snap["streams"]
        }
        script, divs = components(figures) if figures else ("", {})
        xsrf = self.xsrf_token  # fetch() of data.json is CORS-mode: JupyterHub checks xsrf
        self.render(
            "dashboard.html",
            xsrf=xsrf.decode() if isinstance(xsrf, bytes) else xsrf,
            project=project,
            role=role,
            user=user["name"],
            snap=snap,
            script=script,
            divs=divs,
            viewer=viewer,
            can_steer=role in STEER_ROLES,
            prefix=self.options["prefix"],
            interval_ms=int(1000 / self.options["update_hz"]),
            other_projects=sorted(p for p in roles if p != project),
            palettes=json.dumps(PALETTES),
            palette_names=list(PALETTES),
            max_tile_hz=MAX_TILE_HZ,
            source_text=source_text,
        )


class DataHandler(_Api):
    def get(self, project: str) -> None:
        user, roles = self.require()
        if project not in roles:
            raise ApiError(
                403,
                "not_member",
                f"You are not a member of project {project}; ask its PI to add you "
                "(any role, viewer included, may watch its dashboard)",
            )
        viewer = self.get_argument("viewer", "") or f"api-{user['name']}"
        self.dashboard.touch(project, viewer, user["name"])
        body = self.dashboard.feed(project).snapshot()
        body.update(role=roles[project], viewers=self.dashboard.viewers(project))
        self.write_json(body)


class _StreamApi(_Api):
    """Endpoints about one stream of a project the caller belongs to."""

    def stream_monitor(self, project: str) -> Any:
        _user, roles = self.require()
        if project not in roles:
            raise ApiError(
                403, "not_member", f"You are not a member of project {project}; ask its PI"
            )
        channel = self.get_argument("channel", "")
        if not channel:
            raise ApiError(
                400, "missing_field", "channel: required (?channel=<id>)", field="channel"
            )
        try:
            return self.dashboard.feed(project).monitor(channel)
        except KeyError as exc:
            raise ApiError(404, "unknown_channel", str(exc.args[0]), field="channel") from exc


class TileHandler(_StreamApi):
    """``p/<project>/tile?channel=&x0=&x1=&y0=&y1=&px=[&seq=]``: the shown frame's (or held
    hit's) region in view as
    raw little-endian float32 (``X-Tile-*`` and ``X-Frame-*`` headers say what it is)."""

    def get(self, project: str) -> None:
        monitor = self.stream_monitor(project)
        viewport = {k: self.get_argument(k, "") for k in ("x0", "x1", "y0", "y1", "px")}
        for name, value in viewport.items():
            if value == "":
                raise ApiError(400, "missing_field", f"{name}: required (pixels)", field=name)
        seq_arg = self.get_argument("seq", "")
        try:
            seq = int(seq_arg) if seq_arg else None
        except ValueError:
            raise ApiError(
                400, "invalid", f"seq: {seq_arg!r} is not a frame number", field="seq"
            ) from None
        try:
            tile, info = monitor.tile(seq, **viewport)
        except LookupError as exc:
            raise ApiError(404, "no_frame", str(exc)) from exc
        except ValueError as exc:
            field = str(exc).split(":", 1)[0]
            raise ApiError(400, "invalid", str(exc), field=field) from exc
        for key, value in tile.headers().items():
            self.set_header(key, value)
        self.set_header("X-Frame", json.dumps(info))  # the frame drawn: label and circles
        self.set_header("Content-Type", "application/octet-stream")
        self.set_header("Cache-Control", "no-store")
        self.finish(tile.data.astype("<f4", copy=False).tobytes())


class ExportHandler(_StreamApi):
    """``p/<project>/frames.csv|frames.h5?channel=&run=``: per-frame hit/peaks figures."""

    def get(self, project: str, kind: str) -> None:
        monitor = self.stream_monitor(project)
        run_arg = self.get_argument("run", "")
        try:
            run = int(run_arg) if run_arg else None
        except ValueError:
            raise ApiError(
                400, "invalid", f"run: {run_arg!r} is not a run number", field="run"
            ) from None
        name = f"{monitor.stream or monitor.channel_id}-" + (
            f"run{run}" if run is not None else "all"
        )
        if kind == "csv":
            body: bytes = monitor.frame_log.to_csv(run).encode()
            self.set_header("Content-Type", "text/csv; charset=utf-8")
        else:
            attrs = {"stream": monitor.stream, "channel": monitor.channel_id, "project": project}
            body = monitor.frame_log.to_hdf5(run, attrs)
            self.set_header("Content-Type", "application/x-hdf5")
        self.set_header("Content-Disposition", f'attachment; filename="{name}-frames.{kind}"')
        self.set_header("Cache-Control", "no-store")
        self.finish(body)


#: Where `beamhub report allocation --publish` writes the page this service shows admins.
ALLOCATION_PAGE = "reports/allocation.html"


class AllocationReportHandler(_Page):
    """The allocation report for hub admins: the page as `beamhub report allocation` wrote it
    (this service reads no scheduler database)."""

    @web.authenticated
    def get(self) -> None:
        user, _ = self.user_roles() or ({}, {})
        if not user.get("admin"):
            self.forbidden("The allocation report is for the facility's admins (hub admins) only.")
            return
        path = self.options.get("reports_dir")
        try:
            page = (Path(path) / ALLOCATION_PAGE).read_bytes() if path else None
        except FileNotFoundError:
            page = None
        if page is None:
            self.set_status(404)
            self.render(
                "dashboard_error.html",
                message="No allocation report is published yet: on the hub's machine run "
                "`beamhub report allocation --publish` (e.g. hourly from cron).",
                prefix=self.options["prefix"],
            )
            return
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(page)


class StatusHandler(_Api):
    def get(self) -> None:
        user, roles = self.require()
        scope = None if user.get("admin") else set(roles)
        self.write_json(self.dashboard.status(scope))


class HealthHandler(_Json):
    def get(self) -> None:
        self.write_json({"status": "ok", "projects": len(self.dashboard.feeds)})


class NotFoundHandler(_Json):
    def prepare(self) -> None:  # type: ignore[override]
        raise ApiError(
            404,
            "not_found",
            f"no page {self.request.path}; the dashboard is at {self.options['prefix']}",
        )


class OAuthCallbackHandler(HubOAuthCallbackHandler, JsonApiHandler):
    """JupyterHub's OAuth callback (sets the dashboard's login cookie); errors as JSON."""

    service = "the shared dashboard"


def _log_request(handler: web.RequestHandler) -> None:
    """Access log by path: the query string may hold the OAuth ``code`` and ``state``."""
    log_request(handler, log)


def build_app(
    dashboard: Dashboard,
    prefix: str = "/services/dashboard/",
    *,
    update_hz: float = 2.0,
    cookie_secret: bytes | None = None,
    metrics: str = "local-or-token",
    reports_dir: Path | None = None,
) -> web.Application:
    """The tornado app (JupyterHub's HubOAuth settings come from the service environment).
    ``metrics``: who may read ``metrics``; the dashboard verifies no project tokens, so only
    ``local-or-token`` (this host) or ``public`` let anyone read them. ``reports_dir``: the state
    folder whose :data:`ALLOCATION_PAGE` admins see (None: no report page)."""
    from bokeh.util.paths import bokehjs_path

    if not 0.2 <= update_hz <= 5.0:
        raise ValueError(f"update_hz: {update_hz} is outside 0.2..5 (page updates per second)")
    p = prefix if prefix.endswith("/") else prefix + "/"
    options = {"prefix": p, "update_hz": update_hz, "reports_dir": reports_dir}
    args = {"dashboard": dashboard, "options": options}
    return web.Application(
        [
            (p, RootHandler, args),
            (p + r"p/([A-Za-z0-9_.-]+)/", ProjectPageHandler, args),
            (p + r"p/([A-Za-z0-9_.-]+)/data\.json", DataHandler, args),
            (p + r"p/([A-Za-z0-9_.-]+)/tile", TileHandler, args),
            (p + r"p/([A-Za-z0-9_.-]+)/frames\.(csv|h5)", ExportHandler, args),
            (p + "api/status", StatusHandler, args),
            (p + "admin/allocation", AllocationReportHandler, args),
            (p + "api/health", HealthHandler, args),
            (p + "healthz", HealthzHandler, {"service": "the shared dashboard"}),
            (
                p + "metrics",
                MetricsHandler,
                {
                    "service": "the shared dashboard",
                    "access": metrics,
                    "verifier": None,  # it verifies no project tokens: this host only
                    "render": lambda: render_metrics(dashboard),
                },
            ),
            (p + "oauth_callback", OAuthCallbackHandler),
            (p + "static/(.*)", web.StaticFileHandler, {"path": str(bokehjs_path())}),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=args,
        template_path=str(HERE),
        cookie_secret=cookie_secret or os.urandom(32),
        xsrf_cookies=False,
        log_function=_log_request,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m widgets.dashboard_service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where runtime.json is (default $BEAMHUB_HOME)",
    )
    p.add_argument("--dsn-url", default=None, help="the DSN control API (default: runtime.json)")
    p.add_argument(
        "--tokens-url",
        default=None,
        help="the token service, e.g. http://127.0.0.1:PORT/services/tokens/ (default: "
        "runtime.json); the dashboard's tokens are minted there with $JUPYTERHUB_API_TOKEN",
    )
    p.add_argument(
        "--project",
        action="append",
        default=[],
        help="subscribe to this project's streams at start (repeatable)",
    )
    p.add_argument("--update-hz", type=float, default=2.0, help="page updates per second (0.2-5)")
    p.add_argument("--discover-s", type=float, default=2.0, help="seconds between channel lists")
    p.add_argument("--image-px", type=int, default=96, help="downsampled image side, pixels")
    p.add_argument(
        "--analysis",
        default="{}",
        help="peak-finder settings as JSON, e.g. '{\"min_peaks_for_hit\": 3}'",
    )
    p.add_argument(
        "--idle-stop-s",
        type=float,
        default=600.0,
        help="unsubscribe from a project nobody watched this long (0 = never)",
    )
    p.add_argument(
        "--metrics",
        choices=METRICS_ACCESS,
        default="local-or-token",
        help="who may read metrics: a client on this host (default) or anyone ('public')",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s dashboard %(levelname)s %(message)s"
    )
    args = _parser().parse_args(argv)
    state = args.state_dir or state_dir()
    runtime_path = state / "runtime.json"
    runtime = json.loads(runtime_path.read_text()) if runtime_path.exists() else {}
    dsn_url = args.dsn_url or runtime.get("dsn_url")
    if not dsn_url:
        print(
            f"dashboard: no DSN URL: pass --dsn-url or start it with `beamhub up` "
            f"({runtime_path} has none)",
            file=sys.stderr,
        )
        return 2
    if args.image_px < 8:
        print(f"dashboard: --image-px {args.image_px} is below 8 pixels", file=sys.stderr)
        return 2
    try:
        from beamhub.streaming.peakfinder import PeakFinderParams

        analysis = json.loads(args.analysis)
        PeakFinderParams.create(analysis)
    except (ValueError, TypeError) as exc:  # JSON errors and ParamError (names the field)
        print(f"dashboard: --analysis: {exc}", file=sys.stderr)
        return 2
    tokens_url = args.tokens_url or (
        f"http://{runtime.get('ip', '127.0.0.1')}:{runtime['tokens_port']}/services/tokens/"
        if runtime.get("tokens_port")
        else ""
    )
    try:
        client = MintForClient(tokens_url, os.environ.get("JUPYTERHUB_API_TOKEN", ""))
    except ValueError as exc:
        print(
            f"dashboard: cannot ask the token service for tokens: {exc}. Run it as a hub "
            "service (JupyterHub sets JUPYTERHUB_API_TOKEN) and pass --tokens-url "
            f"(or start it with `beamhub up`; {runtime_path} names none)",
            file=sys.stderr,
        )
        return 2
    tokens = mint_for_tokens(client)
    dashboard = Dashboard(
        dsn_url,
        tokens,
        discover_s=args.discover_s,
        idle_stop_s=args.idle_stop_s,
        monitor_kwargs={"image_px": args.image_px, "params": analysis},
    )
    for project in args.project:
        dashboard.feed(project, pin=True)
    url = urlparse(os.environ.get("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:0"))
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/dashboard/")
    try:
        app = build_app(
            dashboard, prefix, update_hz=args.update_hz, metrics=args.metrics, reports_dir=state
        )
    except ValueError as exc:
        dashboard.close()
        print(f"dashboard: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        server = httpserver.HTTPServer(app)
        server.listen(url.port or 0, url.hostname or "127.0.0.1")
        log.info(
            "shared dashboard listening on %s%s (DSN %s)", url.geturl().rstrip("/"), prefix, dsn_url
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 30)
            except TimeoutError:
                await asyncio.to_thread(dashboard.reap)
        server.stop()
        log.info("shared dashboard stopping")

    try:
        asyncio.run(run())
    finally:
        dashboard.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
