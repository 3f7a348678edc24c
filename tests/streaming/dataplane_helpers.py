"""Test helpers for the data plane: a small wire producer with checksums and a channel spec factory."""

from __future__ import annotations

import threading
import time
import zlib
from dataclasses import replace

import numpy as np
import zmq

from beamhub.streaming.dataplane import ChannelSpec
from beamhub.streaming.wire import Frame, FrameHeader, recv_frame, send_frame

__all__ = [
    "dataplane_threads",
    "frame_ok",
    "make_spec",
    "no_dsn_threads",
    "send_frames",
    "wait_for",
    "wait_stats",
]

LOOPBACK = ("127.0.0.1/32",)


def make_spec(mode: str = "l7", **changes) -> ChannelSpec:
    spec = ChannelSpec(
        channel_id=f"ch-{mode}",
        project="p1",
        stream="det",
        mode=mode,
        producer_cidrs=LOOPBACK,
        consumer_cidrs=LOOPBACK,
        hwm=64,
        max_frame_bytes=1 << 20,
        max_rate_hz=None,
    )
    return replace(spec, **changes)


def payload(seq: int, n: int = 256) -> np.ndarray:
    return (np.arange(n, dtype="<u4") * 7 + seq).astype("<u4")


def send_frames(sock: zmq.Socket, seqs, *, stream: str = "det", run: int = 0, n: int = 256) -> None:
    """Send frames whose meta carries the payload's crc32, so receivers can verify integrity."""
    for seq in seqs:
        data = payload(seq, n)
        header = FrameHeader(
            stream=stream,
            seq=seq,
            dtype="<u4",
            shape=(n,),
            t_ns=time.time_ns(),
            run=run,
            meta={"crc32": zlib.crc32(data.tobytes())},
        )
        send_frame(sock, header, data)


def frame_ok(frame) -> bool:
    return zlib.crc32(frame.data.tobytes()) == frame.header.meta["crc32"]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll a condition until it holds; fail with the last value after the deadline."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value:
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last value {value!r})")
        time.sleep(interval)
        value = predicate()
    return value


def wait_stats(plane, channel_id: str, predicate, timeout: float = 10.0) -> dict:
    """Poll a channel's stats until ``predicate(stats)`` holds; return those stats."""
    found: list[dict] = []

    def check() -> bool:
        stats = plane.stats(channel_id)
        if predicate(stats):
            found.append(stats)
            return True
        return False

    wait_for(check, timeout)
    return found[0]


def dataplane_threads() -> set[threading.Thread]:
    """Threads of every DataPlane in this process (other tests' planes included)."""
    return {t for t in threading.enumerate() if t.name.startswith("dataplane:")}


def no_dsn_threads(before: set[threading.Thread] | None = None) -> list[str]:
    """Data-plane threads still alive that were not running at ``before``."""
    return sorted(t.name for t in dataplane_threads() - (before or set()) if t.is_alive())


class Receiver:
    """A PULL socket bound on an ephemeral loopback port (stands in for a DSN's producer face)."""

    def __init__(self, rcvhwm: int = 1000) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.rcvhwm = rcvhwm
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def recv(self, timeout: float = 5.0) -> Frame:
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"no frame within {timeout} s")
        return recv_frame(self.sock)

    def until_seq(self, seq: int, timeout: float = 10.0) -> list[Frame]:
        """Frames up to and including ``seq``."""
        frames: list[Frame] = []
        deadline = time.monotonic() + timeout
        while not frames or frames[-1].header.seq < seq:
            frames.append(self.recv(max(deadline - time.monotonic(), 0.01)))
        return frames

    def drain(self, quiet: float = 0.3) -> list[Frame]:
        """Every frame that arrives until the socket has been quiet for ``quiet`` seconds."""
        frames = []
        while self.sock.poll(int(quiet * 1000)):
            frames.append(recv_frame(self.sock))
        return frames

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
