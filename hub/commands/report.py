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
    alloc.add_argument(
        "--publish",
        action="store_true",
        help="also write the page where the dashboard shows it to hub admins "
        "(<state>/reports/allocation.html, /services/dashboard/admin/allocation)",
    )
    alloc.set_defaults(func=_allocation)

    sla = rsub.add_parser(
        "sla", help="uptime per service and time-to-start per tier against beamhub.yaml's targets"
    )
    sla.add_argument("--since", default="7d", help="7d, 24h, … or an ISO time (default 7d)")
    sla.add_argument("--backend", choices=["local", "slurm"], default=None)
    sla.add_argument(
        "--prometheus",
        metavar="URL",
        default=None,
        help="Prometheus to ask (default: the one `beamhub up` runs, from runtime-urls.json)",
    )
    sla.add_argument("--no-prometheus", action="store_true", help="use beamhub's own records only")
    sla.add_argument("--json", action="store_true", help="JSON output")
    sla.set_defaults(func=_sla)


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
        nodes = dep.scheduler.nodes
        if db.exists():
            jobs, source = local_records(db, now), f"beamhub's own job records ({db})"
        else:  # no job ran yet (the scheduler makes its database on the first)
            jobs, source = [], f"beamhub's own job records: none yet ({db} does not exist)"
            print(f"beamhub report: no job recorded yet: {db} does not exist", file=sys.stderr)
    else:
        from beamhub.hub.reports.slurm_records import slurm_records

        try:
            jobs, nodes, source = slurm_records(since, now, folder / "slurm-jobs.sqlite")
        except SchedulerError as exc:
            return _fail(exc.message)
    report = allocation_report(jobs, windows, tiers, since, now, nodes=nodes, source=source)
    if args.html:
        from beamhub.hub.reports.allocation_html import allocation_html

        Path(args.html).write_text(allocation_html(report))
    if args.publish:
        from beamhub.hub.reports.allocation_html import allocation_html

        _publish(_state(args), allocation_html(report))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_allocation_text(report))
    return 0


def _publish(state: Path, page: str) -> None:
    """The page for the dashboard: owner read-write, the state dir's group (the services'
    accounts) read-only, nobody else; replaced whole so a reader never sees half a page."""
    from beamhub.widgets.dashboard_service import ALLOCATION_PAGE

    target = state / ALLOCATION_PAGE
    target.parent.mkdir(mode=0o750, exist_ok=True)
    group = state.stat().st_gid
    tmp = target.with_suffix(".tmp")
    tmp.write_text(page)
    if os.geteuid() == 0:
        for path in (target.parent, tmp):
            os.chown(path, -1, group)
    os.chmod(tmp, 0o640)
    os.replace(tmp, target)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _share(window: dict[str, Any], part: str) -> str:
    reserved = window["reserved_node_hours"]
    return f"{100 * window[f'{part}_node_hours'] / reserved:.1f} %" if reserved else "-"


def _allocation_text(report: dict[str, Any]) -> str:
    lines = [
        f"allocation {_iso(report['since'])} to {_iso(report['until'])}; source: "
        f"{report['source']}",
        "",
        "node-hours used, by project and tier:",
    ]
    lines += [
        f"  {u['project']:<14} {u['tier']:<12} {u['node_hours']:>10.4f}  ({u['jobs']} jobs)"
        for u in report["usage"]
    ] or ["  (no job ran)"]
    lines += ["", "beamtime windows (node-hours):"]
    if report["windows"]:
        lines.append(
            f"  {'id':>4} {'project':<12} {'reserved':>9} {'used':>9} {'lent':>9} {'idle':>9} "
            f"{'preempted':>9} {'requeued':>9}"
        )
    lines += [
        f"  {w['id']:>4} {w['project']:<12} {w['reserved_node_hours']:>9.4f} "
        f"{w['used_node_hours']:>9.4f} {w['lent_node_hours']:>9.4f} {w['idle_node_hours']:>9.4f} "
        f"{w['preempted_node_hours']:>9.4f} {w['requeued_node_hours']:>9.4f}"
        + (
            f"\n  {'':>4} {'':<12} of the reserved: used {_share(w, 'used')}, lent "
            f"{_share(w, 'lent')} ({', '.join(w['lent_by_tier']) or 'none'}), idle "
            f"{_share(w, 'idle')}"
        )
        for w in report["windows"]
    ] or ["  (no approved window in the period)"]
    lost = report["preemption"]
    lines += [
        "",
        f"lost to preemption: {lost['preempted_node_hours']:.4f} node-hours in "
        f"{lost['preempted_runs']} runs ({lost['requeued_node_hours']:.4f} of them requeued)",
        "",
        "time to start (s):",
    ]
    lines += [
        f"  {tier:<12} p50 {s['p50_s']:>8.2f}  p90 {s['p90_s']:>8.2f}  p99 {s['p99_s']:>8.2f}  "
        f"({s['jobs']} jobs)"
        for tier, s in report["time_to_start"].items()
    ] or ["  (no job started)"]
    return "\n".join(lines)


def _prometheus_url(args: argparse.Namespace, state: Path) -> str | None:
    """The Prometheus to ask: --prometheus, else `beamhub up`'s if it answers; None for none."""
    import urllib.request

    if args.no_prometheus:
        return None
    url = args.prometheus
    if url is None:
        try:
            url = json.loads((state / "runtime-urls.json").read_text()).get("prometheus")
        except (OSError, ValueError):
            url = None
        if not url:
            return None
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/-/ready", timeout=5):  # noqa: S310
            return url
    except OSError:
        if args.prometheus:  # asked for by name: say so rather than fall back silently
            raise
        return None


def _sla(args: argparse.Namespace) -> int:
    from beamhub.hub.commands.status import read_status
    from beamhub.hub.reports import sla
    from beamhub.hub.reports.allocation import time_to_start
    from beamhub.hub.reports.records import local_records
    from beamhub.hub.up.deployment import DeploymentError
    from beamhub.hub.up.supervisor import EVENTS_FILE
    from beamhub.kernels.scheduler import SchedulerError
    from beamhub.kernels.tiers import load_tiers

    try:
        since = parse_since(args.since)
        dep = _deployment(args)
    except (argparse.ArgumentTypeError, DeploymentError) as exc:
        return _fail(str(exc))
    now, state = time.time(), _state(args)
    try:
        prometheus = _prometheus_url(args, state)
    except OSError as exc:
        return _fail(f"--prometheus {args.prometheus}: no answer ({exc}); check the URL")
    sources = {}
    try:
        if prometheus is not None:
            uptime = sla.prometheus_uptime(prometheus, since, now)
            starts = sla.prometheus_time_to_start(prometheus, since, now)
            sources["uptime"] = f"Prometheus {prometheus} (avg_over_time(up))"
            sources["time_to_start"] = (
                f"Prometheus {prometheus} (histogram beamhub_scheduler_time_to_start_seconds)"
            )
    except (OSError, RuntimeError, ValueError) as exc:
        return _fail(
            f"Prometheus {prometheus} did not answer a query ({exc}); --no-prometheus "
            "reports from beamhub's own records"
        )
    if prometheus is None:
        events = state / EVENTS_FILE
        running = bool(read_status(state).get("running"))
        uptime = sla.uptime_from_events(sla.read_events(events), since, now, running)
        sources["uptime"] = f"beamhub's own records ({events})"
        backend = args.backend or dep.scheduler.backend
        if backend == "local":
            db = _scheduler_dir(args) / "local-jobs.sqlite"
            jobs = local_records(db, now) if db.exists() else []
            sources["time_to_start"] = f"beamhub's own job records ({db}" + (
                ")" if db.exists() else ": none yet)"
            )
        else:
            from beamhub.hub.reports.slurm_records import slurm_records

            try:
                jobs, _, sources["time_to_start"] = slurm_records(
                    since, now, _scheduler_dir(args) / "slurm-jobs.sqlite"
                )
            except SchedulerError as exc:
                jobs, sources["time_to_start"] = [], f"none: {exc.message}"
        starts = time_to_start(jobs, since, now)
    levels = dep.service_levels
    try:
        known = load_tiers(os.environ.get("BEAMHUB_SCHEDULER_TIERS") or None).names()
    except SchedulerError as exc:
        return _fail(exc.message)
    unknown = sorted(set(levels.time_to_start_p90_s) - set(known))
    if unknown:
        return _fail(
            f"{args.config or '<embedded defaults>'}: service_levels.time_to_start_p90_s."
            f"{unknown[0]}: no such tier (the tiers are {', '.join(known)})"
        )
    report = sla.sla_report(
        uptime, starts, levels.uptime_pct, levels.time_to_start_p90_s, since, now, sources
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_sla_text(report))
    return 0


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "no data"}[met]


def _sla_text(report: dict[str, Any]) -> str:
    lines = [
        f"service levels {_iso(report['since'])} to {_iso(report['until'])}",
        *(f"  {what}: {source}" for what, source in report["sources"].items()),
        "",
        "uptime:",
    ]
    for s in report["services"]:
        pct = "-" if s["uptime_pct"] is None else f"{s['uptime_pct']:.3f} %"
        lines.append(
            f"  {s['service']:<14} {pct:>10}  target {s['target_pct']} %  {_verdict(s['met'])}"
        )
    if not report["services"]:
        lines.append("  (no service recorded in the period)")
    lines += ["", "time to start (s):"]
    for tier, t in report["time_to_start"].items():
        p90 = "-" if t.get("p90_s") is None else f"{t['p90_s']:.2f}"
        target = "-" if t["target_p90_s"] is None else f"{t['target_p90_s']:g}"
        lines.append(
            f"  {tier:<12} p90 {p90:>8}  target {target:>6}  ({t['jobs']} jobs)  "
            f"{_verdict(t['met'])}"
        )
    lines += [
        "",
        {
            True: "all targets met",
            False: "some targets MISSED",
            None: "no data: nothing recorded in the period to compare with the targets",
        }[report["met"]],
    ]
    return "\n".join(lines)
