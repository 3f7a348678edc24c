"""File replay from .npy and HDF5 over real ZeroMQ, its errors, and `beamhub source` as a process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import h5py
import numpy as np
import pytest

from beamhub.hub.commands.source import start_replay_source
from beamhub.streaming.replay import ReplayError, ReplaySource


@pytest.fixture
def stack() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 60000, size=(6, 48, 40), dtype=np.uint16)


@pytest.fixture
def npy_file(tmp_path, stack):
    path = tmp_path / "run7.npy"
    np.save(path, stack)
    return path


@pytest.fixture
def h5_file(tmp_path, stack):
    path = tmp_path / "run7.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("/entry/data", data=stack.astype(np.float32))
        f.create_dataset("/entry/mask", data=np.ones((48, 40), dtype=np.uint8))
    return path


def wait_finished(src, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = src.runner.status()
        if status["finished"]:
            return status
        time.sleep(0.02)  # polling a state with a deadline
    raise TimeoutError("the replay did not finish")


def test_npy_replay_sends_the_files_frames_in_order(npy_file, stack, receiver):
    src = start_replay_source(str(npy_file), receiver.endpoint, "replay", rate_hz=200.0)
    try:
        frames = [receiver.recv() for _ in range(len(stack))]
        status = wait_finished(src)
    finally:
        src.stop()
    assert [f.header.seq for f in frames] == list(range(6))
    for i, f in enumerate(frames):
        assert f.header.dtype == "<u2" and f.header.shape == (48, 40)
        assert np.array_equal(f.data, stack[i])
        assert f.header.meta["index"] == i and f.header.meta["file"] == "run7.npy"
    assert status["running"] is False and status["seq"] == 6
    assert not receiver.sock.poll(200)  # no seventh frame without --loop


def test_hdf5_replay_loops_and_restarts_from_the_first_frame(h5_file, stack, receiver):
    src = start_replay_source(
        str(h5_file), receiver.endpoint, "replay", dataset="/entry/data", rate_hz=300.0, loop=True
    )
    try:
        frames = [receiver.recv() for _ in range(15)]
        src.runner.stop_run()
        status = src.runner.status()
        # a new run replays from frame 0, and seq continues
        while receiver.sock.poll(300):
            frames.append(receiver.recv())
        src.runner.start_run()
        again = receiver.recv()
    finally:
        src.stop()
    assert [f.header.meta["index"] for f in frames[:15]] == [i % 6 for i in range(15)]
    assert [f.header.meta["loop"] for f in frames[:15]] == [i // 6 for i in range(15)]
    for f in frames[:15]:
        assert np.array_equal(f.data, stack[f.header.meta["index"]].astype(np.float32))
    assert again.header.meta["index"] == 0 and again.header.run == 2
    assert again.header.seq == status["seq"]


def test_hdf5_single_3d_dataset_is_found_without_naming_it(h5_file):
    src = ReplaySource(h5_file)
    try:
        assert src.dataset == "/entry/data" and src.n_frames == 6
    finally:
        src.close()


def test_bad_files_get_clear_errors(tmp_path, h5_file, npy_file):
    with pytest.raises(ReplayError, match=r"/entry/nothing.*not found.*/entry/data"):
        ReplaySource(h5_file, "/entry/nothing")
    with pytest.raises(ReplayError, match=r"ndim 2.*3-D stack"):
        ReplaySource(h5_file, "/entry/mask")
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((4, 4)))
    with pytest.raises(ReplayError, match="ndim 2"):
        ReplaySource(flat)
    with pytest.raises(ReplayError, match="no such file"):
        ReplaySource(tmp_path / "missing.npy")
    with pytest.raises(ReplayError, match="HDF5 files only"):
        ReplaySource(npy_file, "/entry/data")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(ReplayError, match="neither"):
        ReplaySource(junk)
    bools = tmp_path / "bools.npy"
    np.save(bools, np.zeros((2, 4, 4), dtype=bool))
    with pytest.raises(ReplayError, match="plain numeric"):
        ReplaySource(bools)
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 4, 4), dtype=np.float32))
    with pytest.raises(ReplayError, match="no frames"):
        ReplaySource(empty)
    two = tmp_path / "two.h5"
    with h5py.File(two, "w") as f:
        f["a"] = np.zeros((2, 4, 4))
        f["b"] = np.zeros((2, 4, 4))
    with pytest.raises(ReplayError, match=r"name the dataset with --dataset.*/a, /b"):
        ReplaySource(two)
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([[[1]], [[None]]], dtype=object), allow_pickle=True)
    with pytest.raises(ReplayError, match="not a plain NumPy array"):
        ReplaySource(objects)


def _beamhub(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "beamhub.hub.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _read_until(proc: subprocess.Popen, pattern: str, timeout: float = 30.0) -> re.Match:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"{pattern!r} not printed; output: {''.join(seen)}")


@pytest.mark.timeout(90)
def test_beamhub_source_replay_command_streams_and_stops_on_sigterm(npy_file, stack, receiver):
    proc = _beamhub(
        "source",
        "replay",
        str(npy_file),
        "--connect",
        receiver.endpoint,
        "--rate",
        "100",
        "--loop",
        "--run",
        "--status-every",
        "0.2",
    )
    try:
        _read_until(proc, r"sending to " + re.escape(receiver.endpoint))
        url = _read_until(proc, r"control endpoint: (http://127\.0\.0\.1:\d+)").group(1)
        frames = [receiver.recv(20.0) for _ in range(8)]
        with urllib.request.urlopen(f"{url}/params", timeout=10) as resp:
            status = json.load(resp)
        _read_until(proc, r"run 1 running \| sent \d+ frames")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "source stopped" in out
    assert [f.header.meta["index"] for f in frames] == [i % 6 for i in range(8)]
    assert np.array_equal(frames[7].data, stack[1])
    assert status["kind"] == "replay" and status["values"]["loop"] is True


def test_beamhub_source_replay_command_refuses_a_missing_dataset(h5_file):
    proc = _beamhub(
        "source", "replay", str(h5_file), "--dataset", "/nope", "--bind", "tcp://127.0.0.1:0"
    )
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "'/nope' not found" in err and "/entry/data" in err
