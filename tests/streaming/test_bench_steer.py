"""`beamhub bench steer`'s measurement on a small stack: steering feedback from the freshest
frames, the work analysis of every frame beside it, frames analysed reported beside frames arriving."""

from __future__ import annotations

import pytest

from beamhub.bench.steer import measure_steering

pytestmark = pytest.mark.timeout(120)


def test_round_trips_from_the_feedback_with_the_work_analysis_attached():
    out = measure_steering(6, 50.0, None, hwm=4, shape=(128, 128), feedback_hz=5.0)
    frames = out["frames"]
    # every change was seen by the feedback and, in order, by the work analysis
    assert out["samples"] == 6 and out["baseline_direct"]["samples"] == 6
    assert out["timeouts"] == 0
    work = out["work_stream_round_trip"]
    assert work["not_seen"] == 0 and work["dsn"]["samples"] == 6
    # a round trip waits for a frame made after the change: at least one frame interval
    assert out["p50_ms"] >= 1e3 / 50.0 * 0.5
    assert out["p50_ms"] <= out["p99_ms"] <= out["max_ms"]
    # small frames at 50 Hz: the work analysis keeps up with what arrives and skips nothing; its
    # only gaps are frames the source dropped when its queue was full (a loaded machine)
    assert 0 < frames["arriving_fps"] <= 60 and frames["produced_fps"] >= frames["arriving_fps"]
    assert frames["work_analysed_fps"] >= 0.8 * frames["arriving_fps"]
    assert frames["work_skipped_stale"] == 0
    assert frames["work_lost"] <= out["source"]["dropped_at_source"]
    # the feedback analyses fewer frames than arrive: new revisions and 5 Hz refreshes only
    assert frames["feedback_analysed_fps"] < frames["arriving_fps"]
    assert frames["feedback_skipped_fresh"] + frames["feedback_skipped_stale"] > 0
    assert len(out["loadavg_before"]) == 3 and out["frame_bytes"] == 128 * 128 * 4
