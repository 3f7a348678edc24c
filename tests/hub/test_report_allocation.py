"""`beamhub report allocation --json` on a run with known answers: a beamtime window on a
2-node local backend, batch work of another project backfilling it, one preemption.

The expected numbers are computed here from the backend's own database rows (jobs and runs), with
plain per-run arithmetic (not the report's sweep), and the percentiles with numpy.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from beamhub.kernels.local import LocalBackend
from beamhub.kernels.projects import ProjectDirectory
from beamhub.kernels.reservations import ReservationBook
from beamhub.kernels.scheduler import JobSpec, JobState
from beamhub.kernels.tier_policy import TierPolicy
from beamhub.kernels.tiers import DEFAULT_TIERS
from tests.hub.hubstack import BEAMHUB

DONE = {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.PREEMPTED}
NODES = 2


def sleeper(seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import time; time.sleep({seconds})"]


def job(project: str, user: str, tier: str, seconds: float) -> JobSpec:
    return JobSpec(
        name=f"{tier}-{project}", project=project, user=user, tier=tier, argv=sleeper(seconds)
    )


async def beamtime_run(folder: Path) -> tuple[float, float]:
    """Two batch jobs of chem02 fill both nodes; lcls01's window opens, its beamtime job
    preempts one (requeued), then an interactive job of lcls01 queues. Returns the window."""
    projects = ProjectDirectory.from_dict(
        {
            "projects": {
                "lcls01": {"tiers": ["interactive", "batch"], "members": ["alice"]},
                "chem02": {"tiers": ["batch"], "members": ["carol"]},
            }
        }
    )
    book = ReservationBook(folder / "reservations.sqlite", admins={"root"})
    t0 = time.time()
    start, end = t0 + 1.0, t0 + 5.0
    book.approve(book.request("lcls01", start, end, "beamtime", "SFX", "alice"), "root")
    backend = LocalBackend(
        folder / "local-jobs.sqlite",
        nodes=NODES,
        policy=TierPolicy(DEFAULT_TIERS, projects, book),
        poll_interval=0.05,
    )
    try:
        batch = [await backend.submit(job("chem02", "carol", "batch", 3.0)) for _ in range(2)]
        for b in batch:
            await backend.wait(b, {JobState.RUNNING}, timeout=10)
        await asyncio.sleep(max(0.0, start + 0.3 - time.time()))
        beam = await backend.submit(job("lcls01", "alice", "beamtime", 1.5))
        await backend.wait(beam, {JobState.RUNNING}, timeout=10)
        inter = await backend.submit(job("lcls01", "alice", "interactive", 0.5))
        for j in (*batch, beam, inter):
            info = await backend.wait(j, DONE, timeout=30)
            assert info.state is JobState.COMPLETED, (j, info.reason)
        assert (await backend.status([batch[1]]))[batch[1]].requeues == 1
    finally:
        await backend.close(cancel_jobs=True)
    return start, end


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


@pytest.mark.timeout(60)
def test_allocation_report_counts_a_window_lent_to_batch_and_the_preempted_work(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    folder = state / "scheduler"
    folder.mkdir(parents=True)
    start, end = asyncio.run(beamtime_run(folder))
    config = tmp_path / "beamhub.yaml"
    config.write_text(f"scheduler:\n  nodes: {NODES}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEAMHUB_SCHEDULER")}
    out = subprocess.run(
        [BEAMHUB, "report", "--state-dir", str(state), "--config", str(config), "allocation",
         "--since", "1h", "--json", "--html", str(tmp_path / "alloc.html")],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert "beamhub's own job records" in report["source"]

    with sqlite3.connect(folder / "local-jobs.sqlite") as db:
        jobs = {
            seq: (json.loads(spec), submit)
            for seq, spec, submit in db.execute("SELECT seq, spec, submit_time FROM jobs")
        }
        runs = db.execute("SELECT seq, start, end, nodes, outcome FROM runs").fetchall()
    assert len(runs) == 5  # 2 batch + 1 requeued batch rerun + beamtime + interactive
    project = {seq: spec["project"] for seq, (spec, _) in jobs.items()}
    tier = {seq: spec["tier"] for seq, (spec, _) in jobs.items()}

    used = sum(
        overlap(s, e, start, end) * len(n.split(","))
        for seq, s, e, n, _ in runs
        if project[seq] == "lcls01"
    )
    lent = sum(
        overlap(s, e, start, end) * len(n.split(","))
        for seq, s, e, n, _ in runs
        if project[seq] != "lcls01"
    )
    reserved = NODES * (end - start)  # beamtime may hold 4 nodes; the cluster has 2
    lost = [(s, e) for seq, s, e, _, outcome in runs if outcome == "requeued"]
    assert len(lost) == 1

    (window,) = report["windows"]
    assert window["project"] == "lcls01" and window["reserved_nodes"] == NODES
    assert window["reserved_node_hours"] == pytest.approx(reserved / 3600, abs=1e-5)
    assert window["used_node_hours"] == pytest.approx(used / 3600, abs=1e-5)
    assert window["lent_node_hours"] == pytest.approx(lent / 3600, abs=1e-5)
    assert window["lent_by_tier"] == {"batch": pytest.approx(lent / 3600, abs=1e-5)}
    idle = (reserved - used - lent) / 3600
    assert window["idle_node_hours"] == pytest.approx(idle, abs=1e-5)
    assert 0 < window["idle_node_hours"] < window["reserved_node_hours"]
    lost_h = sum(e - s for s, e in lost) / 3600
    assert window["preempted_runs"] == window["requeued_runs"] == 1
    assert window["preempted_node_hours"] == pytest.approx(lost_h, abs=1e-5)
    assert window["requeued_node_hours"] == pytest.approx(lost_h, abs=1e-5)
    assert report["preemption"]["requeued_node_hours"] == pytest.approx(lost_h, abs=1e-5)

    usage = {(u["project"], u["tier"]): u["node_hours"] for u in report["usage"]}
    expected_usage: dict[tuple[str, str], float] = {}
    for seq, s, e, n, _ in runs:
        key = (project[seq], tier[seq])
        expected_usage[key] = expected_usage.get(key, 0.0) + (e - s) * len(n.split(",")) / 3600
    assert usage == {k: pytest.approx(v, abs=1e-5) for k, v in expected_usage.items()}

    first_start: dict[int, float] = {}
    for seq, s, *_ in runs:
        first_start[seq] = min(s, first_start.get(seq, s))
    waits: dict[str, list[float]] = {}
    for seq, (spec, submit) in jobs.items():
        waits.setdefault(spec["tier"], []).append(first_start[seq] - submit)
    assert set(report["time_to_start"]) == set(waits) == {"batch", "beamtime", "interactive"}
    for name, values in waits.items():
        got = report["time_to_start"][name]
        assert got["jobs"] == len(values)
        for p in (50, 90, 99):
            want = float(np.percentile(values, p, method="inverted_cdf"))
            assert got[f"p{p}_s"] == pytest.approx(want, abs=1e-3)
    # the interactive job waited for a node: lcls01's beamtime job had the one batch left
    assert report["time_to_start"]["interactive"]["p50_s"] > 0.5

    page = (tmp_path / "alloc.html").read_text()
    assert "Bokeh" in page and "beamhub allocation report" in page and "cdn.bokeh" not in page
