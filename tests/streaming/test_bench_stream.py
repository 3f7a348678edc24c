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
    assert set(rows) == {
        (p, s) for p in ("direct", "proxy", "l4", "l7", "file") for s in (4 << 20, 64 << 10)
    }
    for (path, _), row in rows.items():
        assert row["gb_per_s"] > 0 and row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"]
        assert row["lost"] == 0, row  # the work stream is lossless on every path
        if path in ("proxy", "l4", "l7"):
            assert row["dsn_cpu_s_per_gb"] is not None and row["dsn_cpu_s_per_gb"] >= 0
        else:
            assert row["dsn_cpu_s_per_gb"] is None
    assert "l7_vs_proxy_4194304" in result["ratios"]


def test_bench_refuses_unknown_path():
    proc = subprocess.run(
        [sys.executable, "-m", "beamhub.hub.cli", "bench", "stream", "--paths", "carrier-pigeon"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "carrier-pigeon" in proc.stderr
