"""DataPlane on real sockets: forwarding in both modes, ZAP allowlists, CURVE keys, spec errors, clean stop."""

from __future__ import annotations

from dataclasses import replace

import pytest
import zmq

from beamhub.streaming.wire import recv_frame

from .dataplane_helpers import (
    frame_ok,
    make_spec,
    no_dsn_threads,
    send_frames,
    wait_for,
    wait_stats,
)

MODES = ["l4", "l7"]


def pull(ctx, endpoint, **opts):
    sock = ctx.socket(zmq.PULL)
    sock.linger = 0
    for name, value in opts.items():
        setattr(sock, name, value)
    sock.connect(endpoint)
    return sock


def push(ctx, endpoint, **opts):
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 0
    for name, value in opts.items():
        setattr(sock, name, value)
    sock.connect(endpoint)
    return sock


def receive_all(sock, n, timeout_ms=5000):
    frames = []
    while len(frames) < n:
        assert sock.poll(timeout_ms), f"only {len(frames)} of {n} frames arrived"
        frames.append(recv_frame(sock))
    return frames


@pytest.mark.parametrize("mode", MODES)
def test_forwards_intact_and_in_order(plane, ctx, mode):
    ep = plane.provision(make_spec(mode))
    consumer = pull(ctx, ep.work)
    producer = push(ctx, ep.producer)
    send_frames(producer, range(100))
    frames = receive_all(consumer, 100)
    assert [f.header.seq for f in frames] == list(range(100))
    assert all(frame_ok(f) for f in frames)
    stats = wait_stats(plane, ep_id(mode), lambda s: s["messages"] == 100)
    assert stats["mode"] == mode
    assert stats["drops"] == {}
    assert stats["bytes"] > 100 * 1024


def ep_id(mode):
    return f"ch-{mode}"


@pytest.mark.parametrize("mode", MODES)
def test_producer_outside_allowlist_cannot_deliver(plane, ctx, mode):
    ep = plane.provision(make_spec(mode))
    consumer = pull(ctx, ep.work)
    port = ep.producer.rsplit(":", 1)[1]
    # Linux routes all of 127/8 to loopback: this connection's source address is 127.0.0.2.
    outsider = push(ctx, f"tcp://127.0.0.2:0;127.0.0.1:{port}")
    send_frames(outsider, range(5))
    wait_for(lambda: plane.stats(ep_id(mode))["refused_connections"]["producer"] >= 1)
    assert consumer.poll(500) == 0, "a frame from a refused address reached the consumer"
    insider = push(ctx, ep.producer)
    send_frames(insider, range(100, 103))
    assert [f.header.seq for f in receive_all(consumer, 3)] == [100, 101, 102]


@pytest.mark.parametrize("mode", MODES)
def test_consumer_outside_allowlist_gets_nothing(plane, ctx, mode):
    ep = plane.provision(make_spec(mode, consumer_cidrs=("127.0.0.1/32",)))
    port = ep.work.rsplit(":", 1)[1]
    outsider = pull(ctx, f"tcp://127.0.0.2:0;127.0.0.1:{port}")
    wait_for(lambda: plane.stats(ep_id(mode))["refused_connections"]["consumer"] >= 1)
    producer = push(ctx, ep.producer)
    send_frames(producer, range(3))
    insider = pull(ctx, ep.work)
    assert [f.header.seq for f in receive_all(insider, 3)] == [0, 1, 2]
    assert outsider.poll(300) == 0


@pytest.mark.parametrize("mode", MODES)
def test_curve_only_registered_keys(plane, ctx, mode):
    prod_pub, prod_sec = zmq.curve_keypair()
    good_pub, good_sec = zmq.curve_keypair()
    bad_pub, bad_sec = zmq.curve_keypair()
    spec = make_spec(
        mode, curve=True, producer_keys=(prod_pub.decode(),), consumer_keys=(good_pub.decode(),)
    )
    ep = plane.provision(spec)
    assert ep.server_key == plane.public_key.decode()

    def curve(sock, pub, sec):
        sock.curve_serverkey = ep.server_key.encode()
        sock.curve_publickey = pub
        sock.curve_secretkey = sec
        return sock

    bad = curve(ctx.socket(zmq.PULL), bad_pub, bad_sec)
    bad.linger = 0
    bad.connect(ep.work)
    plain = pull(ctx, ep.work)  # no encryption at all: the handshake fails
    wait_for(lambda: plane.stats(ep_id(mode))["refused_connections"]["consumer"] >= 1)
    producer = curve(ctx.socket(zmq.PUSH), prod_pub, prod_sec)
    producer.linger = 0
    producer.connect(ep.producer)
    send_frames(producer, range(4))
    good = curve(ctx.socket(zmq.PULL), good_pub, good_sec)
    good.linger = 0
    good.connect(ep.work)
    assert [f.header.seq for f in receive_all(good, 4)] == [0, 1, 2, 3]
    assert bad.poll(300) == 0 and plain.poll(0) == 0


def test_l7_drops_malformed_by_reason_and_goes_on(plane, ctx):
    ep = plane.provision(make_spec("l7", max_frame_bytes=4096))
    consumer = pull(ctx, ep.work)
    producer = push(ctx, ep.producer)
    send_frames(producer, [0])
    producer.send_multipart([b"not json", b"x" * 16])  # bad header
    producer.send_multipart(
        [b'{"v":1,"stream":"det","seq":1,"dtype":"<u4","shape":[256]}', b"x" * 10]
    )
    producer.send_multipart([b'{"v":1,"stream":"det","seq":1,"dtype":"|O","shape":[1]}', b"x" * 8])
    producer.send_multipart(
        [b'{"v":1,"stream":"det","seq":1,"dtype":"<u4","shape":[2048]}', b"x" * 8192]
    )
    producer.send(b"single part")
    send_frames(producer, [1], stream="other")
    send_frames(producer, [2])
    frames = receive_all(consumer, 2)
    assert [f.header.seq for f in frames] == [0, 2] and all(frame_ok(f) for f in frames)
    drops = wait_stats(plane, "ch-l7", lambda s: sum(s["drops"].values()) == 6)["drops"]
    assert drops == {
        "bad_header": 1,
        "truncated": 1,
        "dtype": 1,
        "oversized": 1,
        "parts": 1,
        "stream": 1,
    }


def test_l7_enforces_rate(plane, ctx):
    ep = plane.provision(make_spec("l7", max_rate_hz=5.0))
    consumer = pull(ctx, ep.work)
    producer = push(ctx, ep.producer)
    send_frames(producer, range(40))
    stats = wait_stats(plane, "ch-l7", lambda s: s["messages"] + s["drops"].get("rate", 0) == 40)
    # A one-second bucket of 5 plus what refilled during the burst; far fewer than 40.
    assert 5 <= stats["messages"] <= 15
    assert stats["drops"]["rate"] == 40 - stats["messages"]
    assert len(receive_all(consumer, stats["messages"])) == stats["messages"]


def test_l4_reports_rate_not_enforced(plane):
    plane.provision(make_spec("l4", max_rate_hz=5.0))
    limits = plane.stats("ch-l4")["limits"]
    assert limits["max_rate_hz"] == 5.0 and limits["rate_enforced"] is False


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"mode": "l5"}, "mode"),
        ({"hwm": 0}, "hwm"),
        ({"producer_cidrs": ("10.0.0.300/8",)}, "producer_cidrs"),
        ({"consumer_cidrs": ()}, "consumer_cidrs"),
        ({"max_frame_bytes": -1}, "max_frame_bytes"),
        ({"max_rate_hz": 0}, "max_rate_hz"),
        ({"channel_id": "../etc"}, "channel_id"),
        ({"curve": True, "producer_keys": ("short",)}, "producer_keys"),
        ({"stream": ""}, "stream"),
    ],
)
def test_bad_spec_names_the_field(plane, changes, field):
    with pytest.raises(ValueError, match=field):
        plane.provision(replace(make_spec("l7"), **changes))
    assert plane.channels() == []


def test_duplicate_channel_refused_and_remove_stops_threads(plane):
    plane.provision(make_spec("l7"))
    with pytest.raises(ValueError, match="already provisioned"):
        plane.provision(make_spec("l7"))
    plane.provision(make_spec("l4"))
    assert sorted(plane.channels()) == ["ch-l4", "ch-l7"]
    plane.remove("ch-l7")
    plane.remove("ch-l4")
    assert no_dsn_threads(plane.threads_before) == []
    with pytest.raises(KeyError):
        plane.stats("ch-l7")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_remove_while_blocked_on_a_stuck_consumer(plane, ctx, mode):
    ep = plane.provision(make_spec(mode, hwm=2))
    stuck = pull(ctx, ep.work, rcvhwm=1)  # connected, never reads
    producer = push(ctx, ep.producer, sndhwm=1000)
    send_frames(producer, range(200), n=64 * 1024)  # far more than every queue on the way holds
    assert stuck.poll(5000) == zmq.POLLIN  # frames flow, then every queue fills up
    # (An L4 proxy waiting in a send does not answer STATISTICS: its counters lag until it can.)
    plane.remove(f"ch-{mode}")  # must not hang although the forwarder waits in a send
    assert no_dsn_threads(plane.threads_before) == []


@pytest.mark.timeout(60)
def test_l4_counts_survive_connection_churn(plane, ctx):
    # libzmq 4.3.5's proxy may return EAGAIN when a ZAP-authenticated peer connects; the L4
    # router restarts it and carries its counters over.
    ep = plane.provision(make_spec("l4"))
    consumer = pull(ctx, ep.work)
    total = 0
    for round_ in range(15):
        producer = push(ctx, ep.producer)
        send_frames(producer, range(total, total + 10))
        frames = receive_all(consumer, 10)
        assert [f.header.seq for f in frames] == list(range(total, total + 10))
        total += 10
        producer.close()
    stats = wait_stats(plane, "ch-l4", lambda s: s["messages"] == total)
    assert stats["proxy"]["uncounted_runs"] == 0


def test_l7_counts_a_seq_reset_as_producer_restart_but_not_a_new_run(plane, ctx):
    ep = plane.provision(make_spec("l7"))
    consumer = pull(ctx, ep.work)
    producer = push(ctx, ep.producer)
    send_frames(producer, range(5), run=0)
    send_frames(producer, range(5, 10), run=1)  # a new run: seq keeps counting
    send_frames(producer, range(3), run=0)  # a restarted producer: seq starts again
    assert len(receive_all(consumer, 13)) == 13
    stats = wait_stats(plane, "ch-l7", lambda s: s["messages"] == 13)
    assert stats["producer_restarts"] == 1 and stats["head_seq"] == 2


def test_hostile_consumer_reports_are_counted_and_the_supervisor_goes_on(plane, ctx):
    ep = plane.provision(make_spec("l7"))
    reports = push(ctx, ep.report)
    for bad in (b'{"consumer_id": "x", "received": Infinity}', b"[" * 2000 + b"]" * 2000):
        reports.send(bad)
    reports.send(b'{"consumer_id": "good", "received": 3, "last_seq": 2}')
    stats = wait_stats(plane, "ch-l7", lambda s: "good" in s["consumers"])
    assert stats["report_errors"] == 2
