"""The gateway's operations (one per OpenAPI ``x-handler``): status, DSN channels, jobs, beamtime.

They run after the gateway has verified the token, applied policy and rate limits and written the
audit record; each returns ``(http_status, json_body)`` or raises
:class:`~beamhub.auth.api.ApiError`. They see the gateway only as :class:`GatewayState` (what they
read of it), so this module does not import the app that serves them.

A dependency that cannot be reached (the DSN, the hub's jobs API) makes the operations that need
it answer 503 with ``Retry-After``; the public ``status`` never fails for it, it says what is
down (and, under `beamhub up`, shows the supervisor's state of every service).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from beamhub.auth.api import ApiError
from beamhub.hub.gateway.api import API_PREFIX, RequestContext
from beamhub.hub.gateway.audit import AuditLog
from beamhub.hub.gateway.jobs import scheduler_error, unavailable
from beamhub.hub.reports.sla import public_uptime
from beamhub.kernels.hub_backend import HubScheduler
from beamhub.kernels.scheduler import SchedulerError

__all__ = ["GatewayState", "Operations", "RawBody", "node_occupancy", "supervisor_services"]

log = logging.getLogger("beamhub.gateway")

Result = tuple[int, Any]
DSN_TIMEOUT_S = 10.0
#: How long the public status waits for each dependency's health answer.
HEALTH_TIMEOUT_S = 2.0
#: What the status shows of each service in the supervisor's status.json (not its log's path).
SERVICE_FIELDS = ("state", "pid", "restarts", "since", "last_exit", "last_exit_at")


def supervisor_services(state_dir: Path | None) -> dict[str, dict[str, Any]] | None:
    """Each service's state from `beamhub up`'s ``<state>/status.json``
    (hub/up/supervisor.py), or None when there is none to read. Read defensively: the file may
    be missing (no supervisor), unreadable or of another shape; none of that fails the status."""
    if state_dir is None:
        return None
    path = Path(state_dir) / "status.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("cannot read the supervisor's status %s: %s", path, exc)
        return None
    services = data.get("services") if isinstance(data, dict) else None
    if not isinstance(services, dict):
        return None
    return {
        str(name): {key: entry.get(key) for key in SERVICE_FIELDS}
        for name, entry in services.items()
        if isinstance(entry, dict)
    }


def _kind(name: str) -> str:
    """What a job is, from the names the spawner and the Dask helper give their jobs."""
    if name.startswith("jupyter-"):
        return "notebook server"
    if name.startswith("dask-worker-"):
        return "dask worker"
    return "job"


def node_occupancy(cpus: Mapping[str, int | None], jobs: Iterable[Any]) -> list[dict[str, Any]]:
    """Each node (name → CPUs) with the running jobs on it, as the public status shows them:
    project, tier and kind of each job, never its user, name or command."""
    running: dict[str, list[dict[str, Any]]] = {name: [] for name in cpus}
    for job in jobs:
        if getattr(job.state, "value", job.state) != "running" or not job.node:
            continue
        spec = job.spec
        entry = {
            "project": spec.project if spec else "",
            "tier": spec.tier if spec else "",
            "kind": _kind(spec.name if spec else ""),
            "since": job.start_time,
        }
        for name in str(job.node).split(","):
            running.setdefault(name, []).append(entry)
    return [
        {
            "name": name,
            "cpus": cpus.get(name),
            "jobs": len(on_node),
            "state": "busy" if on_node else "idle",
            "running": on_node,
        }
        for name, on_node in running.items()
    ]


def _epoch(value: Any, field: str) -> float:
    """ISO 8601 (UTC if no zone) or epoch seconds → epoch seconds, or a 400 naming the field."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise ApiError(
            400,
            "invalid_field",
            f"{field}: {value!r} is not an ISO 8601 time (e.g. 2026-12-01T08:00:00Z) "
            "or epoch seconds",
            field=field,
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


class RawBody:
    """An answer that is not JSON (the calendar feed): its bytes and content type."""

    def __init__(self, data: bytes, content_type: str) -> None:
        self.data = data
        self.content_type = content_type


class GatewayState(Protocol):
    """What the operations read of the gateway (:class:`beamhub.hub.gateway.app.Gateway`);
    read at each call, so a collaborator set after start is seen."""

    base_url: str
    openapi: dict[str, Any]
    enclave: str
    maintenance: list[dict[str, Any]]
    dsn_url: str | None
    nodes: Callable[[], Awaitable[list[dict]]] | None
    scheduler: Any
    jobs: Any
    reservations: Any
    audit: AuditLog | None
    state_dir: Path | None


class Operations:
    """Holds the gateway's collaborators' adapters; ``run(name, ctx)`` dispatches."""

    def __init__(self, gateway: GatewayState) -> None:
        self.gw = gateway
        self._http: AsyncHTTPClient | None = None
        self._table: dict[str, dict[str, Callable[[RequestContext], Awaitable[Result]]]] = {
            "index": {"GET": self.index},
            "openapi": {"GET": self.openapi},
            "status": {"GET": self.status},
            "whoami": {"GET": self.whoami},
            "channels": {"GET": self.channels_list, "POST": self.channels_create},
            "channel": {"GET": self.channel_get, "DELETE": self.channel_delete},
            "channel_renew": {"POST": self.channel_renew},
            "steer_run": {"POST": self.steer_run},
            "steer_param": {"PUT": self.steer_param},
            "jobs": {"GET": self.jobs_list, "POST": self.jobs_submit},
            "job": {"GET": self.job_get, "DELETE": self.job_cancel},
            "job_output": {"GET": self.job_output},
            "reservations": {"GET": self.reservations_list, "POST": self.reservations_request},
            "reservation_decide": {"POST": self.reservation_decide},
            "maintenance": {"GET": self.maintenance_list, "POST": self.maintenance_add},
            "maintenance_cancel": {"POST": self.maintenance_cancel},
            "calendar": {"GET": self.calendar},
            "config_reload": {"POST": self.config_reload},
        }

    async def run(self, name: str, ctx: RequestContext) -> Result:
        return await self._table[name][ctx.method](ctx)

    async def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.gw.jobs is not None:
            await self.gw.jobs.close()

    # -- public --------------------------------------------------------------------------------
    async def index(self, ctx: RequestContext) -> Result:
        base = f"{self.gw.base_url}{API_PREFIX}"
        return 200, {
            "name": "beamhub API gateway",
            "version": self.gw.openapi["info"]["version"],
            "api": "v1",
            "openapi": f"{base}/openapi.json",
            "status": f"{base}/status",
        }

    async def openapi(self, ctx: RequestContext) -> Result:
        doc = dict(self.gw.openapi)
        doc["servers"] = [{"url": f"{self.gw.base_url}{API_PREFIX}"}]
        return 200, doc

    async def status(self, ctx: RequestContext) -> Result:
        """Public: never fails because a dependency is down; says which one is."""
        dependencies: dict[str, dict[str, Any]] = {}
        nodes, windows, streams, _ = await asyncio.gather(
            self._part("scheduler", self._nodes(), [], dependencies),
            self._part("reservations", self._windows(), [], dependencies),
            self._dsn_health(dependencies),
            self._hub_health(dependencies),
        )
        down = {name for name, dep in dependencies.items() if dep["state"] == "down"}
        body: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "enclave": self.gw.enclave,
            "nodes": nodes,
            "reservations": windows,
            "maintenance": self.gw.maintenance + await self._calendar_maintenance(),
            "incidents": await self._open_incidents(),
            "streams": streams,
            "dependencies": dependencies,
        }
        body.update(maintenance_now_next(body["maintenance"], time.time()))
        services = supervisor_services(self.gw.state_dir)
        if services is not None:
            body["services"] = services
            uptime = await asyncio.to_thread(public_uptime, self.gw.state_dir)
            body["uptime"] = {"source": "beamhub up's service records", "services": uptime}
            down |= {name for name, svc in services.items() if svc.get("state") != "running"}
        body["down"] = sorted(down)
        if self.gw.audit is not None:
            body["audit"] = {"torn_tails": self.gw.audit.torn_tails}
        return 200, body

    async def _part(
        self, name: str, work: Awaitable[Any], default: Any, dependencies: dict[str, Any]
    ) -> Any:
        """One part of the status; a failure marks ``name`` down instead of failing it all."""
        try:
            value = await work
        except Exception:  # the public status must answer whatever broke behind it
            log.warning("status: reading the %s failed", name, exc_info=True)
            message = f"the {name} did not answer; the gateway's log has the details"
            dependencies[name] = {"state": "down", "message": message}
            return default
        if value is not None:
            dependencies.setdefault(name, {"state": "up"})
        return default if value is None else value

    async def _nodes(self) -> list[dict] | None:
        if self.gw.nodes is not None:
            return await self.gw.nodes()
        if isinstance(getattr(self.gw.scheduler, "nodes", None), dict):
            return await self._scheduler_nodes()
        return None

    async def _windows(self) -> list[dict] | None:
        book = self.gw.reservations
        if book is None:
            return None
        now = time.time()
        windows = []
        for w in await asyncio.to_thread(book.list, None, None, now):
            if w.state(now) in ("approved", "active"):  # requests stay private
                windows.append(
                    {
                        "id": w.id,
                        "project": w.project,
                        "start": w.start,
                        "end": w.end,
                        "tier": w.tier,
                        "state": w.state(now),
                    }
                )
        return windows

    async def _scheduler_nodes(self) -> list[dict]:
        """The in-process scheduler's nodes and what runs on each."""
        cpus = {name: getattr(node, "cpus", None) for name, node in self.gw.scheduler.nodes.items()}
        return node_occupancy(cpus, await self.gw.scheduler.list(None))

    async def _dsn_health(self, dependencies: dict[str, Any]) -> dict[str, Any]:
        if self.gw.dsn_url is None:
            dependencies["dsn"] = {"state": "not_configured"}
            return {"dsn": "not configured"}
        # public: says what is down, not where it runs or why (that goes to the log)
        try:
            code, body = await self._dsn("GET", "/api/health", None, "", HEALTH_TIMEOUT_S)
            why = "" if code == 200 and isinstance(body, dict) else f"health check answered {code}"
        except ApiError as exc:
            why = exc.message
        if why:
            log.info("status: the DSN is down: %s", why)
            message = "the Data Streaming Node cannot be reached"
            dependencies["dsn"] = {"state": "down", "message": message}
            return {"dsn": "down"}
        dependencies["dsn"] = {"state": "up"}
        return {"dsn": "up", "channels": body.get("channels")}

    async def _hub_health(self, dependencies: dict[str, Any]) -> None:
        """When jobs go through the hub: does its API answer (``GET /hub/api/``, no token)?"""
        hub = self.gw.scheduler
        if not isinstance(hub, HubScheduler):
            return
        request = HTTPRequest(
            hub.api_url + "/", request_timeout=HEALTH_TIMEOUT_S, follow_redirects=False
        )
        try:
            response = await self._client().fetch(request, raise_error=False)
            why = f"HTTP {response.code}" if response.code >= 500 else ""
        except (OSError, HTTPClientError) as exc:
            why = str(exc)
        if why:
            log.info("status: the hub's API at %s is down: %s", hub.api_url, why)
            message = "the hub's API cannot be reached"
            dependencies["hub"] = {"state": "down", "message": message}
        else:
            dependencies["hub"] = {"state": "up"}

    async def whoami(self, ctx: RequestContext) -> Result:
        c = ctx.claims
        assert c is not None  # a secured operation: the pipeline verified the token
        return 200, {
            "user": c.sub,
            "project": c.project,
            "scopes": sorted(c.scopes),
            "roles": sorted(ctx.roles),
            "jti": c.jti,
            "expires_in": round(c.expires_in, 1),
        }

    # -- DSN channels: forwarded with the caller's token ---------------------------------------
    def _client(self) -> AsyncHTTPClient:
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True)
        return self._http

    async def _dsn(
        self,
        method: str,
        path: str,
        body: Any,
        authorization: str,
        timeout: float = DSN_TIMEOUT_S,
    ) -> Result:
        """Forward to the DSN; its answer unchanged, except: no answer → 503 ``dsn_unavailable``
        with Retry-After; its own failure (500) → 502; not JSON → 502."""
        if self.gw.dsn_url is None:
            raise ApiError(
                503,
                "dsn_not_configured",
                "stream channels need a DSN; this gateway has none configured",
            )
        headers = {"Content-Type": "application/json"}
        if authorization:
            headers["Authorization"] = authorization
        request = HTTPRequest(
            self.gw.dsn_url + path,
            method=method,
            headers=headers,
            body=None if method in ("GET", "DELETE") else json.dumps(body or {}),
            request_timeout=timeout,
            follow_redirects=False,
        )
        try:  # raise_error=False still raises when there is no answer (refused, reset, timeout)
            response = await self._client().fetch(request, raise_error=False)
        except (OSError, HTTPClientError) as exc:  # the DSN is down or restarting
            raise unavailable(
                "dsn_unavailable", f"the Data Streaming Node at {self.gw.dsn_url}", str(exc)
            ) from exc
        if response.code == 599:
            raise unavailable(
                "dsn_unavailable",
                f"the Data Streaming Node at {self.gw.dsn_url}",
                str(response.error),
            )
        if response.code == 204 or not response.body:
            return response.code, None
        try:
            answer = json.loads(response.body)
        except ValueError:
            raise ApiError(
                502, "dsn_bad_answer", f"the DSN answered {response.code} without JSON"
            ) from None
        if response.code == 500:  # the DSN's own failure: the gateway's is a 500, not this
            said = answer.get("message") if isinstance(answer, dict) else None
            raise ApiError(502, "dsn_failed", f"the DSN failed: {said or 'no details'}")
        return response.code, answer

    async def channels_list(self, ctx: RequestContext) -> Result:
        return await self._dsn("GET", "/api/channels", None, ctx.authorization)

    async def channels_create(self, ctx: RequestContext) -> Result:
        return await self._dsn("POST", "/api/channels", ctx.body, ctx.authorization)

    async def channel_get(self, ctx: RequestContext) -> Result:
        return await self._dsn(
            "GET", f"/api/channels/{ctx.params['channel_id']}", None, ctx.authorization
        )

    async def channel_delete(self, ctx: RequestContext) -> Result:
        return await self._dsn(
            "DELETE", f"/api/channels/{ctx.params['channel_id']}", None, ctx.authorization
        )

    async def channel_renew(self, ctx: RequestContext) -> Result:
        path = f"/api/channels/{ctx.params['channel_id']}/renew"
        return await self._dsn("POST", path, ctx.body, ctx.authorization)

    async def steer_run(self, ctx: RequestContext) -> Result:
        path = f"/api/channels/{ctx.params['channel_id']}/steer/run"
        return await self._dsn("POST", path, ctx.body, ctx.authorization)

    async def steer_param(self, ctx: RequestContext) -> Result:
        path = f"/api/channels/{ctx.params['channel_id']}/steer/params/{ctx.params['name']}"
        return await self._dsn("PUT", path, ctx.body, ctx.authorization)

    # -- jobs: hub/gateway/jobs.py (the hub's jobs API, or an in-process scheduler) ------------
    def _jobs(self, ctx: RequestContext) -> tuple[Any, str, str]:
        """The jobs client, the user and the project: always the token's, whatever the policy."""
        if self.gw.jobs is None:
            raise ApiError(
                503,
                "jobs_not_configured",
                "jobs need a scheduler; this gateway has none configured",
            )
        claims = ctx.claims
        if claims is None or not claims.project:
            raise ApiError(403, "project", "jobs need a project token (its 'project' claim)")
        if ctx.project != claims.project:
            raise ApiError(
                403,
                "project",
                f"jobs belong to the token's project {claims.project!r}, not {ctx.project!r}; "
                f"use /projects/{claims.project}/jobs or a token of {ctx.project!r}",
                field="project",
            )
        return self.gw.jobs, claims.sub, claims.project

    async def jobs_list(self, ctx: RequestContext) -> Result:
        jobs, user, project = self._jobs(ctx)
        return 200, {"jobs": await jobs.list(user, project)}

    async def jobs_submit(self, ctx: RequestContext) -> Result:
        jobs, user, project = self._jobs(ctx)
        return 201, await jobs.submit(user, project, dict(ctx.body))

    async def job_get(self, ctx: RequestContext) -> Result:
        jobs, user, project = self._jobs(ctx)
        return 200, await jobs.get(user, project, ctx.params["job_id"])

    async def job_output(self, ctx: RequestContext) -> Result:
        jobs, user, project = self._jobs(ctx)
        return 200, await jobs.output(user, project, ctx.params["job_id"])

    async def job_cancel(self, ctx: RequestContext) -> Result:
        jobs, user, project = self._jobs(ctx)
        await jobs.cancel(user, project, ctx.params["job_id"])
        return 204, None

    # -- beamtime reservations (kernels.reservations.ReservationBook) --------------------------
    def _book(self) -> Any:
        if self.gw.reservations is None:
            raise ApiError(
                503,
                "reservations_not_configured",
                "beamtime reservations are not enabled on this gateway",
            )
        return self.gw.reservations

    async def reservations_list(self, ctx: RequestContext) -> Result:
        windows = await asyncio.to_thread(self._book().list, ctx.project)
        return 200, {"reservations": [w.to_dict() for w in windows]}

    async def reservations_request(self, ctx: RequestContext) -> Result:
        book = self._book()
        assert ctx.claims is not None and ctx.project is not None
        body = ctx.body
        start, end = _epoch(body["start"], "start"), _epoch(body["end"], "end")
        try:
            window_id = await asyncio.to_thread(
                book.request,
                ctx.project,
                start,
                end,
                body.get("tier", "beamtime"),
                body["justification"],
                ctx.claims.sub,
            )
            window = await asyncio.to_thread(book.get, window_id)
        except SchedulerError as exc:
            raise scheduler_error(exc) from exc
        return 201, window.to_dict()

    async def reservation_decide(self, ctx: RequestContext) -> Result:
        book = self._book()
        assert ctx.claims is not None
        window_id = int(ctx.params["window_id"])
        try:
            if ctx.path.rstrip("/").endswith("/approve"):
                override = ctx.body.get("override")
                window = await asyncio.to_thread(
                    book.approve, window_id, ctx.claims.sub, None, override
                )
                if override is not None and window.reason:
                    self._audit_override(ctx, window)
            else:
                window = await asyncio.to_thread(
                    book.deny, window_id, ctx.claims.sub, ctx.body["reason"]
                )
        except SchedulerError as exc:
            raise scheduler_error(exc) from exc
        return 200, window.to_dict()

    def _audit_override(self, ctx: RequestContext, window: Any) -> None:
        """An approval over maintenance: its own audit record, with the justification."""
        if self.gw.audit is None:
            return
        assert ctx.claims is not None
        self.gw.audit.append(
            user=ctx.claims.sub,
            project=window.project,
            jti=ctx.claims.jti,
            action="reservations.override_maintenance",
            resource=f"{ctx.method} {ctx.path}",
            rule="reservations-approve-admin",
            source=ctx.source,
            outcome="allow",
            status=200,
            reason=window.reason,
        )

    # -- the maintenance calendar (kernels.maintenance, in the reservation book's file) -------
    async def _calendar_maintenance(self) -> list[dict[str, Any]]:
        book = self.gw.reservations
        if book is None:
            return []
        try:
            windows = await asyncio.to_thread(book.maintenance.list)
        except Exception:  # the public status never fails for the calendar
            log.warning("maintenance calendar unreadable", exc_info=True)
            return []
        return [_public_maintenance(m) for m in windows]

    async def _open_incidents(self) -> list[dict[str, Any]]:
        """Open incidents (kernels.incidents, same file), for the public status."""
        book = self.gw.reservations
        if book is None:
            return []
        from beamhub.kernels.incidents import IncidentLog

        try:
            incidents = await asyncio.to_thread(lambda: IncidentLog(book.db_path).list())
        except Exception:  # the public status never fails for the incident log
            log.warning("incident log unreadable", exc_info=True)
            return []
        return [i.public() for i in incidents]

    async def maintenance_list(self, ctx: RequestContext) -> Result:
        windows = await asyncio.to_thread(self._book().maintenance.list)
        return 200, {"maintenance": [_public_maintenance(m) for m in windows]}

    async def maintenance_add(self, ctx: RequestContext) -> Result:
        from beamhub.kernels.maintenance import affected_beamtime

        book = self._book()
        assert ctx.claims is not None
        body = ctx.body
        start, end = _epoch(body["start"], "start"), _epoch(body["end"], "end")
        try:
            window = await asyncio.to_thread(
                book.maintenance.add, start, end, body["what"], body["down"], ctx.claims.sub
            )
        except SchedulerError as exc:
            raise scheduler_error(exc) from exc
        affected = affected_beamtime(window, await asyncio.to_thread(book.list))
        if affected:
            log.warning(
                "maintenance %d (%s) overlaps approved beamtime of %s",
                window.id,
                window.what,
                ", ".join(sorted({w.project for w in affected})),
            )
        return 201, {
            **window.to_dict(),
            "affected": [
                {"id": w.id, "project": w.project, "start": w.start, "end": w.end} for w in affected
            ],
            "affected_projects": sorted({w.project for w in affected}),
        }

    async def maintenance_cancel(self, ctx: RequestContext) -> Result:
        book = self._book()
        assert ctx.claims is not None
        try:
            window = await asyncio.to_thread(
                book.maintenance.cancel,
                int(ctx.params["maintenance_id"]),
                ctx.claims.sub,
                ctx.body.get("reason", ""),
            )
        except SchedulerError as exc:
            raise scheduler_error(exc) from exc
        return 200, window.to_dict()

    async def calendar(self, ctx: RequestContext) -> Result:
        from beamhub.kernels.maintenance import icalendar_feed

        book = self._book()
        maintenance = await asyncio.to_thread(book.maintenance.list, all_=True)
        beamtime = [w for w in await asyncio.to_thread(book.list) if w.status == "approved"]
        return 200, RawBody(
            icalendar_feed(maintenance, beamtime, f"beamhub-{self.gw.enclave}"),
            "text/calendar; charset=utf-8",
        )

    async def config_reload(self, ctx: RequestContext) -> Result:
        """The reload SIGHUP does (hub/gateway/config_changes.py), naming the admin token's
        subject as who asked."""
        watch = getattr(self.gw, "config_watch", None)
        if watch is None:
            raise ApiError(
                503,
                "config_not_watched",
                "this gateway watches no configuration files; run it as `beamhub up` does "
                "(python -m beamhub.hub.gateway.service)",
            )
        assert ctx.claims is not None
        who = f"{ctx.claims.sub} (admin token {ctx.claims.jti})"
        result = await asyncio.to_thread(watch.reload, self.gw, "api", who)
        if result["refused"]:
            reasons = [c["reason"] for c in result["changes"] if c["outcome"] == "deny"]
            raise ApiError(
                409,
                "policy_refused",
                "the changed policy was refused, the running policy stays: " + " | ".join(reasons),
                changes=result["changes"],
            )
        return 200, result


def _window_epoch(value: Any) -> float | None:
    """A window's start or end: epoch seconds (the calendar) or ISO 8601 (beamhub.yaml)."""
    if isinstance(value, int | float):
        return float(value)
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def maintenance_now_next(windows: Iterable[Mapping[str, Any]], now: float) -> dict[str, Any]:
    """The maintenance under way now and the next one to begin (None if none is scheduled)."""
    timed = [
        (start, end, w)
        for w in windows
        if w.get("state") != "cancelled"
        for start, end in [(_window_epoch(w.get("start")), _window_epoch(w.get("end")))]
        if start is not None and end is not None
    ]
    upcoming = sorted((t for t in timed if t[0] > now), key=lambda t: t[0])
    return {
        "maintenance_now": [w for start, end, w in timed if start <= now < end],
        "maintenance_next": upcoming[0][2] if upcoming else None,
    }


def _public_maintenance(m: Any) -> dict[str, Any]:
    """What anyone may read of a maintenance window (not who scheduled it)."""
    data = m.to_dict()
    return {
        k: data[k]
        for k in ("id", "start", "end", "start_iso", "end_iso", "what", "down", "stays_up", "state")
    }
