"""A simulated serial-crystallography detector whose true Bragg peak positions travel with frames.

Frames are a diffuse background with a solvent (water) ring and pixel noise; on a steerable fraction
of frames (the "hits") Bragg peaks of a lattice appear as small Gaussian spots. A peak of a
reflection with scattering angle 2θ sits at radius ``r_px = D · tan(2θ) / pixel_size`` from the beam
centre, so moving the detector (``detector_distance_mm``) moves every peak radially; moving the
sample out of the crystal jet (``sample_position_um``) lowers the hit rate.

Speed: drawing 10⁶ Gaussian randoms per frame cannot keep 120 Hz on a shared 2-core machine, so a
small bank of unit-noise images (a few frames, slightly larger than the detector) is drawn once;
each frame takes a random bank image at a random offset, scales it by the per-pixel noise level,
adds the background and adds its peaks as small patches. Every frame is a fresh array (the runner
sends it zero-copy) and every hit has freshly drawn peaks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from beamhub.streaming.params import ParamSet, ParamSpec

__all__ = [
    "SIM_PARAMS",
    "SimulatedDetector",
    "effective_hit_fraction",
    "follows_jet_model",
    "frames_to_tell",
    "jet_tolerance",
    "lattice_two_theta",
]

#: Jet centre and width (µm) for the sample-position model of a liquid crystal jet.
JET_CENTRE_UM = 0.0
JET_WIDTH_UM = 50.0
#: Geometry defaults: ePix10k-like 100 µm pixels, 9.5 keV photons, a 40 Å cubic cell.
PIXEL_SIZE_UM = 100.0
WAVELENGTH_A = 1.3
CELL_A = 40.0
#: Water ring at d ≈ 3.1 Å.
WATER_D_A = 3.1
READ_NOISE = 2.0
PATCH_RADIUS = 4  # a 9x9 patch holds a sigma <= 1.5 px Gaussian to 2.7 sigma
MIN_SEPARATION_PX = 10.0
BEAMSTOP_RADIUS_PX = 20.0
EDGE_MARGIN_PX = PATCH_RADIUS + 2

SIM_PARAMS = (
    ParamSpec(
        "rate_hz",
        "float",
        120.0,
        "frames per second the detector sends",
        "Hz",
        min=0.1,
        max=1000.0,
        step=0.1,
    ),
    ParamSpec(
        "hit_fraction",
        "float",
        0.3,
        "fraction of frames with a crystal in the beam when the jet is centred",
        "",
        min=0.0,
        max=1.0,
        step=0.01,
    ),
    ParamSpec(
        "beam_intensity",
        "float",
        1.0,
        "X-ray pulse intensity relative to nominal; scales background and peaks",
        "rel.",
        min=0.0,
        max=10.0,
        step=0.1,
    ),
    ParamSpec(
        "detector_distance_mm",
        "float",
        100.0,
        "sample-to-detector distance; peaks and the water ring move radially with it",
        "mm",
        min=50.0,
        max=300.0,
        step=0.5,
    ),
    ParamSpec(
        "sample_position_um",
        "float",
        0.0,
        f"jet position across the beam; hit rate falls off as exp(-(pos/{JET_WIDTH_UM:g})^2)",
        "um",
        min=-500.0,
        max=500.0,
        step=1.0,
    ),
    ParamSpec(
        "peaks_per_hit",
        "int",
        30,
        "mean number of Bragg peaks on a hit frame",
        "",
        min=1,
        max=200,
        step=1,
    ),
)


def effective_hit_fraction(hit_fraction: float, sample_position_um: float) -> float:
    """The hit fraction seen when the jet is ``sample_position_um`` away from the beam."""
    return hit_fraction * math.exp(-(((sample_position_um - JET_CENTRE_UM) / JET_WIDTH_UM) ** 2))


def jet_tolerance(expected: float, n: int, sigmas: float = 4.0) -> float:
    """How far a hit rate counted over ``n`` frames may lie from ``expected`` by chance alone:
    ``sigmas`` binomial standard deviations (for a rate near 0, as if one hit in ``n``)."""
    return sigmas * math.sqrt(max(expected * (1 - expected), 1 / n) / n)


def frames_to_tell(hit_fraction: float, moved_um: float, *, at_least: int = 100) -> int:
    """Frames to count at each position so that the jet in the beam and the jet ``moved_um``
    away cannot be mistaken for each other: their tolerances do not overlap. Without that, a
    check of the rates against the model passes whether or not the jet moved."""
    inside = effective_hit_fraction(hit_fraction, JET_CENTRE_UM)
    outside = effective_hit_fraction(hit_fraction, moved_um)
    n = at_least
    while jet_tolerance(inside, n) + jet_tolerance(outside, n) >= inside - outside:
        n = math.ceil(n * 1.25)
        if n > 100_000:
            raise ValueError(
                f"hit_fraction {hit_fraction} with the jet moved {moved_um} µm: the rates are too "
                "close to tell apart; raise hit_fraction or move the jet further"
            )
    return n


def follows_jet_model(rates: list[tuple[float, float]], hit_fraction: float, n: int) -> bool:
    """True when every ``(sample_position_um, hit rate over n frames)`` lies within
    :func:`jet_tolerance` of the jet model's hit fraction at that position."""
    return all(
        abs(rate - effective_hit_fraction(hit_fraction, x))
        <= jet_tolerance(effective_hit_fraction(hit_fraction, x), n)
        for x, rate in rates
    )


def lattice_two_theta(
    cell_a: float = CELL_A, wavelength_a: float = WAVELENGTH_A, max_two_theta_deg: float = 60.0
) -> np.ndarray:
    """Distinct scattering angles (radians) of a primitive cubic lattice, ascending."""
    n_max = int((2 * cell_a * math.sin(math.radians(max_two_theta_deg) / 2) / wavelength_a) ** 2)
    squares = set()
    h_max = math.isqrt(n_max) + 1
    for h in range(h_max):
        for k in range(h + 1):
            for m in range(k + 1):
                n = h * h + k * k + m * m
                if 0 < n <= n_max:
                    squares.add(n)
    d = cell_a / np.sqrt(np.array(sorted(squares), dtype=np.float64))
    return 2 * np.arcsin(wavelength_a / (2 * d))


class SimulatedDetector:
    """Makes frames and their truth metadata; the source runner paces and sends them."""

    kind = "sim"

    def __init__(
        self,
        shape: tuple[int, int] = (1024, 1024),
        *,
        seed: int | None = None,
        bank_size: int = 4,
        bank_pad: int = 64,
        pixel_size_um: float = PIXEL_SIZE_UM,
        **params: Any,
    ) -> None:
        if len(shape) != 2 or min(shape) < 4 * EDGE_MARGIN_PX:
            raise ValueError(f"shape must be 2-D and at least {4 * EDGE_MARGIN_PX} px, got {shape}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.params = ParamSet(SIM_PARAMS, params)
        self.pixel_size_um = float(pixel_size_um)
        self.rng = np.random.default_rng(seed)
        h, w = self.shape
        self.beam_center = (h / 2 + 2.5, w / 2 - 3.5)
        yy, xx = np.indices(self.shape, dtype=np.float32)
        self._radius = np.hypot(
            yy - np.float32(self.beam_center[0]), xx - np.float32(self.beam_center[1])
        ).astype(np.float32)
        self._two_theta = lattice_two_theta()
        self._pad = int(bank_pad)
        # the unit-noise bank: drawn once, reused at random offsets
        self._bank = self.rng.standard_normal(
            (bank_size, h + self._pad, w + self._pad), dtype=np.float32
        )
        self._patch = np.arange(-PATCH_RADIUS, PATCH_RADIUS + 1, dtype=np.float32)
        self._rebuild_background()

    # -- parameters -------------------------------------------------------------------------
    def set_param(self, name: str, value: Any) -> Any:
        """Validate, store and apply one parameter; returns the normalised value."""
        value = self.params.set(name, value)
        if name in ("beam_intensity", "detector_distance_mm"):
            self._rebuild_background()
        return value

    def start_run(self) -> None:
        """Nothing to rewind: a simulated run starts from the current parameters."""

    def ring_radius_px(self, distance_mm: float | None = None) -> float:
        distance = self.params["detector_distance_mm"] if distance_mm is None else distance_mm
        two_theta = 2 * math.asin(WAVELENGTH_A / (2 * WATER_D_A))
        return self.radius_px(two_theta, distance)

    def radius_px(self, two_theta: float | np.ndarray, distance_mm: float | None = None) -> Any:
        """Where a reflection of scattering angle ``two_theta`` (radians) lands, in pixels."""
        distance = self.params["detector_distance_mm"] if distance_mm is None else distance_mm
        return distance * 1000.0 * np.tan(two_theta) / self.pixel_size_um

    def _rebuild_background(self) -> None:
        intensity = self.params["beam_intensity"]
        r = self._radius
        ring_r = np.float32(self.ring_radius_px())
        ring_w = np.float32(max(6.0, 0.06 * float(ring_r)))
        diffuse = 8.0 / (1.0 + (r / np.float32(250.0)) ** 2)
        ring = 35.0 * np.exp(-(((r - ring_r) / ring_w) ** 2))
        self._background = (np.float32(intensity) * (diffuse + ring)).astype(np.float32)
        self._sigma = np.sqrt(self._background + np.float32(READ_NOISE**2)).astype(np.float32)

    # -- frames -----------------------------------------------------------------------------
    def generate(self) -> tuple[np.ndarray, dict[str, Any]]:
        """One fresh frame and its truth metadata (``hit``, ``peaks`` as ``[y, x, height]``)."""
        h, w = self.shape
        rng = self.rng
        k = int(rng.integers(self._bank.shape[0]))
        oy, ox = (int(v) for v in rng.integers(self._pad + 1, size=2))
        frame = np.empty(self.shape, dtype=np.float32)
        np.multiply(self._bank[k, oy : oy + h, ox : ox + w], self._sigma, out=frame)
        frame += self._background
        p = self.params
        fraction = effective_hit_fraction(p["hit_fraction"], p["sample_position_um"])
        hit = bool(rng.random() < fraction)
        peaks: list[list[float]] = []
        angles: list[float] = []
        if hit:
            peaks, angles = self._add_peaks(frame)
        meta = {
            "hit": hit,
            "peaks": peaks,
            "two_theta_deg": angles,
            "beam_center": [round(c, 2) for c in self.beam_center],
            "pixel_size_um": self.pixel_size_um,
            "wavelength_A": WAVELENGTH_A,
            "effective_hit_fraction": round(fraction, 6),
        }
        return frame, meta

    def _add_peaks(self, frame: np.ndarray) -> tuple[list[list[float]], list[float]]:
        h, w = self.shape
        rng = self.rng
        cy, cx = self.beam_center
        radii = self.radius_px(self._two_theta)
        r_max = math.hypot(max(cy, h - cy), max(cx, w - cx))
        usable = np.flatnonzero((radii > BEAMSTOP_RADIUS_PX) & (radii < r_max))
        if usable.size == 0:
            return [], []
        target = max(1, int(rng.poisson(self.params["peaks_per_hit"])))
        intensity = self.params["beam_intensity"]
        peaks: list[list[float]] = []
        angles: list[float] = []
        placed = np.empty((target, 2))
        for _ in range(20 * target):
            if len(peaks) >= target:
                break
            i = int(usable[rng.integers(usable.size)])
            phi = rng.uniform(0, 2 * math.pi)
            y = cy + float(radii[i]) * math.sin(phi)
            x = cx + float(radii[i]) * math.cos(phi)
            m = EDGE_MARGIN_PX
            if not (m <= y < h - m and m <= x < w - m):
                continue
            n = len(peaks)
            if n and np.hypot(placed[:n, 0] - y, placed[:n, 1] - x).min() < MIN_SEPARATION_PX:
                continue
            height = float(np.exp(rng.uniform(math.log(150.0), math.log(1500.0)))) * intensity
            sigma = rng.uniform(1.0, 1.5)
            self._stamp(frame, y, x, height, sigma)
            placed[n] = (y, x)
            peaks.append([round(y, 3), round(x, 3), round(height, 2)])
            angles.append(round(math.degrees(float(self._two_theta[i])), 5))
        return peaks, angles

    def _stamp(self, frame: np.ndarray, y: float, x: float, height: float, sigma: float) -> None:
        iy, ix = round(y), round(x)
        gy = np.exp(-((self._patch + np.float32(iy - y)) ** 2) / np.float32(2 * sigma * sigma))
        gx = np.exp(-((self._patch + np.float32(ix - x)) ** 2) / np.float32(2 * sigma * sigma))
        r = PATCH_RADIUS
        frame[iy - r : iy + r + 1, ix - r : ix + r + 1] += np.float32(height) * np.outer(gy, gx)


def _drain(queue: Any, stop: Any) -> None:
    """A receiver in its own process, so that the measured process holds only the source."""
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    queue.put(pull.bind_to_random_port("tcp://127.0.0.1"))
    received = 0
    while not stop.is_set():
        if pull.poll(100):
            pull.recv_multipart(copy=False)
            received += 1
    pull.close(linger=0)
    ctx.term()
    queue.put(received)


def measure(
    seconds: float = 10.0, rate_hz: float = 120.0, shape: tuple[int, int] = (1024, 1024)
) -> dict[str, Any]:
    """Generation speed, then this process's CPU share streaming at ``rate_hz`` over loopback TCP."""
    import multiprocessing
    import time

    import psutil

    from beamhub.streaming.source import SourceRunner

    det = SimulatedDetector(shape, seed=0, hit_fraction=0.3)
    n = 300
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(n):
        det.generate()
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    result: dict[str, Any] = {
        "shape": list(shape),
        "generate_fps": round(n / wall, 1),
        "generate_cpu_ms": round(1e3 * cpu / n, 3),
    }

    mp = multiprocessing.get_context("spawn")
    queue, stop = mp.Queue(), mp.Event()
    child = mp.Process(target=_drain, args=(queue, stop), daemon=True)
    child.start()
    det.set_param("rate_hz", rate_hz)
    runner = SourceRunner(det, stream="measure", connect=f"tcp://127.0.0.1:{queue.get(timeout=60)}")
    runner.start()
    process = psutil.Process()
    try:
        sender = runner._thread.native_id
        before = {t.id: t.user_time + t.system_time for t in process.threads()}
        runner.start_run()
        stop.wait(seconds)  # the measurement window (nothing sets it early)
        after = {t.id: t.user_time + t.system_time for t in process.threads()}
    finally:
        runner.stop()
        stop.set()
        received = queue.get(timeout=30)
        child.join(30)
    busy = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    result.update(
        rate_hz=rate_hz,
        seconds=seconds,
        frames_sent=runner.frames_sent,
        frames_received=received,
        dropped_at_source=runner.dropped_at_source,
        sender_thread_cpu_share=round(busy.get(sender, 0.0) / seconds, 3),
        source_process_cpu_share=round(sum(busy.values()) / seconds, 3),
    )
    return result


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(measure(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0)))
