"""The `beamhub` command: the one place that wires every package together."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

__all__ = ["COMMANDS", "main", "state_dir"]

#: Subcommand modules under ``hub.commands``, in the order ``--help`` lists them.
COMMANDS = [
    "up",
    "dsn",
    "source",
    "consume",
    "token",
    "check",
    "policy",
    "audit",
    "scheduler",
    "bench",
]


def state_dir() -> Path:
    """Where keys, databases and logs live: ``$BEAMHUB_HOME`` or ``~/.beamhub``."""
    return Path(os.environ.get("BEAMHUB_HOME") or Path.home() / ".beamhub")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beamhub",
        description="Interactive science on HPC: live detector streams, steering, reserved nodes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module_name = f"hub.commands.{name}"
        if importlib.util.find_spec(module_name) is None:
            continue  # the command has not been built yet
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
