"""The gateway's operations (one per OpenAPI ``x-handler``): status, DSN channels, jobs, beamtime.

They run after the gateway has verified the token, applied policy and rate limits and written the
audit record; each returns ``(http_status, json_body)`` or raises
:class:`~beamhub.auth.api.ApiError`. They see the gateway only as :class:`GatewayState` (what they
read of it), so this module does not import the app that serves them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from beamhub.auth.api import ApiError
from beamhub.hub.gateway.api import API_PREFIX, RequestContext
from beamhub.hub.gateway.jobs import scheduler_error
from beamhub.kernels.scheduler import SchedulerError

__all__ = ["GatewayState", "Operations"]

Result = tuple[int, Any]
DSN_TIMEOUT_S = 10.0


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
            "reservations": {"GET": self.reservations_list, "POST": self.reservations_request},
            "reservation_decide": {"POST": self.reservation_decide},
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
        nodes: list[dict] = []
        if self.gw.nodes is not None:
            nodes = await self.gw.nodes()
        elif isinstance(getattr(self.gw.scheduler, "nodes", None), dict):
            nodes = await self._scheduler_nodes()
        windows: list[dict] = []
        book = self.gw.reservations
        if book is not None:
            now = time.time()
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
        return 200, {
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "enclave": self.gw.enclave,
            "nodes": nodes,
            "reservations": windows,
            "maintenance": self.gw.maintenance,
            "streams": await self._dsn_health(),
        }

    async def _scheduler_nodes(self) -> list[dict]:
        """The scheduler's nodes with how many jobs run on each (no job details: public)."""
        running: dict[str, int] = {}
        for job in await self.gw.scheduler.list(None):
            if getattr(job.state, "value", job.state) == "running" and job.node:
                for name in str(job.node).split(","):
                    running[name] = running.get(name, 0) + 1
        return [
            {
                "name": name,
                "cpus": getattr(node, "cpus", None),
                "jobs": running.get(name, 0),
                "state": "busy" if running.get(name) else "idle",
            }
            for name, node in self.gw.scheduler.nodes.items()
        ]

    async def _dsn_health(self) -> dict[str, Any]:
        if self.gw.dsn_url is None:
            return {"dsn": "not configured"}
        code, body = await self._dsn("GET", "/api/health", None, "", timeout=2.0, soft=True)
        if code != 200 or not isinstance(body, dict):
            return {"dsn": "unreachable"}
        return {"dsn": "up", "channels": body.get("channels")}

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
    async def _dsn(
        self,
        method: str,
        path: str,
        body: Any,
        authorization: str,
        timeout: float = DSN_TIMEOUT_S,
        soft: bool = False,
    ) -> Result:
        if self.gw.dsn_url is None:
            raise ApiError(
                503,
                "dsn_not_configured",
                "stream channels need a DSN; this gateway has none configured",
            )
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True)
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
        response = await self._http.fetch(request, raise_error=False)
        if response.code == 599:
            if soft:
                return 599, None
            raise ApiError(
                503,
                "dsn_unavailable",
                f"the Data Streaming Node at {self.gw.dsn_url} did not answer "
                f"({response.error}); try again shortly",
            )
        if response.code == 204 or not response.body:
            return response.code, None
        try:
            return response.code, json.loads(response.body)
        except ValueError:
            raise ApiError(
                502, "dsn_bad_answer", f"the DSN answered {response.code} without JSON"
            ) from None

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

    # -- jobs: hub/gateway/jobs.py (the hub's jobs API, or an in-process scheduler) ----------------
    def _jobs(self) -> Any:
        if self.gw.jobs is None:
            raise ApiError(
                503,
                "jobs_not_configured",
                "jobs need a scheduler; this gateway has none configured",
            )
        return self.gw.jobs

    async def jobs_list(self, ctx: RequestContext) -> Result:
        assert ctx.claims is not None and ctx.project is not None
        return 200, {"jobs": await self._jobs().list(ctx.claims.sub, ctx.project)}

    async def jobs_submit(self, ctx: RequestContext) -> Result:
        assert ctx.claims is not None and ctx.project is not None
        return 201, await self._jobs().submit(ctx.claims.sub, ctx.project, dict(ctx.body))

    async def job_get(self, ctx: RequestContext) -> Result:
        assert ctx.claims is not None and ctx.project is not None
        return 200, await self._jobs().get(ctx.claims.sub, ctx.project, ctx.params["job_id"])

    async def job_cancel(self, ctx: RequestContext) -> Result:
        assert ctx.claims is not None and ctx.project is not None
        await self._jobs().cancel(ctx.claims.sub, ctx.project, ctx.params["job_id"])
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
                window = await asyncio.to_thread(book.approve, window_id, ctx.claims.sub)
            else:
                window = await asyncio.to_thread(
                    book.deny, window_id, ctx.claims.sub, ctx.body["reason"]
                )
        except SchedulerError as exc:
            raise scheduler_error(exc) from exc
        return 200, window.to_dict()
