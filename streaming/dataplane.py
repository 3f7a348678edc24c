"""The DSN data plane: per-channel forwarding (L4 router or L7 gateway), provisioned by the control plane.

Design
------
A channel has one producer face and up to three consumer faces, each a TCP socket the DSN binds:

* ``producer`` (PULL): the source PUSH-connects. ``work`` (PUSH): consumers PULL-connect and
  frames are *distributed* among them; PUSH blocks at the high-water mark, so the work stream is
  lossless — back-pressure reaches the producer instead of frames being dropped.
* ``monitor`` (PUB): dashboards SUB-connect; a slow viewer's queue overflows and libzmq drops
  frames *for that viewer only*; the work stream never waits for a viewer.
* ``report`` (PULL): consumers send small JSON status reports
  ``{consumer_id, role, last_seq, received, lost, lost_reasons, disconnects, malformed,
  restarts}`` about every 0.5 s
  (:class:`beamhub.streaming.consumer.StreamConsumer` does this by itself).

Modes. **L4** runs ``zmq.proxy_steerable`` in a thread: forwarding is C only, no Python per
message; the proxy's capture socket is the monitor PUB, and its control socket answers the
supervisor's ``STATISTICS`` polls (libzmq counts message *parts*; messages = parts / 2 for the
``[header, payload]`` wire format). L4 cannot read headers, so it cannot enforce the stream name
or a rate (``max_rate_hz`` is recorded and reported as not enforced); its only size guard is
libzmq's per-part cap (``maxmsgsize``), which disconnects an offending producer. **L7** is a Python
loop that validates every header, JSON or binary (:func:`beamhub.streaming.wire.check_message`:
the same checks as ``decode_header``, with a one-unpack fast path for the binary layout), checks
payload size, stream name and rate (token bucket), drops a bad message with a counted reason (the decoder's
``DecodeError.reason``, ``parts``, ``stream``, ``rate``, ``shutdown``) while the stream goes on,
and forwards the received ``zmq.Frame`` objects themselves (no payload copy). A batch message
(``"batch": n`` in the header: n small events under one header) is checked once as a whole
(stream, size of all n events, header) and counts as n frames for the rate, the counters and
the policy drops (``stream``, ``rate``, ``no_consumer``, ``shutdown``); a malformed message counts
once under its decoder reason, since what its header claims cannot be trusted. The L7 monitor face is an XPUB: the gateway reads its subscriptions and sends to the
monitor fan-out only while someone subscribes (a send per message nobody reads was a tenth of
its CPU at 1 KiB).

No work consumer. The work stream waits for a consumer (``when_no_consumer="wait"``, the
default): with none connected, PUSH holds frames at the high-water mark, back-pressure reaches the
producer and *nothing* reaches the monitor fan-out either. A live detector whose dashboard must
show frames before any analysis connects asks for ``when_no_consumer="drop"`` (L7 only: L4 has
no per-message code, so it is refused): the gateway counts connected work consumers with a socket
monitor on its PUSH socket and, while there are none, sends each frame to the monitor fan-out only
and counts it as dropped (``no_consumer``); with at least one connected it is lossless again.
``messages``/``bytes`` count frames handed to the work stream; ``consumers_connected`` is the
gateway's count (TCP connections; a peer ZAP refuses counts until libzmq disconnects it).

Loss is visible, never silent. PUSH cannot tell which consumer got which frame, so:

* per consumer, ``lag = head - last_seq`` where ``head`` is the highest sequence the DSN forwarded
  (L7) or the highest any consumer reported (L4); ``age_s`` says how fresh the report is (a
  killed consumer's age grows).
* ``unaccounted = forwarded - sum(received by work consumers)``: frames in flight, plus frames
  lost in a dead consumer's queue. Once the stream is idle for a few report periods, it is loss.
* a work consumer sees a *subset* of sequence numbers, so it cannot count gaps; monitor viewers
  (who see every frame) count gaps and report them as ``lost``; L7 drops are counted by reason.

L4 and libzmq 4.3.5. The supervisor samples ``STATISTICS`` every 0.2 s, so L4 counters lag by up
to that (and while the proxy waits in a send for a full consumer, until it can answer). The proxy
sometimes returns EAGAIN when a ZAP-authenticated peer connects (before forwarding anything): the
router restarts it and the supervisor carries the counters over (``proxy.runs`` in the stats).
The proxy replies to ``TERMINATE`` on the control PAIR, so the supervisor reads that reply before
closing; if the proxy cannot answer, ``remove()`` ends the channel's own context.

Security. Every face has a ZAP domain ``beamhub/<channel>/<face>``: only source addresses in the
channel's producer (resp. consumer) CIDRs may connect, and with ``curve=True`` (the control plane
asks for it on every channel) every face is a CURVE server with the DSN's keypair and accepts only
the registered public keys (:meth:`DataPlane.add_key` adds one while the channel runs). A peer
without a registered key never gets past the handshake, so it can send nothing at all. Reports are
bound to keys: a key registered for one consumer id may report for that id only; a key given at
creation may claim consumer ids first come (up to a few per key); any other report is refused and
counted (``reports_refused``). Memory: libzmq hands a multipart message over only once all of it
has arrived and caps each *part* (``maxmsgsize``), not the number of parts; so only peers holding
a key can make the DSN buffer a message at all, and the L7 gateway releases a message of the wrong
shape at once (counted as ``parts``).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

import zmq

from beamhub.streaming.dataplane_auth import ChannelAuthenticator, FacePolicy, zap_domain
from beamhub.streaming.dataplane_paths import ChannelCounters, FaceConfig, L4Router, L7Gateway
from beamhub.streaming.dataplane_spec import (
    MODES,
    WHEN_NO_CONSUMER,
    ChannelEndpoints,
    ChannelSpec,
    curve_keys,
    validate_spec,
)
from beamhub.streaming.dataplane_supervisor import Supervisor

__all__ = ["MODES", "WHEN_NO_CONSUMER", "ChannelEndpoints", "ChannelSpec", "DataPlane"]

START_TIMEOUT_S = 10.0


class _Channel:
    """The threads and counters of one provisioned channel (and its context, if its own)."""

    def __init__(
        self,
        spec: ChannelSpec,
        threads: list[Any],
        supervisor: Supervisor,
        counters: ChannelCounters,
        endpoints: ChannelEndpoints,
        zone: _Zone,
    ) -> None:
        self.zone = zone
        self.spec = spec
        self.threads = threads
        self.supervisor = supervisor
        self.counters = counters
        self.endpoints = endpoints
        self.created = time.time()


class _Zone:
    """A ZeroMQ context with its ZAP handler."""

    def __init__(self, context: zmq.Context, owned: bool, log: logging.Logger) -> None:
        self.context = context
        self.owned = owned
        self.auth = ChannelAuthenticator(context, log=log.getChild("zap"))
        try:
            self.auth.start()
            self.auth.thread.name = f"dataplane:zap:{id(self):x}"
        except zmq.ZMQError as exc:
            raise RuntimeError(
                f"cannot start the data plane's ZAP handler ({exc}): another authenticator already "
                "serves this ZeroMQ context; give DataPlane its own context (or none)"
            ) from exc

    def close(self) -> None:
        """Stop the ZAP handler, then terminate the context if it is ours (idempotent)."""
        if self.auth.is_alive():
            self.auth.stop()
        if self.owned and not self.context.closed:
            self.context.term()


class DataPlane:
    """Provision, inspect and remove channels.

    By default every channel gets its own ZeroMQ context and ZAP handler, so that ``remove()``
    can always end an L4 proxy even while it waits in a send for a consumer that never reads
    (terminating the channel's context is the only way to interrupt libzmq there). If a
    ``context`` is given, all channels share it and its single ZAP handler; then an L4 proxy
    stuck that way stops only when a consumer reads or the context is terminated by its owner.

    Faces bind on ``host``; with ``producer_host`` the producer face binds (and is advertised) on
    that address instead, so a DSN in a science DMZ takes frames only on its instrument-side
    interface and serves consumers only on its compute-side one.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        context: zmq.Context | None = None,
        log: logging.Logger | None = None,
        advertise_host: str | None = None,
        server_keypair: tuple[bytes, bytes] | None = None,
        producer_host: str | None = None,
    ) -> None:
        self.host = host
        self.advertise = advertise_host or host
        self.producer_host = producer_host
        self.log = log or logging.getLogger("beamhub.dsn.dataplane")
        self.public_key, self._secret_key = server_keypair or zmq.curve_keypair()
        self._channels: dict[str, _Channel] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._shared = _Zone(context, False, self.log) if context is not None else None

    def provision(self, spec: ChannelSpec, ports: dict[str, int] | None = None) -> ChannelEndpoints:
        """Bind the channel's faces and start forwarding; raise ValueError on a bad spec.

        ``ports`` (face -> port) binds those faces to fixed ports, as a DSN restoring a channel
        after a restart does so that connected peers find it again; RuntimeError if one is taken.
        """
        producer_nets, consumer_nets = validate_spec(spec)
        with self._lock:
            if self._closed:
                raise RuntimeError("the data plane is closed")
            if spec.channel_id in self._channels:
                raise ValueError(f"channel_id: {spec.channel_id!r} is already provisioned")
            self._channels[spec.channel_id] = None  # type: ignore[assignment]  # reserve the id
        try:
            channel = self._start(spec, producer_nets, consumer_nets, dict(ports or {}))
        except BaseException:
            with self._lock:
                self._channels.pop(spec.channel_id, None)
            raise
        with self._lock:
            self._channels[spec.channel_id] = channel
        self.log.info(
            "channel %s (project %s, stream %s, %s) producer %s work %s monitor %s",
            spec.channel_id,
            spec.project,
            spec.stream,
            spec.mode,
            channel.endpoints.producer,
            channel.endpoints.work,
            channel.endpoints.monitor,
        )
        if spec.mode == "l4" and spec.max_rate_hz is not None:
            self.log.warning(
                "channel %s: max_rate_hz=%s is not enforced in L4 mode (no per-message code); "
                "use mode l7 to enforce it",
                spec.channel_id,
                spec.max_rate_hz,
            )
        return channel.endpoints

    def _start(
        self, spec: ChannelSpec, producer_nets: tuple, consumer_nets: tuple, ports: dict[str, int]
    ) -> _Channel:
        pdom, cdom = (
            zap_domain(spec.channel_id, "producer"),
            zap_domain(spec.channel_id, "consumer"),
        )
        pkeys = curve_keys("producer_keys", spec.producer_keys) if spec.curve else ()
        ckeys = curve_keys("consumer_keys", spec.consumer_keys) if spec.curve else ()
        zone = self._shared or _Zone(zmq.Context(), True, self.log)
        zone.auth.set_policy(pdom, FacePolicy(producer_nets, pkeys, curve=spec.curve))
        zone.auth.set_policy(cdom, FacePolicy(consumer_nets, ckeys, curve=spec.curve))
        faces = FaceConfig(
            host=self.host,
            advertise=self.advertise,
            hwm=spec.hwm,
            max_frame_bytes=spec.max_frame_bytes,
            producer_domain=pdom,
            consumer_domain=cdom,
            curve_secret=self._secret_key if spec.curve else None,
            monitor=spec.monitor,
            stream=spec.stream,
            max_rate_hz=spec.max_rate_hz,
            when_no_consumer=spec.when_no_consumer,
            ports=ports,
            producer_host=self.producer_host,
        )
        counters = ChannelCounters()
        tag = f"dataplane:{spec.channel_id}:{uuid.uuid4().hex[:6]}"
        if spec.mode == "l4":
            path: Any = L4Router(zone.context, f"{tag}-l4", faces, self.log)
            router = path
        else:
            path = L7Gateway(zone.context, f"{tag}-l7", faces, self.log, counters)
            router = None
        supervisor = Supervisor(zone.context, f"{tag}-sup", faces, self.log, counters, router)
        for key in ckeys:  # keys given at creation: each may report for consumer ids it claims
            supervisor.allow_key(key.decode(), None)
        threads = [
            path,
            supervisor,
        ]  # the proxy binds its control socket before the supervisor connects
        started: list[Any] = []
        try:
            for thread in threads:
                thread.start()
                started.append(thread)
                if not thread.ready.wait(START_TIMEOUT_S):
                    raise RuntimeError(f"{thread.name} did not start within {START_TIMEOUT_S} s")
                if thread.error is not None:
                    raise RuntimeError(
                        f"cannot bind the channel's sockets on {self.host}: {thread.error}"
                    )
        except BaseException:
            self._stop_threads(started, supervisor, zone)
            zone.auth.remove_policy(pdom)
            zone.auth.remove_policy(cdom)
            if zone is not self._shared:
                zone.close()
            raise
        eps = {**path.endpoints, **supervisor.endpoints}
        endpoints = ChannelEndpoints(
            producer=eps["producer"],
            work=eps["work"],
            monitor=eps.get("monitor"),
            report=eps.get("report"),
            server_key=self.public_key.decode() if spec.curve else None,
        )
        return _Channel(spec, threads, supervisor, counters, endpoints, zone)

    def _stop_threads(self, threads: list[Any], supervisor: Supervisor, zone: _Zone) -> None:
        # The supervisor first: in L4 it sends TERMINATE to the proxy on its way out.
        if supervisor in threads:
            supervisor.stop()
        for thread in threads:
            if thread is not supervisor:
                thread.stop(timeout=1.0)
        if zone is not self._shared and any(t.is_alive() for t in threads):
            # An L4 proxy waiting in a send cannot read TERMINATE; ending its context frees it.
            zone.close()
            for thread in threads:
                thread.join(5.0)

    def add_key(
        self, channel_id: str, face: str, public_key: str, consumer_id: str | None = None
    ) -> None:
        """Let a client's CURVE public key in on the channel's ``producer`` or ``consumer`` faces.

        A consumer key registered with ``consumer_id`` may send reports for that id only.
        ValueError for a bad key or face; KeyError for an unknown channel.
        """
        if face not in ("producer", "consumer"):
            raise ValueError(f"face: {face!r} is not 'producer' or 'consumer'")
        (key,) = curve_keys(f"{face}_keys", (public_key,))
        channel = self._get(channel_id)
        if not channel.spec.curve:
            raise ValueError("this channel was provisioned without CURVE; it takes no keys")
        if face == "consumer":
            channel.supervisor.allow_key(key.decode(), consumer_id)
        channel.zone.auth.add_key(zap_domain(channel_id, face), key)

    def _get(self, channel_id: str) -> _Channel:
        with self._lock:
            channel = self._channels.get(channel_id)
        if channel is None:
            raise KeyError(f"no channel {channel_id!r} on this data plane")
        return channel

    def endpoints(self, channel_id: str) -> ChannelEndpoints:
        return self._get(channel_id).endpoints

    def channels(self) -> list[str]:
        with self._lock:
            return [cid for cid, ch in self._channels.items() if ch is not None]

    def stats(self, channel_id: str) -> dict:
        """Live counters: messages, bytes, rate, drops by reason, per-consumer lag and loss."""
        channel = self._get(channel_id)
        spec, c, sup = channel.spec, channel.counters, channel.supervisor
        consumers = sup.consumer_table()
        reported = [e["last_seq"] for e in consumers.values() if e["last_seq"] is not None]
        if spec.mode == "l7":
            head = c.last_seq
        else:
            head = max(reported) if reported else None
        now = time.monotonic()
        table = {}
        for cid, e in consumers.items():
            lag = None
            if head is not None and e["last_seq"] is not None:
                lag = max(0, head - e["last_seq"])
            table[cid] = {
                "role": e["role"],
                "last_seq": e["last_seq"],
                "lag": lag,
                "received": e["received"],
                "lost": e["lost"],
                "lost_reasons": e["lost_reasons"],
                "disconnects": e["disconnects"],
                "malformed": e["malformed"],
                "restarts": e["restarts"],
                "age_s": round(now - e["t"], 3),
            }
        work_received = sum(e["received"] for e in consumers.values() if e["role"] == "work")
        rate_hz, gb_per_s = sup.rates()
        gateway = channel.threads[0] if spec.mode == "l7" else None
        refused = {
            face: channel.zone.auth.refused.get(zap_domain(channel_id, face), 0)
            for face in ("producer", "consumer")
        }
        return {
            "mode": spec.mode,
            "stream": spec.stream,
            "messages": c.messages,
            "bytes": c.bytes,
            "rate_hz": round(rate_hz, 3),
            "gb_per_s": round(gb_per_s, 6),
            "drops": dict(c.drops),
            "when_no_consumer": spec.when_no_consumer,
            "consumers_connected": gateway.consumers_connected if gateway is not None else None,
            "head_seq": head,
            "producer_restarts": c.producer_restarts if spec.mode == "l7" else None,
            "unaccounted": max(0, c.messages - work_received) if consumers else None,
            "consumers": table,
            "monitor": {
                "enabled": spec.monitor,
                "endpoint": channel.endpoints.monitor,
                "sent": c.monitor_sent if spec.mode == "l7" else c.messages,
                "viewers": sum(1 for e in consumers.values() if e["role"] == "monitor"),
                "viewer_lost": sum(e["lost"] for e in consumers.values() if e["role"] == "monitor"),
            },
            "limits": {
                "hwm": spec.hwm,
                "max_frame_bytes": spec.max_frame_bytes,
                "max_rate_hz": spec.max_rate_hz,
                "rate_enforced": spec.mode == "l7",
                "stream_enforced": spec.mode == "l7",
                "curve": spec.curve,
            },
            "refused_connections": refused,
            "report_errors": sup.report_errors,
            "reports_refused": sup.reports_refused,
            "proxy": (
                {"runs": sup.router.runs, "uncounted_runs": sup.uncounted_runs}
                if sup.router is not None
                else None
            ),
        }

    def remove(self, channel_id: str) -> None:
        """Stop the channel's threads, close its sockets and forget its ZAP policies."""
        with self._lock:
            channel = self._channels.pop(channel_id, None)
        if channel is None:
            raise KeyError(f"no channel {channel_id!r} on this data plane")
        self._stop_threads(channel.threads, channel.supervisor, channel.zone)
        channel.zone.auth.remove_policy(zap_domain(channel_id, "producer"))
        channel.zone.auth.remove_policy(zap_domain(channel_id, "consumer"))
        if channel.zone is not self._shared:
            channel.zone.close()
        alive = [t.name for t in channel.threads if t.is_alive()]
        if alive:
            self.log.error("channel %s: threads still running after stop: %s", channel_id, alive)
        self.log.info("channel %s removed after %d messages", channel_id, channel.counters.messages)

    def close(self) -> None:
        """Remove every channel and stop the ZAP handlers (a given context is left to its owner)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for channel_id in self.channels():
            self.remove(channel_id)
        if self._shared is not None:
            self._shared.close()

    def __enter__(self) -> DataPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
