"""`beamhub report sla --json` on runs with known answers.

From beamhub's own records: a real Supervisor runs two services, the test kills one (restarted
after its backoff) and stops both; the local backend runs a few queued jobs. From Prometheus: a
real Prometheus scrapes two endpoints of the test, one of which stops answering. Expected numbers
are computed here from the raw records (event lines, job rows, Prometheus' raw samples) and the
test's own clock.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from prometheus_client import CollectorRegistry, Histogram, start_http_server

from beamhub.hub.up.stack import free_port
from beamhub.hub.up.supervisor import ServiceSpec, Supervisor
from beamhub.kernels.local import LocalBackend
from beamhub.kernels.scheduler import JobSpec, JobState
from tests.hub.hubstack import BEAMHUB

DONE = {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.PREEMPTED}


def _report(state: Path, config: Path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEAMHUB_SCHEDULER")}
    out = subprocess.run(
        [BEAMHUB, "report", "--state-dir", str(state), "--config", str(config), "sla", *args,
         "--json"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


async def _supervised(state: Path) -> tuple[float, float]:
    """steady runs throughout; flaky is killed once. Returns the test's own clock readings of
    the kill and of flaky being back."""
    sup = Supervisor(state / "status.json", say=lambda _: None, backoff=(0.5,))
    for name in ("steady", "flaky"):
        await sup.start(
            ServiceSpec(name, [sys.executable, "-c", "import time; time.sleep(60)"],
                        state / f"{name}.log")
        )  # fmt: skip
    await asyncio.sleep(1.0)
    flaky = sup.children["flaky"]
    killed = time.time()
    os.kill(flaky.proc.pid, signal.SIGKILL)
    while flaky.state != "running" or flaky.restarts != 1:
        await asyncio.sleep(0.02)
    back = time.time()
    await asyncio.sleep(1.0)
    await sup.stop()
    return killed, back


async def _queued_jobs(db: Path) -> None:
    """One node, three interactive and two batch jobs of 0.3 s: each waits for the ones before."""
    backend = LocalBackend(db, nodes=1, poll_interval=0.05)
    try:
        sleep = [sys.executable, "-c", "import time; time.sleep(0.3)"]
        ids = [
            await backend.submit(JobSpec(name="q", project="p1", user="alice", tier=t, argv=sleep))
            for t in ("interactive", "batch", "interactive", "batch", "interactive")
        ]
        for job_id in ids:
            assert (await backend.wait(job_id, DONE, timeout=30)).state is JobState.COMPLETED
    finally:
        await backend.close(cancel_jobs=True)


@pytest.mark.timeout(90)
def test_sla_from_beamhubs_own_records(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "scheduler").mkdir(parents=True)
    killed, back = asyncio.run(_supervised(state))
    asyncio.run(_queued_jobs(state / "scheduler" / "local-jobs.sqlite"))
    config = tmp_path / "beamhub.yaml"
    targets = {"uptime_pct": 90.0, "time_to_start_p90_s": {"interactive": 60.0, "batch": 0.05}}
    config.write_text(yaml.safe_dump({"service_levels": targets}))
    report = _report(state, config, "--since", "1h")
    assert "beamhub's own records" in report["sources"]["uptime"]
    assert "service-events.jsonl" in report["sources"]["uptime"]

    lines = [json.loads(line) for line in (state / "service-events.jsonl").read_text().split("\n")
             if line]  # fmt: skip
    flaky = [(e["event"], e["time"]) for e in lines if e["service"] == "flaky"]
    assert [kind for kind, _ in flaky] == ["up", "down", "up", "stop"]
    (_, up1), (_, down), (_, up2), (_, stop) = flaky
    want_down = up2 - down
    want_pct = 100 * ((down - up1) + (stop - up2)) / (stop - up1)
    services = {s["service"]: s for s in report["services"]}
    assert set(services) == {"steady", "flaky"}
    assert services["flaky"]["down_s"] == pytest.approx(want_down, abs=1e-3)
    assert services["flaky"]["uptime_pct"] == pytest.approx(want_pct, abs=1e-3)
    assert services["flaky"]["down_s"] == pytest.approx(back - killed, abs=0.3)  # test's clock
    assert services["flaky"]["down_s"] >= 0.5  # the backoff
    assert services["steady"]["uptime_pct"] == 100.0 and services["steady"]["down_s"] == 0
    assert services["flaky"]["met"] is (want_pct >= 90.0)

    with sqlite3.connect(state / "scheduler" / "local-jobs.sqlite") as db:
        rows = db.execute("SELECT spec, submit_time, start_time FROM jobs").fetchall()
    waits: dict[str, list[float]] = {}
    for spec, submit, start in rows:
        waits.setdefault(json.loads(spec)["tier"], []).append(start - submit)
    starts = report["time_to_start"]
    for tier, values in waits.items():
        p90 = float(np.percentile(values, 90, method="inverted_cdf"))
        assert starts[tier]["jobs"] == len(values)
        assert starts[tier]["p90_s"] == pytest.approx(p90, abs=1e-3)
        assert starts[tier]["met"] is (p90 <= targets["time_to_start_p90_s"][tier])
    assert starts["batch"]["met"] is False  # each batch job waited for at least one 0.3 s job
    assert starts["beamtime"] == {"jobs": 0, "target_p90_s": 60.0, "met": None}
    assert report["met"] is False


needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="Debian package prometheus not installed (apt-get install prometheus)",
)


def _wait(what: str, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout} s")


def _query(url: str, promql: str, **params: str) -> list:
    body = requests.get(url + "api/v1/query", params={"query": promql, **params}, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


@needs_prometheus
@pytest.mark.timeout(90)
def test_sla_from_prometheus(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    starts = Histogram(
        "beamhub_scheduler_time_to_start_seconds", "test", ["tier"],
        buckets=(0.5, 1, 2, 5, 10), registry=registry,
    )  # fmt: skip
    starts.labels("beamtime")  # the series exists (at 0) before any job starts
    always, sometimes, port = free_port(), free_port(), free_port()
    a_server, _ = start_http_server(always, "127.0.0.1", registry)
    b_server, _ = start_http_server(sometimes, "127.0.0.1", CollectorRegistry())
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "always", "static_configs": [{"targets": [f"127.0.0.1:{always}"]}]},
                    {"job_name": "sometimes",
                     "static_configs": [{"targets": [f"127.0.0.1:{sometimes}"]}]},
                ],
            }
        )
    )  # fmt: skip
    with open(tmp_path / "prometheus.log", "wb") as log:
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait("prometheus ready", lambda: _ok(url + "-/ready"))
        _wait(
            "three scrapes of each target",
            lambda: len(
                [r for r in _query(url, "count_over_time(up[1m])") if float(r["value"][1]) >= 3]
            ) == 2,
        )  # fmt: skip
        for seconds in (0.7, 0.8, 3.0):  # buckets: 2 in (0.5, 1], 1 in (2, 5]
            starts.labels("beamtime").observe(seconds)
        time.sleep(3)
        b_server.shutdown()
        b_server.server_close()
        time.sleep(4)
        config = tmp_path / "beamhub.yaml"
        config.write_text(
            yaml.safe_dump({"service_levels": {"uptime_pct": 99.0,
                                               "time_to_start_p90_s": {"beamtime": 5.0}}})
        )  # fmt: skip
        report = _report(tmp_path / "state", config, "--since", "5m", "--prometheus", url)
        span = round(report["until"] - report["since"])
        raw = {
            r["metric"]["job"]: [float(v) for _, v in r["values"]]
            for r in _query(url, f"up[{span}s]", time=f"{report['until']:.3f}")
        }
    finally:
        prom.send_signal(signal.SIGTERM)
        prom.wait(20)
        a_server.shutdown()
        a_server.server_close()
    assert report["sources"]["uptime"].startswith(f"Prometheus {url}")
    services = {s["service"]: s for s in report["services"]}
    assert set(services) == set(raw) == {"always", "sometimes"}
    for job, values in raw.items():
        assert services[job]["uptime_pct"] == pytest.approx(100 * sum(values) / len(values))
        assert services[job]["scrapes"] == len(values)
    assert services["always"]["uptime_pct"] == 100.0 and services["always"]["met"] is True
    assert 0 < services["sometimes"]["uptime_pct"] < 99.0 and services["sometimes"]["met"] is False
    # histogram_quantile interpolates inside the bucket holding the rank (rank = q * 3 jobs):
    # p50: rank 1.5 of 2 in (0.5, 1] -> 0.5 + 0.5 * 1.5 / 2; p90: rank 2.7 -> 2 + 3 * 0.7 / 1
    beam = report["time_to_start"]["beamtime"]
    assert beam["jobs"] == 3
    assert beam["p50_s"] == pytest.approx(0.875, abs=1e-3)
    assert beam["p90_s"] == pytest.approx(4.1, abs=1e-3)
    assert beam["p99_s"] == pytest.approx(4.91, abs=1e-3)
    assert beam["met"] is True and report["met"] is False


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


@pytest.mark.parametrize(
    ("config", "args", "words"),
    [
        ("", ("--since", "3x"), "--since '3x': give a span back from now"),
        (
            "service_levels: {time_to_start_p90_s: {beamtim: 5}}",
            (),
            "service_levels.time_to_start_p90_s.beamtim: no such tier",
        ),
        ("service_levels: {uptime_pct: 120}", (), "service_levels.uptime_pct"),
    ],
)
def test_bad_input_is_refused_naming_what_was_wrong(
    tmp_path: Path, config: str, args: tuple[str, ...], words: str
) -> None:
    path = tmp_path / "beamhub.yaml"
    path.write_text(config + "\n")
    out = subprocess.run(
        [BEAMHUB, "report", "--state-dir", str(tmp_path), "--config", str(path), "sla", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2 and words in out.stderr, out.stderr


def test_nothing_recorded_is_no_data_not_met(tmp_path: Path) -> None:
    """A fresh deployment has no uptime or job record: the report must not claim targets met."""
    config = tmp_path / "beamhub.yaml"
    config.write_text("service_levels: {uptime_pct: 99.5}\n")
    report = _report(tmp_path / "state", config, "--since", "7d", "--no-prometheus")
    assert report["services"] == [] and report["met"] is None
    assert all(t["met"] is None for t in report["time_to_start"].values())
    text = subprocess.run(
        [BEAMHUB, "report", "--state-dir", str(tmp_path / "state"), "--config", str(config),
         "sla", "--since", "7d", "--no-prometheus"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "no data: nothing recorded" in text and "targets met" not in text
