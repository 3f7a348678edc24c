"""The DSN channel's supervisor thread: consumers' status reports, rates, and L4 proxy statistics.

It collects the small JSON reports consumers send to the channel's ``report`` face (lag, loss),
samples the counters for rates and, for an L4 channel, polls the libzmq proxy's ``STATISTICS`` on
its control socket, so no Python runs per message. See :mod:`beamhub.streaming.dataplane` for the design.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections import deque
from typing import Any

import zmq

from beamhub.streaming.dataplane_paths import ChannelCounters, ChannelThread, FaceConfig, L4Router

__all__ = ["MAX_CONSUMERS", "SAMPLE_S", "Supervisor"]

#: How often the supervisor samples counters (rate) and, in L4, asks the proxy for statistics.
SAMPLE_S = 0.2
#: At most this many consumers are tracked per channel; further reporters are counted, not kept.
MAX_CONSUMERS = 1024
REPORT_MAX_BYTES = 4096
#: Consumer ids one key given at channel creation may report for (a registered key: exactly one).
MAX_IDS_PER_KEY = 64


class Supervisor(ChannelThread):
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
        self.reports_refused = 0  # reports whose consumer id is not the sending key's
        self.untracked_reporters = 0
        #: CURVE key (z85) -> the consumer id it was registered for (None: ids claimed first come)
        self._keys: dict[str, str | None] = {}
        self._id_key: dict[str, str] = {}  # consumer id -> the key that owns it
        self._claims: dict[str, int] = {}  # key -> consumer ids claimed (unbound keys)
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
                            parts = self.report.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        if len(parts) != 1:
                            self.report_errors += 1
                            del parts
                            continue
                        self._on_report(parts[0].bytes, self._sender(parts[0]))
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

    def allow_key(self, key: str, consumer_id: str | None) -> None:
        """A consumer key the ZAP handler lets in; ``consumer_id``: the only id it reports for."""
        with self._lock:
            self._keys[key] = consumer_id
            if consumer_id is not None:
                self._id_key[consumer_id] = key

    def _sender(self, frame: zmq.Frame) -> str | None:
        """The CURVE key (z85) the report came with; None on a channel without CURVE."""
        if self.faces.curve_secret is None:
            return None
        try:
            return frame.get("User-Id")
        except zmq.ZMQError:
            return ""

    def _may_report(self, key: str | None, cid: str) -> bool:
        """Reports are bound to keys: an id is its registered key's, or the first key's to use it."""
        if key is None:
            return True  # no CURVE on this channel (a data plane used without the control plane)
        with self._lock:
            if key not in self._keys:
                return False
            bound = self._keys[key]
            if bound is not None:
                return bound == cid
            owner = self._id_key.get(cid)
            if owner is not None:
                return owner == key
            if self._claims.get(key, 0) >= MAX_IDS_PER_KEY:
                return False
            self._claims[key] = self._claims.get(key, 0) + 1
            self._id_key[cid] = key
            return True

    def _on_report(self, raw: bytes, key: str | None = None) -> None:
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
                "lost_reasons": _reasons(body.get("lost_reasons")),
                "disconnects": int(body.get("disconnects", 0)),
                "t": time.monotonic(),
            }
            if not isinstance(cid, str) or not cid or len(cid) > 128:
                raise ValueError("consumer_id must be a short non-empty string")
            if entry["last_seq"] is not None and not isinstance(entry["last_seq"], int):
                raise ValueError("last_seq must be an integer")
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            self.report_errors += 1
            self.log.debug("bad consumer report: %s", exc)
            return
        if not self._may_report(key, cid):
            self.reports_refused += 1
            self.log.debug("report for consumer %r refused: not sent with its key", cid[:64])
            return
        with self._lock:
            if cid not in self.consumers and len(self.consumers) >= MAX_CONSUMERS:
                self.untracked_reporters += 1
                return
            self.consumers[cid] = entry

    def consumer_table(self) -> dict[str, dict[str, Any]]:
        """Each consumer's last report (a copy)."""
        with self._lock:
            return {cid: dict(entry) for cid, entry in self.consumers.items()}


def _reasons(value: Any) -> dict[str, int]:
    """A report's ``lost_reasons``: at most 8 short names with counts (ValueError otherwise)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 8:
        raise ValueError("lost_reasons must be an object of at most 8 reasons")
    out = {}
    for reason, count in value.items():
        if not isinstance(reason, str) or not 0 < len(reason) <= 32:
            raise ValueError("a lost_reasons name must be a short string")
        out[reason] = int(count)
    return out
