"""`beamhub bench allocation`: a beamtime window on the local backend, batch work backfilling it,
beamtime jobs preempting batch jobs (requeued), then `beamhub report allocation` on the run.

The scenario (times from the start, all scaled by ``--scale``): 4 virtual nodes; project chem02
queues 10 batch jobs of 15 s; project lcls01's window opens at 5 s for 60 s; inside it lcls01
starts two 1-node beamtime jobs of 20 s at 10 s and one 2-node job of 15 s at 40 s, each
preempting batch work. The report then says how much of the window's reserved node-hours were
used, lent to batch and left idle, and how much batch work the preemptions cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from beamhub.kernels.local import LocalBackend
from beamhub.kernels.projects import ProjectDirectory
from beamhub.kernels.reservations import ReservationBook
from beamhub.kernels.scheduler import TERMINAL_STATES, JobSpec
from beamhub.kernels.tier_policy import TierPolicy
from beamhub.kernels.tiers import DEFAULT_TIERS

NODES = 4


def _job(project: str, user: str, tier: str, seconds: float, nodes: int = 1) -> JobSpec:
    return JobSpec(
        name=f"{tier}-{project}",
        project=project,
        user=user,
        tier=tier,
        nodes=nodes,
        argv=[sys.executable, "-c", f"import time; time.sleep({seconds})"],
    )


async def scenario(folder: Path, scale: float) -> dict[str, float]:
    """Run the jobs; returns the window's start and end."""
    projects = ProjectDirectory.from_dict(
        {
            "projects": {
                "lcls01": {"tiers": ["interactive", "batch"], "members": ["alice"]},
                "chem02": {"tiers": ["batch"], "members": ["carol"]},
            }
        }
    )
    book = ReservationBook(folder / "reservations.sqlite", admins={"root"})
    t0 = time.time()
    start, end = t0 + 5 * scale, t0 + 65 * scale
    book.approve(book.request("lcls01", start, end, "beamtime", "bench", "alice"), "root")
    backend = LocalBackend(
        folder / "local-jobs.sqlite",
        nodes=NODES,
        policy=TierPolicy(DEFAULT_TIERS, projects, book),
        poll_interval=0.05,
    )

    async def at(offset: float) -> None:
        await asyncio.sleep(max(0.0, t0 + offset * scale - time.time()))

    try:
        ids = [
            await backend.submit(_job("chem02", "carol", "batch", 15 * scale)) for _ in range(10)
        ]
        await at(10)
        for _ in range(2):
            ids.append(await backend.submit(_job("lcls01", "alice", "beamtime", 20 * scale)))
        await at(40)
        ids.append(await backend.submit(_job("lcls01", "alice", "beamtime", 15 * scale, nodes=2)))
        while True:
            states = await backend.status(ids)
            if all(info.state in TERMINAL_STATES for info in states.values()):
                break
            await asyncio.sleep(0.2)
    finally:
        await backend.close(cancel_jobs=True)
    return {"window_start": start, "window_end": end, "run_s": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beamhub bench allocation", description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0, help="time scale (default 1)")
    parser.add_argument("--json", action="store_true", help="the report as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the state folder")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error(f"--scale {args.scale}: must be a positive factor")
    base = Path(tempfile.mkdtemp(prefix="bh-bench-alloc-"))
    os.chmod(base, 0o711)
    state = base / "state"
    (state / "scheduler").mkdir(parents=True)
    config = base / "beamhub.yaml"
    config.write_text(f"scheduler:\n  nodes: {NODES}\n")
    run = asyncio.run(scenario(state / "scheduler", args.scale))
    argv_report = [
        sys.executable, "-m", "beamhub.hub.cli", "report", "--state-dir", str(state),
        "--config", str(config), "allocation", "--since", "1h",
    ]  # fmt: skip
    if args.json:
        argv_report.append("--json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEAMHUB_SCHEDULER")}
    out = subprocess.run(argv_report, capture_output=True, text=True, env=env, check=False)
    load = os.getloadavg()
    if args.json:
        report = json.loads(out.stdout)
        report["bench"] = {**run, "load_average": load, "state": str(state) if args.keep else None}
        print(json.dumps(report, indent=2))
    else:
        print(out.stdout, end="")
        print(f"\nrun {run['run_s']:.1f} s; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    sys.stderr.write(out.stderr)
    if not args.keep:
        subprocess.run(["rm", "-rf", "--", str(base)], check=False)
    return out.returncode


if __name__ == "__main__":
    sys.exit(main())
