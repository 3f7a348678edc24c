"""OnDA Monitor's peakfinder8 (``ondamonitor``, optional: ``pip install -e '.[bench]'``) for benchmarks.

OM 23.8 annotates with ``numpy.float_``, which numpy 2 removed; its C extension is fine. So the
benchmark aliases ``numpy.float_`` to ``numpy.float64`` in its own process before importing OM's
``Peakfinder8PeakDetection`` (nothing else in beamhub imports OM).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

__all__ = ["OnDAFinder", "om_unavailable"]


def om_unavailable() -> str | None:
    """None when OM's peakfinder8 can be used here; otherwise why not (for the JSON)."""
    try:
        _import_om()
    except Exception as exc:  # an ImportError, or OM failing at import under this numpy
        return f"ondamonitor not usable ({type(exc).__name__}: {exc}); pip install -e '.[bench]'"
    return None


def _import_om() -> Any:
    if not hasattr(np, "float_"):
        np.float_ = np.float64  # type: ignore[attr-defined]  # OM 23.8's annotations need it
    from om.algorithms.crystallography import Peakfinder8PeakDetection

    return Peakfinder8PeakDetection


class OnDAFinder:
    """OM's peakfinder8 on one monolithic frame, with beamhub's parameters mapped onto OM's.

    ``fast=True`` is OM's fast mode: radial statistics from ``pixels_per_bin`` pixels per radius
    bin drawn at random (OM's default 100), seeded here so runs repeat.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        center: tuple[float, float],
        params: Any,
        *,
        fast: bool,
        pixels_per_bin: int = 100,
        seed: int = 0,
    ) -> None:
        detection = _import_om()
        h, w = shape
        yy, xx = np.indices(shape, dtype=np.float32)
        radius = np.hypot(yy - np.float32(center[0]), xx - np.float32(center[1]))
        config = {
            "max_num_peaks": int(params.max_peaks),
            "adc_threshold": float(params.adc_threshold),
            "minimum_snr": float(params.min_snr),
            "min_pixel_count": int(params.min_pixel_count),
            "max_pixel_count": int(params.max_pixel_count),
            "local_bg_radius": int(params.local_bg_radius),
            "min_res": int(params.min_res),
            "max_res": int(params.max_res),
            "bad_pixel_map_filename": None,
            "bad_pixel_map_hdf5_path": None,
            "fast_mode": fast,
            "number_of_pixel_per_bin_in_radial_statistics": pixels_per_bin,
        }
        state = random.getstate()
        random.seed(seed)  # OM draws its fast-mode sample with the random module
        try:
            self._finder = detection(
                radius_pixel_map=radius.astype(np.float32),
                layout_info={"asic_nx": w, "asic_ny": h, "nasics_x": 1, "nasics_y": 1},
                crystallography_parameters=config,
            )
        finally:
            random.setstate(state)

    def find(self, frame: np.ndarray) -> np.ndarray:
        """Peaks as rows ``(y, x, intensity)`` (OM's ``ss``, ``fs``, integrated intensity)."""
        found = self._finder.find_peaks(data=frame)
        if not found["num_peaks"]:
            return np.zeros((0, 3))
        return np.column_stack([found["ss"], found["fs"], found["intensity"]]).astype(np.float64)
