"""Viewport tiles, contrast, the per-frame log and its exports, steering markers; and the notebook
LiveView zooming into a hit (a finer tile of only what is in view), its contrast and markers."""

from __future__ import annotations

import csv
import io
import time
from dataclasses import replace

import h5py
import numpy as np
import pytest

from beamhub.streaming.analysis import Analyzer
from beamhub.streaming.simulator import SimulatedDetector
from beamhub.streaming.wire import Frame, FrameHeader
from beamhub.widgets.live_image import (
    FrameLog,
    auto_limits,
    param_text,
    steering_events,
    viewport_tile,
)
from beamhub.widgets.liveview import LiveView

pytestmark = pytest.mark.timeout(60)


def test_tile_sends_only_the_viewport_and_full_resolution_when_zoomed_in() -> None:
    image = np.zeros((1024, 768), np.float32)
    image[700, 101] = 50.0  # one bright pixel, as a Bragg peak on a dark detector
    image[3, 5] = 7.0
    whole = viewport_tile(image, x0=0, x1=768, y0=0, y1=1024, px=256)
    assert (whole.block, whole.data.shape) == (4, (256, 192))  # ceil(1024 / 256) = 4
    assert whole.data[700 // 4, 101 // 4] == 50.0 and whole.data.sum() == 57.0  # max, not mean
    near = viewport_tile(image, x0=90.5, x1=110.2, y0=690, y1=710, px=256)
    assert (near.r0, near.c0, near.r1, near.c1, near.block) == (690, 90, 710, 111, 1)
    assert near.data.shape == (20, 21) and near.data[10, 11] == 50.0 and near.data.sum() == 50.0
    # half zoomed: a 600-px-wide view into 256 px is 3x3 blocks, the peak still there
    mid = viewport_tile(image, x0=0, x1=600, y0=500, y1=900, px=256)
    assert mid.block == 3 and mid.data[(700 - 500) // 3, 101 // 3] == 50.0
    assert mid.headers()["X-Tile-Box"] == "500,0,900,600"
    # partly outside the detector: clipped to it
    edge = viewport_tile(image, x0=-50, x1=10, y0=1000, y1=1100, px=64)
    assert (edge.r0, edge.c0, edge.r1, edge.c1) == (1000, 0, 1024, 10)


@pytest.mark.parametrize(
    ("viewport", "field"),
    [
        ({"x0": "a", "x1": 1, "y0": 0, "y1": 1, "px": 64}, "x0"),
        ({"x0": 0, "x1": 1, "y0": 0, "y1": float("nan"), "px": 64}, "y1"),
        ({"x0": 0, "x1": 10, "y0": 0, "y1": 10, "px": 4}, "px"),
        ({"x0": 900, "x1": 990, "y0": 0, "y1": 10, "px": 64}, "x0..x1, y0..y1"),
    ],
)
def test_bad_viewports_are_refused_by_name(viewport: dict, field: str) -> None:
    with pytest.raises(ValueError) as err:
        viewport_tile(np.zeros((100, 100)), **viewport)
    assert str(err.value).startswith(f"{field}: ")


def test_auto_limits_ignore_a_few_hot_pixels() -> None:
    rng = np.random.default_rng(1)
    image = rng.uniform(10, 20, (200, 200)).astype(np.float32)
    image[:2, :2] = 1e6  # 4 hot pixels of 40000: below the 99.9th percentile
    low, high = auto_limits(image)
    assert 10 <= low < 10.5 and 19.5 < high <= 20


def test_units_and_steering_markers() -> None:
    assert param_text("sample_position_um", 150.0, "um") == "sample position = 150 µm"
    assert param_text("detector_distance_mm", 100) == "detector distance = 100 mm"
    assert param_text("hit_fraction", 0.3) == "hit fraction = 0.3"
    events = steering_events(
        [
            {"t": 10.0, "kind": "run_start", "run": 2, "by": ""},
            {"t": 12.5, "kind": "param", "name": "sample_position_um", "value": 40.0, "by": "ann"},
            {"t": 13.0, "kind": "something else"},
        ],
        {"sample_position_um": "um"},
    )
    assert events["t"] == [10_000.0, 12_500.0]
    assert events["label"] == [
        "run 2 started (the source)",
        "sample position = 40 µm (ann)",
    ]


class _R:  # the fields of a FrameResult the log reads
    def __init__(self, seq: int, run: int, hit: bool, n_peaks: int) -> None:
        self.seq, self.run, self.hit, self.n_peaks, self.source_rev = seq, run, hit, n_peaks, 0


def test_frame_log_runs_and_exports() -> None:
    log = FrameLog()
    frames = [(s, 1 if s < 6 else 2, s % 3 == 0, 12 if s % 3 == 0 else 1) for s in range(10)]
    for seq, run, hit, n in frames:
        log.add(_R(seq, run, hit, n), t=1000.0 + seq)
    runs = log.runs()
    assert [(r["run"], r["frames"], r["hits"], r["first_seq"], r["last_seq"]) for r in runs] == [
        (1, 6, 2, 0, 5),  # seq 0, 3 hit
        (2, 4, 2, 6, 9),  # seq 6, 9 hit
    ]
    assert runs[1]["peaks_per_frame"] == pytest.approx((12 + 1 + 1 + 12) / 4, abs=1e-3)
    assert log.run_events() == [
        {"t": 1005.0, "kind": "run_stop", "run": 1},
        {"t": 1006.0, "kind": "run_start", "run": 2},
    ]
    rows = list(csv.reader(io.StringIO(log.to_csv(run=2))))
    assert rows[0] == ["seq", "run", "time_unix", "hit", "n_peaks", "source_rev"]
    assert [r[:2] + r[3:5] for r in rows[1:]] == [
        [str(s), "2", str(int(h)), str(n)] for s, run, h, n in frames if run == 2
    ]
    with h5py.File(io.BytesIO(log.to_hdf5(attrs={"stream": "det"})), "r") as f:
        assert list(f["frames/seq"][:]) == list(range(10))
        assert list(f["frames/hit"][:]) == [int(h) for _, _, h, _ in frames]
        assert f.attrs["stream"] == "det"


@pytest.fixture(scope="module")
def hit_frame() -> tuple[Frame, object]:
    det = SimulatedDetector((512, 512), seed=11, hit_fraction=1.0)
    analyzer = Analyzer()
    for i in range(20):
        data, meta = det.generate()
        frame = Frame(
            FrameHeader(stream="t", seq=i, dtype=data.dtype.str, shape=data.shape, meta=meta), data
        )
        result = analyzer.analyse(frame)
        if result.hit:
            return frame, result
    raise AssertionError("the simulator made no hit in 20 frames at hit_fraction 1")


def _wait(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.02)
    return value


def test_liveview_zooms_into_the_last_hit_with_contrast_and_markers(hit_frame, tmp_path) -> None:
    frame, result = hit_frame
    view = LiveView(max_hz=10.0, image_hz=5.0, image_size=128)
    try:
        view.feed(result, frame)
        _wait(lambda: view.tile is not None, "the first tile")
        assert view.tile.block == 4 and view.image_source.data["image"][0].shape == (128, 128)
        assert view.image_shows.startswith(f"last hit: frame {result.seq} (run 0) at ")
        assert f"image: <b>{view.image_shows}</b>" in view.info.text
        # zoom onto the brightest peak: a 32x32 region arrives at full resolution
        row, col = (int(v) for v in result.peaks[0, :2])
        view.request_view(x0=col - 16, x1=col + 16, y0=row - 16, y1=row + 16)
        tile = _wait(lambda: view.tile if view.tile.block == 1 else None, "a full-resolution tile")
        assert (tile.r0, tile.c0) == (row - 16, col - 16) and tile.data.shape == (32, 32)
        np.testing.assert_array_equal(
            tile.data, frame.data[row - 16 : row + 16, col - 16 : col + 16]
        )
        shown = view.image_source.data
        assert (shown["x"], shown["y"], shown["dw"], shown["dh"]) == (
            [col - 16],
            [row - 16],
            [32],
            [32],
        )
        pixels = shown["image"][0]
        assert pixels[16, 16] >= 250  # the peak's pixel at the top of the automatic scale
        # fixed contrast: the same pixels map differently
        view.set_contrast(0.0, float(frame.data.max()) * 10)
        _wait(lambda: view.image_source.data["image"][0][16, 16] < 40, "the new contrast")
        assert view.scale_mapper.high == pytest.approx(float(frame.data.max()) * 10)
        # a person types limits into the spinners (as the browser sends them): manual contrast
        view.set_contrast()  # automatic again
        _wait(lambda: view.contrast is None and view.auto_contrast.active, "automatic contrast")

        def typed() -> None:
            view.contrast_low.value = 1.0
            view.contrast_high.value = 2.0

        view.loop.add_callback(typed)
        _wait(lambda: view.contrast == (1.0, 2.0), "the typed limits")
        assert view.auto_contrast.active is False
        _wait(lambda: view.scale_mapper.high == 2.0, "the colour bar at the typed limits")
        with pytest.raises(ValueError, match=r"^low: 5 must be below high"):
            view.set_contrast(5, 1)
        with pytest.raises(ValueError, match=r"^palette: 'Jet' is not one of"):
            view.set_palette("Jet")
        # a steering change and a run start: marked with what and who
        view.mark("param", "ann", name="sample_position_um", value=150.0)
        view.feed(replace(result, seq=result.seq + 1, run=1, hit=False), None)
        _wait(lambda: len(view.events_source.data["label"]) == 1, "the steering marker")
        assert view.events_source.data["label"] == ["sample position = 150 µm (ann)"]
        path = view.export_csv(tmp_path / "frames.csv", run=1)
        rows = list(csv.DictReader(open(path)))
        assert [(r["seq"], r["run"], r["hit"]) for r in rows] == [(str(result.seq + 1), "1", "0")]
    finally:
        view.close()
