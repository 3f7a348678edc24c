"""`beamhub up`: start the whole deployment on 127.0.0.1 from one beamhub.yaml; stop it on Ctrl-C."""

from __future__ import annotations

import argparse
import os
import signal
import sys

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "up",
        help="start the identity provider, JupyterHub, token service, gateway, DSN and detector",
        description="Reads beamhub.yaml (default: the embedded dev defaults), starts everything on "
        "127.0.0.1, prints the URLs and dev logins, and stops it all on Ctrl-C/SIGTERM.",
    )
    parser.add_argument("config", nargs="?", default=None, help="deployment file (beamhub.yaml)")
    parser.set_defaults(func=_run)


#: Signals received before the event loop took over (Ctrl-C during the imports): honoured then.
_early: list[str] = []


def _hold_signals() -> None:
    """From the first line on, a stop signal is remembered, never a traceback or a kill."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda n, _f: _early.append(signal.Signals(n).name))


def _run(args: argparse.Namespace) -> int:
    _hold_signals()
    import asyncio
    import logging
    from pathlib import Path

    from beamhub.auth.home import state_dir
    from beamhub.hub.up.deployment import DeploymentError, load_deployment, tenancy_refusal
    from beamhub.hub.up.lock import AlreadyRunning, UpLock

    try:
        dep = load_deployment(args.config)
    except DeploymentError as exc:
        print(f"beamhub up: {exc}", file=sys.stderr)
        return 2
    refusal = tenancy_refusal(dep)
    if refusal:
        print(f"beamhub up: {refusal}", file=sys.stderr)
        return 2
    state = Path(dep.state_dir).expanduser() if dep.state_dir else state_dir()
    if not dep.state_dir and not os.environ.get("BEAMHUB_HOME"):
        try:
            _adopt_old_state(state)
        except (AlreadyRunning, OSError) as exc:
            print(f"beamhub up: {exc}", file=sys.stderr)
            return 1
    state.mkdir(mode=0o700, parents=True, exist_ok=True)  # keys, secrets, databases: owner only
    os.environ["BEAMHUB_HOME"] = str(state)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    lock = UpLock(state / "beamhub-up.lock")
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        print(f"beamhub up: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_serve(dep, state, lock))
    finally:
        # everything is stopped: a late Ctrl-C/SIGTERM/SIGHUP must not turn exit 0 into a kill
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        lock.release()


def _adopt_old_state(state) -> None:
    """Root's state dir moved from ~/.beamhub to /var/lib/beamhub (its service accounts cannot
    enter /root): move an earlier one there once, so logins, keys and channels carry over."""
    import shutil
    from pathlib import Path

    from beamhub.auth.home import SYSTEM_STATE
    from beamhub.hub.up.lock import UpLock

    old = Path.home() / ".beamhub"
    if state != SYSTEM_STATE or state.exists() or not old.is_dir() or os.geteuid() != 0:
        return
    lock = UpLock(old / "beamhub-up.lock")
    lock.acquire()  # AlreadyRunning: a `beamhub up` still uses it; stop that one first
    lock.release()
    state.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(old), state)
    print(f"beamhub up: moved the state dir {old} to {state} (root's state lives there now)")


class _Output:
    """Progress to stdout; a closed pipe (``| head -1``, a Ctrl-C'd ``tee``) asks for a stop.

    After the pipe breaks, lines go to the log file only, so stopping never fails on a write.
    """

    def __init__(self) -> None:
        self.broken = False
        self.on_broken = lambda: None
        self.log = None

    def __call__(self, line: str) -> None:
        if self.log is not None:
            self.log.write(line + "\n")
            self.log.flush()
        if self.broken:
            return
        try:
            print(line, flush=True)
        except (BrokenPipeError, ValueError):
            self.broken = True
            # stdout is gone: point fd 1 at /dev/null so the interpreter's exit flush is quiet
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            self.on_broken()


_say = _Output()


async def _serve(dep, state, lock) -> int:
    import asyncio
    import signal

    from beamhub.hub.up.stack import Stack, StackError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    why = {"stop": "stop requested"}

    def request_stop(reason: str) -> None:
        why["stop"] = reason
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, request_stop, f"{signal.Signals(sig).name} received")
    if _early:
        request_stop(f"{_early[0]} received")
    (state / "logs").mkdir(parents=True, exist_ok=True)
    _say.log = open(state / "logs" / "up.log", "a")  # kept open until the process exits
    _say.on_broken = lambda: loop.call_soon_threadsafe(request_stop, "output pipe closed")
    _say(f"beamhub up: {dep.enclave} enclave from {dep.source}; state in {state}")
    if dep.identity.provider == "embedded" and not dep.rules.embedded_identity_allowed:
        _say(
            f"beamhub up: WARNING: the embedded dev identity provider stands in for the facility's; "
            f"the {dep.enclave} enclave does not allow it in production (see `beamhub check`)"
        )
    stack = Stack(dep, state, progress=_say)
    starting = asyncio.create_task(stack.start())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if starting in done and starting.exception() is None:
        lock.write_info(stack.urls)
        _print_ready(dep, stack)
        await stack.watch(stop)
        _say(f"beamhub up: {why['stop']}; stopping everything ...")
    elif starting in done:
        exc = starting.exception()
        msg = str(exc) if isinstance(exc, StackError) else f"{type(exc).__name__}: {exc}"
        print(f"beamhub up: failed to start: {msg}", file=sys.stderr)
        status = 1
    else:
        _say(f"beamhub up: {why['stop']} while starting; stopping what started ...")
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        status = 130
    stopper.cancel()
    # a second Ctrl-C while stopping must not interrupt the stop: it would orphan children
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, lambda: None)
    await stack.stop()
    servers = stack.user_servers()
    if servers:
        _say(
            f"beamhub up: {servers} user server(s) keep running; the next `beamhub up` on this "
            "state dir re-attaches them (stop them from the hub's admin page)"
        )
    _say("beamhub up: stopped")
    return status


def _print_ready(dep, stack) -> None:
    u = stack.urls
    _say("")
    _say(f"  JupyterHub      {u['hub']}   <- open this and log in")
    _say(f"  token service   {u['tokens']}   (mint tokens for a DAQ or a script)")
    _say(f"  JWKS            {u['tokens']}jwks.json")
    if "gateway" in u:
        _say(f"  API gateway     {u['gateway']}")
    if "dashboard" in u:
        _say(f"  dashboard       {u['dashboard']}   (live figures for every project member)")
    if "dsn" in u:
        _say(f"  DSN control API {u['dsn']}/api/channels")
    if "detector_channel" in u:
        _say(f"  detector        channel {u['detector_channel']} (project {dep.detector.project})")
    _say(f"  identity        {u['idp']}")
    if dep.identity.provider == "embedded" and dep.identity.users:
        _say("")
        _say("  dev logins (user / password: roles; TOTP = enrolled in a one-time-code factor):")
        for user in dep.identity.users:
            roles = ", ".join(f"{r} of {p}" for p, r in user.projects.items()) or "no project"
            mfa = "TOTP" if "otp" in user.amr else "password only"
            _say(f"    {user.username:8} / {user.password:12}  {roles}; {mfa}")
    if dep.mfa_required:
        _say(
            f"  the {dep.enclave} enclave requires MFA: TOTP users enter a one-time code after the "
            "password (`beamhub totp USER` prints the current one); password-only users are refused"
        )
    if stack.new_totp:
        from beamhub.hub.up import totp

        secrets = totp.load_secrets(stack.state)
        _say("  new TOTP enrolments, shown once (add them to an authenticator app; kept 0600 in")
        _say(f"  {stack.state / totp.FILE}):")
        for name in stack.new_totp:
            _say(f"    {name:8} {totp.otpauth_uri(name, secrets[name])}")
    for note in stack.notes:
        _say(f"  note: {note}")
    _say("")
    _say("beamhub up: running; Ctrl-C stops everything")
