"""when_no_consumer: a live detector's channel drops (counted) while no work consumer is connected,
so dashboards see frames from the start, and is lossless again once one connects. Real sockets."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from beamhub.streaming.consumer import StreamConsumer
from beamhub.streaming.dataplane import DataPlane
from beamhub.streaming.template import TEMPLATE_DIR, Template, TemplateError, TemplateViolation
from beamhub.streaming.wire import decode
from tests.streaming.dataplane_helpers import frame_ok, make_spec, send_frames, wait_stats
from tests.streaming.dsn_helpers import Tokens, api, register, running_dsn, secure, wait_until

pytestmark = pytest.mark.timeout(60)


class Producer(threading.Thread):
    """Sends seq 0, 1, 2, ... at about ``rate_hz`` until stopped; never blocks its stop."""

    def __init__(self, ctx: zmq.Context, endpoint: str, rate_hz: float = 400.0) -> None:
        super().__init__(name="test-producer", daemon=True)
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.linger = 0
        self.sock.sndhwm = 8
        self.sock.connect(endpoint)
        self.period = 1.0 / rate_hz
        self.stopping = threading.Event()
        self.sent = 0

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    send_frames(self.sock, [self.sent])
                except zmq.Again:  # pragma: no cover - send_frame blocks; kept for safety
                    continue
                self.sent += 1
                self.stopping.wait(self.period)
        finally:
            self.sock.close(linger=0)

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _subscriber(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    return sub


def _drain(sub: zmq.Socket, want: int, timeout: float = 10.0) -> list[int]:
    """Sequence numbers of at least ``want`` monitor frames (fails after ``timeout``)."""
    seqs: list[int] = []
    deadline = time.monotonic() + timeout
    while len(seqs) < want:
        left = deadline - time.monotonic()
        assert left > 0, f"the monitor fan-out gave {len(seqs)} frames, expected {want}"
        if sub.poll(int(left * 1000)):
            frame = decode(sub.recv_multipart(copy=False))
            assert frame_ok(frame)
            seqs.append(frame.header.seq)
    return seqs


def _no_consumer(stats: dict) -> int:
    return stats["drops"].get("no_consumer", 0)


def test_drop_mode_feeds_monitors_without_consumer_then_lossless_with_one(plane, zctx) -> None:
    eps = plane.provision(make_spec("l7", when_no_consumer="drop"))
    sub = _subscriber(zctx, eps.monitor)
    producer = Producer(zctx, eps.producer)
    producer.start()
    try:
        # 1. No work consumer: the monitor still gets frames; the gateway counts them as dropped.
        _drain(sub, 20)
        stats = wait_stats(plane, "ch-l7", lambda s: _no_consumer(s) >= 20)
        assert stats["consumers_connected"] == 0
        assert stats["when_no_consumer"] == "drop"
        assert stats["messages"] == 0  # nothing went into the work stream

        # 2. A work consumer connects: from its first frame on, every frame, no new drops.
        with StreamConsumer(eps.work, report=eps.report, exclusive=True, hwm=4) as consumer:
            first = consumer.receive(timeout=10)
            assert first is not None and frame_ok(first)
            dropped_before = _no_consumer(plane.stats("ch-l7"))
            seqs = [first.header.seq]
            for _ in range(150):
                frame = consumer.receive(timeout=10)
                assert frame is not None and frame_ok(frame)
                seqs.append(frame.header.seq)
            assert seqs == list(range(seqs[0], seqs[0] + 151))  # no gap
            assert consumer.lost == 0
            stats = plane.stats("ch-l7")
            assert _no_consumer(stats) == dropped_before
            assert stats["consumers_connected"] == 1
            # the gateway counts a frame just after handing it on: the consumer may be first
            wait_stats(plane, "ch-l7", lambda s: s["messages"] >= 151)

        # 3. It leaves: the gateway notices and drops (counted) again; monitors still get frames.
        stats = wait_stats(plane, "ch-l7", lambda s: s["consumers_connected"] == 0)
        wait_stats(plane, "ch-l7", lambda s: _no_consumer(s) >= _no_consumer(stats) + 20)
        newer = 0  # frames the monitor got that were sent after the consumer left
        deadline = time.monotonic() + 10
        while newer < 5:
            assert time.monotonic() < deadline, "the monitor got no frames after the consumer left"
            newer += sum(seq > seqs[-1] for seq in _drain(sub, 1))
    finally:
        producer.stop()
        sub.close(linger=0)


def test_last_consumer_leaving_while_gateway_waits_at_hwm(plane, zctx) -> None:
    """A consumer that stops reading fills the work stream; when it goes, dropping resumes."""
    eps = plane.provision(make_spec("l7", when_no_consumer="drop", hwm=4))
    stalled = zctx.socket(zmq.PULL)
    stalled.linger = 0
    stalled.rcvhwm = 1
    stalled.connect(eps.work)
    wait_stats(plane, "ch-l7", lambda s: s["consumers_connected"] == 1)
    producer = Producer(zctx, eps.producer)
    producer.start()
    try:
        # Never read: the gateway waits at the high-water mark (lossless) rather than drop.
        stuck = wait_stats(plane, "ch-l7", lambda s: s["messages"] > 0)
        time.sleep(0.3)  # not readiness: a window in which no no_consumer drop may happen
        assert _no_consumer(plane.stats("ch-l7")) == _no_consumer(stuck) == 0
        stalled.close(linger=0)
        wait_stats(plane, "ch-l7", lambda s: _no_consumer(s) >= 20, timeout=15)
        assert plane.stats("ch-l7")["consumers_connected"] == 0
    finally:
        producer.stop()


def test_refused_consumer_does_not_count(zctx) -> None:
    """A peer that ZAP refuses is accepted, then disconnected: it never stops the dropping."""
    with DataPlane("127.0.0.1") as plane:
        spec = make_spec("l7", when_no_consumer="drop", consumer_cidrs=("127.0.0.2/32",))
        eps = plane.provision(spec)
        intruder = zctx.socket(zmq.PULL)
        intruder.linger = 0
        intruder.connect(eps.work)  # from 127.0.0.1: outside the channel's consumer CIDRs
        producer = Producer(zctx, eps.producer)
        producer.start()
        try:
            wait_stats(plane, "ch-l7", lambda s: s["refused_connections"]["consumer"] >= 1)
            stats = wait_stats(plane, "ch-l7", lambda s: _no_consumer(s) >= 50)
            assert stats["messages"] == 0 and stats["consumers_connected"] == 0
            assert intruder.poll(100) == 0
        finally:
            producer.stop()
            intruder.close(linger=0)


def test_wait_mode_unchanged_frames_wait_for_the_consumer(plane, zctx) -> None:
    eps = plane.provision(make_spec("l7"))
    sub = _subscriber(zctx, eps.monitor)
    push = zctx.socket(zmq.PUSH)
    push.linger = 0
    push.connect(eps.producer)
    try:
        send_frames(push, range(10))
        # Nothing is dropped, and (as before) nothing reaches the monitor while the work waits.
        assert sub.poll(500) == 0
        stats = plane.stats("ch-l7")
        assert stats["drops"] == {} and stats["messages"] == 0
        assert stats["when_no_consumer"] == "wait" and stats["consumers_connected"] == 0
        with StreamConsumer(eps.work, exclusive=True) as consumer:
            seqs = []
            for _ in range(10):
                frame = consumer.receive(timeout=10)
                assert frame is not None and frame_ok(frame)
                seqs.append(frame.header.seq)
        assert seqs == list(range(10))
        assert _drain(sub, 1)  # the monitor gets them once the work stream takes them
        assert plane.stats("ch-l7")["drops"] == {}
    finally:
        push.close(linger=0)
        sub.close(linger=0)


def test_l4_and_unknown_values_are_refused_by_the_data_plane(plane) -> None:
    with pytest.raises(ValueError, match="when_no_consumer: 'drop' needs mode l7"):
        plane.provision(make_spec("l4", when_no_consumer="drop"))
    with pytest.raises(ValueError, match="when_no_consumer: 'never'"):
        plane.provision(make_spec("l7", when_no_consumer="never"))
    assert plane.channels() == []
    plane.provision(make_spec("l4"))  # wait is fine in L4
    assert plane.stats("ch-l4")["consumers_connected"] is None


async def test_dsn_api_field_validation_and_stats(zctx) -> None:
    tokens = Tokens()
    token = tokens.issue()
    async with running_dsn(tokens) as node:
        status, body = await api(
            node.url,
            "POST",
            "/api/channels",
            token,
            {"stream": "det", "mode": "l4", "when_no_consumer": "drop"},
        )
        assert status == 400 and body["field"] == "when_no_consumer", body
        assert "l7" in body["message"]
        status, body = await api(
            node.url,
            "POST",
            "/api/channels",
            token,
            {"stream": "det", "when_no_consumer": "sometimes"},
        )
        assert status == 400 and body["field"] == "when_no_consumer", body
        assert node.channels == {}
        status, body = await api(node.url, "GET", "/api/template", token)
        assert body["when_no_consumer"] == {"allowed": ["wait", "drop"], "default": "wait"}

        status, body = await api(node.url, "POST", "/api/channels", token, {"stream": "det"})
        assert status == 201 and body["params"]["when_no_consumer"] == "wait"
        status, body = await api(
            node.url,
            "POST",
            "/api/channels",
            token,
            {"stream": "det", "mode": "l7", "when_no_consumer": "drop"},
        )
        assert status == 201 and body["params"]["when_no_consumer"] == "drop", body
        cid = body["id"]
        push = secure(zctx.socket(zmq.PUSH), await register(node.url, cid, token, "producer"))
        push.linger = 0
        push.connect(body["endpoints"]["producer"])
        try:
            send_frames(push, range(30))

            async def dropped():
                _, got = await api(node.url, "GET", f"/api/channels/{cid}", token)
                return got if got["stats"]["drops"].get("no_consumer") == 30 else None

            got = await wait_until(dropped)
            assert got["stats"]["consumers_connected"] == 0
            assert got["stats"]["when_no_consumer"] == "drop"
        finally:
            push.close(linger=0)


def test_template_bounds_when_no_consumer() -> None:
    base = Template.load().describe()
    wait_only = Template.from_mapping({**base, "when_no_consumer": {"allowed": ["wait"]}})
    with pytest.raises(TemplateViolation) as refused:
        wait_only.check({"stream": "det", "when_no_consumer": "drop"})
    assert refused.value.status == 403 and refused.value.field == "when_no_consumer"
    assert wait_only.check({"stream": "det"}).when_no_consumer == "wait"
    drop_default = Template.from_mapping(
        {**base, "when_no_consumer": {"allowed": ["wait", "drop"], "default": "drop"}}
    )
    assert drop_default.check({"stream": "det", "mode": "l7"}).when_no_consumer == "drop"
    assert drop_default.check({"stream": "det", "mode": "l4"}).when_no_consumer == "wait"
    for bad, where in (
        ({"allowed": ["maybe"]}, "when_no_consumer.allowed"),
        ({"allowed": ["wait"], "default": "drop"}, "when_no_consumer.default"),
        ({"sometimes": 1}, "unknown key"),
    ):
        with pytest.raises(TemplateError, match=where):
            Template.from_mapping({**base, "when_no_consumer": bad})
    # The packaged templates state the field; wait stays the default everywhere.
    for name in ("default", "moderate"):
        template = Template.load(TEMPLATE_DIR / f"{name}.yaml")
        assert template.when_no_consumer_default == "wait"
        assert template.when_no_consumer_allowed == ("wait", "drop")
