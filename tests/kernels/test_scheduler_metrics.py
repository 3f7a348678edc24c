"""The scheduler's metrics follow a real local backend: jobs by tier and state, preemptions,
requeues and time-to-start, as Prometheus text (what JupyterHub's /hub/metrics serves)."""

from __future__ import annotations

import asyncio
import sys

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from beamhub.kernels.metrics import track, untrack
from beamhub.kernels.scheduler import JobSpec, JobState

PY = sys.executable
SLEEPER = [PY, "-c", "import time; time.sleep(60)"]


def _samples() -> dict[tuple[str, tuple], float]:
    text = generate_latest(REGISTRY).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("beamhub_scheduler_")
    }


def _spec(tier: str) -> JobSpec:
    return JobSpec(
        name=f"{tier}-job", tier=tier, argv=SLEEPER, walltime_s=600, project="lcls01", user="alice"
    )


async def _until(predicate, timeout: float = 10.0):
    for _ in range(int(timeout / 0.05)):
        got = _samples()
        if predicate(got):
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"metrics never matched: {_samples()}")


@pytest.mark.timeout(40)
async def test_jobs_preemption_and_time_to_start_are_counted(local_backend):
    sched = local_backend
    track(sched)
    before = _samples()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return _samples().get(key, 0.0) - before.get(key, 0.0)

    try:
        n_nodes = len(sched.nodes)
        batch = [await sched.submit(_spec("batch")) for _ in range(n_nodes)]
        for job in batch:
            await sched.wait(job, {JobState.RUNNING}, timeout=10)
        got = await _until(
            lambda s: (
                s.get(("beamhub_scheduler_jobs", (("state", "running"), ("tier", "batch"))))
                == n_nodes
            )
        )
        beam = await sched.submit(_spec("beamtime"))
        await sched.wait(beam, {JobState.RUNNING}, timeout=15)
        queued = ("beamhub_scheduler_jobs", (("state", "queued"), ("tier", "batch")))
        beamtime = ("beamhub_scheduler_jobs", (("state", "running"), ("tier", "beamtime")))
        got = await _until(lambda s: s.get(queued) == 1 and s.get(beamtime) == 1)
        running = got[("beamhub_scheduler_jobs", (("state", "running"), ("tier", "batch")))]
        assert running == n_nodes - 1
        assert delta("beamhub_scheduler_preemptions_total", tier="batch") == 1
        assert delta("beamhub_scheduler_requeues_total", tier="batch") == 1
        assert delta("beamhub_scheduler_time_to_start_seconds_count", tier="beamtime") == 1
        assert delta("beamhub_scheduler_time_to_start_seconds_count", tier="batch") == n_nodes
        # the beamtime job waited for its victim's grace: more than 0, less than the test
        took = delta("beamhub_scheduler_time_to_start_seconds_sum", tier="beamtime")
        assert 0 < took < 15
        for job in [*batch, beam]:
            await sched.cancel(job)
    finally:
        await untrack(sched)
