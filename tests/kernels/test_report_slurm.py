"""The allocation report's SLURM path: sacct's records of requeued jobs (parsed from sacct's own
``--parsable2`` format), and against the real test cluster, which runs without accounting, a
refusal that says so."""

from __future__ import annotations

import os
import subprocess
import time

from beamhub.hub.reports.slurm_records import parse_runs
from tests.hub.hubstack import BEAMHUB

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


def test_without_slurm_accounting_the_report_says_so(slurm_cluster) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEAMHUB_SCHEDULER")}
    env["SLURM_CONF"] = str(slurm_cluster.conf)
    out = subprocess.run(
        [BEAMHUB, "report", "allocation", "--backend", "slurm", "--since", "1d"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert out.returncode == 2, out.stdout
    assert "SLURM accounting does not answer" in out.stderr
    assert "beamhub keeps no job records of its own for SLURM jobs" in out.stderr
