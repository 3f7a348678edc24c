"""`beamhub source`: run a simulated detector or a file replay that streams frames to a DSN."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DsnChannel",
    "RunningSource",
    "register",
    "start_replay_source",
    "start_simulated_source",
]


@dataclass(frozen=True)
class DsnChannel:
    """Where a source sends through the DSN: its control API, the channel (name or id), a token
    whose holder may write to the channel (its owner, an operator or the PI)."""

    url: str
    channel: str
    token: str = field(repr=False)


@dataclass
class RunningSource:
    """A source streaming in this process: its runner, generator and control endpoint."""

    runner: Any
    generator: Any
    control: Any = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def control_url(self) -> str | None:
        return self.control.url if self.control is not None else None

    @property
    def endpoint(self) -> str | None:
        return self.runner.endpoint

    def stop(self) -> None:
        """Stop the control endpoint, then the sender; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.control is not None:
            self.control.stop()
        self.runner.stop()
        close = getattr(self.generator, "close", None)
        if close is not None:
            close()


def _start(
    generator: Any,
    *,
    stream: str,
    connect: str | None,
    bind: str | None,
    control_port: int | None,
    run: bool,
    verifier: Any = None,
    project: str | None = None,
    curve: Any = None,
    sndhwm: int = 16,
    checksum: bool = True,
    dsn: DsnChannel | None = None,
) -> RunningSource:
    from beamhub.streaming.source import SourceRunner
    from beamhub.streaming.source_control import start_control_thread

    if dsn is not None:
        runner = SourceRunner.from_dsn(
            generator,
            dsn.url,
            dsn.channel,
            dsn.token,
            stream=stream or None,
            sndhwm=sndhwm,
            checksum=checksum,
        ).start()
    else:
        runner = SourceRunner(
            generator,
            stream=stream,
            connect=connect,
            bind=bind,
            curve=curve,
            sndhwm=sndhwm,
            checksum=checksum,
        ).start()
    running = RunningSource(runner=runner, generator=generator)
    try:
        if control_port is not None:
            running.control = start_control_thread(
                runner, port=control_port, verifier=verifier, project=project
            )
        if run:
            runner.start_run()
    except BaseException:
        running.stop()
        raise
    return running


def start_simulated_source(
    connect: str | None = None,
    stream: str = "sim",
    control_port: int | None = 0,
    *,
    bind: str | None = None,
    shape: tuple[int, int] = (1024, 1024),
    run: bool = True,
    seed: int | None = None,
    verifier: Any = None,
    project: str | None = None,
    curve: Any = None,
    sndhwm: int = 16,
    checksum: bool = True,
    dsn: DsnChannel | None = None,
    **params: Any,
) -> RunningSource:
    """Start a simulated detector in this process (``control_port=None``: no control endpoint).

    ``params`` are initial steerable values (``rate_hz``, ``hit_fraction``, ...); a bad one raises
    :class:`beamhub.streaming.params.ParamError` naming it.
    """
    from beamhub.streaming.simulator import SimulatedDetector

    generator = SimulatedDetector(shape, seed=seed, **params)
    return _start(
        generator,
        stream=stream,
        connect=connect,
        bind=bind,
        control_port=control_port,
        run=run,
        verifier=verifier,
        project=project,
        curve=curve,
        sndhwm=sndhwm,
        checksum=checksum,
        dsn=dsn,
    )


def start_replay_source(
    path: str,
    connect: str | None = None,
    stream: str = "replay",
    control_port: int | None = 0,
    *,
    dataset: str | None = None,
    bind: str | None = None,
    run: bool = True,
    verifier: Any = None,
    project: str | None = None,
    curve: Any = None,
    sndhwm: int = 16,
    checksum: bool = True,
    dsn: DsnChannel | None = None,
    **params: Any,
) -> RunningSource:
    """Start a file replay in this process; ``params``: ``rate_hz``, ``loop``."""
    from beamhub.streaming.replay import ReplaySource

    generator = ReplaySource(path, dataset, **params)
    try:
        return _start(
            generator,
            stream=stream,
            connect=connect,
            bind=bind,
            control_port=control_port,
            run=run,
            verifier=verifier,
            project=project,
            curve=curve,
            sndhwm=sndhwm,
            checksum=checksum,
            dsn=dsn,
        )
    except BaseException:
        generator.close()
        raise


# -- the command line -------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("source", help="run a detector source (simulated or file replay)")
    ssub = parser.add_subparsers(dest="source_command", metavar="KIND", required=True)

    sim = ssub.add_parser("sim", help="simulated serial-crystallography detector")
    _common(sim, default_stream="sim", default_rate=120.0)
    sim.add_argument("--shape", default="1024x1024", help="frame shape HxW (default 1024x1024)")
    sim.add_argument("--hit-fraction", type=float, default=None, help="fraction of hit frames")
    sim.add_argument("--seed", type=int, default=None, help="random seed (reproducible frames)")
    sim.add_argument(
        "--event-bytes",
        type=int,
        default=None,
        help="small events of this many bytes instead of detector frames (--rate counts events; "
        "sent as batch messages of about 64 KiB), e.g. --event-bytes 1024 --rate 100000",
    )
    sim.add_argument(
        "--events-per-message",
        type=int,
        default=None,
        help="with --event-bytes: events per batch message (default: about 64 KiB of events)",
    )
    sim.set_defaults(func=_run_sim)

    replay = ssub.add_parser("replay", help="replay frames from an HDF5 or .npy file")
    replay.add_argument("file", help="a .npy stack (frames, y, x) or an HDF5 file")
    replay.add_argument("--dataset", default=None, help="HDF5 dataset path, e.g. /entry/data")
    replay.add_argument("--loop", action="store_true", help="start again after the last frame")
    _common(replay, default_stream="replay", default_rate=10.0)
    replay.set_defaults(func=_run_replay)


def _common(parser: argparse.ArgumentParser, default_stream: str, default_rate: float) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--channel",
        help="send into this DSN channel (stream name, e.g. detector, or id ch-...): registers "
        "a producer key with $BEAMHUB_TOKEN (the channel's owner, an operator or the PI)",
    )
    where.add_argument("--connect", help="connect to a DSN producer endpoint, tcp://HOST:PORT")
    where.add_argument("--bind", help="bind for direct consumers, e.g. tcp://127.0.0.1:5555")
    parser.add_argument(
        "--dsn",
        metavar="URL",
        help="with --channel: DSN control API (default: $BEAMHUB_DSN_URL, else the running "
        "`beamhub up`'s)",
    )
    parser.add_argument(
        "--token",
        help="with --channel: project token (default: $BEAMHUB_TOKEN, which ps does not show)",
    )
    parser.add_argument(
        "--stream",
        default=None,
        help=f"stream name in every header (default: the channel's, else {default_stream!r})",
    )
    parser.set_defaults(default_stream=default_stream)
    parser.add_argument("--rate", type=float, default=default_rate, help="frames per second")
    parser.add_argument(
        "--control-port",
        type=int,
        default=0,
        help="control endpoint port on 127.0.0.1 (0 = ephemeral)",
    )
    parser.add_argument(
        "--run", action="store_true", help="start a run at once (otherwise wait for POST /run)"
    )
    parser.add_argument("--sndhwm", type=int, default=16, help="frames queued before dropping")
    parser.add_argument(
        "--curve-server-key",
        default=None,
        help="Z85 public key (or zmq certificate file) of the DSN; enables CURVE",
    )
    parser.add_argument(
        "--curve-cert",
        default=None,
        help="own zmq secret certificate file (default: a fresh keypair)",
    )
    parser.add_argument(
        "--jwks",
        default=None,
        help="JWKS file or URL: writes to the control endpoint need a steer token",
    )
    parser.add_argument("--project", default=None, help="project whose steer tokens are accepted")
    parser.add_argument(
        "--no-checksum",
        dest="checksum",
        action="store_false",
        help="do not put crc32 of the payload in meta (saves ~1 ms per 4 MiB)",
    )
    parser.add_argument("--status-every", type=float, default=3.0, help="seconds between status")


def _curve_keys(args: argparse.Namespace) -> Any:
    if args.curve_server_key is None and args.curve_cert is None:
        return None
    import zmq.auth

    from beamhub.streaming.source import CurveKeys

    server = args.curve_server_key
    if server is not None and len(server) != 40:
        server = zmq.auth.load_certificate(server)[0]
    elif server is not None:
        server = server.encode()
    if args.curve_cert:
        public, secret = zmq.auth.load_certificate(args.curve_cert)
        if secret is None:
            raise ValueError(f"{args.curve_cert} holds no secret key; give the .key_secret file")
        keys = CurveKeys(public=public, secret=secret, server_public=server)
    else:
        keys = CurveKeys.generate(server_public=server)
    print(f"CURVE public key of this source: {keys.public.decode()}")
    return keys


def _verifier(args: argparse.Namespace) -> Any:
    if args.jwks is None and args.project is None:
        return None
    if args.jwks is None or args.project is None:
        raise ValueError("--jwks and --project go together (both protect the control endpoint)")
    from beamhub.auth.tokens import TokenVerifier, load_jwks

    return TokenVerifier(load_jwks(args.jwks))


def _target(args: argparse.Namespace) -> tuple[DsnChannel | None, str]:
    """The DSN channel to send into (with --channel) and the stream name to send."""
    if args.channel is None:
        if args.dsn or args.token:
            raise ValueError("--dsn and --token go with --channel (the DSN then says where)")
        return None, args.stream or args.default_stream
    if args.curve_server_key or args.curve_cert:
        raise ValueError("--curve-*: with --channel the DSN hands out the keys; leave them out")
    from beamhub.hub.commands.consume import project_token
    from beamhub.hub.commands.urls import discover

    dsn = DsnChannel(
        discover("dsn", args.dsn),
        args.channel,
        project_token(args.token, "source", "stream.publish"),
    )
    return dsn, args.stream or ""  # "": the channel's stream name


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--shape must look like 1024x1024, got {text!r}") from None
    return h, w


def _shared_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The options every kind of source shares, as keyword arguments of the start functions."""
    dsn, stream = _target(args)
    return {
        "stream": stream,
        "connect": args.connect,
        "bind": args.bind,
        "control_port": args.control_port,
        "run": args.run,
        "verifier": _verifier(args),
        "project": args.project,
        "curve": _curve_keys(args),
        "sndhwm": args.sndhwm,
        "checksum": args.checksum,
        "dsn": dsn,
    }


def _launch(kind: str, args: argparse.Namespace, start: Any) -> int:
    """Start a source with ``start()``, then serve it; a bad option is one line and exit 2."""
    try:
        source = start()
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"beamhub source {kind}: {exc}", file=sys.stderr)
        return 2
    return _serve(source, args)


def _start_events(args: argparse.Namespace) -> RunningSource:
    """``sim --event-bytes``: the small-event source (streaming/eventsim.py)."""
    from beamhub.streaming.eventsim import SmallEventSource

    if args.hit_fraction is not None or args.shape != "1024x1024":
        raise ValueError("--hit-fraction and --shape are for detector frames, not --event-bytes")
    common = _shared_kwargs(args)
    generator = SmallEventSource(
        args.event_bytes,
        events_per_message=args.events_per_message,
        seed=args.seed,
        rate_hz=args.rate,
    )
    return _start(generator, **common)


def _start_sim(args: argparse.Namespace) -> RunningSource:
    if args.event_bytes is not None:
        return _start_events(args)
    if args.events_per_message is not None:
        raise ValueError("--events-per-message goes with --event-bytes")
    params: dict[str, Any] = {"rate_hz": args.rate}
    if args.hit_fraction is not None:
        params["hit_fraction"] = args.hit_fraction
    common = _shared_kwargs(args)
    connect, stream, control_port = (common.pop(k) for k in ("connect", "stream", "control_port"))
    return start_simulated_source(
        connect,
        stream,
        control_port,
        shape=_parse_shape(args.shape),
        seed=args.seed,
        **common,
        **params,
    )


def _start_replay(args: argparse.Namespace) -> RunningSource:
    common = _shared_kwargs(args)
    connect, stream, control_port = (common.pop(k) for k in ("connect", "stream", "control_port"))
    return start_replay_source(
        args.file,
        connect,
        stream,
        control_port,
        dataset=args.dataset,
        rate_hz=args.rate,
        loop=args.loop,
        **common,
    )


def _run_sim(args: argparse.Namespace) -> int:
    return _launch("sim", args, lambda: _start_sim(args))


def _run_replay(args: argparse.Namespace) -> int:
    return _launch("replay", args, lambda: _start_replay(args))


def _serve(source: RunningSource, args: argparse.Namespace) -> int:
    """Print where it sends and listens, then a status line every few seconds until a signal."""
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        done.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    runner = source.runner
    mode = "bind" if args.bind else "connect"
    print(
        f"stream {runner.stream!r}: sending to {runner.endpoint} (PUSH, {mode}), "
        f"producer {runner.producer_id}"
    )
    print(
        f"control endpoint: {source.control_url}  (GET /schema, GET /params, "
        "PUT /params/NAME, POST /run)"
    )
    if not args.run:
        print(
            f'waiting for a run: curl -X POST -d \'{{"action": "start"}}\' {source.control_url}/run'
        )
    sys.stdout.flush()
    try:
        while not done.wait(args.status_every):
            status = runner.status()
            stats = status["stats"]
            state = (
                "running" if status["running"] else ("finished" if status["finished"] else "idle")
            )
            print(
                f"run {status['run']} {state} | sent {stats['frames_sent']} frames "
                f"({stats['bytes_sent'] / 1e9:.2f} GB) | {stats['rate_hz']:.1f} Hz | "
                f"dropped at source {stats['dropped_at_source']} | rev {status['rev']}",
                flush=True,
            )
    finally:
        print("stopping source ...", flush=True)
        source.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("source stopped", flush=True)
    return 0
