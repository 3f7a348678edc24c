"""`beamhub totp USER`: the dev IdP's current one-time code for an enrolled dev user."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "totp",
        help="the current one-time code of a dev user (the dev IdP's second factor)",
        description="Dev enclave helper: prints the TOTP code an authenticator app would show for "
        "USER, from the secrets `beamhub up` enrolled in the state dir (idp-totp.json).",
    )
    parser.add_argument("user", help="dev user, e.g. alice")
    parser.add_argument("--state-dir", type=Path, default=None, help="default: $BEAMHUB_HOME")
    parser.add_argument("--uri", action="store_true", help="print the otpauth:// URI instead")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from beamhub.auth.home import state_dir
    from beamhub.hub.up import totp

    state = args.state_dir or state_dir()
    secrets = totp.load_secrets(state)
    if args.user not in secrets:
        enrolled = ", ".join(sorted(secrets)) or "nobody yet (start `beamhub up` once)"
        print(
            f"beamhub totp: {args.user!r} is not enrolled in {state}; enrolled: {enrolled}",
            file=sys.stderr,
        )
        return 2
    if args.uri:
        print(totp.otpauth_uri(args.user, secrets[args.user]))
        return 0
    left = totp.STEP_S - int(time.time()) % totp.STEP_S
    print(f"{totp.code(secrets[args.user])}  (valid for {left} s more)")
    return 0
