"""End to end: producer → DataPlane (L4 and L7) → several consumers, one of them a real process killed mid-stream."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
import zmq

from beamhub.streaming.consumer import StreamConsumer

from .dataplane_helpers import (
    frame_ok,
    make_spec,
    send_frames,
    wait_for,
    wait_stats,
)

MODES = ["l4", "l7"]


class ConsumerThread(threading.Thread):
    """A StreamConsumer created, used and closed in its own thread; records (seq, run, intact)."""

    def __init__(self, endpoint: str, report: str | None, name: str, **kwargs) -> None:
        super().__init__(name=f"test-{name}", daemon=True)
        self.args = (endpoint, report, name, kwargs)
        self.seen: list[tuple[int, int, bool]] = []
        self.stats: dict = {}
        self.ready = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        endpoint, report, name, kwargs = self.args
        with StreamConsumer(endpoint, report=report, consumer_id=name, **kwargs) as consumer:
            self.ready.set()
            while not self.done.is_set():
                frame = consumer.receive(timeout=0.1)
                if frame is not None:
                    self.seen.append((frame.header.seq, frame.header.run, frame_ok(frame)))
            self.stats = consumer.stats()

    def stop(self) -> None:
        self.done.set()
        self.join(10)
        assert not self.is_alive()


class PacedProducer(threading.Thread):
    """Sends ``count`` checksummed frames at a steady pace from its own socket."""

    def __init__(self, ctx, endpoint: str, count: int, interval_s: float) -> None:
        super().__init__(name="test-producer", daemon=True)
        self.ctx, self.endpoint, self.count, self.interval_s = ctx, endpoint, count, interval_s

    def run(self) -> None:
        sock = producer_socket(self.ctx, self.endpoint)
        try:
            t_next = time.monotonic()
            for seq in range(self.count):
                send_frames(sock, [seq], n=4096)
                t_next += self.interval_s
                time.sleep(max(0.0, t_next - time.monotonic()))
        finally:
            sock.close(linger=5000)


def producer_socket(ctx, endpoint):
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 1000
    sock.connect(endpoint)
    return sock


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", MODES)
def test_several_consumers_one_killed_mid_stream(plane, ctx, mode):
    ep = plane.provision(make_spec(mode, hwm=8))
    survivors = [ConsumerThread(ep.work, ep.report, f"w{i}", hwm=4) for i in range(2)]
    for thread in survivors:
        thread.start()
        assert thread.ready.wait(10)
    victim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "beamhub.hub.cli",
            "consume",
            "--endpoint",
            ep.work,
            "--work",
            "--report",
            ep.report,
            "--consumer-id",
            "victim",
            "--hwm",
            "4",
            "--json",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_stats(plane, f"ch-{mode}", lambda s: {"w0", "w1", "victim"} <= set(s["consumers"]), 20)
        producer = PacedProducer(ctx, ep.producer, 600, interval_s=0.002)
        producer.start()
        wait_stats(
            plane, f"ch-{mode}", lambda s: (s["consumers"]["victim"]["received"] or 0) > 0, 20
        )
        victim.send_signal(signal.SIGKILL)  # mid-stream: frames are flowing to it right now
        assert victim.wait(10) == -signal.SIGKILL
        assert producer.is_alive(), "the stream ended before the kill; nothing was tested"
        # The stream goes on: the survivors get the last frame.
        wait_for(lambda: any(s[0] == 599 for t in survivors for s in t.seen), timeout=30)
        producer.join(10)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    for thread in survivors:
        thread.stop()
        seqs = [seq for seq, _, _ in thread.seen]
        assert seqs == sorted(seqs), f"{thread.name} got frames out of order"
        assert all(ok for _, _, ok in thread.seen), f"{thread.name} got a corrupted frame"
        assert thread.stats["restarts"] == 0
    survived = sum(len(t.seen) for t in survivors)
    stats = wait_stats(
        plane,
        f"ch-{mode}",
        lambda s: (
            s["messages"] == 600
            and all(s["consumers"][t.name[5:]]["received"] == len(t.seen) for t in survivors)
        ),
    )
    victim_reported = stats["consumers"]["victim"]["received"]
    # Nothing is silently lost: forwarded - reported received is what the victim took with it.
    assert stats["unaccounted"] == 600 - survived - victim_reported
    assert survived + victim_reported <= 600
    # The frames a dead consumer can take with it are bounded by the queues (DSN hwm + its own).
    assert stats["unaccounted"] <= 64, stats
    assert stats["consumers"]["victim"]["age_s"] > stats["consumers"]["w0"]["age_s"]
    assert stats["consumers"]["w0"]["lag"] is not None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_restarted_producer_is_detected_and_reported(plane, ctx, mode):
    ep = plane.provision(make_spec(mode))
    consumer = ConsumerThread(ep.work, ep.report, "solo", exclusive=True)
    consumer.start()
    assert consumer.ready.wait(10)
    first = producer_socket(ctx, ep.producer)
    send_frames(first, range(20), run=0)
    wait_for(lambda: len(consumer.seen) == 20)
    first.close()
    second = producer_socket(ctx, ep.producer)  # the source restarted: seq from 0, a new run id
    send_frames(second, range(10), run=1)
    wait_for(lambda: len(consumer.seen) == 30)
    stats = wait_stats(
        plane, f"ch-{mode}", lambda s: s["consumers"].get("solo", {}).get("restarts") == 1
    )
    consumer.stop()
    assert consumer.stats["restarts"] == 1 and consumer.stats["lost"] == 0
    assert [s[0] for s in consumer.seen] == list(range(20)) + list(range(10))
    if mode == "l7":
        assert stats["producer_restarts"] == 1  # the gateway sees it too


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_slow_monitor_viewer_does_not_stall_work(plane, ctx, mode):
    ep = plane.provision(make_spec(mode, hwm=4, max_frame_bytes=1 << 20))
    viewer = StreamConsumer(ep.monitor, monitor=True, hwm=1)  # connected, never reading
    worker = ConsumerThread(ep.work, ep.report, "fast", hwm=4)
    worker.start()
    assert worker.ready.wait(10)
    probe = producer_socket(ctx, ep.producer)
    try:
        # Wait until the viewer's subscription is in (it sees a probe frame), then stop reading.
        sent = []

        def probe_once():
            sent.append(10_000 + len(sent))
            send_frames(probe, sent[-1:], n=16)
            return viewer.receive(timeout=0.05)

        wait_for(probe_once)
        # Every probe must be in before counting: a late one would make the count 201.
        wait_for(lambda: worker.seen and worker.seen[-1][0] == sent[-1])
        worker.seen.clear()
        send_frames(probe, range(20_000, 20_200), n=256 * 1024 // 4)  # 1 MiB frames, 200 MiB
        wait_for(lambda: len(worker.seen) >= 200, timeout=40)
        assert [s[0] for s in worker.seen] == list(range(20_000, 20_200))
        drained = 0
        while viewer.receive(timeout=0.2) is not None:
            drained += 1
        assert drained < 200, "the slow viewer got everything: nothing was dropped for it"
        assert viewer.stats()["lost"] > 0  # and the viewer sees its loss as sequence gaps
    finally:
        worker.stop()
        viewer.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_simulated_detector_through_the_dsn(plane, mode):
    from beamhub.streaming.simulator import SimulatedDetector
    from beamhub.streaming.source import SourceRunner

    ep = plane.provision(make_spec(mode, stream="sim", hwm=32, max_frame_bytes=4 << 20))
    workers = [ConsumerThread(ep.work, ep.report, f"sim{i}", hwm=8) for i in range(2)]
    for thread in workers:
        thread.start()
        assert thread.ready.wait(10)
    detector = SimulatedDetector((256, 256), seed=1, rate_hz=200.0)
    with SourceRunner(detector, stream="sim", connect=ep.producer) as source:
        source.start_run()
        wait_for(lambda: sum(len(t.seen) for t in workers) >= 100, timeout=30)
        source.stop_run()
    sent = source.stats()  # the runner has stopped: these counts are final
    wait_for(lambda: sum(len(t.seen) for t in workers) == sent["frames_sent"], timeout=20)
    for thread in workers:
        thread.stop()
        assert all(ok for _, _, ok in thread.seen), "a frame arrived corrupted"
        seqs = [seq for seq, _, _ in thread.seen]
        assert seqs == sorted(seqs)
    seqs = sorted(seq for t in workers for seq, _, _ in t.seen)
    # Every frame the detector sent arrived exactly once; frames it had to drop are counted there.
    assert len(seqs) == len(set(seqs)) == sent["frames_sent"]
    assert seqs[-1] + 1 == sent["frames_sent"] + sent["dropped_at_source"]
    assert all(len(t.seen) > 0 for t in workers), "work was not distributed"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("mode", MODES)
async def test_beamhub_consume_through_the_real_control_plane(ctx, mode):
    """Token → DSN control API (H3's DataStreamingNode) → data plane → `beamhub consume --dsn`."""
    import asyncio
    import json
    import os

    from .dsn_helpers import Tokens, api, register, running_dsn, secure, wait_until

    tokens = Tokens()
    token = tokens.issue(scopes="stream.read stream.publish")
    async with running_dsn(tokens) as node:
        code, made = await api(
            node.url,
            "POST",
            "/api/channels",
            token,
            {"stream": "det", "mode": mode, "hwm": 32, "ttl": 300},
        )
        assert code == 201, made
        cid = made["id"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "beamhub.hub.cli",
            "consume",
            "--dsn",
            node.url,
            "--channel",
            cid,
            "--work",
            "--consumer-id",
            "cli",
            "--count",
            "30",
            "--timeout",
            "60",
            "--json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "BEAMHUB_TOKEN": token},
        )
        try:

            async def reported() -> bool:
                code, body = await api(node.url, "GET", f"/api/channels/{cid}", token)
                return code == 200 and "cli" in body["stats"]["consumers"]

            await wait_until(reported, timeout=30)  # the consumer is connected and reporting
            producer = ctx.socket(zmq.PUSH)
            secure(producer, await register(node.url, cid, token, "producer"))
            producer.linger = 1000
            producer.connect(made["endpoints"]["producer"])
            send_frames(producer, range(30))
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, err.decode()
        result = json.loads(out.decode().strip().splitlines()[-1])
        assert (result["frames"], result["lost"], result["malformed"]) == (30, 0, 0)

        async def final_report() -> dict | None:
            _, body = await api(node.url, "GET", f"/api/channels/{cid}", token)
            entry = body["stats"]["consumers"].get("cli", {})
            # (L4 counters come from the proxy's STATISTICS, sampled every 0.2 s.)
            done = entry.get("received") == 30 and body["stats"]["messages"] == 30
            return body if done else None

        body = await wait_until(final_report, timeout=10)
        assert (
            body["stats"]["messages"] == 30 and body["stats"]["consumers"]["cli"]["last_seq"] == 29
        )
