"""The simulated detector `beamhub up` runs: a DSN channel of its project, kept alive and steerable.

Its tokens (subject :data:`DETECTOR_USER`, an operator of its project) come from the token service
through the mint-for API with `beamhub up`'s own hub identity; this process never opens the
signing key.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from beamhub.auth.mint_client import MintError, MintForClient
from beamhub.hub.up.deployment import Deployment

__all__ = ["DETECTOR_USER", "DetectorFeed"]

#: The token subject of the detector (an operator of its project in the token register).
DETECTOR_USER = "beamhub-detector"


class DetectorFeed:
    """Creates the channel with a token of its own, streams frames, attaches steering, renews."""

    def __init__(
        self,
        dep: Deployment,
        tokens: MintForClient,
        dsn: Any,
        dsn_url: str,
        progress: Callable[[str], None] = print,
    ) -> None:
        self.dep = dep
        self.tokens = tokens
        self.dsn = dsn
        self.dsn_url = dsn_url
        self.progress = progress
        self.channel_id = ""
        self.notes: list[str] = []
        self._source: Any = None
        self._control: Any = None
        self._renewer: asyncio.Task | None = None

    async def start(self) -> str:
        """Start streaming; return "" or why the detector cannot run."""
        det = self.dep.detector
        try:
            from beamhub.streaming.simulator import SimulatedDetector
            from beamhub.streaming.source import SourceRunner
        except ImportError as exc:
            return f"streaming sources unavailable: {exc}"
        try:
            token = await asyncio.to_thread(self._token)
        except MintError as exc:
            return f"no token for the detector: {exc}"
        claims = await asyncio.to_thread(self.dsn.verifier.verify, token)  # may fetch the JWKS
        channel = await self._create_channel(claims)
        self.channel_id = channel.id
        generator = SimulatedDetector(
            tuple(det.shape), rate_hz=det.rate_hz, hit_fraction=det.hit_fraction
        )
        self._source = SourceRunner(
            generator, stream=det.channel, connect=channel.endpoints.producer
        )
        await asyncio.to_thread(self._source.start)
        await asyncio.to_thread(self._source.start_run)
        await self._attach_steering(token)
        self._renewer = asyncio.create_task(self._renew_loop(), name="detector-renew")
        return ""

    async def _create_channel(self, claims: Any) -> Any:
        """An L7 channel that drops (counted) while no analysis is connected, so the dashboard
        is live from the start; if the DSN's template forbids that, its default channel."""
        from beamhub.streaming.template import TemplateViolation

        stream = self.dep.detector.channel
        live = {"stream": stream, "mode": "l7", "when_no_consumer": "drop"}
        try:
            return await self.dsn.create_channel(claims, live)
        except TemplateViolation as exc:
            if exc.field not in ("mode", "when_no_consumer"):
                raise
            self.notes.append(
                f"detector channel waits for a work consumer (the DSN template refused "
                f"{exc.field}: {exc.message}); the dashboard shows frames once analysis connects"
            )
        return await self.dsn.create_channel(claims, {"stream": stream})

    def read_token(self) -> str:
        """A stream.read token of the detector's project (for the live figures' lookup). Blocking."""
        token, _ = self.tokens.mint(
            DETECTOR_USER,
            self.dep.detector.project,
            ["stream.read"],
            kind="service",
            description="beamhub up: live figures",
        )
        return token

    async def _attach_steering(self, token: str) -> None:
        try:
            from beamhub.streaming.source_control import SourceControlServer
        except ImportError:
            self.notes.append("detector steering unavailable: streaming/source_control.py missing")
            return
        self._control = SourceControlServer(
            self._source, verifier=self.dsn.verifier, project=self.dep.detector.project
        )
        control_url = await self._control.start()
        status, answer = await asyncio.to_thread(
            self._call,
            "PUT",
            f"/api/channels/{self.channel_id}/source_control",
            token,
            {"source_control": control_url},
        )
        if status != 200:
            self.notes.append(f"detector steering not attached: {answer}")

    def _token(self) -> str:
        """A token to create, steer and renew the channel. Blocking."""
        token, _ = self.tokens.mint(
            DETECTOR_USER,
            self.dep.detector.project,
            ["stream.read", "stream.publish", "steer"],
            kind="service",
            description="beamhub up: simulated detector",
        )
        return token

    def _call(self, method: str, path: str, token: str, body: Any) -> tuple[int, Any]:
        req = urllib.request.Request(  # noqa: S310 - our own DSN on loopback
            self.dsn_url + path,
            data=json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")[:300]
        except OSError as exc:
            return 0, str(exc)

    async def _renew_loop(self) -> None:
        """Keep the channel alive: renew it with a fresh token halfway to its expiry."""
        while True:
            channel = self.dsn.channels.get(self.channel_id)
            if channel is None:
                return
            await asyncio.sleep(max(1.0, (channel.expires_at - time.time()) / 2))
            path = f"/api/channels/{self.channel_id}/renew"
            try:
                token = await asyncio.to_thread(self._token)
            except MintError as exc:
                self.progress(f"beamhub up: detector channel renewal failed: {exc}")
                continue
            status, answer = await asyncio.to_thread(self._call, "POST", path, token, {})
            if status != 200:
                self.progress(f"beamhub up: detector channel renewal failed: {answer}")

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        if self._control is not None:
            await self._control.stop()
        if self._source is not None:
            await asyncio.to_thread(self._source.stop)
