"""Pure SLURM text: tiers → partitions, JobSpec → sbatch argv + script, squeue/sacct → JobInfo.

No subprocesses here: everything is tested on captured text (tests/kernels/test_slurm_parse.py).

Tier mapping (no database needed): each tier is a partition over all nodes, with
``PreemptType=preempt/partition_prio``. A partition's ``PriorityTier`` is its *preemption level*:
a tier that preempts nothing is level 1, one that preempts others sits one level above the
highest tier it preempts. Jobs of a higher level preempt jobs of lower levels whose partition's
``PreemptMode`` is not OFF; a tier that no tier preempts gets ``PreemptMode=OFF``. The tier's
``priority`` becomes ``PriorityJobFactor`` (queue order among equal levels, with
``priority/multifactor``'s partition weight), its limits ``MaxTime``/``MaxNodes``. The grace
between SIGTERM and SIGKILL is the cluster's ``KillWait`` (partition ``GraceTime`` is left at 0:
slurmctld 22.05 applies it on a periodic pass, which delayed preemption by 10-30 s here). A tier set whose "who preempts whom" cannot be expressed as
levels is refused with an explanation (use ``preempt/qos`` with slurmdbd for such rules).
"""

from __future__ import annotations

import math
import re
import shlex
import time

from beamhub.kernels.scheduler import TERMINAL_STATES, JobInfo, JobSpec, JobState, SchedulerError
from beamhub.kernels.tiers import Tier, TierSet

__all__ = [
    "SACCT_FIELDS",
    "SQUEUE_FIELDS",
    "SQUEUE_FORMAT",
    "batch_script",
    "parse_comment",
    "parse_sacct",
    "parse_sbatch",
    "parse_squeue",
    "partition_levels",
    "partition_lines",
    "sbatch_argv",
    "secret_env",
    "slurm_state",
]

_STATES = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,  # allocated, nodes being prepared: not yet running
    "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "RESIZING": JobState.PENDING,
    "SUSPENDED": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,  # still holds its nodes; the final state follows
    "STAGE_OUT": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "FAILED": JobState.FAILED,
    "TIMEOUT": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "PREEMPTED": JobState.PREEMPTED,
    "SPECIAL_EXIT": JobState.FAILED,
}


def slurm_state(text: str) -> JobState:
    """SLURM's state word (``CANCELLED by 0``, ``RUNNING``…) → JobState; anything else UNKNOWN."""
    word = text.strip().split(" ", 1)[0].rstrip("+").upper()
    return _STATES.get(word, JobState.UNKNOWN)


# -- tiers → partitions -----------------------------------------------------------------------
def partition_levels(tiers: TierSet) -> dict[str, int]:
    """Each tier's PriorityTier (preemption level); refuses rules partitions cannot express."""
    levels: dict[str, int] = {}
    for tier in sorted(tiers, key=lambda t: t.priority):
        levels[tier.name] = 1 + max((levels[t] for t in tier.preempts), default=0)
    preemptible = tiers.preemptible()
    for a in tiers:
        for b_name in preemptible:
            if a.name == b_name:
                continue
            would = levels[a.name] > levels[b_name]
            if would != (b_name in a.preempts):
                verb = "would preempt" if would else "would not preempt"
                raise SchedulerError(
                    f"tiers cannot be mapped onto preempt/partition_prio: tier {a.name!r} "
                    f"{verb} {b_name!r}, against its 'preempts' list; make every tier above a "
                    "preemptible tier preempt it, or run SLURM with preempt/qos and slurmdbd",
                    field="preempts",
                )
    return levels


def _minutes(seconds: float) -> int:
    return max(1, math.ceil(seconds / 60))


def partition_lines(tiers: TierSet, nodes: str = "ALL") -> list[str]:
    """slurm.conf ``PartitionName=`` lines, one per tier (the default tier is Default=YES)."""
    levels = partition_levels(tiers)
    preemptible = tiers.preemptible()
    lines = []
    for tier in tiers:
        mode = tier.preempt_mode.upper() if tier.name in preemptible else "OFF"
        lines.append(
            f"PartitionName={tier.name} Nodes={nodes} "
            f"Default={'YES' if tier.name == tiers.default_tier else 'NO'} "
            f"PriorityTier={levels[tier.name]} PriorityJobFactor={max(1, min(tier.priority, 65533))} "
            f"PreemptMode={mode} GraceTime=0 "
            f"MaxTime={_minutes(tier.max_walltime_s)} MaxNodes={tier.max_nodes} State=UP"
        )
    return lines


# -- JobSpec → sbatch -------------------------------------------------------------------------
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.@+-]")


def _comment(spec: JobSpec) -> str:
    fields = {"project": spec.project, "user": spec.user, "tier": spec.tier}
    return "beamhub " + " ".join(f"{k}={_UNSAFE.sub('_', v)}" for k, v in fields.items())


def parse_comment(comment: str) -> dict[str, str]:
    """Fields of a beamhub ``--comment`` (empty for jobs beamhub did not submit)."""
    parts = comment.strip().split()
    if not parts or parts[0] != "beamhub":
        return {}
    return dict(p.split("=", 1) for p in parts[1:] if "=" in p)


def sbatch_argv(
    spec: JobSpec,
    tier: Tier,
    partition: str | None = None,
    qos: str | None = None,
    output: str | None = None,
    sbatch: str = "sbatch",
    uid: int | None = None,
    gid: int | None = None,
    chdir: str | None = None,
) -> list[str]:
    """The sbatch command line for ``spec`` (the script itself goes on stdin).

    ``uid``/``gid`` (root only) run the job as the user's account; ``--export=NONE`` keeps the
    hub's own environment out of the job and out of slurmctld (the script sets what it needs).
    """
    requeue = spec.requeue or tier.preempt_mode == "requeue"
    argv = [
        sbatch,
        "--parsable",
        f"--job-name={_UNSAFE.sub('_', spec.name)[:64] or 'beamhub'}",
        f"--partition={partition or tier.name}",
        f"--time={_minutes(spec.walltime_s)}",
        f"--nodes={spec.nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={spec.cpus}",
        f"--mem={spec.mem_mb}M",
        f"--output={spec.output or output or 'slurm-%j.out'}",
        "--open-mode=append",  # a requeued job's output is appended to, never truncated
        "--requeue" if requeue else "--no-requeue",
        f"--comment={_comment(spec)}",
        "--export=NONE",
    ]
    if uid is not None:
        argv += [f"--uid={uid}", f"--gid={gid if gid is not None else uid}"]
    if spec.workdir or chdir:
        argv.append(f"--chdir={spec.workdir or chdir}")
    if qos:
        argv.append(f"--qos={qos}")
    if spec.reservation:
        argv.append(f"--reservation={spec.reservation}")
    return argv


#: environment names whose values are credentials: never in a batch script or sbatch's env
_SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|KEY)", re.IGNORECASE)


def secret_env(env: dict[str, str]) -> dict[str, str]:
    """The part of ``env`` that is credentials (API tokens, project tokens, secrets)."""
    return {k: v for k, v in env.items() if _SECRET_NAME.search(k)}


def batch_script(
    spec: JobSpec, secrets_file: str | None = None, launcher: list[str] | None = None
) -> str:
    """A /bin/sh batch script that sets ``spec.env`` and execs ``spec.argv``; every value is
    quoted with shlex.quote, so nothing the user gave is interpreted by the shell.

    With ``secrets_file``, the :func:`secret_env` part of the environment is left out (slurmctld
    stores the script) and ``launcher`` (kernels.jobsecrets) loads it from that file at start.
    """
    spec.validate()
    lines = ["#!/bin/sh", "# generated by beamhub (kernels/slurm_text.py)"]
    hidden = secret_env(spec.env) if secrets_file else {}
    for key, value in spec.env.items():
        if not _ENV_NAME.match(key):
            raise SchedulerError(f"env name {key!r} is not a valid variable name", field="env")
        if key not in hidden:
            lines.append(f"export {key}={shlex.quote(value)}")
    argv = list(spec.argv)
    if secrets_file:
        lines.append(f"export BEAMHUB_SECRETS_FILE={shlex.quote(secrets_file)}")
        if spec.requeue:
            lines.append("export BEAMHUB_SECRETS_KEEP=1")
        argv = [*(launcher or []), "--", *argv]
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


def parse_sbatch(stdout: str) -> str:
    """``sbatch --parsable`` prints ``ID`` or ``ID;cluster``; anything else is an error."""
    first = stdout.strip().splitlines()[0] if stdout.strip() else ""
    job_id = first.split(";", 1)[0]
    if not job_id.isdigit():
        raise SchedulerError(f"sbatch printed no job id (output: {stdout.strip()!r})", status=503)
    return job_id


# -- squeue / sacct → JobInfo -----------------------------------------------------------------
def _time(text: str) -> float | None:
    text = text.strip()
    if not text or text in {"N/A", "Unknown", "None", "(null)"}:
        return None
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def _wait_status(text: str) -> int | None:
    """squeue's ``exit_code`` is the raw wait status: 768 → 3, 9 (SIGKILL) → -9."""
    if not text.strip().isdigit():
        return None
    status = int(text)
    return -(status & 0x7F) if status & 0x7F else status >> 8


def _exit_code(text: str) -> int | None:
    """``2:0`` → 2; ``0:9`` (killed by signal 9) → -9."""
    code, _, sig = text.strip().partition(":")
    if not code.isdigit():
        return None
    if sig.isdigit() and int(sig) and not int(code):
        return -int(sig)
    return int(code)


SQUEUE_FIELDS = (
    "JobID",
    "State",
    "Reason",
    "NodeList",
    "SubmitTime",
    "StartTime",
    "EndTime",
    "Partition",
    "RestartCnt",
    "exit_code",
    "Name",
    "Comment",
)
#: squeue --Format: every field gets a wide column and a '|' suffix; comment last.
SQUEUE_FORMAT = ",".join(f"{f}:256|" if f != "Comment" else f"{f}:512" for f in SQUEUE_FIELDS)


def parse_squeue(text: str) -> dict[str, JobInfo]:
    """Lines printed by ``squeue --noheader --Format=SQUEUE_FORMAT`` → JobInfo by job id."""
    jobs: dict[str, JobInfo] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split("|", len(SQUEUE_FIELDS) - 1)]
        if len(parts) != len(SQUEUE_FIELDS):
            raise SchedulerError(f"cannot parse squeue line {line!r}", status=503)
        row = dict(zip(SQUEUE_FIELDS, parts, strict=True))
        state = slurm_state(row["State"])
        fields = parse_comment(row["Comment"])
        spec = None
        if fields:
            spec = JobSpec(
                name=row["Name"],
                project=fields.get("project", ""),
                user=fields.get("user", ""),
                tier=fields.get("tier", row["Partition"]),
                argv=[],
            )
        restarts = row["RestartCnt"]
        jobs[row["JobID"]] = JobInfo(
            job_id=row["JobID"],
            spec=spec,
            state=state,
            node=row["NodeList"] or None if state is not JobState.PENDING else None,
            reason=_reason(row["State"], row["Reason"]),
            submit_time=_time(row["SubmitTime"]),
            start_time=_time(row["StartTime"]) if state is not JobState.PENDING else None,
            end_time=_time(row["EndTime"])
            if state not in (JobState.PENDING, JobState.RUNNING)
            else None,
            exit_code=_wait_status(row["exit_code"]) if state in TERMINAL_STATES else None,
            requeues=int(restarts) if restarts.isdigit() else 0,
        )
    return jobs


def _reason(state: str, reason: str) -> str:
    reason = reason.strip()
    if reason in {"", "None", "(null)"}:
        return state.strip().lower()
    return f"{state.strip().lower()}: {reason}"


SACCT_FIELDS = (
    "JobID",
    "State",
    "ExitCode",
    "NodeList",
    "Submit",
    "Start",
    "End",
    "Partition",
    "JobName",
)


def parse_sacct(text: str) -> dict[str, JobInfo]:
    """``sacct --parsable2 --noheader --format=<SACCT_FIELDS>`` → JobInfo (job steps skipped)."""
    jobs: dict[str, JobInfo] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) < len(SACCT_FIELDS):
            raise SchedulerError(f"cannot parse sacct line {line!r}", status=503)
        row = dict(zip(SACCT_FIELDS, parts, strict=False))
        if "." in row["JobID"]:  # 123.batch, 123.0: steps of a job
            continue
        state = slurm_state(row["State"])
        jobs[row["JobID"]] = JobInfo(
            job_id=row["JobID"],
            spec=None,
            state=state,
            node=None if row["NodeList"] in {"", "None assigned"} else row["NodeList"],
            reason=row["State"].strip().lower(),
            submit_time=_time(row["Submit"]),
            start_time=_time(row["Start"]),
            end_time=_time(row["End"]),
            exit_code=_exit_code(row["ExitCode"]),
            requeues=0,
        )
    return jobs
