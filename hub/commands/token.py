"""`beamhub token`: admin/dev commands to make keys, print the JWKS and issue a token."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("token", help="project access tokens (admin/dev)")
    tsub = parser.add_subparsers(dest="token_command", metavar="ACTION", required=True)

    issue = tsub.add_parser("issue", help="print a signed project access token")
    issue.add_argument("--project", required=True, help="project the token acts for")
    issue.add_argument(
        "--scope",
        action="append",
        required=True,
        help="scope(s), repeatable or space-separated, e.g. 'stream.read steer'",
    )
    issue.add_argument("--ttl", type=int, default=900, help="lifetime in seconds (default 900)")
    issue.add_argument("--sub", default="admin", help="subject (user name), default 'admin'")
    issue.add_argument("--audience", default=None, help="aud claim (default 'beamhub')")
    issue.add_argument("--max-ttl", type=int, default=86400, help="refuse a ttl above this")
    issue.set_defaults(func=_issue)

    jwks = tsub.add_parser("jwks", help="print the public JWKS that verifiers need")
    jwks.set_defaults(func=_jwks)

    keygen = tsub.add_parser("keygen", help="create the signing key if it does not exist")
    keygen.set_defaults(func=_keygen)


def _key_path():
    from beamhub.auth.home import state_dir

    return state_dir() / "signing-key.pem"


def _issuer(max_ttl: int = 86400):
    from beamhub.auth.tokens import SigningKey, TokenIssuer

    key = SigningKey.load_or_create(_key_path())
    return TokenIssuer(key, max_ttl=max_ttl)


def _issue(args: argparse.Namespace) -> int:
    issuer = _issuer(args.max_ttl)
    try:
        token = issuer.issue(
            sub=args.sub,
            project=args.project,
            scopes=" ".join(args.scope),
            ttl=args.ttl,
            audience=args.audience,
        )
    except ValueError as exc:
        print(f"beamhub token issue: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _jwks(args: argparse.Namespace) -> int:
    print(json.dumps(_issuer().jwks(), indent=2))
    return 0


def _keygen(args: argparse.Namespace) -> int:
    _issuer()
    print(f"signing key: {_key_path()}")
    return 0
