"""The Scheduler contract, run against every backend: the local one and a real SLURM.

Each test takes the ``backend`` fixture, once with a LocalBackend of 4 virtual nodes and once
with a SlurmBackend on the 4 slurmd the conftest starts (marker ``slurm``). What only one backend
does (the local backend picks the youngest victim and re-attaches after a restart; SLURM maps
tiers onto partitions) stays in test_local_backend.py and test_slurm_backend.py.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time

import pytest

from beamhub.kernels.scheduler import JobSpec, JobState, Scheduler, SchedulerError
from tests.kernels.conftest import user_dir

PY = sys.executable
NODES = 4  # conftest's local_backend and slurm_backend (4 slurmd) both have 4 nodes
DONE = {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.PREEMPTED}
SLEEPER = [PY, "-c", "import time; time.sleep(120)"]


@pytest.fixture(params=["local", "sandboxed", pytest.param("slurm", marks=pytest.mark.slurm)])
def backend(request):
    """Each backend with NODES nodes and the conftest's policy (lcls01/alice holds interactive,
    normal, batch and an open beamtime window; chem02/carol holds batch). ``sandboxed`` is the
    local backend running every job as its user's account inside bubblewrap."""
    return request.getfixturevalue(f"{request.param}_backend")


def spec(tier: str, argv: list[str], **kw) -> JobSpec:
    kw.setdefault("project", "lcls01")
    kw.setdefault("user", "alice")
    kw.setdefault("mem_mb", 400)
    kw.setdefault("walltime_s", 300)
    return JobSpec(name=f"{tier}-job", tier=tier, argv=argv, **kw)


async def running(backend: Scheduler, tier: str, argv=SLEEPER, **kw) -> str:
    job_id = await backend.submit(spec(tier, argv, **kw))
    await backend.wait(job_id, {JobState.RUNNING}, timeout=20)
    return job_id


async def collect(events, into: list) -> None:
    async for event in events:
        into.append(event)


@pytest.mark.timeout(60)
async def test_jobs_complete_or_fail_with_their_exit_code(backend):
    ok = await backend.submit(spec("interactive", [PY, "-c", "print('hello')"]))
    bad = await backend.submit(spec("batch", [PY, "-c", "import sys; sys.exit(3)"]))
    info = await backend.wait(ok, DONE, timeout=30)
    assert (info.state, info.exit_code, info.requeues) == (JobState.COMPLETED, 0, 0)
    assert info.node in {f"n{i}" for i in range(1, NODES + 1)}
    assert (backend.log_dir / f"{ok}.out").read_text() == "hello\n"
    info = await backend.wait(bad, DONE, timeout=30)
    assert (info.state, info.exit_code) == (JobState.FAILED, 3)
    listed = {j.job_id: j for j in await backend.list("lcls01")}
    assert {ok, bad} <= set(listed) and listed[ok].spec.user == "alice"
    assert not {ok, bad} & {j.job_id for j in await backend.list("chem02")}
    assert (await backend.status(["424242"]))["424242"].state is JobState.UNKNOWN


#: A batch job that checkpoints on SIGTERM. The run counter is BEAMHUB_REQUEUES on the local
#: backend and SLURM_RESTART_COUNT on SLURM.
BATCH_JOB = textwrap.dedent("""
    import os, signal, sys, time
    run = int(os.environ.get("BEAMHUB_REQUEUES") or os.environ.get("SLURM_RESTART_COUNT") or 0)
    print(f"run {run} start", flush=True)
    if run == 0:
        print("partial 1", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (print("checkpoint on SIGTERM", flush=True),
                                                   sys.exit(143)))
        time.sleep(120)
    print("final result", flush=True)
""")


@pytest.mark.timeout(120)
async def test_beamtime_preempts_one_batch_job_which_is_requeued_and_completes(backend, tmp_path):
    """Which batch job goes is the backend's choice (SLURM 22.05 picks the oldest even with
    preempt_youngest_first); the tier rule, the requeue and the intact output are the contract."""
    out_dir = user_dir(backend, "alice", tmp_path / "out")
    outs = [out_dir / f"batch{i}.out" for i in range(NODES)]
    batch = [await running(backend, "batch", [PY, "-c", BATCH_JOB], output=str(o)) for o in outs]
    nodes = {j: i.node for j, i in (await backend.status(batch)).items()}
    deadline = time.monotonic() + 20
    while not all("partial 1" in (o.read_text() if o.exists() else "") for o in outs):
        assert time.monotonic() < deadline, "the batch jobs did not start their work"
        await asyncio.sleep(0.1)
    events: list[dict] = []
    watcher = asyncio.create_task(collect(backend.events(), events))
    await asyncio.sleep(0)
    beam = await backend.submit(spec("beamtime", [PY, "-c", "import time; time.sleep(2)"]))
    info = await backend.wait(beam, {JobState.RUNNING}, timeout=20)
    deadline = time.monotonic() + 15  # squeue may still show the victim COMPLETING
    while True:
        states = await backend.status(batch)
        requeued = [j for j in batch if states[j].state is JobState.PENDING]
        if requeued or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert len(requeued) == 1 and states[requeued[0]].requeues == 1, states
    victim = requeued[0]
    assert info.node == nodes[victim]
    assert all(states[j].state is JobState.RUNNING for j in batch if j != victim)
    assert (await backend.wait(beam, DONE, timeout=30)).state is JobState.COMPLETED
    done = await backend.wait(victim, DONE, timeout=60)  # SLURM: after cred_expire (5 s here)
    assert (done.state, done.exit_code, done.requeues) == (JobState.COMPLETED, 0, 1)
    out = outs[batch.index(victim)].read_text().splitlines()
    assert [ln for ln in out if not ln.startswith("slurmstepd")] == [
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
        (e.get("message"), e["job_id"]) for e in events
    ]


@pytest.mark.timeout(90)
async def test_beamtime_never_preempts_an_interactive_job(backend):
    jobs = [await running(backend, "interactive") for _ in range(NODES)]
    beam = await backend.submit(spec("beamtime", SLEEPER))
    deadline = time.monotonic() + 4  # several scheduling passes of either backend
    while time.monotonic() < deadline:
        states = await backend.status([*jobs, beam])
        assert all(states[j].state is JobState.RUNNING for j in jobs)
        assert states[beam].state is JobState.PENDING
        await asyncio.sleep(0.5)
    await backend.cancel(jobs[0])
    info = await backend.wait(beam, {JobState.RUNNING}, timeout=20)
    assert info.node == states[jobs[0]].node
    assert (await backend.wait(jobs[0], DONE, timeout=10)).state is JobState.CANCELLED


@pytest.mark.timeout(60)
async def test_cancel_pending_and_running(backend):
    jobs = [await running(backend, "batch") for _ in range(NODES)]
    queued = await backend.submit(spec("batch", SLEEPER))
    await backend.cancel(queued)
    assert (await backend.wait(queued, DONE, timeout=10)).state is JobState.CANCELLED
    await backend.cancel(jobs[0])
    info = await backend.wait(jobs[0], DONE, timeout=10)
    assert info.state is JobState.CANCELLED and info.end_time is not None
    await backend.cancel(jobs[0])  # already done: a no-op
    assert {*jobs, queued} <= {j.job_id for j in await backend.list("lcls01")}
    assert not {*jobs, queued} & {j.job_id for j in await backend.list("chem02")}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("changes", "match", "field", "status"),
    [
        ({"tier": "gold"}, "unknown tier 'gold'", "tier", 400),
        ({"walltime_s": 10**6}, "walltime_s=1000000 is over tier 'interactive'", "walltime_s", 400),
        ({"nodes": 5}, "nodes=5 is over tier 'interactive'", "nodes", 400),
        ({"project": "chem02", "user": "carol"}, "does not hold tier 'interactive'", "tier", 403),
        ({"user": "carol"}, "not a member of project 'lcls01'", "project", 403),
        ({"argv": "sleep 10"}, "not a shell string", "argv", 400),
        ({"env": "A=1"}, "env must be an object", "env", 400),
        ({"output": 5}, "output must be a string or null", "output", 400),  # not the hub's fd 5
        ({"workdir": ["/tmp"]}, "workdir must be a string or null", "workdir", 400),
        ({"requeue": "yes"}, "requeue must be true or false", "requeue", 400),
    ],
)
async def test_bad_submissions_are_refused_naming_the_field(backend, changes, match, field, status):
    before = {j.job_id for j in await backend.list()}
    job = spec("interactive", SLEEPER)
    for key, value in changes.items():
        setattr(job, key, value)
    with pytest.raises(SchedulerError, match=match) as err:
        await backend.submit(job)
    assert (err.value.field, err.value.status) == (field, status)
    assert {j.job_id for j in await backend.list()} == before  # nothing was queued


@pytest.mark.timeout(30)
async def test_cancelling_an_unknown_job_is_a_404_naming_the_job_id(backend):
    for job_id in ("424242", "nope"):
        with pytest.raises(SchedulerError, match=f"no job with id '{job_id}'") as err:
            await backend.cancel(job_id)
        assert (err.value.status, err.value.field) == (404, "job_id")
        assert (await backend.status([job_id]))[job_id].state is JobState.UNKNOWN
