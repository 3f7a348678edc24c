"""Supervised children of `beamhub up`: each service its own process, restarted with backoff.

A :class:`Supervisor` starts :class:`ServiceSpec` s in order, each only once the one before is
ready, restarts a child that exits unexpectedly (after 0.5, 1, 2, 4 … up to 10 s; the delay goes
back to 0.5 s once a child has run a minute), and stops them in reverse order: SIGTERM to the
child's process group, SIGKILL after its grace period. Every child is born with
``PR_SET_PDEATHSIG``, so even a ``kill -9`` of `beamhub up` leaves no service holding its ports.
The state of every child (pid, restarts, last exit, since when) is written to ``status.json`` in
the state folder after each change, which is what `beamhub status` reads. Each time a child comes
up, goes down unasked or is stopped, a line is appended to ``service-events.jsonl`` beside it: the
durable record `beamhub report sla` computes uptime from when no Prometheus runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from beamhub.hub.up.service_accounts import ServiceUser

__all__ = ["EVENTS_FILE", "Child", "ServiceSpec", "Supervisor", "SupervisorError"]

log = logging.getLogger("beamhub.up")

_PR_SET_PDEATHSIG = 1
try:
    _libc: Any = ctypes.CDLL(None, use_errno=True)
except OSError:  # not Linux: children are still stopped by stop(), just not on a kill -9
    _libc = None

#: service up/down/stop events, one JSON object a line, beside status.json
EVENTS_FILE = "service-events.jsonl"
#: restart delays, seconds; the last repeats
BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0, 10.0)
#: a child that ran this long starts its backoff afresh after its next exit
STABLE_AFTER_S = 60.0


class SupervisorError(RuntimeError):
    """A child failed to start; the message names it and the log to read."""


def _die_with_parent(parent: int) -> Callable[[], None]:
    """preexec_fn: SIGTERM when `beamhub up` dies; exit at once if it is already gone."""

    def preexec() -> None:
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return preexec


@dataclass
class ServiceSpec:
    """How to run one service: command, environment, log, and how to know it is ready."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict, repr=False)  # may hold API tokens
    cwd: Path | None = None
    #: returns True once the service answers (run in a thread); None = ready when started
    ready: Callable[[], bool] | None = None
    ready_timeout: float = 60.0
    stop_timeout: float = 10.0
    #: called (in the supervisor's loop) each time the child is ready again after a restart
    on_restart: Callable[[], Awaitable[None]] | None = None
    #: run as this account (its uid, gid and the state dir's group); None = as we run
    user: ServiceUser | None = None


@dataclass
class Child:
    """One supervised process and its history."""

    spec: ServiceSpec
    proc: subprocess.Popen | None = None
    state: str = "new"  # starting, running, restarting, stopped, failed
    restarts: int = 0
    started_at: float = 0.0
    last_exit: int | None = None
    last_exit_at: float | None = None
    task: asyncio.Task | None = None
    requested: bool = False  # the next exit was asked for (restart()), not a crash

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": self.proc.pid if self.proc is not None and self.proc.poll() is None else None,
            "restarts": self.restarts,
            "since": self.started_at or None,
            "last_exit": self.last_exit,
            "last_exit_at": self.last_exit_at,
            "log": str(self.spec.log_path),
        }


class Supervisor:
    """Start children in order, keep them running, stop them in reverse order."""

    def __init__(
        self,
        status_path: Path,
        say: Callable[[str], None] = print,
        backoff: tuple[float, ...] = BACKOFF,
    ) -> None:
        self.status_path = status_path
        self.say = say
        self.backoff = backoff
        self.children: dict[str, Child] = {}
        self._stopping = False
        self.events_path = status_path.with_name(EVENTS_FILE)

    # --- start --------------------------------------------------------------------------

    async def start(self, spec: ServiceSpec) -> Child:
        """Start ``spec`` and wait until it is ready; then keep it running until stop()."""
        if spec.name in self.children:
            raise SupervisorError(f"{spec.name} is already supervised")
        child = Child(spec)
        self.children[spec.name] = child
        self._spawn(child)
        try:
            await self._wait_ready(child)
        except SupervisorError:
            self._event(child, "down")
            raise
        child.state = "running"
        self._write_status()
        self._event(child, "up")
        child.task = asyncio.create_task(self._keep(child), name=f"keep {spec.name}")
        return child

    def _spawn(self, child: Child) -> None:
        spec = child.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        as_user: dict[str, Any] = {}
        if spec.user is not None:  # root drops to the service's account (and only its groups)
            as_user = {
                "user": spec.user.uid,
                "group": spec.user.gid,
                "extra_groups": [spec.user.group_gid],
            }
        with open(spec.log_path, "ab") as out:
            # Popen from the loop's (main) thread: PDEATHSIG fires when the *thread* that forked
            # the child ends, so a worker thread would kill its children when it finishes.
            child.proc = subprocess.Popen(
                spec.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=spec.cwd,
                env={**os.environ, **spec.env},
                process_group=0,
                preexec_fn=_die_with_parent(os.getpid()),  # runs after the uid change
                **as_user,
            )
        child.state = "starting"
        child.started_at = time.time()
        self._write_status()

    async def _wait_ready(self, child: Child) -> None:
        spec, proc = child.spec, child.proc
        assert proc is not None
        deadline = time.monotonic() + spec.ready_timeout
        while spec.ready is not None:
            if proc.poll() is not None:
                child.state = "failed"
                self._write_status()
                raise SupervisorError(
                    f"{spec.name} exited with status {proc.returncode} while starting; "
                    f"see {spec.log_path}"
                )
            if await asyncio.to_thread(spec.ready):
                return
            if time.monotonic() > deadline:
                raise SupervisorError(
                    f"{spec.name} was not ready within {spec.ready_timeout:.0f} s; "
                    f"see {spec.log_path}"
                )
            await asyncio.sleep(0.1)

    async def _keep(self, child: Child) -> None:
        """Wait for the child to exit; unless stopping, restart it with backoff."""
        attempt = 0
        while True:
            assert child.proc is not None
            while child.proc.poll() is None:
                await asyncio.sleep(0.2)
            if self._stopping or child.state == "stopped":
                return
            code = child.proc.returncode
            child.last_exit, child.last_exit_at = code, time.time()
            if time.time() - child.started_at > STABLE_AFTER_S:
                attempt = 0
            delay = self.backoff[min(attempt, len(self.backoff) - 1)]
            attempt += 1
            child.restarts += 1
            child.state = "restarting"
            self._write_status()
            self._event(child, "down", code)
            how = f"signal {-code}" if code < 0 else f"status {code}"
            if child.requested:
                child.requested, delay = False, 0.0
                self.say(f"beamhub up: restarting {child.spec.name} ({how})")
            else:
                self.say(
                    f"beamhub up: {child.spec.name} exited ({how}); restart #{child.restarts} "
                    f"in {delay:g} s (log: {child.spec.log_path})"
                )
            await asyncio.sleep(delay)
            if self._stopping:
                return
            self._spawn(child)
            try:
                await self._wait_ready(child)
            except SupervisorError as exc:
                self.say(f"beamhub up: {exc}")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.proc.pid, signal.SIGKILL)
                continue
            child.state = "running"
            self._write_status()
            self._event(child, "up")
            self.say(f"beamhub up: {child.spec.name} is back (pid {child.proc.pid})")
            if child.spec.on_restart is not None:
                try:
                    await child.spec.on_restart()
                except Exception as exc:  # the child runs; only the follow-up failed
                    self.say(f"beamhub up: after restarting {child.spec.name}: {exc}")

    async def restart(self, name: str) -> None:
        """Stop ``name`` (SIGTERM to its group); its keeper starts it again at once."""
        child = self.children[name]
        if child.proc is not None and child.proc.poll() is None:
            child.requested = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.proc.pid, signal.SIGTERM)

    # --- stop ---------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop every child, newest first; safe to call twice and after a partial start."""
        self._stopping = True
        for child in reversed(list(self.children.values())):
            if child.task is not None:
                child.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await child.task
            await asyncio.to_thread(_stop_group, child.proc, child.spec.stop_timeout)
            if child.state != "stopped":
                self._event(child, "stop")
            child.state = "stopped"
        self._write_status()

    # --- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "updated": time.time(),
            "services": {name: c.status() for name, c in self.children.items()},
        }

    def _event(self, child: Child, event: str, code: int | None = None) -> None:
        """Append one up/down/stop line (O_APPEND: whole lines, even from two writers)."""
        line = {"time": time.time(), "service": child.spec.name, "event": event}
        if code is not None:
            line["code"] = code
        try:
            fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(line) + "\n").encode())
            finally:
                os.close(fd)
        except OSError as exc:  # the record is for reports; never stop a service over it
            log.warning(
                "cannot record %s %s in %s: %s", child.spec.name, event, self.events_path, exc
            )

    def _write_status(self) -> None:
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status(), indent=2))
        os.replace(tmp, self.status_path)


def _stop_group(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM the child's process group; SIGKILL what is left after ``timeout`` seconds."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the child, if it lingers, and anything it left
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
