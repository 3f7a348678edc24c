"""The ``hub`` backend: a Scheduler that submits through the hub's jobs API.

The local backend lives in the hub process (it owns the virtual nodes), so code running in a
user's server (Dask workers started from a notebook) and the API gateway service reach it over
HTTP: ``/hub/api/beamhub/jobs`` (:mod:`beamhub.kernels.jobs_handler`), authenticated with a
JupyterHub API token. This is the one client of that API. Its refusals arrive as JSON
``{"status", "message", "reason", "field"?}`` and become a :class:`SchedulerError` with the same
status, message and field, so a caller tells the user which field was wrong without parsing prose.

``act_for`` names the user a service acts for (it needs the ``custom:beamhub:jobs:act-for``
scope); a user's own token acts for its owner. A hub that cannot be reached at all (no URL, no
answer) raises :class:`HubUnreachable`, a 503 SchedulerError, so a caller tells "the hub is down,
retry" apart from the hub's own 503 answer without reading the message.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlencode

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from beamhub.kernels.scheduler import (
    SUBMIT_FIELDS,
    JobInfo,
    JobOutput,
    JobSpec,
    JobState,
    Scheduler,
    SchedulerError,
)

__all__ = ["HubScheduler", "HubUnreachable"]

HUB_TIMEOUT_S = 30.0


class HubUnreachable(SchedulerError):
    """The hub's jobs API did not answer (or there is no hub to ask): status 503, retry later."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=503)


def _error(code: int, body: bytes) -> SchedulerError:
    """The hub's JSON refusal as a SchedulerError: same status, message and field."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return SchedulerError(body.decode(errors="replace")[:200] or f"HTTP {code}", status=code)
    message = data.get("message")
    message = message if isinstance(message, str) and message else f"HTTP {code}"
    field = data.get("field")
    field = field if isinstance(field, str) and field else None
    return SchedulerError(message, status=code, field=field)


class HubScheduler(Scheduler):
    """The hub's embedded scheduler seen from outside the hub process.

    ``api_url`` and ``token`` default to ``JUPYTERHUB_API_URL``/``JUPYTERHUB_API_TOKEN``, which
    JupyterHub sets in every server the beamhub spawner starts and in every hub-managed service.
    """

    name = "hub"

    def __init__(
        self,
        api_url: str | None = None,
        token: str | None = None,
        *,
        act_for: str | None = None,
        timeout: float = HUB_TIMEOUT_S,
    ) -> None:
        self.api_url = (api_url or os.environ.get("JUPYTERHUB_API_URL", "")).rstrip("/")
        self._token = token or os.environ.get("JUPYTERHUB_API_TOKEN", "")
        if not self.api_url or not self._token:
            raise HubUnreachable(
                "no hub to submit through: JUPYTERHUB_API_URL and JUPYTERHUB_API_TOKEN are set "
                "only inside a server the beamhub spawner started (or a hub-managed service)"
            )
        self.act_for = act_for
        self.timeout = timeout
        self._http: AsyncHTTPClient | None = None

    def __repr__(self) -> str:  # never the token
        return f"HubScheduler({self.api_url!r}, act_for={self.act_for!r})"

    def for_user(self, user: str) -> HubScheduler:
        """The same hub and token, acting for ``user`` (a service holding the act-for scope)."""
        return HubScheduler(self.api_url, self._token, act_for=user, timeout=self.timeout)

    async def _call(
        self,
        method: str,
        path: str = "",
        query: list[tuple[str, str]] | None = None,
        body: dict | None = None,
    ) -> Any:
        if self._http is None:
            self._http = AsyncHTTPClient(force_instance=True)
        query = list(query or [])
        if self.act_for is not None and body is None:
            query.append(("user", self.act_for))
        if self.act_for is not None and body is not None:
            body = {**body, "user": self.act_for}
        request = HTTPRequest(
            f"{self.api_url}/beamhub/jobs{path}" + ("?" + urlencode(query) if query else ""),
            method=method,
            headers={"Authorization": f"token {self._token}", "Content-Type": "application/json"},
            body=json.dumps(body) if body is not None else None,
            request_timeout=self.timeout,
            follow_redirects=False,
        )
        try:  # raise_error=False still raises when there is no answer at all (refused, timeout)
            resp = await self._http.fetch(request, raise_error=False)
        except (OSError, HTTPClientError) as exc:
            raise HubUnreachable(
                f"the hub's jobs API at {self.api_url} did not answer ({exc}); try again shortly"
            ) from exc
        if resp.code == 599:
            raise HubUnreachable(
                f"the hub's jobs API at {self.api_url} did not answer ({resp.error}); "
                "try again shortly"
            )
        if resp.code >= 400:
            raise _error(resp.code, resp.body or b"")
        return json.loads(resp.body) if resp.body else None

    async def submit(self, spec: JobSpec) -> str:
        body = {k: v for k, v in spec.to_dict().items() if k in SUBMIT_FIELDS}
        return str((await self._call("POST", body=body))["job_id"])

    async def status(self, job_ids: list[str]) -> dict[str, JobInfo]:
        if not job_ids:
            return {}
        data = await self._call("GET", query=[("id", j) for j in job_ids])
        return {
            j: JobInfo.from_dict(data[j])
            if j in data
            else JobInfo(job_id=j, spec=None, state=JobState.UNKNOWN, reason="not visible")
            for j in job_ids
        }

    async def cancel(self, job_id: str) -> None:
        await self._call("DELETE", "/" + quote(job_id, safe=""))

    async def output(self, job_id: str) -> JobOutput:
        return JobOutput.from_dict(
            await self._call("GET", "/" + quote(job_id, safe="") + "/output")
        )

    async def list(self, project: str | None = None) -> list[JobInfo]:
        query = [("project", project)] if project is not None else []
        return [JobInfo.from_dict(d) for d in (await self._call("GET", query=query)).values()]

    async def events(self) -> AsyncIterator[dict]:  # type: ignore[override]
        """Events are not relayed through the hub; poll ``status`` instead."""
        return
        yield  # pragma: no cover

    async def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
