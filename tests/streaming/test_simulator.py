"""The simulated detector: honest frames, truth peaks on bright pixels, steerable physics, real ZeroMQ."""

from __future__ import annotations

import math
import time
import zlib

import numpy as np
import pytest
import zmq

from beamhub.streaming.params import ParamError
from beamhub.streaming.simulator import (
    BEAMSTOP_RADIUS_PX,
    MIN_SEPARATION_PX,
    SimulatedDetector,
    effective_hit_fraction,
)
from beamhub.streaming.source import SourceRunner

from .dataplane_helpers import Receiver


def peak_radius(det: SimulatedDetector, peak) -> float:
    return math.hypot(peak[0] - det.beam_center[0], peak[1] - det.beam_center[1])


def test_schema_names_every_steerable_parameter():
    det = SimulatedDetector((128, 128), seed=0)
    schema = {p["name"]: p for p in det.params.schema()}
    for name in (
        "rate_hz",
        "hit_fraction",
        "beam_intensity",
        "detector_distance_mm",
        "sample_position_um",
    ):
        spec = schema[name]
        assert spec["type"] == "float"
        assert spec["min"] < spec["max"]
        assert spec["step"] > 0
        assert spec["description"]
        assert "units" in spec
    assert schema["rate_hz"]["default"] == 120.0
    assert schema["detector_distance_mm"]["units"] == "mm"


def test_default_frames_are_4mib_float32_and_every_frame_fresh():
    det = SimulatedDetector(seed=1, hit_fraction=1.0)
    a, meta_a = det.generate()
    b, meta_b = det.generate()
    assert a.shape == (1024, 1024) and a.dtype == np.float32 and a.nbytes == 4 * 1024 * 1024
    assert a is not b and not np.shares_memory(a, b)
    assert not np.array_equal(a, b)
    assert meta_a["hit"] and meta_b["hit"]
    assert meta_a["peaks"] != meta_b["peaks"]
    # the background shows the water ring: brighter at its radius than just inside it
    ring = det.ring_radius_px()
    r = np.hypot(*(np.indices(a.shape) - np.array(det.beam_center)[:, None, None]))
    on_ring = np.median(a[np.abs(r - ring) < 3])
    inside = np.median(a[np.abs(r - (ring - 80)) < 3])
    assert on_ring > inside + 10


def test_truth_peaks_sit_on_bright_pixels_inside_the_detector():
    det = SimulatedDetector((512, 512), seed=2, hit_fraction=1.0)
    h, w = det.shape
    checked = 0
    for _ in range(20):
        frame, meta = det.generate()
        assert meta["hit"] and len(meta["peaks"]) >= 5
        peaks = np.array(meta["peaks"])
        for y, x, height in peaks:
            assert 0 <= y < h and 0 <= x < w
            assert peak_radius(det, (y, x)) > BEAMSTOP_RADIUS_PX
            iy, ix = round(y), round(x)
            window = frame[max(iy - 12, 0) : iy + 13, max(ix - 12, 0) : ix + 13]
            local = np.median(window)
            noise = 1.4826 * np.median(np.abs(window - local))
            assert frame[iy, ix] - local > 8 * noise, (y, x, height)
            assert frame[iy, ix] - local > 0.5 * height
            checked += 1
        d = np.hypot(peaks[:, None, 0] - peaks[None, :, 0], peaks[:, None, 1] - peaks[None, :, 1])
        assert d[np.triu_indices(len(peaks), 1)].min() >= MIN_SEPARATION_PX
    assert checked > 300


def test_measured_hit_fraction_matches_the_configured_one():
    det = SimulatedDetector((256, 256), seed=3, hit_fraction=0.3)
    n = 1000
    hits = [det.generate()[1] for _ in range(n)]
    measured = sum(m["hit"] for m in hits) / n
    assert abs(measured - 0.3) < 0.05  # > 3 binomial standard deviations
    assert all(bool(m["peaks"]) == m["hit"] for m in hits)


def test_detector_distance_moves_peaks_radially():
    det = SimulatedDetector((512, 512), seed=4, hit_fraction=1.0, detector_distance_mm=60.0)
    for distance in (60.0, 120.0):
        det.set_param("detector_distance_mm", distance)
        for _ in range(5):
            _, meta = det.generate()
            for peak, two_theta in zip(meta["peaks"], meta["two_theta_deg"], strict=True):
                expected = distance * 1000 * math.tan(math.radians(two_theta)) / 100.0
                assert peak_radius(det, peak) == pytest.approx(expected, abs=0.01)
    # the same reflection at twice the distance sits twice as far out (small-angle regime)
    assert det.radius_px(0.05, 120.0) == pytest.approx(2 * det.radius_px(0.05, 60.0))


def test_sample_position_lowers_the_hit_rate():
    det = SimulatedDetector((256, 256), seed=5, hit_fraction=0.5)
    centred = sum(det.generate()[1]["hit"] for _ in range(400))
    det.set_param("sample_position_um", 75.0)
    metas = [det.generate()[1] for _ in range(400)]
    moved = sum(m["hit"] for m in metas)
    assert metas[0]["effective_hit_fraction"] == pytest.approx(
        0.5 * math.exp(-((75 / 50) ** 2)), rel=1e-4
    )
    assert centred > 150  # ~200 expected
    assert moved < 60  # ~42 expected
    assert effective_hit_fraction(0.5, 500.0) < 1e-40


def test_beam_intensity_scales_background_and_peaks():
    det = SimulatedDetector((256, 256), seed=6, hit_fraction=0.0)
    low = det.generate()[0].mean()
    det.set_param("beam_intensity", 4.0)
    high = det.generate()[0].mean()
    assert high == pytest.approx(4 * low, rel=0.05)


def test_out_of_schema_values_are_refused_naming_field_and_bound():
    det = SimulatedDetector((128, 128), seed=0)
    with pytest.raises(ParamError) as info:
        det.set_param("hit_fraction", 1.5)
    assert info.value.field == "hit_fraction" and info.value.limit == {"max": 1.0}
    assert "1.0" in str(info.value)
    with pytest.raises(ParamError) as info:
        det.set_param("detector_distance_mm", 10)
    assert info.value.limit == {"min": 50.0}
    with pytest.raises(ParamError):
        det.set_param("rate_hz", "fast")
    with pytest.raises(ParamError):
        det.set_param("peaks_per_hit", 2.5)
    with pytest.raises(ParamError):
        SimulatedDetector((128, 128), beam_intensity=-1)
    assert det.params["hit_fraction"] == 0.3  # unchanged by the refused values


def test_frames_stream_over_zeromq_with_correct_headers_and_checksums(receiver):
    twin = SimulatedDetector((256, 256), seed=7, hit_fraction=0.5, rate_hz=200.0)
    det = SimulatedDetector((256, 256), seed=7, hit_fraction=0.5, rate_hz=200.0)
    runner = SourceRunner(det, stream="sfx", connect=receiver.endpoint, sndhwm=1000).start()
    try:
        runner.start_run()
        frames = [receiver.recv() for _ in range(60)]
    finally:
        runner.stop()
    assert [f.header.seq for f in frames] == list(range(60))
    producers = {f.header.meta["producer"] for f in frames}
    assert producers == {runner.producer_id}
    for f in frames:
        h = f.header
        assert (h.stream, h.run, h.rev, h.dtype, h.shape) == ("sfx", 1, 0, "<f4", (256, 256))
        assert h.meta["crc32"] == zlib.crc32(f.data.tobytes())
        assert h.meta["params"]["hit_fraction"] == 0.5
        expected, meta = twin.generate()  # the same seed yields the same frame: bit-exact arrival
        assert np.array_equal(f.data, expected)
        assert h.meta["peaks"] == meta["peaks"]
        assert abs(time.time_ns() - h.t_ns) < 10e9
    assert runner.frames_sent >= 60 and runner.dropped_at_source == 0


def test_seq_is_monotonic_across_runs_and_run_counts_starts(receiver):
    det = SimulatedDetector((128, 128), seed=8, rate_hz=200.0)
    with SourceRunner(det, stream="s", connect=receiver.endpoint, sndhwm=1000) as runner:
        assert runner.start_run() == {"run": 1, "running": True}
        first = [receiver.recv() for _ in range(5)]
        runner.stop_run()
        first += receiver.drain()
        assert runner.start_run() == {"run": 2, "running": True}
        second = [receiver.recv() for _ in range(5)]
    seqs = [f.header.seq for f in first + second]
    assert seqs == list(range(len(seqs)))  # no reset, no gap
    assert {f.header.run for f in first} == {1}
    assert {f.header.run for f in second} == {2}


@pytest.mark.timeout(60)
def test_a_full_queue_drops_at_source_and_the_loss_is_visible_downstream():
    """4 MiB frames at 300 Hz into a consumer that does not read: the detector never blocks."""
    rx = Receiver(rcvhwm=1)
    det = SimulatedDetector(seed=9, rate_hz=300.0)
    runner = SourceRunner(det, stream="s", connect=rx.endpoint, sndhwm=1).start()
    try:
        runner.start_run()
        deadline = time.monotonic() + 20
        while runner.dropped_at_source < 20 and time.monotonic() < deadline:
            time.sleep(0.05)  # polling a counter with a deadline
        runner.stop_run()
        produced = runner.status()["seq"]
        received = [rx.recv(5.0), *rx.drain(1.0)]
    finally:
        runner.stop()
        rx.close()
    seqs = [f.header.seq for f in received]
    assert runner.dropped_at_source >= 20
    assert seqs == sorted(seqs)
    gaps = produced - len(seqs)
    assert gaps == runner.dropped_at_source  # every produced frame either arrived or was counted
    assert runner.frames_sent == len(seqs)


def test_curve_encrypted_channel_delivers_only_to_the_right_server():
    """A CURVE client source reaches a CURVE server; with a wrong server key nothing arrives."""
    from beamhub.streaming.source import CurveKeys

    server_public, server_secret = zmq.curve_keypair()
    rx = Receiver()
    rx.sock.close(linger=0)
    rx.sock = rx.ctx.socket(zmq.PULL)
    rx.sock.curve_server = True
    rx.sock.curve_secretkey = server_secret
    rx.sock.curve_publickey = server_public
    port = rx.sock.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    good = SourceRunner(
        SimulatedDetector((64, 64), seed=1, rate_hz=100.0),
        stream="enc",
        connect=endpoint,
        curve=CurveKeys.generate(server_public),
    ).start()
    wrong_key = zmq.curve_keypair()[0]
    bad = SourceRunner(
        SimulatedDetector((64, 64), seed=2, rate_hz=100.0),
        stream="wrong",
        connect=endpoint,
        curve=CurveKeys.generate(wrong_key),
        linger_ms=0,
    ).start()
    try:
        good.start_run()
        bad.start_run()
        frames = [rx.recv() for _ in range(20)]
    finally:
        good.stop()
        bad.stop()
        rx.close()
    assert {f.header.stream for f in frames} == {"enc"}
    assert bad.frames_sent + bad.dropped_at_source > 0  # it tried, and nothing got through
    with pytest.raises(ValueError, match="server's public key"):
        SourceRunner(
            SimulatedDetector((64, 64)), stream="x", connect=endpoint, curve=CurveKeys.generate()
        )


def _beamhub(*args: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "beamhub.hub.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.timeout(90)
def test_beamhub_source_sim_command_waits_for_a_run_and_stops_on_sigint(receiver):
    import json
    import re
    import signal
    import urllib.request

    proc = _beamhub(
        "source",
        "sim",
        "--connect",
        receiver.endpoint,
        "--shape",
        "128x128",
        "--rate",
        "50",
        "--hit-fraction",
        "1.0",
        "--seed",
        "3",
    )
    try:
        url = None
        for line in proc.stdout:
            match = re.search(r"control endpoint: (http://127\.0\.0\.1:\d+)", line)
            if match:
                url = match.group(1)
                break
        assert url, proc.stderr.read() if proc.poll() is not None else "no control URL printed"
        assert not receiver.sock.poll(200)  # no --run: idle until told
        req = urllib.request.Request(f"{url}/run", data=b'{"action": "start"}', method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.load(resp) == {"run": 1, "running": True}
        frame = receiver.recv(20.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "source stopped" in out
    assert frame.header.shape == (128, 128) and frame.header.meta["hit"] is True


def test_beamhub_source_sim_command_refuses_bad_values():
    proc = _beamhub("source", "sim", "--bind", "tcp://127.0.0.1:0", "--hit-fraction", "2")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "hit_fraction" in err and "maximum 1.0" in err
    proc = _beamhub("source", "sim", "--bind", "tcp://127.0.0.1:0", "--shape", "big")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--shape" in err
