"""The source runner: paces a frame generator at its rate and pushes frames without ever blocking.

One thread owns the ZeroMQ PUSH socket (created, used and closed there). A detector cannot wait
for a slow network, so frames go out with ``NOBLOCK``; a full queue counts ``dropped_at_source``
while ``seq`` still advances, so the loss is visible downstream. ``seq`` is monotonic for the life
of the runner (across runs: only a restarted producer starts at 0 again), ``run`` counts run
starts and ``rev`` counts accepted steering changes; each change answers with the first ``seq``
that reflects it, because parameters only change between frames, under the runner's lock. With
``checksum=True`` (the default) ``meta["crc32"]`` is ``zlib.crc32`` of the payload bytes.

A DSN restart needs nothing from the runner: ZeroMQ reconnects the PUSH socket to the same
endpoint by itself (a restarted DSN binds its channels' same ports), frames keep being generated
and, while the DSN is away, those that do not fit the queue are counted in ``dropped_reasons`` as
``dsn_restart`` (``hwm`` otherwise; a socket monitor tells the two apart), ``seq`` advancing.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import zmq

from beamhub.streaming.credentials import api_call, register_key, resolve_channel
from beamhub.streaming.link import DSN_RESTART, LinkWatch
from beamhub.streaming.params import ParamSet
from beamhub.streaming.wire import FrameHeader, send_frame

__all__ = ["CurveKeys", "FrameGenerator", "SourceRunner"]

log = logging.getLogger("beamhub.source")
#: how many steering actions :meth:`SourceRunner.status` reports (newest last)
CHANGES_KEPT = 50


class FrameGenerator(Protocol):
    """What the runner drives: the simulator and the file replay both fit."""

    kind: str
    params: ParamSet  # must contain "rate_hz"

    def set_param(self, name: str, value: Any) -> Any: ...

    def start_run(self) -> None: ...

    def generate(self) -> tuple[np.ndarray, dict[str, Any]]:
        """The next frame and its metadata; raises ``StopIteration`` when the data is exhausted.

        A generator with ``events_per_message = n > 1`` returns ``n`` events stacked on a first
        axis: the runner sends them as one batch message (``rate_hz`` then counts events).
        """
        ...


@dataclass(frozen=True)
class CurveKeys:
    """CURVE keys (Z85): this socket's own keypair and, as a client, the server's public key."""

    public: bytes
    secret: bytes = field(repr=False)  # never in a repr
    server_public: bytes | None = None

    @classmethod
    def generate(cls, server_public: bytes | None = None) -> CurveKeys:
        public, secret = zmq.curve_keypair()
        return cls(public=public, secret=secret, server_public=server_public)


def _bind_address(address: str) -> str:
    """ZeroMQ asks for ``*`` as the ephemeral port; accept the usual ``:0`` too."""
    return address[:-2] + ":*" if address.endswith(":0") else address


class SourceRunner:
    """Streams a :class:`FrameGenerator` to a PUSH socket that connects (to a DSN) or binds."""

    def __init__(
        self,
        generator: FrameGenerator,
        *,
        stream: str,
        connect: str | None = None,
        bind: str | None = None,
        sndhwm: int = 16,
        linger_ms: int = 1000,
        curve: CurveKeys | None = None,
        checksum: bool = True,
        context: zmq.Context | None = None,
    ) -> None:
        if (connect is None) == (bind is None):
            raise ValueError("give exactly one of connect='tcp://host:port' or bind='tcp://..'")
        if not stream:
            raise ValueError("stream must be a non-empty name")
        if curve is not None and connect is not None and curve.server_public is None:
            raise ValueError("a CURVE client needs the server's public key (curve.server_public)")
        self.generator = generator
        self.stream = stream
        self.connect = connect
        self.bind = bind
        self.sndhwm = sndhwm
        self.linger_ms = linger_ms
        self.curve = curve
        self.checksum = checksum
        self.producer_id = uuid.uuid4().hex[:12]
        self.endpoint: str | None = None
        self._context = context
        self._own_context = context is None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_error: BaseException | None = None
        #: events per message (a small-event generator batches them; seq counts events)
        self._batch = int(getattr(generator, "events_per_message", 1))
        self._next_seq = 0
        self._run = 0
        self._rev = 0
        #: the last steering actions (parameter changes, run starts/stops) and who made them,
        #: so live views can mark them on their time plots
        self._changes: deque[dict[str, Any]] = deque(maxlen=CHANGES_KEPT)
        self._running = False
        self._finished = False
        self.frames_sent = 0
        self.bytes_sent = 0
        self.dropped_at_source = 0
        self.dropped_reasons: dict[str, int] = {}
        self.link: LinkWatch | None = None
        self.last_error: str | None = None
        self._sent_times: deque[float] = deque(maxlen=4096)

    @classmethod
    def from_dsn(
        cls,
        generator: FrameGenerator,
        dsn_url: str,
        channel_id: str,
        token: str,
        *,
        stream: str | None = None,
        **kwargs: Any,
    ) -> SourceRunner:
        """A runner for a DSN channel: registers a fresh CURVE producer key on it (the token's
        holder must own the channel, or be an operator or the PI) and connects with it.
        ``stream`` defaults to the channel's stream name; ``channel_id`` may be one (see
        :func:`~beamhub.streaming.credentials.resolve_channel`)."""
        channel_id = resolve_channel(dsn_url, channel_id, token)
        cred = register_key(dsn_url, channel_id, token, "producer")
        if stream is None:
            info = api_call(dsn_url, "GET", f"/api/channels/{channel_id}", token)
            stream = info["stream"]
        curve = CurveKeys(public=cred.public, secret=cred.secret, server_public=cred.server_key)
        return cls(
            generator, stream=stream, connect=cred.endpoints["producer"], curve=curve, **kwargs
        )

    # -- life cycle -------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> SourceRunner:
        """Start the sending thread; returns once the socket is bound/connected."""
        if self._thread is not None:
            raise RuntimeError("this runner was already started")
        if self._context is None:
            self._context = zmq.Context()
        self._thread = threading.Thread(
            target=self._main, name=f"source-{self.stream}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"the source's socket was not ready within {timeout} s")
        if self._start_error is not None:
            self._thread.join()
            raise RuntimeError(
                f"cannot open the source socket: {self._start_error}"
            ) from self._start_error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop sending and close the socket (pending frames get ``linger_ms`` to leave)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("source thread for %s did not stop within %s s", self.stream, timeout)

    def __enter__(self) -> SourceRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- control (called from any thread) ---------------------------------------------------
    def _record(self, kind: str, by: str, **fields: Any) -> None:
        """Remember one steering action (under the lock) with the caller's name."""
        self._changes.append(
            {"t": round(time.time(), 3), "kind": kind, "by": by, "rev": self._rev, **fields}
        )

    def start_run(self, by: str = "") -> dict[str, Any]:
        with self._lock:
            if not self._running:
                self.generator.start_run()
                self._run += 1
                self._running = True
                self._finished = False
                self._record("run_start", by, run=self._run, first_seq=self._next_seq)
            answer = {"run": self._run, "running": self._running}
        self._wake.set()
        log.info("stream %s: run %d started", self.stream, answer["run"])
        return answer

    def stop_run(self, by: str = "") -> dict[str, Any]:
        with self._lock:
            if self._running:
                self._record("run_stop", by, run=self._run, first_seq=self._next_seq)
            self._running = False
            answer = {"run": self._run, "running": False}
        self._wake.set()
        return answer

    def set_param(self, name: str, value: Any, by: str = "") -> dict[str, Any]:
        """Apply a validated change between frames; raises ``ParamError`` on a bad value.
        ``by``: who asked (the caller's user name), kept in :meth:`status`'s ``changes``."""
        with self._lock:
            value = self.generator.set_param(name, value)
            self._rev += 1
            answer = {"name": name, "value": value, "rev": self._rev, "first_seq": self._next_seq}
            self._record("param", by, name=name, value=value, first_seq=self._next_seq)
        self._wake.set()
        log.info(
            "stream %s: %s=%r (rev %d, from seq %d)",
            self.stream,
            name,
            value,
            answer["rev"],
            answer["first_seq"],
        )
        return answer

    def schema(self) -> list[dict[str, Any]]:
        return self.generator.params.schema()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "values": self.generator.params.values(),
                "rev": self._rev,
                "run": self._run,
                "running": self._running,
                "seq": self._next_seq,
                "finished": self._finished,
                "changes": list(self._changes),
                "stream": self.stream,
                "kind": self.generator.kind,
                "producer": self.producer_id,
                "endpoint": self.endpoint,
                "stats": self.stats(),
            }

    def stats(self) -> dict[str, Any]:
        return {
            "frames_sent": self.frames_sent,
            "bytes_sent": self.bytes_sent,
            "dropped_at_source": self.dropped_at_source,
            "dropped_reasons": dict(self.dropped_reasons),
            "disconnects": self.link.disconnects if self.link is not None else 0,
            "rate_hz": round(self.measured_rate(), 2),
            "last_error": self.last_error,
        }

    def measured_rate(self, window_s: float = 2.0) -> float:
        times = list(self._sent_times)
        now = time.monotonic()
        recent = [t for t in times if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) * self._batch / max(recent[-1] - recent[0], 1e-9)

    # -- the sending thread -----------------------------------------------------------------
    def _open_socket(self) -> zmq.Socket:
        sock = self._context.socket(zmq.PUSH)
        try:
            sock.sndhwm = self.sndhwm
            sock.linger = self.linger_ms
            if self.curve is not None:
                sock.curve_publickey = self.curve.public
                sock.curve_secretkey = self.curve.secret
                if self.connect is not None:
                    sock.curve_serverkey = self.curve.server_public
                else:
                    sock.curve_server = True
            if self.connect is not None:
                self.link = LinkWatch(sock, f"source {self.stream}", log)
                sock.connect(self.connect)
                self.endpoint = self.connect
            else:
                sock.bind(_bind_address(self.bind))
                self.endpoint = sock.last_endpoint.decode()
        except BaseException:
            if self.link is not None:
                self.link.close()
                self.link = None
            sock.close(linger=0)
            raise
        return sock

    def _main(self) -> None:
        sock = None
        try:
            try:
                sock = self._open_socket()
            except (zmq.ZMQError, ValueError, TypeError) as exc:
                self._start_error = exc
                return
            finally:
                self._ready.set()
            log.info("stream %s: sending to %s", self.stream, self.endpoint)
            try:
                self._loop(sock)
            except zmq.ContextTerminated:
                log.info("stream %s: context terminated; sender stops", self.stream)
        finally:
            if self.link is not None:
                self.link.close()
            if sock is not None:
                sock.close()
            if self._own_context and self._context is not None:
                self._context.term()

    def _loop(self, sock: zmq.Socket) -> None:
        last = None  # monotonic time the previous frame was due
        while not self._stop.is_set():
            with self._lock:
                running = self._running
                # a batch generator's rate counts events: one message per n of them
                period = self._batch / float(self.generator.params["rate_hz"])
            if not running:
                last = None
                self._wake.wait()
                self._wake.clear()
                continue
            now = time.monotonic()
            due = now if last is None else last + period
            if due > now:
                self._wake.wait(due - now)
                self._wake.clear()
                continue
            last = due if now - due < 0.5 else now  # behind by >0.5 s: do not burst to catch up
            produced = self._produce()
            if produced is not None:
                self._send(sock, *produced)

    def _produce(self) -> tuple[dict[str, Any], np.ndarray] | None:
        with self._lock:
            if not self._running or self._stop.is_set():
                return None
            try:
                data, meta = self.generator.generate()
            except StopIteration:
                self._running = False
                self._finished = True
                log.info("stream %s: run %d finished (end of data)", self.stream, self._run)
                return None
            except Exception as exc:
                self._running = False
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("stream %s: frame generation failed; run stopped", self.stream)
                return None
            n = self._batch
            fields = {
                "stream": self.stream,
                "seq": self._next_seq,
                "dtype": data.dtype.str,
                "shape": tuple(data.shape[1:] if n > 1 else data.shape),
                "batch": n,
                "run": self._run,
                "rev": self._rev,
                "meta": {
                    **meta,
                    "params": self.generator.params.values(),
                    "producer": self.producer_id,
                },
            }
            self._next_seq += n
        return fields, data

    def _send(self, sock: zmq.Socket, fields: dict[str, Any], data: np.ndarray) -> None:
        if self.checksum:  # ~1 ms per 4 MiB; lets every receiver prove the payload intact
            data = np.ascontiguousarray(data)
            fields["meta"]["crc32"] = zlib.crc32(data.reshape(-1).view(np.uint8))
        header = FrameHeader(t_ns=time.time_ns(), **fields)
        try:
            send_frame(sock, header, data, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped_at_source += header.batch
            if self.link is not None:
                self.link.poll()
            reason = DSN_RESTART if self.link is not None and self.link.down else "hwm"
            self.dropped_reasons[reason] = self.dropped_reasons.get(reason, 0) + header.batch
            return
        self.frames_sent += header.batch
        self.bytes_sent += data.nbytes
        self._sent_times.append(time.monotonic())
