"""Notebook 03's check "rates follow the jet model" can fail: with the steering disconnected (the
move never reaches the detector) it says so. Frames come from the real simulator and hits from
the real peak finder, as on the Dask workers; only the DSN in between is left out."""

from __future__ import annotations

import pytest

from beamhub.streaming.peakfinder import PeakFinderParams, find_peaks
from beamhub.streaming.simulator import (
    SimulatedDetector,
    effective_hit_fraction,
    follows_jet_model,
    frames_to_tell,
    jet_tolerance,
)

HIT_FRACTION = 0.3  # the notebook tests' beamtime
MOVED_UM = 150.0  # where notebook 03 moves the jet


def _hit_rate(detector: SimulatedDetector, n: int) -> float:
    params = PeakFinderParams.create(None)
    hits = 0
    for _ in range(n):
        image, _ = detector.generate()
        hits += find_peaks(image, params, center=detector.beam_center).hit
    return hits / n


def _measure(connected: bool, seed: int) -> list[tuple[float, float]]:
    """Notebook 03's measure, move, measure: centred, moved, back."""
    detector = SimulatedDetector((256, 256), seed=seed, hit_fraction=HIT_FRACTION)
    n = frames_to_tell(HIT_FRACTION, MOVED_UM)
    rates = []
    for position in (0.0, MOVED_UM, 0.0):
        if connected:
            detector.set_param("sample_position_um", position)
        rates.append((position, _hit_rate(detector, n)))
    return rates


@pytest.mark.parametrize("seed", [1, 2])
def test_the_check_passes_when_the_jet_moves(seed):
    rates = _measure(connected=True, seed=seed)
    assert follows_jet_model(rates, HIT_FRACTION, frames_to_tell(HIT_FRACTION, MOVED_UM)), rates


@pytest.mark.parametrize("seed", [1, 2])
def test_the_check_fails_when_steering_is_disconnected(seed):
    rates = _measure(connected=False, seed=seed)  # the jet stays in the beam
    assert not follows_jet_model(rates, HIT_FRACTION, frames_to_tell(HIT_FRACTION, MOVED_UM))
    n = frames_to_tell(HIT_FRACTION, MOVED_UM)
    moved = rates[1][1]
    assert moved - effective_hit_fraction(HIT_FRACTION, MOVED_UM) > jet_tolerance(0.0, n), rates


def test_the_check_fails_when_the_jet_is_stuck_out_of_the_beam():
    n = frames_to_tell(HIT_FRACTION, MOVED_UM)
    assert not follows_jet_model([(0.0, 0.0), (MOVED_UM, 0.0), (0.0, 0.0)], HIT_FRACTION, n)


def test_enough_frames_to_tell_the_positions_apart():
    for hit_fraction in (0.1, 0.3):
        n = frames_to_tell(hit_fraction, MOVED_UM)
        inside = effective_hit_fraction(hit_fraction, 0.0)
        outside = effective_hit_fraction(hit_fraction, MOVED_UM)
        assert jet_tolerance(inside, n) + jet_tolerance(outside, n) < inside - outside
    with pytest.raises(ValueError, match="raise hit_fraction"):
        frames_to_tell(0.3, 1.0)  # the jet barely moved: the rates are alike
