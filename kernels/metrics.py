"""The scheduler's Prometheus metrics: jobs queued and running by tier, preemptions, requeues,
and time-to-start by tier (a histogram: the service level a beamtime tier promises).

Every backend tells what happens through its events (:meth:`Scheduler.events`); :func:`track`
follows them with one task per scheduler and asks the scheduler for the job (tier, submit and
start times), so the local and the SLURM backend are measured the same way. The metrics live in
prometheus_client's default registry: the local backend runs in the hub process, so JupyterHub's
own ``/hub/metrics`` serves them next to its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from beamhub.kernels.scheduler import JobState, Scheduler

__all__ = ["PREEMPTIONS", "REQUEUES", "TIME_TO_START", "track"]

log = logging.getLogger("beamhub.kernels.metrics")

#: Seconds from submission to start: from an instant interactive start to an hour in a queue.
START_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)

PREEMPTIONS = Counter(
    "beamhub_scheduler_preemptions",
    "running jobs stopped to make room for a higher tier, by the victim's tier",
    ["tier"],
)
REQUEUES = Counter(
    "beamhub_scheduler_requeues", "preempted jobs put back in the queue, by tier", ["tier"]
)
TIME_TO_START = Histogram(
    "beamhub_scheduler_time_to_start_seconds",
    "seconds from a job's submission to its first start, by tier",
    ["tier"],
    buckets=START_BUCKETS,
)

#: Live jobs of each tracked scheduler: {id(scheduler): {job_id: (tier, state)}}.
_LIVE: dict[int, dict[str, tuple[str, str]]] = {}
_TASKS: dict[int, asyncio.Task] = {}


class _JobsCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "beamhub_scheduler_jobs",
            "jobs queued or running now, by tier",
            labels=["state", "tier"],
        )
        counts: dict[tuple[str, str], int] = {}
        for jobs in list(_LIVE.values()):
            for tier, state in list(jobs.values()):
                counts[(state, tier)] = counts.get((state, tier), 0) + 1
        for (state, tier), n in sorted(counts.items()):
            family.add_metric([state, tier], n)
        yield family


REGISTRY.register(_JobsCollector())

_STATE = {JobState.PENDING: "queued", JobState.RUNNING: "running"}


def _note(live: dict[str, tuple[str, str]], info: Any) -> None:
    tier = info.spec.tier if info.spec is not None else "unknown"
    state = _STATE.get(info.state)
    if state is None:
        live.pop(info.job_id, None)
    else:
        live[info.job_id] = (tier, state)


async def _follow(scheduler: Scheduler, live: dict[str, tuple[str, str]]) -> None:
    events = scheduler.events()
    first = asyncio.ensure_future(events.__anext__())  # subscribe before the snapshot
    await asyncio.sleep(0)
    for info in await scheduler.list():
        _note(live, info)
    pending: Any = first
    while True:
        try:
            event = await pending
        except StopAsyncIteration:
            return
        job_id = event.get("job_id", "")
        try:
            info = (await scheduler.status([job_id]))[job_id]
        except Exception:  # the scheduler is closing; nothing more to count
            log.debug("no status for %s", job_id, exc_info=True)
            info = None
        if info is not None:
            tier = info.spec.tier if info.spec is not None else "unknown"
            kind = event.get("type")
            if kind == "started" and info.submit_time and info.start_time and not info.requeues:
                TIME_TO_START.labels(tier).observe(max(0.0, info.start_time - info.submit_time))
            elif kind == "preempted":
                PREEMPTIONS.labels(tier).inc()
            elif kind == "requeued":
                REQUEUES.labels(tier).inc()
            _note(live, info)
        pending = asyncio.ensure_future(events.__anext__())


def track(scheduler: Scheduler) -> None:
    """Count ``scheduler``'s jobs and events from now on (call in its event loop; idempotent)."""
    key = id(scheduler)
    if key in _TASKS and not _TASKS[key].done():
        return
    live = _LIVE.setdefault(key, {})

    async def run() -> None:
        try:
            await _follow(scheduler, live)
        except asyncio.CancelledError:
            raise
        except Exception:  # never take the scheduler down with its metrics
            log.warning("scheduler metrics stopped", exc_info=True)
        finally:
            _LIVE.pop(key, None)
            _TASKS.pop(key, None)

    _TASKS[key] = asyncio.get_running_loop().create_task(run(), name="scheduler-metrics")


async def untrack(scheduler: Scheduler) -> None:
    """Stop counting ``scheduler`` (before it closes)."""
    task = _TASKS.pop(id(scheduler), None)
    _LIVE.pop(id(scheduler), None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
