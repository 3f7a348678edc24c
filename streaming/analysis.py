"""Live per-frame analysis (peaks, hit, radial profile) with live-swappable parameters and aggregates.

:class:`Analyzer` turns one :class:`~beamhub.streaming.wire.Frame` into a small :class:`FrameResult`; its
parameters are swapped atomically by :meth:`Analyzer.set_params` and apply from the next frame
(a frame in progress keeps the set it started with). :class:`RunningStats` folds results — from one
process or from many Dask workers, in any order — into a running hit rate, peaks per frame, a radial
profile, a virtual powder pattern, latency and lost/duplicate frame counts. :func:`analyse_stream`
is the worker loop over a :class:`beamhub.streaming.consumer.StreamConsumer` (or any iterable of frames).
The Dask side lives in ``streaming.analysis_dask``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from beamhub.streaming.peakfinder import PEAK_COLUMNS, PeakFinderParams, find_peaks
from beamhub.streaming.wire import Frame

__all__ = ["Analyzer", "FrameResult", "RunningStats", "analyse_stream"]


@dataclass(frozen=True, eq=False)
class FrameResult:
    """What one analysed frame leaves behind: a few hundred bytes plus an optional profile."""

    stream: str
    seq: int
    run: int
    source_rev: int  # the detector's steering revision stamped in the header
    params_rev: int  # the analysis-parameter revision used for this frame
    shape: tuple[int, ...]
    hit: bool
    n_peaks: int
    peaks: np.ndarray  # (n, len(PEAK_COLUMNS)) float32, brightest first
    radial_profile: np.ndarray | None  # azimuthal mean per 1-px radius bin
    latency_s: float  # producer stamp -> analysed
    analysis_s: float  # time spent in the peak finder
    worker: str = ""
    error: str | None = None  # a frame that could not be analysed still leaves a result

    def to_dict(self, *, profile: bool = False) -> dict[str, Any]:
        """JSON-ready form (peaks as ``[y, x, intensity, snr, npix]`` rows)."""
        out = {
            "stream": self.stream,
            "seq": self.seq,
            "run": self.run,
            "source_rev": self.source_rev,
            "params_rev": self.params_rev,
            "hit": self.hit,
            "n_peaks": self.n_peaks,
            "peaks": np.round(self.peaks.astype(np.float64), 3).tolist(),
            "latency_ms": round(self.latency_s * 1e3, 3),
            "analysis_ms": round(self.analysis_s * 1e3, 3),
            "worker": self.worker,
            "error": self.error,
        }
        if profile and self.radial_profile is not None:
            out["radial_profile"] = np.nan_to_num(self.radial_profile).round(3).tolist()
        return out

    def without_profile(self) -> FrameResult:
        """A copy without the radial profile (for shipping; send batch sums instead)."""
        return replace(self, radial_profile=None)


class Analyzer:
    """Peak finding with parameters that can change while frames flow (thread-safe swap).

    ``center`` is the beam centre (y, x); if ``None``, each frame's ``meta["beam_center"]`` is used
    when present, else the image centre.
    """

    def __init__(
        self,
        params: dict[str, Any] | PeakFinderParams | None = None,
        *,
        rev: int = 0,
        center: tuple[float, float] | None = None,
        worker: str = "",
    ) -> None:
        if not isinstance(params, PeakFinderParams):
            params = PeakFinderParams.create(params)
        self._lock = threading.Lock()
        self._current = (params, int(rev))
        self.center = center
        self.worker = worker

    @property
    def params(self) -> PeakFinderParams:
        return self._current[0]

    @property
    def rev(self) -> int:
        return self._current[1]

    def set_params(
        self, changes: dict[str, Any] | None = None, *, rev: int | None = None, **kwargs: Any
    ) -> int:
        """Validate and swap in new parameters; returns the new revision.

        Invalid values raise :class:`beamhub.streaming.params.ParamError` naming the field and nothing
        changes. ``rev`` lets a coordinator impose one revision number on every worker.
        """
        with self._lock:
            params, current_rev = self._current
            new = params.replace(**{**(changes or {}), **kwargs})
            new_rev = current_rev + 1 if rev is None else int(rev)
            self._current = (new, new_rev)
            return new_rev

    def analyse(self, frame: Frame) -> FrameResult:
        params, rev = self._current  # one consistent (params, rev) pair for the whole frame
        header = frame.header
        t0 = time.perf_counter()
        try:
            center = self.center or header.meta.get("beam_center")
            result = find_peaks(
                frame.data, params, center=tuple(center) if center is not None else None
            )
        except (ValueError, TypeError) as exc:
            return FrameResult(
                header.stream,
                header.seq,
                header.run,
                header.rev,
                rev,
                tuple(header.shape),
                False,
                0,
                _NO_PEAKS,
                None,
                frame.latency_s,
                time.perf_counter() - t0,
                self.worker,
                error=f"{type(exc).__name__}: {exc}",
            )
        return FrameResult(
            stream=header.stream,
            seq=header.seq,
            run=header.run,
            source_rev=header.rev,
            params_rev=rev,
            shape=tuple(header.shape),
            hit=result.hit,
            n_peaks=result.n_peaks,
            peaks=result.peaks,
            radial_profile=result.radial_profile,
            latency_s=frame.latency_s,
            analysis_s=time.perf_counter() - t0,
            worker=self.worker,
        )


_NO_PEAKS = np.zeros((0, len(PEAK_COLUMNS)), dtype=np.float32)


def _with_idle_ticks(consumer: Any, idle_timeout_s: float) -> Iterator[Frame | None]:
    """Frames, with ``None`` after ``idle_timeout_s`` without one when the consumer can wait."""
    receive = getattr(consumer, "receive", None)
    if receive is None:
        yield from consumer
        return
    while not getattr(consumer, "_closed", False):
        yield receive(timeout=idle_timeout_s)


def analyse_stream(
    consumer: Any,
    analyzer: Analyzer,
    on_result: Callable[[FrameResult], Any],
    *,
    stop: threading.Event | None = None,
    max_frames: int | None = None,
    on_idle: Callable[[], Any] | None = None,
    idle_timeout_s: float = 0.1,
) -> int:
    """Analyse frames from ``consumer`` until it ends, ``stop`` is set or ``max_frames`` are done.

    ``consumer`` is a :class:`beamhub.streaming.consumer.StreamConsumer` (its ``receive(timeout)`` gives
    idle ticks every ``idle_timeout_s``, so ``stop`` is noticed without frames and ``on_idle``
    runs) or any iterable of frames (``None`` items count as idle ticks). Returns the number of
    frames analysed.
    """
    done = 0
    for frame in _with_idle_ticks(consumer, idle_timeout_s):
        if stop is not None and stop.is_set():
            break
        if frame is None:
            if on_idle is not None:
                on_idle()
            continue
        on_result(analyzer.analyse(frame))
        done += 1
        if max_frames is not None and done >= max_frames:
            break
    return done


@dataclass
class _SeqTracker:
    """Seen/lost/duplicate bookkeeping for one (stream, run), with bounded memory."""

    floor: int = -1  # every seq <= floor is accounted for (seen or counted lost)
    first: int | None = None
    pending: set[int] = field(default_factory=set)
    below: set[int] = field(default_factory=set)  # seen before ``first`` (bounded by the gap)
    seen: int = 0
    duplicates: int = 0
    lost: int = 0
    max_pending: int = 100_000

    def add(self, seq: int) -> bool:
        """Record ``seq``; False when it was seen (or declared lost) before."""
        if self.first is None:
            self.first, self.floor = seq, seq - 1
        if seq < self.first:  # results from several workers arrive out of order
            if seq in self.below:
                self.duplicates += 1
                return False
            self.below.add(seq)
            self.seen += 1
            return True
        if seq <= self.floor or seq in self.pending:
            self.duplicates += 1
            return False
        self.seen += 1
        self.pending.add(seq)
        while self.floor + 1 in self.pending:
            self.floor += 1
            self.pending.discard(self.floor)
        if len(self.pending) > self.max_pending:  # give up on the oldest gap: count it lost
            low = min(self.pending)
            self.lost += low - self.floor - 1
            self.floor = low - 1
            self.pending.discard(low)
            self.seen -= 1
            self.add(low)
        return True

    def missing(self) -> int:
        """Frames lost so far: declared gaps plus holes below the highest seq seen."""
        top = max(self.pending) if self.pending else self.floor
        early = (self.first - min(self.below) - len(self.below)) if self.below else 0
        return self.lost + early + (top - self.floor) - len(self.pending)


class RunningStats:
    """Aggregates of :class:`FrameResult` streams: order-independent, bounded memory."""

    def __init__(self, window: int = 100, powder_bin: int = 8) -> None:
        if window < 1 or powder_bin < 1:
            raise ValueError("window and powder_bin must be >= 1")
        self.window = window
        self.powder_bin = powder_bin
        self.reset()

    def reset(self) -> None:
        self.frames = 0
        self.hits = 0
        self.errors = 0
        self.peaks_total = 0
        self.per_worker: Counter[str] = Counter()
        self.last_params_rev = 0
        self._hits: deque[bool] = deque(maxlen=self.window)
        self._peaks: deque[int] = deque(maxlen=self.window)
        self._latency: deque[float] = deque(maxlen=self.window)
        self._profiles: deque[tuple[np.ndarray, int]] = deque()
        self._profile_sum: np.ndarray | None = None
        self._profile_n = 0
        self.powder: np.ndarray | None = None
        self._seq: dict[tuple[str, int], _SeqTracker] = {}

    def add(self, result: FrameResult) -> bool:
        """Fold one result; a duplicate (same stream, run, seq) is only counted. True if new."""
        tracker = self._seq.setdefault((result.stream, result.run), _SeqTracker())
        if not tracker.add(result.seq):
            return False
        self.frames += 1
        self.per_worker[result.worker] += 1
        if result.error is not None:
            self.errors += 1
            return True
        self.hits += result.hit
        self.peaks_total += result.n_peaks
        self.last_params_rev = max(self.last_params_rev, result.params_rev)
        self._hits.append(result.hit)
        self._peaks.append(result.n_peaks)
        self._latency.append(result.latency_s)
        if result.radial_profile is not None:
            self.add_profile(result.radial_profile, 1)
        if result.n_peaks and len(result.shape) == 2:
            self._add_powder(result.shape, result.peaks)
        return True

    def add_profile(self, profile_sum: np.ndarray, n: int) -> None:
        """Fold the sum of ``n`` frames' radial profiles (a worker batch ships these)."""
        profile_sum = np.nan_to_num(np.asarray(profile_sum, dtype=np.float64))
        if self._profile_sum is None or self._profile_sum.shape != profile_sum.shape:
            self._profiles.clear()
            self._profile_sum, self._profile_n = np.zeros_like(profile_sum), 0
        self._profiles.append((profile_sum, n))
        self._profile_sum += profile_sum
        self._profile_n += n
        while len(self._profiles) > 1 and self._profile_n - self._profiles[0][1] >= self.window:
            old, k = self._profiles.popleft()
            self._profile_sum -= old
            self._profile_n -= k

    def _add_powder(self, shape: tuple[int, ...], peaks: np.ndarray) -> None:
        b = self.powder_bin
        grid = (-(-shape[0] // b), -(-shape[1] // b))
        if self.powder is None or self.powder.shape != grid:
            self.powder = np.zeros(grid, dtype=np.int64)
        iy = np.clip((peaks[:, 0] // b).astype(np.int64), 0, grid[0] - 1)
        ix = np.clip((peaks[:, 1] // b).astype(np.int64), 0, grid[1] - 1)
        np.add.at(self.powder, (iy, ix), 1)

    @property
    def hit_rate(self) -> float:
        """Fraction of hits among the last ``window`` frames (0 before any frame)."""
        return sum(self._hits) / len(self._hits) if self._hits else 0.0

    @property
    def radial_profile(self) -> np.ndarray | None:
        if self._profile_sum is None or self._profile_n == 0:
            return None
        return (self._profile_sum / self._profile_n).astype(np.float32)

    def lost(self) -> int:
        return sum(t.missing() for t in self._seq.values())

    def duplicates(self) -> int:
        return sum(t.duplicates for t in self._seq.values())

    def snapshot(self) -> dict[str, Any]:
        """Plain numbers (and two arrays) for plots, dashboards and tests."""
        lat = sorted(self._latency)
        return {
            "frames": self.frames,
            "hits": self.hits,
            "errors": self.errors,
            "hit_rate": self.hit_rate,
            "hit_rate_total": self.hits / self.frames if self.frames else 0.0,
            "peaks_per_frame": float(np.mean(self._peaks)) if self._peaks else 0.0,
            "latency_p50_ms": lat[len(lat) // 2] * 1e3 if lat else None,
            "lost": self.lost(),
            "duplicates": self.duplicates(),
            "params_rev": self.last_params_rev,
            "per_worker": dict(self.per_worker),
            "radial_profile": self.radial_profile,
            "powder": self.powder,
        }
