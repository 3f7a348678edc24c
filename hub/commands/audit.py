"""`beamhub audit verify LOG`: check the gateway audit log's hash chain against the token service's
signed checkpoints, name the first bad record (or from which record the log can no longer be
trusted), and count the torn last writes a crash left (kept in ``LOG.torn``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("audit", help="the gateway's hash-chained audit log")
    asub = parser.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    verify = asub.add_parser(
        "verify",
        help="check the chain and its signed checkpoints; exit 0 if intact, 1 if not",
    )
    verify.add_argument("log", help="audit log file (JSON Lines), e.g. ~/.beamhub/audit.jsonl")
    verify.add_argument(
        "--checkpoints",
        default=None,
        help="the token service's signed checkpoints: its .../services/tokens/audit/checkpoints "
        "URL or a JSON file saved from it (default: the token service of the `beamhub up` whose "
        "state folder holds the log, or $BEAMHUB_HOME's)",
    )
    verify.add_argument(
        "--jwks", default=None, help="the token service's JWKS (default: beside --checkpoints)"
    )
    verify.add_argument("--name", default="gateway", help="the log's name in the checkpoints")
    verify.add_argument(
        "--no-checkpoints",
        action="store_true",
        help="check the chain alone (truncation and re-chaining then go unnoticed)",
    )
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(func=_verify)


def _token_service(log: str) -> str | None:
    """The token service's URL from the state folder of `beamhub up` (runtime-urls.json)."""
    homes = [Path(log).resolve().parent]
    if os.environ.get("BEAMHUB_HOME"):
        homes.append(Path(os.environ["BEAMHUB_HOME"]))
    for home in homes:
        try:
            return json.loads((home / "runtime-urls.json").read_text())["tokens"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _sources(args: argparse.Namespace) -> tuple[str, str] | None:
    if args.no_checkpoints:
        return None
    checkpoints, jwks = args.checkpoints, args.jwks
    if checkpoints is None:
        tokens = _token_service(args.log)
        if tokens is None:
            return None
        checkpoints = tokens + "audit/checkpoints"
    if jwks is None:
        if not checkpoints.startswith(("http://", "https://")):
            raise ValueError("--jwks: give the token service's JWKS with a checkpoint file")
        jwks = checkpoints.split("?")[0].removesuffix("audit/checkpoints") + "jwks.json"
    return checkpoints, jwks


def _verify(args: argparse.Namespace) -> int:
    from beamhub.hub.gateway.anchor import AnchorError, load_checkpoints
    from beamhub.hub.gateway.audit import torn_path, verify_log

    try:
        sources = _sources(args)
        marks = load_checkpoints(*sources, name=args.name) if sources else None
    except (AnchorError, ValueError) as exc:
        print(f"beamhub audit verify: checkpoints: {exc}", file=sys.stderr)
        return 2
    try:
        result = verify_log(args.log, marks)
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
                    "checkpoints": result.checkpoints,
                    "anchored": result.anchored,
                    "untrusted_from": result.untrusted_from,
                }
            )
        )
        return 0 if result.ok else 1
    if result.ok:
        print(f"{args.log}: OK, {result.records} records, chain intact")
    elif result.line is None or result.untrusted_from != result.line:
        print(f"{args.log}: BROKEN: {result.reason}")
    else:
        print(
            f"{args.log}: BROKEN at line {result.line} (record {result.records + 1}): "
            f"{result.reason}; the {result.records} records before it verify"
        )
    if marks is None:
        print(
            f"{args.log}: not checked against signed checkpoints (none found; give "
            "--checkpoints): dropped last records or a recomputed chain would go unnoticed"
        )
    elif result.ok:
        print(
            f"{args.log}: anchored: records 1-{result.anchored} match the token service's "
            f"{result.checkpoints} signed checkpoint(s); "
            f"{result.records - result.anchored} later record(s) not yet anchored"
        )
    if result.untrusted_from is not None:
        print(f"{args.log}: cannot be trusted from record {result.untrusted_from} on")
    if result.torn_tails:
        print(
            f"{args.log}: {result.torn_tails} torn last write(s) after a crash, kept as evidence "
            f"in {torn_path(args.log)} and cut off the chain"
        )
    return 0 if result.ok else 1
