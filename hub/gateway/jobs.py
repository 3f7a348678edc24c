"""The gateway's jobs: a :class:`~beamhub.kernels.scheduler.Scheduler`, for the token's user and
project; its refusals as :class:`~beamhub.auth.api.ApiError`.

Under `beamhub up` the scheduler is :class:`~beamhub.kernels.hub_backend.HubScheduler`, the one
client of the hub's jobs API (the local backend lives in the hub process): the gateway service
calls it with its own hub API token, acting for the token's ``sub`` (it holds the
``custom:beamhub:jobs:act-for`` scope), and the hub picks the tier when none is asked for. In
tests or standalone it is a scheduler in this process; then the tier, if not asked for, is the
one its tier policy grants now, and a scheduler without a policy needs the tier named.

The project is always the token's; a job of another project is a 404 ``no_such_job``. A
refusal keeps its status and field; a hub or scheduler that is down is a 503 with
``Retry-After``; a hub that fails (5xx) is a 502, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from beamhub.auth.api import ApiError
from beamhub.kernels.hub_backend import HubScheduler, HubUnreachable
from beamhub.kernels.scheduler import JobInfo, JobSpec, Scheduler, SchedulerError

__all__ = ["RETRY_AFTER_S", "SchedulerJobs", "scheduler_error", "unavailable"]

#: What a 503 asks a client to wait before it tries again, in seconds: a supervised service
#: is restarted within a few seconds (hub/up/supervisor.py backs off from 0.5 s).
RETRY_AFTER_S = 5


def unavailable(reason: str, what: str, why: str) -> ApiError:
    """A 503 for a dependency that cannot be reached, with ``Retry-After``."""
    return ApiError(
        503,
        reason,
        f"{what} cannot be reached ({why}); retry in {RETRY_AFTER_S} s",
        retry_after=RETRY_AFTER_S,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def scheduler_error(exc: SchedulerError) -> ApiError:
    """A :class:`SchedulerError` as the gateway answers it.

    A hub that cannot be reached → 503 ``hub_unavailable``; another 503 (the scheduler itself is
    down, e.g. SLURM's controller) → 503 ``scheduler_unavailable``, both with ``Retry-After``;
    any other 5xx → 502 (a failure behind the gateway, never the gateway's own 500); a 4xx keeps
    its status, message and field.
    """
    if isinstance(exc, HubUnreachable):
        return unavailable("hub_unavailable", "the hub's jobs API", exc.message)
    if exc.status == 503:
        return unavailable("scheduler_unavailable", "the scheduler", exc.message)
    if exc.status >= 500:
        return ApiError(502, "scheduler_failed", f"the scheduler failed: {exc.message}")
    return ApiError(exc.status, "scheduler", exc.message, field=exc.field)


def _public(info: JobInfo) -> dict[str, Any]:
    """A job as callers see it: the spec without ``env`` (it may hold a server's API tokens)."""
    data = info.to_dict()
    if data.get("spec"):
        data["spec"].pop("env", None)
    return data


def _not_found(job_id: str, project: str) -> ApiError:
    return ApiError(404, "no_such_job", f"no job {job_id!r} in project {project!r}", field="job_id")


class SchedulerJobs:
    """Submit, list, get and cancel jobs of one project for one user, on ``scheduler``."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        #: True when the scheduler is the hub's (it acts for a user, and chooses the tier)
        self.through_hub = isinstance(scheduler, HubScheduler)

    @contextlib.asynccontextmanager
    async def _acting(self, user: str) -> AsyncIterator[Scheduler]:
        """The scheduler acting for ``user``; its refusals as ApiError."""
        try:
            if isinstance(self.scheduler, HubScheduler):
                for_user = self.scheduler.for_user(user)
                try:
                    yield for_user
                finally:
                    await for_user.close()
            else:
                yield self.scheduler
        except SchedulerError as exc:
            raise scheduler_error(exc) from exc

    async def _tier(self, user: str, project: str, asked: str | None) -> str:
        """The tier asked for; else the hub's choice ('' lets the hub choose) or the policy's."""
        if asked or self.through_hub:
            return asked or ""
        policy = getattr(self.scheduler, "policy", None)
        if policy is None:
            raise ApiError(
                400,
                "missing_field",
                "name the job's tier: this scheduler has no tier policy to choose one for you",
                field="tier",
            )
        return (await asyncio.to_thread(policy.effective_tier, user, project)).name

    async def submit(self, user: str, project: str, fields: dict[str, Any]) -> dict[str, Any]:
        body = dict(fields)
        async with self._acting(user) as scheduler:
            tier = await self._tier(user, project, body.pop("tier", None))
            spec = JobSpec(project=project, user=user, tier=tier, **body)
            if not self.through_hub:  # the hub validates what it is sent, tier and all
                spec.validate()
            job_id = await scheduler.submit(spec)
            if self.through_hub:  # the tier the hub chose
                info = (await scheduler.status([job_id]))[job_id]
                tier = info.spec.tier if info.spec is not None else None
        return {"job_id": job_id, "project": project, "tier": tier}

    async def list(self, user: str, project: str) -> list[dict[str, Any]]:
        async with self._acting(user) as scheduler:
            jobs = await scheduler.list(project)
        jobs.sort(key=lambda j: (j.submit_time or 0.0, j.job_id))
        return [
            _public(job) for job in jobs if job.spec is not None and job.spec.project == project
        ]

    async def _get(self, scheduler: Scheduler, project: str, job_id: str) -> JobInfo:
        info = (await scheduler.status([job_id]))[job_id]
        if info.spec is None or info.spec.project != project:
            raise _not_found(job_id, project)
        return info

    async def get(self, user: str, project: str, job_id: str) -> dict[str, Any]:
        async with self._acting(user) as scheduler:
            return _public(await self._get(scheduler, project, job_id))

    async def output(self, user: str, project: str, job_id: str) -> dict[str, Any]:
        """The end of the job's output (at most 64 KiB; ``truncated`` says if there is more)."""
        async with self._acting(user) as scheduler:
            await self._get(scheduler, project, job_id)  # 404 unless this project's and visible
            return (await scheduler.output(job_id)).to_dict()

    async def cancel(self, user: str, project: str, job_id: str) -> None:
        async with self._acting(user) as scheduler:
            await self._get(scheduler, project, job_id)  # 404 unless this project's and visible
            await scheduler.cancel(job_id)

    async def close(self) -> None:
        if self.through_hub:
            await self.scheduler.close()
