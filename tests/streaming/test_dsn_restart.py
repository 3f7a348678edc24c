"""A DSN that survives: `beamhub dsn` as a real process with a state dir, killed with SIGKILL and
started again. Channels come back with the same ids and endpoints; a real source and a real
StreamConsumer keep going without being restarted; the gap is `lost` with reason `dsn_restart`;
every frame after the restart arrives. Expired channels stay gone; a channel whose port is taken
is reported (and retried), never dropped silently; the store is 0600."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from beamhub.streaming.channel_store import ChannelStore
from beamhub.streaming.consumer import StreamConsumer
from beamhub.streaming.simulator import SimulatedDetector
from beamhub.streaming.source import SourceRunner
from tests.streaming.dsn_helpers import Tokens, free_port

pytestmark = pytest.mark.timeout(120)


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last value {value!r})")
        time.sleep(0.02)


def http(url: str, method: str = "GET", token: str | None = None, body: Any = None):
    """One real HTTP call; (status, JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=20) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else None


class DsnProcess:
    """`beamhub dsn` on a fixed control port and state dir; its output collected by a thread."""

    def __init__(self, tmp: Path, jwks: Path, state: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [
            sys.executable,
            "-m",
            "beamhub.hub.cli",
            "dsn",
            "--port",
            str(self.port),
            "--jwks",
            str(jwks),
            "--state-dir",
            str(state),
            "--reap-interval",
            "0.2",
        ]
        self.env = {**os.environ, "BEAMHUB_HOME": str(tmp / "home")}
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []

    def start(self) -> str:
        """Start it; return its start-up output once it serves."""
        self.lines = lines = []
        self.proc = proc = subprocess.Popen(
            self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
        wait_for(
            lambda: "Ctrl-C to stop" in self.output() or proc.poll() is not None, 30, "DSN start"
        )
        assert proc.poll() is None, self.output()
        return self.output()

    def output(self) -> str:
        return "".join(self.lines)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise


@pytest.fixture
def tokens() -> Tokens:
    return Tokens()


@pytest.fixture
def dsn(tmp_path: Path, tokens: Tokens):
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(tokens.key.jwks()))
    node = DsnProcess(tmp_path, jwks, tmp_path / "state")
    yield node
    if node.proc is not None and node.proc.poll() is None:
        node.proc.kill()
        node.proc.wait(10)


class ConsumerThread(threading.Thread):
    """A StreamConsumer (the only work consumer) created, used and closed in this thread."""

    def __init__(self, url: str, channel_id: str, token: str) -> None:
        super().__init__(daemon=True)
        self.args = (url, channel_id, token)
        self.seqs: list[tuple[int, float]] = []
        self.consumer: StreamConsumer | None = None
        self.ready = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.final: dict[str, Any] | None = None

    def run(self) -> None:
        try:
            self.consumer = StreamConsumer.from_dsn(*self.args, exclusive=True)
            self.ready.set()
            while not self.done.is_set():
                frame = self.consumer.receive(timeout=0.1)
                if frame is not None:
                    self.seqs.append((frame.header.seq, time.monotonic()))
        except BaseException as exc:  # the test asserts there was none
            self.error = exc
        finally:
            self.ready.set()
            if self.consumer is not None:
                self.final = self.consumer.stats()
                self.consumer.close()


@pytest.mark.parametrize("mode", ["l4", "l7"])
def test_kill9_restart_keeps_channels_and_clients_report_the_gap(dsn, tokens, mode) -> None:
    token = tokens.issue(ttl=3600)
    dsn.start()
    code, made = http(
        dsn.url + "/api/channels", "POST", token, {"stream": "det", "mode": mode, "ttl": 600}
    )
    assert code == 201, made
    cid, endpoints = made["id"], made["endpoints"]
    boot = http(dsn.url + "/api/health")[1]["boot_id"]

    reader = ConsumerThread(dsn.url, cid, token)
    reader.start()
    assert reader.ready.wait(20) and reader.error is None
    consume = ["consume", "--dsn", dsn.url, "--channel", cid, "--monitor", "--json"]
    viewer = subprocess.Popen(  # `beamhub consume` on the monitor fan-out: it sees every frame
        [sys.executable, "-m", "beamhub.hub.cli", *consume, "--consumer-id", "viewer"],
        env={**dsn.env, "BEAMHUB_TOKEN": token},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def viewer_reported() -> bool:
        body = http(f"{dsn.url}/api/channels/{cid}", token=token)[1]
        return "viewer" in body["stats"]["consumers"]

    source = SourceRunner.from_dsn(  # registers its producer key; the DSN keeps it on restart
        SimulatedDetector((64, 64), seed=1, rate_hz=100.0), dsn.url, cid, token, stream="det"
    )
    source.start()
    try:
        source.start_run()
        wait_for(lambda: len(reader.seqs) >= 50, what="frames before the kill")
        wait_for(viewer_reported, what="beamhub consume reporting to the DSN")
        dsn.kill9()
        killed_at = time.monotonic()
        consumer = reader.consumer
        wait_for(lambda: consumer.link.disconnects == 1, what="the consumer seeing the link drop")
        before = len(reader.seqs)
        last_before = reader.seqs[-1][0]

        out = dsn.start()  # same state dir, same control port; nothing else is restarted
        assert "1 restored" in out and "FAILED" not in out, out
        code, again = http(f"{dsn.url}/api/channels/{cid}", token=token)
        assert code == 200, again
        assert (again["id"], again["state"], again["endpoints"]) == (cid, "active", endpoints)
        assert again["dsn_boot"] != boot

        wait_for(lambda: len(reader.seqs) >= before + 100, what="frames after the restart")
        flowing_again_s = reader.seqs[before][1] - killed_at
        source.stop_run()
        last_sent = source.status()["seq"] - 1
        wait_for(lambda: reader.seqs[-1][0] == last_sent, what="the last frame sent")
        after = [seq for seq, _ in reader.seqs[before:]]
        missing = sorted(set(range(last_before + 1, last_sent + 1)) - set(after))
        assert missing and after == sorted(after), after  # nothing twice, nothing out of order
        # every frame the source made once it was connected again arrives: the holes are only
        # what was in flight through the dead DSN and what the source could not queue meanwhile
        tail = [seq for seq in after if seq > missing[-1]]
        assert tail == list(range(missing[-1] + 1, last_sent + 1)) and len(tail) >= 50

        stats = wait_for(  # the gap stays the outage's until the link has been back a while
            lambda: (s := consumer.stats())["link"] == "up" and s,
            what="the outage closed",
        )
        gap = len(missing)
        assert stats["lost"] == gap and stats["lost_reasons"] == {"dsn_restart": gap}, stats
        assert stats["restarts"] == 0 and stats["disconnects"] == 1 and stats["link"] == "up"
        restart = [e for e in consumer.events if e["event"] == "dsn_restart"]
        assert len(restart) == 1 and restart[0]["lost"] == gap, restart
        assert restart[0]["after_seq"] == last_before and restart[0]["resumed_seq"] == after[0]
        produced = source.stats()
        assert produced["dropped_reasons"].get("hwm", 0) == 0, produced
        assert 0 < produced["dropped_reasons"]["dsn_restart"] <= gap

        def reported():  # the consumer's report reaches the restarted DSN's supervisor
            body = http(f"{dsn.url}/api/channels/{cid}", token=token)[1]
            entry = body["stats"]["consumers"].get(consumer.consumer_id)
            return entry if entry and entry["received"] == len(reader.seqs) else None

        entry = wait_for(reported, what="the consumer's report on the restarted DSN")
        assert entry["lost"] == gap and entry["lost_reasons"] == {"dsn_restart": gap}

        viewer.send_signal(signal.SIGTERM)
        out, err = viewer.communicate(timeout=20)
        assert viewer.returncode == 130, err
        seen = json.loads(out)
        assert seen["lost"] >= 1 and seen["lost_reasons"] == {"dsn_restart": seen["lost"]}, seen
        assert seen["disconnects"] == 1 and seen["last_seq"] == last_sent, seen
        assert [e["event"] for e in seen["events"]] == ["dsn_restart"], seen["events"]
        print(
            f"\n[{mode}] DSN kill -9 -> restart: {gap} frames lost (dsn_restart) at 100 Hz, "
            f"{produced['dropped_reasons']['dsn_restart']} of them dropped at the source; "
            f"frames flow again {flowing_again_s:.2f} s after the kill; "
            f"consumer outage {restart[0]['outage_s']} s"
        )
    finally:
        if viewer.poll() is None:
            viewer.kill()
            viewer.communicate(timeout=10)
        source.stop()
        reader.done.set()
        reader.join(10)
    assert reader.error is None and not source.last_error
    assert dsn.stop() == 0


def test_expired_channels_stay_gone_and_a_taken_port_is_reported(dsn, tokens) -> None:
    token = tokens.issue(ttl=3600)
    dsn.start()
    store = Path(dsn.argv[dsn.argv.index("--state-dir") + 1]) / "dsn" / ChannelStore.FILENAME
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.parent.stat().st_mode) == 0o700

    def create(body: dict) -> dict:
        code, made = http(dsn.url + "/api/channels", "POST", token, body)
        assert code == 201, made
        return made

    short = create({"stream": "short", "ttl": 2})
    kept = create({"stream": "kept", "mode": "l7"})
    blocked = create({"stream": "blocked", "mode": "l4"})
    dsn.kill9()
    for path in store.parent.iterdir():  # the WAL and the lock file too
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    wait_for(lambda: time.time() > short["expires_at"], what="the short channel's expiry")
    port = int(blocked["endpoints"]["producer"].rsplit(":", 1)[1])
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    try:
        out = dsn.start()
        assert "2 restored, 1 FAILED" in out and blocked["id"] in out, out
        assert re.search(rf'"channel.restore_failed".*{blocked["id"]}', out), out
        assert re.search(rf'"channel.expired".*{short["id"]}', out), out
        code, listing = http(dsn.url + "/api/channels", token=token)
        states = {c["id"]: c["state"] for c in listing["channels"]}
        assert states == {kept["id"]: "active", blocked["id"]: "failed"}
        code, body = http(f"{dsn.url}/api/channels/{blocked['id']}", token=token)
        assert code == 200 and body["state"] == "failed" and body["stats"] is None
        assert str(port) in body["error"] and "in use" in body["error"], body["error"]
        assert http(dsn.url + "/api/health")[1]["failed_channels"] == 1
        assert http(f"{dsn.url}/api/channels/{short['id']}", token=token)[0] == 404
    finally:
        squatter.close()

    def recovered():
        body = http(f"{dsn.url}/api/channels/{blocked['id']}", token=token)[1]
        return body if body["state"] == "active" else None

    body = wait_for(recovered, 20, "the failed channel provisioned again once its port is free")
    assert body["endpoints"] == blocked["endpoints"] and body["stats"] is not None
    assert dsn.stop() == 0  # a clean stop keeps the channels for the next start
    kept_store = ChannelStore(store.parent)
    try:
        ids = sorted(c["id"] for c in kept_store.channels())
    finally:
        kept_store.close()
    assert ids == sorted([kept["id"], blocked["id"]])
