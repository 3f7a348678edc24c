"""The finder's fast paths against straightforward references: labelling, tiles, clipped stats."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from beamhub.streaming.peakfinder import (
    PeakFinderParams,
    _above_threshold,
    _label_sparse,
    _radial_stats,
    _scratch,
    find_peaks,
    radial_geometry,
)

from .test_peakfinder import synthetic_frame


def _reference_labels(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    return labels.ravel()[np.flatnonzero(mask)], n


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_sparse_labels_equal_ndimage_labels(h, w, density, seed):
    """Same components, same numbering (raster order of first pixel), also across row ends."""
    mask = np.random.default_rng(seed).random((h, w)) < density
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return
    labels, n = _label_sparse(idx, w)
    ref, n_ref = _reference_labels(mask)
    assert n == n_ref
    assert np.array_equal(labels, ref)


def test_pixels_at_row_ends_do_not_wrap_into_the_next_row():
    mask = np.zeros((3, 4), bool)
    mask[0, 3] = mask[1, 0] = True  # flat neighbours 3 and 4, but not 8-connected
    labels, n = _label_sparse(np.flatnonzero(mask), 4)
    assert n == 2 and list(labels) == [1, 2]


def _reference_above(flat, threshold, geom):
    return np.flatnonzero(flat > threshold[geom.bins])


@pytest.mark.parametrize(
    ("shape", "center"),
    [((256, 256), None), ((256, 256), (40.3, 200.7)), ((250, 300), None), ((1024, 1024), None)],
)
def test_tile_precheck_finds_exactly_the_pixels_above_threshold(shape, center):
    params = PeakFinderParams(min_res=10.0, max_res=400.0)
    c = center or ((shape[0] - 1) / 2, (shape[1] - 1) / 2)
    geom = radial_geometry(shape, c, params.min_res, params.max_res)
    assert geom.tile == (16 if shape == (256, 256) or shape == (1024, 1024) else 0)
    rng = np.random.default_rng(3)
    spots = [
        (rng.uniform(5, shape[0] - 5), rng.uniform(5, shape[1] - 5), 60.0, 1.0) for _ in range(30)
    ]
    flat = synthetic_frame(shape, spots, seed=5, center=c).ravel()
    buf = _scratch(geom)
    _, threshold = _radial_stats(flat, geom, params, buf)
    for thr in (threshold, np.full_like(threshold, 12.0), threshold * 0.5):
        thr = thr.copy()
        thr[-1] = np.inf
        got = _above_threshold(flat, thr, geom, buf)
        assert np.array_equal(got, _reference_above(flat, thr, geom))


def _reference_stats(flat, geom, params):
    """The clipped statistics recomputed from scratch each pass (the incremental version's spec)."""
    n = geom.nbins + 1
    bins, values = geom.sample_bins, flat[geom.sample_idx].astype(np.float64)
    keep = np.ones(values.size, bool)
    threshold = profile = None
    for _ in range(params.bg_iterations):
        if threshold is not None:
            new_keep = values < threshold[bins]
            if np.array_equal(new_keep, keep):
                break
            keep = new_keep
        count = np.bincount(bins, keep.astype(float), minlength=n)
        total = np.bincount(bins, values * keep, minlength=n)
        total2 = np.bincount(bins, values * values * keep, minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / count
            std = np.sqrt(np.maximum(total2 / count - mean * mean, 0.0))
        profile = mean.astype(np.float32) if profile is None else profile
        threshold = np.maximum(params.adc_threshold, mean + params.min_snr * std)
        threshold[count < 8] = np.inf
        threshold[-1] = np.inf
    return profile[:-1], threshold.astype(np.float32)


@pytest.mark.parametrize("iterations", [1, 2, 3, 6])
def test_incremental_clipping_equals_recomputing(iterations):
    params = PeakFinderParams(bg_iterations=iterations, min_snr=3.0)
    spots = [(60 + 13 * i, 40 + 11 * i, 40.0, 1.3) for i in range(12)]
    flat = synthetic_frame((256, 256), spots, seed=9).ravel()
    geom = radial_geometry((256, 256), (127.5, 127.5), params.min_res, params.max_res)
    profile, threshold = _radial_stats(flat, geom, params, _scratch(geom))
    ref_profile, ref_threshold = _reference_stats(flat, geom, params)
    assert np.array_equal(np.isnan(profile), np.isnan(ref_profile))
    np.testing.assert_allclose(profile, ref_profile, rtol=1e-6, equal_nan=True)
    finite = np.isfinite(ref_threshold)
    assert np.array_equal(finite, np.isfinite(threshold))
    np.testing.assert_allclose(threshold[finite], ref_threshold[finite], rtol=1e-5)


def test_frames_do_not_leak_into_each_other():
    """The reused marker buffer is clean after every frame: the same frame gives the same peaks."""
    spots = [(60 + 13 * i, 40 + 11 * i, 80.0, 1.3) for i in range(12)]
    frame = synthetic_frame((256, 256), spots, seed=1)
    other = synthetic_frame((256, 256), [(30 + 7 * i, 190 - 9 * i, 90.0, 1.1) for i in range(15)])
    first = find_peaks(frame).peaks
    find_peaks(other)
    assert np.array_equal(find_peaks(frame).peaks, first)
    assert not _scratch(radial_geometry((256, 256), (127.5, 127.5), 20.0, 2000.0))["above"].any()


def test_geometry_of_another_shape_is_refused():
    geom = radial_geometry((128, 128), (63.5, 63.5), 20.0, 2000.0)
    with pytest.raises(ValueError, match="geometry is for frames of"):
        find_peaks(np.zeros((256, 256), np.float32), geometry=geom)
