"""The DSN's forwarding threads: L4 router (libzmq proxy, in C) and L7 gateway (Python).

Each thread creates, binds and closes its own sockets; ``ready`` is set once they are bound (or
``error`` is set); a stop message on an inproc pipe ends it, and ``ContextTerminated`` is a clean
exit. The supervisor (:mod:`beamhub.streaming.dataplane_supervisor`) collects consumers' status reports
and, for L4, polls the proxy's ``STATISTICS`` so no Python runs per message. See
:mod:`beamhub.streaming.dataplane` for the design.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from beamhub.streaming.wire import MAX_HEADER_BYTES, DecodeError, check_message

__all__ = ["ChannelCounters", "ChannelThread", "FaceConfig", "L4Router", "L7Gateway"]

#: Messages handled per poll wake-up by the L7 gateway (keeps stop/latency checks regular).
BURST = 256
#: Socket flags as plain ints: an enum operation per message showed in the L7 profile.
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
#: pyzmq's compiled send, without the Python wrapper around it (which only adds routing_id/group,
#: unused here): one Python frame less per part sent, which showed in the L7 profile at 1 KiB.
_SEND = zmq.backend.Socket.send
#: glibc's ``malloc_trim`` (None elsewhere): returns freed heap memory to the system.
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)


@dataclass
class FaceConfig:
    """How a channel's sockets are bound: where, with which limits and which ZAP domains."""

    host: str
    advertise: str
    hwm: int
    max_frame_bytes: int
    producer_domain: str
    consumer_domain: str
    curve_secret: bytes | None = field(default=None, repr=False)  # never in a repr
    monitor: bool = True
    stream: str = ""
    max_rate_hz: float | None = None
    #: L7 only: "wait" (lossless: frames wait for a work consumer) or "drop" (counted as
    #: ``no_consumer`` while no work consumer is connected; the monitor fan-out still gets them)
    when_no_consumer: str = "wait"
    #: face -> TCP port to bind (a restored channel keeps its endpoints); a face not named here
    #: binds to any free port
    ports: dict[str, int] = field(default_factory=dict)
    #: address the producer face binds and advertises instead of ``host`` (a DSN with one
    #: interface on the instrument network and one on the compute network); None: ``host``
    producer_host: str | None = None


@dataclass
class ChannelCounters:
    """Counters written by one forwarding thread; read (racily, as plain ints) by stats()."""

    messages: int = 0  # frames (events: a batch message counts its events)
    bytes: int = 0
    parts: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    last_seq: int | None = None
    last_run: int | None = None
    producer_restarts: int = 0
    monitor_sent: int = 0
    in_flight_at_stop: int = 0

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` dropped frames (the events of a batch count one by one)."""
        self.drops[reason] = self.drops.get(reason, 0) + n


class ChannelThread(threading.Thread):
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
        host, advertise = self.faces.host, self.faces.advertise
        if face == "producer" and self.faces.producer_host:
            host = advertise = self.faces.producer_host
        port = self.faces.ports.get(face)
        sock.bind(f"tcp://{host}:{port or '*'}")
        port = sock.last_endpoint.decode().rsplit(":", 1)[1]
        self.endpoints[face] = f"tcp://{advertise}:{port}"
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


class L4Router(ChannelThread):
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


class L7Gateway(ChannelThread):
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
        self._trimmed_at = float("-inf")
        self._events: zmq.Socket | None = None
        #: topics the monitor's subscribers asked for (XPUB passes the first subscription to a
        #: topic and the unsubscription when its last subscriber leaves or disconnects)
        self._topics: set[bytes] = set()

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
            # XPUB, not PUB: its subscriptions tell whether anyone watches, so a channel without
            # viewers does not pay a monitor send per message (a tenth of the gateway's CPU).
            self.monitor = self._socket(zmq.XPUB)
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

    @property
    def viewers_subscribed(self) -> bool:
        """Whether the monitor fan-out has at least one subscription (as last read)."""
        return bool(self._topics)

    def _read_subscriptions(self) -> None:
        """Apply pending XPUB (un)subscriptions: byte 1 = subscribe, 0 = unsubscribe, then topic."""
        while self.monitor is not None:
            try:
                msg = self.monitor.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":
                self._topics.add(msg[1:])
            elif msg[:1] == b"\x00":
                self._topics.discard(msg[1:])

    def loop(self, stop: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(stop, zmq.POLLIN)
        poller.register(self.front, zmq.POLLIN)
        poller.register(self._events, zmq.POLLIN)
        if self.monitor is not None:
            poller.register(self.monitor, zmq.POLLIN)
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
        recv = self.front.recv
        noblock, more_noblock = _NOBLOCK, _MORE_NOBLOCK
        drop_mode = self.drop_without_consumer
        monitor = self.monitor
        send, work, check, max_bytes = _SEND, self.work, check_message, f.max_frame_bytes
        while True:
            events = dict(poller.poll())
            if stop in events:
                return
            if self._events in events:
                self._read_events()
            if monitor is not None and monitor in events:
                self._read_subscriptions()
            watched = monitor is not None and bool(self._topics)
            for _ in range(BURST):
                # Part by part rather than recv_multipart: ``Frame.more`` instead of a
                # getsockopt per part (a tenth of the per-message cost at 1 KiB). A message is
                # delivered whole, so once its first part is here the others are too.
                try:
                    head = recv(noblock, copy=False)
                except zmq.Again:
                    break
                payload = recv(noblock, copy=False) if head.more else None
                if payload is None or payload.more:
                    size = len(head) + (len(payload) if payload is not None else 0)
                    more = payload is not None
                    del head, payload  # a hostile multipart message: release it now
                    while more:
                        extra = recv(noblock, copy=False)
                        size, more = size + len(extra), extra.more
                        del extra
                    c.drop("parts")
                    if size > f.max_frame_bytes:
                        self._give_back_memory()
                    continue
                nbytes = len(payload)
                try:
                    stream, seq, run, n = check(head.bytes, nbytes, max_bytes)
                except DecodeError as exc:
                    c.drop(exc.reason)
                    continue
                # n: events in this message; policy drops and the rate count events
                if stream != f.stream:
                    c.drop("stream", n)
                    continue
                if rate is not None:
                    now = time.monotonic()
                    tokens = min(max(capacity, n), tokens + (now - t_last) * rate)
                    t_last = now
                    if tokens < n:
                        c.drop("rate", n)
                        continue
                    tokens -= n
                last_seq = c.last_seq
                if last_seq is not None and seq <= last_seq:
                    # seq never goes back for one producer (a new run keeps counting up).
                    c.producer_restarts += 1
                    self.log.warning(
                        "stream %s: sequence went from %d (run %s) to %d (run %d): producer restart",
                        f.stream,
                        last_seq,
                        c.last_run,
                        seq,
                        run,
                    )
                if drop_mode and not self._peers:
                    self._read_events()  # a consumer may have connected since the last poll
                    outcome = self._send_work(head, payload, stop, blocked, drop_mode)
                else:
                    # the common case inline; at the high-water mark, wait in _send_work
                    try:
                        send(work, head, more_noblock, False)
                    except zmq.Again:
                        outcome = self._send_work(head, payload, stop, blocked, drop_mode)
                    else:
                        send(work, payload, noblock, False)
                        outcome = "sent"
                if outcome == "stop":
                    c.drop("shutdown", n)
                    return
                c.last_seq = seq + n - 1
                c.last_run = run
                if outcome == "sent":
                    c.messages += n
                    c.bytes += len(head) + nbytes
                else:
                    c.drop("no_consumer", n)
                if watched:
                    # XPUB never blocks: a slow viewer's queue overflows and libzmq drops for it.
                    send(monitor, head, more_noblock, False)
                    send(monitor, payload, noblock, False)
                    c.monitor_sent += n

    def _give_back_memory(self) -> None:
        """After dropping an oversized message, hand the freed memory back to the system.

        glibc keeps large freed blocks in its arenas (the mmap threshold grows with them), so
        without this the DSN's RSS would keep what a hostile key holder made it buffer. At most
        once a second, so a sender cannot make the gateway spend its time trimming.
        """
        now = time.monotonic()
        if _MALLOC_TRIM is not None and now - self._trimmed_at >= 1.0:
            self._trimmed_at = now
            _MALLOC_TRIM(0)

    def _send_work(
        self, head: Any, payload: Any, stop: zmq.Socket, blocked: zmq.Poller, drop_mode: bool
    ) -> str:
        """Lossless hand-off: wait at the high-water mark, but stay stoppable.

        Returns "sent", "stop", or (drop mode) "no_consumer" when no work consumer is connected.
        The high-water mark is checked on a message's first part only, so once the header is
        accepted the payload is too (as in ``send_multipart``, which sends part by part as well).
        """
        send, more_noblock, noblock = self.work.send, _MORE_NOBLOCK, _NOBLOCK
        while True:
            if drop_mode and not self._peers:
                return "no_consumer"
            try:
                send(head, more_noblock, copy=False)
                send(payload, noblock, copy=False)
                return "sent"
            except zmq.Again:
                events = dict(blocked.poll(500))
                if stop in events:
                    return "stop"
                if self._events in events:
                    self._read_events()
