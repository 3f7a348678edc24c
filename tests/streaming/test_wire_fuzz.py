"""The wire decoder under fuzzing: any input gives a Frame or a DecodeError with a known reason."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from beamhub.streaming.wire import (
    ALLOWED_DTYPES,
    MAX_HEADER_BYTES,
    WIRE_VERSION,
    DecodeError,
    Frame,
    FrameHeader,
    decode,
    encode,
    recv_frame,
    send_frame,
)
from tests.streaming.fuzz_strategies import FUZZ, KNOWN_REASONS, json_values


def valid_header(**override) -> dict:
    body = {
        "v": WIRE_VERSION,
        "stream": "det",
        "seq": 7,
        "t_ns": 123,
        "dtype": "<f4",
        "shape": [2, 3],
        "run": 1,
        "rev": 0,
        "meta": {"hit": True},
    }
    body.update(override)
    return body


def outcome(parts, max_bytes: int = 1 << 20):
    """Decode; the only acceptable outcomes are a Frame or a DecodeError with a known reason."""
    try:
        frame = decode(parts, max_bytes=max_bytes)
    except DecodeError as exc:
        assert exc.reason in KNOWN_REASONS, exc.reason
        return exc.reason
    assert isinstance(frame, Frame)
    assert frame.data.nbytes == frame.header.nbytes
    assert frame.data.shape == frame.header.shape
    return frame


@FUZZ
@given(st.lists(st.binary(max_size=256), max_size=4))
def test_arbitrary_bytes_never_crash(parts):
    result = outcome(parts)
    if len(parts) != 2:
        assert result == "parts"


@FUZZ
@given(
    field=st.sampled_from(["v", "stream", "seq", "t_ns", "dtype", "shape", "run", "rev", "meta"]),
    value=json_values,
    payload=st.binary(max_size=64),
)
def test_mutated_header_fields_never_crash(field, value, payload):
    header = json.dumps(valid_header(**{field: value})).encode()
    outcome([header, payload])


@FUZZ
@given(field=st.sampled_from(["v", "stream", "seq", "dtype", "shape", "meta"]))
def test_missing_fields_are_refused_or_defaulted(field):
    body = valid_header()
    del body[field]
    result = outcome([json.dumps(body).encode(), bytes(24)])
    if field in ("v", "stream", "dtype", "shape"):
        assert isinstance(result, str)  # required: refused with a reason
    else:
        assert isinstance(result, Frame)  # optional with a default


@FUZZ
@given(
    data=st.data(),
    payload_len=st.integers(min_value=0, max_value=64),
)
def test_byte_level_mutations_never_crash(data, payload_len):
    raw = bytearray(json.dumps(valid_header()).encode())
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif raw:
            del raw[pos]
    outcome([bytes(raw), bytes(payload_len)])


@FUZZ
@given(
    shape=st.lists(st.integers(min_value=0, max_value=2**80), min_size=0, max_size=10),
    dtype=st.sampled_from(
        [
            *sorted(ALLOWED_DTYPES),
            "|O",
            "<U4",
            "|V8",
            "f4,f4",
            "bogus",
            "",
            "(-1,)f4",
            "(99999999999,)f4",
        ]
    ),  # numpy raises ValueError for these
    payload_len=st.integers(min_value=0, max_value=128),
)
def test_arbitrary_shapes_and_dtypes_never_crash(shape, dtype, payload_len):
    header = json.dumps(valid_header(shape=shape, dtype=dtype)).encode()
    result = outcome([header, bytes(payload_len)], max_bytes=1 << 16)
    if isinstance(result, Frame):
        assert math.prod(shape) * np.dtype(dtype).itemsize == payload_len


@FUZZ
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from(sorted(ALLOWED_DTYPES)),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    ),
    seq=st.integers(min_value=0, max_value=2**63),
    meta=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
)
def test_valid_frames_round_trip(arr, seq, meta):
    header = FrameHeader(
        stream="s", seq=seq, dtype=arr.dtype.str, shape=arr.shape, t_ns=5, run=2, rev=3, meta=meta
    )
    parts = encode(header, arr)
    frame = decode([bytes(parts[0]), bytes(parts[1])])
    assert frame.header == header
    assert frame.data.dtype == arr.dtype
    assert frame.data.tobytes() == arr.tobytes()


# -- explicit cases --------------------------------------------------------------------------------


def _parts(body: dict, payload: bytes) -> list[bytes]:
    return [json.dumps(body).encode(), payload]


@pytest.mark.parametrize(
    ("parts", "reason"),
    [
        (_parts(valid_header(v=2), bytes(24)), "version"),
        (_parts(valid_header(v=None), bytes(24)), "version"),
        (_parts(valid_header(), bytes(28)), "size_mismatch"),
        (_parts(valid_header(), bytes(20)), "truncated"),
        (_parts(valid_header(), b""), "truncated"),
        (_parts(valid_header(dtype="<f8"), bytes(24)), "truncated"),  # dtype/payload mismatch
        (_parts(valid_header(dtype="<u1"), bytes(24)), "size_mismatch"),
        (_parts(valid_header(shape=[4, 3]), bytes(24)), "truncated"),  # shape/payload mismatch
        (_parts(valid_header(shape=[3]), bytes(24)), "size_mismatch"),
        (_parts(valid_header(dtype="|O"), bytes(24)), "dtype"),
        (_parts(valid_header(dtype="<U2"), bytes(24)), "dtype"),
        (_parts(valid_header(shape=[1] * 9), bytes(4)), "shape"),
        (_parts(valid_header(shape=[-1, 6]), bytes(24)), "shape"),
        (_parts(valid_header(shape=[0, 2**70]), b""), "shape"),
        (_parts(valid_header(seq=-1), bytes(24)), "bad_field"),
        (_parts(valid_header(seq=True), bytes(24)), "bad_field"),
        (_parts(valid_header(stream=""), bytes(24)), "bad_field"),
        (_parts(valid_header(meta=[1]), bytes(24)), "bad_field"),
        ([b"not json", bytes(24)], "bad_header"),
        ([b"[1, 2]", bytes(24)], "bad_header"),
        ([b"[" * 50_000, b""], "bad_header"),  # nested too deeply for the JSON parser
        ([b" " * (MAX_HEADER_BYTES + 1), b""], "oversized"),
        ([json.dumps(valid_header()).encode()], "parts"),
        ([], "parts"),
        ([*_parts(valid_header(), bytes(24)), b"extra"], "parts"),
    ],
)
def test_bad_messages_are_refused_with_their_reason(parts, reason):
    with pytest.raises(DecodeError) as info:
        decode(parts)
    assert info.value.reason == reason
    assert info.value.detail


def test_frame_over_the_size_limit_is_oversized():
    parts = _parts(valid_header(shape=[1024, 1024]), bytes(4 * 1024 * 1024))
    with pytest.raises(DecodeError) as info:
        decode(parts, max_bytes=1024 * 1024)
    assert info.value.reason == "oversized"
    assert decode(parts, max_bytes=4 * 1024 * 1024).data.shape == (1024, 1024)


def test_large_frame_round_trips_zero_copy_over_zeromq():
    """A 4 MiB frame through a real PUSH/PULL pair arrives bit-exact; a bad one is refused."""
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        pull.rcvtimeo = 5000
        arr = np.random.default_rng(1).random((1024, 1024), dtype=np.float32)
        header = FrameHeader(stream="s", seq=1, dtype=arr.dtype.str, shape=arr.shape)
        send_frame(push, header, arr)
        push.send_multipart([json.dumps(valid_header(v=9)).encode(), bytes(24)])
        frame = recv_frame(pull)
        assert frame.header.seq == 1
        assert np.array_equal(frame.data, arr)
        with pytest.raises(DecodeError) as info:
            recv_frame(pull)
        assert info.value.reason == "version"
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        ctx.term()
