"""Small events at high rate: the event source, batch messages through L7, events out of a consumer."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest

from beamhub.streaming.consumer import StreamConsumer
from beamhub.streaming.eventsim import SmallEventSource, default_events_per_message
from beamhub.streaming.params import ParamError
from beamhub.streaming.source import SourceRunner

from .dataplane_helpers import make_spec, wait_stats


def test_events_per_message_aims_at_64_kib():
    assert default_events_per_message(1024) == 64
    assert default_events_per_message(64 * 1024) == 1
    assert default_events_per_message(2) == 4096
    events, meta = SmallEventSource(1024, seed=1).generate()
    assert events.shape == (64, 512) and events.dtype == np.dtype("<u2")
    assert 0 <= meta["pulses"] <= 64 and meta["event_bytes"] == 1024


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"event_bytes": 1023}, "even"),
        ({"event_bytes": 0}, "even"),
        ({"event_bytes": 1024, "events_per_message": 5000}, "events_per_message"),
    ],
)
def test_bad_event_settings_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SmallEventSource(**kwargs)


def test_rate_is_bounded_by_its_schema():
    with pytest.raises(ParamError, match="rate_hz"):
        SmallEventSource(1024, rate_hz=2e7)


@pytest.mark.timeout(60)
def test_events_arrive_one_by_one_through_l7_at_the_asked_rate(plane):
    """20 kHz of 1 KiB events: the runner sends batches, L7 checks them, the consumer yields events."""
    ep = plane.provision(make_spec("l7", max_frame_bytes=1 << 20, hwm=64))
    source = SmallEventSource(1024, seed=2, rate_hz=20_000.0)
    consumer = StreamConsumer(ep.work, exclusive=True, hwm=64)
    # a deep source queue: under load the consumer may lag for a moment without a drop at source
    runner = SourceRunner(source, stream="det", connect=ep.producer, sndhwm=1000).start()
    try:
        runner.start_run()
        seqs: list[int] = []
        t0 = time.monotonic()
        while len(seqs) < 20_000 and time.monotonic() - t0 < 20:
            frame = consumer.receive(timeout=1.0)
            if frame is not None:
                assert frame.data.shape == (512,) and frame.header.batch == 1
                seqs.append(frame.header.seq)
        elapsed = time.monotonic() - t0
    finally:
        runner.stop()
    assert len(seqs) == 20_000
    assert seqs == list(range(seqs[0], seqs[0] + 20_000))  # in order, none missing
    assert consumer.lost == 0 and consumer.frames >= 20_000
    assert 0.6 < 20_000 / elapsed / 20_000 < 1.5, elapsed  # paced at ~20 kHz of events
    stats = wait_stats(plane, "ch-l7", lambda s: s["messages"] >= 20_000)
    assert stats["drops"] == {}
    assert runner.stats()["frames_sent"] % 64 == 0  # whole batches of 64 events


@pytest.mark.timeout(60)
def test_cli_sim_event_bytes_streams_small_events():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "beamhub.hub.cli",
            *(
                "source",
                "sim",
                "--event-bytes",
                "1024",
                "--rate",
                "10000",
                "--run",
                "--sndhwm",
                "1000",
            ),
            *("--bind", "tcp://127.0.0.1:*", "--control-port", "0", "--status-every", "0.5"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        endpoint = re.search(r"sending to (tcp://\S+)", line)
        assert endpoint, line + proc.stderr.read() if proc.poll() is not None else line
        with StreamConsumer(endpoint.group(1), exclusive=True, hwm=64) as consumer:
            got = 0
            deadline = time.monotonic() + 20
            while got < 5000 and time.monotonic() < deadline:
                got += consumer.receive(timeout=1.0) is not None
            assert got == 5000 and consumer.lost == 0
        status = ""
        while "Hz" not in status:
            status = proc.stdout.readline()
        assert re.search(r"sent \d+ frames", status), status
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_refuses_frame_options_with_event_bytes():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "beamhub.hub.cli",
            *("source", "sim", "--event-bytes", "1024", "--hit-fraction", "0.5"),
            *("--bind", "tcp://127.0.0.1:*"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--hit-fraction" in proc.stderr
