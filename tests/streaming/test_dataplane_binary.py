"""L7 gateway with binary headers: the same checks and drop reasons as JSON, on real sockets."""

from __future__ import annotations

import struct

import numpy as np

from beamhub.streaming.consumer import StreamConsumer
from beamhub.streaming.wire import (
    BINARY_MAGIC,
    FrameHeader,
    binary_header_packer,
    send_batch,
    send_frame,
)

from .dataplane_helpers import make_spec, wait_stats
from .test_dataplane import pull, push


def _event(seq: int) -> np.ndarray:
    return (np.arange(512) + seq).astype("<u2")  # 1 KiB whose content shows its seq


def test_binary_and_json_headers_pass_l7_with_the_same_checks(plane, ctx):
    ep = plane.provision(make_spec("l7", max_frame_bytes=64 * 1024))
    with StreamConsumer(ep.work, exclusive=True) as consumer:
        producer = push(ctx, ep.producer)
        pack = binary_header_packer("det", "<u2", (512,))
        for seq in range(0, 20):  # binary from the packer
            producer.send_multipart([pack(seq, 1000 + seq), _event(seq).tobytes()])
        for seq in range(20, 30):  # JSON and binary alternating, through the producer API
            header = FrameHeader("det", seq, "<u2", (512,), t_ns=1000 + seq, meta={"k": seq})
            send_frame(producer, header, _event(seq), binary=seq % 2 == 0)
        events = np.stack([_event(s) for s in range(30, 94)])
        send_batch(producer, "det", 30, events, t_ns=5, binary=True)  # 64 events
        # refused, each under its reason; a policy drop counts a batch's events
        producer.send_multipart([binary_header_packer("other", "<u2", (512,))(94, 1), _event(0)])
        send_batch(producer, "other", 95, events[:8], binary=True)
        producer.send_multipart([pack(95, 1), _event(0)[:-1].tobytes()])  # 1023 bytes
        producer.send_multipart([pack(95, 1), _event(0).tobytes() + b"xy"])
        big = binary_header_packer("det", "<u2", (50 * 1024,))(95, 1)  # 100 KiB > 64 KiB
        producer.send_multipart([big, bytes(100 * 1024)])
        wrong_version = bytearray(pack(95, 1))
        wrong_version[1] = 2
        producer.send_multipart([bytes(wrong_version), _event(0)])
        flagged = bytearray(pack(95, 1))
        flagged[6] = 1  # reserved flags
        producer.send_multipart([bytes(flagged), _event(0)])
        producer.send_multipart([pack(95, 1)[:30], _event(0)])  # cut short
        for seq in range(94, 100):  # the stream goes on after every refusal
            producer.send_multipart([pack(seq, 1000 + seq), _event(seq).tobytes()])

        got = []
        while len(got) < 100:
            frame = consumer.receive(timeout=5)
            assert frame is not None, f"only {len(got)} of 100 events arrived"
            got.append(frame)
    assert [f.header.seq for f in got] == list(range(100))
    for f in got:
        assert np.array_equal(f.data, _event(f.header.seq))
    assert [f.header.t_ns for f in got[:30]] == [1000 + s for s in range(30)]
    assert [f.header.meta for f in got[20:30]] == [{"k": s} for s in range(20, 30)]
    stats = wait_stats(plane, "ch-l7", lambda s: sum(s["drops"].values()) == 1 + 8 + 6)
    assert stats["messages"] == 100
    assert stats["head_seq"] == 99
    assert stats["drops"] == {
        "stream": 1 + 8,
        "truncated": 1,
        "size_mismatch": 1,
        "oversized": 1,
        "version": 1,
        "bad_field": 1,
        "bad_header": 1,
    }


def test_rate_limit_applies_to_binary_headers(plane, ctx):
    ep = plane.provision(make_spec("l7", max_rate_hz=50.0, max_frame_bytes=64 * 1024))
    producer = push(ctx, ep.producer)
    pack = binary_header_packer("det", "<u2", (512,))
    assert pack(0, 0)[0] == BINARY_MAGIC
    assert struct.unpack_from("<QQ", pack(3, 4), 8) == (3, 4)  # seq, t_ns where documented
    consumer = pull(ctx, ep.work)
    for seq in range(400):  # at once: the bucket holds about 50
        producer.send_multipart([pack(seq, seq), _event(seq).tobytes()])
    stats = wait_stats(plane, "ch-l7", lambda s: s["messages"] + s["drops"].get("rate", 0) == 400)
    assert 50 <= stats["messages"] <= 150, stats
    assert stats["drops"] == {"rate": 400 - stats["messages"]}
    got = 0
    while got < stats["messages"]:
        assert consumer.poll(5000)
        consumer.recv_multipart()
        got += 1
    assert not consumer.poll(200)  # nothing beyond what the counters say passed
