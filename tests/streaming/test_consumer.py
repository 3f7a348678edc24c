"""StreamConsumer and `beamhub consume` on real sockets and a real HTTP server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import zmq

from beamhub.streaming.consumer import ChannelLookupError, StreamConsumer

from .dataplane_helpers import frame_ok, send_frames, wait_for

CONSUME = [sys.executable, "-m", "beamhub.hub.cli", "consume"]


@pytest.fixture
def producer(ctx):
    sock = ctx.socket(zmq.PUSH)
    sock.linger = 0
    sock.bind_to_random_port("tcp://127.0.0.1")
    return sock


@pytest.fixture
def reports(ctx):
    sock = ctx.socket(zmq.PULL)
    sock.linger = 0
    sock.bind_to_random_port("tcp://127.0.0.1")
    return sock


def ep(sock):
    return sock.last_endpoint.decode()


def take(consumer, n, timeout=5.0):
    frames = []
    for _ in range(n):
        frame = consumer.receive(timeout=timeout)
        assert frame is not None, f"only {len(frames)} of {n} frames arrived"
        frames.append(frame)
    return frames


def test_frames_counts_latency_and_zero_copy(producer):
    with StreamConsumer(ep(producer), exclusive=True) as consumer:
        send_frames(producer, range(20))
        frames = take(consumer, 20)
        assert [f.header.seq for f in frames] == list(range(20))
        assert all(frame_ok(f) for f in frames)
        assert not frames[0].data.flags.owndata  # a view of the received zmq buffer, not a copy
        stats = consumer.stats()
        assert stats["frames"] == 20 and stats["lost"] == 0 and stats["restarts"] == 0
        assert stats["bytes"] == sum(f.data.nbytes for f in frames) + sum(
            len(f.header.to_bytes()) for f in frames
        )
        assert 0 <= stats["latency_p50_ms"] <= stats["latency_p99_ms"] < 5000
        assert consumer.receive(timeout=0.05) is None


def test_gaps_count_as_lost_only_when_exclusive(producer, ctx):
    exclusive = StreamConsumer(ep(producer), exclusive=True)
    send_frames(producer, [0, 1, 5, 6, 10])
    take(exclusive, 5)
    assert exclusive.stats()["lost"] == 3 + 3
    exclusive.close()
    # A fresh producer: the first one may still route to the closed consumer's pipe.
    other = ctx.socket(zmq.PUSH)
    other.linger = 0
    other.bind_to_random_port("tcp://127.0.0.1")
    shared = StreamConsumer(ep(other))  # one of several work consumers: gaps are normal
    send_frames(other, [20, 22, 24])
    take(shared, 3)
    assert shared.stats()["lost"] == 0 and shared.stats()["loss_counted"] is False
    shared.close()


def test_restart_detected_and_malformed_counted(producer):
    with StreamConsumer(ep(producer)) as consumer:
        send_frames(producer, range(10, 15))
        producer.send_multipart([b"{broken", b"xx"])
        producer.send(b"one part")
        send_frames(producer, range(0, 3), run=1)  # the producer restarted with a new run
        frames = take(consumer, 8)
        assert [f.header.seq for f in frames] == [10, 11, 12, 13, 14, 0, 1, 2]
        stats = consumer.stats()
        assert stats["restarts"] == 1
        assert stats["malformed"] == 2
        assert stats["malformed_reasons"] == {"bad_header": 1, "parts": 1}
        event = consumer.events[-1]
        assert (event["from_seq"], event["to_seq"], event["to_run"]) == (14, 0, 1)


def test_reports_reach_the_report_endpoint(producer, reports):
    with StreamConsumer(ep(producer), report=ep(reports), consumer_id="w1") as consumer:
        send_frames(producer, range(7))
        take(consumer, 7)
        seen = []

        def got_final():
            consumer.receive(timeout=0.1)  # reports go out from receive()
            while reports.poll(0):
                seen.append(json.loads(reports.recv()))
            return seen and seen[-1]["received"] == 7

        wait_for(got_final, timeout=5)
    last = seen[-1]
    assert last["consumer_id"] == "w1" and last["last_seq"] == 6 and last["role"] == "work"


def test_monitor_mode_subscribes(ctx):
    pub = ctx.socket(zmq.PUB)
    pub.linger = 0
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    with StreamConsumer(f"tcp://127.0.0.1:{port}", monitor=True) as viewer:
        seq = iter(range(10_000))

        def arrived():  # PUB drops until the subscription is in: keep publishing until one lands
            send_frames(pub, [next(seq)])
            return viewer.receive(timeout=0.05)

        first = wait_for(arrived, timeout=5)
        send_frames(pub, [first.header.seq + 1, first.header.seq + 4])
        take(viewer, 2)
        assert viewer.stats()["lost"] == 2  # monitor viewers count gaps


class _ChannelAPI(BaseHTTPRequestHandler):
    channel: dict = {}

    def do_GET(self):
        if self.headers.get("Authorization") != "Bearer good-token":
            body, status = b'{"reason": "invalid_token", "message": "invalid token"}', 401
        elif self.path != "/api/channels/ch-c1":
            body, status = b'{"reason": "not_found", "message": "no such channel"}', 404
        else:
            body, status = json.dumps(self.channel).encode(), 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # key registration: this fake channel has no CURVE (server_key null)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/api/channels/ch-c1/credentials":
            self.path = "/api/channels/ch-c1"
            answer = {**body, "endpoints": self.channel["endpoints"], "server_key": None}
            self.channel, saved = answer, self.channel
            try:
                self.do_GET()
            finally:
                self.channel = saved
            return
        self.do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def dsn_api(producer, reports):
    _ChannelAPI.channel = {
        "id": "ch-c1",
        "project": "p1",
        "stream": "det",
        "mode": "l7",
        "endpoints": {
            "producer": "tcp://127.0.0.1:1",
            "work": ep(producer),
            "monitor": None,
            "report": ep(reports),
            "server_key": None,
        },
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChannelAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_from_dsn_looks_up_endpoints(dsn_api, producer):
    with StreamConsumer.from_dsn(dsn_api, "ch-c1", "good-token") as consumer:
        send_frames(producer, range(3))
        assert [f.header.seq for f in take(consumer, 3)] == [0, 1, 2]
    with pytest.raises(ChannelLookupError) as info:
        StreamConsumer.from_dsn(dsn_api, "ch-c1", "bad-token")
    assert info.value.status == 401
    assert str(info.value).endswith("(HTTP 401): invalid token (invalid_token)")  # not raw JSON
    with pytest.raises(ChannelLookupError) as info:
        StreamConsumer.from_dsn(dsn_api, "ch-0", "good-token")
    assert info.value.status == 404
    with pytest.raises(ChannelLookupError, match="no monitor endpoint"):
        StreamConsumer.from_dsn(dsn_api, "ch-c1", "good-token", monitor=True)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="curve_keypair"):
        StreamConsumer("tcp://127.0.0.1:1", curve_server_key="x" * 40)
    with pytest.raises(ValueError, match="hwm"):
        StreamConsumer("tcp://127.0.0.1:1", hwm=-1)
    with pytest.raises(ValueError, match="endpoint"):
        StreamConsumer("127.0.0.1:1")


@pytest.mark.timeout(60)
def test_cli_consume_json(producer, dsn_api):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "beamhub.hub.cli",
            "consume",
            "--dsn",
            dsn_api,
            "--channel",
            "ch-c1",
            "--work",
            "--count",
            "25",
            "--timeout",
            "30",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**__import__("os").environ, "BEAMHUB_TOKEN": "good-token"},
    )
    try:
        wait_for(lambda: proc.poll() is not None or producer.poll(0, zmq.POLLOUT), timeout=20)
        send_frames(producer, range(25))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["frames"] == 25 and result["lost"] == 0 and result["malformed"] == 0
    assert result["latency_p50_ms"] is not None and result["latency_p99_ms"] is not None


def test_cli_refuses_missing_token(dsn_api, monkeypatch):
    monkeypatch.delenv("BEAMHUB_TOKEN", raising=False)
    from beamhub.hub.cli import main

    assert main(["consume", "--dsn", dsn_api, "--channel", "ch-c1", "--count", "1"]) == 2


@pytest.mark.timeout(60)
def test_cli_stops_cleanly_on_sigterm(producer):
    import signal

    proc = subprocess.Popen(
        [*CONSUME, "--endpoint", ep(producer), "--work", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        send_frames(producer, range(3))
        wait_for(lambda: producer.poll(0, zmq.POLLOUT) and proc.poll() is None, timeout=20)
        # It prints where it consumes from once it is up; then it should hold the 3 frames.
        line = proc.stderr.readline()
        assert "consuming work stream from" in line
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert json.loads(out.strip().splitlines()[-1])["frames"] in (0, 1, 2, 3)


@pytest.mark.timeout(60)
def test_cli_consumes_an_encrypted_channel(tmp_path, ctx):
    import zmq.auth

    from beamhub.streaming.dataplane import DataPlane

    from .dataplane_helpers import make_spec

    _, secret_file = zmq.auth.create_certificates(tmp_path, "reader")
    reader_public, _ = zmq.auth.load_certificate(secret_file)
    prod_public, prod_secret = zmq.curve_keypair()
    with DataPlane() as plane:
        channel = plane.provision(
            make_spec(
                "l7",
                curve=True,
                producer_keys=(prod_public.decode(),),
                consumer_keys=(reader_public.decode(),),
            )
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "beamhub.hub.cli",
                "consume",
                "--endpoint",
                channel.work,
                "--work",
                "--curve-server-key",
                channel.server_key,
                "--curve-cert",
                str(secret_file),
                "--count",
                "5",
                "--timeout",
                "30",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            sock = ctx.socket(zmq.PUSH)
            sock.linger = 0
            sock.curve_serverkey = channel.server_key.encode()
            sock.curve_publickey, sock.curve_secretkey = prod_public, prod_secret
            sock.connect(channel.producer)
            send_frames(sock, range(5))
            out, err = proc.communicate(timeout=40)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["frames"] == 5


def test_a_new_run_is_not_a_restart(producer):
    # The source keeps counting seq up across runs of one producer; only a seq reset is a restart.
    with StreamConsumer(ep(producer), exclusive=True) as consumer:
        send_frames(producer, range(5), run=0)
        send_frames(producer, range(5, 10), run=1)
        take(consumer, 10)
        stats = consumer.stats()
        assert (stats["restarts"], stats["lost"], stats["run"]) == (0, 0, 1)
