"""The science DMZ as a tested topology: instrument | DSN with two interfaces | compute.

Three network namespaces joined by veth pairs (:mod:`beamhub.bench._netns`): the detector source
runs in ``instrument``, ``beamhub dsn`` in ``dmz`` (IP forwarding off; producer faces bound on its
instrument-side address, work/monitor faces on its compute-side one, the control API on both), the
consumers in ``compute``. Every peer is a real process under ``ip netns exec`` using the client
APIs (:mod:`beamhub.bench._dmz_peer`), so channel credentials are handled as for any client.
Needs root for ``ip netns``; elsewhere every test skips naming the missing capability.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from beamhub.bench._netns import ADDRESSES, DmzTopology, NetnsUnavailable
from beamhub.bench.dmz import write_dmz_template

pytestmark = pytest.mark.timeout(120)

DSN_PORT = 8100
CLI = [sys.executable, "-m", "beamhub.hub.cli"]
PEER = [sys.executable, "-m", "beamhub.bench._dmz_peer"]


class Process:
    """A long-running process in a namespace; its stdout lines collected by a thread."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def wait_line(self, needle: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if needle in line:
                    return line
            if self.proc.poll() is not None and not any(needle in s for s in self.lines):
                break
            time.sleep(0.02)
        raise AssertionError(f"no {needle!r} from {self.proc.args}: {self.output()}")

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Dmz:
    """The running topology: namespaces, the DSN in ``dmz``, a project token."""

    def __init__(self, net: DmzTopology, env: dict[str, str], tmp: Path) -> None:
        self.net, self.env, self.tmp = net, env, tmp
        self.processes: list[Process] = []
        self.url = {
            "instrument": f"http://{ADDRESSES['dmz_instrument']}:{DSN_PORT}",
            "compute": f"http://{ADDRESSES['dmz_compute']}:{DSN_PORT}",
        }

    def start(self, side: str, argv: list[str]) -> Process:
        proc = Process(self.net.argv(side, *argv), self.env)
        self.processes.append(proc)
        return proc

    def peer(self, side: str, *args: str, timeout: float = 60.0, ok: bool = True) -> dict:
        """One peer command in ``side``; its JSON answer."""
        done = subprocess.run(
            self.net.argv(side, *PEER, *args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if ok:
            assert done.returncode == 0, f"{args[0]} in {side}: {done.stdout}{done.stderr}"
        return json.loads(done.stdout.strip().splitlines()[-1])

    def channel(self, mode: str = "l7") -> dict:
        body = {"stream": "det", "mode": mode, "ttl": 600}
        return self.peer("compute", "create", self.url["compute"], json.dumps(body))

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()


@pytest.fixture(scope="module")
def dmz(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dmz")
    net = DmzTopology()
    try:
        net.create()
    except NetnsUnavailable as exc:
        pytest.skip(f"science DMZ test needs network namespaces: {exc}")
    env = {**os.environ, "BEAMHUB_HOME": str(tmp / "home")}
    env.pop("BEAMHUB_TOKEN", None)
    running = Dmz(net, env, tmp)
    try:
        token = subprocess.run(
            [*CLI, "token", "issue", "--project", "dmz", "--scope", "stream.publish stream.read"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
        env["BEAMHUB_TOKEN"] = token
        dsn = running.start(
            "dmz",
            [
                *CLI,
                "dsn",
                "--host",
                "0.0.0.0",  # the control API answers on both interfaces
                "--port",
                str(DSN_PORT),
                "--data-host",
                ADDRESSES["dmz_compute"],
                "--producer-host",
                ADDRESSES["dmz_instrument"],
                "--template",
                str(write_dmz_template(tmp / "dmz.yaml")),
                "--ephemeral",
            ],
        )
        dsn.wait_line("Ctrl-C to stop", 60)
        running.dsn = dsn
        yield running
    finally:
        running.stop()
        net.destroy()


def test_ip_forwarding_is_off_in_the_dmz(dmz):
    assert dmz.net.forwarding() == "0"


def test_the_stream_reaches_compute_through_the_dsn_with_no_frame_lost(dmz):
    frames = 120
    channel = dmz.channel("l7")
    cid, ep = channel["id"], channel["endpoints"]
    # faces bound where they belong: frames come in on the instrument side, leave on compute's
    assert ep["producer"].startswith(f"tcp://{ADDRESSES['dmz_instrument']}:"), ep
    for face in ("work", "monitor", "report"):
        assert ep[face].startswith(f"tcp://{ADDRESSES['dmz_compute']}:"), ep
    consumer = dmz.start(
        "compute",
        [
            *CLI,
            "consume",
            "--dsn",
            dmz.url["compute"],
            "--channel",
            cid,
            "--work",
            "--exclusive",
            "--count",
            str(frames),
            "--timeout",
            "60",
            "--json",
        ],
    )
    dmz.peer("compute", "wait", dmz.url["compute"], cid, "consumers_connected", "1", "30")
    stack = np.arange(frames * 64 * 64, dtype="<u2").reshape(frames, 64, 64)
    npy = dmz.tmp / "frames.npy"
    np.save(npy, stack)
    sent = dmz.peer("instrument", "replay", dmz.url["instrument"], cid, str(npy), "200", "60")
    assert sent["finished"] and sent["frames_sent"] == frames, sent
    assert sent["dropped_at_source"] == 0, sent
    assert sent["endpoint"] == ep["producer"]
    assert consumer.proc.wait(60) == 0, consumer.output()
    got = json.loads(consumer.output().strip().splitlines()[-1])
    assert (got["frames"], got["lost"], got["malformed"]) == (frames, 0, 0), got
    assert got["bytes"] >= frames * 64 * 64 * 2
    stats = dmz.peer("compute", "stats", dmz.url["compute"], cid)["stats"]
    assert stats["messages"] == frames and stats["drops"] == {}, stats
    assert stats["refused_connections"] == {"producer": 0, "consumer": 0}, stats


def _listener(dmz, side: str) -> int:
    proc = dmz.start(side, [*PEER, "listen", ADDRESSES[side]])
    return json.loads(proc.wait_line('"port"'))["port"]


def test_compute_cannot_open_a_tcp_connection_to_the_instrument_network(dmz):
    port = _listener(dmz, "instrument")
    here = dmz.peer("dmz", "connect", ADDRESSES["instrument"], str(port), "5")
    assert here["connected"], f"the DMZ itself must reach the instrument's listener: {here}"
    there = dmz.peer("compute", "connect", ADDRESSES["instrument"], str(port), "3")
    assert not there["connected"], there


def test_the_instrument_cannot_reach_compute(dmz):
    port = _listener(dmz, "compute")
    here = dmz.peer("dmz", "connect", ADDRESSES["compute"], str(port), "5")
    assert here["connected"], f"the DMZ itself must reach the compute listener: {here}"
    there = dmz.peer("instrument", "connect", ADDRESSES["compute"], str(port), "3")
    assert not there["connected"], there


@pytest.mark.parametrize("mode", ["l4", "l7"])
def test_the_dsn_refuses_a_producer_on_the_compute_side(dmz, mode):
    """Compute reaches the producer face's address (the DMZ's own, so delivered without
    forwarding) with a registered key; the channel's source allowlist refuses it."""
    cid = dmz.channel(mode)["id"]
    tried = dmz.peer("compute", "intrude", dmz.url["compute"], cid, "producer", "20")
    assert tried["refused"] >= 1, tried
    assert tried["dsn_messages"] == 0, tried


def test_the_dsn_refuses_a_consumer_on_the_instrument_side(dmz):
    cid = dmz.channel("l7")["id"]
    tried = dmz.peer("instrument", "intrude", dmz.url["instrument"], cid, "consumer", "20")
    assert tried["refused"] >= 1 and tried["frames_received"] == 0, tried


def test_the_routes_are_there_so_forwarding_off_is_what_separates_the_sides(dmz):
    """The control for the two tests above: with forwarding on for a moment, the very same
    connection from compute to the instrument goes through the DMZ."""
    port = _listener(dmz, "instrument")
    sysctl = dmz.net.argv("dmz", "sysctl", "-q", "-w")
    subprocess.run([*sysctl, "net.ipv4.ip_forward=1"], check=True, timeout=20)
    try:
        through = dmz.peer("compute", "connect", ADDRESSES["instrument"], str(port), "5")
    finally:
        subprocess.run([*sysctl, "net.ipv4.ip_forward=0"], check=True, timeout=20)
    assert dmz.net.forwarding() == "0"
    assert through["connected"], through
