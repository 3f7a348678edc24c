"""The control endpoint of a source: read the schema and values, steer a parameter, start/stop runs.

A small tornado app on loopback. The DSN's steering relay forwards ``GET /schema``, ``GET /params``,
``PUT /params/{name}`` and ``POST /run`` here with the caller's token; when the endpoint is built
with a :class:`beamhub.hub.tokens.TokenVerifier` and a project, writes need a Bearer token with the
``steer`` scope for that project. Every answer, errors included, is JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, HTTPError, RequestHandler

from beamhub.streaming.params import ParamError, UnknownParamError
from beamhub.streaming.source import SourceRunner

__all__ = ["ControlServerThread", "SourceControlServer", "make_app", "start_control_thread"]

log = logging.getLogger("beamhub.source.control")

#: steering bodies are a few hundred bytes; the DSN's control API has the same limit
MAX_BODY_BYTES = 1 << 20


class _JSONError(HTTPError):
    """An HTTP error whose JSON body is given in full."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status, body.get("error", ""))
        self.body = body


class _BaseHandler(RequestHandler):
    def initialize(self, runner: SourceRunner, verifier: Any = None, project: str | None = None):
        self.runner = runner
        self.verifier = verifier
        self.project = project

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")

    def write_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, _JSONError):
            body = exc.body
        else:
            body = {"error": self._reason or "error"}
        self.finish(json.dumps(body))

    def json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.request.body or b"{}")
        except (ValueError, RecursionError) as exc:
            raise _JSONError(
                400, {"error": f"the body is not JSON: {exc}", "field": "body"}
            ) from exc
        if not isinstance(body, dict):
            raise _JSONError(400, {"error": "the body must be a JSON object", "field": "body"})
        return body

    def require_steer(self) -> None:
        """With a verifier configured, writes need a ``steer`` token for this source's project."""
        if self.verifier is None:
            return
        from beamhub.auth.tokens import TokenError

        header = self.request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else None
        try:
            claims = self.verifier.verify(token, project=self.project, scope="steer")
        except TokenError as exc:
            log.info("steering refused: %s (%s)", exc.reason, self.request.path)
            raise _JSONError(exc.status, {"error": exc.message, "reason": exc.reason}) from exc
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
            raise _JSONError(404, {"error": f"unknown parameter {name!r}", "field": name})
        self.write_json({"name": name, "value": status["values"][name], "rev": status["rev"]})

    async def put(self, name: str) -> None:
        self.require_steer()
        body = self.json_body()
        if "value" not in body:
            raise _JSONError(400, {"error": 'send {"value": ...}', "field": "value"})
        loop = asyncio.get_running_loop()
        try:
            answer = await loop.run_in_executor(None, self.runner.set_param, name, body["value"])
        except UnknownParamError as exc:
            raise _JSONError(404, {"error": exc.message, "field": exc.field}) from exc
        except ParamError as exc:
            raise _JSONError(
                400,
                {"error": f"{exc.field}: {exc.message}", "field": exc.field, "limit": exc.limit},
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
            raise _JSONError(
                400,
                {
                    "error": 'action must be "start" or "stop"',
                    "field": "action",
                    "limit": sorted(actions),
                },
            )
        loop = asyncio.get_running_loop()
        self.write_json(await loop.run_in_executor(None, actions[action]))


class NotFoundHandler(_BaseHandler):
    def prepare(self) -> None:
        raise _JSONError(404, {"error": f"no such endpoint {self.request.path}; see /schema"})


def make_app(runner: SourceRunner, verifier: Any = None, project: str | None = None) -> Application:
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
    )


class SourceControlServer:
    """The control endpoint inside an already running asyncio loop (``await start()``)."""

    def __init__(
        self,
        runner: SourceRunner,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        verifier: Any = None,
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
    verifier: Any = None,
    project: str | None = None,
) -> ControlServerThread:
    """Start the control endpoint on its own thread; ``.url`` is the bound base URL."""
    thread = ControlServerThread(runner, host=host, port=port, verifier=verifier, project=project)
    return thread.start()
