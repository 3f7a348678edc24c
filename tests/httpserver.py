"""A tornado application served on 127.0.0.1 from its own thread, for tests of HTTP handlers."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web


class ServerThread:
    """``with ServerThread(app) as s:`` serves ``app`` on ``s.port`` until the block ends."""

    def __init__(self, app: tornado.web.Application, **server_kwargs: Any) -> None:
        self.app = app
        self.server_kwargs = server_kwargs
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def serve() -> None:
            server = tornado.httpserver.HTTPServer(self.app, **self.server_kwargs)
            [sock] = tornado.netutil.bind_sockets(0, "127.0.0.1")
            server.add_sockets([sock])
            self.port = sock.getsockname()[1]
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            server.stop()

        asyncio.run(serve())

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10), "the test server did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
