"""The DSN's forwarding threads: L4 router (libzmq proxy, in C), L7 gateway (Python), supervisor.

Each thread creates, binds and closes its own sockets; ``ready`` is set once they are bound (or
``error`` is set); a stop message on an inproc pipe ends it, and ``ContextTerminated`` is a clean
exit. The supervisor collects consumers' status reports and, for L4, polls the proxy's
``STATISTICS`` so no Python runs per message. See :mod:`streaming.dataplane` for the design.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from streaming.wire import MAX_HEADER_BYTES, DecodeError, check_payload, decode_header

__all__ = ["ChannelCounters", "FaceConfig", "L4Router", "L7Gateway", "Supervisor"]

#: Messages handled per poll wake-up by the L7 gateway (keeps stop/latency checks regular).
BURST = 256
#: How often the supervisor samples counters (rate) and, in L4, asks the proxy for statistics.
SAMPLE_S = 0.2
#: At most this many consumers are tracked per channel; further reporters are counted, not kept.
MAX_CONSUMERS = 1024
REPORT_MAX_BYTES = 4096


@dataclass
class FaceConfig:
    """How a channel's sockets are bound: where, with which limits and which ZAP domains."""

    host: str
    advertise: str
    hwm: int
    max_frame_bytes: int
    producer_domain: str
    consumer_domain: str
    curve_secret: bytes | None = None
    monitor: bool = True
    stream: str = ""
    max_rate_hz: float | None = None
    #: L7 only: "wait" (lossless: frames wait for a work consumer) or "drop" (counted as
    #: ``no_consumer`` while no work consumer is connected; the monitor fan-out still gets them)
    when_no_consumer: str = "wait"


@dataclass
class ChannelCounters:
    """Counters written by one forwarding thread; read (racily, as plain ints) by stats()."""

    messages: int = 0
    bytes: int = 0
    parts: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    last_seq: int | None = None
    last_run: int | None = None
    producer_restarts: int = 0
    monitor_sent: int = 0
    in_flight_at_stop: int = 0

    def drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1


class _ChannelThread(threading.Thread):
    """Common start/stop protocol: sockets live and die in this thread."""

    def __init__(self, ctx: zmq.Context, name: str, faces: FaceConfig, log: logging.Logger) -> None:
        super().__init__(name=name, daemon=True)
        self.ctx = ctx
        self.faces = faces
        self.log = log
        self.stop_endpoint = f"inproc://{name}-{uuid.uuid4().hex}-stop"
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.endpoints: dict[str, str] = {}
        self._sockets: list[zmq.Socket] = []

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        self._sockets.append(sock)
        return sock

    def _bind_face(self, sock: zmq.Socket, face: str, domain: str) -> str:
        """Bind a TCP face with its ZAP domain (and CURVE server key); return its endpoint."""
        sock.zap_domain = domain.encode()
        if self.faces.curve_secret is not None:
            sock.curve_server = True
            sock.curve_secretkey = self.faces.curve_secret
        sock.bind(f"tcp://{self.faces.host}:*")
        port = sock.last_endpoint.decode().rsplit(":", 1)[1]
        self.endpoints[face] = f"tcp://{self.faces.advertise}:{port}"
        return self.endpoints[face]

    def run(self) -> None:
        try:
            stop = self._socket(zmq.PULL)
            stop.bind(self.stop_endpoint)
            self.setup()
        except zmq.ZMQError as exc:
            self.error = exc
            self.ready.set()
            self._close()
            return
        self.ready.set()
        try:
            self.loop(stop)
        except zmq.ContextTerminated:
            pass  # the DataPlane's context is going away: a clean exit
        except Exception:
            self.log.exception("data plane thread %s failed", self.name)
        finally:
            self._close()

    def _close(self) -> None:
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets.clear()

    def setup(self) -> None:
        raise NotImplementedError

    def loop(self, stop: zmq.Socket) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to finish (from any thread) and wait for it."""
        if self.is_alive():
            pipe = self.ctx.socket(zmq.PUSH)
            try:
                pipe.linger = 0
                pipe.connect(self.stop_endpoint)
                pipe.send(b"STOP", flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # already stopping: its pipe is gone
            finally:
                pipe.close(linger=0)
        self.join(timeout)


class L4Router(_ChannelThread):
    """``zmq.proxy_steerable``: PULL → PUSH in C; the capture socket is the PUB monitor."""

    def __init__(self, ctx: zmq.Context, name: str, faces: FaceConfig, log: logging.Logger) -> None:
        super().__init__(ctx, name, faces, log)
        self.control_endpoint = f"inproc://{name}-{uuid.uuid4().hex}-control"
        self.runs = 0  # proxy invocations; libzmq's counters restart with each

    def setup(self) -> None:
        f = self.faces
        self.front = self._socket(zmq.PULL)
        self.front.rcvhwm = f.hwm
        # L4 cannot inspect headers; libzmq's per-part size cap is its only size guard.
        self.front.maxmsgsize = max(f.max_frame_bytes, MAX_HEADER_BYTES)
        self._bind_face(self.front, "producer", f.producer_domain)
        self.work = self._socket(zmq.PUSH)
        self.work.sndhwm = f.hwm
        self._bind_face(self.work, "work", f.consumer_domain)
        self.capture = None
        if f.monitor:
            self.capture = self._socket(zmq.PUB)
            self.capture.sndhwm = f.hwm
            self._bind_face(self.capture, "monitor", f.consumer_domain)
        self.control = self._socket(zmq.PAIR)
        self.control.bind(self.control_endpoint)

    def loop(self, stop: zmq.Socket) -> None:
        # Returns when the supervisor (owner of the control peer) sends TERMINATE.
        while True:
            self.runs += 1
            try:
                zmq.proxy_steerable(self.front, self.work, self.capture, self.control)
                return
            except zmq.Again:
                # libzmq 4.3.5's proxy gives up with EAGAIN when a ZAP-authenticated connection
                # makes the frontend look readable but the first recv finds nothing (before any
                # part is forwarded). Nothing is lost; start it again. The supervisor carries the
                # counters over (see Supervisor._statistics).
                self.log.debug("proxy %s: spurious EAGAIN from libzmq, restarting", self.name)


class L7Gateway(_ChannelThread):
    """Validates every header, enforces stream/size/rate, forwards zmq.Frames without copying.

    It also counts the work consumers connected to its PUSH socket, from a ZeroMQ socket monitor
    (``EVENT_ACCEPTED`` +1, ``EVENT_DISCONNECTED`` -1 per file descriptor; a peer ZAP refuses is
    accepted, then disconnected). With ``when_no_consumer="drop"`` a frame that arrives while none
    is connected goes to the monitor fan-out only and is counted as dropped (``no_consumer``); as
    soon as one is connected the work stream is lossless again (it waits at the high-water mark).
    The events are read in this thread, also while it waits at the high-water mark, so the last
    consumer leaving turns waiting into dropping.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        name: str,
        faces: FaceConfig,
        log: logging.Logger,
        counters: ChannelCounters,
    ) -> None:
        super().__init__(ctx, name, faces, log)
        self.counters = counters
        self.drop_without_consumer = faces.when_no_consumer == "drop"
        self._peers: set[int] = set()  # file descriptors of connected work consumers
        self._events: zmq.Socket | None = None

    @property
    def consumers_connected(self) -> int:
        """Work consumers connected now (TCP level, as the socket monitor last told this thread)."""
        return len(self._peers)

    def setup(self) -> None:
        f = self.faces
        self.front = self._socket(zmq.PULL)
        self.front.rcvhwm = f.hwm
        # Beyond twice the limit libzmq disconnects the sender; up to it, we count "oversized".
        self.front.maxmsgsize = 2 * max(f.max_frame_bytes, MAX_HEADER_BYTES)
        self._bind_face(self.front, "producer", f.producer_domain)
        self.work = self._socket(zmq.PUSH)
        self.work.sndhwm = f.hwm
        self._events = self.work.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._bind_face(self.work, "work", f.consumer_domain)
        self.monitor = None
        if f.monitor:
            self.monitor = self._socket(zmq.PUB)
            self.monitor.sndhwm = f.hwm
            self._bind_face(self.monitor, "monitor", f.consumer_domain)

    def _close(self) -> None:
        if self._events is not None:
            try:
                self.work.disable_monitor()
            except zmq.ZMQError:
                pass  # the context is going away: the monitor goes with it
            self._events.close(linger=0)
            self._events = None
        super()._close()

    def _read_events(self) -> None:
        """Apply every pending socket-monitor event to the set of connected consumers."""
        events = self._events
        while events is not None:
            try:
                event = recv_monitor_message(events, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._peers.add(event["value"])
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._peers.discard(event["value"])

    def loop(self, stop: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(stop, zmq.POLLIN)
        poller.register(self.front, zmq.POLLIN)
        poller.register(self._events, zmq.POLLIN)
        blocked = zmq.Poller()  # used while the work stream is at its high-water mark
        blocked.register(stop, zmq.POLLIN)
        blocked.register(self.work, zmq.POLLOUT)
        blocked.register(self._events, zmq.POLLIN)
        c = self.counters
        f = self.faces
        rate = f.max_rate_hz
        capacity = max(1.0, rate or 0.0)
        tokens = capacity
        t_last = time.monotonic()
        recv = self.front.recv_multipart
        drop_mode = self.drop_without_consumer
        while True:
            events = dict(poller.poll())
            if stop in events:
                return
            if self._events in events:
                self._read_events()
            for _ in range(BURST):
                try:
                    parts = recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if len(parts) != 2:
                    c.drop("parts")
                    continue
                head, payload = parts
                try:
                    header = decode_header(head.bytes)
                    check_payload(header, len(payload), f.max_frame_bytes)
                except DecodeError as exc:
                    c.drop(exc.reason)
                    continue
                if header.stream != f.stream:
                    c.drop("stream")
                    continue
                if rate is not None:
                    now = time.monotonic()
                    tokens = min(capacity, tokens + (now - t_last) * rate)
                    t_last = now
                    if tokens < 1.0:
                        c.drop("rate")
                        continue
                    tokens -= 1.0
                if c.last_seq is not None and header.seq <= c.last_seq:
                    # seq never goes back for one producer (a new run keeps counting up).
                    c.producer_restarts += 1
                    self.log.warning(
                        "stream %s: sequence went from %d (run %s) to %d (run %d): producer restart",
                        f.stream,
                        c.last_seq,
                        c.last_run,
                        header.seq,
                        header.run,
                    )
                if drop_mode and not self._peers:
                    self._read_events()  # a consumer may have connected since the last poll
                outcome = self._send_work(parts, stop, blocked, drop_mode)
                if outcome == "stop":
                    c.drop("shutdown")
                    return
                c.last_seq = header.seq
                c.last_run = header.run
                if outcome == "sent":
                    c.messages += 1
                    c.bytes += len(head) + len(payload)
                else:
                    c.drop("no_consumer")
                if self.monitor is not None:
                    # PUB never blocks: a slow viewer's queue overflows and libzmq drops for it.
                    self.monitor.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
                    c.monitor_sent += 1

    def _send_work(
        self, parts: list[Any], stop: zmq.Socket, blocked: zmq.Poller, drop_mode: bool
    ) -> str:
        """Lossless hand-off: wait at the high-water mark, but stay stoppable.

        Returns "sent", "stop", or (drop mode) "no_consumer" when no work consumer is connected.
        """
        while True:
            if drop_mode and not self._peers:
                return "no_consumer"
            try:
                self.work.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
                return "sent"
            except zmq.Again:
                events = dict(blocked.poll(500))
                if stop in events:
                    return "stop"
                if self._events in events:
                    self._read_events()


class Supervisor(_ChannelThread):
    """Collects consumer reports (lag, loss) and samples counters; L4: polls proxy STATISTICS."""

    def __init__(
        self,
        ctx: zmq.Context,
        name: str,
        faces: FaceConfig,
        log: logging.Logger,
        counters: ChannelCounters,
        router: L4Router | None,
    ) -> None:
        super().__init__(ctx, name, faces, log)
        self.counters = counters
        self.router = router
        self.control_endpoint = router.control_endpoint if router is not None else None
        self._run = 0
        self._asked_at_run: int | None = None
        self._base = [0] * 8
        self._last = [0] * 8
        self.uncounted_runs = 0
        self.consumers: dict[str, dict[str, Any]] = {}
        self.report_errors = 0
        self.untracked_reporters = 0
        self.samples: deque[tuple[float, int, int]] = deque(maxlen=16)
        self._lock = threading.Lock()

    def setup(self) -> None:
        self.report = self._socket(zmq.PULL)
        self.report.rcvhwm = 1000
        self.report.maxmsgsize = REPORT_MAX_BYTES
        self._bind_face(self.report, "report", self.faces.consumer_domain)
        self.control = None
        if self.control_endpoint is not None:
            self.control = self._socket(zmq.PAIR)
            self.control.connect(self.control_endpoint)

    def loop(self, stop: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(stop, zmq.POLLIN)
        poller.register(self.report, zmq.POLLIN)
        next_sample = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= next_sample:
                    self._sample(now)
                    next_sample = now + SAMPLE_S
                events = dict(poller.poll(max(1, int((next_sample - now) * 1000))))
                if stop in events:
                    return
                if self.report in events:
                    while True:
                        try:
                            self._on_report(self.report.recv(zmq.NOBLOCK))
                        except zmq.Again:
                            break
        finally:
            if self.control is not None:
                self._statistics(wait_ms=500)  # final counters before the proxy goes
                self._terminate_proxy()

    def _terminate_proxy(self) -> None:
        """TERMINATE, then wait for libzmq's (empty) reply: the proxy sends it on the PAIR before
        returning, and a PAIR send to a peer that already closed would block the proxy forever."""
        self.control.send(b"TERMINATE")
        deadline = time.monotonic() + 1.0  # a proxy waiting in a send cannot answer; see remove()
        while (left := deadline - time.monotonic()) > 0 and self.control.poll(int(left * 1000)):
            if self.control.recv_multipart() == [b""]:
                return
        self.log.warning("proxy %s did not confirm TERMINATE", self.name)

    def _statistics(self, wait_ms: int = 100) -> None:
        """Ask the proxy for libzmq's counters; carry them over proxy restarts.

        A proxy waiting in a send (all consumers full) answers late: keep one request pending
        and pick the answer up on a later sample instead of stalling report collection.
        """
        if self._asked_at_run is None:
            self._asked_at_run = self.router.runs
            self.control.send(b"STATISTICS")
        if not self.control.poll(wait_ms):
            return
        parts = self.control.recv_multipart()
        run, self._asked_at_run = self._asked_at_run, None
        if len(parts) != 8:
            return  # not a STATISTICS answer
        values = [struct.unpack("<Q", p)[0] for p in parts]
        if self.router.runs != run:
            return  # restarted while answering: ambiguous sample, take the next one
        if run != self._run:
            # A new proxy invocation: its counters start at 0; keep what the old one counted.
            # Runs that started and ended between two samples are counted as uncounted_runs.
            self._base = [b + last for b, last in zip(self._base, self._last, strict=True)]
            self.uncounted_runs += max(0, run - self._run - 1)
            self._run = run
        self._last = values
        total = [b + v for b, v in zip(self._base, values, strict=True)]
        c = self.counters
        c.parts = total[6]  # backend parts out = forwarded
        c.messages = total[6] // 2  # the wire format is [header, payload]
        c.bytes = total[7]
        c.in_flight_at_stop = total[0] - total[6]

    def _sample(self, now: float) -> None:
        if self.control is not None:
            self._statistics()
        self.samples.append((now, self.counters.messages, self.counters.bytes))

    def rates(self) -> tuple[float, float]:
        """(messages/s, GB/s) over the last ~2 s of samples."""
        samples = list(self.samples)
        if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
            return 0.0, 0.0
        (t0, m0, b0), (t1, m1, b1) = samples[0], samples[-1]
        return (m1 - m0) / (t1 - t0), (b1 - b0) / (t1 - t0) / 1e9

    def _on_report(self, raw: bytes) -> None:
        try:
            body = json.loads(raw)
            cid = body["consumer_id"]
            entry = {
                "role": "monitor" if body.get("role") == "monitor" else "work",
                "last_seq": body.get("last_seq"),
                "received": int(body.get("received", 0)),
                "lost": int(body.get("lost", 0)),
                "malformed": int(body.get("malformed", 0)),
                "restarts": int(body.get("restarts", 0)),
                "t": time.monotonic(),
            }
            if not isinstance(cid, str) or not cid or len(cid) > 128:
                raise ValueError("consumer_id must be a short non-empty string")
            if entry["last_seq"] is not None and not isinstance(entry["last_seq"], int):
                raise ValueError("last_seq must be an integer")
        except (ValueError, KeyError, TypeError) as exc:
            self.report_errors += 1
            self.log.debug("bad consumer report: %s", exc)
            return
        with self._lock:
            if cid not in self.consumers and len(self.consumers) >= MAX_CONSUMERS:
                self.untracked_reporters += 1
                return
            self.consumers[cid] = entry

    def consumer_table(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {cid: dict(entry) for cid, entry in self.consumers.items()}
