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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from beamhub.auth.tokens import Claims, SigningKey, TokenIssuer, TokenVerifier
from beamhub.streaming.channel_store import ChannelStore, StoredChannel
from beamhub.streaming.dataplane import ChannelEndpoints, ChannelSpec, DataPlane
from beamhub.streaming.template import ChannelParams, Template, TemplateViolation

__all__ = [
    "ACTIVE",
    "FAILED",
    "MANAGE_SCOPE",
    "RELAY_ISSUER",
    "RELAY_TTL_S",
    "Channel",
    "ChannelError",
    "ControlPlane",
    "log_event",
    "may_change",
]

log = logging.getLogger("beamhub.dsn")
audit_log = logging.getLogger("beamhub.dsn.audit")

#: A channel's state: its data path runs, or it could not be provisioned again after a restart.
ACTIVE, FAILED = "active", "failed"
#: Seconds between attempts to provision a failed channel again (its port may have come free).
RETRY_FAILED_S = 5.0
#: The scope of the roles that manage a project's channels (pi and operator hold it; see
#: ``beamhub.auth.roles.STEER_ROLES``): they may change any channel of the project.
MANAGE_SCOPE = "steer"
#: Client keys a channel takes per face (each consumer registers its own key).
MAX_KEYS = {"producer": 16, "consumer": 1024}
#: The relay credentials the DSN mints for a source's control endpoint: issuer and lifetime.
RELAY_ISSUER = "beamhub-dsn-relay"
RELAY_TTL_S = 60


def may_change(claims: Claims, channel: Channel) -> bool:
    """Writes to a channel: its owner, or an operator/PI of its project (a ``steer`` token)."""
    return claims.project == channel.project and (
        claims.sub == channel.owner or claims.has_scope(MANAGE_SCOPE)
    )


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
    #: client CURVE public keys: {face, public_key, consumer_id, owner, jti, created_at}
    credentials: list[dict[str, Any]] = field(default_factory=list)

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
            "credentials": {
                face: sum(c["face"] == face for c in self.credentials) for face in MAX_KEYS
            },
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
            curve=True,  # a credential on every channel, whatever the template
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
        self.relay_key: SigningKey | None = None

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
            self.relay_key = SigningKey.load_or_create(self.store.folder / "relay-key.pem")
        else:
            self.relay_key = SigningKey.generate()
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
            channel.credentials = self.store.credentials(channel.id)
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
        for cred in channel.credentials:  # the clients' keys, so they get in again
            await self.run(
                self.data_plane.add_key,
                channel.id,
                cred["face"],
                cred["public_key"],
                cred.get("consumer_id"),
            )
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
        mine = sum(c.project == project and c.owner == claims.sub for c in self.channels.values())
        mine += self._pending.get(f"{project}\0{claims.sub}", 0)
        try:
            params = self.template.check(
                request,
                active_channels=active,
                user_channels=mine,
                manager=claims.has_scope(MANAGE_SCOPE),
            )
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
        user_key = f"{project}\0{claims.sub}"
        self._pending[project] = self._pending.get(project, 0) + 1
        self._pending[user_key] = self._pending.get(user_key, 0) + 1
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
            self._pending[user_key] -= 1
        endpoints = channel.endpoints
        self.channels[channel_id] = channel
        self.save(channel)
        for face, keys in (("producer", params.producer_keys), ("consumer", params.consumer_keys)):
            for key in keys:  # keys named at creation, kept like registered ones
                channel.credentials.append(self._credential(claims, face, key, None))
                self._save_credential(channel, channel.credentials[-1])
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

    # ---- client credentials ------------------------------------------------------------------

    @staticmethod
    def _credential(
        claims: Claims, face: str, public_key: str, consumer_id: str | None
    ) -> dict[str, Any]:
        return {
            "face": face,
            "public_key": public_key,
            "consumer_id": consumer_id,
            "owner": claims.sub,
            "jti": claims.jti,
            "created_at": time.time(),
        }

    def _save_credential(self, channel: Channel, cred: dict[str, Any]) -> None:
        if self.store is not None and channel.id in self.channels:
            self.store.put_credential(channel.id, cred)

    async def register_credential(
        self,
        channel: Channel,
        claims: Claims,
        face: str,
        public_key: Any,
        consumer_id: Any = None,
    ) -> dict[str, Any]:
        """Let a client's CURVE public key in on the channel's ``producer`` or ``consumer`` faces.

        The caller's rights are the handlers' to check (producer keys are a write: owner, PI or
        operator). A consumer key is bound to ``consumer_id``: the DSN accepts its reports for
        that id only. Raises :class:`ChannelError` naming what was wrong.
        """
        if face not in MAX_KEYS:
            raise ChannelError(400, "invalid", "face: 'producer' or 'consumer'")
        if face == "consumer":
            if not isinstance(consumer_id, str) or not 0 < len(consumer_id) <= 128:
                raise ChannelError(
                    400, "invalid", "consumer_id: the consumer's id, a string of 1-128 characters"
                )
            taken = [c for c in channel.credentials if c.get("consumer_id") == consumer_id]
            if taken and taken[0]["public_key"] != public_key:
                raise ChannelError(
                    409,
                    "consumer_id_taken",
                    f"consumer_id {consumer_id!r} is registered with another key on this "
                    "channel; pick another id",
                )
        else:
            consumer_id = None
        if any(c["public_key"] == public_key for c in channel.credentials):
            return {"face": face, "public_key": public_key, "consumer_id": consumer_id}
        if sum(c["face"] == face for c in channel.credentials) >= MAX_KEYS[face]:
            raise ChannelError(
                403,
                "max_keys",
                f"the channel already has {MAX_KEYS[face]} {face} keys, its maximum; create a "
                "new channel",
            )
        if channel.state == FAILED:
            raise ChannelError(409, "failed", f"the channel has no data path: {channel.error}")
        try:
            await self.run(self.data_plane.add_key, channel.id, face, public_key, consumer_id)
        except ValueError as exc:
            raise ChannelError(400, "invalid", f"public_key: {exc}") from exc
        except KeyError:
            raise ChannelError(
                404, "not_found", f"channel {channel.id!r} was just removed"
            ) from None
        cred = self._credential(claims, face, public_key, consumer_id)
        channel.credentials.append(cred)
        self._save_credential(channel, cred)
        log_event(
            audit_log,
            "channel.credential",
            channel=channel.id,
            face=face,
            public_key=public_key,
            consumer_id=consumer_id,
            **claims.log_fields(),
        )
        return {"face": face, "public_key": public_key, "consumer_id": consumer_id}

    # ---- the steering relay ---------------------------------------------------------------------

    def relay_jwks(self) -> dict[str, Any]:
        """The public key a source's control endpoint verifies the DSN's relay credentials with."""
        return self.relay_key.jwks()

    def relay_credential(self, channel: Channel, claims: Claims, scope: str) -> str:
        """A credential for one relayed call: audience that source, one scope, 60 s, naming the
        caller (``sub``) for the source's log. Signed with the DSN's own key, never the hub's."""
        issuer = TokenIssuer(
            self.relay_key,
            issuer=RELAY_ISSUER,
            audience=channel.params.source_control,
            max_ttl=RELAY_TTL_S,
        )
        return issuer.issue(
            claims.sub,
            channel.project,
            [scope],
            ttl=RELAY_TTL_S,
            extra={"channel": channel.id, "caller_jti": claims.jti},
        )

    async def relay(
        self, url: str, method: str, body: str | None, credential: str
    ) -> tuple[int, dict[str, Any]]:
        """Forward one steering call with ``credential`` (from :meth:`relay_credential`, never the
        caller's token); the source's status and JSON object come back.

        Raises :class:`ChannelError` 502 when the source is unreachable, answers without a JSON
        object, or fails (5xx).
        """
        headers = {"Authorization": f"Bearer {credential}", "Content-Type": "application/json"}
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
