"""The DSN's control plane without HTTP: channels, provisioning, expiry and the steering relay.

:class:`ControlPlane` holds the channels, checks each request against the admin
:class:`~beamhub.streaming.template.Template` and only then provisions the data path; a reaper
removes channels whose lifetime is over. Given a ``state_dir``, channels are durable
(:class:`~beamhub.streaming.channel_store.ChannelStore`): written on every change, and provisioned
again on the same endpoints when the control plane opens after a restart (a channel whose port is
taken now is kept, marked ``failed`` with the reason, and retried). It knows nothing of HTTP handlers: refusals are domain
errors (:class:`~beamhub.streaming.template.TemplateViolation` from the template, :class:`ChannelError`
from the data plane or the relay) that the handlers (``dsn_handlers``) translate into answers, and
:class:`~beamhub.streaming.dsn.DataStreamingNode` serves it over HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from beamhub.auth.tokens import Claims, TokenVerifier
from beamhub.streaming.channel_store import ChannelStore, StoredChannel
from beamhub.streaming.dataplane import ChannelEndpoints, ChannelSpec, DataPlane
from beamhub.streaming.template import ChannelParams, Template, TemplateViolation

__all__ = ["ACTIVE", "FAILED", "Channel", "ChannelError", "ControlPlane", "log_event"]

log = logging.getLogger("beamhub.dsn")
audit_log = logging.getLogger("beamhub.dsn.audit")

#: A channel's state: its data path runs, or it could not be provisioned again after a restart.
ACTIVE, FAILED = "active", "failed"
#: Seconds between attempts to provision a failed channel again (its port may have come free).
RETRY_FAILED_S = 5.0


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
    state: str = ACTIVE
    error: str | None = None  # why a FAILED channel has no data path

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "project": self.project,
            "stream": self.params.stream,
            "mode": self.params.mode,
            "owner": self.owner,
            "state": self.state,
            "error": self.error,
            "endpoints": dataclasses.asdict(self.endpoints),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "params": self.params.to_json(),
        }

    def to_store(self) -> StoredChannel:
        return {
            "id": self.id,
            "project": self.project,
            "owner": self.owner,
            "jti": self.jti,
            "params": self.params.to_json(),
            "endpoints": dataclasses.asdict(self.endpoints),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        }

    @classmethod
    def from_store(cls, row: StoredChannel) -> Channel:
        names = {f.name for f in dataclasses.fields(ChannelParams)}
        params = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in row["params"].items()
            if k in names
        }
        return cls(
            id=row["id"],
            project=row["project"],
            owner=row["owner"],
            jti=row["jti"],
            params=ChannelParams(**params),
            endpoints=ChannelEndpoints(**row["endpoints"]),
            created_at=row["created_at"],
            expires_at=row["expires_at"],
        )

    def spec(self) -> ChannelSpec:
        """What the data plane is asked for."""
        p = self.params
        return ChannelSpec(
            channel_id=self.id,
            project=self.project,
            stream=p.stream,
            mode=p.mode,
            producer_cidrs=p.source_cidrs,
            consumer_cidrs=p.consumer_cidrs,
            hwm=p.hwm,
            max_frame_bytes=p.max_frame_bytes,
            max_rate_hz=p.max_rate_hz,
            curve=p.encryption,
            producer_keys=p.producer_keys,
            consumer_keys=p.consumer_keys,
            monitor=p.monitor,
            when_no_consumer=p.when_no_consumer,
        )

    def ports(self) -> dict[str, int]:
        """The TCP port of every face, from its endpoints (to bind the same ones again)."""
        out = {}
        for face in ("producer", "work", "monitor", "report"):
            endpoint = getattr(self.endpoints, face)
            if endpoint:
                out[face] = urlsplit(endpoint).port
        return out


class ControlPlane:
    """Owns the channels, the data plane and the verifier; :meth:`open` / :meth:`close` them.

    ``data_plane`` may be given (the caller then owns it); otherwise a
    :class:`beamhub.streaming.dataplane.DataPlane` on ``data_host`` is created at open and closed
    at close (its producer faces on ``producer_host`` if given: the instrument-side interface of
    a DSN in a science DMZ). Data-plane calls run on one worker thread so they never block the
    event loop.

    ``state_dir``: where the channels are kept (``<state_dir>/dsn/channels.sqlite``); ``None``
    keeps them in memory only (tests). ``boot_id`` changes at every :meth:`open`, so a client
    that sees it change knows the DSN restarted (and why frames are missing).
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
        state_dir: str | os.PathLike | None = None,
        producer_host: str | None = None,
    ) -> None:
        self.verifier = verifier
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.store: ChannelStore | None = None
        self.boot_id = ""
        self.template = template or Template.load()
        self.data_host = data_host
        self.producer_host = producer_host
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
        """Open the store, start the data-plane thread (and the data plane if not given), provision
        the stored channels again, and start the reaper. Raises StoreError if the store is busy."""
        self.boot_id = secrets.token_hex(8)
        keypair = None
        if self.state_dir is not None:
            self.store = ChannelStore(self.state_dir / "dsn")
            keypair = self._server_keypair()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dsn-dataplane")
        if self.data_plane is None:
            self.data_plane = await self.run(
                lambda: DataPlane(
                    self.data_host,
                    log=log.getChild("dataplane"),
                    server_keypair=keypair,
                    producer_host=self.producer_host,
                )
            )
        if self.store is not None:
            await self.restore()
        self._reaper = asyncio.create_task(self._reap_loop(), name="dsn-reaper")

    def _server_keypair(self) -> tuple[bytes, bytes]:
        """The data plane's CURVE keypair: the stored one (clients know its public half)."""
        public, secret = self.store.get_meta("curve_public"), self.store.get_meta("curve_secret")
        if public and secret:
            return public.encode(), secret.encode()
        pair = zmq.curve_keypair()
        self.store.set_meta("curve_public", pair[0].decode())
        self.store.set_meta("curve_secret", pair[1].decode())
        return pair

    async def restore(self) -> None:
        """Provision every stored, unexpired channel again on its endpoints; drop expired ones."""
        now = time.time()
        for row in self.store.channels():
            try:
                channel = Channel.from_store(row)
            except (TypeError, ValueError, KeyError) as exc:
                log.error("store: channel %s cannot be read back (%s); dropped", row.get("id"), exc)
                self.store.delete(row["id"])
                continue
            fields = {"channel": channel.id, "project": channel.project, "owner": channel.owner}
            if channel.expires_at <= now:
                self.store.delete(channel.id)
                log_event(log, "channel.expired", during="dsn_down", **fields)
                continue
            self.channels[channel.id] = channel
            await self._provision_again(channel)

    async def _provision_again(self, channel: Channel) -> bool:
        """Bind a stored channel's faces on their ports again; on failure mark it FAILED."""
        fields = {"channel": channel.id, "project": channel.project, "owner": channel.owner}
        try:
            endpoints = await self.run(self.data_plane.provision, channel.spec(), channel.ports())
        except (RuntimeError, ValueError) as exc:
            first = channel.state != FAILED
            channel.state = FAILED
            channel.error = (
                f"cannot provision the channel again on its endpoints (ports "
                f"{channel.ports()}) after a DSN restart ({exc}); retried every {RETRY_FAILED_S:g} s; free the port or delete the channel"
            )
            if first:
                log.error(
                    "%s",
                    json.dumps(
                        {"event": "channel.restore_failed", **fields, "error": channel.error}
                    ),
                )
            return False
        if self.channels.get(channel.id) is not channel:  # deleted while it was being provisioned
            await self.run(self.data_plane.remove, channel.id)
            return False
        channel.state, channel.error, channel.endpoints = ACTIVE, None, endpoints
        log_event(
            log,
            "channel.restored",
            producer=endpoints.producer,
            work=endpoints.work,
            expires_at=channel.expires_at,
            **fields,
        )
        return True

    def save(self, channel: Channel) -> None:
        """Write a changed channel (renewed, new source_control) to the store, if there is one."""
        if self.store is not None and channel.id in self.channels:
            self.store.put(channel.to_store())

    async def close(self) -> None:
        """Stop the reaper, tear down every channel's data path, and release the data plane."""
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None
        if self._executor is None:
            self._close_store()
            return
        for channel in list(self.channels.values()):
            # the data path goes; a stored channel stays stored, for the next start
            await self.remove_channel(channel, "dsn_stopped", {})
        if self._owns_data_plane and self.data_plane is not None:
            await self.run(self.data_plane.close)
            self.data_plane = None
        self._executor.shutdown(wait=True)
        self._executor = None
        self._close_store()

    def _close_store(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

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
        now = time.time()
        channel = Channel(
            id=channel_id,
            project=project,
            owner=claims.sub,
            jti=claims.jti,
            params=params,
            endpoints=None,
            created_at=now,
            expires_at=min(now + params.ttl, float(claims.exp)),
        )
        self._pending[project] = self._pending.get(project, 0) + 1
        try:
            channel.endpoints = await self.run(self.data_plane.provision, channel.spec())
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
        endpoints = channel.endpoints
        self.channels[channel_id] = channel
        self.save(channel)
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
        if self.store is not None and why != "dsn_stopped":
            self.store.delete(channel.id)
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
        next_retry = time.monotonic() + RETRY_FAILED_S
        while True:
            await asyncio.sleep(self.reap_interval)
            try:
                await self.reap()
            except Exception:
                log.exception("reaper: could not remove an expired channel; retrying")
            if time.monotonic() >= next_retry:
                next_retry = time.monotonic() + RETRY_FAILED_S
                for channel in [c for c in self.channels.values() if c.state == FAILED]:
                    await self._provision_again(channel)

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
