"""The DSN control plane's HTTP handlers: token checks, channels, steering relay.

Handlers stay thin: they verify the caller's token, then ask the
:class:`~beamhub.streaming.controlplane.ControlPlane` to act, and translate its domain errors
(:class:`~beamhub.streaming.template.TemplateViolation`, :class:`~beamhub.streaming.controlplane.
ChannelError`) into the one error shape of :mod:`beamhub.auth.api` (``{reason, message, field?,
limit?}``). Every refusal of a token is also an audit event naming the user, project and token
``jti`` (never the token). This module never imports :mod:`beamhub.streaming.dsn`, which serves
:func:`make_app`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from typing import NoReturn

import tornado.web

from beamhub.auth.api import ApiError, JsonApiHandler, log_request
from beamhub.auth.metrics import HealthzHandler, MetricsHandler
from beamhub.auth.tokens import Claims, TokenError
from beamhub.streaming.controlplane import (
    FAILED,
    MANAGE_SCOPE,
    Channel,
    ChannelError,
    ControlPlane,
    log_event,
    may_change,
)
from beamhub.streaming.dsn_metrics import render_metrics
from beamhub.streaming.template import TemplateViolation

__all__ = ["MAX_BODY_BYTES", "BaseHandler", "make_app"]

log = logging.getLogger("beamhub.dsn")
audit_log = logging.getLogger("beamhub.dsn.audit")
access_log = logging.getLogger("beamhub.dsn.access")
PARAM_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
#: channel requests and steering bodies are small; larger bodies are refused from Content-Length
MAX_BODY_BYTES = 1 << 20
REALM = "beamhub-dsn"


def domain_error(exc: TemplateViolation | ChannelError) -> ApiError:
    """The answer for a refusal of the template or the control plane."""
    return ApiError(
        exc.status,
        exc.reason,
        exc.message,
        field=getattr(exc, "field", None),
        limit=getattr(exc, "limit", None),
    )


class BaseHandler(JsonApiHandler):
    """The one JSON API base plus the DSN's token checks."""

    max_body = MAX_BODY_BYTES
    service = "the DSN"
    node: ControlPlane

    def initialize(self, node: ControlPlane) -> None:
        self.node = node

    def claims(self, scope: str | None = None, project: str | None = None) -> Claims:
        """The caller's verified claims, or a 401/403 that names what was wrong."""
        token = self.bearer()
        try:
            claims = self.node.verifier.verify(token or None)
        except TokenError as exc:
            self._refuse(exc.status, exc.reason, exc.message, {})
        if project is not None and claims.project != project:
            self._refuse(
                403,
                "project",
                f"the token is for project {claims.project!r}, not "
                f"{project!r}; get a token for {project!r}",
                claims.log_fields(),
            )
        if scope is not None and not claims.has_scope(scope):
            self._refuse(
                403,
                "scope",
                f"the token lacks the {scope!r} scope; ask for a token with scope {scope!r}",
                claims.log_fields(),
            )
        return claims

    def _refuse(self, status: int, reason: str, message: str, who: dict[str, str]) -> NoReturn:
        log_event(
            audit_log,
            "beamhub.auth.refused",
            reason=reason,
            status=status,
            method=self.request.method,
            path=self.request.path,
            remote=self.request.remote_ip,
            **who,
        )
        headers: dict[str, str] = {}
        if status == 401:  # RFC 6750: say how to authenticate, and why it failed
            why = "" if reason == "missing" else ', error="invalid_token"'
            headers["WWW-Authenticate"] = f'Bearer realm="{REALM}"{why}'
        raise ApiError(status, reason, message, headers=headers)

    def channel_for(self, channel_id: str, scope: str) -> tuple[Channel, Claims]:
        """The channel, if the token is valid, has ``scope`` and belongs to its project."""
        self.claims()
        channel = self.node.channels.get(channel_id)
        if channel is None or channel.expires_at <= time.time():  # expired: the reaper is due
            raise ApiError(404, "not_found", f"no channel {channel_id!r} (expired or deleted?)")
        return channel, self.claims(scope=scope, project=channel.project)

    def channel_to_change(
        self, channel_id: str, scope: str = "stream.publish"
    ) -> tuple[Channel, Claims]:
        """As :meth:`channel_for`, and the caller may change it: its owner, or an operator or
        the PI of its project (a ``steer`` token); 403 ``not_owner`` naming why otherwise."""
        channel, claims = self.channel_for(channel_id, scope)
        if not may_change(claims, channel):
            self._refuse(
                403,
                "not_owner",
                f"channel {channel.id} ({channel.params.stream!r}) belongs to "
                f"{channel.owner!r}; only its owner, an operator or the PI of project "
                f"{channel.project!r} (a token with scope {MANAGE_SCOPE!r}) may change it",
                claims.log_fields(),
            )
        return channel, claims


class HealthHandler(BaseHandler):
    def get(self) -> None:
        failed = sum(c.state == FAILED for c in self.node.channels.values())
        self.write_json(
            {
                "status": "ok",
                "channels": len(self.node.channels),
                "failed_channels": failed,
                "boot_id": self.node.boot_id,
            }
        )


class TemplateHandler(BaseHandler):
    def get(self) -> None:
        self.claims()
        self.write_json(self.node.template.describe())


class ChannelsHandler(BaseHandler):
    def get(self) -> None:
        claims = self.claims(scope="stream.read")
        mine = [c.to_json() for c in self.node.channels.values() if c.project == claims.project]
        self.write_json({"channels": mine})

    async def post(self) -> None:
        claims = self.claims(scope="stream.publish")
        body = self.json_body()
        if body.get("source_control") is not None:
            require_steer_for_source_control(claims)
        try:
            channel = await self.node.create_channel(claims, body)
        except (TemplateViolation, ChannelError) as exc:
            raise domain_error(exc) from exc
        self.write_json(channel.to_json(), status=201)


class ChannelHandler(BaseHandler):
    async def get(self, channel_id: str) -> None:
        channel, _ = self.channel_for(channel_id, "stream.read")
        stats = None
        if channel.state != FAILED:  # a failed channel has no data path to ask
            try:
                stats = await self.node.run(self.node.data_plane.stats, channel_id)
            except KeyError:
                raise ApiError(
                    404, "not_found", f"channel {channel_id!r} was just removed"
                ) from None
        body = channel.to_json()
        body.update(
            {
                "stats": stats,
                "expires_in": max(0.0, channel.expires_at - time.time()),
                "dsn_boot": self.node.boot_id,
            }
        )
        self.write_json(body)

    async def delete(self, channel_id: str) -> None:
        channel, claims = self.channel_to_change(channel_id)
        await self.node.remove_channel(channel, "deleted", claims.log_fields())
        self.write_json(None, status=204)


class RenewHandler(BaseHandler):
    def post(self, channel_id: str) -> None:
        channel, claims = self.channel_to_change(channel_id)
        ttl = self.json_body().get("ttl", self.node.template.max_lifetime_s)
        limit = self.node.template.max_lifetime_s
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= limit:
            raise ApiError(
                400,
                "out_of_range",
                f"ttl: whole seconds from 1 to {limit}",
                field="ttl",
                limit=limit,
            )
        wanted = min(time.time() + ttl, float(claims.exp))
        channel.expires_at = max(channel.expires_at, wanted)
        self.node.save(channel)
        log_event(
            log,
            "channel.renewed",
            channel=channel.id,
            stream=channel.params.stream,
            expires_at=channel.expires_at,
            **claims.log_fields(),
        )
        body = channel.to_json()
        body["expires_in"] = max(0.0, channel.expires_at - time.time())
        self.write_json(body)


def require_steer_for_source_control(claims: Claims) -> None:
    """Only those who may steer may say where steering goes.

    The relay sends each steering call (with a credential minted for it, never the caller's
    token) to ``source_control``; a member (no ``steer``) who could point it at a listener of her
    own would see her PI's steering calls.
    """
    if not claims.has_scope("steer"):
        raise ApiError(
            403,
            "scope",
            "setting a channel's source_control needs the 'steer' scope of its "
            "project; ask an operator or the PI to attach the source",
            field="source_control",
        )


class SourceControlHandler(BaseHandler):
    """Attach (or move) the source's control endpoint after creation: a source often starts
    only once it knows the channel's producer endpoint, and learns its control port then."""

    def put(self, channel_id: str) -> None:
        channel, claims = self.channel_to_change(channel_id)
        require_steer_for_source_control(claims)
        value = self.json_body().get("source_control")
        try:
            url = self.node.template.check_source_control(value, channel.params.source_cidrs)
        except TemplateViolation as exc:
            raise domain_error(exc) from exc
        channel.params = dataclasses.replace(channel.params, source_control=url)
        self.node.save(channel)
        log_event(
            log,
            "channel.source_control",
            channel=channel.id,
            source_control=url,
            stream=channel.params.stream,
            **claims.log_fields(),
        )
        self.write_json(channel.to_json())


class CredentialsHandler(BaseHandler):
    """``POST {face, public_key, consumer_id?}``: let a client's CURVE public key in.

    Every channel is CURVE, so a client without a registered key can neither send nor receive
    nor report. A ``consumer`` key (work, monitor and report faces) needs ``stream.read`` of the
    project and is bound to ``consumer_id``; a ``producer`` key is a write: the channel's owner,
    an operator or the PI. The secret half never leaves the client.
    """

    async def post(self, channel_id: str) -> None:
        body = self.json_body()
        face = body.get("face")
        if face == "producer":
            channel, claims = self.channel_to_change(channel_id)
        else:
            channel, claims = self.channel_for(channel_id, "stream.read")
        try:
            answer = await self.node.register_credential(
                channel, claims, face, body.get("public_key"), body.get("consumer_id")
            )
        except ChannelError as exc:
            raise domain_error(exc) from exc
        answer["channel"] = channel.id
        answer["endpoints"] = dataclasses.asdict(channel.endpoints)
        answer["server_key"] = channel.endpoints.server_key
        self.write_json(answer, status=201)


class RelayJwksHandler(BaseHandler):
    """The DSN's own public key for relay credentials (sources verify steering calls with it)."""

    def get(self) -> None:
        self.write_json(self.node.relay_jwks())


class SteerHandler(BaseHandler):
    """The reverse channel: relays to the source's control endpoint, audit-logging each action."""

    routes = {
        ("GET", "schema"): ("stream.read", "GET", "/schema"),
        ("GET", "params"): ("stream.read", "GET", "/params"),
        ("POST", "run"): ("steer", "POST", "/run"),
    }

    async def get(self, channel_id: str, what: str) -> None:
        await self.relay(channel_id, *self.route("GET", what))

    async def post(self, channel_id: str, what: str) -> None:
        await self.relay(channel_id, *self.route("POST", what))

    async def put(self, channel_id: str, what: str) -> None:
        prefix, _, name = what.partition("/")
        if prefix != "params" or not PARAM_NAME_RE.match(name):
            raise ApiError(404, "not_found", "steer with PUT .../steer/params/NAME")
        await self.relay(channel_id, "steer", "PUT", f"/params/{name}", name)

    def route(self, method: str, what: str) -> tuple[str, str, str]:
        try:
            return self.routes[(method, what)]
        except KeyError:
            raise ApiError(
                404,
                "not_found",
                "steering routes: GET steer/schema, GET "
                "steer/params, PUT steer/params/NAME, POST steer/run",
            ) from None

    async def relay(
        self, channel_id: str, scope: str, method: str, path: str, param: str | None = None
    ) -> None:
        channel, claims = self.channel_for(channel_id, scope)
        base = channel.params.source_control
        if base is None:
            raise ApiError(
                409,
                "no_source_control",
                "this channel was created without "
                "'source_control'; create it with the source's control URL to steer",
            )
        body = None
        if method in ("PUT", "POST"):
            body = json.dumps(self.json_body())
        credential = self.node.relay_credential(channel, claims, scope)
        try:
            status, answer = await self.node.relay(base + path, method, body, credential)
        except ChannelError as exc:
            raise domain_error(exc) from exc
        if method != "GET":
            log_event(
                audit_log,
                "steer",
                channel=channel.id,
                stream=channel.params.stream,
                action=path.lstrip("/"),
                param=param,
                request=json.loads(body or "{}"),
                status=status,
                rev=answer.get("rev"),
                first_seq=answer.get("first_seq"),
                **claims.log_fields(),
            )
        if status == 401:  # the source refused the token the DSN accepted: still RFC 6750
            self.set_header("WWW-Authenticate", f'Bearer realm="{REALM}", error="invalid_token"')
        self.write_json(answer, status=status)


def _failing(node: ControlPlane) -> str | None:
    """What keeps the DSN from working: its data-plane thread is gone (stopped)."""
    return None if node._executor is not None else "the data plane is not running"


def make_app(node: ControlPlane) -> tornado.web.Application:
    """The control plane's routes; every answer, errors included, in the one JSON shape."""
    args = {"node": node}
    cid = r"(ch-[0-9a-f]{1,32})"
    return tornado.web.Application(
        [
            (r"/api/health", HealthHandler, args),
            (r"/api/template", TemplateHandler, args),
            (r"/api/channels", ChannelsHandler, args),
            (rf"/api/channels/{cid}", ChannelHandler, args),
            (rf"/api/channels/{cid}/renew", RenewHandler, args),
            (rf"/api/channels/{cid}/source_control", SourceControlHandler, args),
            (rf"/api/channels/{cid}/credentials", CredentialsHandler, args),
            (r"/api/relay-jwks", RelayJwksHandler, args),
            (rf"/api/channels/{cid}/steer/(.+)", SteerHandler, args),
            (r"/healthz", HealthzHandler, {"service": "the DSN", "check": lambda: _failing(node)}),
            (
                r"/metrics",
                MetricsHandler,
                {
                    "service": "the DSN",
                    "access": getattr(node, "metrics_access", "local-or-token"),
                    "verifier": node.verifier,
                    "render": lambda: render_metrics(node),
                },
            ),
        ],
        default_handler_class=_NotFoundHandler,
        default_handler_args=args,
        log_function=lambda handler: log_request(handler, access_log),
    )


class _NotFoundHandler(BaseHandler):
    async def prepare(self) -> None:
        raise ApiError(404, "not_found", f"no such DSN API route {self.request.path!r}")
