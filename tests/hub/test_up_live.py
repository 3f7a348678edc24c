"""`beamhub up` prints live figures of the detector stream (a monitor consumer with peak finding),
and its detector channel drops while no analysis is connected so the dashboard is live from the
start. Real stack (the session's dev `beamhub up`), real DSN, real sockets."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from beamhub.hub.up.deployment import DeploymentError, load_deployment
from beamhub.hub.up.live_figures import LiveFigures
from beamhub.streaming.simulator import SimulatedDetector
from beamhub.streaming.source import SourceRunner
from tests.hub.hubstack import RunningStack, login
from tests.streaming.dsn_helpers import Tokens, api, running_dsn, wait_until

pytestmark = pytest.mark.timeout(120)

LINE = re.compile(
    r"^live  detector p-1001: (\d+) frames  ([\d.]+) Hz  .* lost (\d+)  latency p50 .*"
    r"hit rate .*\(dsn drops: no_consumer (\d+); work consumers (\d+)\)$",
    re.M,
)


def test_beamhub_up_prints_live_figures(dev_stack: RunningStack) -> None:
    """Two live lines with frames > 0 and growing; the DSN counts no_consumer drops meanwhile."""
    deadline = time.monotonic() + 60
    lines = LINE.findall(dev_stack.output())
    while len(lines) < 2 or int(lines[-1][0]) <= int(lines[0][0]) or int(lines[0][0]) == 0:
        assert time.monotonic() < deadline, dev_stack.output()[-3000:]
        time.sleep(0.5)
        lines = LINE.findall(dev_stack.output())
    first, last = lines[0], lines[-1]
    assert 0 < int(first[0]) < int(last[0])
    assert float(last[1]) > 0
    assert int(last[2]) == 0  # a 2 Hz stream of 64x64 frames: the monitor loses nothing
    # Nobody analyses the detector stream in this stack yet: the channel drops (counted) instead of
    # holding frames back, which is why the monitor (and the dashboard) see them at all.
    assert int(last[3]) > 0 and int(last[3]) >= int(first[3])
    assert "live figures of the detector stream printed every 1 s" in dev_stack.output()


def test_dashboard_is_live_without_any_analysis(dev_stack: RunningStack) -> None:
    """The shared dashboard (a monitor subscriber) analyses detector frames with no work consumer."""
    if "dashboard" not in dev_stack.urls:
        pytest.skip("the dashboard service is not part of this stack")
    vera, r = login(dev_stack, "vera", "vera-dev")
    assert r.status_code == 200, r.text[:300]
    assert vera.get(dev_stack.urls["dashboard"], timeout=20).status_code == 200
    url = dev_stack.urls["dashboard"] + "p/p-1001/data.json"
    channel = dev_stack.urls["detector_channel"]

    def analysed() -> int:
        r = vera.get(url, timeout=10)
        assert r.status_code == 200, r.text[:300]
        streams = {s["channel"]: s for s in r.json()["streams"]}
        return streams[channel]["frames_analysed"] if channel in streams else 0

    deadline = time.monotonic() + 30
    while (first := analysed()) == 0:
        assert time.monotonic() < deadline, "the dashboard analysed no detector frame"
        time.sleep(0.5)
    while analysed() <= first:
        assert time.monotonic() < deadline + 15, "the dashboard's frame count did not grow"
        time.sleep(0.5)


async def test_live_figures_against_a_real_dsn(tmp_path: Path) -> None:
    """Peak finding on the printer's frames: hit rate > 0 on 256x256 frames; stops promptly."""
    tokens = Tokens()
    token = tokens.issue("p1", "stream.read stream.publish")
    async with running_dsn(tokens) as node:
        status, ch = await api(
            node.url,
            "POST",
            "/api/channels",
            token,
            {"stream": "det", "mode": "l7", "when_no_consumer": "drop"},
        )
        assert status == 201, ch
        detector = SimulatedDetector((256, 256), rate_hz=40, hit_fraction=0.5)
        # every channel has a credential: the source registers its key through the control API
        source = await asyncio.to_thread(SourceRunner.from_dsn, detector, node.url, ch["id"], token)
        lines: list[str] = []
        live = LiveFigures(
            node.url,
            ch["id"],
            token,
            "det p1",
            every_s=0.5,
            dsn_stats=lambda: node.data_plane.stats(ch["id"]),
            progress=lines.append,
        )
        source.start()
        source.start_run()
        live.start()
        try:
            await wait_until(lambda: len(lines) >= 3, timeout=30)
        finally:
            t0 = time.monotonic()
            live.stop()
            stopped_in = time.monotonic() - t0
            source.stop()
        assert not live.alive and stopped_in < 2.0
        assert all(line.startswith("live  det p1: ") for line in lines), lines
        frames = [int(re.search(r": (\d+) frames", line).group(1)) for line in lines]
        assert frames == sorted(frames) and frames[-1] > frames[0] > 0
        rates = [
            float(m.group(1)) for line in lines if (m := re.search(r"hit rate ([\d.]+)", line))
        ]
        assert max(rates) > 0, lines  # half of the frames carry Bragg peaks
        assert re.search(r"peaks/hit \d+", lines[-1]), lines
        assert "no_consumer" in lines[-1] and "work consumers 0" in lines[-1]
        # The printer's consumer reported to the DSN as a monitor viewer.
        stats = node.data_plane.stats(ch["id"])
        assert any(c["role"] == "monitor" for c in stats["consumers"].values())


def test_print_every_s_is_validated(tmp_path: Path) -> None:
    cfg = tmp_path / "beamhub.yaml"
    for bad in ("0.1", "-1", "7200"):
        cfg.write_text(f"detector: {{print_every_s: {bad}}}\n")
        with pytest.raises(DeploymentError) as err:
            load_deployment(cfg)
        assert err.value.field == "detector.print_every_s"
    cfg.write_text("detector: {print_every_s: 0}\n")
    assert load_deployment(cfg).detector.print_every_s == 0
    assert load_deployment().detector.print_every_s == 5.0
