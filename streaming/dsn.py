"""The Data Streaming Node: its control plane served over HTTP, in front of the data plane.

Every call (but the health checks and ``/metrics`` from this host) carries a project access token verified locally with the public
JWKS; channel requests are bounded by the admin :class:`~beamhub.streaming.template.Template`; only
then is the data path provisioned. Channels die with their token (unless renewed): a reaper removes
them. The reverse (steering) channel relays to the source's control endpoint for ``steer`` tokens
only. The channels and their rules live in :mod:`beamhub.streaming.controlplane`, the HTTP routes in
:mod:`beamhub.streaming.dsn_handlers`; this module only serves one with the other.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import tornado.httpserver
import tornado.netutil

from beamhub.auth.metrics import METRICS_ACCESS
from beamhub.auth.tokens import TokenVerifier
from beamhub.streaming.controlplane import Channel, ChannelError, ControlPlane, log_event
from beamhub.streaming.dsn_handlers import MAX_BODY_BYTES, make_app
from beamhub.streaming.template import Template

__all__ = ["Channel", "ChannelError", "DataStreamingNode"]

log = logging.getLogger("beamhub.dsn")


class DataStreamingNode(ControlPlane):
    """The control plane plus its HTTP server on ``host``; ``await start()``, ``await stop()``.

    ``data_plane`` may be given (the caller then owns it); otherwise a
    :class:`beamhub.streaming.dataplane.DataPlane` on ``data_host`` is created at start and closed
    at stop (its producer faces on ``producer_host`` if given). Data-plane calls run on one
    worker thread so they never block the event loop.
    With ``state_dir`` the channels survive a restart (see
    :class:`~beamhub.streaming.controlplane.ControlPlane`); without, they live in memory only.
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
        state_dir: str | os.PathLike | None = None,
        producer_host: str | None = None,
        metrics_access: str = "local-or-token",
    ) -> None:
        if metrics_access not in METRICS_ACCESS:
            raise ValueError(f"metrics_access {metrics_access!r}: use one of {METRICS_ACCESS}")
        super().__init__(
            verifier,
            template,
            data_host=data_host,
            data_plane=data_plane,
            reap_interval=reap_interval,
            relay_timeout=relay_timeout,
            state_dir=state_dir,
            producer_host=producer_host,
        )
        self.host = host
        #: who may read /metrics (:mod:`beamhub.auth.metrics`)
        self.metrics_access = metrics_access
        self._server: tornado.httpserver.HTTPServer | None = None
        self.url: str | None = None

    async def start(self, port: int = 0) -> str:
        """Provision the data plane, listen on ``host:port`` (0 = any free port); return the URL."""
        await self.open()
        try:
            sockets = tornado.netutil.bind_sockets(port, address=self.host)
        except OSError:
            await self.close()
            raise
        self._server = tornado.httpserver.HTTPServer(make_app(self), max_body_size=MAX_BODY_BYTES)
        self._server.add_sockets(sockets)
        bound = sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{bound}"
        log_event(
            log,
            "dsn.started",
            url=self.url,
            data_host=self.data_host,
            producer_host=self.producer_host,
            template=self.template.name,
            boot_id=self.boot_id,
            store=self.store.path if self.store is not None else None,
            channels=len(self.channels),
        )
        return self.url

    async def stop(self) -> None:
        """Stop listening, tear down every channel's data path, and release the data plane."""
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None
        running = self._executor is not None
        await self.close()
        if running:
            log_event(log, "dsn.stopped", url=self.url)
