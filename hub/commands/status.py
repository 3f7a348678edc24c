"""`beamhub status`: is `beamhub up` running, and how is each of its services (restarts, exits)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

__all__ = ["read_status", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "status",
        help="the services of a running `beamhub up`: state, pid, restarts, last exit",
        description="Reads the status `beamhub up` keeps in its state folder. Exit 0 when it runs "
        "and every service is running, 1 when a service is down or restarting, 3 when "
        "`beamhub up` is not running.",
    )
    parser.add_argument("--state-dir", type=Path, default=None, help="default: $BEAMHUB_HOME")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.set_defaults(func=_run)


def read_status(state: Path) -> dict[str, Any]:
    """The supervisor's status.json and whether its `beamhub up` still holds the lock."""
    from beamhub.hub.up.lock import UpLock

    lock = UpLock(state / "beamhub-up.lock")
    running = lock.held_by_another()
    try:
        status = json.loads((state / "status.json").read_text())
    except (OSError, ValueError):
        status = {"services": {}}
    status["running"] = running
    return status


def _run(args: argparse.Namespace) -> int:
    from beamhub.auth.home import state_dir

    state = args.state_dir or state_dir()
    status = read_status(state)
    if args.json:
        print(json.dumps(status, indent=2))
    elif not status["running"]:
        print(f"beamhub up is not running for {state} (start it with `beamhub up`)")
    else:
        print(f"beamhub up (pid {status.get('pid')}) for {state}")
        now = time.time()
        for name, s in status["services"].items():
            since = f"for {_ago(now - s['since'])}" if s.get("since") else ""
            exit_ = ""
            if s.get("last_exit") is not None:
                code = s["last_exit"]
                how = f"signal {-code}" if code < 0 else f"status {code}"
                exit_ = f"; last exit {how} {_ago(now - s['last_exit_at'])} ago"
            pid = f"pid {s['pid']}" if s.get("pid") else "no process"
            print(
                f"  {name:14} {s['state']:10} {pid:11} {since:14} restarts {s['restarts']}{exit_}"
            )
    if not status["running"]:
        return 3
    healthy = all(s["state"] == "running" for s in status["services"].values())
    return 0 if healthy else 1


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"
