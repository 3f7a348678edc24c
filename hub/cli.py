"""The `beamhub` command: the one place that wires every package together."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

__all__ = ["COMMANDS", "main"]

#: Subcommand modules under ``hub.commands``, in the order ``--help`` lists them.
COMMANDS = [
    "up",
    "status",
    "urls",
    "dsn",
    "source",
    "consume",
    "token",
    "totp",
    "check",
    "policy",
    "audit",
    "scheduler",
    "maintenance",
    "report",
    "incident",
    "beamtime",
    "bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beamhub",
        description="Interactive science on HPC: live detector streams, steering, reserved nodes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"beamhub.hub.commands.{name}").register(sub)
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
