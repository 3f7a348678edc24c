"""Steering round trip with the analysis attached: parameter change -> first ANALYSED frame with it.

Real parts: a :class:`beamhub.streaming.dsn.DataStreamingNode` on loopback and a simulated detector
(1024x1024 float32 = 4 MiB frames at 120 Hz) streaming into a channel with its control endpoint
attached, in a child process; in this process, on two threads, the channel's analysis as a notebook
runs it (issue 13):

* the work analysis: a StreamConsumer on the work face + :class:`beamhub.streaming.analysis.Analyzer`,
  every frame in order (nothing skipped; frames analysed per second are reported beside frames
  arriving and frames the source dropped when the analysis fell behind);
* the steering feedback: a StreamConsumer on the monitor face reading the freshest frame
  (:meth:`~beamhub.streaming.consumer.StreamConsumer.receive_latest`, stale frames skipped and
  counted) and analysing it when it carries a new steering revision, or ``--feedback-hz`` times a
  second for the live view.

Each sample PUTs ``sample_position_um`` through the DSN's steering relay with a ``steer`` token and
times until the feedback has analysed a frame with ``rev >=`` the answered revision; interleaved
with it, the baseline: the same change PUT straight to the source's control endpoint (no DSN hop).
The work analysis' time to the same revision is reported too (``work_stream_round_trip``: what a
round trip costs when it waits behind the lossless backlog). The floor is the frame interval. A
second part drives a :class:`beamhub.widgets.liveview.LiveView` at 120 Hz in a kernel behind a real
jupyter_server and counts its iopub traffic and the server's rate-limit warnings, against an
unthrottled baseline (``bench/liveview.py``).

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
    """StreamConsumer + Analyzer on a thread; remembers when each source revision was analysed.

    ``monitor=False``: the channel's analysis on the work face, every frame in order (lossless:
    nothing is skipped here). ``monitor=True``: the steering feedback on the monitor face, which
    reads the freshest frame (:meth:`StreamConsumer.receive_latest`, older ones skipped and counted)
    and analyses it when it carries a steering revision not analysed yet, or when the last analysed
    frame is older than ``1 / feedback_hz`` (what a live view needs); other fresh frames are
    skipped too, so the feedback never competes with the work analysis for every frame.
    """

    def __init__(
        self,
        stack: Any,
        token: str,
        hwm: int = 16,
        *,
        monitor: bool = False,
        feedback_hz: float = 10.0,
    ) -> None:
        from beamhub.streaming.analysis import Analyzer
        from beamhub.streaming.consumer import StreamConsumer

        self.consumer = StreamConsumer.from_dsn(
            stack.dsn_url, stack.channel_id, token, exclusive=not monitor, monitor=monitor, hwm=hwm
        )
        self.monitor = monitor
        self.feedback_period_s = 1.0 / feedback_hz
        self.analyzer = Analyzer()
        self.frames = 0  # analysed
        self.received = 0  # taken from the socket and not skipped as stale (monitor: + fresh)
        self.skipped_fresh = 0  # monitor: fresh frames not analysed (no new rev, view is recent)
        self.max_rev = -1
        self.rev_seen: dict[int, float] = {}  # rev -> perf_counter when first analysed
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steer-analysis", daemon=True)
        self._thread.start()

    @property
    def skipped_stale(self) -> int:
        return self.consumer.skipped_stale

    def _run(self) -> None:
        last_analysed = 0.0
        try:
            while not self._stop.is_set():
                if self.monitor:
                    frame = self.consumer.receive_latest(timeout=0.1)
                else:
                    frame = self.consumer.receive(timeout=0.1)
                if frame is None:
                    continue
                self.received += 1
                if (
                    self.monitor
                    and frame.header.rev <= self.max_rev
                    and time.perf_counter() - last_analysed < self.feedback_period_s
                ):
                    self.skipped_fresh += 1
                    continue
                result = self.analyzer.analyse(frame)
                last_analysed = now = time.perf_counter()
                with self._cond:
                    self.frames += 1
                    for rev in range(self.max_rev + 1, result.source_rev + 1):
                        self.rev_seen[rev] = now
                    self.max_rev = max(self.max_rev, result.source_rev)
                    self._cond.notify_all()
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
    """Round trips timed on the steering feedback (the freshest frames), and the same changes as
    seen by the work analysis (every frame in order, behind any backlog)."""

    def __init__(self) -> None:
        self.via: dict[str, list[float]] = {"dsn": [], "direct": []}
        self.work: dict[str, list[float]] = {"dsn": [], "direct": []}
        self.http: dict[str, list[float]] = {"dsn": [], "direct": []}
        self.timeouts = 0
        self.work_timeouts = 0
        self._sent: list[tuple[str, int, float]] = []  # (kind, rev, t0) for the work loop

    def run(
        self,
        feedback: AnalysisLoop,
        stack: Any,
        token: str,
        samples: int,
        rng: random.Random,
    ) -> None:
        """``samples`` changes through the DSN interleaved with as many direct ones."""
        relay = f"{stack.dsn_url}/api/channels/{stack.channel_id}/steer/params/sample_position_um"
        direct = f"{stack.control_url}/params/sample_position_um"
        for i in range(2 * samples):
            kind = "dsn" if i % 2 == 0 else "direct"
            time.sleep(rng.uniform(0.01, 0.04))  # decorrelate from the frame clock
            t0 = time.perf_counter()
            answer = _put(relay if kind == "dsn" else direct, token, float(rng.randrange(-20, 21)))
            t1 = time.perf_counter()
            self._sent.append((kind, answer["rev"], t0))
            if not feedback.wait_rev(answer["rev"], 5.0):
                self.timeouts += 1
                continue
            self.via[kind].append((feedback.rev_seen[answer["rev"]] - t0) * 1e3)
            self.http[kind].append((t1 - t0) * 1e3)

    def collect_work(self, work: AnalysisLoop, timeout: float = 10.0) -> None:
        """The work analysis' round trips for the same changes (it may still be catching up)."""
        if self._sent:
            work.wait_rev(max(rev for _, rev, _ in self._sent), timeout)
        for kind, rev, t0 in self._sent:
            seen = work.rev_seen.get(rev)
            if seen is None:
                self.work_timeouts += 1
            else:
                self.work[kind].append((seen - t0) * 1e3)

    @staticmethod
    def _summary(v: list[float], http: list[float] | None = None) -> dict[str, Any]:
        out = {
            "p50_ms": _pct(v, 50),
            "p99_ms": _pct(v, 99),
            "mean_ms": round(statistics.fmean(v), 2) if v else None,
            "max_ms": round(max(v), 2) if v else None,
            "samples": len(v),
        }
        if http is not None:
            out["http_p50_ms"] = _pct(http, 50)
        return out

    def report(self) -> dict[str, Any]:
        dsn = self._summary(self.via["dsn"], self.http["dsn"])
        base = self._summary(self.via["direct"], self.http["direct"])
        ratio = (
            round(dsn["p50_ms"] / base["p50_ms"], 3) if dsn["p50_ms"] and base["p50_ms"] else None
        )
        return {
            "dsn": dsn,
            "direct": base,
            "dsn_hop_ratio_p50": ratio,
            "timeouts": self.timeouts,
            "work_stream": {
                "dsn": self._summary(self.work["dsn"]),
                "direct": self._summary(self.work["direct"]),
                "not_seen": self.work_timeouts,
            },
        }


def _cpu_s(proc: Any) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def measure_steering(
    samples: int,
    rate_hz: float,
    mode: str | None,
    hwm: int | None = None,
    shape: tuple[int, int] = (1024, 1024),
    feedback_hz: float = 10.0,
) -> dict[str, Any]:
    """Round trips with the channel's analysis attached: a work analysis of every frame
    (lossless, in order) and the steering feedback on the freshest frames, both in this process;
    the detector and the DSN in a child process."""
    import os

    import psutil

    rng = random.Random(1)
    load0 = os.getloadavg()
    phase = _Phase()
    with StackProcess(rate_hz=rate_hz, mode=mode, hwm=hwm, shape=shape) as stack:
        child, me = psutil.Process(stack.process.pid), psutil.Process()
        steer = stack.token()
        work = AnalysisLoop(stack, steer, hwm=hwm or 16)
        feedback = AnalysisLoop(stack, steer, hwm=hwm or 16, monitor=True, feedback_hz=feedback_hz)
        try:
            deadline = time.monotonic() + 20
            while work.frames < 60 and time.monotonic() < deadline:  # warm-up: caches, sockets
                work.wait_rev(0, 0.5)
            _Phase().run(feedback, stack, steer, 2, rng)  # untimed: both HTTP paths warmed up
            src0, child0, me0, t0 = (
                stack.source_stats(),
                _cpu_s(child),
                _cpu_s(me),
                time.monotonic(),
            )
            n_work0, n_fb0, rx_fb0 = work.frames, feedback.frames, feedback.received
            stale0, fresh0 = feedback.skipped_stale, feedback.skipped_fresh
            phase.run(feedback, stack, steer, samples, rng)
            src1, child1, me1, t1 = (
                stack.source_stats(),
                _cpu_s(child),
                _cpu_s(me),
                time.monotonic(),
            )
            n_work1, n_fb1, rx_fb1 = work.frames, feedback.frames, feedback.received
            stale1, fresh1 = feedback.skipped_stale, feedback.skipped_fresh
            phase.collect_work(work)
            work_consumer = work.consumer.stats()
            src_end = stack.source_stats()  # after: covers every gap the work consumer saw
        finally:
            feedback.stop()
            work.stop()
    report = phase.report()
    wall = max(1e-9, t1 - t0)
    dsn = report["dsn"]
    met = (
        dsn["p50_ms"] is not None
        and dsn["p50_ms"] <= TARGET_P50_MS
        and dsn["p99_ms"] <= TARGET_P99_MS
    )
    sent = src1["frames_sent"] - src0["frames_sent"]
    return {
        "p50_ms": dsn["p50_ms"],
        "p99_ms": dsn["p99_ms"],
        "rate_hz": rate_hz,
        "samples": dsn["samples"],
        "mean_ms": dsn["mean_ms"],
        "max_ms": dsn["max_ms"],
        "http_p50_ms": dsn["http_p50_ms"],
        "baseline_direct": report["direct"],
        "dsn_hop_ratio_p50": report["dsn_hop_ratio_p50"],
        "frame_interval_floor_ms": round(1e3 / rate_hz, 2),
        "timeouts": report["timeouts"],
        "work_stream_round_trip": report["work_stream"],
        "frames": {
            "produced_fps": round(
                (sent + src1["dropped_at_source"] - src0["dropped_at_source"]) / wall, 1
            ),
            "arriving_fps": round(sent / wall, 1),
            "dropped_at_source": src1["dropped_at_source"] - src0["dropped_at_source"],
            "work_analysed_fps": round((n_work1 - n_work0) / wall, 1),
            "work_lost": work_consumer["lost"],
            "work_skipped_stale": work_consumer["skipped_stale"],
            "feedback_received_fps": round((rx_fb1 - rx_fb0 + stale1 - stale0) / wall, 1),
            "feedback_analysed_fps": round((n_fb1 - n_fb0) / wall, 1),
            "feedback_skipped_stale": stale1 - stale0,
            "feedback_skipped_fresh": fresh1 - fresh0,
            "feedback_hz": feedback_hz,
        },
        "source": {  # totals since the start (the work consumer's "lost" counts these gaps)
            "frames_sent": src_end["frames_sent"],
            "dropped_at_source": src_end["dropped_at_source"],
        },
        "frame_bytes": shape[0] * shape[1] * 4,
        "dsn_mode": mode or "template default",
        "hwm": hwm,
        "work_frame_latency_p50_ms": work_consumer["latency_p50_ms"],
        "seconds": round(wall, 1),
        "cpu": {
            "analysis_process_cores": round((me1 - me0) / wall, 2),
            "dsn_and_detector_process_cores": round((child1 - child0) / wall, 2),
            "machine_cores": psutil.cpu_count(),
        },
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
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
        "--feedback-hz",
        type=float,
        default=10.0,
        help="the steering feedback also analyses the freshest frame this often without a new "
        "revision (what a live view shows)",
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
    if args.samples < 1:
        parser.error("--samples must be >= 1")
    if not 0 < args.feedback_hz <= 1000:
        parser.error("--feedback-hz must be in (0, 1000]")
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
        out = measure_steering(
            args.samples, args.rate_hz, args.mode, args.hwm, feedback_hz=args.feedback_hz
        )
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
