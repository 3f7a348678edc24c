"""`beamhub policy`: validate the gateway's policy file and evaluate a request against it offline."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("policy", help="gateway policy as code: validate, test a request")
    psub = parser.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    test = psub.add_parser(
        "test",
        help="evaluate one request offline (exit 0 if allowed, 1 if not); without --action, "
        "run the policy file's own tests (exit 0 if all pass)",
    )
    test.add_argument("--user", default=None, help="the token's subject (omit: anonymous)")
    test.add_argument("--project", default=None, help="the project the request targets")
    test.add_argument(
        "--token-project", default=None, help="the token's project (default: --project)"
    )
    test.add_argument(
        "--scope", action="append", default=[], help="token scope(s), repeatable or space-separated"
    )
    test.add_argument("--role", action="append", default=[], help="gateway role(s), e.g. admin")
    test.add_argument(
        "--action",
        default=None,
        help="e.g. channels.create, reservations.approve (omit: run the file's `tests:`)",
    )
    test.add_argument("--source", default="127.0.0.1", help="client IP address (default 127.0.0.1)")
    test.add_argument("--enclave", default="dev", help="enclave name (default dev)")
    test.add_argument("--at", default=None, help="ISO time of the request (default now, UTC)")
    test.add_argument("--rules", default=None, help="policy file (default: the shipped default)")
    test.add_argument("--json", action="store_true", help="print the decision as JSON")
    test.set_defaults(func=_test)

    reload = psub.add_parser(
        "reload",
        help="ask the running gateway to reload its policy and record every change of "
        "beamhub.yaml, policy and templates in the audit log (exit 1 if the policy is refused)",
    )
    reload.add_argument(
        "--state-dir", default=None, help="`beamhub up`'s state folder (default $BEAMHUB_HOME)"
    )
    reload.add_argument(
        "--pid", type=int, default=None, help="the gateway's pid (default: from status.json)"
    )
    reload.add_argument("--timeout", type=float, default=15.0, help="seconds to wait (default 15)")
    reload.set_defaults(func=_reload)

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
    if args.action is None:
        return _suite(policy)
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


def _suite(policy) -> int:
    from beamhub.hub.gateway.policy_tests import failures

    if not policy.tests:
        print(
            f"beamhub policy test: {policy.source} has no `tests:`; add cases or give --action",
            file=sys.stderr,
        )
        return 2
    from beamhub.hub.gateway.policy import PolicyError

    try:
        failed = failures(policy)
    except PolicyError as exc:
        print(f"beamhub policy test: {exc}", file=sys.stderr)
        return 2
    for line in failed:
        print(f"FAIL  {line}")
    print(f"{policy.source}: {len(policy.tests) - len(failed)}/{len(policy.tests)} tests pass")
    return 1 if failed else 0


def _validate(args: argparse.Namespace) -> int:
    from beamhub.hub.gateway.policy import PolicyError, load_policy

    try:
        policy = load_policy(args.rules)
    except PolicyError as exc:
        print(f"beamhub policy validate: {exc}", file=sys.stderr)
        return 1
    print(f"{policy.source}: version {policy.version}, {len(policy.rules)} rules, valid")
    return 0


def _reload(args: argparse.Namespace) -> int:
    """Write who asks (the request file's owner is what the gateway records), SIGHUP the gateway
    named in the supervisor's status.json, and wait for its answer."""
    import getpass
    import os
    import signal
    import time
    from pathlib import Path

    from beamhub.auth.home import state_dir
    from beamhub.hub.gateway.config_changes import LAST_RELOAD, RELOAD_REQUEST

    state = Path(args.state_dir).expanduser() if args.state_dir else state_dir()
    try:
        pid = args.pid
        if pid is None:
            status = json.loads((state / "status.json").read_text())
            pid = int(status["services"]["gateway"]["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        print(
            f"beamhub policy reload: no running gateway in {state}/status.json; start it with "
            "`beamhub up` or pass --state-dir",
            file=sys.stderr,
        )
        return 2
    folder = state / "gateway-config"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    asked = time.time()
    (folder / RELOAD_REQUEST).write_text(json.dumps({"user": getpass.getuser(), "at": asked}))
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(
            f"beamhub policy reload: cannot signal the gateway (pid {pid}): {exc}", file=sys.stderr
        )
        return 2
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            result = json.loads((folder / LAST_RELOAD).read_text())
        except (OSError, ValueError):
            result = None
        if isinstance(result, dict) and result.get("time", 0) >= asked:
            break
        time.sleep(0.1)
    else:
        print(f"beamhub policy reload: the gateway (pid {pid}) did not answer", file=sys.stderr)
        return 2
    if not result["changes"]:
        print("no change since the last reload")
    for change in result["changes"]:
        verdict = "REFUSED" if change["outcome"] == "deny" else "recorded"
        print(f"{verdict}  {change['kind']} {change['path']} ({change['what']})")
        print(f"  {change['reason']}")
        print(f"  by {change['who']}")
    return 1 if result["refused"] else 0
