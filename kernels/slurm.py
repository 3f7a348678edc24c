"""The SLURM backend: sbatch/squeue/scancel run as argv lists; the text lives in slurm_text.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from beamhub.kernels.accounts import Account, AccountMap, private_dir
from beamhub.kernels.job_records import JobRecords
from beamhub.kernels.scheduler import (
    TERMINAL_STATES,
    EventHub,
    JobInfo,
    JobSpec,
    JobState,
    Scheduler,
    SchedulerError,
)
from beamhub.kernels.slurm_text import (
    SACCT_FIELDS,
    SQUEUE_FORMAT,
    batch_script,
    parse_sacct,
    parse_sbatch,
    parse_squeue,
    partition_lines,
    sbatch_argv,
    secret_env,
)
from beamhub.kernels.tier_policy import TierPolicy
from beamhub.kernels.tiers import load_tiers

__all__ = ["SlurmBackend", "main"]

_EVENT_FOR = {
    JobState.COMPLETED: "completed",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
    JobState.PREEMPTED: "preempted",
}


class SlurmBackend(Scheduler):
    """Jobs on a real SLURM. Each tier is a partition (see slurm_text's module docstring);
    ``partitions``/``qos`` map tier names onto a site's own partition/QoS names.

    ``slurm_conf``: the SLURM_CONF the commands use (default: the environment's).
    ``use_sacct``: ask sacct about jobs squeue has forgotten (needs slurmdbd accounting).
    ``records_path``: keep each job and each of its runs as the polls see them in this SQLite
    file (:mod:`beamhub.kernels.job_records`), for the allocation report without accounting.
    ``run_as="account"`` (root): each job runs as its user's Unix account (``sbatch --uid
    --gid``; see kernels/accounts.py), its output in ``~/.beamhub/slurm/``. Credentials in a
    job's environment never reach slurmctld: they go to a 0600 file of the user's that the job
    reads and deletes at start (kernels/jobsecrets.py).
    """

    name = "slurm"

    def __init__(
        self,
        policy: TierPolicy | None = None,
        slurm_conf: str | Path | None = None,
        log_dir: str | Path | None = None,
        partitions: Mapping[str, str] | None = None,
        qos: Mapping[str, str] | None = None,
        poll_interval: float = 1.0,
        use_sacct: bool = False,
        command_timeout: float = 30.0,
        run_as: str = "self",
        account_template: str = "bh-{username}",
        home_root: str = "",
        log: logging.Logger | None = None,
        records_path: str | Path | None = None,
    ) -> None:
        self.policy = policy or TierPolicy()
        self.records = JobRecords(records_path) if records_path else None
        self.tiers = self.policy.tiers
        self.env = dict(os.environ)
        if slurm_conf is not None:
            self.env["SLURM_CONF"] = str(slurm_conf)
        self.log_dir = Path(log_dir) if log_dir else None
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self.partitions = dict(partitions or {})
        self.qos = dict(qos or {})
        self.poll_interval = poll_interval
        self.use_sacct = use_sacct
        self.command_timeout = command_timeout
        self.log = log or logging.getLogger("beamhub.kernels.slurm")
        self.accounts = AccountMap(run_as, account_template, home_root, log=self.log)
        self._specs: dict[str, JobSpec] = {}
        self._last: dict[str, JobInfo] = {}
        self._recent_start: dict[str, tuple[str, float]] = {}
        self._recent_victims: dict[str, list[tuple[str, float]]] = {}
        self._events = EventHub()
        self._task: asyncio.Task | None = None
        self._closed = False

    # -- commands -------------------------------------------------------------------------
    async def _run(self, argv: list[str], stdin: str | None = None) -> tuple[int, str, str]:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.env,
            )
        except FileNotFoundError as exc:
            raise SchedulerError(
                f"{argv[0]} is not installed; install slurm-client (and point SLURM_CONF at the "
                "cluster's slurm.conf)",
                status=503,
            ) from exc
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(stdin.encode() if stdin is not None else None),
                self.command_timeout,
            )
        except TimeoutError as exc:
            proc.kill()
            await proc.wait()
            raise SchedulerError(
                f"{argv[0]} did not answer within {self.command_timeout:.0f} s; is slurmctld up?",
                status=503,
            ) from exc
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    # -- the Scheduler interface ----------------------------------------------------------
    async def submit(self, spec: JobSpec) -> str:
        if self._closed:
            raise SchedulerError("the SLURM backend is closed", status=503)
        tier = self.policy.check(spec)
        account = await asyncio.to_thread(self.accounts.ensure, spec.user)
        output = str(self.log_dir / "%j.out") if self.log_dir else None
        uid = gid = chdir = None
        if account.switches:
            jobs = await asyncio.to_thread(private_dir, account, "slurm")
            output, uid, gid, chdir = str(jobs / "%j.out"), account.uid, account.gid, account.home
        argv = sbatch_argv(
            spec,
            tier,
            self.partitions.get(tier.name),
            self.qos.get(tier.name),
            output,
            uid=uid,
            gid=gid,
            chdir=chdir,
        )
        secrets_file = await asyncio.to_thread(self._write_secrets, account, spec)
        launcher = [sys.executable, "-I", "-m", "beamhub.kernels.jobsecrets"]
        script = batch_script(spec, secrets_file, launcher)
        try:
            rc, out, err = await self._run(argv, stdin=script)
        except BaseException:
            if secrets_file:
                with contextlib.suppress(OSError):
                    os.unlink(secrets_file)
            raise
        if rc != 0 and secrets_file:
            with contextlib.suppress(OSError):
                os.unlink(secrets_file)
        if rc != 0:
            why = "; ".join(
                ln.removeprefix("sbatch: error: ").strip()
                for ln in (err.strip() or out.strip()).splitlines()
            )
            raise SchedulerError(
                f"sbatch refused the job: {why}", status=400 if "error: " in err else 503
            )
        job_id = parse_sbatch(out)
        self._specs[job_id] = spec
        if self.records is not None:
            await asyncio.to_thread(self.records.job, job_id, spec.project, tier.name, time.time())
        self._last[job_id] = JobInfo(job_id=job_id, spec=spec, state=JobState.PENDING)
        self._events.publish(
            "queued",
            job_id,
            tier=tier.name,
            message=f"queued at tier {tier.name} (SLURM job {job_id})",
        )
        self._ensure_watching()
        return job_id

    def _write_secrets(self, account: Account, spec: JobSpec) -> str | None:
        """The credentials of ``spec.env`` in a new 0600 file of the account (None: none)."""
        secrets = secret_env(spec.env)
        if not secrets:
            return None
        folder = private_dir(account, "secrets")
        path = folder / f"{uuid.uuid4().hex}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            if account.switches:
                os.fchown(fd, account.uid, account.gid)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(secrets, fh)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return str(path)

    async def status(self, job_ids: list[str]) -> dict[str, JobInfo]:
        ids = [j for j in dict.fromkeys(job_ids) if j.isdigit()]
        found: dict[str, JobInfo] = {}
        if ids:
            rc, out, err = await self._run(
                [
                    "squeue",
                    "--noheader",
                    "--states=all",
                    f"--jobs={','.join(ids)}",
                    f"--Format={SQUEUE_FORMAT}",
                ]
            )
            if rc == 0:
                found = parse_squeue(out)
            elif "Invalid job id" not in err:  # all ids unknown is not an error
                raise SchedulerError(f"squeue failed: {err.strip()}", status=503)
        missing = [j for j in ids if j not in found]
        if missing and self.use_sacct:
            rc, out, err = await self._run(
                [
                    "sacct",
                    "--parsable2",
                    "--noheader",
                    "--allocations",
                    f"--jobs={','.join(missing)}",
                    f"--format={','.join(SACCT_FIELDS)}",
                ]
            )
            if rc == 0:
                found.update({k: v for k, v in parse_sacct(out).items() if k in missing})
        result = {}
        for job_id in job_ids:
            info = found.get(job_id) or JobInfo(
                job_id=job_id,
                spec=None,
                state=JobState.UNKNOWN,
                reason="SLURM does not know this job (finished longer than MinJobAge ago, "
                "or never existed)",
            )
            if job_id in self._specs:
                info.spec = self._specs[job_id]
            result[job_id] = info
        return result

    async def cancel(self, job_id: str) -> None:
        if not job_id.isdigit():
            raise SchedulerError(f"no job with id {job_id!r}", status=404, field="job_id")
        rc, _out, err = await self._run(["scancel", "--verbose", job_id])
        # scancel exits 0 even for an unknown id: its stderr says what happened
        if "Invalid job id" in err:
            raise SchedulerError(f"no job with id {job_id!r}", status=404, field="job_id")
        if "already completing or completed" in err:
            return
        if rc != 0:
            raise SchedulerError(f"scancel failed: {err.strip()}", status=503)

    async def list(self, project: str | None = None) -> list[JobInfo]:
        rc, out, err = await self._run(
            ["squeue", "--noheader", "--states=all", f"--Format={SQUEUE_FORMAT}"]
        )
        if rc != 0:
            raise SchedulerError(f"squeue failed: {err.strip()}", status=503)
        jobs = []
        for job_id, info in parse_squeue(out).items():
            if info.spec is None:  # not submitted by beamhub
                continue
            if job_id in self._specs:
                info.spec = self._specs[job_id]
            if project is None or info.spec.project == project:
                jobs.append(info)
        return jobs

    def events(self) -> AsyncIterator[dict]:
        self._ensure_watching()
        return self._events.subscribe()

    async def close(self) -> None:
        """Stop watching; SLURM keeps the jobs (a new backend finds them with ``list``)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._events.close()

    # -- watching: squeue diffs → events ----------------------------------------------------
    def _ensure_watching(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while not self._closed:
            try:
                await self.poll_once()
            except SchedulerError as exc:  # slurmctld restarting: try again next round
                self.log.warning("polling SLURM failed: %s", exc.message)
            await asyncio.sleep(self.poll_interval)

    async def poll_once(self) -> None:
        """One squeue call for every watched job; publishes what changed since the last one.

        SLURM does not say who preempted whom: a watched job that started on the node where
        watched jobs were just requeued is reported as "preempting N <tier> jobs on nX" (also
        when squeue shows the requeue one poll after the start)."""
        watched = [j for j, info in self._last.items() if info.state not in TERMINAL_STATES]
        if not watched:
            return
        now = await self.status(watched)
        clock = time.monotonic()
        if self.records is not None:
            await asyncio.to_thread(self._record_runs, watched, now, time.time())
        requeued = set()
        for job_id in watched:
            old, new = self._last[job_id], now[job_id]
            if new.requeues > old.requeues:
                node = old.node or "?"
                requeued.add(job_id)
                self._recent_victims.setdefault(node, []).append((job_id, clock))
                self._events.publish(
                    "preempted",
                    job_id,
                    node=node,
                    by=None,
                    message=f"preempted on {node} and requeued by SLURM",
                )
                self._events.publish("requeued", job_id, message=new.reason)
        for job_id in watched:
            old, new = self._last[job_id], now[job_id]
            self._last[job_id] = new
            started = (
                new.state is JobState.RUNNING
                and job_id not in requeued
                and (old.state is not JobState.RUNNING or new.start_time != old.start_time)
            )
            if started:
                node = new.node or "?"
                self._recent_start[node] = (job_id, clock)
                self._match_preemption(node, clock)
                self._events.publish("started", job_id, node=node, message=f"started on {node}")
            elif new.state in TERMINAL_STATES and old.state is not new.state:
                self._events.publish(
                    _EVENT_FOR[new.state], job_id, exit_code=new.exit_code, message=new.reason
                )
        for node in list(self._recent_victims):  # the requeue showed up after the start
            self._match_preemption(node, clock)

    def _record_runs(self, watched: list[str], now: dict[str, JobInfo], wall: float) -> None:
        """Runs that ended since the last poll, as SLURM dates them; a requeued run (squeue then
        shows no end) ends when the next job started on its node, else at this poll."""
        assert self.records is not None
        for job_id in watched:
            old, new = self._last[job_id], now[job_id]
            spec = self._specs.get(job_id)
            nodes = spec.nodes if spec is not None else 1
            if new.requeues > old.requeues and old.start_time:
                later = [
                    info.start_time
                    for info in now.values()
                    if info.state is JobState.RUNNING
                    and info.node == old.node
                    and info.start_time
                    and info.start_time > old.start_time
                ]
                self.records.run(job_id, old.start_time, min([wall, *later]), nodes, "requeued")
            if new.state in TERMINAL_STATES and old.state is not new.state and new.start_time:
                self.records.run(
                    job_id, new.start_time, new.end_time or wall, nodes, new.state.value
                )

    def _match_preemption(self, node: str, clock: float, window: float = 30.0) -> None:
        """Pair jobs requeued on ``node`` with the watched job that started there (±window s)."""
        recent = [(v, t) for v, t in self._recent_victims.get(node, []) if clock - t < window]
        victims = [v for v, _ in recent]
        job_id, started = self._recent_start.get(node, ("", -window))
        # the preemptor starts after its victims were requeued, seen at most a poll or two apart
        slack = 2 * self.poll_interval + 1
        if (
            victims
            and job_id not in ("", *victims)
            and started >= min(t for _, t in recent) - slack
        ):
            self._recent_victims.pop(node, None)
            self._recent_start.pop(node, None)
            self._announce_preempting(job_id, node, victims)

    def _announce_preempting(self, job_id: str, node: str, victims: list[str]) -> None:
        tiers = sorted({self._specs[v].tier if v in self._specs else "?" for v in victims})
        noun = "job" if len(victims) == 1 else "jobs"
        self._events.publish(
            "preempting",
            job_id,
            victims=victims,
            node=node,
            message=f"preempting {len(victims)} {'/'.join(tiers)} {noun} on {node}",
        )

    def watch(self, job_id: str) -> None:
        """Also report events for a job submitted elsewhere (e.g. before a hub restart)."""
        self._last.setdefault(job_id, JobInfo(job_id=job_id, spec=None, state=JobState.UNKNOWN))
        self._ensure_watching()


def main(argv: list[str]) -> int:
    """``python -m kernels.slurm partitions [TIERS.yaml]``: slurm.conf lines for the tiers."""
    if argv[:1] == ["partitions"]:
        try:
            print("\n".join(partition_lines(load_tiers(argv[1] if len(argv) > 1 else None))))
        except SchedulerError as exc:
            print(f"kernels.slurm: {exc.message}", file=sys.stderr)
            return 2
        return 0
    print("usage: python -m kernels.slurm partitions [TIERS.yaml]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
