"""The allocation report's SLURM path: sacct's records of requeued jobs (parsed from sacct's own
``--parsable2`` format), and against the real test cluster, which runs without accounting, the
SLURM backend's own records of a window, batch backfill and a preemption (or, with none, a
refusal that says so)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from beamhub.hub.reports.slurm_records import parse_runs
from beamhub.kernels.projects import ProjectDirectory
from beamhub.kernels.reservations import ReservationBook
from beamhub.kernels.scheduler import JobSpec, JobState
from beamhub.kernels.slurm import SlurmBackend
from beamhub.kernels.tier_policy import TierPolicy
from beamhub.kernels.tiers import DEFAULT_TIERS
from tests.hub.hubstack import BEAMHUB

DONE = {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.PREEMPTED}

# sacct -a -X -D -P -n -o JobIDRaw,State,Submit,Start,End,NNodes,Partition,Comment
SACCT = """\
41|PREEMPTED|2026-12-02T10:00:00|2026-12-02T10:00:05|2026-12-02T10:20:05|2|batch|beamhub project=chem02 user=carol tier=batch
41|COMPLETED|2026-12-02T10:00:00|2026-12-02T10:40:00|2026-12-02T11:10:00|2|batch|beamhub project=chem02 user=carol tier=batch
42|COMPLETED|2026-12-02T10:20:00|2026-12-02T10:20:04|2026-12-02T10:39:04|1|beamtime|beamhub project=lcls01 user=alice tier=beamtime
43|PREEMPTED|2026-12-02T10:01:00|2026-12-02T10:01:00|2026-12-02T10:20:00|1|batch|
44|PENDING|2026-12-02T11:00:00|Unknown|Unknown|1|batch|beamhub project=chem02 user=carol tier=batch
45|RUNNING|2026-12-02T11:00:00|2026-12-02T11:00:30|Unknown|1|normal|beamhub project=chem02 user=carol tier=normal
"""


def _t(text: str) -> float:
    return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


def test_sacct_duplicates_become_runs_with_the_lost_ones_marked() -> None:
    now = _t("2026-12-02T11:10:30")
    jobs = {j.job_id: j for j in parse_runs(SACCT, now)}
    assert set(jobs) == {"41", "42", "43", "44", "45"}
    requeued, rerun = jobs["41"].runs
    assert (jobs["41"].project, jobs["41"].tier) == ("chem02", "batch")
    assert requeued.outcome == "requeued" and requeued.nodes == 2
    assert requeued.end - requeued.start == 20 * 60
    assert rerun.outcome == "completed" and rerun.end - rerun.start == 30 * 60
    assert jobs["41"].first_start - jobs["41"].submit == 5
    # a job beamhub did not submit: the partition names the tier, the project is unknown
    assert (jobs["43"].project, jobs["43"].tier) == ("?", "batch")
    assert [r.outcome for r in jobs["43"].runs] == ["preempted"]  # never ran again: cancelled
    assert jobs["44"].runs == ()  # still pending
    (running,) = jobs["45"].runs
    assert running.outcome == "running" and running.end == now


def _report(conf: Path, state: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEAMHUB_SCHEDULER")}
    env["SLURM_CONF"] = str(conf)
    return subprocess.run(
        [BEAMHUB, "report", "--state-dir", str(state), "allocation", "--backend", "slurm",
         "--since", "1h", "--json"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


def test_without_accounting_or_records_the_report_says_so(slurm_cluster, tmp_path) -> None:
    out = _report(slurm_cluster.conf, tmp_path / "state")
    assert out.returncode == 2, out.stdout
    assert "SLURM accounting does not answer" in out.stderr
    assert "beamhub has no records of its own" in out.stderr


def _sleep(seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import time; time.sleep({seconds})"]


async def _window_run(conf: Path, folder: Path) -> list[str]:
    """4 batch jobs of chem02 on the 4 nodes; lcls01's open window; its beamtime job preempts
    one (requeued by SLURM, which runs it again after cred_expire)."""
    projects = ProjectDirectory.from_dict(
        {
            "projects": {
                "lcls01": {"tiers": ["interactive"], "members": ["alice"]},
                "chem02": {"tiers": ["batch"], "members": ["carol"]},
            }
        }
    )
    book = ReservationBook(folder / "reservations.sqlite", admins={"root"})
    now = time.time()
    book.approve(book.request("lcls01", now - 30, now + 3600, "beamtime", "SFX", "alice"), "root")
    backend = SlurmBackend(
        TierPolicy(DEFAULT_TIERS, projects, book),
        slurm_conf=conf,
        log_dir=folder / "out",
        poll_interval=0.2,
        records_path=folder / "slurm-jobs.sqlite",
    )
    try:
        batch = []
        for _ in range(4):
            spec = JobSpec("b", "chem02", "carol", "batch", _sleep(4), mem_mb=400, walltime_s=300)
            batch.append(await backend.submit(spec))
        for job_id in batch:
            await backend.wait(job_id, {JobState.RUNNING}, timeout=30)
        await asyncio.sleep(1)
        spec = JobSpec("beam", "lcls01", "alice", "beamtime", _sleep(2), mem_mb=400, walltime_s=300)
        beam = await backend.submit(spec)
        ids = [*batch, beam]
        for job_id in ids:
            assert (await backend.wait(job_id, DONE, timeout=90)).state is JobState.COMPLETED
        await asyncio.sleep(3 * backend.poll_interval)  # the last poll has recorded the ends
    finally:
        await backend.close()
    return ids


@pytest.mark.timeout(180)
def test_without_accounting_the_backends_own_records_count_the_window(slurm_cluster, tmp_path):
    state = tmp_path / "state"
    folder = state / "scheduler"
    folder.mkdir(parents=True)
    asyncio.run(_window_run(slurm_cluster.conf, folder))
    out = _report(slurm_cluster.conf, state)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["source"].startswith("beamhub's own job records")
    assert "SLURM accounting does not answer" in report["source"]

    with sqlite3.connect(folder / "slurm-jobs.sqlite") as db:
        project = dict(db.execute("SELECT job_id, project FROM jobs"))
        runs = db.execute("SELECT job_id, start, end, nodes, outcome FROM runs").fetchall()
    assert sorted(outcome for *_, outcome in runs) == ["completed"] * 5 + ["requeued"]
    (window,) = report["windows"]
    start, end = window["counted_from"], window["counted_to"]
    assert end == report["until"]  # the window is still open

    # SLURM dates runs to the second, so two runs on one node may seem to overlap by up to a
    # second; the report counts at most the reserved nodes at any moment, and so does this
    # sampling of the window every millisecond
    cap, step = slurm_cluster.nodes, 0.001
    used = lent = 0.0
    first = max(start, min(s for _, s, *_ in runs))
    for i in range(int((min(end, max(e for _, _, e, *_ in runs)) - first) / step) + 1):
        t = first + (i + 0.5) * step
        here = [(project[job], n) for job, s, e, n, _ in runs if s <= t < e]
        mine = min(cap, sum(n for p, n in here if p == "lcls01"))
        used += mine * step
        lent += min(cap - mine, sum(n for p, n in here if p != "lcls01")) * step
    assert window["reserved_nodes"] == slurm_cluster.nodes
    reserved = slurm_cluster.nodes * (end - start)
    assert window["reserved_node_hours"] == pytest.approx(reserved / 3600, abs=1e-5)
    assert window["used_node_hours"] == pytest.approx(used / 3600, abs=5e-6)
    assert window["lent_node_hours"] == pytest.approx(lent / 3600, abs=5e-6)
    assert window["idle_node_hours"] == pytest.approx((reserved - used - lent) / 3600, abs=1e-5)
    (lost,) = [(s, e) for _, s, e, _, outcome in runs if outcome == "requeued"]
    assert window["requeued_node_hours"] == pytest.approx((lost[1] - lost[0]) / 3600, abs=1e-5)
    assert 0 < lost[1] - lost[0] < 4  # stopped before its 4 s of work were done
    assert report["time_to_start"]["beamtime"]["jobs"] == 1
