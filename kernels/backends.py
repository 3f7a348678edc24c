"""The backend factory: how the spawner, the jobs API and Dask reach one scheduler and policy.

The hub's spawner and a notebook's ``start_dask()`` must use the same backend, state folder and
tier/project/reservation configuration; the spawner passes it to each job as ``BEAMHUB_*``
environment variables and both sides build it with :meth:`SchedulerConfig.from_env`.
Backends are opened once per process and event loop and shared.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from beamhub.auth.home import state_dir
from beamhub.kernels.hub_backend import HubScheduler
from beamhub.kernels.local import LocalBackend
from beamhub.kernels.metrics import track, untrack  # registered with the process's metrics
from beamhub.kernels.projects import ProjectDirectory
from beamhub.kernels.reservations import ReservationBook
from beamhub.kernels.scheduler import Scheduler, SchedulerError
from beamhub.kernels.slurm import SlurmBackend
from beamhub.kernels.tier_policy import TierPolicy
from beamhub.kernels.tiers import load_tiers

__all__ = [
    "BACKENDS",
    "SchedulerConfig",
    "check_backend_options",
    "close_schedulers",
    "open_scheduler",
    "policy_for",
]


def _default_state_dir() -> str:
    return str(state_dir() / "scheduler")


@dataclass(frozen=True)
class SchedulerConfig:
    """Which backend, where its state lives, and which tiers/projects/windows apply."""

    backend: str = "local"
    state_dir: str = field(default_factory=_default_state_dir)
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    tiers_file: str = ""
    projects_file: str = ""
    reservations_db: str = ""
    #: "hub" inside a job of the local backend: submit through the hub's jobs API
    via: str = ""

    @property
    def key(self) -> str:
        return json.dumps(
            [
                self.backend,
                self.state_dir,
                self.options,
                self.tiers_file,
                self.projects_file,
                self.reservations_db,
            ],
            sort_keys=True,
        )

    @property
    def reservations_path(self) -> str:
        return self.reservations_db or str(Path(self.state_dir) / "reservations.sqlite")

    def job_env(self, *, project: str, tier: str, user: str) -> dict[str, str]:
        """The environment a job gets so that it can submit more jobs of its project and tier."""
        return {
            "BEAMHUB_PROJECT": project,
            "BEAMHUB_TIER": tier,
            "BEAMHUB_USER": user,
            "BEAMHUB_SCHEDULER_BACKEND": self.backend,
            "BEAMHUB_SCHEDULER_STATE_DIR": self.state_dir,
            "BEAMHUB_SCHEDULER_OPTIONS": json.dumps(self.options),
            "BEAMHUB_SCHEDULER_TIERS": self.tiers_file,
            "BEAMHUB_SCHEDULER_PROJECTS": self.projects_file,
            "BEAMHUB_SCHEDULER_RESERVATIONS": self.reservations_db,
            # the local backend lives in the hub process: jobs reach it through the hub's API
            "BEAMHUB_SCHEDULER_VIA": "hub" if self.backend == "local" else "",
        }

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> SchedulerConfig:
        """The configuration the spawner handed to this job (defaults outside a job)."""
        env = os.environ if environ is None else environ
        try:
            options = json.loads(env.get("BEAMHUB_SCHEDULER_OPTIONS") or "{}")
        except ValueError as exc:
            raise SchedulerError(
                f"BEAMHUB_SCHEDULER_OPTIONS is not JSON: {exc}", field="BEAMHUB_SCHEDULER_OPTIONS"
            ) from exc
        return cls(
            backend=env.get("BEAMHUB_SCHEDULER_BACKEND") or "local",
            state_dir=env.get("BEAMHUB_SCHEDULER_STATE_DIR") or _default_state_dir(),
            options=options,
            tiers_file=env.get("BEAMHUB_SCHEDULER_TIERS") or "",
            projects_file=env.get("BEAMHUB_SCHEDULER_PROJECTS") or "",
            reservations_db=env.get("BEAMHUB_SCHEDULER_RESERVATIONS") or "",
            via=env.get("BEAMHUB_SCHEDULER_VIA") or "",
        )


#: The backends a configuration may name.
BACKENDS: dict[str, type[Scheduler]] = {"local": LocalBackend, "slurm": SlurmBackend}


def _backend_class(backend: str) -> type[Scheduler]:
    if backend in BACKENDS:
        return BACKENDS[backend]
    raise SchedulerError(
        f"unknown scheduler backend {backend!r}; use 'local' or 'slurm'", field="backend"
    )


#: Arguments the factory passes itself; not for backend_options.
_RESERVED = {"self", "policy", "db_path", "log", "records_path"}


def check_backend_options(backend: str, options: dict[str, Any]) -> None:
    """Refuse options the backend does not take, naming them and the ones it does."""
    params = inspect.signature(_backend_class(backend).__init__).parameters
    known = sorted(set(params) - _RESERVED)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise SchedulerError(
            f"backend_options: {', '.join(map(repr, unknown))} not known to the {backend} "
            f"backend; it takes {', '.join(known)}",
            field="backend_options",
        )


_POLICIES: dict[str, TierPolicy] = {}
_SCHEDULERS: dict[tuple[str, int], Scheduler] = {}


def policy_for(config: SchedulerConfig) -> TierPolicy:
    """The tier policy (tiers + projects + beamtime windows) of this configuration."""
    policy = _POLICIES.get(config.key)
    if policy is None:
        tiers = load_tiers(config.tiers_file or None)
        projects = (
            ProjectDirectory.from_yaml(config.projects_file, tiers)
            if config.projects_file
            else None
        )
        Path(config.reservations_path).parent.mkdir(parents=True, exist_ok=True)
        policy = TierPolicy(tiers, projects, ReservationBook(config.reservations_path, tiers))
        _POLICIES[config.key] = policy
    return policy


async def open_scheduler(config: SchedulerConfig) -> Scheduler:
    """The backend for this configuration, opened once per process and event loop."""
    key = (config.key, id(asyncio.get_running_loop()))
    scheduler = _SCHEDULERS.get(key)
    if scheduler is not None:
        return scheduler
    if config.via == "hub":
        _SCHEDULERS[key] = HubScheduler()
        return _SCHEDULERS[key]
    Path(config.state_dir).mkdir(parents=True, exist_ok=True)
    check_backend_options(config.backend, config.options)
    policy = policy_for(config)
    cls = _backend_class(config.backend)
    if config.backend == "local":
        db = str(Path(config.state_dir) / "local-jobs.sqlite")
        scheduler = cls(db_path=db, policy=policy, **config.options)
    else:  # SLURM forgets ended jobs: keep our own records for the allocation report
        records = str(Path(config.state_dir) / "slurm-jobs.sqlite")
        scheduler = cls(policy=policy, records_path=records, **config.options)
    _SCHEDULERS[key] = scheduler
    track(scheduler)  # queued/running by tier, preemptions, time-to-start (/hub/metrics)
    return scheduler


async def close_schedulers() -> None:
    """Close every backend this process opened on the running loop (jobs keep running)."""
    loop_id = id(asyncio.get_running_loop())
    for key in [k for k in _SCHEDULERS if k[1] == loop_id]:
        scheduler = _SCHEDULERS.pop(key)
        await untrack(scheduler)
        await scheduler.close()
