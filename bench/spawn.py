"""`beamhub bench spawn`: spawn-to-ready time on batch-filled nodes, inside vs outside a window.

A real JupyterHub with the beamhub spawner on the local backend; every virtual node runs a batch
job. (a) Inside an approved beamtime window the notebook server (and then N Dask workers) start by
preempting batch jobs; (b) outside it the same request waits a bounded time and says why. The
baseline is the same spawn on idle nodes, measured in the same run. Times are from the spawn
request (POST /users/x/server) to HTTP 200 from the server's API through the proxy, and to N
Dask workers connected. SLURM rows appear when a SLURM cluster answers (`sinfo`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from beamhub.bench.hubproc import Hub

__all__ = ["main"]

PROJECTS = """
projects:
  beam:      {tiers: [interactive, batch], members: [alice]}
  beam-late: {tiers: [interactive, batch], members: [lena]}
  filler:    {tiers: [batch], members: [bob]}
"""


def _log(msg: str) -> None:
    print(f"[bench spawn] {msg}", file=sys.stderr, flush=True)


def _wait(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


@contextlib.contextmanager
def _server_env(hub: Hub, user: str, project: str, tier: str, config) -> Iterator[None]:
    """The environment the spawner gives a server, so start_dask() runs as it would there."""
    env = config.job_env(project=project, tier=tier, user=user)
    env["JUPYTERHUB_API_URL"] = f"{hub.url}/hub/api"
    env["JUPYTERHUB_API_TOKEN"] = hub.user_token(
        user, [f"access:servers!server={user}/", f"users:activity!user={user}"]
    )
    env["JUPYTERHUB_SERVICE_PREFIX"] = f"/user/{user}/"
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class SpawnBench:
    """One hub on one backend, reused for every measurement of a run."""

    def __init__(
        self, workdir: Path, backend: str, options: dict, nodes: int, outside_wait: float
    ) -> None:
        from beamhub.kernels.backends import SchedulerConfig

        self.backend = backend
        if options.get("slurm_conf"):
            os.environ["SLURM_CONF"] = str(options["slurm_conf"])  # dask-jobqueue's sbatch too
        self.state = workdir / "sched"
        (workdir / "projects.yaml").write_text(PROJECTS)
        self.nodes = nodes
        self.config = SchedulerConfig(
            backend=backend,
            state_dir=str(self.state),
            options=options,
            projects_file=str(workdir / "projects.yaml"),
        )
        self.hub = Hub(
            workdir,
            f"""
c.Authenticator.admin_users = {{"ops"}}
c.ReservedNodeSpawner.backend = {backend!r}
c.ReservedNodeSpawner.state_dir = {str(self.state)!r}
c.ReservedNodeSpawner.backend_options = {options!r}
c.ReservedNodeSpawner.projects_file = {str(workdir / "projects.yaml")!r}
c.ReservedNodeSpawner.mem_mb = 256
c.ReservedNodeSpawner.queue_timeout = {outside_wait}
""",
            ["alice", "lena", "bob", "ops"],
        )
        self.batch_token = self.ops_token = ""
        self.batch_ids: list[str] = []

    def _jobs_api(self, token: str, method: str, path: str = "", body: dict | None = None):
        import urllib.request

        req = urllib.request.Request(
            f"{self.hub.url}/hub/api/beamhub/jobs{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"token {token}"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else None

    def jobs(self, prefix: str = "") -> list[dict]:
        """Every job the hub's scheduler knows (as the admin sees them), by name prefix."""
        if not self.ops_token:
            self.ops_token = self.hub.user_token("ops")
        jobs = self._jobs_api(self.ops_token, "GET").values()
        return [j for j in jobs if (j.get("spec") or {}).get("name", "").startswith(prefix)]

    def fill_with_batch(self) -> None:
        self.batch_token = self.hub.user_token("bob")
        for i in range(self.nodes):
            body = {
                "name": f"batch-{i}",
                "project": "filler",
                "tier": "batch",
                "requeue": True,
                "argv": ["/bin/sleep", "3600"],
                "mem_mb": 256,
            }
            self.batch_ids.append(self._jobs_api(self.batch_token, "POST", "", body)["job_id"])
        self.wait_nodes_busy()

    def cancel_batch(self) -> None:
        for job_id in self.batch_ids:
            with contextlib.suppress(OSError):
                self._jobs_api(self.batch_token, "DELETE", f"/{job_id}")

    def wait_nodes_busy(self, timeout: float = 90) -> None:
        ok = _wait(
            lambda: sum(j["state"] == "running" for j in self.jobs("batch-")) == self.nodes,
            timeout,
        )
        if not ok:
            raise RuntimeError(f"batch jobs did not fill the {self.nodes} nodes in {timeout} s")

    def requeues(self) -> int:
        return sum(int(j.get("requeues") or 0) for j in self.jobs("batch-"))

    def spawn(self, user: str, timeout: float) -> tuple[float | None, str]:
        """Seconds from the request to HTTP 200 from the server, or None and the reason."""
        t0 = time.monotonic()
        code, body = self.hub.api("POST", f"/users/{user}/server", {})
        if code not in (201, 202):
            return None, f"spawn request refused: {code} {body}"
        events = self.hub.progress(user, timeout=timeout + 30)
        if not events or not events[-1].get("ready"):
            return None, (events[-1].get("message") if events else "no progress events")
        status, _ = self.hub.get(f"/user/{user}/api")
        ok = status == 200 or _wait(lambda: self.hub.get(f"/user/{user}/api")[0] == 200, 10)
        return (time.monotonic() - t0, "ready") if ok else (None, "server never answered")

    def timeline(self, user: str) -> str:
        """The spawn's progress lines with their times (from the hub's log), for the report."""
        lines = [ln for ln in self.hub.tail(400).splitlines() if f"spawn {user}:" in ln]
        return " | ".join(
            ln.split(" ", 2)[2].split("spawner:")[0] + ln.split(": ", 1)[-1] for ln in lines[-4:]
        )

    def stop(self, user: str) -> None:
        self.hub.api("DELETE", f"/users/{user}/server")
        _wait(lambda: "" not in self.hub.user_model(user)["servers"], 30, 0.1)

    def dask(self, user: str, project: str, tier: str, n: int, timeout: float):
        """Seconds to n connected workers from the call, or None and the reason."""
        from beamhub.kernels.dask_cluster import start_dask

        with _server_env(self.hub, user, project, tier, self.config):
            t0 = time.monotonic()
            try:
                client = start_dask(n, timeout=timeout, memory_mb=256)
            except (TimeoutError, OSError) as exc:
                return None, str(exc)
            elapsed = time.monotonic() - t0
            client.close()
            client.cluster.close()
            live = ("pending", "running")
            _wait(lambda: not [j for j in self.jobs("dask-worker-") if j["state"] in live], 20)
            return elapsed, "ready"

    def run(self, runs: int, workers: int, outside_wait: float) -> dict:
        self.hub.start()
        results: list[dict] = []
        try:
            # baseline: the same spawn on idle nodes
            idle = []
            for _ in range(runs):
                secs, why = self.spawn("alice", 60)
                if secs is None:
                    raise RuntimeError(f"baseline spawn failed: {why}")
                idle.append(secs)
                self.stop("alice")
            _log(f"idle nodes: spawn-to-ready {[round(s, 2) for s in idle]}")
            self.fill_with_batch()
            # (b) outside any window: interactive may not preempt batch work
            secs, why = self.spawn("lena", outside_wait)
            self.stop("lena")
            dsecs, dwhy = self.dask("lena", "beam-late", "interactive", workers, outside_wait)
            results.append(
                {
                    "backend": self.backend,
                    "window": "outside",
                    "ready_s": secs,
                    "preempted": 0,
                    "dask_workers_ready_s": dsecs,
                    "reason": why,
                    "dask_reason": dwhy,
                }
            )
            _log(f"outside window: {why}")
            self.wait_nodes_busy()
            # (a) inside an approved window: beamtime preempts batch
            from beamhub.kernels.reservations import ReservationBook

            book = ReservationBook(self.config.reservations_path)
            now = time.time()
            wid = book.request(
                "beam", now - 1, now + 3600, "beamtime", "bench: beam is on", "alice"
            )
            book.approve(wid, "bench-admin")
            ready, dask_ready, preempted = [], [], []
            for i in range(runs):
                before = self.requeues()
                t0 = time.monotonic()
                secs, why = self.spawn("alice", 60)
                if secs is None:
                    raise RuntimeError(f"spawn inside the window failed: {why}")
                dsecs, dwhy = self.dask("alice", "beam", "beamtime", workers, 60)
                if dsecs is None:
                    raise RuntimeError(f"Dask inside the window failed: {dwhy}")
                ready.append(secs)
                dask_ready.append(secs + dsecs)
                preempted.append(self.requeues() - before)
                _log(self.timeline("alice"))
                _log(
                    f"inside run {i + 1}: server {secs:.2f} s, +{workers} workers "
                    f"{secs + dsecs:.2f} s, {preempted[-1]} batch jobs preempted "
                    f"(wall {time.monotonic() - t0:.1f} s)"
                )
                self.stop("alice")
                self.wait_nodes_busy()
            results.insert(
                0,
                {
                    "backend": self.backend,
                    "window": "inside",
                    "ready_s": round(statistics.median(ready), 3),
                    "preempted": int(statistics.median(preempted)),
                    "dask_workers_ready_s": round(statistics.median(dask_ready), 3),
                    "runs": [round(s, 3) for s in ready],
                    "dask_runs": [round(s, 3) for s in dask_ready],
                },
            )
            baseline = statistics.median(idle)
            results[0]["idle_nodes_ready_s"] = round(baseline, 3)
            results[0]["ratio_vs_idle"] = round(statistics.median(ready) / baseline, 2)
            return results
        finally:
            for user in ("alice", "lena"):  # a failed run must not leave a server behind
                with contextlib.suppress(OSError, KeyError):
                    self.stop(user)
            with contextlib.suppress(OSError):
                self.cancel_batch()
            self.hub.stop()
            if self.backend == "local":
                self.hub.cleanup_jobs(self.state)


def _slurm_row(reason: str) -> dict:
    return {
        "backend": "slurm",
        "window": "inside",
        "ready_s": None,
        "preempted": 0,
        "dask_workers_ready_s": None,
        "reason": reason,
    }


def _slurm_nodes(conf: str) -> tuple[int, str]:
    """How many nodes the SLURM cluster at ``conf`` has up (0 and why when none)."""
    import subprocess

    if shutil.which("sinfo") is None:
        return 0, "no SLURM on this machine (sinfo not found)"
    if not conf:
        return 0, "no SLURM cluster configured (set SLURM_CONF or --slurm-conf)"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"],
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "SLURM_CONF": conf},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 0, f"sinfo failed: {exc}"
    up = {
        ln.split()[0]
        for ln in out.stdout.splitlines()
        if ln.split()[1:2] in (["idle"], ["mix"], ["alloc"])
    }
    return (len(up), "") if up else (0, f"no SLURM node up ({out.stderr.strip()[:200]})")


def _measure(backend: str, options: dict, nodes: int, args: argparse.Namespace) -> list[dict]:
    workdir = Path(tempfile.mkdtemp(prefix=f"beamhub-bench-spawn-{backend}-"))
    try:
        bench = SpawnBench(workdir, backend, options, nodes, args.outside_wait)
        return bench.run(args.runs, args.workers, args.outside_wait)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beamhub bench spawn", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--runs", type=int, default=3, help="runs inside the window (median)")
    parser.add_argument("--nodes", type=int, default=4, help="virtual nodes (all batch-busy)")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers to wait for")
    parser.add_argument(
        "--outside-wait",
        type=float,
        default=15.0,
        help="seconds the outside-window request may wait before it gives up with the reason",
    )
    parser.add_argument(
        "--slurm-conf",
        default=os.environ.get("SLURM_CONF", ""),
        help="slurm.conf of a running cluster to measure too (default: $SLURM_CONF)",
    )
    args = parser.parse_args(argv)
    import logging

    import distributed  # noqa: F401  (configures its loggers on import; quiet them after)

    for name in [n for n in logging.root.manager.loggerDict if n.startswith("distributed")]:
        logging.getLogger(name).setLevel(logging.WARNING)  # the JSON is the output
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if args.runs < 1 or args.nodes < args.workers + 1:
        parser.error("--runs must be >= 1 and --nodes >= --workers + 1 (server + workers)")
    t0 = time.monotonic()
    report: dict = {"results": _measure("local", {"nodes": args.nodes}, args.nodes, args)}
    nodes, why = _slurm_nodes(args.slurm_conf)
    if nodes and nodes >= args.workers + 1:
        options = {"slurm_conf": args.slurm_conf, "poll_interval": 0.5}
        report["results"] += _measure("slurm", options, nodes, args)
    else:
        report["results"].append(_slurm_row(why or f"only {nodes} SLURM nodes up"))
    report["target"] = {"local_inside_ready_s": 5.0, "slurm_inside_ready_s": 15.0}
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
