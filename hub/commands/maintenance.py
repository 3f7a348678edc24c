"""`beamhub maintenance`: the maintenance calendar (admin, on the hub machine): add, list, cancel,
and the iCalendar feed of maintenance and approved beamtime.

It opens the same database as `beamhub scheduler reservation` and the gateway (the reservation
book's file, ``$BEAMHUB_SCHEDULER_RESERVATIONS`` or ``<state>/scheduler/reservations.sqlite``);
over HTTP the gateway offers the same at ``/api/v1/maintenance`` for a facility admin's token.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    from beamhub.kernels.maintenance import SERVICES

    parser = sub.add_parser(
        "maintenance", help="the maintenance calendar: add, list, cancel (admin)"
    )
    msub = parser.add_subparsers(dest="maintenance_command", metavar="ACTION", required=True)
    add = msub.add_parser("add", help="schedule a maintenance window")
    add.add_argument(
        "--start", required=True, help="ISO time (UTC unless it has an offset), 'now' or '+2h'"
    )
    add.add_argument("--end", required=True, help="same forms as --start")
    add.add_argument("--what", required=True, help="what the maintenance is, in words users read")
    add.add_argument(
        "--down",
        required=True,
        help=f"what it takes down, comma-separated, from {','.join(SERVICES)}; the rest stays up",
    )
    add.add_argument("--as", dest="admin", default=getpass.getuser(), help="the admin's name")
    add.set_defaults(func=_add)
    lst = msub.add_parser("list", help="windows not over yet (--all: every one)")
    lst.add_argument("--all", action="store_true", help="past and cancelled windows too")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_list)
    cancel = msub.add_parser("cancel", help="cancel a window")
    cancel.add_argument("id", type=int, help="window id (see `list`)")
    cancel.add_argument("--reason", default="", help="why (users read it)")
    cancel.add_argument("--as", dest="admin", default=getpass.getuser(), help="the admin's name")
    cancel.set_defaults(func=_cancel)
    imp = msub.add_parser(
        "import", help="import a facility's maintenance feed (an .ics file or http(s) URL)"
    )
    imp.add_argument("feed", help="an .ics file, or its http(s):// URL")
    imp.add_argument(
        "--down",
        required=True,
        help="what that facility's maintenance takes down here, comma-separated "
        f"(e.g. network,dsn), from {','.join(SERVICES)}",
    )
    imp.add_argument("--as", dest="admin", default=getpass.getuser(), help="the admin's name")
    imp.set_defaults(func=_import)
    ics = msub.add_parser("ics", help="print the iCalendar (RFC 5545) feed of both calendars")
    ics.set_defaults(func=_ics)


def _book():
    from beamhub.hub.commands.scheduler import _book as book

    return book(argparse.Namespace(tiers=None))


def _fail(exc) -> int:
    print(f"beamhub maintenance: {exc.message} (field {exc.field})", file=sys.stderr)
    return 2


def _add(args: argparse.Namespace) -> int:
    from beamhub.hub.commands.scheduler import _iso, _when
    from beamhub.kernels.maintenance import affected_beamtime
    from beamhub.kernels.scheduler import SchedulerError

    try:
        start, end = _when(args.start), _when(args.end)
    except argparse.ArgumentTypeError as exc:
        print(f"beamhub maintenance: {exc}", file=sys.stderr)
        return 2
    book = _book()
    down = [s.strip() for s in args.down.split(",") if s.strip()]
    try:
        window = book.maintenance.add(start, end, args.what, down, args.admin)
    except SchedulerError as exc:
        return _fail(exc)
    print(
        f"maintenance {window.id} scheduled: {_iso(start)} to {_iso(end)}, {window.what!r}; "
        f"down: {', '.join(window.down)}; stays up: {', '.join(window.stays_up)}"
    )
    affected = affected_beamtime(window, book.list())
    if affected:
        print(
            "  it overlaps approved beamtime of "
            + ", ".join(
                f"{w.project} (window {w.id}, {_iso(w.start)} to {_iso(w.end)})" for w in affected
            )
            + ": tell them"
        )
    return 0


def _list(args: argparse.Namespace) -> int:
    from beamhub.hub.commands.scheduler import _iso

    windows = _book().maintenance.list(all_=args.all)
    if args.json:
        print(json.dumps([w.to_dict() for w in windows], indent=2))
        return 0
    if not windows:
        print("no maintenance scheduled")
    for w in windows:
        print(
            f"{w.id:>4}  {_iso(w.start)} to {_iso(w.end)}  {w.state():<9}  {w.what}  "
            f"(down: {', '.join(w.down)})"
        )
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from beamhub.kernels.scheduler import SchedulerError

    try:
        window = _book().maintenance.cancel(args.id, args.admin, args.reason)
    except SchedulerError as exc:
        return _fail(exc)
    print(f"maintenance {window.id} ({window.what!r}) cancelled by {window.cancelled_by}")
    return 0


def _import(args: argparse.Namespace) -> int:
    import urllib.request

    from beamhub.kernels.scheduler import SchedulerError

    try:
        if args.feed.startswith(("http://", "https://")):
            with urllib.request.urlopen(args.feed, timeout=30) as resp:  # noqa: S310 - admin's URL
                data = resp.read(16 << 20)
        else:
            with open(args.feed, "rb") as f:
                data = f.read(16 << 20)
    except OSError as exc:
        print(f"beamhub maintenance: cannot read {args.feed}: {exc}", file=sys.stderr)
        return 2
    down = [s.strip() for s in args.down.split(",") if s.strip()]
    try:
        result = _book().maintenance.import_ics(data, down, args.admin)
    except SchedulerError as exc:
        return _fail(exc)
    print(
        f"imported {args.feed}: {len(result['added'])} added {result['added']}, "
        f"{len(result['cancelled'])} cancelled {result['cancelled']}, "
        f"{len(result['known'])} already known"
    )
    return 0


def _ics(args: argparse.Namespace) -> int:
    from beamhub.kernels.maintenance import icalendar_feed

    book = _book()
    approved = [w for w in book.list() if w.status == "approved"]
    sys.stdout.buffer.write(icalendar_feed(book.maintenance.list(all_=True), approved))
    return 0
