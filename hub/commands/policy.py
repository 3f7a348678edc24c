"""`beamhub policy`: validate the gateway's policy file and evaluate a request against it offline."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("policy", help="gateway policy as code: validate, test a request")
    psub = parser.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    test = psub.add_parser("test", help="evaluate one request offline; exit 0 if allowed, 1 if not")
    test.add_argument("--user", default=None, help="the token's subject (omit: anonymous)")
    test.add_argument("--project", default=None, help="the project the request targets")
    test.add_argument(
        "--token-project", default=None, help="the token's project (default: --project)"
    )
    test.add_argument(
        "--scope", action="append", default=[], help="token scope(s), repeatable or space-separated"
    )
    test.add_argument("--role", action="append", default=[], help="gateway role(s), e.g. admin")
    test.add_argument("--action", required=True, help="e.g. channels.create, reservations.approve")
    test.add_argument("--source", default="127.0.0.1", help="client IP address (default 127.0.0.1)")
    test.add_argument("--enclave", default="dev", help="enclave name (default dev)")
    test.add_argument("--at", default=None, help="ISO time of the request (default now, UTC)")
    test.add_argument("--rules", default=None, help="policy file (default: the shipped default)")
    test.add_argument("--json", action="store_true", help="print the decision as JSON")
    test.set_defaults(func=_test)

    check = psub.add_parser("validate", help="check a policy file; exit 0 if it is valid")
    check.add_argument("rules", nargs="?", default=None, help="policy file (default: shipped)")
    check.set_defaults(func=_validate)


def _test(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from beamhub.hub.gateway.policy import ACTIONS, PolicyError, PolicyRequest, load_policy

    try:
        policy = load_policy(args.rules)
    except PolicyError as exc:
        print(f"beamhub policy test: {exc}", file=sys.stderr)
        return 2
    if args.action not in ACTIONS:
        print(
            f"beamhub policy test: unknown --action {args.action!r}; known: {sorted(ACTIONS)}",
            file=sys.stderr,
        )
        return 2
    at = None
    if args.at:
        try:
            at = datetime.fromisoformat(args.at)
        except ValueError:
            print(f"beamhub policy test: --at {args.at!r} is not an ISO time", file=sys.stderr)
            return 2
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
    scopes = frozenset(s for text in args.scope for s in text.replace(",", " ").split())
    request = PolicyRequest(
        action=args.action,
        user=args.user,
        token_project=(args.token_project or args.project) if args.user else None,
        project=args.project,
        scopes=scopes,
        roles=frozenset(args.role),
        enclave=args.enclave,
        source=args.source,
        at=at,
    )
    decision = policy.evaluate(request)
    if args.json:
        print(json.dumps(decision.as_dict()))
    else:
        verdict = "ALLOW" if decision.allow else "DENY"
        print(f"{verdict}  rule={decision.rule}  ({policy.source})")
        print(f"  {decision.reason}")
    return 0 if decision.allow else 1


def _validate(args: argparse.Namespace) -> int:
    from beamhub.hub.gateway.policy import PolicyError, load_policy

    try:
        policy = load_policy(args.rules)
    except PolicyError as exc:
        print(f"beamhub policy validate: {exc}", file=sys.stderr)
        return 1
    print(f"{policy.source}: version {policy.version}, {len(policy.rules)} rules, valid")
    return 0
