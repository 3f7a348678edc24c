"""The local backend's job table in SQLite, so a restarted scheduler finds its jobs again."""

from __future__ import annotations

import json
import sqlite3
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from beamhub.kernels.scheduler import JobInfo, JobSpec, JobState
from beamhub.kernels.sqlite_db import open_book, transaction

__all__ = ["LocalJob", "LocalJobStore", "Run"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,
    spec TEXT NOT NULL,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    nodes TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    submit_time REAL,
    start_time REAL,
    end_time REAL,
    exit_code INTEGER,
    requeues INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    pid_ctime REAL,
    output TEXT
);
-- one row per ended run of a job: a requeued job runs more than once, and what a preempted run
-- used is lost work the allocation report counts (beamhub report allocation)
CREATE TABLE IF NOT EXISTS runs (
    seq INTEGER NOT NULL,
    run INTEGER NOT NULL,
    start REAL NOT NULL,
    end REAL NOT NULL,
    nodes TEXT NOT NULL,
    outcome TEXT NOT NULL,
    PRIMARY KEY (seq, run)
);
"""


@dataclass(frozen=True)
class Run:
    """One ended run of a job on its nodes; ``outcome`` is the job's state after it, or
    ``requeued`` for a preempted run whose job went back to the queue."""

    seq: int
    run: int
    start: float
    end: float
    nodes: tuple[str, ...]
    outcome: str


@dataclass
class LocalJob:
    """One job of the local backend: its public info plus what the backend needs to run it."""

    seq: int
    spec: JobSpec
    priority: int
    state: JobState = JobState.PENDING
    nodes: list[str] = field(default_factory=list)
    reason: str = ""
    submit_time: float | None = None
    start_time: float | None = None
    end_time: float | None = None
    exit_code: int | None = None
    requeues: int = 0
    pid: int | None = None
    pid_ctime: float | None = None
    output: str | None = None
    # runtime only (not persisted)
    popen: object | None = None
    kill_reason: str | None = None  # preempt | cancel | walltime
    kill_deadline: float | None = None  # monotonic time of the SIGKILL
    killed: bool = False
    preempted_by: str | None = None
    reserved: list[str] = field(default_factory=list)  # nodes held for this pending job

    @property
    def job_id(self) -> str:
        return str(self.seq)

    def info(self) -> JobInfo:
        return JobInfo(
            job_id=self.job_id,
            spec=self.spec,
            state=self.state,
            node=",".join(self.nodes) or None,
            reason=self.reason,
            submit_time=self.submit_time,
            start_time=self.start_time,
            end_time=self.end_time,
            exit_code=self.exit_code,
            requeues=self.requeues,
        )


class LocalJobStore:
    """Upserts and loads LocalJob rows; one short connection per call (safe across processes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = open_book(path, _SCHEMA, private=True)

    def _db(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self.path)

    def next_seq(self) -> int:
        with self._db() as conn:
            row = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()
        return int(row[0]) + 1

    def save(self, job: LocalJob) -> None:
        with self._db() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO jobs (seq, spec, priority, state, nodes, reason, "
                "submit_time, start_time, end_time, exit_code, requeues, pid, pid_ctime, output) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.seq,
                    json.dumps(job.spec.to_dict()),
                    job.priority,
                    job.state.value,
                    ",".join(job.nodes),
                    job.reason,
                    job.submit_time,
                    job.start_time,
                    job.end_time,
                    job.exit_code,
                    job.requeues,
                    job.pid,
                    job.pid_ctime,
                    job.output,
                ),
            )

    def load(self) -> list[LocalJob]:
        with self._db() as conn:
            rows = conn.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
        return [
            LocalJob(
                seq=r["seq"],
                spec=JobSpec.from_dict(json.loads(r["spec"])),
                priority=r["priority"],
                state=JobState(r["state"]),
                nodes=[n for n in r["nodes"].split(",") if n],
                reason=r["reason"],
                submit_time=r["submit_time"],
                start_time=r["start_time"],
                end_time=r["end_time"],
                exit_code=r["exit_code"],
                requeues=r["requeues"],
                pid=r["pid"],
                pid_ctime=r["pid_ctime"],
                output=r["output"],
            )
            for r in rows
        ]

    def save_run(self, run: Run) -> None:
        with self._db() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO runs (seq, run, start, end, nodes, outcome) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (run.seq, run.run, run.start, run.end, ",".join(run.nodes), run.outcome),
            )

    def runs(self) -> list[Run]:
        with self._db() as conn:
            rows = conn.execute("SELECT * FROM runs ORDER BY seq, run").fetchall()
        return [
            Run(
                r["seq"], r["run"], r["start"], r["end"], tuple(r["nodes"].split(",")), r["outcome"]
            )
            for r in rows
        ]
