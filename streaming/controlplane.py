"""The DSN's control plane without HTTP: channels, provisioning, expiry and the steering relay.

:class:`ControlPlane` holds the channels, checks each request against the admin
:class:`~beamhub.streaming.template.Template` and only then provisions the data path; a reaper
removes channels whose lifetime is over. It knows nothing of HTTP handlers: refusals are domain
errors (:class:`~beamhub.streaming.template.TemplateViolation` from the template, :class:`ChannelError`
from the data plane or the relay) that the handlers (``dsn_handlers``) translate into answers, and
:class:`~beamhub.streaming.dsn.DataStreamingNode` serves it over HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from beamhub.auth.tokens import Claims, TokenVerifier
from beamhub.streaming.dataplane import ChannelSpec, DataPlane
from beamhub.streaming.template import ChannelParams, Template, TemplateViolation

__all__ = ["Channel", "ChannelError", "ControlPlane", "log_event"]

log = logging.getLogger("beamhub.dsn")
audit_log = logging.getLogger("beamhub.dsn.audit")


def log_event(logger: logging.Logger, event: str, **fields: Any) -> None:
    """One structured (JSON) log line; callers pass claims' log_fields, never a token."""
    logger.info("%s", json.dumps({"event": event, **fields}, default=str, sort_keys=False))


class ChannelError(Exception):
    """The control plane could not do what was asked; ``status`` is the HTTP status it maps to.

    ``reason`` is a machine-readable code, ``message`` says what was wrong and what to do.
    """

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass
class Channel:
    """A provisioned channel as the control plane remembers it."""

    id: str
    project: str
    owner: str
    jti: str
    params: ChannelParams
    endpoints: Any  # streaming.dataplane.ChannelEndpoints
    created_at: float
    expires_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "project": self.project,
            "stream": self.params.stream,
            "mode": self.params.mode,
            "owner": self.owner,
            "endpoints": dataclasses.asdict(self.endpoints),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "params": self.params.to_json(),
        }


class ControlPlane:
    """Owns the channels, the data plane and the verifier; :meth:`open` / :meth:`close` them.

    ``data_plane`` may be given (the caller then owns it); otherwise a
    :class:`beamhub.streaming.dataplane.DataPlane` on ``data_host`` is created at open and closed
    at close. Data-plane calls run on one worker thread so they never block the event loop.
    """

    def __init__(
        self,
        verifier: TokenVerifier,
        template: Template | None = None,
        *,
        data_host: str = "127.0.0.1",
        data_plane: Any = None,
        reap_interval: float = 1.0,
        relay_timeout: float = 10.0,
    ) -> None:
        self.verifier = verifier
        self.template = template or Template.load()
        self.data_host = data_host
        self.data_plane = data_plane
        self._owns_data_plane = data_plane is None
        self.reap_interval = reap_interval
        self.relay_timeout = relay_timeout
        self.channels: dict[str, Channel] = {}
        self._pending: dict[str, int] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._reaper: asyncio.Task | None = None

    async def run(self, fn: Any, *args: Any) -> Any:
        """Run a (possibly blocking) data-plane call on the data-plane thread."""
        if self._executor is None:
            raise RuntimeError("the DSN is not running: await start() first")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        """Start the data-plane thread (and the data plane if not given) and the reaper."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dsn-dataplane")
        if self.data_plane is None:
            self.data_plane = await self.run(
                lambda: DataPlane(self.data_host, log=log.getChild("dataplane"))
            )
        self._reaper = asyncio.create_task(self._reap_loop(), name="dsn-reaper")

    async def close(self) -> None:
        """Stop the reaper, tear down every channel's data path, and release the data plane."""
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None
        if self._executor is None:
            return
        for channel in list(self.channels.values()):
            await self.remove_channel(channel, "dsn_stopped", {})
        if self._owns_data_plane and self.data_plane is not None:
            await self.run(self.data_plane.close)
            self.data_plane = None
        self._executor.shutdown(wait=True)
        self._executor = None

    async def create_channel(self, claims: Claims, request: dict[str, Any]) -> Channel:
        """Check ``request`` against the template, then provision; nothing happens on refusal.

        Raises :class:`TemplateViolation` (outside the template) or :class:`ChannelError` (the
        data plane refused or failed).
        """
        project = claims.project
        active = sum(c.project == project for c in self.channels.values())
        active += self._pending.get(project, 0)
        try:
            params = self.template.check(request, active_channels=active)
        except TemplateViolation as exc:
            log_event(
                audit_log,
                "channel.refused",
                reason=exc.reason,
                field=exc.field,
                **claims.log_fields(),
            )
            raise
        channel_id = f"ch-{secrets.token_hex(8)}"
        spec = ChannelSpec(
            channel_id=channel_id,
            project=project,
            stream=params.stream,
            mode=params.mode,
            producer_cidrs=params.source_cidrs,
            consumer_cidrs=params.consumer_cidrs,
            hwm=params.hwm,
            max_frame_bytes=params.max_frame_bytes,
            max_rate_hz=params.max_rate_hz,
            curve=params.encryption,
            producer_keys=params.producer_keys,
            consumer_keys=params.consumer_keys,
            monitor=params.monitor,
            when_no_consumer=params.when_no_consumer,
        )
        self._pending[project] = self._pending.get(project, 0) + 1
        try:
            endpoints = await self.run(self.data_plane.provision, spec)
        except ValueError as exc:
            raise ChannelError(400, "data_plane_refused", f"the data plane refused: {exc}") from exc
        except RuntimeError as exc:
            log_event(log, "channel.provision_failed", error=str(exc), **claims.log_fields())
            raise ChannelError(
                503,
                "data_plane_unavailable",
                f"the data plane could not provision "
                f"the channel ({exc}); try again or ask the DSN's admins",
            ) from exc
        finally:
            self._pending[project] -= 1
        now = time.time()
        channel = Channel(
            id=channel_id,
            project=project,
            owner=claims.sub,
            jti=claims.jti,
            params=params,
            endpoints=endpoints,
            created_at=now,
            expires_at=min(now + params.ttl, float(claims.exp)),
        )
        self.channels[channel_id] = channel
        log_event(
            log,
            "channel.created",
            channel=channel_id,
            stream=params.stream,
            mode=params.mode,
            expires_at=channel.expires_at,
            producer=endpoints.producer,
            work=endpoints.work,
            **claims.log_fields(),
        )
        return channel

    async def remove_channel(self, channel: Channel, why: str, who: dict[str, str]) -> None:
        """Forget the channel and tear down its data path (idempotent)."""
        if self.channels.pop(channel.id, None) is None:
            return
        try:
            await self.run(self.data_plane.remove, channel.id)
        except KeyError:
            pass  # the data plane had already let it go
        fields = {
            "channel": channel.id,
            "project": channel.project,
            "stream": channel.params.stream,
            "owner": channel.owner,
            "creator_jti": channel.jti,
            **who,
        }
        log_event(log, f"channel.{why}", **fields)

    async def reap(self, now: float | None = None) -> list[str]:
        """Remove every channel whose lifetime is over; return their ids."""
        now = time.time() if now is None else now
        expired = [c for c in self.channels.values() if c.expires_at <= now]
        for channel in expired:
            await self.remove_channel(channel, "expired", {})
        return [c.id for c in expired]

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            try:
                await self.reap()
            except Exception:
                log.exception("reaper: could not remove an expired channel; retrying")

    async def relay(
        self, url: str, method: str, body: str | None, authorization: str
    ) -> tuple[int, dict[str, Any]]:
        """Forward one steering call; the source's status and JSON object come back.

        Raises :class:`ChannelError` 502 when the source is unreachable, answers without a JSON
        object, or fails (5xx).
        """
        headers = {"Authorization": authorization, "Content-Type": "application/json"}
        try:
            resp = await AsyncHTTPClient().fetch(
                url,
                method=method,
                body=body,
                headers=headers,
                raise_error=False,
                follow_redirects=False,
                connect_timeout=self.relay_timeout,
                request_timeout=self.relay_timeout,
            )
        except (HTTPClientError, OSError, TimeoutError) as exc:
            raise ChannelError(
                502,
                "source_unreachable",
                f"the source's control endpoint {url} "
                f"did not answer ({exc}); is the source running?",
            ) from exc
        try:
            answer = json.loads(resp.body or b"null")
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ChannelError(
                502,
                "source_bad_answer",
                f"the source's control endpoint {url} answered {resp.code} without a JSON object",
            )
        if resp.code >= 500:
            raise ChannelError(
                502,
                "source_failed",
                f"the source's control endpoint {url} failed "
                f"({resp.code}): {answer.get('message', answer)}",
            )
        return resp.code, answer
