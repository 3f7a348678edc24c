"""Steering round trip: parameter change through the DSN -> first ANALYSED frame that reflects it.

One process, real parts: a :class:`streaming.dsn.DataStreamingNode` on loopback, a simulated
detector (1024x1024 float32 = 4 MiB frames at 120 Hz) streaming into a channel with its control
endpoint attached, and a StreamConsumer + :class:`streaming.analysis.Analyzer` loop on a thread.
Each sample PUTs ``sample_position_um`` through the DSN's steering relay with a ``steer`` token and
times until an analysed frame carries ``rev >= `` the answered revision. Interleaved with it, the
baseline: the same change PUT straight to the source's control endpoint (no DSN hop). The floor is
the frame interval (a change waits for the next frame). A second part drives a
:class:`widgets.liveview.LiveView` at 120 Hz inside a real ipykernel and counts its iopub traffic.

    beamhub bench steer --json            (or: python -m bench.steer --json)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import statistics
import sys
import threading
import time
from typing import Any

__all__ = ["SteerStack", "main"]

TARGET_P50_MS = 50.0
TARGET_P99_MS = 200.0


class SteerStack:
    """An in-process DSN + steerable simulated detector on one background event loop."""

    def __init__(self, shape: tuple[int, int] = (1024, 1024), rate_hz: float = 120.0, *,
                 project: str = "p1", stream: str = "det", mode: str | None = None,
                 hwm: int | None = None, seed: int = 0, **sim_params: Any) -> None:
        from hub.tokens import SigningKey, TokenIssuer, TokenVerifier

        key = SigningKey.generate()
        self.issuer = TokenIssuer(key, max_ttl=86400)
        self.verifier = TokenVerifier(key.jwks())
        self.shape, self.rate_hz, self.project, self.stream = shape, rate_hz, project, stream
        self.mode, self.hwm, self.seed, self.sim_params = mode, hwm, seed, sim_params
        self.dsn_url = self.channel_id = self.control_url = ""
        self.node: Any = None
        self.runner: Any = None
        self._control: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="steer-stack",
                                        daemon=True)

    def token(self, scopes: str = "stream.read steer", sub: str = "alice",
              project: str | None = None, ttl: int = 3600) -> str:
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
        from streaming.dsn import DataStreamingNode
        from streaming.simulator import SimulatedDetector
        from streaming.source import SourceRunner
        from streaming.source_control import SourceControlServer

        self.node = DataStreamingNode(self.verifier)
        self.dsn_url = await self.node.start(0)
        publisher = self.token("stream.read stream.publish", sub="beamhub-detector")
        request: dict[str, Any] = {"stream": self.stream}
        if self.mode:
            request["mode"] = self.mode
        if self.hwm:
            request["hwm"] = self.hwm
        channel = await self.node.create_channel(self.verifier.verify(publisher), request)
        self.channel_id = channel.id
        generator = SimulatedDetector(self.shape, seed=self.seed, rate_hz=self.rate_hz,
                                      **self.sim_params)
        self.runner = SourceRunner(generator, stream=self.stream,
                                   connect=channel.endpoints.producer)
        await asyncio.to_thread(self.runner.start)
        self._control = SourceControlServer(self.runner, verifier=self.verifier,
                                            project=self.project)
        self.control_url = await self._control.start()
        url = self.node.template.check_source_control(self.control_url,
                                                      channel.params.source_cidrs)
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


class AnalysisLoop:
    """StreamConsumer + Analyzer on a thread; remembers when each source revision was analysed."""

    def __init__(self, stack: SteerStack, token: str) -> None:
        from streaming.analysis import Analyzer
        from streaming.consumer import StreamConsumer

        self.consumer = StreamConsumer.from_dsn(stack.dsn_url, stack.channel_id, token,
                                                exclusive=True)
        self.analyzer = Analyzer()
        self.frames = 0
        self.max_rev = -1
        self.listeners: list[Any] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steer-analysis", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self.consumer.receive(timeout=0.1)
                if frame is None:
                    continue
                result = self.analyzer.analyse(frame)
                with self._cond:
                    self.frames += 1
                    self.max_rev = max(self.max_rev, result.source_rev)
                    self._cond.notify_all()
                for fn in self.listeners:
                    fn(result, frame)
        finally:
            self.consumer.close()

    def wait_rev(self, rev: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.max_rev >= rev, timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _put(url: str, token: str, value: Any) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(
        url, data=json.dumps({"value": value}).encode(), method="PUT",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))], 2)


def measure_steering(samples: int, rate_hz: float, mode: str | None,
                     hwm: int | None = None) -> dict[str, Any]:
    """Interleaved DSN-relayed and direct changes; round trips in ms."""
    with SteerStack(rate_hz=rate_hz, mode=mode, hwm=hwm) as stack:
        steer = stack.token()
        loop = AnalysisLoop(stack, steer)
        try:
            deadline = time.monotonic() + 20
            while loop.frames < 20 and time.monotonic() < deadline:  # warm-up: caches, sockets
                loop.wait_rev(0, 0.5)
            relay = (f"{stack.dsn_url}/api/channels/{stack.channel_id}/steer/params/"
                     "sample_position_um")
            direct = f"{stack.control_url}/params/sample_position_um"
            via = {"dsn": [], "direct": []}
            http = {"dsn": [], "direct": []}
            rng = random.Random(1)
            timeouts = 0
            for i in range(2 * samples):
                kind = "dsn" if i % 2 == 0 else "direct"
                time.sleep(rng.uniform(0.01, 0.04))  # decorrelate from the frame clock
                t0 = time.perf_counter()
                answer = _put(relay if kind == "dsn" else direct, steer, float(i % 7))
                t1 = time.perf_counter()
                if not loop.wait_rev(answer["rev"], 5.0):
                    timeouts += 1
                    continue
                via[kind].append((time.perf_counter() - t0) * 1e3)
                http[kind].append((t1 - t0) * 1e3)
            stats = stack.runner.stats()
            consumer = loop.consumer.stats()
        finally:
            loop.stop()
    p50, p50_direct = _pct(via["dsn"], 50), _pct(via["direct"], 50)
    return {
        "p50_ms": p50, "p99_ms": _pct(via["dsn"], 99), "rate_hz": rate_hz,
        "samples": len(via["dsn"]),
        "mean_ms": round(statistics.fmean(via["dsn"]), 2) if via["dsn"] else None,
        "max_ms": round(max(via["dsn"]), 2) if via["dsn"] else None,
        "http_p50_ms": _pct(http["dsn"], 50),
        "baseline_direct": {"p50_ms": p50_direct, "p99_ms": _pct(via["direct"], 99),
                            "http_p50_ms": _pct(http["direct"], 50),
                            "samples": len(via["direct"])},
        "dsn_hop_ratio_p50": round(p50 / p50_direct, 3) if p50 and p50_direct else None,
        "frame_interval_floor_ms": round(1e3 / rate_hz, 2),
        "timeouts": timeouts, "frame_bytes": 1024 * 1024 * 4, "dsn_mode": mode or "default", "hwm": hwm,
        "source": {"frames_sent": stats["frames_sent"],
                   "dropped_at_source": stats["dropped_at_source"]},
        "analysed_frames": consumer["frames"], "consumer_lost": consumer["lost"],
        "frame_latency_p50_ms": consumer["latency_p50_ms"],
        "targets": {"p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS,
                    "met": bool(p50 is not None and p50 <= TARGET_P50_MS
                                and (_pct(via["dsn"], 99) or 1e9) <= TARGET_P99_MS)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beamhub bench steer", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--samples", type=int, default=150,
                        help="changes through the DSN (as many direct ones, interleaved)")
    parser.add_argument("--rate-hz", type=float, default=120.0)
    parser.add_argument("--mode", choices=("l4", "l7"), default=None,
                        help="DSN data-plane mode (default: the template's)")
    parser.add_argument("--hwm", type=int, default=4,
                        help="channel high-water mark in frames (small: a slow analysis drops "
                             "frames instead of queueing seconds of them)")
    parser.add_argument("--liveview-seconds", type=float, default=10.0,
                        help="seconds of the LiveView-in-a-kernel part (0: skip)")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error("--samples must be >= 1")
    t0 = time.monotonic()
    out = measure_steering(args.samples, args.rate_hz, args.mode, args.hwm)
    if args.liveview_seconds > 0:
        from bench.liveview import measure_liveview

        out["liveview"] = measure_liveview(args.liveview_seconds, args.rate_hz)
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
