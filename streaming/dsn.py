"""The Data Streaming Node's control plane: token-checked HTTP API that provisions the data plane.

Every call (but the health check) carries a project access token verified locally with the public
JWKS; channel requests are bounded by the admin :class:`~beamhub.streaming.template.Template`; only then is
the data path provisioned. Channels die with their token (unless renewed): a reaper removes them.
The reverse (steering) channel relays to the source's control endpoint for ``steer`` tokens only.
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

import tornado.httpserver
import tornado.netutil
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from beamhub.auth.tokens import Claims, TokenVerifier
from beamhub.streaming.dsn_handlers import ApiError, log_event, make_app
from beamhub.streaming.template import ChannelParams, Template, TemplateViolation

__all__ = ["Channel", "DataStreamingNode"]

log = logging.getLogger("beamhub.dsn")
audit_log = logging.getLogger("beamhub.dsn.audit")
MAX_BODY_BYTES = 1 << 20


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


class DataStreamingNode:
    """Owns the control-plane app, the data plane and the verifier; start/stop in any event loop.

    ``data_plane`` may be given (the caller then owns it); otherwise a
    :class:`beamhub.streaming.dataplane.DataPlane` on ``data_host`` is created at start and closed at stop.
    Data-plane calls run on one worker thread so they never block the event loop.
    """

    def __init__(
        self,
        verifier: TokenVerifier,
        template: Template | None = None,
        *,
        host: str = "127.0.0.1",
        data_host: str = "127.0.0.1",
        data_plane: Any = None,
        reap_interval: float = 1.0,
        relay_timeout: float = 10.0,
    ) -> None:
        self.verifier = verifier
        self.template = template or Template.load()
        self.host = host
        self.data_host = data_host
        self.data_plane = data_plane
        self._owns_data_plane = data_plane is None
        self.reap_interval = reap_interval
        self.relay_timeout = relay_timeout
        self.channels: dict[str, Channel] = {}
        self._pending: dict[str, int] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._server: tornado.httpserver.HTTPServer | None = None
        self._reaper: asyncio.Task | None = None
        self.url: str | None = None

    async def run(self, fn: Any, *args: Any) -> Any:
        """Run a (possibly blocking) data-plane call on the data-plane thread."""
        if self._executor is None:
            raise RuntimeError("the DSN is not running: await start() first")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self, port: int = 0) -> str:
        """Provision the data plane, listen on ``host:port`` (0 = any free port); return the URL."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dsn-dataplane")
        if self.data_plane is None:
            from beamhub.streaming.dataplane import DataPlane

            self.data_plane = await self.run(
                lambda: DataPlane(self.data_host, log=log.getChild("dataplane"))
            )
        sockets = tornado.netutil.bind_sockets(port, address=self.host)
        self._server = tornado.httpserver.HTTPServer(make_app(self), max_body_size=MAX_BODY_BYTES)
        self._server.add_sockets(sockets)
        bound = sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{bound}"
        self._reaper = asyncio.create_task(self._reap_loop(), name="dsn-reaper")
        log_event(
            log, "dsn.started", url=self.url, data_host=self.data_host, template=self.template.name
        )
        return self.url

    async def stop(self) -> None:
        """Stop listening, tear down every channel's data path, and release the data plane."""
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None
        if self._executor is None:
            return
        for channel in list(self.channels.values()):
            await self.remove_channel(channel, "dsn_stopped", {})
        if self._owns_data_plane and self.data_plane is not None:
            await self.run(self.data_plane.close)
            self.data_plane = None
        self._executor.shutdown(wait=True)
        self._executor = None
        log_event(log, "dsn.stopped", url=self.url)

    async def create_channel(self, claims: Claims, request: dict[str, Any]) -> Channel:
        """Check ``request`` against the template, then provision; nothing happens on refusal."""
        from beamhub.streaming.dataplane import ChannelSpec

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
            raise ApiError(exc.status, exc.reason, exc.message, exc.field, exc.limit) from exc
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
            raise ApiError(400, "data_plane_refused", f"the data plane refused: {exc}") from exc
        except RuntimeError as exc:
            log_event(log, "channel.provision_failed", error=str(exc), **claims.log_fields())
            raise ApiError(
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
        """Forward one steering call; the source's status and JSON come back, or a 502."""
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
            raise ApiError(
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
            raise ApiError(
                502,
                "source_bad_answer",
                f"the source's control endpoint {url} answered {resp.code} without a JSON object",
            )
        if resp.code >= 500:
            raise ApiError(
                502,
                "source_failed",
                f"the source's control endpoint {url} failed "
                f"({resp.code}): {answer.get('error', answer)}",
            )
        return resp.code, answer
