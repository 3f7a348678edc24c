"""`beamhub bench KIND`: run a benchmark from bench/ (stream, spawn, analysis, steer, ...) and print its JSON."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil
import sys

__all__ = ["KINDS", "available", "register"]

#: The benchmarks the issues ask for; any other ``bench/<kind>.py`` with a ``main`` runs too.
KINDS = (
    "stream",
    "spawn",
    "analysis",
    "steer",
    "gateway",
    "liveview",
    "faults",
    "soak",
    "dmz",
    "allocation",
)


def available() -> list[str]:
    """Benchmark modules present under ``bench/`` (each exposes ``main(argv) -> int``)."""
    spec = importlib.util.find_spec("beamhub.bench")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = pkgutil.iter_modules(spec.submodule_search_locations)
    return sorted(m.name for m in found if not m.name.startswith("_"))


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="run a benchmark (JSON with --json): " + ", ".join(KINDS),
        description="Runs beamhub.bench.<KIND>.main(ARGS); e.g. `beamhub bench stream --json`.",
    )
    parser.add_argument("kind", metavar="KIND", help=" | ".join(KINDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    parser.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    kinds = available()
    module = importlib.import_module(f"beamhub.bench.{args.kind}") if args.kind in kinds else None
    if module is None or not callable(getattr(module, "main", None)):
        runnable = [k for k in kinds if k in KINDS] or kinds
        print(
            f"beamhub bench: no benchmark {args.kind!r}; available: {', '.join(runnable)}",
            file=sys.stderr,
        )
        return 2
    return int(module.main(list(args.args)) or 0)
