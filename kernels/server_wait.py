"""Waiting for a server's job: its state, its port report and its HTTP answer — never a hang.

Separate from the spawner's JupyterHub plumbing: the loop that turns a job into a reachable
server, or into a SpawnRefused that says why (queued too long, died, silent).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from jupyterhub.spawner import SpawnException
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from beamhub.kernels.scheduler import TERMINAL_STATES, JobState, Scheduler

__all__ = ["ServerWait", "SpawnRefused", "output_tail", "read_report", "server_answers"]


class SpawnRefused(SpawnException):
    """A spawn that cannot start; JupyterHub shows the user exactly this message."""

    def __init__(self, message: str, *, reason: str, status_code: int = 400) -> None:
        super().__init__(message, reason=reason, status_code=status_code)
        self.jupyterhub_message = message


def _read_own_file(path: str | None, limit: int, tail: bool = False) -> bytes | None:
    """Up to ``limit`` bytes of a regular file a job wrote, read safely as root.

    The file lies in the user's own folder: the last component may be a symlink, a FIFO or a
    hard link she made, to have the hub show her something that is not hers. Never follow a
    symlink, never block on a FIFO, and read only files owned by root or the folder's owner.
    """
    if not path:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        try:
            folder = os.stat(os.path.dirname(path) or ".")
        except OSError:
            return None
        if not stat.S_ISREG(info.st_mode) or info.st_uid not in (0, folder.st_uid, os.geteuid()):
            return None
        if info.st_nlink > 1:
            return None
        if tail:
            fh.seek(max(0, info.st_size - limit))
        return fh.read(limit)


def output_tail(path: str | None, lines: int = 5) -> str:
    """The last lines of a job's output, one line, for an error message."""
    data = _read_own_file(path, 4096, tail=True)  # the end is what explains
    if not data:
        return ""
    text = data.decode("utf-8", errors="replace")
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def read_report(path: str | None) -> dict | None:
    """The job's ``{"host", "port", ...}`` report (kernels.serverjob), once it exists."""
    data = _read_own_file(path, 65536)
    try:
        report = json.loads(data) if data else None
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


def _address(report: dict | None) -> tuple[str, int] | None:
    """host and port of a report, if well-formed (the file is the user's to write)."""
    if not report:
        return None
    host, port = report.get("host"), report.get("port")
    if not isinstance(host, str) or not host or not isinstance(port, int):
        return None
    return (host, port) if 0 < port < 65536 else None


async def server_answers(host: str, port: int, base_url: str = "/") -> bool:
    """True when the single-user server's API answers at host:port."""
    url = f"http://{host}:{port}{base_url.rstrip('/')}/api"
    try:
        resp = await AsyncHTTPClient().fetch(url, request_timeout=2, raise_error=False)
    except (OSError, HTTPClientError):
        return False
    return resp.code < 500 and resp.code != 599


@dataclass
class ServerWait:
    """Poll one job until its server answers; fail at once when it cannot."""

    scheduler: Scheduler
    job_id: str
    tier: str
    user: str
    port_file: str
    output_file: str | None
    base_url: str
    queue_timeout: float
    report_timeout: float
    interval: float
    emit: Callable[[int, str], None]
    on_report: Callable[[str, int, str | None], None]  # host, port, node

    async def run(self) -> tuple[str, int]:
        t0 = time.monotonic()
        started_at: float | None = None
        known: tuple[str, int] | None = None
        while True:
            info = (await self.scheduler.status([self.job_id])).get(self.job_id)
            state = info.state if info else JobState.UNKNOWN
            reason = (info.reason if info else "") or ""
            now = time.monotonic()
            if state is JobState.PENDING:
                if reason.startswith("preempting"):
                    self.emit(30, reason)
                if self.queue_timeout and now - t0 > self.queue_timeout:
                    raise self._no_node(reason)
            elif state in TERMINAL_STATES:
                raise self._died(state, reason, info.exit_code if info else None)
            elif state is JobState.RUNNING:
                if started_at is None:
                    started_at = now
                    self.emit(50, f"starting on {info.node}")
                report = read_report(self.port_file)
                address = _address(report)
                if address:
                    if address != known:
                        known = address
                        self.on_report(*address, info.node)
                    if await server_answers(*address, self.base_url):
                        self.emit(100, f"server ready on {info.node} ({address[0]}:{address[1]})")
                        return address
                if now - started_at > self.report_timeout:
                    raise SpawnRefused(
                        f"The server's job {self.job_id} runs on {info.node} but its server "
                        f"did not answer within {self.report_timeout:.0f} s "
                        f"({'port ' + str(known[1]) if known else 'no port reported'}).",
                        reason="no-port",
                        status_code=500,
                    )
            await asyncio.sleep(self.interval)

    def _no_node(self, reason: str) -> SpawnRefused:
        why = reason or "all nodes are busy and nothing this tier may preempt"
        return SpawnRefused(
            f"No node for {self.user}'s server at tier {self.tier} after "
            f"{self.queue_timeout:.0f} s: {why}. Try again later, or during your "
            "project's beamtime window.",
            reason="capacity",
            status_code=503,
        )

    def _died(self, state: JobState, reason: str, exit_code: int | None) -> SpawnRefused:
        tail = output_tail(self.output_file)
        code = f", exit code {exit_code}" if exit_code else ""
        return SpawnRefused(
            f"The server's job {self.job_id} {state.name.lower()}{code} before its "
            f"server was ready{': ' + reason if reason else ''}"
            f"{'; last output: ' + tail if tail else ''}",
            reason="job-died",
            status_code=500,
        )
