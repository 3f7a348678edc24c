"""JupyterHub spawner that places each single-user server on reserved nodes through the scheduler.

The server runs as a scheduler job at the user's effective tier (elevated inside the project's
beamtime window). The job reports its host:port in a file (`kernels.serverjob`) while the spawner
watches the job's state, so a job that dies first fails the spawn at once with the reason; the job
id, node and port are the spawner's state, so a hub restart re-attaches instead of losing servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from jupyterhub.spawner import Spawner
from jupyterhub.utils import maybe_future
from traitlets import (
    Bool,
    CaselessStrEnum,
    Dict,
    Float,
    Integer,
    TraitError,
    Unicode,
    default,
    validate,
)

from beamhub.auth.home import state_dir
from beamhub.auth.roles import ROLE_SCOPES, ROLES
from beamhub.kernels.accounts import Account, AccountMap, copy_as, private_dir
from beamhub.kernels.backends import (
    SchedulerConfig,
    check_backend_options,
    open_scheduler,
    policy_for,
)
from beamhub.kernels.scheduler import TERMINAL_STATES, JobSpec, JobState, SchedulerError
from beamhub.kernels.server_wait import ServerWait, SpawnRefused, server_answers
from beamhub.kernels.spawn_form import FormError, Offer, check_options, make_offer, render_form

__all__ = ["ReservedNodeSpawner", "SpawnRefused"]

_TERMINAL = TERMINAL_STATES


async def _options_form(spawner: ReservedNodeSpawner) -> str:
    """Project, tier, walltime, nodes and Dask workers; a viewer gets the dashboard instead."""
    offer = await spawner.offer()
    if not offer.projects:
        if offer.watch_only:  # the same refusal page as a viewer's spawn (pre_spawn_start)
            from beamhub.kernels.spawn_form import ViewerHasNoServer

            project = _strongest(offer.watch_only)
            raise ViewerHasNoServer(offer.watch_only[project], project)
        return ""  # roles unknown (another authenticator): spawn with the defaults
    return render_form(offer)


async def _options_from_form(formdata: dict[str, Any], spawner: ReservedNodeSpawner) -> dict:
    """The form's values, checked against what she may use now (never trusted as sent)."""
    return check_options(await spawner.offer(), formdata)


def _strongest(roles: dict[str, str]) -> str:
    """The project in which the role is strongest (ties: alphabetical)."""
    rank = {r: i for i, r in enumerate(ROLES)}
    return min(roles, key=lambda p: (rank.get(roles[p], len(ROLES)), p))


class ReservedNodeSpawner(Spawner):
    """Start single-user servers as scheduler jobs on reserved nodes (local or SLURM backend)."""

    backend = CaselessStrEnum(
        ["local", "slurm"],
        default_value="local",
        help="""Scheduler backend: 'local' (virtual nodes on this machine) or 'slurm'.

        Example: c.ReservedNodeSpawner.backend = "slurm"
        """,
    ).tag(config=True)

    backend_options = Dict(
        help="""Keyword arguments for the backend, e.g. {"nodes": 4, "cpus_per_node": 1}.

        Passed to the job's environment too (BEAMHUB_SCHEDULER_OPTIONS) so Dask workers started
        from a notebook reach the same scheduler. Example:
        c.ReservedNodeSpawner.backend_options = {"nodes": 4}
        """,
    ).tag(config=True)

    state_dir = Unicode(
        help="""Folder for the scheduler's database, reservations, port reports and job output.

        Default: $BEAMHUB_HOME/scheduler (~/.beamhub/scheduler).
        """,
    ).tag(config=True)

    tiers_file = Unicode(
        "",
        help="YAML file with the QoS tiers; empty = the built-in tiers "
        "(beamtime, interactive, normal, batch).",
    ).tag(config=True)

    projects_file = Unicode(
        "",
        help="YAML file with the projects, their members and granted tiers; empty = every user "
        "holds every tier that is not window-only (a laptop's dev setup).",
    ).tag(config=True)

    reservations_db = Unicode(
        "",
        help="SQLite file of the beamtime windows (QoS reservations); empty = "
        "<state_dir>/reservations.sqlite, where `beamhub scheduler reservation` writes them.",
    ).tag(config=True)

    project = Unicode(
        "",
        help="""Project charged when the spawn request names none.

        Order: user_options['project'], then this, then the first of the user's JupyterHub groups
        that is a project. Example: c.ReservedNodeSpawner.project = "lcls-p123"
        """,
    ).tag(config=True)

    tier = Unicode(
        "",
        help="""Tier requested when user_options names none; empty = the user's effective tier
        (the elevated beamtime tier inside an active window of the project).""",
    ).tag(config=True)

    cpus = Integer(1, min=1, help="CPUs requested for the server's job.").tag(config=True)
    mem_mb = Integer(1024, min=64, help="Memory (MiB) requested for the server's job.").tag(
        config=True
    )
    walltime_s = Integer(
        8 * 3600, min=60, help="Wall time (seconds) of the server's job; capped by the tier."
    ).tag(config=True)

    max_dask_workers = Integer(
        8,
        min=0,
        help="""Most Dask workers the options form (or a REST spawn request) may ask for.""",
    ).tag(config=True)

    walltime_warning_s = Integer(
        900,
        min=0,
        help="""Seconds before the walltime ends from which the hub's home page warns.""",
    ).tag(config=True)

    queue_timeout = Float(
        20.0,
        help="""Seconds a spawn may stay queued before it fails with the reason
        (nodes busy and nothing this tier may preempt). 0 = wait until start_timeout.""",
    ).tag(config=True)

    report_timeout = Float(
        60.0,
        help="Seconds from the job's start until its server must answer HTTP, else the spawn fails.",
    ).tag(config=True)

    status_interval = Float(
        0.2, help="Seconds between job-state checks while a spawn is pending."
    ).tag(config=True)

    run_as = CaselessStrEnum(
        ["auto", "account", "self"],
        default_value="auto",
        help="""Whose Unix account runs each server, job and Dask worker.

        'account': the user's own (account_template; created on first use; needs root);
        'self': the hub's own account, every user alike (not isolated: dev enclave only);
        'auto': 'account' when the hub runs as root, else 'self'.
        Example: c.ReservedNodeSpawner.run_as = "account"
        """,
    ).tag(config=True)

    account_template = Unicode(
        "bh-{username}",
        help="""The Unix account of hub user {username}; must give a valid account name
        (lower case, at most 32 characters), else the spawn is refused naming the user.
        Example: c.ReservedNodeSpawner.account_template = "bh-{username}"
        """,
    ).tag(config=True)

    home_root = Unicode(
        "",
        help="""Folder of the accounts' homes (<home_root>/<account>, 0700). Empty: /home for
        accounts; with run_as 'self', <BEAMHUB_HOME>/users/<username> (one folder per user
        for JupyterLab's settings and workspaces, same Unix account).""",
    ).tag(config=True)

    sandbox = Bool(
        None,
        allow_none=True,
        help="""Local backend: run each job in bubblewrap with per-node cgroup limits.
        None = whenever jobs run as the users' accounts.""",
    ).tag(config=True)

    home_files = Dict(
        help="""Folders copied into the user's home before each start, as her account and
        never over her files: {"notebooks": "/path/to/notebooks"} gives ~/notebooks.""",
    ).tag(config=True)

    @default("state_dir")
    def _default_state_dir(self) -> str:
        return str(state_dir() / "scheduler")

    @default("cmd")
    def _default_cmd(self) -> list[str]:
        # the venv is not on the job's PATH: an absolute path next to this interpreter
        exe = Path(sys.executable).with_name("jupyterhub-singleuser")
        return [str(exe) if exe.exists() else (shutil.which("jupyterhub-singleuser") or str(exe))]

    @default("start_timeout")
    def _default_start_timeout(self) -> int:
        return 120

    @default("apply_user_options")
    def _default_apply_user_options(self) -> dict:
        # a request (REST body or the form) may name a project and a tier; start() checks
        # every option again (check_options) and the policy whether the user holds them
        return {"project": "project", "tier": "tier"}

    @default("options_from_form")
    def _default_options_from_form(self):
        return _options_from_form

    @default("options_form")
    def _default_options_form(self):
        return _options_form

    @validate("backend_options")
    def _known_backend_options(self, proposal: dict) -> dict:
        # config may set backend after backend_options: refuse here only what neither backend
        # takes (a typo); open_scheduler() checks against the chosen backend
        errors = []
        for backend in ("local", "slurm"):
            try:
                check_backend_options(backend, proposal["value"])
                return proposal["value"]
            except SchedulerError as exc:
                errors.append(exc.message)
        raise TraitError("ReservedNodeSpawner." + "; ".join(errors))

    @validate("queue_timeout", "report_timeout", "status_interval")
    def _non_negative(self, proposal: dict) -> float:
        if proposal["value"] < 0:
            raise TraitError(f"ReservedNodeSpawner.{proposal['trait'].name} must be >= 0 seconds")
        return proposal["value"]

    # -- state ---------------------------------------------------------------------------------

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job_id: str | None = None
        self.job_node: str | None = None
        self.job_host: str | None = None
        self.job_port: int | None = None
        self.job_project: str | None = None
        self.job_tier: str | None = None
        self.job_started: float | None = None
        self.job_walltime_s: int | None = None
        self.port_file: str | None = None
        self.output_file: str | None = None
        self.account: Account | None = None
        self._events: list[dict] = []
        self._events_changed = asyncio.Event()

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.job_id = state.get("job_id")
        self.job_node = state.get("node")
        self.job_host = state.get("host")
        self.job_port = state.get("port")
        self.job_project = state.get("project")
        self.job_tier = state.get("tier")
        self.job_started = state.get("started")
        self.job_walltime_s = state.get("walltime_s")
        self.port_file = state.get("port_file")
        self.output_file = state.get("output")

    def get_state(self) -> dict:
        state = super().get_state()
        if self.job_id:
            state.update(
                job_id=self.job_id,
                node=self.job_node,
                host=self.job_host,
                port=self.job_port,
                project=self.job_project,
                tier=self.job_tier,
                started=self.job_started,
                walltime_s=self.job_walltime_s,
                port_file=self.port_file,
                output=self.output_file,
            )
        return state

    def clear_state(self) -> None:
        super().clear_state()
        self.job_id = self.job_node = self.job_host = self.job_port = None
        self.job_project = self.job_tier = self.port_file = self.output_file = None
        self.job_started = self.job_walltime_s = None

    # -- scheduler access ----------------------------------------------------------------------

    def _run_as(self) -> str:
        if self.run_as == "auto":
            return "account" if os.geteuid() == 0 else "self"
        return self.run_as

    def _tenancy(self) -> dict[str, Any]:
        """The backend options that say whose account runs the jobs (see kernels.accounts)."""
        run_as = self._run_as()
        home_root = self.home_root
        if not home_root and run_as == "self":
            home_root = str(Path(self.state_dir).parent / "users")
        options: dict[str, Any] = {
            "run_as": run_as,
            "account_template": self.account_template,
            "home_root": home_root,
        }
        if self.backend == "local" and self.sandbox is not None:
            options["sandbox"] = self.sandbox
        return options

    def _config(self) -> SchedulerConfig:
        return SchedulerConfig(
            backend=self.backend,
            state_dir=self.state_dir,
            options={**self._tenancy(), **self.backend_options},
            tiers_file=self.tiers_file,
            projects_file=self.projects_file,
            reservations_db=self.reservations_db,
        )

    def _account_map(self) -> AccountMap:
        options = self._tenancy()
        return AccountMap(
            options["run_as"], options["account_template"], options["home_root"], log=self.log
        )

    async def run_pre_spawn_hook(self) -> Any:
        """Her account and home exist before the hook runs (``{home}`` in notebook_dir)."""
        self.account = await asyncio.to_thread(self._account_map().ensure, self.user.name)
        for target, source in self.home_files.items():
            await asyncio.to_thread(copy_as, self.account, source, target)
        return await maybe_future(super().run_pre_spawn_hook())

    # -- the options form ----------------------------------------------------------------------

    def options_from_query(self, query_data: dict[str, Any]) -> Any:
        """/hub/spawn?tier=...: the same checks as the form's POST."""
        return self.run_options_from_form(query_data)

    async def _roles(self) -> dict[str, str]:
        """{project: role} as the authenticator recorded them at login (auth_state); without
        them, the project directory's memberships (as member), else nothing."""
        get = getattr(self.user, "get_auth_state", None)
        auth_state = (await get()) if get is not None else None
        projects = ((auth_state or {}).get("beamhub") or {}).get("projects")
        if isinstance(projects, dict):
            return {str(p): str(r) for p, r in projects.items()}
        directory = (await asyncio.to_thread(policy_for, self._config())).projects
        if directory is not None:
            return dict.fromkeys(directory.projects_of(self.user.name), "member")
        return {}

    async def offer(self, now: float | None = None) -> Offer:
        """What this user may ask for now: her projects, usable tiers and limits."""
        roles = await self._roles()
        role_scopes = getattr(self.authenticator, "role_scopes", None) or ROLE_SCOPES
        job_roles = {r for r, scopes in role_scopes.items() if "jobs" in scopes}
        runnable = {p: r for p, r in roles.items() if r in job_roles}
        preferred = self.project if self.project in runnable else ""
        if not preferred and runnable:
            preferred = _strongest(runnable)
        policy = await asyncio.to_thread(policy_for, self._config())
        nodes = self.backend_options.get("nodes") if self.backend == "local" else None
        return await asyncio.to_thread(
            make_offer,
            policy,
            self.user.name,
            roles,
            job_roles,
            machine_nodes=int(nodes) if nodes else None,
            max_dask_workers=self.max_dask_workers,
            default_walltime_s=self.walltime_s,
            preferred=preferred,
            now=now,
        )

    @property
    def job_deadline(self) -> float | None:
        """When the server's job reaches its walltime (epoch seconds), once it has started."""
        if self.job_id and self.job_started and self.job_walltime_s:
            return float(self.job_started) + float(self.job_walltime_s)
        return None

    def time_left(self, now: float | None = None) -> dict[str, Any] | None:
        """Time left before the walltime stops the server, for the hub's home page."""
        deadline = self.job_deadline
        if deadline is None:
            return None
        now = time.time() if now is None else now
        left = max(0, int(deadline - now))
        hours, minutes = divmod(left // 60, 60)
        return {
            "left_s": left,
            "deadline": deadline,
            "ends": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(deadline)),
            "text": f"{hours} h {minutes:02d} min" if hours else f"{minutes} min",
            "warn": left <= self.walltime_warning_s,
            "warn_s": self.walltime_warning_s,
        }

    def template_namespace(self) -> dict[str, Any]:
        """JupyterHub's, plus ``{home}`` and ``{account}`` once the account is known."""
        namespace = super().template_namespace()
        if self.account is not None:
            namespace.update(home=self.account.home, account=self.account.name)
        return namespace

    def _user_env(self, account: Account) -> dict[str, str]:
        """HOME and Jupyter's folders in her home: settings, workspaces and runtime files are
        hers, never shared with another user's server."""
        home = account.home
        return {
            "HOME": home,
            "JUPYTER_CONFIG_DIR": f"{home}/.jupyter",
            "JUPYTER_DATA_DIR": f"{home}/.local/share/jupyter",
            "JUPYTER_RUNTIME_DIR": f"{home}/.local/share/jupyter/runtime",
            "JUPYTERLAB_SETTINGS_DIR": f"{home}/.jupyter/lab/user-settings",
            "JUPYTERLAB_WORKSPACES_DIR": f"{home}/.jupyter/lab/workspaces",
            "IPYTHONDIR": f"{home}/.ipython",
        }

    # -- progress ------------------------------------------------------------------------------

    def _emit(self, progress: int, message: str) -> None:
        if any(e["message"] == message for e in self._events):
            return
        self.log.info("spawn %s: %s", self._log_name, message)
        self._events.append({"progress": progress, "message": message})
        self._events_changed.set()

    async def progress(self):  # type: ignore[override]
        """Queued / preempting / starting / ready, as the scheduler reports them."""
        sent = 0
        while True:
            while sent < len(self._events):
                yield self._events[sent]
                sent += 1
            self._events_changed.clear()
            await self._events_changed.wait()

    # -- start ---------------------------------------------------------------------------------

    def _resolve_project(self) -> str:
        options = self.user_options or {}
        if options.get("project"):
            return str(options["project"])
        if self.project:
            return self.project
        projects = policy_for(self._config()).projects
        if projects is not None:
            known = set(projects.names())
            for group in getattr(self.user, "groups", []) or []:
                name = getattr(group, "name", str(group))
                if name in known:
                    return name
            mine = projects.projects_of(self.user.name)
            if mine:
                return mine[0]
        raise SpawnRefused(
            f"{self.user.name} has no project to charge: pass user_options "
            "{'project': ...}, set ReservedNodeSpawner.project, or join a project's group.",
            reason="no-project",
        )

    async def start(self) -> tuple[str, int]:
        self._events = []
        self.job_id = self.job_node = self.job_host = self.job_port = None  # a fresh job
        config = self._config()
        # the policy reads YAML and the windows' SQLite: off the hub's event loop
        policy = await asyncio.to_thread(policy_for, config)
        options = self.user_options or {}
        # the form's values again, and a REST request's: never trusted as sent (a tier she does
        # not hold is refused below by the policy, with the tiers she holds)
        try:
            checked = check_options(await self.offer(), options, check_tier=False)
        except FormError as exc:
            raise SpawnRefused(exc.message, reason=exc.field, status_code=exc.status_code) from exc
        project = checked.get("project") or self._resolve_project()
        requested = options.get("tier") or self.tier or None
        try:
            tier = await asyncio.to_thread(
                policy.effective_tier, self.user.name, project, requested=requested
            )
        except SchedulerError as exc:
            raise SpawnRefused(str(exc), reason="tier", status_code=403) from exc
        try:
            scheduler = await open_scheduler(config)
        except SchedulerError as exc:  # a configuration error: the admin must fix it
            raise SpawnRefused(
                f"The scheduler is not available: {exc.message}",
                reason="scheduler",
                status_code=exc.status if exc.status >= 500 else 500,
            ) from exc

        if self.account is None:  # start() without JupyterHub's pre-spawn step
            self.account = await asyncio.to_thread(self._account_map().ensure, self.user.name)
        account = self.account
        stem = f"{self.user.name}-{self.name or 'default'}-{uuid.uuid4().hex[:8]}"
        if account.switches:  # a folder of hers: the job writes its port report there
            run_dir = await asyncio.to_thread(private_dir, account, "servers", stem)
        else:
            run_dir = Path(config.state_dir) / "servers"
            run_dir.mkdir(parents=True, exist_ok=True)
            run_dir = run_dir / stem
            run_dir.mkdir(mode=0o700, exist_ok=True)
        self.port_file = str(run_dir / "port.json")
        self.output_file = str(run_dir / "server.log")
        env = self.get_env()
        env.update(config.job_env(project=project, tier=tier.name, user=self.user.name))
        env["BEAMHUB_BIND_IP"] = self.ip or "127.0.0.1"
        walltime_s = checked["walltime_s"]
        if "walltime" not in options and "walltime_s" not in options:
            walltime_s = min(walltime_s, tier.max_walltime_s)  # the default fits any tier
        env["BEAMHUB_WALLTIME_S"] = str(walltime_s)
        env["BEAMHUB_DASK_WORKERS"] = str(checked["dask_workers"])
        env.update(self._user_env(account))
        args = list(self.get_args())
        is_jupyter = Path(self.cmd[0]).name.startswith("jupyter") if self.cmd else False
        as_root = os.geteuid() == 0 and not account.switches
        if is_jupyter:
            if as_root and "--allow-root" not in args:
                args.append("--allow-root")
            elif not as_root and "--allow-root" in args:
                args.remove("--allow-root")  # configured for a root hub; refused by non-root
        argv = [
            sys.executable,
            "-m",
            "beamhub.kernels.serverjob",
            self.port_file,
            "--",
            *self.cmd,
            *args,
        ]
        spec = JobSpec(
            name=f"jupyter-{self.user.name}" + (f"-{self.name}" if self.name else ""),
            project=project,
            user=self.user.name,
            tier=tier.name,
            argv=argv,
            env=env,
            cpus=self.cpus,
            mem_mb=self.mem_mb,
            nodes=checked["nodes"],
            walltime_s=walltime_s,
            workdir=self.format_string(self.notebook_dir) if self.notebook_dir else account.home,
            output=self.output_file,
        )
        self.job_project, self.job_tier = project, tier.name
        self.job_started, self.job_walltime_s = None, walltime_s
        await self._cancel_stale_jobs(scheduler, spec.name)
        watcher = asyncio.create_task(self._watch_events(scheduler))
        await asyncio.sleep(0)  # let the watcher subscribe before submit() publishes
        try:
            try:
                self.job_id = await scheduler.submit(spec)
            except SchedulerError as exc:
                raise SpawnRefused(str(exc), reason="scheduler", status_code=400) from exc
            self._persist_state()
            self._emit(10, f"queued at tier {tier.name} (job {self.job_id})")
            address = await self._wait_for_server(scheduler, tier.name)
            info = (await scheduler.status([self.job_id])).get(self.job_id)
            if info is not None and info.start_time:  # the walltime counts from here
                self.job_started = info.start_time
            self.job_started = self.job_started or time.time()
            self._persist_state()
            return address
        except BaseException:
            if self.job_id:
                with contextlib.suppress(SchedulerError, OSError):
                    await scheduler.cancel(self.job_id)
            raise
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher

    def _persist_state(self) -> None:
        """Record the job in the hub's database now, not only when start() returns: a hub that
        dies mid-spawn then finds the job on restart (poll/stop) instead of orphaning it."""
        orm_spawner, db = getattr(self, "orm_spawner", None), getattr(self, "db", None)
        if orm_spawner is not None and db is not None:
            orm_spawner.state = self.get_state()
            db.commit()

    async def _cancel_stale_jobs(self, scheduler, name: str) -> None:
        """A live job of this same server is left from a spawn the hub never finished (it was
        killed mid-start): cancel it rather than let it hold a node until its wall time."""
        for info in await scheduler.list():
            spec = info.spec
            if spec and spec.name == name and spec.user == self.user.name and not info.done:
                self.log.warning("cancelling stale job %s of %s", info.job_id, self._log_name)
                with contextlib.suppress(SchedulerError):
                    await scheduler.cancel(info.job_id)

    async def _watch_events(self, scheduler) -> None:
        """Turn the scheduler's events about this job into progress messages."""
        early: list[dict] = []  # events published inside submit(), before its id is known
        async for event in scheduler.events():
            if self.job_id is None:
                early.append(event)
                continue
            for ev in [*early, event]:
                if ev.get("job_id") == self.job_id:
                    self._progress_from_event(ev)
            early = []

    def _progress_from_event(self, event: dict) -> None:
        kind, message = event.get("type"), event.get("message") or ""
        if kind == "preempting":
            self._emit(30, message or f"preempting {len(event.get('victims') or [])} jobs")
        elif kind == "started":
            self.job_started = self.job_started or time.time()
            self._emit(50, f"starting on {event.get('node') or '?'}")
        elif kind == "waiting" and message:
            self._emit(15, message)

    def _on_report(self, host: str, port: int, node: str | None) -> None:
        self.job_host, self.job_port, self.job_node = host, port, node
        self._persist_state()

    async def _wait_for_server(self, scheduler, tier: str) -> tuple[str, int]:
        """Until the server answers, failing at once if the job dies, is stuck, or is silent."""
        wait = ServerWait(
            scheduler=scheduler,
            job_id=self.job_id,
            tier=tier,
            user=self.user.name,
            port_file=self.port_file,
            output_file=self.output_file,
            base_url=self.server.base_url if self.server else "/",
            queue_timeout=self.queue_timeout,
            report_timeout=self.report_timeout,
            interval=self.status_interval,
            emit=self._emit,
            on_report=self._on_report,
        )
        return await wait.run()

    async def get_url(self) -> str:
        """Where the job's server listens (its own report), for JupyterHub's restart check."""
        if self.job_host and self.job_port and self.server:
            return f"http://{self.job_host}:{self.job_port}{self.server.base_url}"
        return await super().get_url()

    # -- poll / stop ---------------------------------------------------------------------------

    async def poll(self) -> int | None:
        """None while the job runs (re-attached after a hub restart), its exit status after."""
        if not self.job_id:
            return 0
        scheduler = await open_scheduler(self._config())
        info = (await scheduler.status([self.job_id])).get(self.job_id)
        if info is None:
            return 0
        if info.state in (JobState.PENDING, JobState.RUNNING):
            return None
        if info.state is JobState.UNKNOWN:
            # the scheduler cannot tell: the server's own answer decides
            if self.job_host and self.job_port:
                base = self.server.base_url if self.server else "/"
                alive = await server_answers(self.job_host, self.job_port, base)
                return None if alive else 1
            return 1
        if info.state is JobState.COMPLETED:
            return int(info.exit_code or 0)
        return int(info.exit_code or 1) or 1

    async def stop(self, now: bool = False) -> None:
        if not self.job_id:
            return
        scheduler = await open_scheduler(self._config())
        with contextlib.suppress(SchedulerError):
            await scheduler.cancel(self.job_id)
        deadline = time.monotonic() + (2 if now else 15)
        while time.monotonic() < deadline:
            info = (await scheduler.status([self.job_id])).get(self.job_id)
            if info is None or info.state in _TERMINAL:
                break
            await asyncio.sleep(self.status_interval)
        for path in (self.port_file,):
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)
