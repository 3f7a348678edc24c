"""The embedded scheduler: virtual nodes on this machine, jobs as process groups, preemption."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from beamhub.auth.home import state_dir
from beamhub.kernels.accounts import Account, AccountMap
from beamhub.kernels.local_store import LocalJob, LocalJobStore, Run
from beamhub.kernels.sandbox import (
    NodeLimits,
    account_argv,
    bwrap_argv,
    hidden_roots,
    owned_dir,
    require_bwrap,
)
from beamhub.kernels.scheduler import (
    EventHub,
    JobInfo,
    JobOutput,
    JobSpec,
    JobState,
    Scheduler,
    SchedulerError,
    read_tail,
)
from beamhub.kernels.tier_policy import TierPolicy

__all__ = ["LocalBackend", "VirtualNode", "read_jobs", "virtual_nodes"]

WRAPPER = str(Path(__file__).with_name("_jobwrap.py"))
#: What a job run as another account keeps of the hub's environment (nothing secret).
KEEP_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")


@dataclass(frozen=True)
class VirtualNode:
    """A slice of this machine that jobs are placed on, like a compute node."""

    name: str
    cpus: int = 1
    mem_mb: int = 1000


def virtual_nodes(
    count: int = 4, cpus_per_node: int = 1, mem_mb_per_node: int = 1000
) -> list[VirtualNode]:
    """The nodes ``n1`` … ``nN`` of a local backend built with these options."""
    return [VirtualNode(f"n{i}", cpus_per_node, mem_mb_per_node) for i in range(1, count + 1)]


class LocalBackend(Scheduler):
    """N virtual nodes with CPU/memory slots; highest tier first; preemption by SIGTERM → grace →
    SIGKILL of the lowest-tier, youngest job(s) the tier may preempt. State lives in SQLite:
    a new LocalBackend on the same database re-attaches to jobs that are still running.

    Tenancy (kernels/accounts.py, kernels/sandbox.py): ``run_as="account"`` (root only) runs
    each job as its user's Unix account (``account_template``, homes under ``home_root``),
    by default inside the bubblewrap sandbox with per-node cgroup limits (``sandbox``);
    ``run_as="self"`` runs every job as the hub's own account (dev enclave without root).
    ``hide``: folders the sandbox covers (default: the beamhub state dir and this backend's).
    """

    name = "local"

    def __init__(
        self,
        db_path: str | Path | None = None,
        nodes: int | list[VirtualNode] = 4,
        cpus_per_node: int = 1,
        mem_mb_per_node: int = 1000,
        policy: TierPolicy | None = None,
        log_dir: str | Path | None = None,
        poll_interval: float = 0.1,
        run_as: str = "self",
        account_template: str = "bh-{username}",
        home_root: str = "",
        sandbox: bool | None = None,
        hide: list[str] | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        if db_path is None:
            db_path = state_dir() / "scheduler" / "local-jobs.sqlite"
        self.db_path = Path(db_path)
        self.log_dir = Path(log_dir) if log_dir else self.db_path.parent / "job-logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(nodes, int):
            nodes = virtual_nodes(nodes, cpus_per_node, mem_mb_per_node)
        self.nodes = {n.name: n for n in nodes}
        self.policy = policy or TierPolicy()
        self.tiers = self.policy.tiers
        self.poll_interval = poll_interval
        self.log = log or logging.getLogger("beamhub.kernels.local")
        self.accounts = AccountMap(run_as, account_template, home_root, log=self.log)
        self.sandbox = run_as == "account" if sandbox is None else bool(sandbox)
        self.limits: NodeLimits | None = None
        if self.sandbox:
            if run_as != "account":
                raise SchedulerError(
                    "sandbox=True needs run_as='account' (bubblewrap starts as root and drops "
                    "to the user's account)",
                    status=500,
                    field="sandbox",
                )
            self._bwrap = require_bwrap()
            self._hide = hidden_roots(hide or [state_dir(), self.db_path.parent, self.log_dir])
            self.limits = NodeLimits(str(self.db_path.resolve()), log=self.log)
        self.log.info(
            "local backend: %s; %s",
            self.accounts.describe(),
            f"sandbox: bubblewrap, hidden {', '.join(self._hide)}; {self.limits.summary}"
            if self.sandbox and self.limits
            else "no sandbox (jobs see what the account sees)",
        )
        self._store = LocalJobStore(self.db_path)
        self._events = EventHub()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self._jobs: dict[str, LocalJob] = {}
        for job in self._store.load():
            self._jobs[job.job_id] = job
            if job.state is JobState.RUNNING:
                self._reattach(job)
        self._seq = self._store.next_seq()

    # -- the Scheduler interface ----------------------------------------------------------
    async def submit(self, spec: JobSpec) -> str:
        self._ensure_started()
        tier = self.policy.check(spec)
        self._check_fits(spec)
        await asyncio.to_thread(self.accounts.ensure, spec.user)  # useradd on first use
        job = LocalJob(seq=self._seq, spec=spec, priority=tier.priority, submit_time=time.time())
        self._seq += 1
        job.output = spec.output or str(self.log_dir / f"{job.job_id}.out")
        ahead = sum(1 for j in self._jobs.values() if j.state is JobState.PENDING)
        job.reason = f"queued at tier {tier.name}"
        self._jobs[job.job_id] = job
        self._store.save(job)
        self._events.publish(
            "queued",
            job.job_id,
            tier=tier.name,
            message=f"queued at tier {tier.name} ({ahead} pending ahead)"
            if ahead
            else f"queued at tier {tier.name}",
        )
        self._tick()
        return job.job_id

    async def status(self, job_ids: list[str]) -> dict[str, JobInfo]:
        self._ensure_started()
        return {
            jid: self._jobs[jid].info()
            if jid in self._jobs
            else JobInfo(job_id=jid, spec=None, state=JobState.UNKNOWN, reason="no such job")
            for jid in job_ids
        }

    async def cancel(self, job_id: str) -> None:
        self._ensure_started()
        job = self._jobs.get(job_id)
        if job is None:
            raise SchedulerError(f"no job with id {job_id!r}", status=404, field="job_id")
        if job.state is JobState.PENDING:
            job.state, job.end_time, job.reason = JobState.CANCELLED, time.time(), "cancelled"
            job.reserved = []
            self._store.save(job)
            self._events.publish("cancelled", job_id, message="cancelled while queued")
        elif job.state is JobState.RUNNING:
            self._terminate(job, "cancel")
        self._wake.set()

    async def output(self, job_id: str) -> JobOutput:
        """The end of the job's stdout+stderr, from the file this backend opened for it. A job
        whose spec names its own output file (opened by the job itself) is read there."""
        job = self._jobs.get(job_id)
        if job is None:
            raise SchedulerError(f"no job {job_id!r}", status=404, field="job_id")
        if job.spec.output:
            raise SchedulerError(
                f"job {job_id} writes its output to its own file {job.spec.output}; read it there",
                status=404,
                field="job_id",
            )
        return await asyncio.to_thread(read_tail, job_id, self.log_dir / f"{job_id}.out")

    async def list(self, project: str | None = None) -> list[JobInfo]:
        return [j.info() for j in self._jobs.values() if project in (None, j.spec.project)]

    def events(self) -> AsyncIterator[dict]:
        return self._events.subscribe()

    async def close(self, cancel_jobs: bool = False) -> None:
        """Stop the scheduling loop. Running jobs keep running unless ``cancel_jobs``."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if cancel_jobs:
            for job in self._jobs.values():
                if job.state is JobState.PENDING:
                    job.state, job.reason, job.reserved = JobState.CANCELLED, "cancelled", []
                    self._store.save(job)
                elif job.state is JobState.RUNNING and job.pid:
                    job.kill_reason = "cancel"
                    self._signal(job, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while self._running() and time.monotonic() < deadline:
                self._reap()
                if self._running():
                    await asyncio.sleep(0.02)
            if self.limits is not None:
                self.limits.remove()
        self._events.close()

    # -- loop -----------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._closed:
            raise SchedulerError("the local scheduler is closed", status=503)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while not self._closed:
            try:
                self._tick()
            except Exception:  # the loop must survive one bad job; the log has the traceback
                self.log.exception("local scheduler tick failed")
            self._wake.clear()
            # asyncio.wait, not wait_for: 3.11's wait_for can swallow a cancellation that
            # arrives just as the event fires, and close() would then wait forever
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=self.poll_interval)
            finally:
                waiter.cancel()

    def _running(self) -> list[LocalJob]:
        return [j for j in self._jobs.values() if j.state is JobState.RUNNING]

    def _tick(self) -> None:
        self._reap()
        pending = sorted(
            (j for j in self._jobs.values() if j.state is JobState.PENDING),
            key=lambda j: (-j.priority, j.seq),
        )
        for job in pending:
            placement = self._place(job)
            if placement:
                self._launch(job, placement)
            elif not self._victims_of(job):  # else: wait for its victims to exit
                self._try_preempt(job)

    def _victims_of(self, job: LocalJob) -> list[str]:
        return [j.job_id for j in self._running() if j.preempted_by == job.job_id]

    # -- placement ------------------------------------------------------------------------
    def _check_fits(self, spec: JobSpec) -> None:
        fitting = [
            n for n in self.nodes.values() if n.cpus >= spec.cpus and n.mem_mb >= spec.mem_mb
        ]
        if len(fitting) < spec.nodes:
            sizes = ", ".join(f"{n.name}: {n.cpus} CPU/{n.mem_mb} MB" for n in self.nodes.values())
            raise SchedulerError(
                f"job asks for {spec.nodes} node(s) with {spec.cpus} CPU and {spec.mem_mb} MB each; "
                f"the virtual nodes are {sizes}; ask for less",
                field="cpus",
            )

    def _free(self, exclude: LocalJob | None, count_dying: bool) -> dict[str, list[int]]:
        """Free [cpus, mem] per node, minus nodes reserved by other pending preemptors.
        ``count_dying=False`` treats jobs being preempted as already gone."""
        free = {n.name: [n.cpus, n.mem_mb] for n in self.nodes.values()}
        for job in self._jobs.values():
            if job is exclude:
                continue
            holds = job.state is JobState.RUNNING and (count_dying or job.kill_reason is None)
            nodes = job.nodes if holds else job.reserved if job.state is JobState.PENDING else []
            for name in nodes:
                if name in free:
                    free[name][0] -= job.spec.cpus
                    free[name][1] -= job.spec.mem_mb
        return free

    def _place(self, job: LocalJob) -> list[str]:
        free = self._free(job, count_dying=True)
        fits = [n for n, (c, m) in free.items() if c >= job.spec.cpus and m >= job.spec.mem_mb]
        if job.reserved:  # the nodes it preempted for come first
            fits.sort(key=lambda n: n not in job.reserved)
        return fits[: job.spec.nodes] if len(fits) >= job.spec.nodes else []

    def _try_preempt(self, job: LocalJob) -> None:
        """Stop the fewest, lowest-tier, youngest jobs this job's tier may preempt."""
        tier = self.tiers.get(job.spec.tier)
        free = self._free(job, count_dying=False)
        plans = []
        for name, (cpus, mem) in free.items():
            victims = []
            candidates = sorted(
                (
                    v
                    for v in self._running()
                    if name in v.nodes
                    and v.kill_reason is None
                    and tier.can_preempt(self.tiers.get(v.spec.tier))
                ),
                key=lambda v: (v.priority, -(v.start_time or 0), -v.seq),
            )
            for victim in candidates:
                if cpus >= job.spec.cpus and mem >= job.spec.mem_mb:
                    break
                victims.append(victim)
                cpus, mem = cpus + victim.spec.cpus, mem + victim.spec.mem_mb
            if cpus >= job.spec.cpus and mem >= job.spec.mem_mb:
                key = (
                    len(victims),
                    max((v.priority for v in victims), default=0),
                    -min((v.start_time or 0 for v in victims), default=0),
                )
                plans.append((key, name, victims))
        plans.sort(key=lambda p: p[0])
        if len(plans) < job.spec.nodes:
            held = (
                "no lower tier it may preempt"
                if not tier.preempts
                else (f"nothing preemptible ({', '.join(tier.preempts)}) to make room")
            )
            reason = f"waiting for free nodes: all {len(self.nodes)} busy, {held}"
            if job.reason != reason:
                job.reason = reason
                self._store.save(job)
                self._events.publish("waiting", job.job_id, message=reason)
            return
        chosen = plans[: job.spec.nodes]
        job.reserved = [name for _, name, _ in chosen]
        victims = [v for _, _, vs in chosen for v in vs]
        for victim in victims:
            victim.preempted_by = job.job_id
            self._terminate(victim, "preempt")
            self._events.publish(
                "preempted",
                victim.job_id,
                by=job.job_id,
                node=",".join(victim.nodes),
                message=f"preempted by job {job.job_id} (tier {tier.name})",
            )
        if victims:
            tiers = sorted({v.spec.tier for v in victims})
            noun = "job" if len(victims) == 1 else "jobs"
            job.reason = (
                f"preempting {len(victims)} {'/'.join(tiers)} {noun} on {', '.join(job.reserved)}"
            )
            self._events.publish(
                "preempting",
                job.job_id,
                victims=[v.job_id for v in victims],
                node=",".join(job.reserved),
                message=job.reason,
            )
        self._store.save(job)

    # -- processes ------------------------------------------------------------------------
    def _launch(self, job: LocalJob, nodes: list[str]) -> None:
        exit_file = self._exit_file(job)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(exit_file)
        try:
            account = self.accounts.lookup(job.spec.user)
            if account is None:
                raise SchedulerError(f"the Unix account of {job.spec.user!r} is gone")
            argv, env, stdout = self._command(job, nodes, account, exit_file)
            with open(stdout, "ab") as out:  # append: a requeued job's output is kept
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=None if account.switches else job.spec.workdir,
                    env=env,
                    start_new_session=True,
                )
        except (OSError, SchedulerError) as exc:
            job.state, job.end_time = JobState.FAILED, time.time()
            job.reason = f"could not start: {exc}"
            self._store.save(job)
            self._events.publish("failed", job.job_id, message=job.reason)
            return
        job.popen, job.pid, job.nodes, job.reserved = popen, popen.pid, nodes, []
        with contextlib.suppress(psutil.Error):
            job.pid_ctime = psutil.Process(popen.pid).create_time()
        job.state, job.start_time, job.exit_code = JobState.RUNNING, time.time(), None
        job.kill_reason = job.kill_deadline = job.preempted_by = None
        job.killed = False
        job.reason = f"running on {', '.join(nodes)}"
        self._store.save(job)
        self._events.publish(
            "started", job.job_id, node=",".join(nodes), message=f"started on {', '.join(nodes)}"
        )

    def _command(
        self, job: LocalJob, nodes: list[str], account: Account, exit_file: str
    ) -> tuple[list[str], dict[str, str], str]:
        """argv, environment and the file the wrapper's stdout goes to, for one launch.

        As another account, the job's environment is built from scratch (the hub's own holds
        secrets) and a user-chosen output file is opened by the job itself, as the account; the
        wrapper's own stream then goes to the backend's log folder, which only root can reach.
        """
        spec = job.spec
        job_vars = {
            "BEAMHUB_JOB_ID": job.job_id,
            "BEAMHUB_NODE": nodes[0],
            "BEAMHUB_NODES": ",".join(nodes),
            "BEAMHUB_TIER": self.tiers.get(spec.tier).name,
            "BEAMHUB_PROJECT": spec.project,
            "BEAMHUB_REQUEUES": str(job.requeues),
        }
        wrapper = [sys.executable, "-I", WRAPPER, exit_file]
        if not account.switches:
            home = {"HOME": account.home} if self.accounts.home_root_set else {}
            env = {**os.environ, **home, **spec.env, **job_vars}
            return [*wrapper, "--", *spec.argv], env, str(job.output)
        kept = {k: os.environ[k] for k in KEEP_ENV if k in os.environ}
        identity = {
            "HOME": account.home,
            "USER": account.name,
            "LOGNAME": account.name,
            "SHELL": "/bin/bash",
        }
        env = {**kept, **spec.env, **identity, **job_vars}
        stdout = str(self.log_dir / f"{job.job_id}.out")
        own_output = spec.output or None
        if not self.sandbox:
            return [*wrapper, "--", *account_argv(account, spec.argv, own_output)], env, stdout
        writable = [account.home]
        for folder in (os.path.dirname(spec.output or ""), spec.workdir):
            real = owned_dir(folder, account) if folder else None
            if real:
                writable.append(real)
        node = self.nodes[nodes[0]]
        cgroups = self.limits.node(node.name, node.cpus, node.mem_mb) if self.limits else []
        inner = bwrap_argv(
            account,
            spec.argv,
            hide=self._hide,
            writable=writable,
            workdir=spec.workdir,
            output=own_output,
            bwrap=self._bwrap,
        )
        options = [a for procs in cgroups for a in ("--cgroup", procs)]
        return [*wrapper, *options, "--shield", "--", *inner], env, stdout

    def _exit_file(self, job: LocalJob) -> str:
        return str(self.log_dir / f"{job.job_id}.exit")

    def _signal(self, job: LocalJob, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(job.pid, sig)  # the wrapper is the group leader: pgid == pid

    def _terminate(self, job: LocalJob, why: str) -> None:
        if job.kill_reason is not None:
            return
        job.kill_reason = why
        grace = self.tiers.get(job.spec.tier).grace_s if why != "cancel" else 2.0
        job.kill_deadline = time.monotonic() + grace
        job.reason = {
            "preempt": f"preempted by job {job.preempted_by}",
            "cancel": "cancelling",
            "walltime": "wall time exceeded",
        }[why]
        self._signal(job, signal.SIGTERM)

    def _alive(self, job: LocalJob) -> int | bool | None:
        """True while running; else the wrapper's exit status if known (None when not)."""
        if job.popen is not None:
            rc = job.popen.poll()
            return True if rc is None else rc
        try:
            pid, status = os.waitpid(job.pid, os.WNOHANG)
        except ChildProcessError:  # not our child (re-attached after a restart)
            try:
                proc = psutil.Process(job.pid)
                same = job.pid_ctime is None or abs(proc.create_time() - job.pid_ctime) < 0.05
                if same and proc.status() != psutil.STATUS_ZOMBIE:
                    return True
            except psutil.Error:
                pass
            return None
        return True if pid == 0 else os.waitstatus_to_exitcode(status)

    def _reattach(self, job: LocalJob) -> None:
        """A job left RUNNING by an earlier scheduler: keep it if its process is the same."""
        if job.pid and self._alive(job) is True:
            self.log.info("re-attached to job %s (pid %s)", job.job_id, job.pid)
            job.reason = f"running on {', '.join(job.nodes)} (re-attached)"
            return
        self._finish(job, None, lost=True)

    def _reap(self) -> None:
        now = time.monotonic()
        for job in self._running():
            alive = self._alive(job)
            if alive is True:
                if job.kill_deadline is not None and now >= job.kill_deadline and not job.killed:
                    job.killed = True
                    self._signal(job, signal.SIGKILL)
                elif (
                    job.kill_reason is None
                    and job.start_time
                    and time.time() - job.start_time > job.spec.walltime_s
                ):
                    self._terminate(job, "walltime")
                continue
            self._finish(job, alive)

    def _finish(self, job: LocalJob, wrapper_rc: int | None, lost: bool = False) -> None:
        code: int | None = wrapper_rc
        with contextlib.suppress(OSError, ValueError):
            code = int(Path(self._exit_file(job)).read_text())
        job.exit_code, job.popen, job.pid = code, None, None
        why, job.kill_reason, job.kill_deadline = job.kill_reason, None, None
        requeue = job.spec.requeue or self.tiers.get(job.spec.tier).preempt_mode == "requeue"
        ran = (job.requeues, job.start_time, tuple(job.nodes))
        if why == "preempt" and requeue:
            job.state, job.requeues = JobState.PENDING, job.requeues + 1
            job.start_time, job.nodes = None, []
            job.reason = f"requeued after preemption by job {job.preempted_by}"
            self._events.publish("requeued", job.job_id, message=job.reason)
        else:
            job.end_time = time.time()
            if why == "preempt":
                job.state, job.reason = JobState.PREEMPTED, f"preempted by job {job.preempted_by}"
            elif why == "cancel":
                job.state, job.reason = JobState.CANCELLED, "cancelled"
            elif why == "walltime":
                job.state = JobState.FAILED
                job.reason = f"wall time of {job.spec.walltime_s} s exceeded"
            elif lost and code is None:
                job.state = JobState.FAILED
                job.reason = "ended while the scheduler was down; no exit status was recorded"
            elif code == 0:
                job.state, job.reason = JobState.COMPLETED, "exit code 0"
            else:
                job.state, job.reason = JobState.FAILED, f"exit code {code}"
            kind = {
                JobState.COMPLETED: "completed",
                JobState.CANCELLED: "cancelled",
                JobState.PREEMPTED: "preempted",
            }.get(job.state, "failed")
            if kind != "preempted":  # the preempted event went out with the SIGTERM
                self._events.publish(kind, job.job_id, exit_code=code, message=job.reason)
        self._store.save(job)
        if ran[1] is not None:
            outcome = "requeued" if job.state is JobState.PENDING else job.state.value
            self._store.save_run(
                Run(job.seq, ran[0], ran[1], job.end_time or time.time(), ran[2], outcome)
            )
        self._wake.set()


def read_jobs(db_path: str | Path) -> list[JobInfo]:
    """The local backend's jobs from its database, read-only (for `beamhub scheduler jobs`)."""
    return [j.info() for j in LocalJobStore(db_path).load()]
