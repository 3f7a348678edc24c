"""The data plane's wire format: ZeroMQ multipart ``[header, payload]``.

The header is small versioned JSON (readable with any ZeroMQ tool); the payload is the array's raw
bytes, sent without copying for large frames. Sequence numbers make loss visible; the decoder turns
every malformed message into a :class:`DecodeError` with a short machine-readable ``reason`` so the
receiver can count it and go on.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ALLOWED_DTYPES",
    "DEFAULT_MAX_FRAME_BYTES",
    "MAX_HEADER_BYTES",
    "WIRE_VERSION",
    "DecodeError",
    "Frame",
    "FrameHeader",
    "decode",
    "decode_header",
    "encode",
    "recv_frame",
    "send_frame",
]

WIRE_VERSION = 1
#: Headers larger than this are refused before parsing (they carry metadata, not data).
MAX_HEADER_BYTES = 64 * 1024
#: Default payload cap; a channel's template may lower it.
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024
#: Below this size a copy is cheaper than ZeroMQ's zero-copy bookkeeping.
ZERO_COPY_THRESHOLD = 64 * 1024
#: Plain numeric dtypes only: no objects, no structured records, no strings.
ALLOWED_DTYPES = frozenset(
    np.dtype(f"{order}{kind}").str
    for order in "<>"
    for kind in ("u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8", "c8", "c16")
)
MAX_NDIM = 8


class DecodeError(ValueError):
    """A message that is not a valid frame. ``reason`` is a stable counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class FrameHeader:
    """What travels in front of every payload."""

    stream: str
    seq: int
    dtype: str
    shape: tuple[int, ...]
    t_ns: int = 0
    run: int = 0
    rev: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    v: int = WIRE_VERSION

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def to_bytes(self) -> bytes:
        body = {
            "v": self.v,
            "stream": self.stream,
            "seq": self.seq,
            "t_ns": self.t_ns,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "run": self.run,
            "rev": self.rev,
            "meta": self.meta,
        }
        return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Frame:
    """A decoded frame: its header and a zero-copy numpy view of the payload (do not modify it)."""

    header: FrameHeader
    data: np.ndarray

    @property
    def latency_s(self) -> float:
        """Seconds since the producer stamped the frame (same host clock or synchronised clocks)."""
        return (time.time_ns() - self.header.t_ns) / 1e9


def _int_field(body: dict, name: str, *, minimum: int = 0) -> int:
    value = body.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DecodeError("bad_field", f"header field {name!r} must be an integer >= {minimum}")
    return value


def decode_header(raw: bytes | memoryview) -> FrameHeader:
    """Parse and validate a header without touching the payload (the L7 gateway's check)."""
    if len(raw) > MAX_HEADER_BYTES:
        raise DecodeError("oversized", f"header is {len(raw)} bytes, limit {MAX_HEADER_BYTES}")
    try:
        body = json.loads(bytes(raw))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError("bad_header", f"header is not JSON ({exc})") from None
    except RecursionError:
        raise DecodeError("bad_header", "header JSON is nested too deeply") from None
    if not isinstance(body, dict):
        raise DecodeError("bad_header", "header must be a JSON object")
    version = body.get("v")
    if version != WIRE_VERSION:
        raise DecodeError(
            "version", f"wire version {version!r}, this receiver speaks {WIRE_VERSION}"
        )
    stream = body.get("stream")
    if not isinstance(stream, str) or not stream:
        raise DecodeError("bad_field", "header field 'stream' must be a non-empty string")
    dtype = body.get("dtype")
    if not isinstance(dtype, str):
        raise DecodeError("dtype", "header field 'dtype' must be a string such as '<f4'")
    try:
        dtype = np.dtype(dtype).str
    except (TypeError, ValueError):  # ValueError: e.g. "(-1,)f4"
        raise DecodeError("dtype", f"unknown dtype {body['dtype']!r}") from None
    if dtype not in ALLOWED_DTYPES:
        raise DecodeError("dtype", f"dtype {dtype!r} is not a plain numeric type")
    shape = body.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise DecodeError("shape", f"shape must be a list of at most {MAX_NDIM} integers >= 0")
    meta = body.get("meta", {})
    if not isinstance(meta, dict):
        raise DecodeError("bad_field", "header field 'meta' must be an object")
    return FrameHeader(
        stream=stream,
        seq=_int_field(body, "seq"),
        t_ns=_int_field(body, "t_ns"),
        dtype=dtype,
        shape=tuple(shape),
        run=_int_field(body, "run"),
        rev=_int_field(body, "rev"),
        meta=meta,
    )


def _buffer(part: Any) -> memoryview:
    """A memoryview of a received part, whether bytes or a zero-copy ``zmq.Frame``."""
    buf = getattr(part, "buffer", None)
    return buf if buf is not None else memoryview(part)


def check_payload(header: FrameHeader, nbytes: int, max_bytes: int) -> None:
    """Refuse payloads that do not match their header or exceed the limit."""
    expected = header.nbytes
    if expected > max_bytes:
        raise DecodeError("oversized", f"frame of {expected} bytes exceeds the limit {max_bytes}")
    if nbytes < expected:
        raise DecodeError("truncated", f"payload has {nbytes} bytes, header promises {expected}")
    if nbytes > expected:
        raise DecodeError("size_mismatch", f"payload has {nbytes} bytes, header says {expected}")


def decode(parts: Sequence[Any], max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    """Turn ``[header, payload]`` into a :class:`Frame`; raise :class:`DecodeError` otherwise."""
    if len(parts) != 2:
        raise DecodeError("parts", f"expected 2 message parts [header, payload], got {len(parts)}")
    header = decode_header(_buffer(parts[0]))
    payload = _buffer(parts[1])
    check_payload(header, payload.nbytes, max_bytes)
    try:
        data = np.frombuffer(payload, dtype=header.dtype).reshape(header.shape)
    except ValueError as exc:  # e.g. an empty frame with a dimension numpy cannot represent
        raise DecodeError(
            "shape", f"shape {list(header.shape)} is not representable: {exc}"
        ) from None
    return Frame(header, data)


def encode(header: FrameHeader, data: np.ndarray) -> list[Any]:
    """``[header bytes, payload buffer]``; the payload is the array's memory, not a copy."""
    if np.dtype(header.dtype) != data.dtype or tuple(header.shape) != data.shape:
        raise ValueError(
            f"header says {header.dtype} {header.shape}, array is {data.dtype.str} {data.shape}"
        )
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)  # views: works for empty arrays
    return [header.to_bytes(), memoryview(flat)]


def send_frame(sock: Any, header: FrameHeader, data: np.ndarray, *, flags: int = 0) -> None:
    """Send a frame; large payloads go zero-copy (the array must not change until sent)."""
    parts = encode(header, data)
    sock.send_multipart(parts, flags=flags, copy=parts[1].nbytes < ZERO_COPY_THRESHOLD)


def recv_frame(sock: Any, *, flags: int = 0, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    """Receive and decode one frame (zero-copy); raises :class:`DecodeError` on a bad message."""
    parts = sock.recv_multipart(flags=flags, copy=False)
    return decode(parts, max_bytes=max_bytes)
