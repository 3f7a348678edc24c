"""`beamhub scheduler`: admin view of QoS tiers, beamtime windows (QoS reservations) and jobs."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from datetime import UTC, datetime

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("scheduler", help="QoS tiers, beamtime windows and jobs (admin)")
    parser.add_argument(
        "--tiers",
        default=os.environ.get("BEAMHUB_SCHEDULER_TIERS") or None,
        help="tiers YAML (default $BEAMHUB_SCHEDULER_TIERS or the packaged kernels/tiers.yaml)",
    )
    ssub = parser.add_subparsers(dest="scheduler_command", metavar="ACTION", required=True)

    tiers = ssub.add_parser("tiers", help="list the QoS tiers and who preempts whom")
    tiers.add_argument("--slurm", action="store_true", help="print slurm.conf partition lines")
    tiers.add_argument("--json", action="store_true", help="JSON output")
    tiers.set_defaults(func=_tiers)

    res = ssub.add_parser("reservation", help="beamtime windows: request, approve, deny, list")
    rsub = res.add_subparsers(dest="reservation_command", metavar="ACTION", required=True)
    req = rsub.add_parser("request", help="request a window for a project")
    req.add_argument("--project", required=True)
    req.add_argument(
        "--start",
        required=True,
        help="ISO time (UTC unless it has an offset), 'now' or '+30m'/'+2h'/'+1d'",
    )
    req.add_argument("--end", required=True, help="same forms as --start")
    req.add_argument("--tier", default="beamtime", help="elevated tier (default beamtime)")
    req.add_argument("--justification", required=True, help="what the beamtime is for")
    req.add_argument("--as", dest="user", default=getpass.getuser(), help="requesting user")
    req.set_defaults(func=_request)
    for name, helptext in (
        ("approve", "approve a requested window"),
        ("deny", "deny a requested window"),
    ):
        p = rsub.add_parser(name, help=helptext)
        p.add_argument("id", type=int, help="window id (see `list`)")
        p.add_argument(
            "--as",
            dest="admin",
            default=getpass.getuser(),
            help="admin name; must be in $BEAMHUB_SCHEDULER_ADMINS when that is set",
        )
        if name == "deny":
            p.add_argument("--reason", required=True, help="why (the requester reads this)")
        else:
            p.add_argument(
                "--override",
                metavar="JUSTIFICATION",
                default=None,
                help="approve although the window overlaps maintenance of what a beamtime "
                "needs (`beamhub maintenance list`): why",
            )
        p.set_defaults(func=_decide, decision=name)
    lst = rsub.add_parser("list", help="list windows with their current state")
    lst.add_argument("--project")
    lst.add_argument(
        "--state", choices=["requested", "approved", "denied", "active", "ended", "expired"]
    )
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_list_windows)

    jobs = ssub.add_parser("jobs", help="jobs of the local (default) or slurm backend")
    jobs.add_argument("--backend", choices=["local", "slurm"], default="local")
    jobs.add_argument("--project")
    jobs.add_argument("--json", action="store_true")
    jobs.set_defaults(func=_jobs)


def _tier_set(args: argparse.Namespace):
    from beamhub.kernels.tiers import load_tiers

    return load_tiers(args.tiers)


def _scheduler_dir():
    """Where the spawner's scheduler keeps its databases (same rule as kernels.placement)."""
    from pathlib import Path

    from beamhub.auth.home import state_dir

    return Path(os.environ.get("BEAMHUB_SCHEDULER_STATE_DIR") or state_dir() / "scheduler")


def _book(args: argparse.Namespace):
    from beamhub.kernels.reservations import ReservationBook

    admins = os.environ.get("BEAMHUB_SCHEDULER_ADMINS")
    return ReservationBook(
        os.environ.get("BEAMHUB_SCHEDULER_RESERVATIONS")
        or _scheduler_dir() / "reservations.sqlite",
        tiers=_tier_set(args),
        admins=None if admins is None else [a.strip() for a in admins.split(",") if a.strip()],
    )


def _fail(exc) -> int:
    print(f"beamhub scheduler: {exc.message} (status {exc.status})", file=sys.stderr)
    return 2


def _when(text: str) -> float:
    """'now', '+90s', '+30m', '+2h', '+1d' or an ISO time (UTC unless it names an offset)."""
    text = text.strip()
    if text == "now":
        return time.time()
    if text.startswith("+") and text[-1] in "smhd" and text[1:-1].isdigit():
        return time.time() + int(text[1:-1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[text[-1]]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"cannot read time {text!r}; use ISO (2026-12-01T08:00), 'now' or '+2h'"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _iso(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _tiers(args: argparse.Namespace) -> int:
    from beamhub.kernels.scheduler import SchedulerError

    try:
        tiers = _tier_set(args)
        if args.slurm:
            from beamhub.kernels.slurm_text import partition_lines

            print("\n".join(partition_lines(tiers)))
            return 0
    except SchedulerError as exc:
        return _fail(exc)
    rows = [
        t.__dict__ | {"preempts": list(t.preempts), "default": t.name == tiers.default_tier}
        for t in tiers
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'tier':<12} {'prio':>4}  {'preempts':<16} {'when preempted':<15} {'grace':>5} "
        f"{'max wall':>9} {'nodes':>5}  notes"
    )
    for r in rows:
        notes = ", ".join(
            n for n, on in (("default", r["default"]), ("window only", r["window_only"])) if on
        )
        print(
            f"{r['name']:<12} {r['priority']:>4}  {','.join(r['preempts']) or '-':<16} "
            f"{r['preempt_mode']:<15} {r['grace_s']:>4}s {r['max_walltime_s'] / 3600:>8.1f}h "
            f"{r['max_nodes']:>5}  {notes}"
        )
    return 0


def _request(args: argparse.Namespace) -> int:
    from beamhub.kernels.scheduler import SchedulerError

    try:
        start, end = _when(args.start), _when(args.end)
    except argparse.ArgumentTypeError as exc:
        print(f"beamhub scheduler: {exc}", file=sys.stderr)
        return 2
    try:
        wid = _book(args).request(
            args.project, start, end, args.tier, args.justification, args.user
        )
    except SchedulerError as exc:
        return _fail(exc)
    print(
        f"window {wid} requested for {args.project}: {_iso(start)} to {_iso(end)} at "
        f"{args.tier}; an admin approves it with `beamhub scheduler reservation approve {wid}`"
    )
    return 0


def _decide(args: argparse.Namespace) -> int:
    from beamhub.kernels.scheduler import SchedulerError

    book = _book(args)
    try:
        if args.decision == "approve":
            window = book.approve(args.id, args.admin, override=args.override)
        else:
            window = book.deny(args.id, args.admin, args.reason)
    except SchedulerError as exc:
        return _fail(exc)
    print(
        f"window {window.id} ({window.project}, {_iso(window.start)} to {_iso(window.end)}) "
        f"{window.status} by {window.decided_by}; now {window.state()}"
    )
    return 0


def _list_windows(args: argparse.Namespace) -> int:
    now = time.time()
    windows = _book(args).list(project=args.project, state=args.state, now=now)
    if args.json:
        print(json.dumps([w.to_dict(now) for w in windows], indent=2))
        return 0
    if not windows:
        print("no windows")
        return 0
    print(
        f"{'id':>4}  {'project':<12} {'state':<9} {'tier':<10} {'start':<21} {'end':<21} "
        "requested by / justification"
    )
    for w in windows:
        print(
            f"{w.id:>4}  {w.project:<12} {w.state(now):<9} {w.tier:<10} {_iso(w.start):<21} "
            f"{_iso(w.end):<21} {w.requested_by}: {w.justification}"
            + (f" [denied: {w.reason}]" if w.reason else "")
        )
    return 0


def _jobs(args: argparse.Namespace) -> int:
    from beamhub.kernels.scheduler import SchedulerError

    if args.backend == "local":
        from beamhub.kernels.local import read_jobs

        db = _scheduler_dir() / "local-jobs.sqlite"
        jobs = read_jobs(db) if db.exists() else []
        if args.project:
            jobs = [j for j in jobs if j.spec and j.spec.project == args.project]
    else:
        import asyncio

        from beamhub.kernels.slurm import SlurmBackend

        async def listing():
            backend = SlurmBackend()
            try:
                return await backend.list(args.project)
            finally:
                await backend.close()

        try:
            jobs = asyncio.run(listing())
        except SchedulerError as exc:
            return _fail(exc)
    if args.json:
        rows = [j.to_dict() for j in jobs]
        for row in rows:  # a job's env may hold a spawned server's API tokens: never printed
            (row.get("spec") or {}).pop("env", None)
        print(json.dumps(rows, indent=2))
        return 0
    if not jobs:
        print("no jobs")
        return 0
    print(
        f"{'job':>6}  {'state':<10} {'tier':<12} {'project':<12} {'user':<10} {'node':<6} "
        f"{'requeues':>8}  reason"
    )
    for j in jobs:
        spec = j.spec
        print(
            f"{j.job_id:>6}  {j.state.value:<10} {spec.tier if spec else '?':<12} "
            f"{spec.project if spec else '?':<12} {spec.user if spec else '?':<10} "
            f"{j.node or '-':<6} {j.requeues:>8}  {j.reason}"
        )
    return 0
