"""Jobs of the hub's embedded scheduler for code running in a user's server (Dask workers).

The local backend lives in the hub process (it owns the virtual nodes), so a notebook submits
through the hub: ``/hub/api/beamhub/jobs``, authenticated with the server's own
``JUPYTERHUB_API_TOKEN``. The user is the token's owner; the project and tier default to the
server's and are checked by the same TierPolicy as every other job. :class:`HubScheduler` is the
``Scheduler`` a job uses to reach it. A caller holding the custom scope :data:`ACT_FOR_SCOPE`
(the API gateway service) may name the user it acts for (``"user"`` in the body, ``?user=`` in
the query); anyone else may act only for themselves. Register in jupyterhub_config.py with::

    c.JupyterHub.extra_handlers = kernels.jobs_api.HANDLERS
    c.JupyterHub.custom_scopes = kernels.jobs_api.CUSTOM_SCOPES
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlencode

from jupyterhub.apihandlers.base import APIHandler
from jupyterhub.user import User
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from beamhub.kernels.scheduler import JobInfo, JobSpec, JobState, Scheduler, SchedulerError

__all__ = ["ACT_FOR_SCOPE", "CUSTOM_SCOPES", "HANDLERS", "HubScheduler", "JobsAPIHandler"]

_SPEC_FIELDS = {
    "name",
    "argv",
    "env",
    "cpus",
    "mem_mb",
    "nodes",
    "walltime_s",
    "workdir",
    "output",
    "requeue",
    "project",
    "tier",
}

#: JupyterHub custom scope: submit, list and cancel beamhub jobs for the user a request names.
#: Filters narrow it as usual, e.g. ``custom:beamhub:jobs:act-for!group=p-1001``.
ACT_FOR_SCOPE = "custom:beamhub:jobs:act-for"
#: For ``c.JupyterHub.custom_scopes``.
CUSTOM_SCOPES = {
    ACT_FOR_SCOPE: {
        "description": "Submit, list and cancel beamhub jobs for the user named in the request.",
    }
}


def _info_from_dict(data: dict[str, Any]) -> JobInfo:
    spec = JobSpec.from_dict(data["spec"]) if data.get("spec") else None
    return JobInfo(
        job_id=str(data["job_id"]),
        spec=spec,
        state=JobState(data["state"]),
        node=data.get("node"),
        reason=data.get("reason") or "",
        submit_time=data.get("submit_time"),
        start_time=data.get("start_time"),
        end_time=data.get("end_time"),
        exit_code=data.get("exit_code"),
        requeues=int(data.get("requeues") or 0),
    )


def _public(info: JobInfo) -> dict[str, Any]:
    data = info.to_dict()
    if data.get("spec"):
        data["spec"].pop("env", None)  # the env holds the server's API token
    return data


class JobsAPIHandler(APIHandler):
    """POST a job, GET jobs (``?id=`` repeated, or all of yours), DELETE /<id> to cancel."""

    def _caller(self, named: str | None) -> User:
        """The user this request acts for: the caller, or the one it names if it may."""
        caller = self.current_user
        own = caller.name if isinstance(caller, User) else None
        if named is not None and (not isinstance(named, str) or not named):
            raise web.HTTPError(400, f"user: expected a user name, got {named!r}")
        if named is None or named == own:
            if own is None:
                raise web.HTTPError(
                    400,
                    'user: a service must name the user it acts for ("user" in the '
                    "body, ?user= in the query)",
                )
            return caller
        if not self.has_scope(f"{ACT_FOR_SCOPE}!user={named}"):
            who = f"user {own!r}" if own else f"service {caller.name!r}"
            raise web.HTTPError(
                403,
                f"user: {who} may not act for {named!r}; only a holder of the "
                f"{ACT_FOR_SCOPE} scope may name another user",
            )
        user = self.find_user(named)
        if user is None:
            raise web.HTTPError(
                404, f"user: no hub user {named!r} (a user exists once she has logged in)"
            )
        return user

    async def _context(self, user: User):
        from beamhub.kernels.placement import open_scheduler
        from beamhub.kernels.spawner import ReservedNodeSpawner

        spawner = user.spawners[""]
        if not isinstance(spawner, ReservedNodeSpawner):
            raise web.HTTPError(400, "this hub does not use the beamhub spawner")
        return spawner, await open_scheduler(spawner._config())

    def _owned(self, user: User, info: JobInfo) -> bool:
        return user.admin or (info.spec is not None and info.spec.user == user.name)

    @web.authenticated
    async def post(self, job_id: str | None = None) -> None:
        if job_id:
            raise web.HTTPError(405, "POST to /api/beamhub/jobs, not to a job id")
        body = self.get_json_body() or {}
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the body must be a JSON object of job fields")
        user = self._caller(body.pop("user", None))
        unknown = set(body) - _SPEC_FIELDS
        if unknown:
            raise web.HTTPError(
                400,
                f"unknown job field(s) {sorted(unknown)}; allowed: {sorted(_SPEC_FIELDS)}"
                " (and user)",
            )
        spawner, scheduler = await self._context(user)
        project = body.setdefault("project", spawner.job_project or spawner.project or "")
        body.setdefault("name", "job")
        try:
            if not body.get("tier"):
                body["tier"] = await self._default_tier(spawner, scheduler, user.name, project)
            spec = JobSpec.from_dict({**body, "user": user.name})
            job_id = await scheduler.submit(spec)
        except SchedulerError as exc:
            where = f"{exc.field}: " if exc.field and not exc.message.startswith(exc.field) else ""
            raise web.HTTPError(exc.status, where + exc.message) from exc
        self.log.info(
            "beamhub job %s for %s by %s (project %s, tier %s)",
            job_id,
            user.name,
            self.current_user.name,
            spec.project,
            spec.tier,
        )
        self.set_status(201)
        self.write(
            json.dumps(
                {"job_id": job_id, "user": user.name, "project": spec.project, "tier": spec.tier}
            )
        )

    @staticmethod
    async def _default_tier(spawner, scheduler: Scheduler, user: str, project: str) -> str:
        """The server's tier for its own project, else the best tier the user may use now."""
        if spawner.job_tier and project == spawner.job_project:
            return spawner.job_tier
        if spawner.tier:
            return spawner.tier
        policy = getattr(scheduler, "policy", None)
        if policy is None or not project:
            return ""  # JobSpec.validate names the missing field
        return (await asyncio.to_thread(policy.effective_tier, user, project)).name

    @web.authenticated
    async def get(self, job_id: str | None = None) -> None:
        """``?id=`` (repeated) or all visible jobs; ``?project=`` keeps one project's."""
        user = self._caller(self.get_argument("user", None))
        _, scheduler = await self._context(user)
        ids = [job_id] if job_id else self.get_arguments("id")
        project = self.get_argument("project", None)
        infos = list((await scheduler.status(ids)).values()) if ids else await scheduler.list()
        if project is not None:
            infos = [i for i in infos if i.spec is None or i.spec.project == project]
        visible = {
            i.job_id: _public(i)
            for i in infos
            if self._owned(user, i) or (ids and i.state is JobState.UNKNOWN)
        }
        self.write(json.dumps(visible))

    @web.authenticated
    async def delete(self, job_id: str | None = None) -> None:
        user = self._caller(self.get_argument("user", None))
        if not job_id:
            raise web.HTTPError(400, "DELETE /api/beamhub/jobs/<job id>")
        _, scheduler = await self._context(user)
        info = (await scheduler.status([job_id]))[job_id]
        if info.state is JobState.UNKNOWN or not self._owned(user, info):
            raise web.HTTPError(404, f"no job {job_id!r} of yours")
        try:
            await scheduler.cancel(job_id)
        except SchedulerError as exc:
            raise web.HTTPError(exc.status, exc.message) from exc
        self.set_status(204)


#: For ``c.JupyterHub.extra_handlers``: served at /hub/api/beamhub/jobs[/<id>].
HANDLERS = [(r"/api/beamhub/jobs(?:/([^/]+))?", JobsAPIHandler)]


class HubScheduler(Scheduler):
    """The hub's embedded scheduler seen from inside a job (``JUPYTERHUB_API_*`` from the env)."""

    name = "hub"

    def __init__(self, api_url: str | None = None, token: str | None = None) -> None:
        self.api_url = (api_url or os.environ.get("JUPYTERHUB_API_URL", "")).rstrip("/")
        self.token = token or os.environ.get("JUPYTERHUB_API_TOKEN", "")
        if not self.api_url or not self.token:
            raise SchedulerError(
                "no hub to submit through: JUPYTERHUB_API_URL and JUPYTERHUB_API_TOKEN are set "
                "only inside a server the beamhub spawner started",
                status=503,
            )
        self._http = AsyncHTTPClient()

    async def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        request = HTTPRequest(
            f"{self.api_url}/beamhub/jobs{path}",
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
            body=json.dumps(body) if body is not None else None,
            request_timeout=30,
        )
        resp = await self._http.fetch(request, raise_error=False)
        if resp.code == 599:
            raise SchedulerError(f"hub unreachable at {self.api_url}: {resp.error}", status=503)
        if resp.code >= 400:
            try:
                message = json.loads(resp.body)["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.body.decode(errors="replace")[:200]
            raise SchedulerError(message, status=resp.code)
        return json.loads(resp.body) if resp.body else None

    async def submit(self, spec: JobSpec) -> str:
        body = {k: v for k, v in spec.to_dict().items() if k in _SPEC_FIELDS}
        return str((await self._call("POST", "", body))["job_id"])

    async def status(self, job_ids: list[str]) -> dict[str, JobInfo]:
        if not job_ids:
            return {}
        data = await self._call("GET", "?" + urlencode([("id", j) for j in job_ids]))
        return {
            j: _info_from_dict(data[j])
            if j in data
            else JobInfo(job_id=j, spec=None, state=JobState.UNKNOWN, reason="not visible")
            for j in job_ids
        }

    async def cancel(self, job_id: str) -> None:
        await self._call("DELETE", "/" + quote(job_id, safe=""))

    async def list(self, project: str | None = None) -> list[JobInfo]:
        infos = [_info_from_dict(d) for d in (await self._call("GET", "")).values()]
        return [i for i in infos if project is None or (i.spec and i.spec.project == project)]

    async def events(self) -> AsyncIterator[dict]:  # type: ignore[override]
        """Events are not relayed through the hub; poll ``status`` instead."""
        return
        yield  # pragma: no cover

    async def close(self) -> None:
        return None
