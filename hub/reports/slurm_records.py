"""SLURM's job records for the allocation report, from its accounting (``sacct``), else beamhub's own.

``sacct --duplicates`` lists each run of a requeued job as its own record (state ``REQUEUED`` or
``PREEMPTED``), so the work lost to preemption is counted as on the local backend. The project and
tier come from beamhub's ``--comment`` (stored where slurmdbd has ``AccountingStoreFlags=
job_comment``), else the partition names the tier and the project is unknown. Without accounting
(``AccountingStorageType=accounting_storage/none``, as in the test cluster) sacct has nothing to
say; then the SLURM backend's own records are read (:mod:`beamhub.kernels.job_records`: what its
polls saw of the jobs beamhub submitted, so runs are as precise as the poll interval).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from beamhub.hub.reports.records import JobRecord, RunRecord
from beamhub.kernels.job_records import JobRecords
from beamhub.kernels.scheduler import SchedulerError
from beamhub.kernels.slurm_text import parse_comment

__all__ = ["SACCT_FORMAT", "own_records", "parse_runs", "slurm_records"]

SACCT_FORMAT = "JobIDRaw,State,Submit,Start,End,NNodes,Partition,Comment"
_LOST = {"REQUEUED": "requeued", "PREEMPTED": "preempted"}


def _time(text: str) -> float | None:
    text = text.strip()
    if not text or text in {"N/A", "Unknown", "None", "(null)"}:
        return None
    return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


def parse_runs(text: str, now: float) -> list[JobRecord]:
    """``sacct -X -D -P -n -o SACCT_FORMAT`` output → one JobRecord per job, one run per row."""
    jobs: dict[str, dict] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|", 7)
        if len(parts) != 8:
            raise SchedulerError(f"cannot parse sacct line {line!r}", status=503)
        job_id, state, submit, start, end, nnodes, partition, comment = parts
        fields = parse_comment(comment)
        job = jobs.setdefault(
            job_id,
            {
                "project": fields.get("project", "?"),
                "tier": fields.get("tier", partition),
                "submit": _time(submit),
                "runs": [],
            },
        )
        begun = _time(start)
        if begun is None:
            continue
        word = state.strip().split(" ", 1)[0].rstrip("+").upper()
        ended = _time(end)
        outcome = _LOST.get(word, "running" if ended is None else word.lower())
        nodes = int(nnodes) if nnodes.strip().isdigit() else 1
        job["runs"].append(RunRecord(begun, ended or now, nodes, outcome))
        if job["submit"] is None or (_time(submit) or now) < job["submit"]:
            job["submit"] = _time(submit)
    records = []
    for jid, j in jobs.items():
        runs = sorted(j["runs"], key=lambda r: r.start)
        runs = [  # a preempted run that another run of the job follows was requeued
            RunRecord(r.start, r.end, r.nodes, "requeued")
            if r.preempted and i < len(runs) - 1
            else r
            for i, r in enumerate(runs)
        ]
        records.append(JobRecord(jid, j["project"], j["tier"], j["submit"], tuple(runs)))
    return records


def own_records(path: Path) -> list[JobRecord]:
    """The SLURM backend's own records of its jobs and their runs."""
    return [
        JobRecord(
            j.job_id,
            j.project,
            j.tier,
            j.submit,
            tuple(RunRecord(r.start, r.end, r.nodes, r.outcome) for r in j.runs),
        )
        for j in JobRecords(path).load()
    ]


def slurm_records(
    since: float, now: float, own: Path | None = None
) -> tuple[list[JobRecord], int | None, str]:
    """The jobs SLURM accounted for since ``since``, the cluster's node count, and the source;
    without accounting, the backend's records at ``own`` if there are any."""
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since))
    argv = ["sacct", "-a", "-X", "-D", "-P", "-n", "-S", start, "-E", "now", "-o", SACCT_FORMAT]
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, env=dict(os.environ), check=False
        )
    except FileNotFoundError as exc:
        raise SchedulerError("sacct is not installed; install slurm-client", status=503) from exc
    nodes = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=60, check=False
    )
    count = len(set(nodes.stdout.split())) if nodes.returncode == 0 else None
    if out.returncode == 0 and "accounting storage is disabled" not in out.stderr.lower():
        return parse_runs(out.stdout, now), count, "SLURM accounting (sacct --duplicates)"
    why = out.stderr.strip() or f"exit status {out.returncode}"
    if own is not None and own.exists():
        source = f"beamhub's own job records ({own}; SLURM accounting does not answer: {why})"
        return own_records(own), count, source
    raise SchedulerError(
        f"SLURM accounting does not answer (sacct: {why}) and beamhub has no records of its "
        f"own at {own}; run slurmdbd (AccountingStorageType=accounting_storage/slurmdbd), or "
        "give the state folder of the `beamhub up` that submitted the jobs (--state-dir)",
        status=503,
    )
