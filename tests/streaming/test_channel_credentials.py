"""A credential on every channel, also in dev: with the default template a process without the
channel's registered CURVE key receives nothing (work, monitor), sends nothing (producer) and
reports nothing; reports are bound to the consumer's key; a hostile multipart sender cannot grow
the DSN's memory. Real DSN, real sockets, real clients (StreamConsumer/SourceRunner.from_dsn)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from beamhub.auth.roles import scopes_for
from beamhub.streaming.consumer import StreamConsumer
from beamhub.streaming.credentials import ChannelLookupError
from beamhub.streaming.simulator import SimulatedDetector
from beamhub.streaming.source import SourceRunner
from beamhub.streaming.wire import FrameHeader, send_frame
from tests.streaming.dsn_helpers import Tokens, api, register, running_dsn, secure, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


def role_token(tokens: Tokens, user: str, role: str, project: str = "p1") -> str:
    return tokens.issue(project, " ".join(scopes_for(role)), sub=user)


def frame(seq: int, stream: str = "det") -> tuple[FrameHeader, np.ndarray]:
    data = np.full((16, 16), seq, dtype="<f4")
    return FrameHeader(stream=stream, seq=seq, dtype="<f4", shape=(16, 16)), data


async def stats(node, cid: str, token: str) -> dict:
    code, body = await api(node.url, "GET", f"/api/channels/{cid}", token)
    assert code == 200, body
    return body["stats"]


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_dev_channel_refuses_every_face_without_a_registered_key(tokens: Tokens) -> None:
    async with running_dsn(tokens) as node:  # the default (dev) template
        owner = role_token(tokens, "beamhub-detector", "operator")
        code, made = await api(
            node.url, "POST", "/api/channels", owner, {"stream": "det", "mode": "l7"}
        )
        assert code == 201, made
        cid, eps = made["id"], made["endpoints"]
        assert eps["server_key"] and made["params"]["encryption"] is True

        # the real clients register their keys by themselves and stream
        source = await asyncio.to_thread(
            SourceRunner.from_dsn,
            SimulatedDetector((32, 32), seed=1, rate_hz=200.0),
            node.url,
            cid,
            owner,
        )
        member = role_token(tokens, "bob", "member")
        consumer = await asyncio.to_thread(
            StreamConsumer.from_dsn, node.url, cid, member, consumer_id="bob-1"
        )
        viewer = await asyncio.to_thread(
            StreamConsumer.from_dsn,
            node.url,
            cid,
            role_token(tokens, "vic", "viewer"),
            monitor=True,
            consumer_id="vic-1",
        )
        zctx = zmq.Context()
        try:
            # intruders: no CURVE at all, and CURVE with a key the channel does not know
            plain_work = zctx.socket(zmq.PULL)
            plain_monitor = zctx.socket(zmq.SUB)
            plain_monitor.subscribe(b"")
            stranger_work = secure(
                zctx.socket(zmq.PULL),
                {
                    "server_key": eps["server_key"],
                    **dict(zip(("public", "secret"), zmq.curve_keypair(), strict=True)),
                },
            )
            for sock, ep in (
                (plain_work, eps["work"]),
                (plain_monitor, eps["monitor"]),
                (stranger_work, eps["work"]),
            ):
                sock.linger = 0
                sock.connect(ep)
            await asyncio.to_thread(source.start)
            source.start_run()
            got = await asyncio.to_thread(lambda: [consumer.receive(timeout=5) for _ in range(20)])
            assert all(f is not None for f in got)
            seen = await asyncio.to_thread(lambda: viewer.receive(timeout=5))
            assert seen is not None
            for sock in (plain_work, plain_monitor, stranger_work):
                assert not sock.poll(500), "a process without the channel's key got a frame"

            # a member cannot register a producer key on the detector's channel
            code, answer = await api(
                node.url,
                "POST",
                f"/api/channels/{cid}/credentials",
                member,
                {"face": "producer", "public_key": zmq.curve_keypair()[0].decode()},
            )
            assert (code, answer["reason"]) == (403, "not_owner")

            # injection without a key: nothing reaches the channel, the refusals are counted
            source.stop_run()
            before = await stats(node, cid, owner)
            injector = zctx.socket(zmq.PUSH)
            injector.linger = 0
            watch = connect_watched(injector, eps["producer"])
            for seq in range(20):
                send_frame(injector, *frame(2**62 + seq))
            assert await asyncio.to_thread(handshake_outcome, watch) == "refused"
            after = await stats(node, cid, owner)
            assert after["head_seq"] == before["head_seq"] < 2**62
            assert after["messages"] == before["messages"]

            # a forged report without the consumer's key never arrives
            consumer.send_report()

            async def reported() -> bool:
                table = (await stats(node, cid, owner))["consumers"]
                return table.get("bob-1", {}).get("received", 0) >= 20

            await wait_until(reported, timeout=10)
            forger = zctx.socket(zmq.PUSH)
            forger.linger = 0
            watch = connect_watched(forger, eps["report"])
            forger.send(json.dumps({"consumer_id": "bob-1", "received": 0}).encode())
            forger.send(json.dumps({"consumer_id": "fake-1", "received": 0}).encode())
            assert await asyncio.to_thread(handshake_outcome, watch) == "refused"
            table = (await stats(node, cid, owner))["consumers"]
            assert "fake-1" not in table and table["bob-1"]["received"] >= 20
        finally:
            source.stop()
            consumer.close()
            viewer.close()
            zctx.destroy(linger=0)


FAILED_HANDSHAKE = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


def connect_watched(sock: zmq.Socket, endpoint: str) -> zmq.Socket:
    """Connect ``sock`` with a monitor on its handshakes; returns the monitor socket."""
    monitor = sock.get_monitor_socket(FAILED_HANDSHAKE | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sock.connect(endpoint)
    return monitor


def handshake_outcome(monitor: zmq.Socket, timeout_s: float = 10.0) -> str:
    """'refused' or 'accepted': the first handshake the DSN answered (runs on a thread)."""
    if not monitor.poll(int(timeout_s * 1000)):
        raise AssertionError(f"no handshake within {timeout_s} s")
    event = recv_monitor_message(monitor)["event"]
    return "accepted" if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else "refused"


async def _refused(node, cid: str, token: str, face: str, before: dict) -> dict | None:
    now = await stats(node, cid, token)
    more = now["refused_connections"][face] > before["refused_connections"][face]
    return now if more else None


async def test_reports_are_bound_to_the_consumers_key(tokens: Tokens) -> None:
    async with running_dsn(tokens) as node:
        owner = role_token(tokens, "alice", "member")
        code, made = await api(node.url, "POST", "/api/channels", owner, {"stream": "det"})
        assert code == 201
        cid = made["id"]
        alice = await register(node.url, cid, owner, "consumer", consumer_id="alice-1")
        mallory = await register(
            node.url, cid, role_token(tokens, "mallory", "member"), "consumer", "mallory-1"
        )
        code, answer = await api(
            node.url,
            "POST",
            f"/api/channels/{cid}/credentials",
            owner,
            {
                "face": "consumer",
                "public_key": zmq.curve_keypair()[0].decode(),
                "consumer_id": "alice-1",
            },
        )
        assert (code, answer["reason"]) == (409, "consumer_id_taken")
        zctx = zmq.Context()
        try:

            def reporter(cred: dict) -> zmq.Socket:
                sock = secure(zctx.socket(zmq.PUSH), cred)
                sock.linger = 1000
                sock.connect(made["endpoints"]["report"])
                return sock

            good, bad = reporter(alice), reporter(mallory)
            good.send(json.dumps({"consumer_id": "alice-1", "received": 7}).encode())
            for i in range(50):  # forged: another consumer's id, and made-up consumers
                bad.send(json.dumps({"consumer_id": "alice-1", "received": 0}).encode())
                bad.send(json.dumps({"consumer_id": f"fake-{i}", "received": 0}).encode())
            bad.send(json.dumps({"consumer_id": "mallory-1", "received": 1}).encode())

            async def settled() -> dict | None:
                s = await stats(node, cid, owner)
                return s if s["reports_refused"] >= 100 and "mallory-1" in s["consumers"] else None

            final = await wait_until(settled, timeout=10)
            assert final["reports_refused"] == 100
            assert set(final["consumers"]) == {"alice-1", "mallory-1"}
            assert final["consumers"]["alice-1"]["received"] == 7
        finally:
            zctx.destroy(linger=0)


HOSTILE = textwrap.dedent(
    """
    import sys, zmq, zmq.utils.monitor
    endpoint, parts, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    keys = sys.argv[4:]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 0
    if keys:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (
            k.encode() for k in keys
        )
    events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    events |= zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    monitor = sock.get_monitor_socket(events)
    sock.connect(endpoint)
    part = bytearray(size)
    try:  # a refused handshake tears the pipe down mid-message: never block on it
        sock.send_multipart([part] * parts, copy=False, flags=zmq.NOBLOCK)
    except zmq.Again:
        pass
    if not monitor.poll(20000):
        raise SystemExit("no handshake")
    event = zmq.utils.monitor.recv_monitor_message(monitor)["event"]
    accepted = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
    print("accepted" if accepted else "refused", flush=True)
    monitor.close()
    sock.close(linger=20000 if accepted else 0)
    ctx.term()
    """
)


def hostile(endpoint: str, keys: tuple[str, ...] = (), parts: int = 64) -> subprocess.Popen:
    """A separate process sending one multipart message of ``parts`` x 4 MiB."""
    return subprocess.Popen(
        [sys.executable, "-c", HOSTILE, endpoint, str(parts), str(4 << 20), *keys],
        stdout=subprocess.PIPE,
        text=True,
    )


async def test_hostile_multipart_sender_cannot_grow_the_dsn(tokens: Tokens, capsys) -> None:
    max_frame = 4 << 20
    async with running_dsn(tokens) as node:  # the DSN lives in this process: its RSS is ours
        owner = role_token(tokens, "alice", "operator")
        code, made = await api(
            node.url,
            "POST",
            "/api/channels",
            owner,
            {"stream": "det", "mode": "l7", "max_frame_bytes": max_frame},
        )
        assert code == 201, made
        cid, eps = made["id"], made["endpoints"]
        rss0 = rss_mib()
        # unauthenticated: no CURVE at all, then CURVE with a key the channel does not know
        stranger = zmq.curve_keypair()
        for keys in ((), (eps["server_key"], stranger[0].decode(), stranger[1].decode())):
            proc = hostile(eps["producer"], keys)
            try:
                outcome = await asyncio.to_thread(proc.stdout.readline)
                assert outcome.strip() == "refused", outcome
            finally:
                proc.kill()
                proc.wait(10)
        rss_unauth = rss_mib()
        # authenticated but hostile: its key gets in; the gateway drops the shape and lets go
        cred = await register(node.url, cid, owner, "producer")
        keys = (cred["server_key"], cred["public"].decode(), cred["secret"].decode())
        proc = hostile(eps["producer"], keys)
        try:
            assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "accepted"
            await wait_until(lambda: _dropped(node, cid, owner, "parts"), timeout=60, interval=0.2)
        finally:
            proc.kill()
            proc.wait(10)
        bound = 2 * max_frame / 2**20
        rss_auth = await wait_until(
            lambda: (rss := rss_mib()) - rss0 < bound and rss, timeout=10, interval=0.1
        )
        with capsys.disabled():
            print(
                f"\nDSN RSS: before {rss0:.0f} MiB, after 2 unauthenticated 64x4MiB senders "
                f"{rss_unauth:.0f} MiB, after an authenticated one (dropped) {rss_auth:.0f} MiB"
            )
        assert rss_unauth - rss0 < bound, (rss0, rss_unauth)
        assert rss_auth - rss0 < bound, (rss0, rss_auth)


async def _dropped(node, cid: str, token: str, reason: str) -> bool:
    return (await stats(node, cid, token))["drops"].get(reason, 0) >= 1


async def test_consumer_lookup_needs_stream_read(tokens: Tokens) -> None:
    async with running_dsn(tokens) as node:
        owner = role_token(tokens, "alice", "member")
        code, made = await api(node.url, "POST", "/api/channels", owner, {"stream": "det"})
        assert code == 201
        other = role_token(tokens, "olga", "pi", project="p2")
        with pytest.raises(ChannelLookupError) as info:
            await asyncio.to_thread(StreamConsumer.from_dsn, node.url, made["id"], other)
        assert info.value.status == 403
        assert made["credentials"] == {"producer": 0, "consumer": 0}
        assert node.channels[made["id"]].credentials == []
