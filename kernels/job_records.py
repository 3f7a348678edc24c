"""Jobs and each of their runs in SQLite, for a backend that forgets them: SLURM without its
accounting daemon drops a job from squeue minutes after it ends, and a requeued job's earlier
run from the start. The SLURM backend writes here what its polls saw (runs to the poll's
precision); `beamhub report allocation` reads it when ``sacct`` has nothing to say."""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from beamhub.kernels.sqlite_db import open_book, transaction

__all__ = ["JobRecords", "RecordedJob", "RecordedRun"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    tier TEXT NOT NULL,
    submit REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    job_id TEXT NOT NULL,
    start REAL NOT NULL,
    end REAL NOT NULL,
    nodes INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    PRIMARY KEY (job_id, start)
);
"""


@dataclass(frozen=True)
class RecordedRun:
    start: float
    end: float
    nodes: int
    outcome: str  # requeued | a terminal state (completed, failed, cancelled, preempted)


@dataclass(frozen=True)
class RecordedJob:
    job_id: str
    project: str
    tier: str
    submit: float
    runs: tuple[RecordedRun, ...]


class JobRecords:
    """One short connection per call; the file is owner-only like the local backend's."""

    def __init__(self, path: str | Path) -> None:
        self.path = open_book(path, _SCHEMA, private=True)

    def _db(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.path)

    def job(self, job_id: str, project: str, tier: str, submit: float) -> None:
        with self._db() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?)", (job_id, project, tier, submit)
            )

    def run(self, job_id: str, start: float, end: float, nodes: int, outcome: str) -> None:
        with self._db() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?)",
                (job_id, start, max(start, end), nodes, outcome),
            )

    def load(self) -> list[RecordedJob]:
        with self._db() as conn:
            jobs = conn.execute("SELECT * FROM jobs ORDER BY submit").fetchall()
            runs = conn.execute("SELECT * FROM runs ORDER BY start").fetchall()
        by_job: dict[str, list[RecordedRun]] = {}
        for job_id, start, end, nodes, outcome in runs:
            by_job.setdefault(job_id, []).append(RecordedRun(start, end, nodes, outcome))
        return [RecordedJob(j, p, t, s, tuple(by_job.get(j, ()))) for j, p, t, s in jobs]
