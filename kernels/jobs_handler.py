"""The hub's jobs API: submit, list and cancel scheduler jobs at ``/hub/api/beamhub/jobs``, and read
the end of one's output at ``/hub/api/beamhub/jobs/<id>/output``.

The local backend lives in the hub process, so code in a user's server (Dask workers) and the API
gateway service submit through this handler (their client is
:class:`beamhub.kernels.hub_backend.HubScheduler`). The user is the token's owner; the project and
tier default to the server's and are checked by the same TierPolicy as every other job. A caller
holding the custom scope :data:`ACT_FOR_SCOPE` (the API gateway service) may name the user it
acts for (``"user"`` in the body, ``?user=`` in the query); anyone else acts only for themselves.

Errors keep JupyterHub's ``{"status", "message"}`` and add beamhub's ``"reason"`` (a
machine-readable code) and, when one request field is at fault, ``"field"``: read the field from
that key, never from the message. Register with::

    c.JupyterHub.extra_handlers = jobs_handler.HANDLERS
    c.JupyterHub.custom_scopes = jobs_handler.CUSTOM_SCOPES
"""

from __future__ import annotations

import asyncio
import json
from http.client import responses
from typing import Any

from jupyterhub.apihandlers.base import APIHandler
from jupyterhub.user import User
from tornado import web

from beamhub.auth.api import ApiError, parse_json_object
from beamhub.auth.roles import scopes_for
from beamhub.kernels.backends import open_scheduler
from beamhub.kernels.scheduler import (
    SUBMIT_FIELDS,
    JobInfo,
    JobSpec,
    JobState,
    Scheduler,
    SchedulerError,
)
from beamhub.kernels.spawner import ReservedNodeSpawner

__all__ = ["ACT_FOR_SCOPE", "CUSTOM_SCOPES", "HANDLERS", "JobOutputHandler", "JobsAPIHandler"]

#: JupyterHub custom scope: submit, list and cancel beamhub jobs for the user a request names.
#: Filters narrow it as usual, e.g. ``custom:beamhub:jobs:act-for!group=p-1001``.
ACT_FOR_SCOPE = "custom:beamhub:jobs:act-for"
#: For ``c.JupyterHub.custom_scopes``.
CUSTOM_SCOPES = {
    ACT_FOR_SCOPE: {
        "description": "Submit, list and cancel beamhub jobs for the user named in the request.",
    }
}


def _public(info: JobInfo) -> dict[str, Any]:
    data = info.to_dict()
    if data.get("spec"):
        data["spec"].pop("env", None)  # the env holds the server's API token
    return data


def _refusal(exc: SchedulerError) -> ApiError:
    """A scheduler's or policy's refusal: same status, its message, the field it names."""
    return ApiError(exc.status, "scheduler", exc.message, field=exc.field)


class JobsAPIHandler(APIHandler):
    """POST a job, GET jobs (``?id=`` repeated, or all of yours), DELETE /<id> to cancel."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """JupyterHub's ``{"status", "message"}`` plus ``"reason"`` and, if known, ``"field"``."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        self.set_header("Content-Type", "application/json")
        if isinstance(exc, ApiError):
            body = {"status": status_code, **exc.to_json()}
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif isinstance(exc, web.HTTPError) and status_code < 500:
            message = exc.log_message % exc.args if exc.log_message else ""
            body = {
                "status": status_code,
                "message": message or responses.get(status_code, "error"),
                "reason": "http",
            }
        else:  # the traceback is in the hub's log, never in the answer
            body = {
                "status": status_code,
                "message": "internal error in the hub's jobs API; the hub's log has the details",
                "reason": "internal",
            }
        self.clear_header("Content-Length")
        self.finish(json.dumps(body))

    async def _may_submit(self, user: User, project: str) -> None:
        """Only a role holding the ``jobs`` scope in ``project`` may submit: never a viewer."""
        state = await user.get_auth_state() or {}
        role = state.get("beamhub", {}).get("projects", {}).get(project)
        if role is not None and "jobs" not in scopes_for(role):
            raise ApiError(
                403,
                "role",
                f"{user.name} is a {role} of {project}: viewers watch the shared dashboard "
                "and submit no jobs; ask the project's PI for the member role",
                field="project",
            )

    def _caller(self, named: Any) -> User:
        """The user this request acts for: the caller, or the one it names if it may."""
        caller = self.current_user
        own = caller.name if isinstance(caller, User) else None
        if named is not None and (not isinstance(named, str) or not named):
            raise ApiError(400, "bad_request", f"expected a user name, got {named!r}", field="user")
        if named is None or named == own:
            if own is None:
                raise ApiError(
                    400,
                    "bad_request",
                    'a service must name the user it acts for ("user" in the body, ?user= in '
                    "the query)",
                    field="user",
                )
            return caller
        if not self.has_scope(f"{ACT_FOR_SCOPE}!user={named}"):
            who = f"user {own!r}" if own else f"service {caller.name!r}"
            raise ApiError(
                403,
                "forbidden",
                f"{who} may not act for {named!r}; only a holder of the {ACT_FOR_SCOPE} scope "
                "may name another user",
                field="user",
            )
        user = self.find_user(named)
        if user is None:
            raise ApiError(
                404,
                "no_such_user",
                f"no hub user {named!r} (a user exists once she has logged in)",
                field="user",
            )
        return user

    async def _context(self, user: User) -> tuple[ReservedNodeSpawner, Scheduler]:
        spawner = user.spawners[""]
        if not isinstance(spawner, ReservedNodeSpawner):
            raise ApiError(
                400,
                "not_configured",
                "this hub does not use the beamhub spawner (c.JupyterHub.spawner_class)",
            )
        try:
            return spawner, await open_scheduler(spawner._config())
        except SchedulerError as exc:
            raise _refusal(exc) from exc

    def _owned(self, user: User, info: JobInfo) -> bool:
        return user.admin or (info.spec is not None and info.spec.user == user.name)

    @web.authenticated
    async def post(self, job_id: str | None = None) -> None:
        if job_id:
            raise ApiError(405, "method_not_allowed", "POST to /api/beamhub/jobs, not to a job id")
        body = parse_json_object(self.request.body)
        user = self._caller(body.pop("user", None))
        unknown = sorted(set(body) - SUBMIT_FIELDS)
        if unknown:
            raise ApiError(
                400,
                "unknown_field",
                f"unknown job field(s) {unknown}; allowed: {sorted(SUBMIT_FIELDS)} (and user)",
                field=unknown[0],
            )
        spawner, scheduler = await self._context(user)
        project = body.setdefault("project", spawner.job_project or spawner.project or "")
        await self._may_submit(user, project)
        body.setdefault("name", "job")
        try:
            if not body.get("tier"):
                body["tier"] = await self._default_tier(spawner, scheduler, user.name, project)
            spec = JobSpec.from_dict({**body, "user": user.name})
            job_id = await scheduler.submit(spec)
        except SchedulerError as exc:
            raise _refusal(exc) from exc
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
            raise ApiError(400, "bad_request", "DELETE /api/beamhub/jobs/<job id>", field="job_id")
        _, scheduler = await self._context(user)
        info = (await scheduler.status([job_id]))[job_id]
        if info.state is JobState.UNKNOWN or not self._owned(user, info):
            raise ApiError(404, "no_such_job", f"no job {job_id!r} of yours", field="job_id")
        try:
            await scheduler.cancel(job_id)
        except SchedulerError as exc:
            raise _refusal(exc) from exc
        self.set_status(204)


class JobOutputHandler(JobsAPIHandler):
    """GET /<id>/output: the end of one of your jobs' output (``?user=`` as for the jobs)."""

    SUPPORTED_METHODS = ("GET",)

    @web.authenticated
    async def get(self, job_id: str | None = None) -> None:
        user = self._caller(self.get_argument("user", None))
        _, scheduler = await self._context(user)
        info = (await scheduler.status([job_id]))[job_id]
        if info.state is JobState.UNKNOWN or not self._owned(user, info):
            raise ApiError(404, "no_such_job", f"no job {job_id!r} of yours", field="job_id")
        try:
            output = await scheduler.output(job_id)
        except SchedulerError as exc:
            raise _refusal(exc) from exc
        self.write(json.dumps(output.to_dict()))


#: For ``c.JupyterHub.extra_handlers``: served at /hub/api/beamhub/jobs[/<id>[/output]].
HANDLERS = [
    (r"/api/beamhub/jobs/([^/]+)/output", JobOutputHandler),
    (r"/api/beamhub/jobs(?:/([^/]+))?", JobsAPIHandler),
]
