"""Live analysis: parameter swaps, the worker loop over real ZeroMQ, aggregates, Dask workers."""

from __future__ import annotations

import functools
import threading
import time

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from beamhub.streaming.analysis import Analyzer, FrameResult, RunningStats, analyse_stream
from beamhub.streaming.consumer import StreamConsumer
from beamhub.streaming.params import ParamError
from beamhub.streaming.simulator import SimulatedDetector
from beamhub.streaming.wire import Frame, FrameHeader, send_frame

SHAPE = (384, 384)


def make_frames(n, *, seed=7, first_seq=0, hit_fraction=0.5):
    det = SimulatedDetector(SHAPE, seed=seed, hit_fraction=hit_fraction, peaks_per_hit=30)
    out = []
    for i in range(n):
        data, meta = det.generate()
        header = FrameHeader(
            stream="sim",
            seq=first_seq + i,
            dtype=data.dtype.str,
            shape=data.shape,
            t_ns=time.time_ns(),
            meta=meta,
        )
        out.append(Frame(header, data))
    return out


@pytest.fixture(scope="module")
def frames():
    return make_frames(24)


def push_socket(ctx):
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def send_all(sock, frames):
    for f in frames:
        send_frame(sock, FrameHeader(**{**f.header.__dict__, "t_ns": time.time_ns()}), f.data)


def test_live_parameter_change_applies_from_the_next_frame(frames):
    analyzer = Analyzer()
    changed_at = 9
    results: list[FrameResult] = []

    def on_result(result):
        results.append(result)
        if result.seq == changed_at:
            assert analyzer.set_params(adc_threshold=1e7) == 1

    assert analyse_stream(iter(frames), analyzer, on_result) == len(frames)
    before = [r for r in results if r.seq <= changed_at]
    after = [r for r in results if r.seq > changed_at]
    assert [r.params_rev for r in before] == [0] * len(before)
    assert [r.params_rev for r in after] == [1] * len(after)
    assert all(r.n_peaks == 0 and not r.hit for r in after)
    truth = [f.header.meta["hit"] for f in frames]
    assert [r.hit for r in before] == truth[: changed_at + 1]
    assert any(truth[: changed_at + 1]), "the frames before the change must contain hits"


def test_change_from_another_thread_never_mixes_parameters_within_a_frame(frames):
    analyzer = Analyzer()
    results: list[FrameResult] = []
    halfway = threading.Event()

    def feed():
        for i, frame in enumerate(frames * 3):
            if i == len(frames):
                halfway.set()
            yield frame

    steerer = threading.Thread(
        target=lambda: halfway.wait(30) and analyzer.set_params(adc_threshold=1e7)
    )
    steerer.start()
    analyse_stream(feed(), analyzer, results.append)
    steerer.join(timeout=30)
    revs = [r.params_rev for r in results]
    assert revs == sorted(revs) and revs[0] == 0 and revs[-1] == 1
    assert all(r.n_peaks == 0 for r in results if r.params_rev == 1)
    truth = {f.header.seq: f.header.meta["hit"] for f in frames}
    assert all(r.hit == truth[r.seq] for r in results if r.params_rev == 0)


def test_invalid_live_change_is_refused_and_changes_nothing():
    analyzer = Analyzer({"min_snr": 7})
    with pytest.raises(ParamError) as info:
        analyzer.set_params(min_snr=-3, adc_threshold=10)
    assert info.value.field == "min_snr"
    assert analyzer.rev == 0 and analyzer.params.min_snr == 7 and analyzer.params.adc_threshold == 0
    with pytest.raises(ParamError) as info:
        analyzer.set_params({"sigma": 3})
    assert info.value.field == "sigma"


def test_bad_frame_leaves_an_error_result():
    header = FrameHeader(stream="s", seq=3, dtype="<f4", shape=(8,))
    result = Analyzer().analyse(Frame(header, np.zeros(8, dtype=np.float32)))
    assert result.seq == 3 and result.error and "2-D" in result.error and not result.hit


@pytest.mark.timeout(60)
def test_worker_loop_over_a_real_zeromq_stream(frames):
    ctx = zmq.Context()
    push, endpoint = push_socket(ctx)
    stats = RunningStats(window=10)
    try:
        sender = threading.Thread(target=send_all, args=(push, frames))
        sender.start()
        with StreamConsumer(endpoint) as consumer:
            n = analyse_stream(
                consumer, Analyzer(), stats.add, max_frames=len(frames), idle_timeout_s=0.05
            )
        sender.join(timeout=10)
        assert not sender.is_alive()
    finally:
        push.close(linger=0)
        ctx.term()
    truth_hits = sum(f.header.meta["hit"] for f in frames)
    assert n == len(frames)
    snap = stats.snapshot()
    assert snap["frames"] == len(frames) and snap["lost"] == 0 and snap["duplicates"] == 0
    assert snap["hits"] == truth_hits
    assert snap["hit_rate"] == pytest.approx(sum(f.header.meta["hit"] for f in frames[-10:]) / 10)
    assert snap["powder"].sum() == stats.peaks_total > 0
    assert snap["radial_profile"] is not None and snap["latency_p50_ms"] > 0


def _result(seq, hit=False, peaks=(), worker="w", profile=None, stream="s"):
    arr = np.array([[y, x, 100.0, 10.0, 5.0] for y, x in peaks], dtype=np.float32).reshape(-1, 5)
    return FrameResult(
        stream, seq, 0, 0, 0, (64, 64), hit, len(arr), arr, profile, 0.01, 0.001, worker
    )


def test_running_stats_window_loss_duplicates_powder_profile():
    stats = RunningStats(window=4, powder_bin=8)
    for seq in (0, 2, 1, 5, 5, 4):  # out of order, 3 missing, one duplicate
        stats.add(
            _result(
                seq,
                hit=seq % 2 == 0,
                peaks=[(3.0, 9.0), (60.0, 60.0)],
                profile=np.full(10, float(seq)),
            )
        )
    snap = stats.snapshot()
    assert snap["frames"] == 5 and snap["duplicates"] == 1 and snap["lost"] == 1  # seq 3
    assert snap["hit_rate"] == 0.5  # window of 4: seqs 2, 1, 5, 4 -> two even ones are hits
    assert snap["hits"] == 3 and snap["hit_rate_total"] == pytest.approx(3 / 5)
    assert snap["powder"].shape == (8, 8)  # 64 px / 8
    assert snap["powder"][0, 1] == 5 and snap["powder"][7, 7] == 5 and snap["powder"].sum() == 10
    assert snap["radial_profile"][0] == pytest.approx(np.mean([2, 1, 5, 4]))  # last 4 profiles


def test_running_stats_accepts_results_older_than_the_first_one():
    stats = RunningStats()
    for seq in (3, 1, 4, 0, 1, 6):  # two workers: 3 and 4 overtook 0 and 1; 2 and 5 missing
        stats.add(_result(seq))
    assert stats.frames == 5 and stats.duplicates() == 1 and stats.lost() == 2


def test_running_stats_hit_rate_window():
    stats = RunningStats(window=4)
    for seq, hit in enumerate([True, True, True, True, False, False, False]):
        stats.add(_result(seq, hit=hit))
    assert stats.hit_rate == pytest.approx(1 / 4)
    assert stats.snapshot()["hit_rate_total"] == pytest.approx(4 / 7)


@pytest.fixture(scope="module")
def dask_client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={"dashboard": False},
        host="127.0.0.1",
    )  # HTTP server on an ephemeral port, no bokeh
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _wait_handshakes(monitor, n, timeout=30.0):
    deadline = time.monotonic() + timeout
    seen = 0
    while seen < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {seen} of {n} consumers connected")
        if monitor.poll(200):
            event = recv_monitor_message(monitor)
            seen += event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED


@pytest.mark.timeout(150)
def test_dask_workers_pull_their_own_frames_and_follow_a_broadcast(dask_client):
    from beamhub.streaming.analysis_dask import AnalysisSession

    phase1 = make_frames(30, seed=21)
    phase2 = make_frames(30, seed=22, first_seq=30)
    ctx = zmq.Context()
    push, endpoint = push_socket(ctx)
    monitor = push.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    session = AnalysisSession(
        dask_client,
        functools.partial(StreamConsumer, endpoint, hwm=2),
        workers=2,
        flush_interval_s=0.05,
    )
    try:
        session.wait_ready(timeout=60)
        _wait_handshakes(monitor, 2)  # both workers' PULL sockets are connected: PUSH deals fairly
        send_all(push, phase1)
        seen = session.wait_for(lambda: session.stats.frames >= 30, 60, "30 frames")
        rev = session.set_params(adc_threshold=1e7)
        session.wait_applied(rev, timeout=20)
        send_all(push, phase2)
        seen += session.wait_for(lambda: session.stats.frames >= 60, 60, "60 frames")
        summaries = session.stop()
    finally:
        session.stop()
        push.disable_monitor()
        monitor.close(linger=0)
        push.close(linger=0)
        ctx.term()
    assert sorted(r.seq for r in seen) == list(range(60)), "every frame once, none lost"
    snap = session.stats.snapshot()
    assert snap["lost"] == 0 and snap["duplicates"] == 0 and snap["errors"] == 0
    assert sum(s["frames"] for s in summaries) == 60
    assert {s["rev"] for s in summaries} == {1}
    by_seq = {r.seq: r for r in seen}
    assert [by_seq[f.header.seq].hit for f in phase1] == [f.header.meta["hit"] for f in phase1]
    late = [by_seq[f.header.seq] for f in phase2]
    assert all(r.params_rev == 1 and r.n_peaks == 0 for r in late)
    workers = {r.worker for r in seen}
    assert len(workers) == 2 and {r.worker for r in late} == workers, "the broadcast reached both"
    assert snap["radial_profile"] is not None and snap["per_worker"].keys() == workers


@pytest.mark.timeout(60)
def test_dask_session_refuses_bad_requests_by_name(dask_client):
    from beamhub.streaming.analysis_dask import AnalysisSession

    factory = functools.partial(StreamConsumer, "tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="workers: asked for 5"):
        AnalysisSession(dask_client, factory, workers=5)
    with pytest.raises(ParamError) as info:
        AnalysisSession(dask_client, factory, params={"min_snr": 0})
    assert info.value.field == "min_snr"
    session = AnalysisSession(dask_client, factory, workers=1)
    try:
        session.wait_ready(timeout=30)
        with pytest.raises(ParamError) as info:
            session.set_params(max_pixel_count=0)
        assert info.value.field == "max_pixel_count" and session.rev == 0
    finally:
        summaries = session.stop()
    assert summaries[0]["frames"] == 0 and summaries[0]["rev"] == 0


@pytest.mark.timeout(120)
def test_bench_analysis_prints_the_agreed_json(capsys):
    import json

    from beamhub.bench.analysis import main

    argv = ["--json", "--frames", "6", "--pool", "3", "--repeats", "2", "--workers", "2,1"]
    assert main([*argv, "--hit-fractions", "1.0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["hit_fraction"] for r in out["finders"]["rows"]] == [1.0]
    modes = [(r["mode"], r["workers"]) for r in out["results"]]
    assert modes == [("numpy", 1), ("dask", 1), ("dask", 2)]
    for r in out["results"]:
        assert r["frames_per_s"] > 0 and r["frames_per_s_per_core"] > 0
        assert len(r["passes"]) == 2  # both counts measured in every round
    assert 0 <= out["recall"] <= 1 and 0 <= out["precision"] <= 1
    assert out["efficiency"]["1"] > 0 and out["frame_bytes"] == 4 * 1024 * 1024
    # in-run ratios: one worker against itself is 1 by construction, two workers against it > 0
    assert out["scaling_efficiency"]["1"] == out["cpu_scaling_efficiency"]["1"] == 1.0
    assert out["scaling_efficiency"]["2"] > 0 and out["cpu_scaling_efficiency"]["2"] > 0
    two = out["results"][2]
    assert two["sender_cpu_cores"] > 0 and two["worker_cpu_cores"] > 0
    assert len(out["loadavg_before"]) == 3


@pytest.mark.timeout(120)
def test_finder_comparison_with_onda_monitor_on_the_same_frames(capsys):
    """beamhub's finder beside OM's peakfinder8 (when ondamonitor is installed): same peaks."""
    import json

    from beamhub.bench._onda import om_unavailable
    from beamhub.bench.analysis import main

    argv = ["--json", "--finders-only", "--pool", "4", "--repeats", "1"]
    assert main([*argv, "--hit-fractions", "0.3,1.0"]) == 0
    out = json.loads(capsys.readouterr().out)["finders"]
    rows = out["rows"]
    assert [r["hit_fraction"] for r in rows] == [0.3, 1.0]
    assert rows[1]["hits"] == 4 and rows[1]["true_peaks"] > 40
    for row in rows:
        assert row["beamhub"]["recall"] >= 0.99 and row["beamhub"]["precision"] >= 0.99
        assert row["beamhub"]["frames_per_s_per_core"] > 0
    if om_unavailable() is not None:  # the optional bench extra is not installed here
        assert "ondamonitor" in out["om"] and out["meets_targets"] is None
        return
    for row in rows:
        for om in ("om", "om_fast"):
            assert row[om]["frames_per_s_per_core"] > 0
            assert row[f"agreement_vs_{om}"] >= 0.99, row
            assert row[f"beamhub_vs_{om}"] > 0
    assert set(out["meets_targets"]) == {"vs_om_fast", "recall_precision", "agreement"}


@pytest.mark.timeout(60)
def test_a_failing_worker_task_surfaces_in_poll_and_stop(dask_client):
    from beamhub.streaming.analysis_dask import AnalysisSession

    session = AnalysisSession(
        dask_client, functools.partial(StreamConsumer, "no-endpoint"), workers=1
    )
    with pytest.raises(ValueError, match="endpoint"):
        session.wait_ready(timeout=30)
    summaries = session.stop()
    assert summaries[0]["index"] == 0 and "endpoint" in summaries[0]["error"]
