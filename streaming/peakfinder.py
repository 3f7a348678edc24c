"""A peakfinder8-style Bragg peak finder in numpy/scipy, fast enough for one detector frame per core.

The algorithm follows the peakfinder8 family (Cheetah, OnDA Monitor, CrystFEL): per-radius background
statistics with iterative sigma clipping give a threshold ``max(adc_threshold, mean + min_snr·std)``
for every radius bin; pixels above their bin's threshold are grouped into 8-connected peaks
(``scipy.ndimage.label``); peaks outside ``[min_pixel_count, max_pixel_count]`` are dropped; each
survivor gets a local background (mean/std of the non-peak pixels within ``2·local_bg_radius`` of
its centre), is re-integrated against it, must reach ``min_snr`` and stand above the brightest local
background pixel; its position is the intensity-weighted centroid. A frame is a hit when it has at
least ``min_peaks_for_hit`` peaks.

Speed: the radius map, the bin of every pixel and a per-bin sample of pixel indices depend only on
the geometry, so they are computed once (:func:`radial_geometry`, cached). The clipped statistics run
on the sample (about ``samples_per_bin`` pixels per 1-px radius bin) with ``np.bincount``; only the
threshold comparison and the labelling touch every pixel.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from beamhub.streaming.params import ParamError, ParamSet, ParamSpec

__all__ = [
    "PEAKFINDER_PARAMS",
    "PEAK_COLUMNS",
    "PeakFinderParams",
    "PeakResult",
    "RadialGeometry",
    "find_peaks",
    "match_peaks",
    "radial_geometry",
]

#: Columns of :attr:`PeakResult.peaks`.
PEAK_COLUMNS = ("y", "x", "intensity", "snr", "npix")
#: Bins with fewer sampled pixels than this get no threshold (no peaks there: the beam centre).
MIN_BIN_SAMPLES = 8
#: Tile edge (px) of the threshold pre-check; frames whose sides are not multiples skip it.
TILE = 16
_THREAD = threading.local()

PEAKFINDER_PARAMS = (
    ParamSpec(
        "adc_threshold",
        "float",
        0.0,
        "no pixel below this value is part of a peak, whatever the background",
        "ADU",
        min=0.0,
        max=1e9,
        step=1.0,
    ),
    ParamSpec(
        "min_snr",
        "float",
        6.0,
        "signal-to-noise a pixel (against its radius bin) and a peak (against its local "
        "background) must reach",
        "",
        min=0.5,
        max=1000.0,
        step=0.5,
    ),
    ParamSpec(
        "min_pixel_count",
        "int",
        2,
        "fewest connected pixels a peak may have",
        "px",
        min=1,
        max=10000,
        step=1,
    ),
    ParamSpec(
        "max_pixel_count",
        "int",
        100,
        "most connected pixels a peak may have",
        "px",
        min=1,
        max=10000,
        step=1,
    ),
    ParamSpec(
        "local_bg_radius",
        "int",
        3,
        "local background comes from pixels within twice this radius of a peak",
        "px",
        min=1,
        max=50,
        step=1,
    ),
    ParamSpec(
        "min_res",
        "float",
        20.0,
        "inner radius limit (beam stop); no peaks inside",
        "px",
        min=0.0,
        max=1e5,
        step=1.0,
    ),
    ParamSpec(
        "max_res",
        "float",
        2000.0,
        "outer radius limit; no peaks outside",
        "px",
        min=1.0,
        max=1e5,
        step=1.0,
    ),
    ParamSpec(
        "min_peaks_for_hit",
        "int",
        10,
        "a frame with at least this many peaks is a hit",
        "",
        min=1,
        max=10000,
        step=1,
    ),
    ParamSpec(
        "max_peaks",
        "int",
        2048,
        "peaks kept per frame (brightest first)",
        "",
        min=1,
        max=100000,
        step=1,
    ),
    ParamSpec(
        "bg_iterations",
        "int",
        3,
        "sigma-clipping passes of the radial background statistics",
        "",
        min=1,
        max=20,
        step=1,
    ),
)


@dataclass(frozen=True)
class PeakFinderParams:
    """Validated peak-finder settings; build with :meth:`create` or :meth:`replace`."""

    adc_threshold: float = 0.0
    min_snr: float = 6.0
    min_pixel_count: int = 2
    max_pixel_count: int = 100
    local_bg_radius: int = 3
    min_res: float = 20.0
    max_res: float = 2000.0
    min_peaks_for_hit: int = 10
    max_peaks: int = 2048
    bg_iterations: int = 3

    def __post_init__(self) -> None:
        checked = ParamSet(PEAKFINDER_PARAMS, asdict(self)).values()
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        if self.min_pixel_count > self.max_pixel_count:
            raise ParamError(
                "min_pixel_count",
                f"{self.min_pixel_count} is above max_pixel_count "
                f"{self.max_pixel_count}; lower it or raise max_pixel_count",
                limit={"max": self.max_pixel_count},
            )
        if self.min_res >= self.max_res:
            raise ParamError(
                "min_res",
                f"{self.min_res} must be below max_res {self.max_res}",
                limit={"max": self.max_res},
            )

    @classmethod
    def create(cls, values: dict[str, Any] | None = None) -> PeakFinderParams:
        """Defaults updated with ``values``; unknown names raise an error naming them."""
        return cls().replace(**(values or {}))

    def replace(self, **changes: Any) -> PeakFinderParams:
        known = {f.name for f in fields(self)}
        for name in changes:
            if name not in known:
                raise ParamError(
                    name, f"unknown analysis parameter; known: {', '.join(sorted(known))}"
                )
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def schema() -> list[dict[str, Any]]:
        """The parameters as JSON (name, type, default, units, bounds) for steering panels."""
        return [spec.to_json() for spec in PEAKFINDER_PARAMS]


@dataclass(frozen=True, eq=False)
class RadialGeometry:
    """Everything that depends only on the frame shape, beam centre and radius limits."""

    shape: tuple[int, int]
    center: tuple[float, float]
    nbins: int  # 1-px radius bins 0..nbins-1; index ``nbins`` collects masked pixels
    bins: np.ndarray  # per pixel (flattened), intp
    sample_idx: np.ndarray  # flat pixel indices used for the background statistics
    sample_bins: np.ndarray
    radius_px: np.ndarray  # centre radius of every bin
    sample_counts: np.ndarray  # sampled pixels per bin (float64, nbins + 1)
    #: square tiles of ``tile`` px (0: no tiling, the shape is not a multiple); for each tile two
    #: positions in the per-frame range-minimum table of the threshold whose minimum is the
    #: lowest threshold of any bin the tile touches
    tile: int = 0
    tile_min_a: np.ndarray | None = None
    tile_min_b: np.ndarray | None = None
    tile_levels: int = 0


@functools.lru_cache(maxsize=8)
def radial_geometry(
    shape: tuple[int, int],
    center: tuple[float, float],
    min_res: float,
    max_res: float,
    samples_per_bin: int = 256,
) -> RadialGeometry:
    """Radius bins and a per-bin pixel sample (cached: frames of one detector share it)."""
    h, w = shape
    yy, xx = np.indices(shape, dtype=np.float32)
    radius = np.hypot(yy - np.float32(center[0]), xx - np.float32(center[1])).ravel()
    bins = np.rint(radius).astype(np.intp)  # intp: np.take and bincount use it without a copy
    nbins = int(bins.max()) + 1
    outside = (radius < min_res) | (radius > max_res)
    bins[outside] = nbins
    # sample: every k-th pixel of each bin, k chosen so that a bin keeps ~samples_per_bin pixels
    order = np.argsort(bins, kind="stable")
    sorted_bins = bins[order]
    counts = np.bincount(bins, minlength=nbins + 1)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(bins.size) - starts[sorted_bins]
    step = np.maximum(1, -(-counts // max(1, samples_per_bin)))  # ceil: at most ~samples_per_bin
    take = (rank % step[sorted_bins] == 0) & (sorted_bins < nbins)
    sample_idx = np.sort(order[take]).astype(np.int64)
    tiling = _tiling(bins, shape, nbins)
    return RadialGeometry(
        shape=(h, w),
        center=(float(center[0]), float(center[1])),
        nbins=nbins,
        bins=bins,
        sample_idx=sample_idx,
        sample_bins=bins[sample_idx],
        radius_px=np.arange(nbins, dtype=np.float32),
        sample_counts=np.bincount(bins[sample_idx], minlength=nbins + 1).astype(np.float64),
        **tiling,
    )


def _tiling(bins: np.ndarray, shape: tuple[int, int], nbins: int) -> dict[str, Any]:
    """Per-tile range of radius bins, as two lookups into a range-minimum (sparse) table.

    Comparing each pixel with its own bin's threshold needs a per-pixel gather over the frame
    (``np.take``: a sixth of the finder's time); comparing each tile with the lowest threshold it
    touches is a broadcast, and only the few pixels above that are checked exactly.
    """
    h, w = shape
    if h % TILE or w % TILE:
        return {}
    tiles = bins.reshape(h // TILE, TILE, w // TILE, TILE).transpose(0, 2, 1, 3)
    tiles = tiles.reshape(-1, TILE * TILE)
    valid = tiles < nbins
    lo = np.where(valid, tiles, nbins).min(axis=1)  # a tile with no valid bin: the masked bin
    hi = np.where(valid, tiles, -1).max(axis=1)
    hi = np.where(hi < 0, nbins, hi)
    length = hi - lo + 1
    level = np.floor(np.log2(length)).astype(np.intp)
    levels = int(level.max()) + 1
    # level k of the table holds min(threshold[i : i + 2^k]) at offset[k] + i
    sizes = [nbins + 1 - (1 << k) + 1 for k in range(levels)]
    offset = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.intp)
    return {
        "tile": TILE,
        "tile_min_a": offset[level] + lo,
        "tile_min_b": offset[level] + hi - (1 << level) + 1,
        "tile_levels": levels,
    }


def _tile_thresholds(threshold: np.ndarray, geom: RadialGeometry) -> np.ndarray:
    """The lowest threshold of the bins each tile touches (an array of tile rows x tile cols)."""
    table = [threshold]
    for k in range(1, geom.tile_levels):
        prev, half = table[-1], 1 << (k - 1)
        table.append(np.minimum(prev[:-half], prev[half:]))
    flat = np.concatenate(table)
    lowest = np.minimum(flat[geom.tile_min_a], flat[geom.tile_min_b])
    h, w = geom.shape
    return lowest.reshape(h // geom.tile, w // geom.tile)


def _above_threshold(
    flat: np.ndarray, threshold: np.ndarray, geom: RadialGeometry, buf: dict[str, np.ndarray]
) -> np.ndarray:
    """Sorted flat indices of the pixels above their radius bin's threshold."""
    if not geom.tile:
        np.take(threshold, geom.bins, out=buf["thr"], mode="clip")
        return np.flatnonzero(np.greater(flat, buf["thr"], out=buf["cand"]))
    h, w, t = *geom.shape, geom.tile
    lowest = _tile_thresholds(threshold, geom)
    cand = buf["cand"].reshape(h // t, t, w // t, t)  # same memory order as the frame
    np.greater(flat.reshape(h // t, t, w // t, t), lowest[:, None, :, None], out=cand)
    idx = np.flatnonzero(buf["cand"])
    return idx[flat[idx] > threshold[geom.bins[idx]]]


@dataclass(frozen=True, eq=False)
class PeakResult:
    """Found peaks (rows of :data:`PEAK_COLUMNS`, brightest first) and the radial profile."""

    peaks: np.ndarray  # (n, 5) float32
    hit: bool
    radial_profile: np.ndarray  # azimuthal mean per 1-px radius bin (NaN where masked)
    threshold: np.ndarray  # per radius bin (inf where no peak may be)

    @property
    def n_peaks(self) -> int:
        return int(self.peaks.shape[0])


def _scratch(geom: RadialGeometry) -> dict[str, np.ndarray]:
    """Per-thread work arrays for one geometry, reused frame after frame.

    Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_`` in its workers, which makes glibc serve every
    large temporary with a fresh ``mmap`` (page faults on each use): without reuse the finder ran
    3x slower in a Dask worker than in a plain process.
    """
    held = getattr(_THREAD, "scratch", None)
    if held is None or held[0] is not geom:
        n, s = geom.bins.size, geom.sample_idx.size
        buffers = {
            "thr": np.empty(0 if geom.tile else n, np.float32),
            "cand": np.empty(n, bool),
            "above": np.zeros(n, bool),  # all False between frames: find_peaks resets what it sets
            "v32": np.empty(s, np.float32),
            "keep": np.empty(s, bool),
            "keep2": np.empty(s, bool),
            "changed": np.empty(s, bool),
        }
        for name in ("v", "sq", "t"):
            buffers[name] = np.empty(s, np.float64)
        held = (geom, buffers)
        _THREAD.scratch = held
    return held[1]


def _radial_stats(
    flat: np.ndarray, geom: RadialGeometry, params: PeakFinderParams, buf: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Azimuthal mean and the sigma-clipped threshold per bin, from the geometry's sample.

    The first pass sums every sampled pixel; each clipping pass then only adds or removes the
    few pixels whose side of the threshold changed (the sums stay exact in float64), instead of
    summing the whole sample again.
    """
    n = geom.nbins + 1
    bins = geom.sample_bins
    np.take(flat, geom.sample_idx, out=buf["v32"], mode="clip")
    values, squares = buf["v"], buf["sq"]
    np.copyto(values, buf["v32"])
    np.multiply(values, values, out=squares)
    count = geom.sample_counts.copy()
    total = np.bincount(bins, values, minlength=n)
    total2 = np.bincount(bins, squares, minlength=n)
    keep, new_keep, changed = buf["keep"], buf["keep2"], buf["changed"]
    keep.fill(True)
    threshold: np.ndarray | None = None
    profile: np.ndarray | None = None
    for _ in range(params.bg_iterations):
        if threshold is not None:  # clip what the previous pass called signal
            np.take(threshold, bins, out=buf["t"], mode="clip")
            np.less(values, buf["t"], out=new_keep)
            np.not_equal(new_keep, keep, out=changed)
            moved = np.flatnonzero(changed)
            if moved.size == 0:
                break  # converged: the clipping no longer changes the pixel set
            sign = np.where(new_keep[moved], 1.0, -1.0)
            b = bins[moved]
            count += np.bincount(b, sign, minlength=n)
            total += np.bincount(b, sign * values[moved], minlength=n)
            total2 += np.bincount(b, sign * squares[moved], minlength=n)
            keep, new_keep = new_keep, keep
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / count
            std = np.sqrt(np.maximum(total2 / count - mean * mean, 0.0))
        if profile is None:
            profile = mean.astype(np.float32)
        threshold = np.maximum(params.adc_threshold, mean + params.min_snr * std)
        threshold[count < MIN_BIN_SAMPLES] = np.inf
        threshold[-1] = np.inf
    assert profile is not None and threshold is not None  # bg_iterations >= 1
    return profile[:-1], threshold.astype(np.float32)


def _label_sparse(idx: np.ndarray, width: int) -> tuple[np.ndarray, int]:
    """8-connected components of the pixels ``idx`` (sorted flat indices, frame ``width`` wide).

    Returns each pixel's component (1..k, numbered in raster order of a component's first pixel,
    as ``scipy.ndimage.label`` does) and k. Only the pixels above threshold are visited: labelling
    the whole frame was a third of the finder's time, for the few hundred pixels of its peaks.
    """
    n = idx.size
    col = idx % width
    heads, tails = [], []
    # each pixel links to its neighbours right, down-left, down and down-right
    for offset, edge_ok in (
        (1, col < width - 1),
        (width - 1, col > 0),
        (width, None),
        (width + 1, col < width - 1),
    ):
        target = idx + offset
        pos = np.minimum(np.searchsorted(idx, target), n - 1)
        linked = idx[pos] == target
        if edge_ok is not None:
            linked &= edge_ok
        heads.append(np.flatnonzero(linked))
        tails.append(pos[linked])
    head, tail = np.concatenate(heads), np.concatenate(tails)
    graph = coo_matrix((np.ones(head.size, np.int8), (head, tail)), shape=(n, n)).tocsr()
    k, labels = connected_components(graph, directed=False)
    return labels + 1, int(k)


def _disk(radius: int) -> tuple[np.ndarray, np.ndarray]:
    dy, dx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    inside = dy * dy + dx * dx <= radius * radius
    return dy[inside].astype(np.int64), dx[inside].astype(np.int64)


def find_peaks(
    frame: np.ndarray,
    params: PeakFinderParams | None = None,
    center: tuple[float, float] | None = None,
    geometry: RadialGeometry | None = None,
) -> PeakResult:
    """Find the Bragg peaks of one 2-D frame. ``center`` is the beam centre (y, x) in pixels."""
    params = params or PeakFinderParams()
    if frame.ndim != 2:
        raise ValueError(f"frame must be 2-D, got shape {frame.shape}")
    h, w = frame.shape
    if geometry is None:
        c = center if center is not None else ((h - 1) / 2, (w - 1) / 2)
        geometry = radial_geometry(
            (h, w), (float(c[0]), float(c[1])), params.min_res, params.max_res
        )
    elif geometry.shape != (h, w):
        raise ValueError(f"geometry is for frames of {geometry.shape}, the frame is {(h, w)}")
    flat = np.ascontiguousarray(frame, dtype=np.float32).ravel()
    buf = _scratch(geometry)
    profile, threshold = _radial_stats(flat, geometry, params, buf)
    idx = _above_threshold(flat, threshold, geometry, buf)
    empty = np.zeros((0, len(PEAK_COLUMNS)), dtype=np.float32)

    def result(peaks: np.ndarray) -> PeakResult:
        return PeakResult(peaks, peaks.shape[0] >= params.min_peaks_for_hit, profile, threshold)

    if idx.size == 0:
        return result(empty)
    above = buf["above"]
    above[idx] = True
    try:
        return result(_peaks(flat, idx, above, profile, geometry, params))
    finally:
        above[idx] = False  # the buffer stays all False for the next frame


def _peaks(
    flat: np.ndarray,
    idx: np.ndarray,
    above: np.ndarray,
    profile: np.ndarray,
    geometry: RadialGeometry,
    params: PeakFinderParams,
) -> np.ndarray:
    """Group the pixels ``idx`` (above threshold; ``above`` marks them) into accepted peaks."""
    h, w = geometry.shape
    empty = np.zeros((0, len(PEAK_COLUMNS)), dtype=np.float32)
    lab, n_labels = _label_sparse(idx, w)
    npix = np.bincount(lab, minlength=n_labels + 1)
    good = (npix >= params.min_pixel_count) & (npix <= params.max_pixel_count)
    good[0] = False
    if not good.any():
        return empty
    keep = good[lab]
    idx, lab = idx[keep], lab[keep]
    compact = np.cumsum(good) - 1  # label -> 0..k-1
    comp = compact[lab]
    k = int(good.sum())
    values = flat[idx].astype(np.float64)
    py, px = np.divmod(idx, w)
    # first centroid against the radial background, to place the local-background disk
    signal = np.maximum(values - profile[np.minimum(geometry.bins[idx], geometry.nbins - 1)], 0.0)
    wsum = np.bincount(comp, signal, minlength=k) + 1e-12
    cy = np.rint(np.bincount(comp, signal * py, minlength=k) / wsum).astype(np.int64)
    cx = np.rint(np.bincount(comp, signal * px, minlength=k) / wsum).astype(np.int64)
    # local background: pixels within 2*local_bg_radius, not above threshold, inside the image
    dy, dx = _disk(2 * params.local_bg_radius)
    yy = cy[:, None] + dy[None, :]
    xx = cx[:, None] + dx[None, :]
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    nb_idx = np.clip(yy, 0, h - 1) * w + np.clip(xx, 0, w - 1)
    bg_ok = inside & ~above[nb_idx] & (geometry.bins[nb_idx] < geometry.nbins)
    bg_vals = np.where(bg_ok, flat[nb_idx], 0.0).astype(np.float64)
    n_bg = bg_ok.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        local_offset = bg_vals.sum(axis=1) / n_bg
        local_sigma = np.sqrt(
            np.maximum((bg_vals * bg_vals).sum(axis=1) / n_bg - local_offset**2, 0.0)
        )
    bg_max = np.where(bg_ok, flat[nb_idx], -np.inf).max(axis=1)
    # re-integrate against the local background; intensity-weighted centroid
    net = values - local_offset[comp]
    total = np.bincount(comp, net, minlength=k)
    peak_max = np.full(k, -np.inf)
    np.maximum.at(peak_max, comp, net)
    weight = np.maximum(net, 0.0)
    wsum = np.bincount(comp, weight, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.bincount(comp, weight * py, minlength=k) / wsum
        x = np.bincount(comp, weight * px, minlength=k) / wsum
        snr = total / local_sigma
    accept = (
        (n_bg > 0)
        & (local_sigma > 1e-10)
        & (wsum > 0)
        & (snr >= params.min_snr)
        & (peak_max >= bg_max - local_offset)
    )
    n_pix = np.bincount(comp, minlength=k)
    peaks = np.stack([y, x, total, snr, n_pix], axis=1)[accept]
    order = np.argsort(-peaks[:, 2], kind="stable")[: params.max_peaks]
    return peaks[order].astype(np.float32)


def _positions(rows: Any) -> np.ndarray:
    arr = np.asarray(rows, dtype=np.float64)
    return np.zeros((0, 2)) if arr.size == 0 else arr.reshape(-1, arr.shape[-1])[:, :2]


def match_peaks(
    found: np.ndarray, truth: np.ndarray, tolerance_px: float = 2.0
) -> tuple[int, int, int]:
    """``(true positives, false positives, false negatives)`` matching found to true (y, x).

    Each true peak matches at most one found peak (nearest within ``tolerance_px``, greedy by
    distance), so a peak split in two counts one true and one false positive.
    """
    found, truth = _positions(found), _positions(truth)
    if len(found) == 0 or len(truth) == 0:
        return 0, len(found), len(truth)
    tree = cKDTree(truth)
    pairs = tree.query_ball_point(found, r=tolerance_px)
    candidates = sorted(
        (math.dist(found[i], truth[j]), i, j) for i, js in enumerate(pairs) for j in js
    )
    used_f: set[int] = set()
    used_t: set[int] = set()
    for _, i, j in candidates:
        if i not in used_f and j not in used_t:
            used_f.add(i)
            used_t.add(j)
    tp = len(used_f)
    return tp, len(found) - tp, len(truth) - tp
