"""Live figures `beamhub up` prints: a monitor consumer of the detector channel with peak finding.

A thread subscribes to the channel's monitor fan-out (:class:`beamhub.streaming.consumer.StreamConsumer`,
``monitor=True``, endpoints looked up on the DSN's control API) and prints one compact line every
``detector.print_every_s`` seconds::

    live  detector p-1001: 1234 frames  10.0 Hz  0.04 GB/s  lost 0  latency p50 3 ms
          hit rate 0.31  peaks/hit 28  (dsn drops: no_consumer 0; work consumers 0)

It never stalls anything: the monitor PUB drops for it if it falls behind (that shows as ``lost``),
and the peak finder (:class:`beamhub.streaming.analysis.Analyzer`) runs on at most
:data:`ANALYSIS_CPU_FRACTION` of the thread's wall time — frames beyond that budget are counted but
not analysed (the line says how many were). Frames, rate and latency are over every frame seen;
hit rate and peaks/hit over the frames analysed in the last interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["ANALYSIS_CPU_FRACTION", "LiveFigures", "format_line"]

log = logging.getLogger("beamhub.up.live")

#: Largest share of wall time the printer's peak finding may take (it shares the machine).
ANALYSIS_CPU_FRACTION = 0.25
#: How long one receive waits, so a stop request is noticed quickly.
POLL_S = 0.2


def format_line(label: str, w: dict[str, Any], dsn: dict[str, Any] | None) -> str:
    """One live line from an interval's figures ``w`` and the channel's DSN stats (or None)."""
    hz = f"{w['hz']:.1f} Hz"
    gbs = (
        f"{w['gb_per_s']:.2f} GB/s" if w["gb_per_s"] >= 0.01 else f"{w['gb_per_s'] * 1e3:.2f} MB/s"
    )
    lat = "-" if w["latency_p50_ms"] is None else f"{w['latency_p50_ms']:.0f} ms"
    if w["analysed"]:
        hit = f"hit rate {w['hit_rate']:.2f}"
        per_hit = "-" if w["peaks_per_hit"] is None else f"{w['peaks_per_hit']:.0f}"
        analysis = f"{hit}  peaks/hit {per_hit}"
        if w["analysed"] < w["interval_frames"]:
            analysis += f" (of {w['analysed']}/{w['interval_frames']} frames)"
    else:
        analysis = "hit rate -  peaks/hit -"
    if dsn is None:
        tail = "(dsn stats unavailable)"
    else:
        drops = dsn.get("drops") or {}
        shown = {"no_consumer": drops.get("no_consumer", 0), **drops}
        text = ", ".join(f"{k} {v}" for k, v in shown.items())
        consumers = dsn.get("consumers_connected")
        tail = (
            f"(dsn drops: {text}"
            + ("" if consumers is None else f"; work consumers {consumers}")
            + ")"
        )
    return (
        f"live  {label}: {w['frames']} frames  {hz}  {gbs}  lost {w['lost']}  "
        f"latency p50 {lat}  {analysis}  {tail}"
    )


class LiveFigures:
    """Start with :meth:`start`, stop with :meth:`stop`; prints through ``progress``."""

    def __init__(
        self,
        dsn_url: str,
        channel_id: str,
        token: str,
        label: str,
        *,
        every_s: float = 5.0,
        analysis: dict[str, Any] | None = None,
        dsn_stats: Callable[[], dict[str, Any]] | None = None,
        progress: Callable[[str], None] = print,
    ) -> None:
        if every_s <= 0:
            raise ValueError(f"every_s: {every_s!r} must be > 0 (leave the printer off instead)")
        self.dsn_url = dsn_url
        self.channel_id = channel_id
        self.label = label
        self.every_s = every_s
        self.analysis = dict(analysis or {})
        self.dsn_stats = dsn_stats
        self.progress = progress
        self.lines: list[str] = []
        self._token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="beamhub-up-live", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to finish and wait for it (its consumer is closed on the way out)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        from beamhub.streaming.analysis import Analyzer
        from beamhub.streaming.consumer import ChannelLookupError, StreamConsumer

        try:
            consumer = StreamConsumer.from_dsn(
                self.dsn_url,
                self.channel_id,
                self._token,
                monitor=True,
                hwm=8,
                consumer_id=f"beamhub-up-live-{self.channel_id}",
            )
        except (ChannelLookupError, ValueError) as exc:
            self.progress(f"beamhub up: live figures unavailable: {exc}")
            return
        self._token = ""  # only needed for the lookup
        try:
            self._loop(consumer, Analyzer(self.analysis, worker="beamhub-up"))
        except Exception:
            log.exception("live figures stopped")
            self.progress("beamhub up: live figures stopped after an error (see the log)")
        finally:
            consumer.close()

    def _loop(self, consumer: Any, analyzer: Any) -> None:
        started = time.monotonic()
        busy = 0.0  # seconds spent in the peak finder
        next_print = started + self.every_s
        last = (started, 0, 0)  # (t, frames, bytes) at the previous line
        latencies: deque[float] = deque(maxlen=10_000)
        results: list[tuple[bool, int]] = []  # (hit, n_peaks) of frames analysed this interval
        while not self._stop.is_set():
            frame = consumer.receive(timeout=POLL_S)
            now = time.monotonic()
            if frame is not None:
                latencies.append(frame.latency_s * 1e3)
                if busy <= ANALYSIS_CPU_FRACTION * (now - started):
                    t0 = time.perf_counter()
                    result = analyzer.analyse(frame)
                    busy += time.perf_counter() - t0
                    if result.error is None:
                        results.append((result.hit, result.n_peaks))
            if now < next_print:
                continue
            t0, frames0, bytes0 = last
            span = max(1e-9, now - t0)
            hits = [n for hit, n in results if hit]
            window = {
                "frames": consumer.frames,
                "interval_frames": consumer.frames - frames0,
                "hz": (consumer.frames - frames0) / span,
                "gb_per_s": (consumer.bytes - bytes0) / span / 1e9,
                "lost": consumer.lost,
                "latency_p50_ms": _median(latencies),
                "analysed": len(results),
                "hit_rate": len(hits) / len(results) if results else 0.0,
                "peaks_per_hit": sum(hits) / len(hits) if hits else None,
            }
            line = format_line(self.label, window, self._dsn())
            self.lines.append(line)
            del self.lines[:-100]
            self.progress(line)
            last = (now, consumer.frames, consumer.bytes)
            latencies.clear()
            results.clear()
            next_print = now + self.every_s

    def _dsn(self) -> dict[str, Any] | None:
        if self.dsn_stats is None:
            return None
        try:
            return self.dsn_stats()
        except (KeyError, RuntimeError) as exc:  # channel gone, or counters changed mid-read
            log.debug("no DSN stats for the live line: %s", exc)
            return None


def _median(values: deque[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
