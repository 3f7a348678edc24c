"""SLURM text without a cluster: tiers → partitions, JobSpec → sbatch, captured squeue/sacct."""

from __future__ import annotations

import subprocess
import time

import pytest

from beamhub.kernels.scheduler import JobSpec, JobState, SchedulerError
from beamhub.kernels.slurm_text import (
    SQUEUE_FIELDS,
    batch_script,
    parse_comment,
    parse_sacct,
    parse_sbatch,
    parse_squeue,
    partition_levels,
    partition_lines,
    sbatch_argv,
    slurm_state,
)
from beamhub.kernels.tiers import DEFAULT_TIERS, load_tiers


def spec(**kw) -> JobSpec:
    base = dict(
        name="nb alice",
        project="lcls01",
        user="alice",
        tier="batch",
        argv=["python", "-c", "print('hi')"],
        walltime_s=90,
        cpus=2,
        mem_mb=700,
    )
    base.update(kw)
    return JobSpec(**base)


def test_default_tiers_map_onto_partition_levels():
    assert partition_levels(DEFAULT_TIERS) == {
        "batch": 1,
        "normal": 1,
        "interactive": 1,
        "beamtime": 2,
    }
    lines = {line.split()[0]: line for line in partition_lines(DEFAULT_TIERS)}
    assert set(lines) == {f"PartitionName={t}" for t in DEFAULT_TIERS.names()}
    assert "PriorityTier=2" in lines["PartitionName=beamtime"]
    assert "PreemptMode=REQUEUE" in lines["PartitionName=batch"]
    assert "PreemptMode=OFF" in lines["PartitionName=interactive"]  # never preempted
    assert "Default=YES" in lines["PartitionName=interactive"]
    assert "MaxTime=480 MaxNodes=1" in lines["PartitionName=interactive"]


def test_rules_partitions_cannot_express_are_refused():
    chain = load_tiers(
        {
            "default_tier": "c",
            "tiers": {
                "a": {"priority": 30, "preempts": ["b"]},
                "b": {"priority": 20, "preempts": ["c"]},
                "c": {"priority": 10},
            },
        }
    )
    with pytest.raises(SchedulerError, match=r"tier 'a' would preempt 'c'.*preempt/qos"):
        partition_levels(chain)


def test_sbatch_argv_carries_tier_flags():
    argv = sbatch_argv(
        spec(requeue=False, reservation="beam42", workdir="/tmp"),
        DEFAULT_TIERS["batch"],
        qos="lowq",
        output="/logs/%j.out",
    )
    assert argv[:2] == ["sbatch", "--parsable"]
    for flag in [
        "--job-name=nb_alice",
        "--partition=batch",
        "--time=2",
        "--nodes=1",
        "--cpus-per-task=2",
        "--mem=700M",
        "--output=/logs/%j.out",
        "--open-mode=append",
        "--requeue",  # batch's preempt_mode is requeue
        "--comment=beamhub project=lcls01 user=alice tier=batch",
        "--chdir=/tmp",
        "--qos=lowq",
        "--reservation=beam42",
    ]:
        assert flag in argv
    inter = sbatch_argv(spec(tier="interactive"), DEFAULT_TIERS["interactive"], partition="int")
    assert "--no-requeue" in inter and "--partition=int" in inter
    assert "--requeue" in sbatch_argv(spec(tier="normal", requeue=True), DEFAULT_TIERS["normal"])


def test_batch_script_quotes_everything(tmp_path):
    hostile = ["/bin/echo", "a b", "$(touch pwned)", "'; rm -rf /'", "`id`", "*"]
    script = batch_script(spec(argv=hostile, env={"MSG": "x'y $HOME"}))
    out = subprocess.run(
        ["/bin/sh", "-c", script.replace("exec /bin/echo", 'echo "$MSG";exec /bin/echo')],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.stdout.splitlines() == ["x'y $HOME", "a b $(touch pwned) '; rm -rf /' `id` *"]
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(SchedulerError, match="not a valid variable name"):
        batch_script(spec(env={"BAD-NAME": "1"}))
    with pytest.raises(SchedulerError, match="not a shell string"):
        batch_script(spec(argv="rm -rf /"))


def test_parse_sbatch():
    assert parse_sbatch("1234\n") == "1234"
    assert parse_sbatch("1234;beamhub\n") == "1234"
    for bad in ["", "sbatch: error: Batch job submission failed: Invalid partition name\n"]:
        with pytest.raises(SchedulerError, match="sbatch printed no job id") as err:
            parse_sbatch(bad)
        assert err.value.status == 503


def _row(**values) -> str:
    # squeue --Format pads each field to its width and appends the '|' suffix
    return "".join(
        f"{values.get(f, ''):<14}|" if f != "Comment" else values.get(f, "") for f in SQUEUE_FIELDS
    )


CAPTURED_SQUEUE = (
    "\n".join(
        [
            _row(
                JobID="2",
                State="PENDING",
                Reason="BeginTime",
                SubmitTime="2026-11-27T14:37:17",
                StartTime="2026-11-27T14:37:27",
                EndTime="Unknown",
                Partition="batch",
                RestartCnt="1",
                exit_code="0",
                Name="sim",
                Comment="beamhub project=lcls01 user=alice tier=batch",
            ),
            _row(
                JobID="6",
                State="RUNNING",
                Reason="None",
                NodeList="n1",
                SubmitTime="2026-11-27T14:36:56",
                StartTime="2026-11-27T14:37:06",
                EndTime="2026-11-27T14:42:06",
                Partition="beamtime",
                RestartCnt="0",
                exit_code="0",
                Name="nb",
                Comment="beamhub project=lcls01 user=bob tier=beamtime",
            ),
            _row(
                JobID="1",
                State="FAILED",
                Reason="NonZeroExitCode",
                NodeList="n1",
                SubmitTime="2026-11-27T14:36:39",
                StartTime="2026-11-27T14:36:40",
                EndTime="2026-11-27T14:36:42",
                Partition="batch",
                RestartCnt="0",
                exit_code="768",
                Name="sbatch",
                Comment="",
            ),
            _row(
                JobID="7",
                State="CANCELLED",
                Reason="None",
                NodeList="n2",
                SubmitTime="N/A",
                Partition="normal",
                RestartCnt="0",
                exit_code="15",
                Name="x",
                Comment="beamhub project=p user=u tier=normal",
            ),
            _row(
                JobID="8",
                State="COMPLETED",
                Reason="None",
                NodeList="n3",
                Partition="normal",
                RestartCnt="0",
                exit_code="0",
                Name="x",
                Comment="beamhub project=p user=u tier=normal",
            ),
        ]
    )
    + "\n"
)


def test_parse_captured_squeue_keeps_states_apart():
    jobs = parse_squeue(CAPTURED_SQUEUE)
    assert {j: i.state for j, i in jobs.items()} == {
        "2": JobState.PENDING,
        "6": JobState.RUNNING,
        "1": JobState.FAILED,
        "7": JobState.CANCELLED,
        "8": JobState.COMPLETED,
    }
    requeued = jobs["2"]
    assert (requeued.requeues, requeued.reason, requeued.node, requeued.start_time) == (
        1,
        "pending: BeginTime",
        None,
        None,
    )  # an expected start is not a start
    assert requeued.spec.project == "lcls01" and requeued.spec.tier == "batch"
    running = jobs["6"]
    assert running.node == "n1" and running.end_time is None
    assert running.start_time == time.mktime(
        time.strptime("2026-11-27T14:37:06", "%Y-%m-%dT%H:%M:%S")
    )
    assert jobs["1"].exit_code == 3 and jobs["1"].spec is None  # not beamhub's job
    assert jobs["7"].exit_code == -15 and jobs["7"].submit_time is None
    assert jobs["8"].exit_code == 0
    with pytest.raises(SchedulerError, match="cannot parse squeue line"):
        parse_squeue("garbage without separators\n")


CAPTURED_SACCT = """\
12|COMPLETED|0:0|n1|2026-11-27T14:36:39|2026-11-27T14:36:40|2026-11-27T14:36:42|batch|sim
12.batch|COMPLETED|0:0|n1|2026-11-27T14:36:40|2026-11-27T14:36:40|2026-11-27T14:36:42||batch
13|CANCELLED by 0|0:15|n2|2026-11-27T14:36:39|2026-11-27T14:36:40|2026-11-27T14:36:45|normal|nb
14|FAILED|3:0|n3|2026-11-27T14:36:39|2026-11-27T14:36:40|2026-11-27T14:36:41|batch|sim
15|PREEMPTED|0:15|n4|2026-11-27T14:36:39|2026-11-27T14:36:40|2026-11-27T14:36:49|batch|sim
16|PENDING|0:0|None assigned|2026-11-27T14:36:39|Unknown|Unknown|batch|sim
17|TIMEOUT|0:0|n1|2026-11-27T14:36:39|2026-11-27T14:36:40|2026-11-27T14:37:40|batch|sim
18|OUT_OF_MEMORY|0:125|n1|2026-11-27T14:36:39|2026-11-27T14:36:40|2026-11-27T14:37:40|batch|sim
19|SOMETHING_NEW|0:0|n1|2026-11-27T14:36:39|2026-11-27T14:36:40|2026-11-27T14:37:40|batch|sim
"""


def test_parse_captured_sacct():
    jobs = parse_sacct(CAPTURED_SACCT)
    assert "12.batch" not in jobs
    assert {j: i.state for j, i in jobs.items()} == {
        "12": JobState.COMPLETED,
        "13": JobState.CANCELLED,
        "14": JobState.FAILED,
        "15": JobState.PREEMPTED,
        "16": JobState.PENDING,
        "17": JobState.FAILED,
        "18": JobState.FAILED,
        "19": JobState.UNKNOWN,
    }
    assert jobs["14"].exit_code == 3 and jobs["13"].exit_code == -15
    assert jobs["16"].node is None and jobs["16"].start_time is None
    assert jobs["13"].reason == "cancelled by 0"


def test_state_words_and_comments():
    assert slurm_state("COMPLETING") is JobState.RUNNING
    assert slurm_state("REQUEUED") is JobState.PENDING
    assert slurm_state("CANCELLED+") is JobState.CANCELLED
    assert slurm_state("") is JobState.UNKNOWN
    assert parse_comment("beamhub project=p user=u tier=batch") == {
        "project": "p",
        "user": "u",
        "tier": "batch",
    }
    assert parse_comment("someone else's comment") == {}


class ScriptedSqueue:
    """Successive squeue snapshots (as parse_squeue returns them) for the event-diff logic."""

    def __init__(self, snapshots):
        self.snapshots = list(snapshots)

    async def __call__(self, job_ids):
        snap = self.snapshots.pop(0)
        return {j: snap[j] for j in job_ids}


def _info(job_id, state, node=None, requeues=0, start=None):
    from beamhub.kernels.scheduler import JobInfo

    return JobInfo(
        job_id=job_id, spec=None, state=state, node=node, requeues=requeues, start_time=start
    )


@pytest.mark.parametrize("victim_seen_late", [False, True])
async def test_events_name_the_preemptor_not_the_completing_victim(victim_seen_late):
    from beamhub.kernels.slurm import SlurmBackend

    backend = SlurmBackend(poll_interval=0.2)
    R, P = JobState.RUNNING, JobState.PENDING
    batch_running = _info("3", R, "n1", 0, 100.0)
    backend._last = {"3": batch_running, "7": _info("7", P)}
    backend._specs = {"3": spec(), "7": spec(tier="beamtime")}
    completing_victim = _info("3", R, "n1", 1, 100.0)  # COMPLETING shows as RUNNING, restarts=1
    requeued_victim = _info("3", P, None, 1)
    beam = _info("7", R, "n1", 0, 200.0)
    if victim_seen_late:  # squeue shows the preemptor running before the victim's restart count
        snaps = [{"3": batch_running, "7": beam}, {"3": requeued_victim, "7": beam}]
    else:
        snaps = [{"3": completing_victim, "7": _info("7", P)}, {"3": requeued_victim, "7": beam}]
    backend.status = ScriptedSqueue(snaps)
    events = []
    backend._events.publish = lambda type_, job_id, **f: events.append(
        (type_, job_id, f.get("message"))
    )
    await backend.poll_once()
    await backend.poll_once()
    assert ("preempted", "3", "preempted on n1 and requeued by SLURM") in events
    assert ("preempting", "7", "preempting 1 batch job on n1") in events
    assert ("started", "7", "started on n1") in events
    assert not [e for e in events if e[0] in ("started", "preempting") and e[1] == "3"]
