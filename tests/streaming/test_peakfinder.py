"""The peakfinder8-style finder against the simulated detector's ground truth and hand-made frames."""

from __future__ import annotations

import numpy as np
import pytest

from beamhub.streaming.params import ParamError
from beamhub.streaming.peakfinder import (
    PEAK_COLUMNS,
    PeakFinderParams,
    find_peaks,
    match_peaks,
    radial_geometry,
)
from beamhub.streaming.simulator import SimulatedDetector


def synthetic_frame(shape=(256, 256), spots=(), seed=0, center=None):
    """Ring + diffuse background + Gaussian noise + Gaussian spots ``(y, x, height, sigma)``."""
    rng = np.random.default_rng(seed)
    h, w = shape
    cy, cx = center if center is not None else ((h - 1) / 2, (w - 1) / 2)
    yy, xx = np.indices(shape, dtype=np.float64)
    r = np.hypot(yy - cy, xx - cx)
    bg = 10.0 / (1 + (r / 80) ** 2) + 30.0 * np.exp(-(((r - 70) / 6) ** 2))
    frame = bg + rng.normal(0.0, 1.0, shape) * np.sqrt(bg + 4.0)
    for y, x, height, sigma in spots:
        frame += height * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma * sigma))
    return frame.astype(np.float32)


@pytest.fixture(scope="module")
def sim_frames():
    det = SimulatedDetector(seed=11, hit_fraction=0.5)
    return [det.generate() for _ in range(40)]


@pytest.mark.timeout(120)
def test_recall_and_precision_against_simulator_truth(sim_frames):
    params = PeakFinderParams()
    tp = fp = fn = 0
    n_hits = 0
    for frame, meta in sim_frames:
        result = find_peaks(frame, params, center=tuple(meta["beam_center"]))
        a, b, c = match_peaks(result.peaks, meta["peaks"], tolerance_px=2.0)
        tp, fp, fn = tp + a, fp + b, fn + c
        n_hits += meta["hit"]
        assert result.hit == meta["hit"], f"hit misclassified: {result.n_peaks} peaks, {meta}"
    assert n_hits >= 10, "the sample must contain hits for the figures to mean anything"
    recall, precision = tp / (tp + fn), tp / (tp + fp)
    assert recall >= 0.95, (recall, tp, fn)
    assert precision >= 0.95, (precision, tp, fp)


def test_no_peaks_on_non_hit_frames(sim_frames):
    blanks = [(f, m) for f, m in sim_frames if not m["hit"]]
    assert len(blanks) >= 10
    found = [find_peaks(f, center=tuple(m["beam_center"])).n_peaks for f, m in blanks]
    assert sum(found) == 0, found


def test_centroids_are_subpixel_on_synthetic_spots():
    spots = [
        (40.3, 60.7, 200.0, 1.2),
        (200.5, 180.2, 120.0, 1.0),
        (128.0, 40.4, 400.0, 1.5),
        (70.2, 128.6, 300.0, 1.3),
    ]  # the last one sits on the solvent ring
    frame = synthetic_frame(spots=spots, seed=1)
    result = find_peaks(frame, PeakFinderParams(min_res=10))
    assert result.n_peaks == len(spots)
    assert result.peaks.shape[1] == len(PEAK_COLUMNS)
    for y, x, *_ in spots:
        d = np.hypot(result.peaks[:, 0] - y, result.peaks[:, 1] - x).min()
        assert d < 0.3, (y, x, d)
    assert (result.peaks[:, 3] >= 6.0).all()  # snr column
    assert np.all(np.diff(result.peaks[:, 2]) <= 0)  # brightest first


def test_pixel_count_bounds_reject_hot_pixels_and_blobs():
    frame = synthetic_frame(spots=[(50.0, 50.0, 300.0, 1.2)], seed=2)
    frame[230, 60] = 1000.0  # a hot pixel: one pixel
    frame[20:32, 200:212] = 500.0  # a blob of 144 pixels (max_pixel_count is 100)
    result = find_peaks(frame, PeakFinderParams(min_res=10))
    assert result.n_peaks == 1
    assert abs(result.peaks[0, 0] - 50.0) < 0.5 and abs(result.peaks[0, 1] - 50.0) < 0.5
    wide = find_peaks(frame, PeakFinderParams(min_res=10, min_pixel_count=1, max_pixel_count=1000))
    assert wide.n_peaks == 3


def test_resolution_limits_and_adc_threshold():
    spots = [(128.0, 150.0, 300.0, 1.2), (10.0, 10.0, 300.0, 1.2)]  # r ~ 22 and r ~ 166
    frame = synthetic_frame(spots=spots, seed=3)
    assert find_peaks(frame, PeakFinderParams(min_res=10)).n_peaks == 2
    inner_cut = find_peaks(frame, PeakFinderParams(min_res=30))
    assert inner_cut.n_peaks == 1 and inner_cut.peaks[0, 0] < 20
    outer_cut = find_peaks(frame, PeakFinderParams(min_res=10, max_res=100))
    assert outer_cut.n_peaks == 1 and outer_cut.peaks[0, 0] > 100
    assert find_peaks(frame, PeakFinderParams(min_res=10, adc_threshold=5000)).n_peaks == 0


def test_hit_needs_min_peaks():
    spots = [(40.0 + 30 * i, 60.0, 300.0, 1.2) for i in range(5)]
    frame = synthetic_frame(spots=spots, seed=4)
    assert find_peaks(frame, PeakFinderParams(min_res=10, min_peaks_for_hit=5)).hit
    assert not find_peaks(frame, PeakFinderParams(min_res=10, min_peaks_for_hit=6)).hit


def test_radial_profile_follows_the_background():
    frame = synthetic_frame(seed=5)
    result = find_peaks(frame, PeakFinderParams(min_res=0))
    ring = int(np.nanargmax(result.radial_profile[20:120])) + 20
    assert abs(ring - 70) <= 2
    assert abs(result.radial_profile[70] - 30.0 - 10 / (1 + (70 / 80) ** 2)) < 2.0


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"min_snr": -1}, "min_snr"),
        ({"min_snr": "high"}, "min_snr"),
        ({"adc_threshold": float("nan")}, "adc_threshold"),
        ({"min_pixel_count": 0}, "min_pixel_count"),
        ({"min_pixel_count": 50, "max_pixel_count": 10}, "min_pixel_count"),
        ({"local_bg_radius": 2.5}, "local_bg_radius"),
        ({"min_res": 500.0, "max_res": 100.0}, "min_res"),
        ({"min_peaks_for_hit": 0}, "min_peaks_for_hit"),
        ({"threshold": 3}, "threshold"),
    ],
)
def test_invalid_parameters_are_refused_by_name(changes, field):
    with pytest.raises(ParamError) as info:
        PeakFinderParams.create(changes)
    assert info.value.field == field
    assert field in str(info.value)


def test_params_schema_and_geometry_cache():
    schema = {p["name"]: p for p in PeakFinderParams.schema()}
    assert set(schema) == set(PeakFinderParams().to_dict())
    assert schema["min_snr"]["min"] == 0.5
    g1 = radial_geometry((64, 64), (31.5, 31.5), 0.0, 100.0)
    g2 = radial_geometry((64, 64), (31.5, 31.5), 0.0, 100.0)
    assert g1 is g2
    assert g1.sample_idx.size == 64 * 64  # small bins keep every pixel


def test_match_peaks_counts():
    truth = [[10.0, 10.0, 5.0], [50.0, 50.0, 5.0]]
    found = np.array([[10.5, 10.2], [10.9, 9.8], [80.0, 80.0]])
    assert match_peaks(found, truth) == (1, 2, 1)
    assert match_peaks([], truth) == (0, 0, 2)
    assert match_peaks(found, []) == (0, 3, 0)
