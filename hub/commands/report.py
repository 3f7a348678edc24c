"""`beamhub report`: service levels and node-hours, for admins, from what beamhub recorded."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["parse_since", "register"]

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """'7d', '24h', '90m', '30s' before now, or an ISO time (UTC unless it names an offset)."""
    now = time.time() if now is None else now
    match = _AGO.match(text.strip())
    if match:
        return now - float(match.group(1)) * _UNIT[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--since {text!r}: give a span back from now (7d, 24h, 90m, 30s) or an ISO time "
            "(2026-12-01T08:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("report", help="service levels and node-hours (admin)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="beamhub up's state folder (default $BEAMHUB_HOME, /var/lib/beamhub as root, "
        "else ~/.beamhub)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="the deployment's beamhub.yaml (targets, node count; default the embedded defaults)",
    )
    rsub = parser.add_subparsers(dest="report_command", metavar="REPORT", required=True)

    alloc = rsub.add_parser(
        "allocation",
        help="node-hours per project and tier; per beamtime window reserved, used, lent, idle "
        "and lost to preemption; time-to-start by tier",
    )
    alloc.add_argument("--since", default="30d", help="7d, 24h, … or an ISO time (default 30d)")
    alloc.add_argument("--backend", choices=["local", "slurm"], default=None)
    alloc.add_argument("--json", action="store_true", help="JSON output")
    alloc.add_argument("--html", metavar="FILE", help="also write the page with plots to FILE")
    alloc.set_defaults(func=_allocation)


def _fail(message: str) -> int:
    print(f"beamhub report: {message}", file=sys.stderr)
    return 2


def _state(args: argparse.Namespace) -> Path:
    from beamhub.auth.home import state_dir

    return Path(args.state_dir) if args.state_dir else state_dir()


def _deployment(args: argparse.Namespace) -> Any:
    from beamhub.hub.up.deployment import load_deployment

    return load_deployment(args.config)


def _scheduler_dir(args: argparse.Namespace) -> Path:
    """Where the hub's scheduler keeps its databases (same rule as `beamhub scheduler`)."""
    env = os.environ.get("BEAMHUB_SCHEDULER_STATE_DIR")
    return Path(env) if env else _state(args) / "scheduler"


def _allocation(args: argparse.Namespace) -> int:
    from beamhub.hub.reports.allocation import allocation_report
    from beamhub.hub.reports.records import local_records
    from beamhub.hub.up.deployment import DeploymentError
    from beamhub.kernels.reservations import ReservationBook
    from beamhub.kernels.scheduler import SchedulerError
    from beamhub.kernels.tiers import load_tiers

    try:
        since = parse_since(args.since)
        dep = _deployment(args)
        tiers = load_tiers(os.environ.get("BEAMHUB_SCHEDULER_TIERS") or None)
    except argparse.ArgumentTypeError as exc:
        return _fail(str(exc))
    except DeploymentError as exc:
        return _fail(str(exc))
    except SchedulerError as exc:
        return _fail(exc.message)
    now = time.time()
    backend = args.backend or dep.scheduler.backend
    folder = _scheduler_dir(args)
    book_path = os.environ.get("BEAMHUB_SCHEDULER_RESERVATIONS") or folder / "reservations.sqlite"
    windows = ReservationBook(book_path, tiers=tiers).list(now=now)
    if backend == "local":
        db = folder / "local-jobs.sqlite"
        if not db.exists():
            return _fail(
                f"no local scheduler database at {db}; give the state folder of the `beamhub up` "
                "that ran the jobs (--state-dir)"
            )
        jobs, nodes = local_records(db, now), dep.scheduler.nodes
        source = f"beamhub's own job records ({db})"
    else:
        from beamhub.hub.reports.slurm_records import slurm_records

        try:
            jobs, nodes, source = slurm_records(since, now)
        except SchedulerError as exc:
            return _fail(exc.message)
    report = allocation_report(jobs, windows, tiers, since, now, nodes=nodes, source=source)
    if args.html:
        from beamhub.hub.reports.allocation_html import allocation_html

        Path(args.html).write_text(allocation_html(report))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_allocation_text(report))
    return 0


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _allocation_text(report: dict[str, Any]) -> str:
    lines = [
        f"allocation {_iso(report['since'])} to {_iso(report['until'])}; source: "
        f"{report['source']}",
        "",
        "node-hours used, by project and tier:",
    ]
    lines += [
        f"  {u['project']:<14} {u['tier']:<12} {u['node_hours']:>10.3f}  ({u['jobs']} jobs)"
        for u in report["usage"]
    ] or ["  (no job ran)"]
    lines += ["", "beamtime windows (node-hours):"]
    if report["windows"]:
        lines.append(
            f"  {'id':>4} {'project':<12} {'reserved':>9} {'used':>9} {'lent':>9} {'idle':>9} "
            f"{'preempted':>9} {'requeued':>9}"
        )
    lines += [
        f"  {w['id']:>4} {w['project']:<12} {w['reserved_node_hours']:>9.3f} "
        f"{w['used_node_hours']:>9.3f} {w['lent_node_hours']:>9.3f} {w['idle_node_hours']:>9.3f} "
        f"{w['preempted_node_hours']:>9.3f} {w['requeued_node_hours']:>9.3f}"
        for w in report["windows"]
    ] or ["  (no approved window in the period)"]
    lost = report["preemption"]
    lines += [
        "",
        f"lost to preemption: {lost['preempted_node_hours']:.3f} node-hours in "
        f"{lost['preempted_runs']} runs ({lost['requeued_node_hours']:.3f} of them requeued)",
        "",
        "time to start (s):",
    ]
    lines += [
        f"  {tier:<12} p50 {s['p50_s']:>8.2f}  p90 {s['p90_s']:>8.2f}  p99 {s['p99_s']:>8.2f}  "
        f"({s['jobs']} jobs)"
        for tier, s in report["time_to_start"].items()
    ] or ["  (no job started)"]
    return "\n".join(lines)
