"""L7 gateway with batch messages (n events under one header) and its XPUB monitor, on real sockets."""

from __future__ import annotations

import json

import numpy as np
import zmq

from beamhub.streaming.wire import decode_events, send_batch

from .dataplane_helpers import make_spec, wait_for, wait_stats
from .test_dataplane import pull, push


def _events(n: int, first: int = 0) -> np.ndarray:
    """n events of 1 KiB; event ``seq`` holds ``seq, seq + 1, ...`` so order and content show."""
    rows = np.arange(first, first + n)[:, None] + np.arange(512)[None, :]
    return rows.astype("<u2")


def test_batches_pass_l7_and_count_as_events(plane, ctx):
    ep = plane.provision(make_spec("l7", max_frame_bytes=64 * 1024))
    consumer = pull(ctx, ep.work)
    producer = push(ctx, ep.producer)
    seq = 0
    for _ in range(5):
        seq = send_batch(producer, "det", seq, _events(64, seq))
    # checks made on a batch as a whole: stream, size of all events, header
    send_batch(producer, "other", seq, _events(8))
    producer.send_multipart(
        [json.dumps({"v": 1, "stream": "det", "seq": seq, "dtype": "<u2", "shape": [512],
                     "batch": 8}).encode(), bytes(7 * 1024)]
    )  # fmt: skip
    send_batch(producer, "det", seq, _events(128))  # 128 KiB: over max_frame_bytes
    events = []
    while len(events) < 320:
        assert consumer.poll(5000), f"only {len(events)} of 320 events arrived"
        events.extend(decode_events(consumer.recv_multipart(copy=False)))
    assert [e.header.seq for e in events] == list(range(320))
    assert np.array_equal(np.stack([e.data for e in events]), _events(320))
    stats = wait_stats(plane, "ch-l7", lambda s: sum(s["drops"].values()) == 8 + 1 + 1)
    assert stats["messages"] == 320
    assert stats["head_seq"] == 319
    # a policy drop counts the batch's events; a malformed message counts once (untrusted header)
    assert stats["drops"] == {"stream": 8, "truncated": 1, "oversized": 1}


def test_rate_limit_counts_events_not_messages(plane, ctx):
    ep = plane.provision(make_spec("l7", max_rate_hz=100.0, max_frame_bytes=64 * 1024))
    consumer = pull(ctx, ep.work)
    producer = push(ctx, ep.producer)
    seq = 0
    for _ in range(10):  # 10 batches of 50 events at once: the bucket holds about 100
        seq = send_batch(producer, "det", seq, _events(50, seq))
    stats = wait_stats(plane, "ch-l7", lambda s: s["messages"] + s["drops"].get("rate", 0) == 500)
    assert 100 <= stats["messages"] <= 200, stats
    assert stats["messages"] % 50 == 0  # a batch passes or is dropped whole
    assert stats["drops"]["rate"] == 500 - stats["messages"]
    got = 0
    while got < stats["messages"]:
        assert consumer.poll(5000)
        got += len(decode_events(consumer.recv_multipart(copy=False)))
    assert got == stats["messages"]


def test_monitor_is_sent_only_while_someone_subscribes(plane, ctx):
    ep = plane.provision(make_spec("l7", max_frame_bytes=64 * 1024))
    consumer = pull(ctx, ep.work)
    producer = push(ctx, ep.producer)
    seq = send_batch(producer, "det", 0, _events(10))
    wait_stats(plane, "ch-l7", lambda s: s["messages"] == 10)
    assert consumer.poll(5000) and len(decode_events(consumer.recv_multipart())) == 10
    assert plane.stats("ch-l7")["monitor"]["sent"] == 0  # no viewer: no monitor send

    viewer = ctx.socket(zmq.SUB)
    viewer.linger = 0
    viewer.setsockopt(zmq.SUBSCRIBE, b"")
    viewer.connect(ep.monitor)
    seen: list[int] = []

    def viewer_sees_frames() -> bool:
        nonlocal seq
        seq = send_batch(producer, "det", seq, _events(1, seq))
        consumer.recv_multipart()
        while viewer.poll(20):
            seen.extend(e.header.seq for e in decode_events(viewer.recv_multipart()))
        return bool(seen)

    wait_for(viewer_sees_frames, timeout=10.0, interval=0.05)
    assert plane.stats("ch-l7")["monitor"]["sent"] >= len(seen) > 0
    viewer.close(linger=0)  # the last subscriber leaves: XPUB passes the unsubscription

    def monitor_idle() -> bool:
        nonlocal seq
        before = plane.stats("ch-l7")["monitor"]["sent"]
        seq = send_batch(producer, "det", seq, _events(1, seq))
        consumer.recv_multipart()
        wait_stats(plane, "ch-l7", lambda s: s["head_seq"] == seq - 1)
        return plane.stats("ch-l7")["monitor"]["sent"] == before

    wait_for(monitor_idle, timeout=10.0, interval=0.05)
