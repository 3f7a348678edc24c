"""Steering round trip: parameter change through the DSN -> first ANALYSED frame that reflects it.

One process, real parts: a :class:`beamhub.streaming.dsn.DataStreamingNode` on loopback, a simulated
detector (1024x1024 float32 = 4 MiB frames at 120 Hz) streaming into a channel with its control
endpoint attached, and a StreamConsumer + :class:`beamhub.streaming.analysis.Analyzer` loop on a thread.
Each sample PUTs ``sample_position_um`` through the DSN's steering relay with a ``steer`` token and
times until an analysed frame carries ``rev >= `` the answered revision. Interleaved with it, the
baseline: the same change PUT straight to the source's control endpoint (no DSN hop). The floor is
the frame interval (a change waits for the next frame). A second part drives a
:class:`beamhub.widgets.liveview.LiveView` at 120 Hz in a kernel behind a real jupyter_server and counts
its iopub traffic and the server's rate-limit warnings, against an unthrottled baseline
(``bench/liveview.py``).

    beamhub bench steer --json            (or: python -m bench.steer --json)
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import threading
import time
from typing import Any

from beamhub.bench.steer_stack import StackProcess

__all__ = ["AnalysisLoop", "main", "measure_steering"]

TARGET_P50_MS = 50.0
TARGET_P99_MS = 200.0


class AnalysisLoop:
    """StreamConsumer + Analyzer on a thread; remembers when each source revision was analysed."""

    def __init__(self, stack: Any, token: str, hwm: int = 16, latest: bool = False) -> None:
        from beamhub.streaming.analysis import Analyzer
        from beamhub.streaming.consumer import StreamConsumer

        self.consumer = StreamConsumer.from_dsn(
            stack.dsn_url, stack.channel_id, token, exclusive=True, hwm=hwm
        )
        self.analyzer = Analyzer()
        self.latest = latest  # analyse only the newest frame waiting (skip stale ones)
        self.frames = 0
        self.skipped = 0
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
                while self.latest and (newer := self.consumer.receive(timeout=0)) is not None:
                    frame = newer
                    self.skipped += 1
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
        url,
        data=json.dumps({"value": value}).encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))], 2)


class _Phase:
    """Samples of one analysis policy, gathered over several interleaved rounds."""

    def __init__(self) -> None:
        self.via: dict[str, list[float]] = {"dsn": [], "direct": []}
        self.http: dict[str, list[float]] = {"dsn": [], "direct": []}
        self.timeouts = 0
        self.frames = 0
        self.seconds = 0.0
        self.cpu = 0.0  # CPU seconds of this (analysis) process

    def run(
        self, loop: AnalysisLoop, stack: Any, token: str, samples: int, rng: random.Random
    ) -> None:
        """``samples`` changes through the DSN interleaved with as many direct ones."""
        import psutil

        relay = f"{stack.dsn_url}/api/channels/{stack.channel_id}/steer/params/sample_position_um"
        direct = f"{stack.control_url}/params/sample_position_um"
        frames0, t_start, cpu0 = loop.frames, time.monotonic(), psutil.Process().cpu_times()
        for i in range(2 * samples):
            kind = "dsn" if i % 2 == 0 else "direct"
            time.sleep(rng.uniform(0.01, 0.04))  # decorrelate from the frame clock
            t0 = time.perf_counter()
            answer = _put(relay if kind == "dsn" else direct, token, float(rng.randrange(-20, 21)))
            t1 = time.perf_counter()
            if not loop.wait_rev(answer["rev"], 5.0):
                self.timeouts += 1
                continue
            self.via[kind].append((time.perf_counter() - t0) * 1e3)
            self.http[kind].append((t1 - t0) * 1e3)
        cpu1 = psutil.Process().cpu_times()
        self.frames += loop.frames - frames0
        self.seconds += time.monotonic() - t_start
        self.cpu += cpu1.user + cpu1.system - cpu0.user - cpu0.system

    def summary(self, kind: str) -> dict[str, Any]:
        v = self.via[kind]
        return {
            "p50_ms": _pct(v, 50),
            "p99_ms": _pct(v, 99),
            "mean_ms": round(statistics.fmean(v), 2) if v else None,
            "max_ms": round(max(v), 2) if v else None,
            "http_p50_ms": _pct(self.http[kind], 50),
            "samples": len(v),
        }

    def report(self) -> dict[str, Any]:
        dsn, base = self.summary("dsn"), self.summary("direct")
        ratio = (
            round(dsn["p50_ms"] / base["p50_ms"], 3) if dsn["p50_ms"] and base["p50_ms"] else None
        )
        wall = max(1e-9, self.seconds)
        return {
            "dsn": dsn,
            "direct": base,
            "dsn_hop_ratio_p50": ratio,
            "timeouts": self.timeouts,
            "analysed_fps": round(self.frames / wall, 1),
            "analysis_process_cores": round(self.cpu / wall, 2),
        }


def measure_steering(
    samples: int,
    rate_hz: float,
    mode: str | None,
    hwm: int | None = None,
    stale_samples: int = 0,
    rounds: int = 4,
) -> dict[str, Any]:
    """Round trips with every frame analysed and, in alternating rounds (so both policies see
    the same machine load), with the analysis skipping stale frames."""
    import psutil

    rng = random.Random(1)
    load0 = psutil.getloadavg()[0]
    every, stale = _Phase(), _Phase()
    with StackProcess(rate_hz=rate_hz, mode=mode, hwm=hwm) as stack:
        child = psutil.Process(stack.process.pid)
        steer = stack.token()
        loop = AnalysisLoop(stack, steer, hwm=hwm or 16)
        try:
            deadline = time.monotonic() + 20
            while loop.frames < 60 and time.monotonic() < deadline:  # warm-up: caches, sockets
                loop.wait_rev(0, 0.5)
            _Phase().run(loop, stack, steer, 2, rng)  # untimed: both HTTP paths warmed up
            child0, t0 = child.cpu_times(), time.monotonic()
            for r in range(rounds):
                loop.latest = False
                every.run(loop, stack, steer, samples // rounds + (r < samples % rounds), rng)
                if stale_samples:
                    loop.latest = True
                    stale.run(
                        loop,
                        stack,
                        steer,
                        stale_samples // rounds + (r < stale_samples % rounds),
                        rng,
                    )
            child1, t1 = child.cpu_times(), time.monotonic()
            source = stack.source_stats()
            consumer = loop.consumer.stats()
        finally:
            loop.stop()
    main_phase = every.report()
    stale_phase = stale.report() if stale_samples else None
    if stale_phase is not None:
        stale_phase["frames_skipped"] = loop.skipped
    wall = max(1e-9, t1 - t0)
    dsn = main_phase["dsn"]
    met = (
        dsn["p50_ms"] is not None
        and dsn["p50_ms"] <= TARGET_P50_MS
        and dsn["p99_ms"] <= TARGET_P99_MS
    )
    return {
        "p50_ms": dsn["p50_ms"],
        "p99_ms": dsn["p99_ms"],
        "rate_hz": rate_hz,
        "samples": dsn["samples"],
        "mean_ms": dsn["mean_ms"],
        "max_ms": dsn["max_ms"],
        "http_p50_ms": dsn["http_p50_ms"],
        "baseline_direct": main_phase["direct"],
        "dsn_hop_ratio_p50": main_phase["dsn_hop_ratio_p50"],
        "frame_interval_floor_ms": round(1e3 / rate_hz, 2),
        "analysed_fps": main_phase["analysed_fps"],
        "timeouts": main_phase["timeouts"],
        "skip_stale": stale_phase,
        "rounds": rounds,
        "frame_bytes": 1024 * 1024 * 4,
        "dsn_mode": mode or "template default",
        "hwm": hwm,
        "source": {
            "frames_sent": source["frames_sent"],
            "dropped_at_source": source["dropped_at_source"],
        },
        "analysed_frames": consumer["frames"],
        "consumer_lost": consumer["lost"],
        "frame_latency_p50_ms": consumer["latency_p50_ms"],
        "cpu": {
            "analysis_process_cores": main_phase["analysis_process_cores"],
            "dsn_and_detector_process_cores": round(
                (child1.user + child1.system - child0.user - child0.system) / wall, 2
            ),
            "machine_cores": psutil.cpu_count(),
            "load_avg_1min_before": round(load0, 2),
            "load_avg_1min_after": round(psutil.getloadavg()[0], 2),
        },
        "targets": {"p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS, "met": met},
    }


def _progress(text: str) -> None:
    print(f"beamhub bench steer: {text}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beamhub bench steer", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument(
        "--samples",
        type=int,
        default=100,
        help="changes through the DSN (as many direct ones, interleaved)",
    )
    parser.add_argument(
        "--stale-samples",
        type=int,
        default=40,
        help="more changes with the analysis skipping stale frames (0: skip)",
    )
    parser.add_argument("--rate-hz", type=float, default=120.0, help="detector frame rate")
    parser.add_argument(
        "--mode",
        choices=("l4", "l7"),
        default=None,
        help="DSN data-plane mode (default: the template's)",
    )
    parser.add_argument(
        "--hwm",
        type=int,
        default=2,
        help="channel high-water mark in frames (small: a slow analysis drops "
        "frames instead of queueing seconds of them)",
    )
    parser.add_argument(
        "--liveview-seconds",
        type=float,
        default=10.0,
        help="seconds of the LiveView-in-a-kernel part (0: skip)",
    )
    args = parser.parse_args(argv)
    if args.samples < 1 or args.stale_samples < 0:
        parser.error("--samples must be >= 1 and --stale-samples >= 0")
    if not 0 < args.rate_hz <= 1000:
        parser.error("--rate-hz must be in (0, 1000], the simulated detector's range")
    if args.hwm < 1:
        parser.error("--hwm must be >= 1 frame")
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM unwinds like Ctrl-C: children stop
    t0 = time.monotonic()
    try:
        _progress(
            f"steering: {args.samples} changes via the DSN + as many direct, "
            f"{args.rate_hz:g} Hz, 4 MiB frames"
        )
        out = measure_steering(args.samples, args.rate_hz, args.mode, args.hwm, args.stale_samples)
        _progress(f"steering: p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms")
        if args.liveview_seconds > 0:
            from beamhub.bench.liveview import measure_liveview

            _progress(
                f"live view: {args.liveview_seconds:g} s at {args.rate_hz:g} Hz behind "
                "a jupyter_server, then the unthrottled baseline"
            )
            live = measure_liveview(args.liveview_seconds, args.rate_hz, via="server")
            keys = (
                "input_rate_hz",
                "updates_per_s",
                "iopub_msgs_per_s",
                "iopub_bytes_per_s",
                "peak_msgs_per_s",
                "would_warn",
                "server_rate_warnings",
            )
            seconds = min(args.liveview_seconds, 5.0)
            naive = measure_liveview(seconds, args.rate_hz, via="server", naive=True)
            live["baseline_unthrottled"] = {k: naive[k] for k in keys}
            live["msgs_ratio_vs_unthrottled"] = round(
                live["peak_msgs_per_s"] / max(1e-9, naive["peak_msgs_per_s"]), 4
            )
            double = measure_liveview(seconds, 2 * args.rate_hz, via="server", naive=True)
            live["baseline_unthrottled_2x_rate"] = {k: double[k] for k in keys}
            out["liveview"] = live
    except KeyboardInterrupt:
        _progress("interrupted; stopped the DSN, the detector and the kernel")
        return 130
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
