"""Read a DSN channel from a notebook or a Dask worker: frames as zero-copy numpy arrays, loss visible.

A :class:`StreamConsumer` connects to a channel's ``work`` endpoint (PULL: frames are distributed
among all work consumers) or, with ``monitor=True``, to its ``monitor`` endpoint (SUB: every frame,
dropped for this viewer if it falls behind). It is used from one thread.

What the counters mean:

* ``lost`` counts sequence gaps, which only mean loss when this consumer sees *every* frame: in
  monitor mode or with ``exclusive=True`` (the only work consumer). With work distribution each
  consumer sees a subset, so ``lost`` stays 0 and loss is judged by the DSN: it compares frames
  forwarded with the ``received`` counts that consumers report (``unaccounted`` in the channel's
  stats). That is why the consumer sends a small JSON status report to the channel's ``report``
  endpoint about every 0.5 s (from :meth:`receive`, no background thread).
* ``restarts``: the sequence did not increase — the producer restarted (a new *run* of the same
  producer keeps counting ``seq`` up, so it is not a restart). It is
  counted, logged, kept in :attr:`StreamConsumer.events`, and reported to the DSN.
* ``lost_reasons``: why ``lost`` frames went missing. A gap that follows a lost link to the DSN
  (a ZeroMQ socket monitor saw the connection drop; ZeroMQ reconnects by itself) is
  ``dsn_restart`` (until the link has been back for ``RECOVERY_S``: what a producer queued while
  the DSN was away comes first, then the frames it made once reconnected, with the ones it
  could not queue missing between them); any other gap is ``gap``. Each outage is one
  ``dsn_restart`` event in :attr:`events` (``after_seq``, ``resumed_seq``, ``lost``,
  ``outage_s``) and counts in ``disconnects``; ``link`` in :meth:`stats` is ``down``,
  ``recovering`` (back, gaps still the outage's) or ``up``; a work consumer sharing the stream cannot count
  the frames it missed, so its event says ``lost: null``.
* ``skipped_stale``: frames :meth:`StreamConsumer.receive_latest` passed over because a newer one
  was already waiting (a live view or steering feedback wants the freshest frame, not a backlog).
  They were received and are counted in ``frames``, so they are neither lost nor gaps. ZeroMQ's
  ``CONFLATE`` would do this in the socket but does not support multipart messages (a frame is
  header + payload), hence a drain-to-latest loop. The work face's other consumers are not
  affected: they keep receiving every frame.
* ``malformed``: messages that failed :func:`beamhub.streaming.wire.decode`, by reason; the stream goes on.
* latency p50/p99: now minus the producer's ``t_ns`` (same host or synchronised clocks).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.request
import uuid
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import zmq

from beamhub.streaming.credentials import (
    ChannelLookupError,
    api_call,
    register_key,
    resolve_channel,
)
from beamhub.streaming.link import DSN_RESTART, LinkWatch
from beamhub.streaming.wire import DEFAULT_MAX_FRAME_BYTES, DecodeError, Frame, decode

__all__ = ["ChannelLookupError", "StreamConsumer", "lookup_channel"]

REPORT_INTERVAL_S = 0.5
#: After the link to the DSN is back, gaps are still the outage's for this long: the producer's
#: queue drains first, then come the frames it produced once its own link was back.
RECOVERY_S = 3.0
LATENCY_WINDOW = 10_000
#: :meth:`StreamConsumer.receive_latest` drains until no frame came for this long: the rest of a
#: backlog flows in from TCP buffers and the DSN's queue as this socket's queue empties (measured:
#: 64x64 frames at 200 Hz, a viewer at 20 Hz was 270 ms behind with a 0 s grace, 8 ms with 3 ms).
DRAIN_GRACE_S = 0.003
#: ... and never for longer than this.
DRAIN_MAX_S = 0.1


def lookup_channel(dsn_url: str, channel_id: str, token: str, *, timeout: float = 10.0) -> dict:
    """``GET {dsn_url}/api/channels/{id}`` with the project token; return the channel's JSON."""
    path = f"/api/channels/{urllib.request.quote(channel_id, safe='')}"
    try:
        return api_call(dsn_url, "GET", path, token, timeout=timeout)
    except ChannelLookupError as exc:
        if exc.status:  # keep the message users know: "DSN refused channel ..."
            raise ChannelLookupError(
                exc.status, str(exc).replace(f"GET {path}", f"channel {channel_id!r}", 1)
            ) from exc
        raise


def _default_consumer_id() -> str:
    return f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class StreamConsumer:
    """Iterate frames from a DSN channel; counts frames, bytes, loss, malformed, restarts, latency."""

    def __init__(
        self,
        endpoint: str,
        *,
        consumer_id: str | None = None,
        report: str | None = None,
        curve_server_key: str | bytes | None = None,
        curve_keypair: tuple[str | bytes, str | bytes] | None = None,
        monitor: bool = False,
        exclusive: bool = False,
        hwm: int = 16,
        max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        context: zmq.Context | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise ValueError(
                f"endpoint: {endpoint!r} is not a ZeroMQ endpoint like tcp://host:port"
            )
        if isinstance(hwm, bool) or not isinstance(hwm, int) or hwm < 0:
            raise ValueError(f"hwm: {hwm!r} must be a number of frames >= 0 (0 = no limit)")
        if curve_server_key is not None and curve_keypair is None:
            raise ValueError(
                "curve_keypair: this channel is encrypted; pass (public, secret) z85 keys whose "
                "public half was registered when the channel was created"
            )
        self.consumer_id = consumer_id or _default_consumer_id()
        self.role = "monitor" if monitor else "work"
        self.count_gaps = monitor or exclusive
        self.max_bytes = max_bytes
        self.log = log or logging.getLogger("beamhub.consumer")
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.sock = self.context.socket(zmq.SUB if monitor else zmq.PULL)
        self.sock.linger = 0
        self.sock.rcvhwm = hwm
        if monitor:
            self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._report_sock: zmq.Socket | None = None
        self._closed = False
        self.link = LinkWatch(self.sock, f"consumer {self.consumer_id}", self.log)
        try:
            self._secure(self.sock, curve_server_key, curve_keypair)
            self.sock.connect(endpoint)
            if report:
                self._report_sock = self.context.socket(zmq.PUSH)
                self._report_sock.linger = 0
                self._report_sock.sndhwm = 4
                self._secure(self._report_sock, curve_server_key, curve_keypair)
                self._report_sock.connect(report)
        except zmq.ZMQError as exc:
            self.link.close()
            for sock in (self.sock, self._report_sock):
                if sock is not None:
                    sock.close(linger=0)
            if self._own_context:
                self.context.term()
            raise ValueError(f"cannot connect to {endpoint}: {exc}") from exc
        self.endpoint = endpoint
        self.frames = 0
        self.bytes = 0
        self.lost = 0
        self.lost_reasons: dict[str, int] = {}
        self._outage: dict[str, Any] | None = None  # the DSN outage gaps are attributed to
        self._link_back_at: float | None = None
        self.malformed = 0
        self.malformed_reasons: dict[str, int] = {}
        self.restarts = 0
        self.skipped_stale = 0
        self.last_seq: int | None = None
        self.run: int | None = None
        self.events: deque[dict[str, Any]] = deque(maxlen=100)
        self._latency_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._started = time.monotonic()
        self._next_report = 0.0
        self._pending: deque[Frame] = deque()  # the rest of a batch message's events

    @staticmethod
    def _secure(sock: zmq.Socket, server_key: Any, keypair: Any) -> None:
        if server_key is None:
            return
        as_bytes = [k.encode() if isinstance(k, str) else k for k in (server_key, *keypair)]
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = as_bytes

    @classmethod
    def from_dsn(
        cls,
        dsn_url: str,
        channel_id: str,
        token: str,
        *,
        monitor: bool = False,
        **kwargs: Any,
    ) -> StreamConsumer:
        """Register a fresh CURVE key for this consumer on the channel (the DSN binds its reports
        to it) and connect to the channel's faces with it.

        ``channel_id`` is a channel id (``ch-...``) or the stream name of a channel of the token's
        project (``"detector"``), resolved by :func:`~beamhub.streaming.credentials.resolve_channel`.
        With ``curve_keypair`` given (keys named when the channel was created) nothing is
        registered; the endpoints are looked up and used with that keypair.
        """
        channel_id = resolve_channel(dsn_url, channel_id, token)
        if kwargs.get("curve_keypair") is not None:
            endpoints = lookup_channel(dsn_url, channel_id, token).get("endpoints") or {}
            server_key = endpoints.get("server_key")
        else:
            kwargs["consumer_id"] = kwargs.get("consumer_id") or _default_consumer_id()
            cred = register_key(
                dsn_url, channel_id, token, "consumer", consumer_id=kwargs["consumer_id"]
            )
            endpoints, server_key = cred.endpoints, cred.server_key
            kwargs["curve_keypair"] = (cred.public, cred.secret)
        endpoint = endpoints.get("monitor" if monitor else "work")
        if not endpoint:
            face = "monitor" if monitor else "work"
            raise ChannelLookupError(200, f"channel {channel_id!r} has no {face} endpoint")
        kwargs.setdefault("report", endpoints.get("report"))
        if server_key:
            kwargs.setdefault("curve_server_key", server_key)
        return cls(endpoint, monitor=monitor, **kwargs)

    def receive(self, timeout: float | None = None) -> Frame | None:
        """The next valid frame, or ``None`` if none arrived within ``timeout`` seconds.

        A batch message (many small events under one header) gives its events one by one, each
        a frame of its own with its own ``seq`` (zero-copy views of the message's payload).
        """
        if self._pending:
            return self._pending.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now >= self._next_report:
                self.send_report()
                self._next_report = now + REPORT_INTERVAL_S
            until = self._next_report if deadline is None else min(self._next_report, deadline)
            if not self.sock.poll(max(0, int((until - now) * 1000))):
                self._watch_link()
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            self._watch_link()  # an outage is seen before the first frame that follows it
            parts = self.sock.recv_multipart(copy=False)
            try:
                frame = decode(parts, max_bytes=self.max_bytes)
            except DecodeError as exc:
                self.malformed += 1
                self.malformed_reasons[exc.reason] = self.malformed_reasons.get(exc.reason, 0) + 1
                continue
            nbytes = len(parts[0]) + len(parts[1])
            if frame.header.batch == 1:
                self._account(frame, nbytes)
                return frame
            events = frame.events()
            for event in events:
                self._account(event, nbytes // len(events))
            self._pending.extend(events[1:])
            return events[0]

    def receive_latest(
        self, timeout: float | None = None, grace_s: float = DRAIN_GRACE_S
    ) -> Frame | None:
        """The freshest frame: wait like :meth:`receive`, then drain the backlog and return the
        newest frame, counting the older ones in ``skipped_stale``.

        For live views and steering feedback, where a backlog only adds latency. Use it on the
        monitor face (or as the only work consumer when skipping is acceptable); a lossless
        analysis keeps calling :meth:`receive` on the work face. A backlog is not all in this
        socket's queue at once (the rest waits in TCP buffers and the DSN's queue, and flows in
        as the queue empties), so draining goes on until no frame came for ``grace_s``, or the
        newest was stamped after the drain began (a fast stream never starves the caller), or
        after ``DRAIN_MAX_S``.
        """
        frame = self.receive(timeout)
        if frame is None:
            return None
        began_ns, until = time.time_ns(), time.monotonic() + DRAIN_MAX_S
        while frame.header.t_ns < began_ns and time.monotonic() < until:
            newer = self.receive(timeout=grace_s)
            if newer is None:
                break
            self.skipped_stale += 1
            frame = newer
        return frame

    def _watch_link(self) -> None:
        """Open an outage when the link drops; close it RECOVERY_S after the link is back."""
        for change in self.link.poll():
            if change == "down" and self._outage is None:
                self._outage = {
                    "event": DSN_RESTART,
                    "after_seq": self.last_seq,
                    "resumed_seq": None,
                    "lost": 0 if self.count_gaps else None,
                    "outage_s": None,
                    "t": time.time(),
                }
                self.events.append(self._outage)
                self._link_back_at = None
            elif change == "up" and self._outage is not None:
                self._outage["outage_s"] = self.link.last_outage_s
                self._link_back_at = time.monotonic()
        back = self._link_back_at
        if back is not None and time.monotonic() - back > RECOVERY_S:
            outage, self._outage, self._link_back_at = self._outage, None, None
            self.log.warning(
                "consumer %s: the DSN link was down %s s (seq %s -> %s): %s",
                self.consumer_id,
                outage["outage_s"],
                outage["after_seq"],
                outage["resumed_seq"],
                f"{outage['lost']} frames lost ({DSN_RESTART})"
                if self.count_gaps
                else "the frames missed cannot be counted by one of several work consumers",
            )

    def _account(self, frame: Frame, nbytes: int) -> None:
        header = frame.header
        outage = self._outage
        if outage is not None and outage["resumed_seq"] is None:
            outage["resumed_seq"] = header.seq
        self.frames += 1
        self.bytes += nbytes
        if header.t_ns:
            self._latency_ms.append((time.time_ns() - header.t_ns) / 1e6)
        last = self.last_seq
        if last is not None and header.seq <= last:
            self.restarts += 1
            event = {
                "event": "producer_restart",
                "from_seq": last,
                "to_seq": header.seq,
                "from_run": self.run,
                "to_run": header.run,
                "t": time.time(),
            }
            self.events.append(event)
            self.log.warning(
                "stream %s: sequence went from %d (run %s) to %d (run %d): producer restarted",
                header.stream,
                last,
                self.run,
                header.seq,
                header.run,
            )
        elif last is not None and self.count_gaps and header.seq > last + 1:
            n = header.seq - last - 1
            self.lost += n
            reason = DSN_RESTART if outage is not None else "gap"
            self.lost_reasons[reason] = self.lost_reasons.get(reason, 0) + n
            if outage is not None:
                outage["lost"] += n
        self.last_seq = header.seq
        self.run = header.run

    def __iter__(self) -> Iterator[Frame]:
        while not self._closed:
            frame = self.receive(timeout=REPORT_INTERVAL_S)
            if frame is not None:
                yield frame

    def latency_ms(self) -> tuple[float | None, float | None]:
        """(p50, p99) of the last frames' latency in milliseconds."""
        if not self._latency_ms:
            return None, None
        p50, p99 = np.percentile(np.fromiter(self._latency_ms, dtype=float), [50, 99])
        return round(float(p50), 3), round(float(p99), 3)

    def stats(self) -> dict[str, Any]:
        p50, p99 = self.latency_ms()
        elapsed = time.monotonic() - self._started
        return {
            "consumer_id": self.consumer_id,
            "role": self.role,
            "endpoint": self.endpoint,
            "frames": self.frames,
            "bytes": self.bytes,
            "lost": self.lost,
            "lost_reasons": dict(self.lost_reasons),
            "loss_counted": self.count_gaps,
            "disconnects": self.link.disconnects,
            "link": "down" if self.link.down else "recovering" if self._outage else "up",
            "malformed": self.malformed,
            "malformed_reasons": dict(self.malformed_reasons),
            "restarts": self.restarts,
            "skipped_stale": self.skipped_stale,
            "last_seq": self.last_seq,
            "run": self.run,
            "latency_p50_ms": p50,
            "latency_p99_ms": p99,
            "elapsed_s": round(elapsed, 3),
        }

    def send_report(self) -> None:
        """Tell the DSN what we have (never blocks; a report that cannot go now is skipped)."""
        if self._report_sock is None:
            return
        body = {
            "consumer_id": self.consumer_id,
            "role": self.role,
            "last_seq": self.last_seq,
            "received": self.frames,
            "lost": self.lost,
            "lost_reasons": self.lost_reasons,
            "disconnects": self.link.disconnects,
            "malformed": self.malformed,
            "restarts": self.restarts,
            "skipped_stale": self.skipped_stale,
        }
        try:
            self._report_sock.send(json.dumps(body).encode(), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # the DSN is not reachable right now; the next report carries the totals

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._report_sock is not None:
            self.send_report()
            self._report_sock.close(linger=200)  # give the final report a moment to leave
        self.link.close()
        self.sock.close(linger=0)
        if self._own_context:
            self.context.term()

    def __enter__(self) -> StreamConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
