"""`beamhub audit verify LOG`: check the gateway audit log's hash chain, name the first bad record,
and count the torn last writes a crash left (kept in ``LOG.torn``)."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("audit", help="the gateway's hash-chained audit log")
    asub = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = asub.add_parser("verify", help="check the chain; exit 0 if intact, 1 if broken")
    verify.add_argument("log", help="audit log file (JSON Lines), e.g. ~/.beamhub/audit.jsonl")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    from beamhub.hub.gateway.audit import torn_path, verify_log

    try:
        result = verify_log(args.log)
    except OSError as exc:
        print(f"beamhub audit verify: cannot read {args.log}: {exc.strerror}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {
                    "ok": result.ok,
                    "records": result.records,
                    "line": result.line,
                    "reason": result.reason,
                    "torn_tails": result.torn_tails,
                }
            )
        )
        return 0 if result.ok else 1
    if result.ok:
        print(f"{args.log}: OK, {result.records} records, chain intact")
    elif result.line is None:
        print(f"{args.log}: BROKEN: {result.reason}")
    else:
        print(
            f"{args.log}: BROKEN at line {result.line} (record {result.records + 1}): "
            f"{result.reason}; the {result.records} records before it verify"
        )
    if result.torn_tails:
        print(
            f"{args.log}: {result.torn_tails} torn last write(s) after a crash, kept as evidence "
            f"in {torn_path(args.log)} and cut off the chain"
        )
    return 0 if result.ok else 1
