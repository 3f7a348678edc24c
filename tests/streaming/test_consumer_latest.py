"""The freshest-frame reader (``StreamConsumer.receive_latest``) on real ZeroMQ sockets and a real
in-process DSN: stale frames are skipped and counted, the work face stays lossless."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from beamhub.bench.steer_stack import SteerStack
from beamhub.streaming.consumer import StreamConsumer

from .dataplane_helpers import frame_ok, send_frames

pytestmark = pytest.mark.timeout(60)


def wait_queued(sock: zmq.Socket, settle_s: float = 0.3) -> None:
    """Frames sent on loopback: wait until the first is readable, then let the rest land."""
    assert sock.poll(5000), "no frame arrived within 5 s"
    time.sleep(settle_s)


def test_receive_latest_returns_the_newest_waiting_frame_and_counts_the_others(ctx):
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    pub.sndhwm = 1000
    pub.bind_to_random_port("tcp://127.0.0.1")
    viewer = StreamConsumer(pub.last_endpoint.decode(), monitor=True, hwm=1000, context=ctx)
    try:
        deadline = time.monotonic() + 5
        while viewer.receive(timeout=0.05) is None:  # the subscription reaches the publisher
            send_frames(pub, [0])
            assert time.monotonic() < deadline, "the SUB socket never got a frame"
        while viewer.receive(timeout=0.2) is not None:
            pass  # drain the joining frames: the test starts from an empty queue
        base = viewer.frames

        send_frames(pub, range(1, 11))  # ten frames wait
        wait_queued(viewer.sock)
        frame = viewer.receive_latest(timeout=1)
        assert frame is not None and frame.header.seq == 10 and frame_ok(frame)
        assert viewer.skipped_stale == 9
        assert viewer.frames - base == 10  # skipped frames were received, not lost
        assert viewer.lost == 0

        send_frames(pub, range(11, 14))
        wait_queued(viewer.sock)
        assert viewer.receive_latest(timeout=1).header.seq == 13
        assert viewer.skipped_stale == 9 + 2
        assert viewer.receive_latest(timeout=0.05) is None  # nothing waits: nothing to skip
        stats = viewer.stats()
        assert (stats["skipped_stale"], stats["lost"], stats["last_seq"]) == (11, 0, 13)
    finally:
        viewer.close()


def test_a_slow_freshest_viewer_skips_while_the_work_stream_stays_lossless():
    with SteerStack(shape=(64, 64), rate_hz=200.0) as stack:
        token = stack.token("stream.read")
        work = StreamConsumer.from_dsn(stack.dsn_url, stack.channel_id, token, exclusive=True)
        viewer = StreamConsumer.from_dsn(
            stack.dsn_url, stack.channel_id, token, monitor=True, hwm=4
        )
        work_seqs: list[int] = []
        stop = threading.Event()

        def drain_work() -> None:
            while not stop.is_set():
                frame = work.receive(timeout=0.1)
                if frame is not None:
                    work_seqs.append(frame.header.seq)

        reader = threading.Thread(target=drain_work, daemon=True)
        reader.start()
        shown: list[tuple[int, float]] = []  # (seq, age in ms when returned)
        try:
            t_end = time.monotonic() + 2.5
            while time.monotonic() < t_end:
                frame = viewer.receive_latest(timeout=1)
                if frame is not None:
                    shown.append((frame.header.seq, (time.time_ns() - frame.header.t_ns) / 1e6))
                time.sleep(0.05)  # a viewer that redraws at 20 Hz, 10 frame periods per redraw
            stop.set()
            reader.join(5)
            source = stack.runner.stats()
            view_stats, work_stats = viewer.stats(), work.stats()
        finally:
            stop.set()
            viewer.close()
            work.close()

    seqs = [s for s, _ in shown]
    assert len(seqs) >= 10, f"the viewer got only {len(seqs)} frames"
    assert seqs == sorted(set(seqs)), "the freshest reader went back in time"
    # every redraw skipped frames that had queued meanwhile, and counted them
    assert view_stats["skipped_stale"] >= len(seqs)
    assert view_stats["frames"] == len(seqs) + view_stats["skipped_stale"]
    # what was shown was fresh: on average the viewer is far fewer than 10 frames behind
    ages = sorted(a for _, a in shown)
    assert ages[len(ages) // 2] < 10 * 5.0, f"median age {ages[len(ages) // 2]} ms"
    # the work face got every frame: contiguous, no gap, none dropped at the source
    assert len(work_seqs) > 300
    assert work_seqs == list(range(work_seqs[0], work_seqs[0] + len(work_seqs)))
    assert work_stats["lost"] == 0 and work_stats["skipped_stale"] == 0
    assert source["dropped_at_source"] == 0
