"""Where the gateway's jobs go: the hub's jobs API (under `beamhub up`) or an in-process Scheduler.

The local scheduler lives in the hub process, so the gateway service forwards to
``/hub/api/beamhub/jobs`` with its own hub API token, naming the user it acts for (the token's
``sub``; the service holds the ``custom:beamhub:jobs:act-for`` scope). Both classes offer the same
four calls and raise :class:`~beamhub.auth.api.ApiError`; the project is always the caller's.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from beamhub.auth.api import ApiError

__all__ = ["HubJobs", "SchedulerJobs", "scheduler_error"]

HUB_TIMEOUT_S = 30.0


def scheduler_error(exc: Exception) -> ApiError:
    """kernels.scheduler.SchedulerError (a user-facing error) → the same status and message."""
    status = int(getattr(exc, "status", 400))
    field = getattr(exc, "field", None)
    extra = {"field": field} if field else {}
    return ApiError(status, "scheduler", str(getattr(exc, "message", exc)), **extra)


def _public(info: Any) -> dict[str, Any]:
    """A job as callers see it: the spec without ``env`` (it may hold a server's API tokens)."""
    data = info.to_dict()
    if data.get("spec"):
        data["spec"].pop("env", None)
    return data


def _not_found(job_id: str, project: str) -> ApiError:
    return ApiError(404, "no_such_job", f"no job {job_id!r} in project {project!r}", field="job_id")


class HubJobs:
    """The hub's jobs API, called with the gateway service's hub API token for a named user."""

    def __init__(self, api_url: str, token: str, timeout: float = HUB_TIMEOUT_S) -> None:
        self.url = api_url.rstrip("/") + "/beamhub/jobs"
        self._token = token
        self.timeout = timeout
        self._http: AsyncHTTPClient | None = None

    async def _call(
        self,
        method: str,
        path: str = "",
        query: list[tuple[str, str]] | None = None,
        body: dict[str, Any] | None = None,
    ) -> Any:
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True)
        request = HTTPRequest(
            self.url + path + ("?" + urlencode(query) if query else ""),
            method=method,
            headers={"Authorization": f"token {self._token}", "Content-Type": "application/json"},
            body=json.dumps(body) if body is not None else None,
            request_timeout=self.timeout,
            follow_redirects=False,
        )
        response = await self._http.fetch(request, raise_error=False)
        if response.code == 599:
            raise ApiError(
                503,
                "hub_unavailable",
                f"the hub's jobs API at {self.url} did "
                f"not answer ({response.error}); try again shortly",
            )
        try:
            data = json.loads(response.body) if response.body else None
        except ValueError:
            data = None
        if response.code >= 400:
            message = data.get("message") if isinstance(data, dict) else None
            message = message or f"the hub answered {response.code} {response.reason}"
            if response.code >= 500:  # the hub's own failure: a gateway error, never a 500
                raise ApiError(502, "hub_error", f"the hub's jobs API failed: {message}")
            head, sep, _ = message.partition(": ")  # the hub names a bad field first
            extra = {"field": head} if sep and head.isidentifier() else {}
            raise ApiError(response.code, "scheduler", message, **extra)
        return data

    async def submit(self, user: str, project: str, fields: dict[str, Any]) -> dict[str, Any]:
        answer = await self._call("POST", body={**fields, "project": project, "user": user})
        return {"job_id": answer["job_id"], "project": project, "tier": answer.get("tier")}

    async def list(self, user: str, project: str) -> list[dict[str, Any]]:
        jobs = await self._call("GET", query=[("user", user), ("project", project)])
        return sorted(jobs.values(), key=lambda j: (j.get("submit_time") or 0, j["job_id"]))

    async def get(self, user: str, project: str, job_id: str) -> dict[str, Any]:
        jobs = await self._call("GET", "/" + quote(job_id, safe=""), [("user", user)])
        job = (jobs or {}).get(job_id)
        if not job or not job.get("spec") or job["spec"].get("project") != project:
            raise _not_found(job_id, project)
        return job

    async def cancel(self, user: str, project: str, job_id: str) -> None:
        await self.get(user, project, job_id)  # 404 unless it is this project's, and visible
        await self._call("DELETE", "/" + quote(job_id, safe=""), [("user", user)])

    async def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


class SchedulerJobs:
    """A :class:`beamhub.kernels.scheduler.Scheduler` in the gateway's own process (tests, standalone)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    async def submit(self, user: str, project: str, fields: dict[str, Any]) -> dict[str, Any]:
        from beamhub.kernels.scheduler import JobSpec, SchedulerError

        body = dict(fields)
        try:
            tier = body.pop("tier", None)
            policy = getattr(self.scheduler, "policy", None)
            if tier is None and policy is not None:  # the best tier now: a window's, if open
                tier = policy.effective_tier(user, project).name
            tier = tier or getattr(
                getattr(self.scheduler, "tiers", None), "default_tier", "interactive"
            )
            spec = JobSpec(project=project, user=user, tier=tier, **body)
            spec.validate()
            job_id = await self.scheduler.submit(spec)
        except SchedulerError as exc:
            raise scheduler_error(exc) from exc
        return {"job_id": job_id, "project": project, "tier": spec.tier}

    async def list(self, user: str, project: str) -> list[dict[str, Any]]:
        return [_public(job) for job in await self.scheduler.list(project)]

    async def get(self, user: str, project: str, job_id: str) -> dict[str, Any]:
        info = (await self.scheduler.status([job_id]))[job_id]
        if info.spec is None or info.spec.project != project:
            raise _not_found(job_id, project)
        return _public(info)

    async def cancel(self, user: str, project: str, job_id: str) -> None:
        from beamhub.kernels.scheduler import SchedulerError

        await self.get(user, project, job_id)
        try:
            await self.scheduler.cancel(job_id)
        except SchedulerError as exc:
            raise scheduler_error(exc) from exc

    async def close(self) -> None:
        return None
