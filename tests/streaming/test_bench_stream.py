"""`beamhub bench stream --quick`: the benchmark's code paths run and its JSON has the agreed shape."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.timeout(120)
def test_bench_stream_quick_json_shape():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "beamhub.hub.cli",
            "bench",
            "stream",
            "--quick",
            "--repeats",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = {(r["path"], r["frame_bytes"]): r for r in result["results"]}
    sizes = (1 << 10, 64 << 10, 4 << 20)
    assert set(rows) == {(p, s) for p in ("direct", "proxy", "l4", "l7", "file") for s in sizes} | {
        ("proxy_batch", 1024),
        ("l7_batch", 1024),
    }
    for (path, size), row in rows.items():
        assert row["gb_per_s"] > 0 and row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"]
        assert row["msg_per_s"] == pytest.approx(row["gb_per_s"] * 1e9 / size, rel=0.01)
        assert row["lost"] == 0, row  # the work stream is lossless on every path
        assert row["batch"] == (64 if path.endswith("_batch") else 1)
        if path in ("proxy", "l4", "l7", "proxy_batch", "l7_batch"):
            assert row["dsn_cpu_s_per_gb"] is not None and row["dsn_cpu_s_per_gb"] >= 0
            assert row["dsn_cpu_us_per_msg"] is not None and row["dsn_cpu_us_per_msg"] >= 0
        else:
            assert row["dsn_cpu_s_per_gb"] is None
    for size in sizes:
        assert f"l7_vs_proxy_{size}" in result["ratios"]
    assert result["ratios"]["l7_batch_vs_proxy_1024"] > 0
    assert result["load_avg_1m"]["max"] >= result["load_avg_1m"]["min"] >= 0


@pytest.mark.timeout(120)
def test_bench_stream_binary_headers_pass_every_zmq_path():
    proc = subprocess.run(
        [sys.executable, "-m", "beamhub.hub.cli", "bench", "stream", "--quick", "--repeats", "1",
         "--json", "--header", "binary", "--sizes", "1024", "--paths", "direct,proxy,l7,l7_batch"],
        capture_output=True,
        text=True,
        timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["header"] == "binary"
    rows = {r["path"]: r for r in result["results"]}
    assert set(rows) == {"direct", "proxy", "l7", "l7_batch"}
    for row in rows.values():
        # every event arrived in order (the consumer read seq/batch from the binary layout)
        assert row["lost"] == 0 and row["msg_per_s"] > 0, row
    assert rows["l7_batch"]["batch"] == 64 and rows["l7"]["dsn_cpu_us_per_msg"] > 0


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--paths", "carrier-pigeon"], "carrier-pigeon"),
        (["--sizes", "1023"], "--sizes"),
        (["--header", "xml"], "--header"),
    ],
)
def test_bench_refuses_bad_arguments(args, named):
    proc = subprocess.run(
        [sys.executable, "-m", "beamhub.hub.cli", "bench", "stream", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and named in proc.stderr
