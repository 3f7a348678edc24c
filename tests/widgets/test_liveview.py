"""LiveView: throttled, coalesced bokeh updates whatever the frame rate; the latest results, frames
lost and latency shown; fed by a real stream; and in a real ipykernel, updates on the kernel's
IOLoop (main thread) with iopub traffic far below jupyter_server's rate limits."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from beamhub.bench.liveview import IOPUB_MSG_RATE_LIMIT, iopub_rates, measure_liveview
from beamhub.bench.steer_stack import SteerStack
from beamhub.streaming.analysis import Analyzer, FrameResult
from beamhub.streaming.consumer import StreamConsumer
from beamhub.streaming.simulator import SimulatedDetector
from beamhub.streaming.wire import Frame, FrameHeader
from beamhub.widgets.liveview import LiveView, downsample_max

pytestmark = pytest.mark.timeout(60)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.02)
    return value


@pytest.fixture(scope="module")
def pool() -> tuple[list[Frame], list[FrameResult]]:
    det = SimulatedDetector((512, 512), seed=5)
    frames = []
    for i in range(12):
        data, meta = det.generate()
        frames.append(
            Frame(
                FrameHeader(stream="t", seq=i, dtype=data.dtype.str, shape=data.shape, meta=meta),
                data,
            )
        )
    analyzer = Analyzer()
    return frames, [analyzer.analyse(f) for f in frames]


def test_downsample_keeps_the_brightest_pixel() -> None:
    image = np.zeros((1024, 1000), np.float32)
    image[517, 3] = 9.0
    small = downsample_max(image, 256)
    assert small.shape == (256, 250) and small[517 // 4, 0] == 9.0 and small.sum() == 9.0


def test_120_results_per_second_give_at_most_10_updates_per_second(pool) -> None:
    frames, results = pool
    view = LiveView(max_hz=10.0, image_hz=2.0)
    fed: list[FrameResult] = []
    gap = range(100, 105)  # five frames the stream lost

    def feed() -> None:
        t0 = time.monotonic()
        for i in range(240):  # 2 s at 120 Hz
            delay = t0 + i / 120 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if i in gap:
                continue
            k = i % len(results)
            result = replace(results[k], seq=i, latency_s=0.004 + 0.001 * (i % 3))
            fed.append(result)
            view.feed(result, frames[k])

    feeder = threading.Thread(target=feed)
    t0 = time.monotonic()
    feeder.start()
    feeder.join(20)
    elapsed = time.monotonic() - t0
    wait_for(lambda: view.results_seen == 235, what="all results folded")
    updates_while_feeding = view.updates
    view.stop()  # one final update with whatever is left
    try:
        assert updates_while_feeding <= 10 * elapsed + 1.5, (updates_while_feeding, elapsed)
        assert updates_while_feeding >= 10, updates_while_feeding  # it did keep updating
        assert view.updates <= updates_while_feeding + 2
        assert view.last_flush_thread == "liveview-loop"  # one thread touches the document
        # each update is one PATCH-DOC: 3 comm messages + 2 per binary buffer (the image)
        assert view.bokeh.messages_sent <= 5 * view.updates + 2
        # the figures show the latest results: a recent hit's image with its own peaks on it
        shown = view.image_result
        assert shown is not None and shown.hit and shown.seq >= fed[-1].seq - 120 * 1.5
        peaks = view.peaks_source.data
        assert peaks["x"] == shown.peaks[:, 1].round(1).tolist()
        assert peaks["y"] == shown.peaks[:, 0].round(1).tolist()
        hits = [r.hit for r in fed[-view.stats.window :]]
        assert view.series_source.data["hit_rate"][-1] == pytest.approx(
            sum(hits) / len(hits), abs=1e-3
        )
        assert len(view.series_source.data["t"]) <= view.updates
        image = view.image_source.data["image"][0]
        assert image.dtype == np.uint8 and image.shape == (256, 256)
        assert view.image_source.data["dw"] == [512]
        text = view.info.text
        assert "frames: <b>235</b>" in text and "lost: <b>5</b>" in text
        assert "latency p50: <b>5 ms</b>" in text and f"last seq: <b>{fed[-1].seq}</b>" in text
        assert len(view.profile_source.data["intensity"]) > 100
    finally:
        view.close()


def test_fed_by_a_real_stream_with_listeners(pool) -> None:
    with SteerStack(shape=(256, 256), rate_hz=60.0) as stack:
        token = stack.token("stream.read")
        consumer = StreamConsumer.from_dsn(stack.dsn_url, stack.channel_id, token, exclusive=True)
        view = LiveView.from_consumer(consumer, Analyzer(), max_hz=5.0)
        seen: list[tuple[int, int]] = []
        view.add_listener(lambda r: seen.append((r.seq, r.source_rev)))
        try:
            wait_for(lambda: view.stats.frames >= 40 and view.updates >= 2, what="frames shown")
            assert view.image_source.data["image"][0].shape == (256, 256)
            assert seen and seen[-1][0] >= 39 and seen[0][1] == 0
            assert "frames: <b>" in view.info.text and view.error is None
        finally:
            view.close()
        assert consumer._closed  # stopping the view closed its consumer


def test_a_failing_feed_is_shown_in_the_view_not_raised() -> None:
    class Broken:
        _closed = False

        def receive(self, timeout=None):
            raise OSError("socket gone")

        def close(self):
            self._closed = True

    broken = Broken()
    view = LiveView.from_consumer(broken, max_hz=20.0)
    try:
        wait_for(lambda: "socket gone" in view.info.text, what="error in the view")
        assert view.error == "OSError: socket gone" and broken._closed
    finally:
        view.close()


def test_bad_rates_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="max_hz"):
        LiveView(max_hz=0)
    with pytest.raises(ValueError, match="image_hz"):
        LiveView(max_hz=5, image_hz=6)


def test_rate_window_counts_like_jupyter_server() -> None:
    burst = [(i / 2000, "comm_msg", 10) for i in range(7000)]  # 2000 msg/s for 3.5 s
    assert iopub_rates(burst)["would_warn"] is True
    calm = [(i / 100, "comm_msg", 10) for i in range(500)] + [(0.5, "status", 10)]
    rates = iopub_rates(calm)
    assert rates["would_warn"] is False and rates["peak_msgs_per_s"] <= 101


@pytest.mark.timeout(150)
def test_behind_a_real_jupyter_server_no_iopub_warning_unlike_the_unthrottled_baseline() -> None:
    # 240 results/s for 3.5 s (> the server's 3 s window), through jupyter_server's websocket
    out = measure_liveview(seconds=3.5, rate_hz=240.0, max_hz=10.0, via="server")
    assert out["results_fed"] == 840
    assert 20 <= out["updates"] <= 10 * 3.5 + 3, out  # ~10/s, plus the final one
    assert out["flushed_on"] == out["kernel_main_thread"] == "MainThread"  # the kernel's loop
    assert out["peak_msgs_per_s"] < IOPUB_MSG_RATE_LIMIT / 10, out
    assert out["would_warn"] is False and out["server_rate_warnings"] == 0, out
    naive = measure_liveview(seconds=3.5, rate_hz=240.0, via="server", naive=True)
    assert naive["server_rate_warnings"] >= 1, naive  # the server does warn without throttling
    assert naive["would_warn"] is True


def test_from_dsn_work_face_and_a_monitor_view_alongside() -> None:
    with SteerStack(shape=(256, 256), rate_hz=60.0) as stack:
        token = stack.token("stream.read")
        work = LiveView.from_dsn(stack.dsn_url, "det", token, max_hz=5.0)
        watch = LiveView.from_dsn(stack.dsn_url, stack.channel_id, token, monitor=True, max_hz=5.0)
        try:
            assert work.consumer.role == "work" and watch.consumer.role == "monitor"
            for view in (work, watch):
                wait_for(lambda v=view: v.stats.frames >= 30 and v.updates >= 2, what="frames")
                assert "lost: <b>" in view.info.text and view.error is None
            # the only work consumer: a seq gap is a frame the source itself dropped (its queue
            # was full), never one lost between the DSN and this view
            assert work.stats.lost() <= stack.runner.stats()["dropped_at_source"]
            # the monitor view reads the freshest frame: what it skipped is shown as such
            assert watch.latest and not work.latest
            wait_for(lambda: "skipped (stale): <b>" in watch.info.text, what="skip count")
            assert "skipped (stale)" not in work.info.text
        finally:
            watch.close()
            work.close()


@pytest.mark.timeout(90)
def test_from_session_shows_dask_results_and_the_powder_pattern() -> None:
    import functools

    from distributed import Client, LocalCluster

    from beamhub.streaming.analysis_dask import AnalysisSession

    with (
        SteerStack(shape=(256, 256), rate_hz=60.0) as stack,
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        factory = functools.partial(
            StreamConsumer.from_dsn, stack.dsn_url, stack.channel_id, stack.token("stream.read")
        )
        session = AnalysisSession(client, factory, workers=1)
        view = LiveView.from_session(session, max_hz=5.0, image_hz=5.0)
        try:
            wait_for(
                lambda: (
                    view.stats.frames >= 30 and view.updates >= 2 and view.stats.powder is not None
                ),
                timeout=30,
                what="session results",
            )
            wait_for(lambda: view.image_source.data["dw"] != [1], what="powder image")
            image = view.image_source.data["image"][0]
            assert image.dtype == np.uint8 and image.shape == view.stats.powder.shape
            assert view.image_source.data["dw"] == [256]  # powder bins cover the detector
            assert view.last_flush_thread == "liveview-loop"
        finally:
            view.stop()
            session.stop()
            view.close()
