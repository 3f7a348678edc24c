"""`beamhub incident`: incidents (admin, on the hub machine): open, update, close, list.

The incidents live in the reservation book's file (``$BEAMHUB_SCHEDULER_RESERVATIONS`` or
``<state>/scheduler/reservations.sqlite``), where the gateway's public status and the hub's
banner read them.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    from beamhub.kernels.incidents import SEVERITIES
    from beamhub.kernels.maintenance import SERVICES

    parser = sub.add_parser("incident", help="incidents: open, update, close, list (admin)")
    isub = parser.add_subparsers(dest="incident_command", metavar="ACTION", required=True)
    services_help = f"affected services, comma-separated, from {','.join(SERVICES)}"
    projects_help = "affected projects, comma-separated (default: every project)"

    op = isub.add_parser("open", help="open an incident")
    op.add_argument("--title", required=True, help="what is broken, in words users read")
    op.add_argument("--severity", required=True, help=f"one of {', '.join(SEVERITIES)}")
    op.add_argument("--services", required=True, help=services_help)
    op.add_argument("--projects", default=None, help=projects_help)
    op.add_argument("--message", default="", help="a first note (what is known, what to do)")
    op.add_argument("--as", dest="admin", default=getpass.getuser(), help="the admin's name")
    op.set_defaults(func=_open)

    up = isub.add_parser("update", help="add an update; optionally change what it affects")
    up.add_argument("id", type=int, help="incident id (see `list`)")
    up.add_argument("--message", required=True, help="what changed (users read it)")
    up.add_argument("--severity", default=None, help=f"new severity: {', '.join(SEVERITIES)}")
    up.add_argument("--services", default=None, help="new " + services_help)
    up.add_argument("--projects", default=None, help="new " + projects_help)
    up.add_argument("--as", dest="admin", default=getpass.getuser(), help="the admin's name")
    up.set_defaults(func=_update)

    cl = isub.add_parser("close", help="close (resolve) an incident")
    cl.add_argument("id", type=int, help="incident id (see `list`)")
    cl.add_argument("--message", default="", help="how it was resolved (users read it)")
    cl.add_argument("--as", dest="admin", default=getpass.getuser(), help="the admin's name")
    cl.set_defaults(func=_close)

    lst = isub.add_parser("list", help="open incidents (--all: closed ones too)")
    lst.add_argument("--all", action="store_true", help="closed incidents too, newest first")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_list)


def _log():
    from beamhub.hub.commands.maintenance import _book
    from beamhub.kernels.incidents import IncidentLog

    return IncidentLog(_book().db_path)


def _fail(exc) -> int:
    print(f"beamhub incident: {exc.message} (field {exc.field})", file=sys.stderr)
    return 2


def _show(verb: str, incident) -> None:
    projects = ", ".join(incident.projects) or "every project"
    print(
        f"incident {incident.id} {verb}: {incident.title!r} ({incident.severity}); "
        f"affects {', '.join(incident.services)}; {projects}"
    )


def _open(args: argparse.Namespace) -> int:
    from beamhub.kernels.scheduler import SchedulerError

    try:
        incident = _log().open(
            args.title, args.severity, args.services, args.admin, args.projects, args.message
        )
    except SchedulerError as exc:
        return _fail(exc)
    _show("opened", incident)
    return 0


def _update(args: argparse.Namespace) -> int:
    from beamhub.kernels.scheduler import SchedulerError

    try:
        incident = _log().update(
            args.id, args.admin, args.message, args.severity, args.services, args.projects
        )
    except SchedulerError as exc:
        return _fail(exc)
    _show("updated", incident)
    return 0


def _close(args: argparse.Namespace) -> int:
    from beamhub.kernels.scheduler import SchedulerError

    try:
        incident = _log().close(args.id, args.admin, args.message)
    except SchedulerError as exc:
        return _fail(exc)
    print(f"incident {incident.id} ({incident.title!r}) closed by {incident.closed_by}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from beamhub.hub.commands.scheduler import _iso

    incidents = _log().list(all_=args.all)
    if args.json:
        print(json.dumps([i.to_dict() for i in incidents], indent=2))
        return 0
    if not incidents:
        print("no open incidents")
    for i in incidents:
        print(
            f"{i.id:>4}  {_iso(i.opened_at)}  {i.status:<6}  {i.severity:<8}  {i.title}  "
            f"(affects: {', '.join(i.services)}; projects: {', '.join(i.projects) or 'all'})"
        )
    return 0
