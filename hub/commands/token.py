"""`beamhub token`: admin/dev commands to make keys, print the JWKS and issue a token."""

from __future__ import annotations

import argparse
import getpass
import json
import os
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
    issue.add_argument(
        "--sub",
        default=None,
        help="the user the token acts for (default: the caller: $JUPYTERHUB_USER in a user's "
        "server, else your Unix account)",
    )
    issue.add_argument("--audience", default=None, help="aud claim (default 'beamhub')")
    issue.add_argument("--max-ttl", type=int, default=86400, help="refuse a ttl above this")
    issue.set_defaults(func=_issue)

    jwks = tsub.add_parser("jwks", help="print the public JWKS that verifiers need")
    jwks.set_defaults(func=_jwks)

    keygen = tsub.add_parser("keygen", help="create the signing key if it does not exist")
    keygen.set_defaults(func=_keygen)


def _key_path():
    from beamhub.auth.home import token_dir

    return token_dir() / "signing-key.pem"


def _issuer(max_ttl: int = 86400):
    from beamhub.auth.tokens import SigningKey, TokenIssuer

    key = SigningKey.load_or_create(_key_path())
    return TokenIssuer(key, max_ttl=max_ttl)


def _subject(given: str | None) -> str:
    """Whom the token names: ``--sub``, else the caller: the hub user whose server runs this
    command (``$JUPYTERHUB_USER``), else the Unix account running it.

    Never a made-up ``admin``: the subject is what the DSN's channel owners and the audit log
    record, so it must name someone who is responsible for the token.
    """
    if given:
        return given
    if os.environ.get("JUPYTERHUB_USER"):
        return os.environ["JUPYTERHUB_USER"]
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        raise ValueError(
            "--sub: this process has no user name; name the user the token acts for, "
            "e.g. --sub alice"
        ) from None


def _issue(args: argparse.Namespace) -> int:
    try:
        sub = _subject(args.sub)
    except ValueError as exc:
        print(f"beamhub token issue: {exc}", file=sys.stderr)
        return 2
    issuer = _issuer(args.max_ttl)
    try:
        token = issuer.issue(
            sub=sub,
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
