"""Dask on the allocation: one call from a notebook starts workers as jobs of its project and tier.

The Dask scheduler runs in the notebook's kernel (as dask-jobqueue does); every worker is a job
submitted through the beamhub scheduler with the project and tier the spawner put in the server's
environment (``BEAMHUB_PROJECT``, ``BEAMHUB_TIER``), so during beamtime the workers start at the
elevated tier too. Local backend: :class:`AllocationCluster` (a ``distributed.SpecCluster`` whose
workers are scheduler jobs). SLURM backend: dask-jobqueue's ``SLURMCluster`` with the tier's sbatch
flags. Both scale up/down, close with the kernel (atexit), and link the dashboard through the hub's
proxy (jupyter-server-proxy: ``/user/<name>/proxy/<port>/status``).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import uuid
import weakref
from pathlib import Path
from typing import Any

import dask
from distributed import Client, Scheduler, SpecCluster
from distributed.deploy.spec import ProcessInterface

from beamhub.kernels.backends import SchedulerConfig, open_scheduler
from beamhub.kernels.scheduler import JobSpec, JobState, SchedulerError

__all__ = [
    "AllocationCluster",
    "WorkerJob",
    "dashboard_link_template",
    "dask_workers_from_env",
    "start_dask",
]

log = logging.getLogger(__name__)


def dashboard_link_template(environ: dict[str, str] | None = None) -> str:
    """The dashboard link as seen from the browser: through the hub's proxy inside a server."""
    env = os.environ if environ is None else environ
    if env.get("JUPYTERHUB_SERVICE_PREFIX"):
        # jupyter-server-proxy in the single-user server forwards /proxy/<port>/ to localhost
        return "{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status"
    return "http://{host}:{port}/status"


def _default_output_dir() -> Path | None:
    """Worker logs go to ``~/.beamhub/dask`` inside a beamhub job (the workers run as the same
    account, so they can write there; the state dir is not theirs to see); elsewhere None, the
    backend's own log folder."""
    if os.environ.get("BEAMHUB_JOB_ID") and os.environ.get("HOME"):
        return Path(os.environ["HOME"]) / ".beamhub" / "dask"
    return None


class WorkerJob(ProcessInterface):
    """One Dask worker run as a scheduler job; ``close`` cancels the job."""

    def __init__(
        self,
        scheduler: str,
        name: str,
        *,
        config: SchedulerConfig,
        project: str,
        tier: str,
        user: str,
        nthreads: int = 1,
        memory_mb: int = 512,
        walltime_s: int = 3600,
        output_dir: str | None = None,
        death_timeout_s: int = 60,
    ) -> None:
        super().__init__(scheduler=scheduler, name=name)
        self.scheduler_address = scheduler
        self.name = name
        self.config = config
        self.project, self.tier, self.user = project, tier, user
        self.nthreads, self.memory_mb, self.walltime_s = nthreads, memory_mb, walltime_s
        self.output_dir = Path(output_dir) if output_dir else _default_output_dir()
        self.death_timeout_s = death_timeout_s
        self.job_id: str | None = None
        self.error = ""

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "distributed.cli.dask_worker",
            self.scheduler_address,
            "--name",
            str(self.name),
            "--nthreads",
            str(self.nthreads),
            "--memory-limit",
            f"{self.memory_mb}MiB",
            "--no-nanny",
            "--no-dashboard",
            "--death-timeout",
            str(self.death_timeout_s),
        ]

    async def start(self) -> None:
        backend = await open_scheduler(self.config)
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k.startswith(("BEAMHUB_", "DASK_"))}
        env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
        spec = JobSpec(
            name=f"dask-worker-{self.name}",
            project=self.project,
            user=self.user,
            tier=self.tier,
            argv=self.argv(),
            env=env,
            cpus=self.nthreads,
            mem_mb=self.memory_mb,
            walltime_s=self.walltime_s,
            output=str(self.output_dir / f"worker-{self.name}.log") if self.output_dir else None,
        )
        try:
            self.job_id = await backend.submit(spec)
        except SchedulerError as exc:  # e.g. the window closed: the tier is no longer held
            self.error = exc.message
            raise
        log.info("dask worker %s submitted as job %s at tier %s", self.name, self.job_id, self.tier)
        await super().start()

    async def close(self) -> None:
        if self.job_id is not None:
            backend = await open_scheduler(self.config)
            with contextlib.suppress(SchedulerError):
                await backend.cancel(self.job_id)
        await super().close()

    async def state(self) -> tuple[JobState, str]:
        """The job's state and the scheduler's reason (why it waits or failed)."""
        if self.job_id is None:
            return JobState.FAILED, f"not submitted: {self.error or 'no job yet'}"
        backend = await open_scheduler(self.config)
        info = (await backend.status([self.job_id]))[self.job_id]
        return info.state, info.reason


class AllocationCluster(SpecCluster):
    """A Dask cluster whose workers are beamhub scheduler jobs of one project and tier."""

    def __init__(
        self,
        n_workers: int = 0,
        *,
        project: str | None = None,
        tier: str | None = None,
        user: str | None = None,
        config: SchedulerConfig | None = None,
        nthreads: int = 1,
        memory_mb: int = 512,
        walltime_s: int = 3600,
        host: str = "127.0.0.1",
        asynchronous: bool = False,
        **kwargs: Any,
    ) -> None:
        self.config = config or SchedulerConfig.from_env()
        self.project = project or os.environ.get("BEAMHUB_PROJECT") or ""
        self.tier = tier or os.environ.get("BEAMHUB_TIER") or ""
        self.user = user or os.environ.get("BEAMHUB_USER") or os.environ.get("JUPYTERHUB_USER", "")
        missing = [n for n in ("project", "tier", "user") if not getattr(self, n)]
        if missing:
            raise SchedulerError(
                f"AllocationCluster needs {', '.join(missing)}: run it inside a beamhub server "
                "(the spawner sets BEAMHUB_PROJECT/BEAMHUB_TIER/BEAMHUB_USER) or pass them",
                field=missing[0],
            )
        worker = {
            "cls": WorkerJob,
            "options": {
                "config": self.config,
                "project": self.project,
                "tier": self.tier,
                "user": self.user,
                "nthreads": nthreads,
                "memory_mb": memory_mb,
                "walltime_s": walltime_s,
            },
        }
        scheduler = {
            "cls": Scheduler,
            "options": {"host": host, "dashboard_address": f"{host}:0"},
        }
        prefix = f"{self.project}-{uuid.uuid4().hex[:6]}"
        with dask.config.set({"distributed.dashboard.link": dashboard_link_template()}):
            super().__init__(
                scheduler=scheduler,
                worker=worker,
                asynchronous=asynchronous,
                name=f"beamhub-{prefix}",
                **kwargs,
            )
        self._link_template = dashboard_link_template()
        if n_workers:
            self.scale(n_workers)

    @property
    def dashboard_link(self) -> str:
        with dask.config.set({"distributed.dashboard.link": self._link_template}):
            return super().dashboard_link

    def job_ids(self) -> list[str]:
        """The scheduler job ids of the current workers."""
        return [w.job_id for w in self.workers.values() if getattr(w, "job_id", None)]

    async def _explain(self) -> str:
        reasons = []
        for name, worker in list(self.workers.items()):
            state, reason = await worker.state()
            if state is not JobState.RUNNING:
                reasons.append(
                    f"worker {name}: {state.value}{' (' + reason + ')' if reason else ''}"
                )
        return "; ".join(reasons) or "workers run but have not connected"

    def wait_for_workers(self, n_workers: int, timeout: float | None = None) -> None:
        """Wait for ``n_workers``; on timeout say why (queued behind busy nodes, failed...)."""
        try:
            super().wait_for_workers(n_workers, timeout=timeout)
        except TimeoutError as exc:
            why = self.sync(self._explain)
            raise TimeoutError(
                f"{n_workers} Dask workers not ready within {timeout} s at tier {self.tier}: {why}"
            ) from exc


def _slurm_cluster(
    n_workers: int, config: SchedulerConfig, project: str, tier: str, user: str, **kwargs: Any
) -> Any:
    """dask-jobqueue's SLURMCluster in the tier's partition (kernels.slurm_text maps each tier
    onto a partition of the same name; ``options["qos"]`` maps tiers onto QoS names)."""
    from dask_jobqueue import SLURMCluster

    def safe(value: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.@+-]", "_", value)

    qos = (config.options.get("qos") or {}).get(tier)
    # the same label kernels.slurm puts on its jobs, so `beamhub scheduler jobs` lists them too
    label = f"beamhub project={safe(project)} user={safe(user)} tier={safe(tier)}"
    extra = [f'--comment="{label}"']  # quoted: an #SBATCH line ends at the first space
    # the kernel's environment holds its tokens: slurmctld stores a job's exported environment
    extra.append("--export=NONE")
    if qos:
        extra.append(f"--qos={qos}")
    # job output goes to the state folder, never the kernel's working directory; `interface`
    # (e.g. "lo" for a one-host test cluster) pins where the scheduler and workers listen
    log_dir = config.options.get("log_directory") or str(Path(config.state_dir) / "dask-logs")
    cluster = SLURMCluster(
        queue=(config.options.get("partitions") or {}).get(tier, tier),
        cores=kwargs.pop("nthreads", 1),
        memory=f"{kwargs.pop('memory_mb', 1024)}MiB",
        walltime=None,
        job_extra_directives=extra,
        scheduler_options={"dashboard_address": ":0"},
        interface=config.options.get("interface"),
        log_directory=log_dir,
        **kwargs,
    )
    cluster.scale(n_workers)
    return cluster


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_clusters() -> None:
    """The kernel exits: cancel the worker jobs so no node stays busy for nothing."""
    for cluster in list(_LIVE):
        with contextlib.suppress(Exception):
            cluster.close(timeout=10)


#: Workers when neither ``n_workers`` nor ``BEAMHUB_DASK_WORKERS`` says how many.
DEFAULT_DASK_WORKERS = 2


def dask_workers_from_env(environ: dict[str, str] | None = None) -> int:
    """The worker count the spawn options form chose (``BEAMHUB_DASK_WORKERS``), else 2."""
    env = os.environ if environ is None else environ
    raw = env.get("BEAMHUB_DASK_WORKERS", "").strip()
    if not raw:
        return DEFAULT_DASK_WORKERS
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(
            f"BEAMHUB_DASK_WORKERS: {raw!r} is not a number of workers >= 0; pick the count in "
            "the spawn options form or pass start_dask(n_workers=...)"
        )
    return n


def start_dask(
    n_workers: int | None = None,
    *,
    wait: bool = True,
    timeout: float = 60.0,
    project: str | None = None,
    tier: str | None = None,
    **kwargs: Any,
) -> Client:
    """Start ``n_workers`` Dask workers on the allocation and return a connected Client.

    Without ``n_workers``, the count chosen in the spawn options form (the server's
    ``BEAMHUB_DASK_WORKERS``), else 2.

    The cluster is ``client.cluster``: ``client.cluster.scale(n)`` scales up or down,
    ``client.cluster.close()`` (or the kernel's exit) cancels every worker job, and
    ``client.dashboard_link`` opens the dashboard through the hub.
    """
    if n_workers is None:
        n_workers = dask_workers_from_env()
    config = kwargs.pop("config", None) or SchedulerConfig.from_env()
    tier = tier or os.environ.get("BEAMHUB_TIER") or ""
    if config.backend == "slurm":
        project = project or os.environ.get("BEAMHUB_PROJECT") or ""
        user = os.environ.get("BEAMHUB_USER") or os.environ.get("JUPYTERHUB_USER", "")
        # the kernel's dashboard, through the hub's proxy (read whenever a link is formatted)
        dask.config.set({"distributed.dashboard.link": dashboard_link_template()})
        cluster = _slurm_cluster(n_workers, config, project, tier, user, **kwargs)
    else:
        cluster = AllocationCluster(n_workers, project=project, tier=tier, config=config, **kwargs)
    _LIVE.add(cluster)
    client = Client(cluster)
    if wait and n_workers:
        try:
            cluster.wait_for_workers(n_workers, timeout=timeout)
        except BaseException:
            client.close()
            cluster.close()
            raise
    return client
