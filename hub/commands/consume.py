"""`beamhub consume`: read a DSN channel and print live figures (frames, loss, latency).

It keeps reading across a DSN restart (ZeroMQ reconnects to the same endpoints, which the
restarted DSN binds again); the frames missed meanwhile are ``lost`` with reason ``dsn_restart``
(``lost_reasons`` and ``events`` in ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

__all__ = ["project_token", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "consume",
        help="read frames from a DSN channel and print frames, bytes, lost, malformed, latency",
        description=(
            "Read a channel's monitor fan-out (every frame; dropped if this viewer is slow; the "
            "analysis is not disturbed), or with --work its lossless work stream (frames are "
            "shared out among the work consumers: this one takes them from the analysis). "
            "--channel takes a stream name (e.g. detector) or a channel id (ch-...); the DSN is "
            "--dsn, else $BEAMHUB_DSN_URL, else the one of the running `beamhub up` "
            "($BEAMHUB_HOME/runtime-urls.json)."
        ),
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--channel", help="stream name (e.g. detector) or channel id (ch-...)")
    where.add_argument("--endpoint", help="a ZeroMQ endpoint instead, e.g. tcp://127.0.0.1:5555")
    parser.add_argument(
        "--dsn",
        metavar="URL",
        help="DSN control API (default: $BEAMHUB_DSN_URL, else the running `beamhub up`'s)",
    )
    parser.add_argument(
        "--token",
        help="project access token (default: $BEAMHUB_TOKEN; prefer the variable: a command-line "
        "argument is visible to other users in ps)",
    )
    parser.add_argument("--report", help="report endpoint (with --endpoint), so the DSN sees lag")
    face = parser.add_mutually_exclusive_group()
    face.add_argument(
        "--work",
        action="store_true",
        help="take frames from the lossless work stream (shared with the analysis workers)",
    )
    face.add_argument(
        "--monitor", action="store_true", help="the monitor fan-out (the default; kept for scripts)"
    )
    parser.add_argument(
        "--exclusive",
        action="store_true",
        help="with --work: this is the only work consumer, so count sequence gaps as lost",
    )
    parser.add_argument("--count", type=int, default=None, help="stop after N frames")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="stop after S seconds (exit 1 if --count not reached)",
    )
    parser.add_argument("--consumer-id", default=None, help="name reported to the DSN")
    parser.add_argument(
        "--curve-cert",
        metavar="FILE",
        help="pyzmq secret certificate (zmq.auth.create_certificates) whose public key was "
        "registered with an encrypted channel",
    )
    parser.add_argument("--curve-server-key", help="the DSN's z85 public key (with --endpoint)")
    parser.add_argument("--hwm", type=int, default=16, help="receive high-water mark (frames)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    parser.set_defaults(func=_consume)


def project_token(given: str | None, command: str, scope: str = "stream.read") -> str:
    """``--token`` or ``$BEAMHUB_TOKEN``; else an error saying where to get one with ``scope``."""
    token = given or os.environ.get("BEAMHUB_TOKEN")
    if token:
        return token
    where = "/services/tokens/ on the hub"
    try:
        from beamhub.hub.commands.urls import runtime_urls

        where = runtime_urls()["tokens"]
    except (RuntimeError, KeyError):
        pass
    raise ValueError(
        f"no project token: set BEAMHUB_TOKEN to one with scope {scope} (mint it at {where}, "
        f"or as this machine's admin: export BEAMHUB_TOKEN=$(beamhub token issue --project P "
        f"--scope {scope} --sub YOUR_NAME)), then run `beamhub {command}` again"
    )


def _open(args: argparse.Namespace) -> Any:
    from beamhub.hub.commands.urls import discover
    from beamhub.streaming.consumer import StreamConsumer

    if args.exclusive and not args.work:
        raise ValueError(
            "--exclusive: only a work consumer can be exclusive; add --work (the monitor counts "
            "every gap as lost anyway)"
        )
    common: dict[str, Any] = {
        "consumer_id": args.consumer_id,
        "monitor": not args.work,
        "exclusive": args.exclusive,
        "hwm": args.hwm,
    }
    if args.curve_cert:
        import zmq.auth

        try:
            public, secret = zmq.auth.load_certificate(args.curve_cert)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--curve-cert: cannot read {args.curve_cert}: {exc}") from exc
        if secret is None:
            raise ValueError(f"--curve-cert: {args.curve_cert} holds no secret key")
        common["curve_keypair"] = (public, secret)
    if args.endpoint:
        if args.dsn:
            raise ValueError("--dsn: goes with --channel; --endpoint connects without the DSN")
        if args.curve_server_key:
            common["curve_server_key"] = args.curve_server_key
        return StreamConsumer(args.endpoint, report=args.report, **common)
    dsn = discover("dsn", args.dsn)
    token = project_token(args.token, "consume")
    return StreamConsumer.from_dsn(dsn, args.channel, token, **common)


def _line(stats: dict[str, Any], rate: float) -> str:
    reasons = stats.get("lost_reasons") or {}
    why = f" ({', '.join(f'{k} {v}' for k, v in reasons.items())})" if reasons else ""
    link = "  DSN LINK DOWN (reconnecting)" if stats.get("link") == "down" else ""
    return (
        f"frames {stats['frames']}  {stats['bytes'] / 1e6:.1f} MB  {rate:.1f} Hz  "
        f"lost {stats['lost']}{why}  malformed {stats['malformed']}  "
        f"restarts {stats['restarts']}  "
        f"latency p50 {stats['latency_p50_ms']} ms p99 {stats['latency_p99_ms']} ms{link}"
    )


def _consume(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        print("beamhub consume: --count must be at least 1", file=sys.stderr)
        return 2
    try:
        consumer = _open(args)
    except (ValueError, RuntimeError) as exc:  # ChannelLookupError, UrlNotFound included
        print(f"beamhub consume: {exc}", file=sys.stderr)
        return 2

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    face = "work" if args.work else "monitor"
    print(
        f"consuming {face} stream from {consumer.endpoint} as {consumer.consumer_id}",
        file=sys.stderr,
    )
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    next_line = time.monotonic() + 1.0
    last_frames = 0
    code = 0
    try:
        while args.count is None or consumer.frames < args.count:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                code = 1 if args.count is not None else 0
                break
            wait = min(1.0, deadline - now) if deadline is not None else 1.0
            consumer.receive(timeout=max(0.0, wait))
            if not args.json and time.monotonic() >= next_line:
                stats = consumer.stats()
                print(_line(stats, stats["frames"] - last_frames), flush=True)
                last_frames = stats["frames"]
                next_line += 1.0
    except KeyboardInterrupt:
        code = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        stats = consumer.stats()
        consumer.close()
    if args.json:
        stats["events"] = list(consumer.events)
        print(json.dumps(stats))
    else:
        print(_line(stats, 0.0).replace("  0.0 Hz", ""), flush=True)
    if code == 1:
        print(
            f"beamhub consume: only {stats['frames']} of {args.count} frames within {args.timeout} s",
            file=sys.stderr,
        )
    return code
