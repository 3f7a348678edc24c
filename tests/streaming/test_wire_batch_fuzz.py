"""The batch message (many small events under one header) under fuzzing, like the frame decoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from beamhub.streaming.wire import (
    ALLOWED_DTYPES,
    MAX_BATCH,
    WIRE_VERSION,
    DecodeError,
    Frame,
    FrameHeader,
    decode,
    decode_events,
    decode_header,
    encode,
    send_batch,
)
from tests.streaming.fuzz_strategies import FUZZ, KNOWN_REASONS, json_values


def batch_header(**override) -> dict:
    body = {
        "v": WIRE_VERSION,
        "stream": "det",
        "seq": 100,
        "t_ns": 123,
        "dtype": "<u2",
        "shape": [4],
        "run": 1,
        "rev": 2,
        "meta": {"src": "sim"},
        "batch": 3,
    }
    body.update(override)
    return body


def events_or_reason(parts, max_bytes: int = 1 << 20):
    """Decode into events; the only acceptable outcomes are events or a known DecodeError."""
    try:
        events = decode_events(parts, max_bytes=max_bytes)
    except DecodeError as exc:
        assert exc.reason in KNOWN_REASONS, exc.reason
        return exc.reason
    header = decode_header(bytes(parts[0]))
    assert len(events) == header.batch
    for i, event in enumerate(events):
        assert isinstance(event, Frame)
        assert event.header.seq == header.seq + i
        assert event.header.batch == 1
        assert event.data.shape == event.header.shape == header.shape
        assert event.data.nbytes == event.header.nbytes
    return events


@FUZZ
@given(value=json_values, payload=st.binary(max_size=64))
def test_any_batch_value_gives_events_or_a_reason(value, payload):
    result = events_or_reason([json.dumps(batch_header(batch=value)).encode(), payload])
    if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_BATCH):
        assert result == "bad_field"


@FUZZ
@given(
    field=st.sampled_from(["v", "stream", "seq", "t_ns", "dtype", "shape", "meta", "batch"]),
    value=json_values,
    payload=st.binary(max_size=64),
)
def test_mutated_batch_headers_never_crash(field, value, payload):
    events_or_reason([json.dumps(batch_header(**{field: value})).encode(), payload])


@FUZZ
@given(data=st.data(), payload_len=st.integers(min_value=0, max_value=64))
def test_byte_level_mutations_of_a_batch_never_crash(data, payload_len):
    raw = bytearray(json.dumps(batch_header()).encode())
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif raw:
            del raw[pos]
    events_or_reason([bytes(raw), bytes(payload_len)])


@FUZZ
@given(
    batch=st.integers(min_value=1, max_value=1000) | st.just(MAX_BATCH),
    shape=st.lists(st.integers(min_value=0, max_value=2**40), min_size=0, max_size=3),
    payload_len=st.integers(min_value=0, max_value=256),
)
def test_batch_size_must_match_the_payload(batch, shape, payload_len):
    parts = [json.dumps(batch_header(batch=batch, shape=shape)).encode(), bytes(payload_len)]
    try:
        frame = decode(parts, max_bytes=1 << 16)
    except DecodeError as exc:
        assert exc.reason in KNOWN_REASONS, exc.reason
        return
    assert batch * int(np.prod(shape, dtype=object)) * 2 == payload_len
    assert frame.data.shape == (tuple(shape) if batch == 1 else (batch, *shape))


@FUZZ
@given(
    events=hnp.arrays(
        dtype=st.sampled_from(sorted(ALLOWED_DTYPES)),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
    ),
    seq=st.integers(min_value=0, max_value=2**62),
    meta=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
)
def test_valid_batches_round_trip_event_by_event(events, seq, meta):
    header = FrameHeader(
        stream="s",
        seq=seq,
        dtype=events.dtype.str,
        shape=events.shape[1:],
        t_ns=5,
        run=2,
        rev=3,
        meta=meta,
        batch=events.shape[0],
    )
    parts = encode(header, events)
    frame = decode([bytes(parts[0]), bytes(parts[1])])
    assert frame.header == header
    out = frame.events()
    assert [e.header.seq for e in out] == list(range(seq, seq + events.shape[0]))
    assert all(e.header.meta == meta and e.header.run == 2 and e.header.rev == 3 for e in out)
    assert b"".join(e.data.tobytes() for e in out) == events.tobytes()


@pytest.mark.parametrize(
    ("body", "payload", "reason"),
    [
        (batch_header(), bytes(24), None),  # 3 events x 4 x u2
        (batch_header(), bytes(16), "truncated"),
        (batch_header(), bytes(32), "size_mismatch"),
        (batch_header(batch=0), b"", "bad_field"),
        (batch_header(batch=-3), bytes(24), "bad_field"),
        (batch_header(batch=True), bytes(8), "bad_field"),
        (batch_header(batch=3.0), bytes(24), "bad_field"),
        (batch_header(batch="3"), bytes(24), "bad_field"),
        (batch_header(batch=MAX_BATCH + 1, shape=[0]), b"", "bad_field"),
        (batch_header(batch=1000, shape=[0]), b"", None),
        (batch_header(batch=300_000, shape=[4096]), bytes(24), "oversized"),  # 2.4 GB
        (batch_header(seq=2**64), bytes(24), "bad_field"),  # integer fields are 64-bit
        (batch_header(t_ns=2**70), bytes(24), "bad_field"),
    ],
)
def test_bad_batches_are_refused_with_their_reason(body, payload, reason):
    parts = [json.dumps(body).encode(), payload]
    if reason is None:
        assert len(decode_events(parts)) == body["batch"]
        return
    with pytest.raises(DecodeError) as info:
        decode_events(parts)
    assert info.value.reason == reason
    assert info.value.detail


def test_single_frame_header_has_no_batch_field():
    """Version 1 single frames keep their exact bytes: older readers see no new field."""
    raw = FrameHeader("s", 1, "<f4", (2,)).to_bytes()
    assert b"batch" not in raw
    assert decode_header(raw).batch == 1


def test_send_batch_over_zeromq_yields_each_event():
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        pull.rcvtimeo = 5000
        events = np.arange(64 * 512, dtype="<u2").reshape(64, 512)
        nxt = send_batch(push, "small", 10, events, run=4, meta={"k": 1})
        assert nxt == 74
        with pytest.raises(ValueError, match="shape"):
            send_batch(push, "small", 0, np.zeros((0, 4), "<u2"))
        out = decode_events(pull.recv_multipart(copy=False))
        assert [e.header.seq for e in out] == list(range(10, 74))
        assert all(e.header.run == 4 and e.header.meta == {"k": 1} for e in out)
        assert np.array_equal(np.stack([e.data for e in out]), events)
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()


@pytest.mark.parametrize(
    "meta",
    [{"big": 2**70}, {"neg": -(2**65)}, {"nan": float("nan")}, {"deep": [[[[1]]]]}, {"f": 1e300}],
)
def test_header_values_survive_the_fast_parser_exactly(meta):
    """orjson parses headers; what it would change (ints beyond 64 bits, NaN) json parses."""
    raw = FrameHeader("s", 2**63, "<f4", (1,), meta=meta).to_bytes()
    got = decode_header(raw).meta
    assert json.dumps(got) == json.dumps(meta) and type(got[next(iter(meta))]) is type(
        meta[next(iter(meta))]
    )
