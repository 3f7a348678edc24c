"""An in-process DSN + steerable simulated detector: for the steering benchmark and widget tests.

:class:`SteerStack` runs, on one background event loop of this process, a
:class:`beamhub.streaming.dsn.DataStreamingNode` on loopback, a channel of project ``p1``, a simulated
detector streaming into it and its control endpoint attached to the channel (steering goes
through the DSN's relay, as with ``beamhub up``). :class:`StackProcess` runs the same in a child
process, so that an analysis measured in this process shares no GIL with frame generation.
Tokens are signed with the stack's own key: ``stack.token("stream.read steer", sub="alice")``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

__all__ = ["StackProcess", "SteerStack"]


class SteerStack:
    """An in-process DSN + steerable simulated detector on one background event loop."""

    def __init__(
        self,
        shape: tuple[int, int] = (1024, 1024),
        rate_hz: float = 120.0,
        *,
        project: str = "p1",
        stream: str = "det",
        mode: str | None = None,
        hwm: int | None = None,
        seed: int = 0,
        key: Any = None,
        **sim_params: Any,
    ) -> None:
        from beamhub.auth.tokens import SigningKey, TokenIssuer, TokenVerifier

        key = key or SigningKey.generate()
        self.key = key
        self.issuer = TokenIssuer(key, max_ttl=86400)
        self.verifier = TokenVerifier(key.jwks())
        self.shape, self.rate_hz, self.project, self.stream = shape, rate_hz, project, stream
        self.mode, self.hwm, self.seed, self.sim_params = mode, hwm, seed, sim_params
        self.dsn_url = self.channel_id = self.control_url = ""
        self.node: Any = None
        self.runner: Any = None
        self._control: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="steer-stack", daemon=True
        )

    def token(
        self,
        scopes: str = "stream.read steer",
        sub: str = "alice",
        project: str | None = None,
        ttl: int = 3600,
    ) -> str:
        return self.issuer.issue(sub, project or self.project, scopes, ttl=ttl)

    def _await(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> SteerStack:
        self._thread.start()
        try:
            self._await(self._start())
        except BaseException:
            self.stop()
            raise
        return self

    async def _start(self) -> None:
        import zmq

        from beamhub.streaming.dsn import DataStreamingNode
        from beamhub.streaming.simulator import SimulatedDetector
        from beamhub.streaming.source import CurveKeys, SourceRunner
        from beamhub.streaming.source_control import SourceControlServer

        self.node = DataStreamingNode(self.verifier)
        self.dsn_url = await self.node.start(0)
        publisher = self.token("stream.read stream.publish", sub="beamhub-detector")
        request: dict[str, Any] = {"stream": self.stream}
        if self.mode:
            request["mode"] = self.mode
        if self.hwm:
            request["hwm"] = self.hwm
        claims = self.verifier.verify(publisher)
        channel = await self.node.create_channel(claims, request)
        self.channel_id = channel.id
        generator = SimulatedDetector(
            self.shape, seed=self.seed, rate_hz=self.rate_hz, **self.sim_params
        )
        # every DSN channel is CURVE: the source registers its own producer key
        public, secret = zmq.curve_keypair()
        await self.node.register_credential(channel, claims, "producer", public.decode())
        curve = CurveKeys(public, secret, channel.endpoints.server_key.encode())
        self.runner = SourceRunner(
            generator,
            stream=self.stream,
            connect=channel.endpoints.producer,
            sndhwm=self.hwm or 16,
            curve=curve,
        )
        await asyncio.to_thread(self.runner.start)
        self._control = SourceControlServer(
            self.runner,
            verifier=self.verifier,
            project=self.project,
            relay_jwks=self.node.relay_jwks(),  # the DSN relays with credentials it mints
        )
        self.control_url = await self._control.start()
        url = self.node.template.check_source_control(self.control_url, channel.params.source_cidrs)
        channel.params = dataclasses.replace(channel.params, source_control=url)
        await asyncio.to_thread(self.runner.start_run)

    async def _stop(self) -> None:
        if self._control is not None:
            await self._control.stop()
        if self.runner is not None:
            await asyncio.to_thread(self.runner.stop)
        if self.node is not None:
            await self.node.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            try:
                self._await(self._stop())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> SteerStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _serve_stack(key_pem: bytes, conn: Any, kwargs: dict[str, Any]) -> None:
    """Child process: run a SteerStack until the parent says stop (or goes away)."""
    from cryptography.hazmat.primitives import serialization

    from beamhub.auth.tokens import SigningKey

    key = SigningKey(serialization.load_pem_private_key(key_pem, password=None))
    with SteerStack(key=key, **kwargs) as stack:
        conn.send(
            {
                "dsn_url": stack.dsn_url,
                "channel_id": stack.channel_id,
                "control_url": stack.control_url,
            }
        )
        try:
            while True:
                message = conn.recv()
                if message == "stats":
                    conn.send(stack.runner.stats())
                else:
                    break
        except EOFError:
            pass


class StackProcess:
    """The facility side (DSN + detector + control endpoint) in a child process of its own, so
    the analysis in this process does not share a GIL with frame generation and forwarding."""

    def __init__(self, **kwargs: Any) -> None:
        import multiprocessing

        from cryptography.hazmat.primitives import serialization

        from beamhub.auth.tokens import SigningKey, TokenIssuer

        self.key = SigningKey.generate()
        self.issuer = TokenIssuer(self.key, max_ttl=86400)
        pem = self.key.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_serve_stack, args=(pem, child, kwargs), name="beamhub-bench-stack", daemon=True
        )
        self.process.start()
        child.close()
        if not self._conn.poll(60):
            self.stop()
            raise TimeoutError("the DSN + detector process did not start within 60 s")
        info = self._conn.recv()
        self.dsn_url, self.channel_id = info["dsn_url"], info["channel_id"]
        self.control_url = info["control_url"]
        self.project = kwargs.get("project", "p1")

    def token(self, scopes: str = "stream.read steer", sub: str = "alice") -> str:
        return self.issuer.issue(sub, self.project, scopes, ttl=3600)

    def source_stats(self) -> dict[str, Any]:
        self._conn.send("stats")
        return self._conn.recv()

    def stop(self) -> None:
        try:
            self._conn.send("stop")
        except (OSError, ValueError):
            pass
        self.process.join(20)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)

    def __enter__(self) -> StackProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
