"""The one scheduler contract that the spawner, Dask-on-allocation and the CLI code against."""

from __future__ import annotations

import abc
import asyncio
import enum
import os
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any

__all__ = [
    "OUTPUT_TAIL_BYTES",
    "SUBMIT_FIELDS",
    "TERMINAL_STATES",
    "EventHub",
    "JobInfo",
    "JobOutput",
    "JobSpec",
    "JobState",
    "Scheduler",
    "SchedulerError",
    "read_tail",
]

#: The most of a job's output one call returns: its last 64 KiB (the file may be any size).
OUTPUT_TAIL_BYTES = 64 * 1024


class JobState(enum.Enum):
    """Where a job is. Kept apart on purpose: completed, failed and unknown never look alike."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    PREEMPTED = "preempted"  # preempted and not requeued (terminal)
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"  # the backend lost track of the job (e.g. purged from SLURM's memory)


#: States a job never leaves.
TERMINAL_STATES = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.PREEMPTED, JobState.CANCELLED}
)


class SchedulerError(Exception):
    """A user-facing error: the message says what was wrong and what to do.

    ``status`` is the HTTP-style status a front end should answer with (400 bad input,
    403 not allowed, 404 unknown id, 409 conflict, 503 scheduler unavailable).
    """

    def __init__(self, message: str, status: int = 400, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.field = field


@dataclass
class JobSpec:
    """What to run, for whom, at which tier. ``argv`` is a command list, never a shell string."""

    name: str
    project: str
    user: str
    tier: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cpus: int = 1
    mem_mb: int = 512
    nodes: int = 1
    walltime_s: int = 3600
    workdir: str | None = None
    output: str | None = None  # stdout+stderr file, appended to (never truncated) across requeues
    requeue: bool = False  # batch work: requeue on preemption instead of cancel
    reservation: str | None = None  # SLURM only: run inside this `scontrol` reservation

    def validate(self) -> None:
        """Refuse malformed specs with an error naming the field."""
        if not isinstance(self.argv, list | tuple) or not self.argv:
            raise SchedulerError(
                "argv must be a non-empty list of strings (the command), not a shell string",
                field="argv",
            )
        if not all(isinstance(a, str) for a in self.argv):
            raise SchedulerError("argv items must all be strings", field="argv")
        for name in ("name", "project", "user", "tier"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise SchedulerError(f"{name} must be a non-empty string", field=name)
        for name in ("cpus", "mem_mb", "nodes", "walltime_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SchedulerError(
                    f"{name} must be a positive integer, got {value!r}", field=name
                )
        if not isinstance(self.env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.env.items()
        ):
            raise SchedulerError("env must be an object of string keys and values", field="env")
        for name in ("workdir", "output", "reservation"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise SchedulerError(f"{name} must be a string or null, got {value!r}", field=name)
        if not isinstance(self.requeue, bool):
            raise SchedulerError(
                f"requeue must be true or false, got {self.requeue!r}", field="requeue"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        known = cls.__dataclass_fields__
        missing = [
            n
            for n, f in known.items()
            if n not in data and f.default is MISSING and f.default_factory is MISSING
        ]
        if missing:
            raise SchedulerError(f"{missing[0]}: required", field=missing[0])
        return cls(**{k: v for k, v in data.items() if k in known})


#: JobSpec fields a caller of the hub's jobs API may set: the user comes from the caller's
#: credential, and a SLURM ``reservation`` is the admin's to choose.
SUBMIT_FIELDS = frozenset(JobSpec.__dataclass_fields__) - {"user", "reservation"}


@dataclass
class JobInfo:
    """A snapshot of one job as the backend sees it."""

    job_id: str
    spec: JobSpec | None
    state: JobState
    node: str | None = None
    reason: str = ""
    submit_time: float | None = None
    start_time: float | None = None
    end_time: float | None = None
    exit_code: int | None = None
    requeues: int = 0

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobInfo:
        """The inverse of :meth:`to_dict` (a job as an API answered it)."""
        spec = JobSpec.from_dict(data["spec"]) if data.get("spec") else None
        return cls(
            job_id=str(data["job_id"]),
            spec=spec,
            state=JobState(data["state"]),
            node=data.get("node"),
            reason=data.get("reason") or "",
            submit_time=data.get("submit_time"),
            start_time=data.get("start_time"),
            end_time=data.get("end_time"),
            exit_code=data.get("exit_code"),
            requeues=int(data.get("requeues") or 0),
        )


@dataclass(frozen=True)
class JobOutput:
    """The end of a job's output (stdout and stderr): at most :data:`OUTPUT_TAIL_BYTES`."""

    job_id: str
    text: str
    size: int  # bytes in the whole output so far
    truncated: bool  # True when only its last bytes are in ``text``

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobOutput:
        return cls(
            job_id=str(data["job_id"]),
            text=str(data["text"]),
            size=int(data["size"]),
            truncated=bool(data["truncated"]),
        )


def read_tail(
    job_id: str, path: str | os.PathLike, max_bytes: int = OUTPUT_TAIL_BYTES
) -> JobOutput:
    """The last ``max_bytes`` of a job's output file; an empty output if it does not exist yet.

    Opened without following a symbolic link, and only if it is a regular file: the reader may
    be more privileged than the job that wrote it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return JobOutput(job_id, "", 0, False)  # queued, or printed nothing yet
    except OSError as exc:
        raise SchedulerError(
            f"the output of job {job_id} cannot be read ({exc.strerror})", status=409
        ) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SchedulerError(f"the output of job {job_id} is not a regular file", status=409)
        start = max(0, info.st_size - max_bytes)
        data = os.pread(fd, max_bytes, start)
    finally:
        os.close(fd)
    if start:  # do not begin inside a UTF-8 sequence
        cut = next((i for i, b in enumerate(data[:4]) if b & 0xC0 != 0x80), 0)
        data = data[cut:]
    return JobOutput(job_id, data.decode("utf-8", "replace"), info.st_size, start > 0)


class EventHub:
    """Fan-out of scheduler events to any number of ``events()`` subscribers."""

    def __init__(self, maxsize: int = 1000) -> None:
        self._subscribers: list[asyncio.Queue[dict | None]] = []
        self._maxsize = maxsize

    def publish(self, type_: str, job_id: str, **fields: Any) -> dict:
        event = {"type": type_, "job_id": job_id, "time": time.time(), **fields}
        for queue in list(self._subscribers):
            if queue.full():  # a slow subscriber loses its oldest event, never blocks the scheduler
                queue.get_nowait()
            queue.put_nowait(event)
        return event

    async def subscribe(self) -> AsyncIterator[dict]:
        queue: asyncio.Queue[dict | None] = asyncio.Queue(self._maxsize)
        self._subscribers.append(queue)
        try:
            while True:
                event = await queue.get()
                if event is None:
                    return
                yield event
        finally:
            if queue in self._subscribers:
                self._subscribers.remove(queue)

    def close(self) -> None:
        for queue in list(self._subscribers):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)


class Scheduler(abc.ABC):
    """Submit, watch and cancel jobs. Every backend (``local``, ``slurm``) implements this.

    Events are dicts with at least ``type`` and ``job_id``; the types are ``queued``,
    ``preempting`` (``victims``, ``node``, ``message``), ``preempted`` (``by``, ``node``),
    ``requeued``, ``waiting`` (no node free and nothing it may preempt; ``message`` says so),
    ``started`` (``node``, ``message``), ``completed``, ``failed``, ``cancelled``.
    """

    name: str = "abstract"
    #: the hub user → Unix account mapping of a backend that starts processes
    #: (:class:`beamhub.kernels.accounts.AccountMap`); None for a remote one (the hub's API)
    accounts: Any = None

    @abc.abstractmethod
    async def submit(self, spec: JobSpec) -> str:
        """Queue a job; returns its id. Raises SchedulerError for bad or disallowed specs."""

    @abc.abstractmethod
    async def status(self, job_ids: list[str]) -> dict[str, JobInfo]:
        """Batched status (one backend call); unknown ids map to state UNKNOWN."""

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> None:
        """Cancel a job (pending or running). Cancelling a finished job is a no-op."""

    @abc.abstractmethod
    async def list(self, project: str | None = None) -> list[JobInfo]:
        """Jobs the backend knows, optionally only one project's."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[dict]:
        """An async iterator of events from now on; ends when the scheduler closes."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop watching. Running jobs keep running (a restarted scheduler re-attaches)."""

    async def output(self, job_id: str) -> JobOutput:
        """The end of a job's output (:data:`OUTPUT_TAIL_BYTES` at most). Backends that keep
        the output where they can read it override this; the others say where it is."""
        raise SchedulerError(
            f"the {self.name} scheduler does not serve job output; read job {job_id}'s output "
            "file on the cluster (the job's --output)",
            status=404,
            field="job_id",
        )

    async def wait(
        self, job_id: str, states: set[JobState] | frozenset[JobState], timeout: float
    ) -> JobInfo:
        """Poll until the job is in one of ``states``; raises TimeoutError with the last state."""
        deadline = time.monotonic() + timeout
        while True:
            info = (await self.status([job_id]))[job_id]
            if info.state in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {info.state.value} ({info.reason}) after {timeout:.0f} s"
                )
            await asyncio.sleep(0.1)

    async def __aenter__(self) -> Scheduler:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
