"""What the live views (notebook LiveView, shared dashboard) show beyond the numbers.

* :func:`viewport_tile` — the part of a full-resolution detector image a viewer's zoom shows,
  block-reduced (max, so Bragg peaks survive) to the screen's pixels: zoomed in far enough, every
  detector pixel arrives. Sent as raw float32 (binary, never JSON lists).
* :func:`auto_limits` — contrast limits a person would pick (1st..99.9th percentile).
* :class:`FrameLog` — per-frame hit/peaks figures of the frames a view analysed, the runs they
  belong to (from the frame headers' ``run``), and their export as CSV or HDF5.
* :func:`steering_events` — the source's change log (parameter changes, run starts/stops, with
  who made them) as labelled markers for the hit-rate and peaks plots.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "PALETTES",
    "FrameLog",
    "Tile",
    "auto_limits",
    "param_text",
    "steering_events",
    "viewport_tile",
]

#: Colour maps a viewer may pick (bokeh's 256-colour palettes), by the name shown.
PALETTE_NAMES = ("Viridis256", "Greys256", "Inferno256", "Magma256", "Cividis256")
#: Smallest / largest screen size (pixels) a tile may be asked for.
TILE_PX = (16, 4096)


def _palettes() -> dict[str, list[str]]:
    import bokeh.palettes as bp

    return {name: list(getattr(bp, name)) for name in PALETTE_NAMES}


PALETTES: dict[str, list[str]] = _palettes()

_UNITS = {"um": "µm", "mm": "mm", "nm": "nm", "deg": "°", "ms": "ms", "Hz": "Hz", "keV": "keV"}


@dataclass(frozen=True)
class Tile:
    """A block-reduced region of an image: ``data`` row ``i`` is image row ``r0 + i*block``."""

    data: np.ndarray  # float32 (rows, cols)
    r0: int
    c0: int
    r1: int  # exclusive
    c1: int
    block: int
    low: float  # automatic contrast limits of this region
    high: float

    def headers(self) -> dict[str, str]:
        """HTTP headers describing the binary body (``X-Tile-*``)."""
        return {
            "X-Tile-Shape": f"{self.data.shape[0]},{self.data.shape[1]}",
            "X-Tile-Box": f"{self.r0},{self.c0},{self.r1},{self.c1}",
            "X-Tile-Block": str(self.block),
            "X-Tile-Auto": f"{self.low:.6g},{self.high:.6g}",
        }


def _number(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} is not a number (pixels)") from None
    if not math.isfinite(out):
        raise ValueError(f"{name}: {value!r} is not a finite number (pixels)")
    return out


def viewport_tile(image: np.ndarray, *, x0: Any, x1: Any, y0: Any, y1: Any, px: Any) -> Tile:
    """The region ``x0..x1`` (columns) by ``y0..y1`` (rows) of ``image``, block-max reduced so
    neither side exceeds ``px`` screen pixels. Raises ValueError naming the bad field."""
    if image.ndim != 2:
        raise ValueError(f"image: {image.ndim}-D; a detector image is 2-D")
    h, w = image.shape
    box = {k: _number(k, v) for k, v in (("x0", x0), ("x1", x1), ("y0", y0), ("y1", y1))}
    size = int(_number("px", px))
    if not TILE_PX[0] <= size <= TILE_PX[1]:
        raise ValueError(f"px: {size} is outside {TILE_PX[0]}..{TILE_PX[1]} screen pixels")
    c0, c1 = sorted((box["x0"], box["x1"]))
    r0, r1 = sorted((box["y0"], box["y1"]))
    c0, r0 = max(0, math.floor(c0)), max(0, math.floor(r0))
    c1, r1 = min(w, math.ceil(c1)), min(h, math.ceil(r1))
    if c1 <= c0 or r1 <= r0:
        raise ValueError(
            f"x0..x1, y0..y1: the viewport {box} is outside the {h}x{w} image; "
            "reset the zoom to see the whole detector"
        )
    region = np.asarray(image[r0:r1, c0:c1], dtype=np.float32)
    block = max(1, math.ceil(max(r1 - r0, c1 - c0) / size))
    if block > 1:
        rows, cols = -(-region.shape[0] // block), -(-region.shape[1] // block)
        if region.shape != (rows * block, cols * block):  # pad the edge blocks with the minimum
            padded = np.full((rows * block, cols * block), np.float32(region.min()), np.float32)
            padded[: region.shape[0], : region.shape[1]] = region
            region = padded
        # two reductions, the first over contiguous memory: ~2x faster than max(axis=(1, 3))
        region = region.reshape(rows * block, cols, block).max(axis=2)
        region = region.reshape(rows, block, cols).max(axis=1)
    low, high = auto_limits(region)
    return Tile(np.ascontiguousarray(region), r0, c0, r1, c1, block, low, high)


def auto_limits(data: np.ndarray) -> tuple[float, float]:
    """Contrast limits from the 1st and 99.9th percentile (a few hot pixels do not wash it out)."""
    flat = np.asarray(data, dtype=np.float32).ravel()
    step = max(1, flat.size // 65536)
    sample = flat[::step]
    sample = sample[np.isfinite(sample)]
    if not sample.size:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(sample, [1.0, 99.9]))
    if high <= low:
        high = low + 1.0
    return low, high


def param_text(name: str, value: Any, units: str = "") -> str:
    """``sample_position_um``, 150, ``um`` → ``sample position = 150 µm``."""
    if not units:
        for suffix in _UNITS:
            if name.endswith(f"_{suffix}"):
                units = suffix
                break
    words = name.removesuffix(f"_{units}") if units else name
    shown = _UNITS.get(units, units)
    if isinstance(value, float):
        value = f"{value:g}"
    return f"{words.replace('_', ' ')} = {value}" + (f" {shown}" if shown else "")


def steering_events(
    changes: list[dict[str, Any]], units: dict[str, str] | None = None
) -> dict[str, list[Any]]:
    """The source's change log as columns for marker glyphs: t (ms), kind, text, by, label."""
    out: dict[str, list[Any]] = {"t": [], "kind": [], "text": [], "by": [], "label": []}
    for change in changes:
        kind = change.get("kind", "")
        if kind == "param":
            name = str(change.get("name", ""))
            text = param_text(name, change.get("value"), (units or {}).get(name, ""))
        elif kind in ("run_start", "run_stop"):
            text = f"run {change.get('run')} {'started' if kind == 'run_start' else 'stopped'}"
        else:
            continue
        by = str(change.get("by") or "the source")
        out["t"].append(float(change["t"]) * 1e3)
        out["kind"].append(kind)
        out["text"].append(text)
        out["by"].append(by)
        out["label"].append(f"{text} ({by})")
    return out


#: Columns of an export, in order (one row per analysed frame).
FRAME_COLUMNS = ("seq", "run", "time_unix", "hit", "n_peaks", "source_rev")


class FrameLog:
    """Per-frame figures of the last ``keep`` analysed frames, grouped into runs for export."""

    def __init__(self, keep: int = 200_000) -> None:
        if keep < 1:
            raise ValueError(f"keep: {keep} must be at least 1 frame")
        self._rows: deque[tuple[int, int, float, int, int, int]] = deque(maxlen=keep)
        #: per-run sums over every frame added (kept when old rows leave the export window)
        self._runs: dict[int, dict[str, Any]] = {}
        self._events: deque[dict[str, Any]] = deque(maxlen=100)
        self._previous: tuple[int, float] | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, result: Any, t: float | None = None) -> None:
        """One :class:`beamhub.streaming.analysis.FrameResult` (``t``: UNIX time, default now)."""
        row = (
            int(result.seq),
            int(result.run),
            round(time.time() if t is None else t, 3),
            int(bool(result.hit)),
            int(result.n_peaks),
            int(result.source_rev),
        )
        self._rows.append(row)
        seq, run, t, hit, n_peaks, _rev = row
        entry = self._runs.get(run)
        if entry is None:
            entry = self._runs[run] = {"run": run, "first_seq": seq, "start": t}
            entry.update(frames=0, hits=0, peaks=0)
        entry["frames"] += 1
        entry["hits"] += hit
        entry["peaks"] += n_peaks
        entry["last_seq"], entry["end"] = seq, t
        if self._previous is not None and run != self._previous[0]:
            self._events.append(
                {"t": self._previous[1], "kind": "run_stop", "run": self._previous[0]}
            )
            self._events.append({"t": t, "kind": "run_start", "run": run})
        self._previous = (run, t)

    def rows(self, run: int | None = None) -> list[tuple[int, int, float, int, int, int]]:
        rows = list(self._rows)
        return rows if run is None else [r for r in rows if r[1] == run]

    def runs(self) -> list[dict[str, Any]]:
        """One summary per run seen, in order: frames, hits, hit rate, peaks/frame, first/last."""
        out = []
        for entry in list(self._runs.values()):
            row = {k: v for k, v in entry.items() if k != "peaks"}
            row["hit_rate"] = round(entry["hits"] / entry["frames"], 4)
            row["peaks_per_frame"] = round(entry["peaks"] / entry["frames"], 3)
            out.append(row)
        return out

    def run_events(self) -> list[dict[str, Any]]:
        """Run boundaries seen in the frames (the header's ``run`` changed), as change records."""
        return list(self._events)

    def to_csv(self, run: int | None = None) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(FRAME_COLUMNS)
        writer.writerows(self.rows(run))
        return buf.getvalue()

    def to_hdf5(self, run: int | None = None, attrs: dict[str, Any] | None = None) -> bytes:
        """An HDF5 file (bytes) with one 1-D dataset per column under ``/frames``."""
        import h5py

        rows = self.rows(run)
        columns = list(zip(*rows, strict=True)) if rows else [()] * len(FRAME_COLUMNS)
        dtypes = ("i8", "i8", "f8", "u1", "i4", "i8")
        buf = io.BytesIO()
        with h5py.File(buf, "w") as f:
            group = f.create_group("frames")
            for name, values, dtype in zip(FRAME_COLUMNS, columns, dtypes, strict=True):
                group.create_dataset(name, data=np.asarray(values, dtype=dtype))
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
            if run is not None:
                f.attrs["run"] = run
        return buf.getvalue()
