"""Job records for the reports, the same shape whichever backend ran the jobs.

A :class:`JobRecord` is one job and the runs it had: a job requeued after a preemption ran more
than once, and the node-hours of a preempted run are work lost. The local backend keeps every
ended run in its database (``runs``, :mod:`beamhub.kernels.local_store`); SLURM's accounting
(``sacct``) keeps one row per job with its last run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from beamhub.kernels.local_store import LocalJobStore
from beamhub.kernels.scheduler import JobState

__all__ = ["JobRecord", "RunRecord", "local_records"]


@dataclass(frozen=True)
class RunRecord:
    """One run of a job: [start, end) on ``nodes`` nodes. ``outcome``: ``requeued``,
    ``preempted`` (not requeued), a terminal state, or ``running`` (``end`` is the report's now)."""

    start: float
    end: float
    nodes: int
    outcome: str

    @property
    def preempted(self) -> bool:
        return self.outcome in ("requeued", "preempted")


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    project: str
    tier: str
    submit: float | None
    runs: tuple[RunRecord, ...] = field(default_factory=tuple)

    @property
    def first_start(self) -> float | None:
        return min((r.start for r in self.runs), default=None)


def local_records(db_path: str | Path, now: float | None = None) -> list[JobRecord]:
    """The local backend's jobs and runs, read from its database (read-only use)."""
    now = time.time() if now is None else now
    store = LocalJobStore(db_path)
    runs: dict[int, list[RunRecord]] = {}
    for run in store.runs():
        runs.setdefault(run.seq, []).append(
            RunRecord(run.start, run.end, len(run.nodes), run.outcome)
        )
    records = []
    for job in store.load():
        mine = runs.get(job.seq, [])
        if job.state is JobState.RUNNING and job.start_time is not None:
            mine.append(RunRecord(job.start_time, now, len(job.nodes), "running"))
        elif not mine and job.start_time is not None and job.end_time is not None:
            # a job that ended before runs were recorded: its one known run
            mine.append(RunRecord(job.start_time, job.end_time, len(job.nodes), job.state.value))
        records.append(
            JobRecord(job.job_id, job.spec.project, job.spec.tier, job.submit_time, tuple(mine))
        )
    return records
