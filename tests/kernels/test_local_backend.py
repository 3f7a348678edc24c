"""What only the local backend does: its events, victim order, restart, wall time, node sizes.

The behaviour every backend shares (exit codes, preemption with requeue, cancel, refusals) is
tested against both backends in test_backend_contract.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from beamhub.kernels.local import LocalBackend, VirtualNode
from beamhub.kernels.scheduler import JobSpec, JobState, SchedulerError
from beamhub.kernels.tier_policy import TierPolicy
from beamhub.kernels.tiers import load_tiers

PY = sys.executable
DONE = {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.PREEMPTED}
SLEEPER = [PY, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def backend(local_backend):
    return local_backend


def spec(tier: str, argv: list[str], **kw) -> JobSpec:
    kw.setdefault("project", "lcls01")
    kw.setdefault("user", "alice")
    return JobSpec(name=f"{tier}-job", tier=tier, argv=argv, walltime_s=600, **kw)


async def running(sched, tier, argv=SLEEPER, **kw) -> str:
    job_id = await sched.submit(spec(tier, argv, **kw))
    await sched.wait(job_id, {JobState.RUNNING}, timeout=10)
    return job_id


async def collect(events, into: list) -> None:
    async for event in events:
        into.append(event)


@pytest.mark.timeout(30)
async def test_events_follow_a_job_from_queued_to_its_end(backend):
    events: list[dict] = []
    watcher = asyncio.create_task(collect(backend.events(), events))
    await asyncio.sleep(0)
    ok = await backend.submit(spec("interactive", [PY, "-c", "print('hello')"]))
    bad = await backend.submit(spec("batch", [PY, "-c", "import sys; sys.exit(3)"]))
    await backend.wait(ok, DONE, timeout=10)
    info = await backend.wait(bad, DONE, timeout=10)
    assert info.reason == "exit code 3"
    watcher.cancel()
    kinds = [(e["type"], e["job_id"]) for e in events]
    assert (
        kinds.index(("queued", ok)) < kinds.index(("started", ok)) < kinds.index(("completed", ok))
    )
    assert ("failed", bad) in kinds
    started = next(e for e in events if e["type"] == "started" and e["job_id"] == ok)
    assert started["message"] == f"started on {started['node']}"


@pytest.mark.timeout(30)
async def test_beamtime_preempts_the_youngest_batch_job_only(backend):
    interactive = await running(backend, "interactive")
    batch = [await running(backend, "batch") for _ in range(3)]  # each starts after the last
    nodes = {jid: i.node for jid, i in (await backend.status([interactive, *batch])).items()}
    events: list[dict] = []
    watcher = asyncio.create_task(collect(backend.events(), events))
    await asyncio.sleep(0)
    beam = await backend.submit(spec("beamtime", SLEEPER))
    info = await backend.wait(beam, {JobState.RUNNING}, timeout=10)
    assert info.node == nodes[batch[-1]]  # the youngest batch job's node
    states = await backend.status([interactive, *batch])
    assert states[interactive].state is JobState.RUNNING
    assert [states[j].state for j in batch[:2]] == [JobState.RUNNING, JobState.RUNNING]
    assert states[batch[-1]].state is JobState.PENDING and states[batch[-1]].requeues == 1
    watcher.cancel()
    messages = [e["message"] for e in events if e["job_id"] == beam]
    assert f"preempting 1 batch job on {info.node}" in messages
    assert messages[-1] == f"started on {info.node}"
    assert [e["by"] for e in events if e["type"] == "preempted"] == [beam]


@pytest.mark.timeout(30)
async def test_lowest_tier_first_and_never_an_equal_or_higher_tier(tmp_path):
    tiers = load_tiers(
        {
            "default_tier": "mid",
            "tiers": {
                "top": {"priority": 30, "preempts": ["mid", "low"]},
                "mid": {"priority": 20, "preempt_mode": "cancel", "grace_s": 1},
                "low": {"priority": 10, "preempt_mode": "requeue", "grace_s": 1},
            },
        }
    )
    sched = LocalBackend(
        tmp_path / "j.sqlite", nodes=2, policy=TierPolicy(tiers), poll_interval=0.05
    )
    try:
        low = await running(sched, "low")
        mid = await running(sched, "mid")  # younger than low, but of a higher tier
        top1 = await running(sched, "top")
        st = await sched.status([low, mid, top1])
        assert st[low].state is JobState.PENDING and st[low].requeues == 1  # low went first
        assert st[mid].state is JobState.RUNNING
        top2 = await running(sched, "top")  # now mid is the only preemptible job: cancel mode
        assert (await sched.wait(mid, DONE, timeout=5)).state is JobState.PREEMPTED
        # both nodes run "top": a third top job waits, nobody of an equal tier is touched
        top3 = await sched.submit(spec("top", SLEEPER))
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            st = await sched.status([top1, top2, top3, low])
            assert st[top1].state is JobState.RUNNING and st[top2].state is JobState.RUNNING
            await asyncio.sleep(0.05)
        assert st[top3].state is JobState.PENDING
        assert st[top3].reason.startswith("waiting for free nodes: all 2 busy")
        await sched.cancel(top1)  # a freed node goes to the higher tier first, not to low
        info = await sched.wait(top3, {JobState.RUNNING}, timeout=10)
        assert info.node == st[top1].node
        assert (await sched.status([low]))[low].state is JobState.PENDING
        assert (await sched.wait(top1, DONE, timeout=5)).state is JobState.CANCELLED
    finally:
        await sched.close(cancel_jobs=True)


FIRST_SCHEDULER = textwrap.dedent("""
    import asyncio, json, sys
    from beamhub.kernels.local import LocalBackend
    from beamhub.kernels.scheduler import JobSpec, JobState
    async def main():
        sched = LocalBackend(sys.argv[1], nodes=2)
        job = await sched.submit(JobSpec(name="nb", project="p", user="u", tier="interactive",
                                         argv=sys.argv[2:]))
        info = await sched.wait(job, {JobState.RUNNING}, timeout=10)
        print(json.dumps({"job": job, "pid": sched._jobs[job].pid}))
        await sched.close()  # the hub goes away; the job keeps running
    asyncio.run(main())
""")


def start_in_other_scheduler(db: Path, argv: list[str]) -> dict:
    """A scheduler in another process submits a job and exits, as a hub that is restarted."""
    out = subprocess.run(
        [PY, "-c", FIRST_SCHEDULER, str(db), *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.timeout(40)
async def test_restarted_scheduler_reattaches_to_a_running_job(tmp_path):
    db = tmp_path / "j.sqlite"
    first = start_in_other_scheduler(
        db, [PY, "-c", "import time; time.sleep(1.5); print('survived')"]
    )
    sched = LocalBackend(db, nodes=2, poll_interval=0.05)
    try:
        info = (await sched.status([first["job"]]))[first["job"]]
        assert info.state is JobState.RUNNING and "re-attached" in info.reason
        # the re-attached job still holds its node: a new job goes to the other one
        other = await running(sched, "interactive", project="p", user="u")
        assert (await sched.status([other]))[other].node != info.node
        done = await sched.wait(first["job"], DONE, timeout=10)
        assert (done.state, done.exit_code) == (JobState.COMPLETED, 0)
        assert (sched.log_dir / f"{first['job']}.out").read_text() == "survived\n"
    finally:
        await sched.close(cancel_jobs=True)


@pytest.mark.timeout(40)
async def test_job_that_died_while_the_scheduler_was_down_is_failed_with_the_reason(tmp_path):
    db = tmp_path / "j.sqlite"
    first = start_in_other_scheduler(db, SLEEPER)
    os.killpg(first["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    sched = None
    try:
        while True:
            sched = LocalBackend(db, nodes=2, poll_interval=0.05)
            info = (await sched.status([first["job"]]))[first["job"]]
            if info.state is not JobState.RUNNING or time.monotonic() > deadline:
                break
            await sched.close()
            await asyncio.sleep(0.05)
        assert info.state is JobState.FAILED
        assert "ended while the scheduler was down" in info.reason
    finally:
        await sched.close(cancel_jobs=True)


@pytest.mark.timeout(30)
async def test_wall_time_is_enforced(tmp_path):
    sched = LocalBackend(tmp_path / "j.sqlite", nodes=[VirtualNode("n1")], poll_interval=0.05)
    try:
        job = await sched.submit(
            JobSpec(name="w", project="p", user="u", tier="batch", argv=SLEEPER, walltime_s=1)
        )
        info = await sched.wait(job, DONE, timeout=10)
        assert (info.state, info.reason) == (JobState.FAILED, "wall time of 1 s exceeded")
    finally:
        await sched.close(cancel_jobs=True)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("changes", "match"),
    [({"cpus": 2}, "ask for less"), ({"mem_mb": 5000}, "1 CPU/1000 MB")],
)
async def test_a_job_bigger_than_every_virtual_node_is_refused(backend, changes, match):
    """What every backend refuses is in test_backend_contract.py; the node sizes are local."""
    job = spec("interactive", SLEEPER)
    for key, value in changes.items():
        setattr(job, key, value)
    with pytest.raises(SchedulerError, match=match) as err:
        await backend.submit(job)
    assert err.value.field == "cpus"
    assert await backend.list() == []


@pytest.mark.timeout(30)
async def test_multi_node_job_holds_every_node_it_asked_for(backend):
    show = [
        PY,
        "-c",
        "import os, time; print(os.environ['BEAMHUB_NODES'], flush=True); time.sleep(60)",
    ]
    wide = await running(backend, "normal", show, nodes=2)
    info = (await backend.status([wide]))[wide]
    assert len(info.node.split(",")) == 2
    others = [await running(backend, "normal") for _ in range(2)]
    used = {n for j in others for n in (await backend.status([j]))[j].node.split(",")}
    assert used.isdisjoint(info.node.split(","))
    queued = await backend.submit(spec("normal", SLEEPER))  # all 4 nodes are taken now
    await asyncio.sleep(0.3)
    assert (await backend.status([queued]))[queued].state is JobState.PENDING
    deadline = time.monotonic() + 5
    while not (backend.log_dir / f"{wide}.out").read_text():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert (backend.log_dir / f"{wide}.out").read_text().strip() == info.node
    with pytest.raises(SchedulerError, match="nodes=5 is over tier 'normal'"):
        await backend.submit(spec("normal", SLEEPER, nodes=5))


def test_job_store_is_owner_only(tmp_path):
    """Job specs keep their env (spawned servers' API tokens): the database is mode 0600."""
    from beamhub.kernels.local_store import LocalJobStore

    LocalJobStore(tmp_path / "jobs.db")
    assert (tmp_path / "jobs.db").stat().st_mode & 0o777 == 0o600


def test_spec_from_json_names_a_missing_field():
    with pytest.raises(SchedulerError, match="argv: required") as err:
        JobSpec.from_dict({"name": "j", "project": "p", "user": "u", "tier": "batch"})
    assert err.value.field == "argv"
