"""`beamhub beamtime plan|apply|open|list FILE`: a beamtime as one declarative unit.

`plan` checks a beamtime file against the enclave profile, its DSN template, the QoS tiers and
the maintenance calendar, and shows what apply will create; `apply` requests the window (and with
``--approve`` approves it), records the unit and, with ``--wait``, creates the channel, the
analysis job and the dashboard link when the window opens; `open` creates what is due for every
recorded unit once. Run them on the hub machine (the reservation book and the state folder of
`beamhub up`; docs/admin/beamtime.md).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "beamtime", help="a beamtime as one declarative unit: plan, apply, open, list"
    )
    bsub = parser.add_subparsers(dest="beamtime_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--deployment",
            default=None,
            help="beamhub.yaml: its enclave and DSN template (default: the one `beamhub up` "
            "would use)",
        )

    plan = bsub.add_parser("plan", help="check a beamtime file and show what apply would create")
    plan.add_argument("file", help="a beamtime file (YAML with a `beamtime:` section)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    common(plan)
    plan.set_defaults(func=_plan)

    apply = bsub.add_parser(
        "apply", help="request the window, record the unit; create the rest when the window opens"
    )
    apply.add_argument("file", help="a beamtime file")
    apply.add_argument(
        "--approve", action="store_true", help="approve the window too (a facility admin)"
    )
    apply.add_argument(
        "--wait", action="store_true", help="stay until the window opens and create the rest"
    )
    apply.add_argument(
        "--as",
        dest="user",
        default=getpass.getuser(),
        help="the project member the beamtime is for: the window's requester, and the user the "
        "channel and analysis job belong to (default: you)",
    )
    _connection(apply)
    common(apply)
    apply.set_defaults(func=_apply)

    op = bsub.add_parser(
        "open", help="create what is due for every recorded unit whose window is open (once)"
    )
    _connection(op)
    op.set_defaults(func=_open)

    lst = bsub.add_parser("list", help="the recorded units and what exists of each")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_list)


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gateway",
        default=None,
        help="the gateway's API base URL (default: the running `beamhub up`'s .../api/v1)",
    )
    p.add_argument(
        "--dsn", default=None, help="the DSN's URL (default: the running `beamhub up`'s)"
    )
    p.add_argument(
        "--poll", type=float, default=5.0, help="seconds between checks with --wait (default 5)"
    )
    p.add_argument(
        "--timeout", type=float, default=None, help="give up waiting after this many seconds"
    )


def _state() -> Path:
    from beamhub.auth.home import state_dir

    return state_dir()


def _deployment(path: str | None):
    from beamhub.hub.up.deployment import load_deployment

    return load_deployment(path)


def _fail(message: str) -> int:
    print(f"beamhub beamtime: {message}", file=sys.stderr)
    return 2


def _make_plan(args: argparse.Namespace):
    from beamhub.hub.beamtime.plan import load_unit, plan
    from beamhub.hub.commands.maintenance import _book

    unit = load_unit(args.file)
    return plan(
        unit, _deployment(args.deployment), _book(), approve=getattr(args, "approve", False)
    )


def _print_plan(p) -> None:
    u = p.unit
    print(
        f"beamtime of project {u.project} (enclave {p.enclave}, template {Path(p.template_path).name})"
    )
    for i, step in enumerate(p.steps, 1):
        print(f"  {i}. {step}")
    for problem in p.problems:
        print(f"  PROBLEM  {problem}")


def _plan(args: argparse.Namespace) -> int:
    from beamhub.hub.beamtime.plan import BeamtimeError
    from beamhub.hub.up.deployment import DeploymentError

    try:
        p = _make_plan(args)
    except (BeamtimeError, DeploymentError) as exc:
        return _fail(str(exc))
    if args.json:
        print(
            json.dumps(
                {
                    "ok": p.ok,
                    "enclave": p.enclave,
                    "template": p.template_path,
                    "steps": p.steps,
                    "problems": [{"field": x.field, "message": x.message} for x in p.problems],
                    "unit": p.unit.to_dict(),
                },
                indent=2,
            )
        )
    else:
        _print_plan(p)
        print("plan ok" if p.ok else f"{len(p.problems)} problem(s): fix the fields named")
    return 0 if p.ok else 1


def _urls(args: argparse.Namespace) -> tuple[str, str, str | None]:
    """The gateway's API base, the DSN and the dashboard: as given, else `beamhub up`'s."""
    urls: dict[str, str] = {}
    try:
        urls = json.loads((_state() / "runtime-urls.json").read_text())
    except (OSError, ValueError):
        pass
    gateway = args.gateway or (urls["gateway"] + "api/v1" if urls.get("gateway") else None)
    dsn = args.dsn or os.environ.get("BEAMHUB_DSN_URL") or urls.get("dsn")
    if not gateway or not dsn:
        raise ValueError(
            "no gateway or DSN URL: run it where `beamhub up` runs ($BEAMHUB_HOME), or pass "
            "--gateway and --dsn"
        )
    return gateway, dsn, urls.get("dashboard")


def _token_for(fallback: str):
    """Tokens for the unit's project: $BEAMHUB_TOKEN as given, else minted with the state
    folder's signing key (as `beamhub token issue`) for the user who applied the unit (the hub
    runs the analysis job as that user), for the window's remaining time."""
    given = os.environ.get("BEAMHUB_TOKEN")

    def token_for(unit, lifetime_s: float, user: str) -> str:
        if given:
            return given
        from beamhub.hub.commands.token import _issuer

        ttl = max(60, int(lifetime_s))
        return _issuer(max(ttl, 86400)).issue(
            sub=user or fallback,
            project=unit.project,
            scopes="stream.publish stream.read jobs",
            ttl=ttl,
        )

    return token_for


def _open_once(args: argparse.Namespace, user: str) -> list[dict]:
    from beamhub.hub.beamtime.apply import open_due
    from beamhub.hub.commands.maintenance import _book

    gateway, dsn, dashboard = _urls(args)
    changed = open_due(_state(), _book(), gateway, dsn, _token_for(user), dashboard)
    for c in changed:
        if c.get("error"):
            print(f"  not yet: {c['error']}", file=sys.stderr)
        elif c["status"] == "created":
            made = c["created"]
            print(
                f"created for {Path(c['file']).stem}: channel {made['channel']}, analysis job "
                f"{made['job']} (tier {made['job_tier']})"
                + (f", dashboard {made['dashboard']}" if made.get("dashboard") else "")
            )
        else:
            print(f"skipped {Path(c['file']).stem}: {c.get('why')}")
    return changed


def _apply(args: argparse.Namespace) -> int:
    from beamhub.hub.beamtime.apply import ApplyError, record, units
    from beamhub.hub.beamtime.plan import BeamtimeError
    from beamhub.hub.commands.maintenance import _book
    from beamhub.hub.up.deployment import DeploymentError
    from beamhub.kernels.scheduler import SchedulerError

    try:
        p = _make_plan(args)
    except (BeamtimeError, DeploymentError) as exc:
        return _fail(str(exc))
    _print_plan(p)
    if not p.ok:
        return _fail(f"{len(p.problems)} problem(s); nothing was requested")
    u = p.unit
    book = _book()
    try:
        window_id = book.request(u.project, u.start, u.end, u.tier, u.justification, args.user)
        if args.approve:
            book.approve(window_id, getpass.getuser())
    except SchedulerError as exc:
        where = {"start": "window.start", "end": "window.end"}.get(exc.field or "", exc.field)
        return _fail(f"{exc.message} (field beamtime.{where or 'window'})")
    path = record(u, window_id, _state(), args.user)
    state = "approved" if args.approve else "requested (an admin approves it)"
    print(f"window {window_id} {state}; unit recorded in {path}")
    if not args.wait:
        print(
            "the channel, analysis and dashboard are created when the window opens "
            "(`beamhub beamtime open`, or apply --wait)"
        )
        return 0
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while True:
        try:
            _open_once(args, args.user)
        except (ApplyError, ValueError) as exc:
            return _fail(str(exc))
        data = dict(units(_state())).get(path, {})
        if data.get("status") == "created":
            return 0
        if data.get("status") == "skipped":
            return 1
        if deadline is not None and time.monotonic() > deadline:
            return _fail(f"window {window_id} did not open within {args.timeout} s")
        time.sleep(args.poll)


def _open(args: argparse.Namespace) -> int:
    from beamhub.hub.beamtime.apply import ApplyError

    try:
        changed = _open_once(args, getpass.getuser())
    except (ApplyError, ValueError) as exc:
        return _fail(str(exc))
    if not changed:
        print("nothing due")
    return 1 if any(c.get("error") for c in changed) else 0


def _list(args: argparse.Namespace) -> int:
    from beamhub.hub.beamtime.apply import units

    found = units(_state())
    if args.json:
        print(json.dumps([d for _, d in found], indent=2))
        return 0
    if not found:
        print("no beamtime units recorded")
    for path, data in found:
        made = data.get("created") or {}
        print(
            f"{path.stem:<24} {data.get('status'):<8} window {data.get('window_id')}"
            + (f"  channel {made.get('channel')} job {made.get('job')}" if made else "")
            + (
                f"  ({data.get('why') or data.get('last_error')})"
                if data.get("why") or data.get("last_error")
                else ""
            )
        )
    return 0
