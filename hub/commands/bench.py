"""`beamhub bench KIND`: run a benchmark from bench/ (stream, spawn, analysis, steer, gateway) and print its JSON."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

__all__ = ["KINDS", "register"]

#: Benchmark modules under ``bench/``; each exposes ``main(argv: list[str]) -> int``.
KINDS = ("stream", "spawn", "analysis", "steer", "gateway")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="run a benchmark (prints JSON with --json); kinds: " + ", ".join(KINDS),
        description="Runs bench.<KIND>.main(ARGS); e.g. `beamhub bench stream --json`.",
    )
    parser.add_argument("kind", choices=KINDS, metavar="KIND", help=" | ".join(KINDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    parser.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    module_name = f"bench.{args.kind}"
    if importlib.util.find_spec(module_name) is None:
        print(
            f"beamhub bench: the {args.kind!r} benchmark is not installed ({module_name})",
            file=sys.stderr,
        )
        return 2
    return int(importlib.import_module(module_name).main(list(args.args)) or 0)
