"""The control endpoint of a source: read the schema and values, steer a parameter, start/stop runs.

A small tornado app on loopback. The DSN's steering relay forwards ``GET /schema``, ``GET /params``,
``PUT /params/{name}`` and ``POST /run`` here with the caller's token; when the endpoint is built
with a :class:`beamhub.auth.tokens.TokenVerifier` and a project, writes need a Bearer token with the
``steer`` scope for that project. Every answer is JSON; errors in the one shape of
:mod:`beamhub.auth.api` (``{reason, message, field?, limit?}``), which the relay passes through.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application

from beamhub.auth.api import ApiError, JsonApiHandler, log_request
from beamhub.auth.tokens import TokenError, TokenVerifier
from beamhub.streaming.params import ParamError, UnknownParamError
from beamhub.streaming.source import SourceRunner

__all__ = ["ControlServerThread", "SourceControlServer", "make_app", "start_control_thread"]

log = logging.getLogger("beamhub.source.control")

#: steering bodies are a few hundred bytes; the DSN's control API has the same limit
MAX_BODY_BYTES = 1 << 20
REALM = "beamhub-source"


class _BaseHandler(JsonApiHandler):
    max_body = MAX_BODY_BYTES
    service = "the source's control endpoint"

    def initialize(
        self,
        runner: SourceRunner,
        verifier: TokenVerifier | None = None,
        project: str | None = None,
    ) -> None:
        self.runner = runner
        self.verifier = verifier
        self.project = project

    def require_steer(self) -> None:
        """With a verifier configured, writes need a ``steer`` token for this source's project."""
        if self.verifier is None:
            return
        try:
            claims = self.verifier.verify(
                self.bearer() or None, project=self.project, scope="steer"
            )
        except TokenError as exc:
            log.info("steering refused: %s (%s)", exc.reason, self.request.path)
            headers: dict[str, str] = {}
            if exc.status == 401:  # RFC 6750: say how to authenticate, and why it failed
                why = "" if exc.reason == "missing" else ', error="invalid_token"'
                headers["WWW-Authenticate"] = f'Bearer realm="{REALM}"{why}'
            raise ApiError(exc.status, exc.reason, exc.message, headers=headers) from exc
        log.info("steering by %s", claims.log_fields())


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
        self.require_steer()
        body = self.json_body()
        if "value" not in body:
            raise ApiError(
                400, "missing_field", 'value: required; send {"value": ...}', field="value"
            )
        loop = asyncio.get_running_loop()
        try:
            answer = await loop.run_in_executor(None, self.runner.set_param, name, body["value"])
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
        self.require_steer()
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
        self.write_json(await loop.run_in_executor(None, actions[action]))


class NotFoundHandler(_BaseHandler):
    async def prepare(self) -> None:
        raise ApiError(
            404,
            "not_found",
            f"no such endpoint {self.request.path}; the routes are GET /schema, GET /params, "
            "PUT /params/NAME and POST /run",
        )


def make_app(
    runner: SourceRunner, verifier: TokenVerifier | None = None, project: str | None = None
) -> Application:
    """The tornado application; ``verifier`` + ``project`` protect writes with the steer scope."""
    if (verifier is None) != (project is None):
        raise ValueError("give both a token verifier and the project it protects, or neither")
    kwargs = {"runner": runner, "verifier": verifier, "project": project}
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
    ) -> None:
        self.app = make_app(runner, verifier, project)
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
) -> ControlServerThread:
    """Start the control endpoint on its own thread; ``.url`` is the bound base URL."""
    thread = ControlServerThread(runner, host=host, port=port, verifier=verifier, project=project)
    return thread.start()
