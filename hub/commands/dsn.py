"""`beamhub dsn`: run a Data Streaming Node (control API + data plane) until Ctrl-C/SIGTERM."""

from __future__ import annotations

import argparse
import sys

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "dsn",
        help="run a Data Streaming Node: token-checked control API and the data plane",
        description="Channels are created over HTTP with a project access token and bounded by "
        "an admin template; the data plane (L4 router / L7 gateway) binds on --data-host.",
    )
    parser.add_argument("--port", type=int, default=8100, help="control API port (default 8100)")
    parser.add_argument("--host", default="127.0.0.1", help="control API address")
    parser.add_argument(
        "--data-host", default="127.0.0.1", help="address the data plane's sockets bind to"
    )
    parser.add_argument(
        "--producer-host",
        default=None,
        metavar="ADDR",
        help="address the producer faces bind to instead of --data-host: a DSN in a science "
        "DMZ takes frames on its instrument-side interface and serves consumers on its "
        "compute-side one (--data-host); see docs/dmz.md",
    )
    parser.add_argument(
        "--template", default=None, help="admin template YAML (default: the packaged dev template)"
    )
    parser.add_argument(
        "--jwks",
        default=None,
        help="public JWKS (file or http(s) URL) of the token issuer; default: the dev signing "
        "key in $BEAMHUB_HOME/tokens/signing-key.pem, so `beamhub token issue` tokens work",
    )
    parser.add_argument("--issuer", default=None, help="required iss claim (default beamhub-dev)")
    parser.add_argument("--audience", default=None, help="required aud claim (default beamhub)")
    parser.add_argument(
        "--revocations",
        default=None,
        metavar="URL",
        help='the hub\'s revocation list (GET -> {"revoked": [jti, ...]}), polled so a revoked '
        "token is refused within one poll interval",
    )
    parser.add_argument(
        "--revocation-poll", type=float, default=5.0, help="seconds between revocation polls"
    )
    parser.add_argument(
        "--reap-interval", type=float, default=1.0, help="seconds between expiry sweeps"
    )
    parser.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help="where channels are kept (DIR/dsn/channels.sqlite, mode 0600: it holds the data "
        "plane's CURVE secret key), so that a restarted DSN provisions them again on the same "
        "endpoints; default $BEAMHUB_HOME (~/.beamhub)",
    )
    parser.add_argument(
        "--metrics",
        choices=("local-or-token", "token", "public"),
        default="local-or-token",
        help="who may read /metrics: a client on this host or a token with the 'metrics' "
        "scope (default), only such a token, or anyone",
    )
    parser.add_argument(
        "--ephemeral",
        action="store_true",
        help="keep channels in memory only: they are gone when the DSN stops",
    )
    parser.set_defaults(func=_run)


def _verifier(args: argparse.Namespace, is_revoked=None):
    from beamhub.auth.jwks import RemoteJwksVerifier
    from beamhub.auth.tokens import (
        DEFAULT_AUDIENCE,
        DEFAULT_ISSUER,
        SigningKey,
        TokenVerifier,
        load_jwks,
    )

    issuer, audience = args.issuer or DEFAULT_ISSUER, args.audience or DEFAULT_AUDIENCE
    if args.jwks and args.jwks.startswith(("http://", "https://")):
        # fetched at the first verification: the token service may start after the DSN
        verifier = RemoteJwksVerifier(args.jwks, issuer, audience, is_revoked=is_revoked)
        return verifier, args.jwks
    if args.jwks:
        jwks = load_jwks(args.jwks)
        origin = args.jwks
    else:
        from beamhub.auth.home import token_dir

        path = token_dir() / "signing-key.pem"
        jwks = SigningKey.load_or_create(path).jwks()
        origin = f"dev signing key {path}"
    verifier = TokenVerifier(jwks, issuer=issuer, audience=audience, is_revoked=is_revoked)
    return verifier, origin


def _run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from beamhub.auth.tokens import RevocationCache
    from beamhub.streaming.template import Template, TemplateError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    revocations = None
    try:
        template = Template.load(args.template)
        if args.revocations:
            revocations = RevocationCache(args.revocations, interval=args.revocation_poll)
        verifier, origin = _verifier(args, revocations.is_revoked if revocations else None)
    except (TemplateError, ValueError, OSError) as exc:
        print(f"beamhub dsn: {exc}", file=sys.stderr)
        return 2
    if revocations is not None:
        revocations.start()

    if args.ephemeral:
        store_dir = None
    else:
        from beamhub.auth.home import state_dir

        store_dir = args.state_dir or state_dir()

    producers = f", producer faces on {args.producer_host}" if args.producer_host else ""

    async def serve() -> int:
        from beamhub.streaming.controlplane import FAILED
        from beamhub.streaming.dsn import DataStreamingNode

        node = DataStreamingNode(
            verifier,
            template,
            host=args.host,
            data_host=args.data_host,
            producer_host=args.producer_host,
            reap_interval=args.reap_interval,
            state_dir=store_dir,
            metrics_access=args.metrics,
        )
        try:
            url = await node.start(args.port)
        except (OSError, RuntimeError) as exc:
            print(
                f"beamhub dsn: cannot start on {args.host}:{args.port} (data plane on "
                f"{args.data_host}{producers}): {exc}",
                file=sys.stderr,
            )
            await node.stop()
            return 1
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        print(f"beamhub dsn: control API {url}  (health: {url}/api/health)", flush=True)
        print(f"beamhub dsn: data plane binds on {args.data_host}{producers}", flush=True)
        print(f"beamhub dsn: template {template.name!r} ({template.source})", flush=True)
        if node.store is not None:
            failed = [c.id for c in node.channels.values() if c.state == FAILED]
            print(
                f"beamhub dsn: channels kept in {node.store.path}; {len(node.channels)} restored"
                + (f", {len(failed)} FAILED (see the log): {' '.join(failed)}" if failed else ""),
                flush=True,
            )
        else:
            print("beamhub dsn: channels kept in memory only (--ephemeral)", flush=True)
        print(f"beamhub dsn: tokens verified with {origin}; Ctrl-C to stop", flush=True)
        if revocations is not None:
            print(
                f"beamhub dsn: revocations polled from {revocations.url} every "
                f"{revocations.interval:g} s",
                flush=True,
            )
        try:
            await done.wait()
        finally:
            kept = " (they stay stored for the next start)" if node.store is not None else ""
            print(f"beamhub dsn: stopping (removing channels' data paths){kept}", flush=True)
            await node.stop()
        return 0

    try:
        return asyncio.run(serve())
    finally:
        if revocations is not None:
            revocations.close()
