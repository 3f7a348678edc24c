"""The binary header layout under fuzzing: any input gives a header or a DecodeError with a known
reason; valid headers round-trip and equal their JSON form; the L7 gateway's fast check
(``check_message``) agrees with the full decoder on every input, binary or JSON."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from beamhub.streaming.wire import (
    ALLOWED_DTYPES,
    BINARY_MAGIC,
    DTYPE_CODES,
    MAX_BATCH,
    MAX_HEADER_BYTES,
    DecodeError,
    Frame,
    FrameHeader,
    binary_header_packer,
    check_message,
    check_payload,
    decode,
    decode_header,
    recv_frame,
    send_batch,
    send_frame,
)
from tests.streaming.fuzz_strategies import FUZZ, KNOWN_REASONS, json_values

U64 = st.integers(min_value=0, max_value=2**64 - 1)
#: The fixed part as the module docstring states it, written out independently of wire.py.
FIXED = "<BBBBHHQQQQII"


def raw_binary(
    *,
    magic: int = BINARY_MAGIC,
    v: int = 1,
    code: int = DTYPE_CODES.index("<f4"),
    shape: tuple[int, ...] = (2, 3),
    stream: bytes = b"det",
    flags: int = 0,
    seq: int = 7,
    t_ns: int = 123,
    run: int = 1,
    rev: int = 0,
    batch: int = 1,
    meta: bytes = b"",
    ndim: int | None = None,
    slen: int | None = None,
    mlen: int | None = None,
) -> bytes:
    """A binary header built field by field (lengths overridable to lie)."""
    fixed = struct.pack(
        FIXED, magic, v, code, len(shape) if ndim is None else ndim,
        len(stream) if slen is None else slen, flags, seq, t_ns, run, rev, batch,
        len(meta) if mlen is None else mlen,
    )  # fmt: skip
    return fixed + struct.pack(f"<{len(shape)}Q", *shape) + stream + meta


def full_check(raw: bytes, nbytes: int, max_bytes: int):
    """The reference: the full decoder then the payload check; a tuple or a reason."""
    try:
        header = decode_header(raw)
        check_payload(header, nbytes, max_bytes)
    except DecodeError as exc:
        assert exc.reason in KNOWN_REASONS, exc.reason
        return exc.reason
    return (header.stream, header.seq, header.run, header.batch)


def fast_check(raw: bytes, nbytes: int, max_bytes: int):
    try:
        return check_message(raw, nbytes, max_bytes)
    except DecodeError as exc:
        assert exc.reason in KNOWN_REASONS, exc.reason
        return exc.reason


def assert_agree(raw: bytes, nbytes: int, max_bytes: int = 1 << 16):
    """check_message (the gateway's) and the full decoder give the same outcome.

    Twice (the second time a valid layout comes from check_message's cache), then with a payload
    a byte longer and a limit a byte lower, which the cached layout must refuse as the decoder does.
    """
    expected = full_check(raw, nbytes, max_bytes)
    assert fast_check(raw, nbytes, max_bytes) == expected
    assert fast_check(raw, nbytes, max_bytes) == expected
    assert fast_check(raw, nbytes + 1, max_bytes) == full_check(raw, nbytes + 1, max_bytes)
    tight = max(nbytes - 1, 0)
    assert fast_check(raw, nbytes, tight) == full_check(raw, nbytes, tight)
    return expected


@FUZZ
@given(body=st.binary(max_size=200), nbytes=st.integers(0, 256))
def test_arbitrary_bytes_after_the_magic_never_crash(body, nbytes):
    raw = bytes([BINARY_MAGIC]) + body
    result = assert_agree(raw, nbytes)
    if len(raw) < struct.calcsize(FIXED):
        assert result == "bad_header"


@FUZZ
@given(data=st.data(), nbytes=st.sampled_from([0, 24, 48, 4096]))
def test_byte_level_mutations_never_crash(data, nbytes):
    meta = data.draw(st.sampled_from([b"", b'{"a":1}']))
    raw = bytearray(raw_binary(meta=meta))
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "set"]))
        pos = data.draw(st.integers(1, max(len(raw) - 1, 1)))  # keep the magic: binary form
        if op == "flip" and pos < len(raw):
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and pos < len(raw):
            raw[pos] = data.draw(st.sampled_from([0, 1, 8, 9, 25, 26, 255]))
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
        elif pos < len(raw):
            del raw[pos]
    assert_agree(bytes(raw), nbytes)


@FUZZ
@given(
    v=st.integers(0, 255),
    code=st.integers(0, 255),
    ndim=st.integers(0, 12),
    dims=st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 16), min_size=12, max_size=12),
    stream=st.binary(max_size=12) | st.sampled_from([b"det", "dét".encode(), b"\xff\xfe"]),
    flags=st.integers(0, 2**16 - 1) | st.just(0),
    batch=st.integers(0, 2**32 - 1) | st.integers(0, 4),
    meta=st.sampled_from(
        [b"", b"{}", b'{"k":[1,2]}', b"[1]", b"nope", b'{"big":' + b"9" * 30 + b"}"]
    ),
    nbytes=st.integers(0, 600) | st.just(24),
    ints=st.tuples(U64, U64, U64, U64),
)
def test_arbitrary_field_values_give_the_same_outcome_both_ways(
    v, code, ndim, dims, stream, flags, batch, meta, nbytes, ints
):
    seq, t_ns, run, rev = ints
    raw = raw_binary(
        v=v, code=code, shape=tuple(dims[:ndim]), stream=stream, flags=flags, seq=seq,
        t_ns=t_ns, run=run, rev=rev, batch=batch, meta=meta,
    )  # fmt: skip
    result = assert_agree(raw, nbytes, max_bytes=1 << 12)
    if isinstance(result, tuple):
        # accepted only when every field is valid and the payload is exactly what it promises
        assert v == 1 and flags == 0 and code < len(DTYPE_CODES) and 1 <= batch <= MAX_BATCH
        itemsize = np.dtype(DTYPE_CODES[code]).itemsize
        assert math.prod(dims[:ndim]) * itemsize * batch == nbytes
        assert result == (stream.decode(), seq, run, batch)


@FUZZ
@given(seqs=st.lists(st.tuples(U64, U64), min_size=1, max_size=5), run=U64)
def test_a_cached_layout_still_reads_each_message_seq(seqs, run):
    pack = binary_header_packer("cache-test", "<u2", (4, 3), batch=2, run=run)
    for seq, t_ns in seqs:
        raw = pack(seq, t_ns)
        assert check_message(raw, 48, 1 << 10) == ("cache-test", seq, run, 2)
        assert full_check(raw, 48, 1 << 10) == ("cache-test", seq, run, 2)


def json_header(**override) -> dict:
    body = {"v": 1, "stream": "det", "seq": 7, "t_ns": 123, "dtype": "<f4", "shape": [2, 3]}
    body.update(override)
    return body


@FUZZ
@given(
    field=st.sampled_from(
        ["v", "stream", "seq", "t_ns", "dtype", "shape", "run", "rev", "meta", "batch"]
    ),
    value=json_values | U64 | st.integers(2**64 - 2, 2**64 + 2) | st.sampled_from(["<u2", ">f8"]),
    drop=st.sampled_from([None, "v", "seq", "meta", "shape"]),
    nbytes=st.sampled_from([0, 23, 24, 25, 48, 4096]),
)
def test_json_headers_give_the_same_outcome_both_ways(field, value, drop, nbytes):
    body = json_header(**{field: value})
    body.pop(drop, None)
    result = assert_agree(json.dumps(body).encode(), nbytes)
    if isinstance(result, tuple):
        assert result == (
            body["stream"],
            body.get("seq", 0),
            body.get("run", 0),
            body.get("batch", 1),
        )


@pytest.mark.parametrize(
    ("override", "nbytes", "reason"),
    [
        *[({f: v}, 24, "bad_field") for f in ("seq", "t_ns", "run", "rev")
          for v in (-1, 2**64, True, 1.0, "1", None)],
        *[({f: 2**64 - 1}, 24, None) for f in ("seq", "t_ns", "run", "rev")],
        ({"shape": [2.0, 3]}, 24, "shape"),
        ({"shape": [2, True, 3]}, 24, "shape"),
        ({"shape": [0, -1]}, 0, "shape"),
        ({"shape": [1] * 9}, 4, "shape"),
        ({"shape": "[2, 3]"}, 24, "shape"),
        ({"batch": 0}, 0, "bad_field"),
        ({"batch": True}, 24, "bad_field"),
        ({"batch": 2}, 48, None),
        ({"v": True}, 24, "version"),
        ({"v": 1.0}, 24, "version"),
        ({"stream": ""}, 24, "bad_field"),
        ({"stream": 5}, 24, "bad_field"),
        ({"dtype": "float32"}, 24, None),  # numpy spelling, canonicalised
        ({"dtype": "|O"}, 24, "dtype"),
        ({"meta": []}, 24, "bad_field"),
        ({"meta": None}, 24, "bad_field"),
        ({"meta": {}}, 24, None),
        ({"meta": {"big": 2**70}}, 24, None),
        ({}, 25, "size_mismatch"),
        ({}, 23, "truncated"),
        ({"shape": [1 << 20]}, 4 << 20, "oversized"),
    ],
)  # fmt: skip
def test_json_edge_values_give_the_same_reason_both_ways(override, nbytes, reason):
    body = json_header(**override)
    result = assert_agree(json.dumps(body).encode(), nbytes)
    if reason is None:
        assert result == ("det", body["seq"], body.get("run", 0), body.get("batch", 1))
    else:
        assert result == reason


@FUZZ
@given(data=st.data(), nbytes=st.sampled_from([0, 24, 48]))
def test_json_byte_level_mutations_give_the_same_outcome_both_ways(data, nbytes):
    raw = bytearray(json.dumps(json_header(meta={}, batch=2, run=5)).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "flip":
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            raw[pos:pos] = data.draw(st.sampled_from([b"1", b"-", b" ", b"0", b"[]", b'"', b"9"]))
        elif len(raw) > 1:
            del raw[pos]
    assert_agree(bytes(raw), nbytes)


@pytest.mark.parametrize(
    ("raw", "nbytes", "reason"),
    [
        (raw_binary(v=2), 24, "version"),
        (raw_binary(v=0), 24, "version"),
        (raw_binary(flags=1), 24, "bad_field"),
        (raw_binary(code=len(DTYPE_CODES)), 24, "dtype"),
        (raw_binary(shape=(1,) * 9), 4, "shape"),
        (raw_binary(batch=0), 24, "bad_field"),
        (raw_binary(batch=MAX_BATCH + 1), 24, "bad_field"),
        (raw_binary(stream=b""), 24, "bad_field"),
        (raw_binary(stream=b"\xff\xfe"), 24, "bad_field"),
        (raw_binary(meta=b"[1]"), 24, "bad_field"),
        (raw_binary(meta=b"{not json"), 24, "bad_header"),
        (raw_binary(slen=4), 24, "bad_header"),  # lengths promise more than is there
        (raw_binary() + b"x", 24, "bad_header"),  # trailing bytes
        (raw_binary()[:40], 24, "bad_header"),
        (raw_binary(), 23, "truncated"),
        (raw_binary(), 25, "size_mismatch"),
        (raw_binary(shape=(1 << 20,)), 4 << 20, "oversized"),  # over max_bytes = 64 KiB
        (raw_binary(meta=b'{"x":"' + b"a" * MAX_HEADER_BYTES + b'"}'), 24, "oversized"),
    ],
)
def test_bad_binary_headers_are_refused_with_their_reason(raw, nbytes, reason):
    assert full_check(raw, nbytes, 1 << 16) == reason
    assert fast_check(raw, nbytes, 1 << 16) == reason
    with pytest.raises(DecodeError) as err:
        decode([raw, bytes(nbytes)], max_bytes=1 << 16)
    assert err.value.reason == reason


headers = st.builds(
    FrameHeader,
    stream=st.text(min_size=1, max_size=20),  # hypothesis text has no lone surrogates
    seq=U64,
    dtype=st.sampled_from(sorted(ALLOWED_DTYPES)),
    shape=st.lists(st.integers(0, 2**20), max_size=8).map(tuple),
    t_ns=U64,
    run=U64,
    rev=U64,
    meta=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    batch=st.integers(1, MAX_BATCH),
)


@FUZZ
@given(header=headers)
def test_valid_headers_round_trip_and_equal_their_json_form(header):
    raw = header.to_binary()
    assert raw[0] == BINARY_MAGIC
    back = decode_header(raw)
    assert back == header
    assert decode_header(header.to_bytes()) == back  # the JSON form says the same
    nbytes = header.nbytes
    expected = (header.stream, header.seq, header.run, header.batch)
    assert check_message(raw, nbytes, max(nbytes, 1)) == expected


@FUZZ
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from(sorted(ALLOWED_DTYPES)),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    ),
    seq=U64,
    t_ns=U64,
)
def test_packer_matches_to_binary_and_decodes(arr, seq, t_ns):
    pack = binary_header_packer("det", arr.dtype.str, arr.shape, run=3, rev=2)
    header = FrameHeader("det", seq, arr.dtype.str, arr.shape, t_ns=t_ns, run=3, rev=2)
    raw = pack(seq, t_ns)
    assert raw == header.to_binary()
    frame = decode([raw, arr.tobytes()], max_bytes=1 << 20)
    assert frame.header == header
    assert np.array_equal(frame.data, arr, equal_nan=arr.dtype.kind in "fc")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "|O"}, "plain numeric"),
        ({"shape": (1,) * 9}, "dimensions"),
        ({"seq": 2**64}, "out of range"),
        ({"seq": -1}, "out of range"),
        ({"stream": ""}, "stream name"),
        ({"stream": "x" * 65536}, "stream name"),
        ({"batch": 0}, "batch"),
    ],
)
def test_to_binary_refuses_what_the_layout_cannot_carry(kwargs, match):
    fields = {"stream": "det", "seq": 0, "dtype": "<f4", "shape": (2,), **kwargs}
    with pytest.raises(ValueError, match=match):
        FrameHeader(**fields).to_binary()


def test_binary_frames_and_batches_over_zeromq():
    ctx = zmq.Context()
    try:
        a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        a.bind("inproc://binary-wire")
        b.connect("inproc://binary-wire")
        big = np.arange(300_000, dtype="<f8").reshape(600, 500)  # zero-copy path
        send_frame(a, FrameHeader("det", 1, "<f8", big.shape, meta={"n": 2**70}), big, binary=True)
        frame = recv_frame(b, max_bytes=8 << 20)
        assert isinstance(frame, Frame)
        assert frame.header.meta == {"n": 2**70}  # meta beyond 64 bits, exact
        assert np.array_equal(frame.data, big)
        events = np.arange(4 * 512, dtype="<u2").reshape(4, 512)
        assert send_batch(a, "det", 10, events, binary=True) == 14
        parts = b.recv_multipart(copy=False)
        assert parts[0].bytes[0] == BINARY_MAGIC
        got = decode(parts).events()
        assert [e.header.seq for e in got] == [10, 11, 12, 13]
        assert np.array_equal(np.stack([e.data for e in got]), events)
        a.close(linger=0)
        b.close(linger=0)
    finally:
        ctx.term()


def test_json_and_binary_headers_are_told_apart_by_the_first_byte():
    header = FrameHeader("det", 5, "<i4", (3,), meta={"a": [1, 2]})
    assert header.to_bytes()[:1] == b"{"
    assert json.loads(header.to_bytes())["seq"] == 5
    assert decode_header(header.to_bytes()) == decode_header(header.to_binary())
