"""SlurmBackend against real daemons (conftest starts munged, slurmctld and 4 slurmd)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import pytest

from beamhub.kernels.scheduler import JobSpec, JobState, SchedulerError
from beamhub.kernels.slurm import SlurmBackend

pytestmark = pytest.mark.slurm
PY = sys.executable
DONE = {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.PREEMPTED}
SLEEPER = [PY, "-c", "import time; time.sleep(120)"]


@pytest.fixture
async def slurm(slurm_cluster, policy, tmp_path):
    backend = SlurmBackend(
        policy, slurm_conf=slurm_cluster.conf, log_dir=tmp_path / "out", poll_interval=0.2
    )
    yield backend
    await backend.close()
    env = {**backend.env}
    subprocess.run(["scancel", "--user=root"], env=env, timeout=30)
    deadline = time.monotonic() + 20  # leave every node idle for the next test
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["squeue", "-h", "-t", "PD,R,CG", "-o", "%i"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        if not out.strip():
            break
        time.sleep(0.2)


def spec(tier: str, argv: list[str], **kw) -> JobSpec:
    kw.setdefault("project", "lcls01")
    kw.setdefault("user", "alice")
    kw.setdefault("mem_mb", 400)
    return JobSpec(name=f"{tier}-job", tier=tier, argv=argv, walltime_s=300, **kw)


async def running(backend, tier, argv=SLEEPER, **kw) -> str:
    job_id = await backend.submit(spec(tier, argv, **kw))
    await backend.wait(job_id, {JobState.RUNNING}, timeout=20)
    return job_id


@pytest.mark.timeout(60)
async def test_jobs_complete_or_fail_with_their_exit_code(slurm, slurm_cluster, tmp_path):
    print(
        f"SLURM cold start (munged, slurmctld, {slurm_cluster.nodes} slurmd): "
        f"{slurm_cluster.cold_start_s:.2f} s"
    )
    t0 = time.monotonic()
    ok = await slurm.submit(spec("interactive", [PY, "-c", "print('hello from slurm')"]))
    bad = await slurm.submit(spec("batch", [PY, "-c", "import sys; sys.exit(3)"]))
    info = await slurm.wait(ok, DONE, timeout=30)
    print(f"submit -> completed: {time.monotonic() - t0:.2f} s")
    assert (info.state, info.exit_code) == (JobState.COMPLETED, 0)
    assert info.node in {"n1", "n2", "n3", "n4"}
    assert (tmp_path / "out" / f"{ok}.out").read_text() == "hello from slurm\n"
    info = await slurm.wait(bad, DONE, timeout=30)
    assert (info.state, info.exit_code) == (JobState.FAILED, 3)
    listed = {j.job_id: j for j in await slurm.list("lcls01")}
    assert {ok, bad} <= set(listed) and listed[ok].spec.user == "alice"
    assert (await slurm.status(["999999"]))["999999"].state is JobState.UNKNOWN


BATCH_JOB = textwrap.dedent("""
    import os, signal, sys, time
    run = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    print(f"run {run} start", flush=True)
    if run == 0:
        print("partial 1", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (print("checkpoint on SIGTERM", flush=True),
                                                   sys.exit(143)))
        time.sleep(120)
    print("final result", flush=True)
""")


async def collect(events, into: list) -> None:
    async for event in events:
        into.append(event)


@pytest.mark.timeout(120)
async def test_beamtime_preempts_one_batch_job_which_is_requeued_and_completes(
    slurm, slurm_cluster, tmp_path
):
    """Which batch job SLURM picks is SLURM's choice (22.05 picked the oldest even with
    preempt_youngest_first); the tier rule, the requeue and the intact output are tested."""
    outs = [tmp_path / f"batch{i}.out" for i in range(slurm_cluster.nodes)]
    batch = [await running(slurm, "batch", [PY, "-c", BATCH_JOB], output=str(o)) for o in outs]
    nodes = {j: i.node for j, i in (await slurm.status(batch)).items()}
    deadline = time.monotonic() + 20
    while not all("partial 1" in (o.read_text() if o.exists() else "") for o in outs):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    events: list[dict] = []
    watcher = asyncio.create_task(collect(slurm.events(), events))
    t0 = time.monotonic()
    beam = await slurm.submit(spec("beamtime", [PY, "-c", "import time; time.sleep(2)"]))
    info = await slurm.wait(beam, {JobState.RUNNING}, timeout=15)
    print(f"beamtime submit -> running (with preemption): {time.monotonic() - t0:.2f} s")
    deadline = time.monotonic() + 15  # squeue may still show the victim COMPLETING
    while True:
        states = await slurm.status(batch)
        requeued = [j for j in batch if states[j].state is JobState.PENDING]
        if requeued or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert len(requeued) == 1 and states[requeued[0]].requeues == 1
    victim = requeued[0]
    assert info.node == nodes[victim]
    assert all(states[j].state is JobState.RUNNING for j in batch if j != victim)
    assert (await slurm.wait(beam, DONE, timeout=30)).state is JobState.COMPLETED
    done = await slurm.wait(victim, DONE, timeout=60)  # after cred_expire (5 s here)
    print(f"requeued job completed {time.monotonic() - t0:.2f} s after the beamtime submit")
    assert (done.state, done.exit_code, done.requeues) == (JobState.COMPLETED, 0, 1)
    out = outs[batch.index(victim)].read_text().splitlines()
    lines = [ln for ln in out if not ln.startswith("slurmstepd")]
    assert lines == [
        "run 0 start",
        "partial 1",
        "checkpoint on SIGTERM",
        "run 1 start",
        "final result",
    ]
    watcher.cancel()
    kinds = [(e["type"], e["job_id"]) for e in events]
    assert ("preempted", victim) in kinds and ("requeued", victim) in kinds
    assert (f"preempting 1 batch job on {info.node}", beam) in [
        (e["message"], e["job_id"]) for e in events
    ]


@pytest.mark.timeout(90)
async def test_beamtime_never_preempts_an_interactive_job(slurm, slurm_cluster):
    t0 = time.monotonic()
    jobs = [await running(slurm, "interactive")]
    print(f"submit -> running on an idle node: {time.monotonic() - t0:.2f} s")
    jobs += [await running(slurm, "interactive") for _ in range(slurm_cluster.nodes - 1)]
    beam = await slurm.submit(spec("beamtime", SLEEPER))
    deadline = time.monotonic() + 4  # long enough for several scheduler passes (1 s each)
    while time.monotonic() < deadline:
        states = await slurm.status([*jobs, beam])
        assert all(states[j].state is JobState.RUNNING for j in jobs)
        assert states[beam].state is JobState.PENDING
        await asyncio.sleep(0.5)
    await slurm.cancel(jobs[0])
    info = await slurm.wait(beam, {JobState.RUNNING}, timeout=20)
    assert info.node == states[jobs[0]].node
    assert (await slurm.wait(jobs[0], DONE, timeout=10)).state is JobState.CANCELLED


@pytest.mark.timeout(60)
async def test_bad_input_is_refused_with_the_reason(slurm, slurm_cluster, policy):
    with pytest.raises(SchedulerError, match="walltime_s=999999 is over tier 'batch'"):
        await slurm.submit(
            JobSpec(
                name="x",
                project="lcls01",
                user="alice",
                tier="batch",
                argv=["true"],
                walltime_s=999999,
            )
        )
    with pytest.raises(SchedulerError, match="unknown tier 'gold'"):
        await slurm.submit(spec("gold", ["true"]))
    with pytest.raises(SchedulerError, match="does not hold tier 'interactive'") as err:
        await slurm.submit(spec("interactive", ["true"], project="chem02", user="carol"))
    assert err.value.status == 403
    with pytest.raises(SchedulerError, match="no job with id '424242'") as err:
        await slurm.cancel("424242")
    assert err.value.status == 404
    wrong = SlurmBackend(policy, slurm_conf=slurm_cluster.conf, partitions={"batch": "nope"})
    with pytest.raises(SchedulerError, match=r"sbatch refused the job: .*Invalid partition"):
        await wrong.submit(spec("batch", ["true"]))
    await wrong.close()
