"""What only the SLURM backend does, on real daemons (munged, slurmctld, 4 slurmd; see conftest).

The behaviour every backend shares is tested against SLURM too, in test_backend_contract.py.
"""

from __future__ import annotations

import sys
import time

import pytest

from beamhub.kernels.scheduler import JobSpec, JobState, SchedulerError
from beamhub.kernels.slurm import SlurmBackend

pytestmark = pytest.mark.slurm
PY = sys.executable
DONE = {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.PREEMPTED}


def spec(tier: str, argv: list[str], **kw) -> JobSpec:
    kw.setdefault("project", "lcls01")
    kw.setdefault("user", "alice")
    kw.setdefault("mem_mb", 400)
    return JobSpec(name=f"{tier}-job", tier=tier, argv=argv, walltime_s=300, **kw)


@pytest.mark.timeout(60)
async def test_first_job_on_a_cold_cluster_reports_its_timings(slurm_backend, slurm_cluster):
    """Timings for BENCHMARKS.md; the behaviour is in test_backend_contract.py."""
    print(
        f"SLURM cold start (munged, slurmctld, {slurm_cluster.nodes} slurmd): "
        f"{slurm_cluster.cold_start_s:.2f} s"
    )
    t0 = time.monotonic()
    job_id = await slurm_backend.submit(
        spec("interactive", [PY, "-c", "import time; time.sleep(60)"])
    )
    await slurm_backend.wait(job_id, {JobState.RUNNING}, timeout=20)
    print(f"submit -> running on an idle node: {time.monotonic() - t0:.2f} s")
    await slurm_backend.cancel(job_id)
    assert (await slurm_backend.wait(job_id, DONE, timeout=10)).state is JobState.CANCELLED


@pytest.mark.timeout(60)
async def test_sbatch_refusal_is_a_scheduler_error_with_its_reason(slurm_cluster, policy):
    wrong = SlurmBackend(policy, slurm_conf=slurm_cluster.conf, partitions={"batch": "nope"})
    try:
        with pytest.raises(SchedulerError, match=r"sbatch refused the job: .*Invalid partition"):
            await wrong.submit(spec("batch", ["true"]))
    finally:
        await wrong.close()
