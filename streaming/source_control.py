"""The control endpoint of a source: read the schema and values, steer a parameter, start/stop runs.

A small tornado app on loopback. The DSN's steering relay forwards ``GET /schema``, ``GET /params``,
``PUT /params/{name}`` and ``POST /run`` here, never with the caller's token: with a credential the
DSN mints for that one call (its own ES256 key, issuer ``beamhub-dsn-relay``, audience this
endpoint's URL, one scope, at most 60 s, ``sub`` naming the caller). Built with ``relay_jwks`` (the
DSN's ``/api/relay-jwks`` URL, or the JWKS itself) and a project, writes need such a credential
with ``steer`` for that project; built with a :class:`beamhub.auth.tokens.TokenVerifier` too, a
project token with ``steer`` is accepted from direct callers as well. Every answer is JSON; errors
in the one shape of :mod:`beamhub.auth.api` (``{reason, message, field?, limit?}``), which the
relay passes through.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application

from beamhub.auth.api import ApiError, JsonApiHandler, log_request
from beamhub.auth.jwks import RemoteJwksVerifier
from beamhub.auth.tokens import Claims, TokenError, TokenVerifier
from beamhub.streaming.controlplane import RELAY_ISSUER, RELAY_TTL_S
from beamhub.streaming.params import ParamError, UnknownParamError
from beamhub.streaming.source import SourceRunner

__all__ = [
    "ControlServerThread",
    "RelayVerifier",
    "SourceControlServer",
    "make_app",
    "start_control_thread",
]

log = logging.getLogger("beamhub.source.control")

#: steering bodies are a few hundred bytes; the DSN's control API has the same limit
MAX_BODY_BYTES = 1 << 20
REALM = "beamhub-source"


class RelayVerifier:
    """Verifies the DSN's relay credentials: the DSN's own key, audience = this endpoint's URL.

    ``jwks`` is the DSN's ``/api/relay-jwks`` URL (fetched when first needed, again for an unknown
    key id) or the JWKS itself. :attr:`audience` is set once the endpoint knows its URL.
    """

    def __init__(self, jwks: str | Mapping[str, Any], audience: str | None = None) -> None:
        self.jwks = jwks
        self.audience = audience
        self._verifier: Any = None

    def verify(self, token: str | None, *, project: str, scope: str) -> Claims:
        if self.audience is None:
            raise TokenError(503, "not_ready", "the control endpoint is not listening yet")
        if self._verifier is None or self._verifier.audience != self.audience:
            if isinstance(self.jwks, str):
                self._verifier = RemoteJwksVerifier(
                    self.jwks, issuer=RELAY_ISSUER, audience=self.audience
                )
            else:
                self._verifier = TokenVerifier(
                    self.jwks, issuer=RELAY_ISSUER, audience=self.audience
                )
        claims = self._verifier.verify(token, project=project, scope=scope)
        if claims.exp - claims.iat > RELAY_TTL_S:
            raise TokenError(
                401,
                "lifetime",
                f"a relay credential lives at most {RELAY_TTL_S} s; this one longer",
            )
        return claims


class _BaseHandler(JsonApiHandler):
    max_body = MAX_BODY_BYTES
    service = "the source's control endpoint"

    def initialize(
        self,
        runner: SourceRunner,
        verifier: TokenVerifier | None = None,
        project: str | None = None,
        relay: RelayVerifier | None = None,
    ) -> None:
        self.runner = runner
        self.verifier = verifier
        self.project = project
        self.relay = relay

    def _verify(self, token: str | None) -> Claims:
        """A DSN relay credential first; then (if configured) a project token from a direct caller."""
        errors: list[TokenError] = []
        for verifier in (self.relay, self.verifier):
            if verifier is None:
                continue
            try:
                return verifier.verify(token, project=self.project, scope="steer")
            except TokenError as exc:
                errors.append(exc)
        # the verifier that knew the token's key says best what is wrong with it
        raise ([e for e in errors if e.reason != "unknown_key"] or errors)[0]

    async def require_steer(self) -> str:
        """With a verifier configured, writes need a ``steer`` credential for this project.
        Returns who is steering (the credential's ``sub``; "" without a verifier)."""
        if self.verifier is None and self.relay is None:
            return ""
        token = self.bearer() or None
        try:
            # a JWKS fetch blocks: never on the loop (the DSN may serve on this same loop)
            claims = await asyncio.get_running_loop().run_in_executor(None, self._verify, token)
        except TokenError as exc:
            log.info("steering refused: %s (%s)", exc.reason, self.request.path)
            headers: dict[str, str] = {}
            if exc.status == 401:  # RFC 6750: say how to authenticate, and why it failed
                why = "" if exc.reason == "missing" else ', error="invalid_token"'
                headers["WWW-Authenticate"] = f'Bearer realm="{REALM}"{why}'
            raise ApiError(exc.status, exc.reason, exc.message, headers=headers) from exc
        log.info("steering by %s", claims.log_fields())
        return claims.sub


class SchemaHandler(_BaseHandler):
    def get(self) -> None:
        self.write_json({"params": self.runner.schema()})


class ParamsHandler(_BaseHandler):
    def get(self) -> None:
        self.write_json(self.runner.status())


class ParamHandler(_BaseHandler):
    def get(self, name: str) -> None:
        status = self.runner.status()
        if name not in status["values"]:
            raise ApiError(
                404,
                "unknown_param",
                f"unknown parameter {name!r}; GET /schema lists them",
                field=name,
            )
        self.write_json({"name": name, "value": status["values"][name], "rev": status["rev"]})

    async def put(self, name: str) -> None:
        by = await self.require_steer()
        body = self.json_body()
        if "value" not in body:
            raise ApiError(
                400, "missing_field", 'value: required; send {"value": ...}', field="value"
            )
        loop = asyncio.get_running_loop()
        try:
            answer = await loop.run_in_executor(
                None, self.runner.set_param, name, body["value"], by
            )
        except UnknownParamError as exc:
            raise ApiError(404, "unknown_param", exc.message, field=exc.field) from exc
        except ParamError as exc:
            raise ApiError(
                400, "invalid", f"{exc.field}: {exc.message}", field=exc.field, limit=exc.limit
            ) from exc
        self.write_json(answer)


class RunHandler(_BaseHandler):
    def get(self) -> None:
        status = self.runner.status()
        self.write_json({"run": status["run"], "running": status["running"]})

    async def post(self) -> None:
        by = await self.require_steer()
        action = self.json_body().get("action")
        actions = {"start": self.runner.start_run, "stop": self.runner.stop_run}
        if action not in actions:
            raise ApiError(
                400,
                "invalid",
                'action: "start" or "stop"; send {"action": "start"}',
                field="action",
                limit=sorted(actions),
            )
        loop = asyncio.get_running_loop()
        self.write_json(await loop.run_in_executor(None, actions[action], by))


class NotFoundHandler(_BaseHandler):
    async def prepare(self) -> None:
        raise ApiError(
            404,
            "not_found",
            f"no such endpoint {self.request.path}; the routes are GET /schema, GET /params, "
            "PUT /params/NAME and POST /run",
        )


def make_app(
    runner: SourceRunner,
    verifier: TokenVerifier | None = None,
    project: str | None = None,
    relay: RelayVerifier | None = None,
) -> Application:
    """The tornado application; ``relay`` (DSN relay credentials) and/or ``verifier`` (project
    tokens) + ``project`` protect writes with the steer scope."""
    if (verifier is None and relay is None) != (project is None):
        raise ValueError(
            "give both a verifier (or relay_jwks) and the project it protects, or neither"
        )
    kwargs = {"runner": runner, "verifier": verifier, "project": project, "relay": relay}
    return Application(
        [
            (r"/schema", SchemaHandler, kwargs),
            (r"/params", ParamsHandler, kwargs),
            (r"/params/([^/]+)", ParamHandler, kwargs),
            (r"/run", RunHandler, kwargs),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=kwargs,
        log_function=lambda handler: log_request(handler, log),
    )


class SourceControlServer:
    """The control endpoint inside an already running asyncio loop (``await start()``)."""

    def __init__(
        self,
        runner: SourceRunner,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        verifier: TokenVerifier | None = None,
        project: str | None = None,
        relay_jwks: str | Mapping[str, Any] | None = None,
    ) -> None:
        self.relay = None if relay_jwks is None else RelayVerifier(relay_jwks)
        self.app = make_app(runner, verifier, project, self.relay)
        self.host = host
        self.port = port
        self.url: str | None = None
        self._server: HTTPServer | None = None

    async def start(self) -> str:
        """Bind (port 0 = ephemeral) and serve; returns the base URL."""
        sockets = bind_sockets(self.port, self.host)
        self.port = sockets[0].getsockname()[1]
        self._server = HTTPServer(self.app, max_body_size=MAX_BODY_BYTES)
        self._server.add_sockets(sockets)
        self.url = f"http://{self.host}:{self.port}"
        if self.relay is not None:
            self.relay.audience = self.url  # relay credentials are minted for this URL only
        log.info("source control endpoint at %s", self.url)
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None


class ControlServerThread:
    """The control endpoint on its own thread and event loop, for sources outside any loop."""

    def __init__(self, runner: SourceRunner, **kwargs: Any) -> None:
        self.server = SourceControlServer(runner, **kwargs)
        self.url: str | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="source-control", daemon=True)

    def start(self, timeout: float = 10.0) -> ControlServerThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the control endpoint did not start within {timeout} s")
        if self._error is not None:
            self._thread.join()
            raise RuntimeError(f"cannot start the control endpoint: {self._error}") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._done is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._done.set)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        try:
            self.url = await self.server.start()
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._done.wait()
        finally:
            await self.server.stop()


def start_control_thread(
    runner: SourceRunner,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    verifier: TokenVerifier | None = None,
    project: str | None = None,
    relay_jwks: str | Mapping[str, Any] | None = None,
) -> ControlServerThread:
    """Start the control endpoint on its own thread; ``.url`` is the bound base URL."""
    thread = ControlServerThread(
        runner,
        host=host,
        port=port,
        verifier=verifier,
        project=project,
        relay_jwks=relay_jwks,
    )
    return thread.start()
