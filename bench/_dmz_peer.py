"""What runs *inside* a namespace of the science DMZ (:mod:`beamhub.bench._netns`).

``python -m beamhub.bench._dmz_peer COMMAND ...`` under ``ip netns exec``; every command prints
one JSON line. They use the client APIs (control API calls, :meth:`StreamConsumer.from_dsn`,
:meth:`SourceRunner.from_dsn`, :func:`register_key`), so each channel's credentials are handled
as for any client:

* ``create DSN BODY`` / ``stats DSN CHANNEL``: the control API (token in ``$BEAMHUB_TOKEN``);
* ``wait DSN CHANNEL KEY MIN TIMEOUT``: poll the channel's stats until ``KEY`` (dotted; a dict
  counts its entries) is at least ``MIN``;
* ``replay DSN CHANNEL NPY RATE TIMEOUT``: stream a .npy stack through :class:`SourceRunner`;
* ``intrude DSN CHANNEL FACE TIMEOUT``: connect as a producer or consumer from here and wait
  until the DSN counts a refused connection on that face;
* ``connect HOST PORT TIMEOUT`` / ``listen HOST``: plain TCP reachability;
* ``agent``: JSON commands on stdin for the benchmark (``open``, ``receive``, ``close``,
  ``send``), one JSON answer line each.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.request
from typing import Any

__all__ = ["main"]


def _token() -> str:
    return os.environ["BEAMHUB_TOKEN"]


def _say(value: Any) -> None:
    print(json.dumps(value), flush=True)


def _channel(dsn: str, cid: str) -> dict:
    from beamhub.streaming.credentials import api_call

    return api_call(dsn, "GET", f"/api/channels/{cid}", _token())


def _dig(stats: dict, key: str) -> float:
    value: Any = stats
    for part in key.split("."):
        value = (value or {}).get(part) if isinstance(value, dict) else None
    if isinstance(value, dict | list):
        return len(value)
    return value or 0


def wait(dsn: str, cid: str, key: str, minimum: float, timeout: float) -> tuple[bool, dict]:
    deadline = time.monotonic() + timeout
    while True:
        info = _channel(dsn, cid)
        if _dig(info.get("stats") or {}, key) >= minimum:
            return True, info
        if time.monotonic() > deadline:
            return False, info
        time.sleep(0.05)


def replay(dsn: str, cid: str, path: str, rate: float, timeout: float) -> dict:
    from beamhub.streaming.replay import ReplaySource
    from beamhub.streaming.source import SourceRunner

    runner = SourceRunner.from_dsn(ReplaySource(path, rate_hz=rate), dsn, cid, _token())
    runner.start()
    try:
        runner.start_run()
        deadline = time.monotonic() + timeout
        while not runner.status()["finished"] and time.monotonic() < deadline:
            time.sleep(0.05)
        status = runner.status()
    finally:
        runner.stop()
    return {"finished": status["finished"], "endpoint": runner.endpoint, **runner.stats()}


def intrude(dsn: str, cid: str, face: str, timeout: float) -> dict:
    """Try the channel's ``face`` from this network with a registered key (so only the address
    can be what the DSN refuses); report the refusals counted and what got through."""
    key = f"refused_connections.{face}"
    before = _dig(_channel(dsn, cid)["stats"], key)
    if face == "producer":
        from beamhub.streaming.simulator import SimulatedDetector
        from beamhub.streaming.source import SourceRunner

        gen = SimulatedDetector((64, 64), seed=1, rate_hz=50.0)
        peer: Any = SourceRunner.from_dsn(gen, dsn, cid, _token()).start()
        peer.start_run()
        endpoint = peer.endpoint
    else:
        from beamhub.streaming.consumer import StreamConsumer

        peer = StreamConsumer.from_dsn(dsn, cid, _token(), hwm=4)
        endpoint = peer.endpoint
    got = 0
    try:
        deadline = time.monotonic() + timeout
        while True:
            if face != "producer" and peer.receive(timeout=0.05) is not None:
                got += 1
            info = _channel(dsn, cid)
            refused = _dig(info["stats"], key) - before
            if refused >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        if face == "producer":
            sent = peer.stats()["frames_sent"]
            peer.stop()
        else:
            sent = None
            peer.close()
    return {
        "endpoint": endpoint,
        "refused": refused,
        "frames_received": got,
        "producer_frames_sent": sent,
        "dsn_messages": info["stats"]["messages"],
    }


def connect(host: str, port: int, timeout: float) -> dict:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return {"connected": True, "error": None}
    except OSError as exc:
        return {"connected": False, "error": f"{type(exc).__name__}: {exc}"}


def listen(host: str) -> None:
    with socket.create_server((host, 0)) as server:
        _say({"port": server.getsockname()[1]})
        while True:
            conn, _ = server.accept()
            conn.close()


class Agent:
    """Benchmark peer: one channel consumer (``open``/``receive``/``close``) or producer (``send``)."""

    def __init__(self) -> None:
        self.consumer: Any = None
        self.dsn = self.cid = ""

    def open(self, dsn: str, body: dict, timeout: float = 30.0) -> dict:
        from beamhub.streaming.consumer import StreamConsumer
        from beamhub.streaming.credentials import api_call

        channel = api_call(dsn, "POST", "/api/channels", _token(), body)
        self.dsn, self.cid = dsn, channel["id"]
        self.consumer = StreamConsumer.from_dsn(
            dsn, self.cid, _token(), exclusive=True, hwm=body.get("hwm", 16)
        )
        # connected (L7 counts work sockets; both modes list a consumer once it has reported)
        deadline = time.monotonic() + timeout
        while True:
            self.consumer.receive(timeout=0.05)
            stats = _channel(dsn, self.cid)["stats"]
            if stats["consumers"] and (body["mode"] == "l4" or stats["consumers_connected"]):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"consumer not connected within {timeout} s: {stats}")
        return {"channel": self.cid, "endpoints": channel["endpoints"]}

    def receive(self, count: int, timeout: float) -> dict:
        first = last = 0.0
        expected, gaps, got, nbytes = None, 0, 0, 0
        while got < count:
            frame = self.consumer.receive(timeout=timeout)
            if frame is None:
                break
            last = time.perf_counter()
            if got == 0:
                first = last
            got += 1
            nbytes = frame.data.nbytes
            if expected is not None:
                gaps += max(0, frame.header.seq - expected)
            expected = frame.header.seq + 1
        span = last - first
        return {
            "frames": got,
            "lost": count - got + gaps,
            "seconds": span,
            "gb_per_s": nbytes * (got - 1) / 1e9 / span if span > 0 else None,
            "msg_per_s": (got - 1) / span if span > 0 else None,
        }

    def close(self) -> dict:
        if self.consumer is not None:
            self.consumer.close()
            self.consumer = None
            # DELETE answers 204 without a body, which api_call (it expects JSON) cannot read
            request = urllib.request.Request(
                f"{self.dsn}/api/channels/{self.cid}",
                method="DELETE",
                headers={"Authorization": f"Bearer {_token()}"},
            )
            with urllib.request.urlopen(request, timeout=10):
                pass
        return {"closed": self.cid}

    def send(self, dsn: str, channel: str, frame_bytes: int, count: int, hwm: int) -> dict:
        import numpy as np
        import zmq

        from beamhub.streaming.credentials import register_key
        from beamhub.streaming.wire import FrameHeader, send_frame

        cred = register_key(dsn, channel, _token(), "producer")
        data = np.random.default_rng(0).integers(0, 65535, frame_bytes // 2, dtype="<u2")
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.sndhwm = hwm
        if cred.server_key is not None:
            sock.curve_publickey, sock.curve_secretkey = cred.public, cred.secret
            sock.curve_serverkey = cred.server_key
        sock.connect(cred.endpoints["producer"])
        t0 = time.perf_counter()
        for seq in range(count):  # blocking sends: back-pressure, never a drop
            header = FrameHeader("bench", seq, data.dtype.str, data.shape, t_ns=time.time_ns())
            send_frame(sock, header, data)
        sock.close(linger=-1)
        ctx.term()
        return {"sent": count, "seconds": time.perf_counter() - t0}

    def serve(self) -> None:
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd.pop("op")
            if op == "quit":
                break
            try:
                _say({"ok": True, **getattr(self, op)(**cmd)})
            except Exception as exc:  # the harness shows it with the command that failed
                _say({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        self.close()


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "create":
        from beamhub.streaming.credentials import api_call

        _say(api_call(args[0], "POST", "/api/channels", _token(), json.loads(args[1])))
    elif cmd == "stats":
        _say(_channel(args[0], args[1]))
    elif cmd == "wait":
        ok, info = wait(args[0], args[1], args[2], float(args[3]), float(args[4]))
        _say(info)
        return 0 if ok else 1
    elif cmd == "replay":
        _say(replay(args[0], args[1], args[2], float(args[3]), float(args[4])))
    elif cmd == "intrude":
        _say(intrude(args[0], args[1], args[2], float(args[3])))
    elif cmd == "connect":
        _say(connect(args[0], int(args[1]), float(args[2])))
    elif cmd == "listen":
        listen(args[0])
    elif cmd == "agent":
        Agent().serve()
    else:
        print(f"unknown command {cmd!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
