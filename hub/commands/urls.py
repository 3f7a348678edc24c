"""`beamhub urls`: where the services of the running `beamhub up` answer, and the one lookup the
other commands use when a URL is not given (``--dsn`` of `consume` and `source`, the gateway in
scripts: ``G=$(beamhub urls gateway)api/v1``).

`beamhub up` picks free ports (kept in ``ports.json``) and writes every service's URL to
``runtime-urls.json`` in its state folder (``$BEAMHUB_HOME``) once it is running.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["UrlNotFound", "discover", "register", "runtime_urls"]

#: a spawned server finds its DSN in the environment (the notebooks use the same variable)
ENV = {"dsn": "BEAMHUB_DSN_URL"}


class UrlNotFound(RuntimeError):
    """No URL given and none found; the message says what to do."""


def runtime_urls(state: Path | None = None) -> dict[str, str]:
    """The URLs `beamhub up` wrote for ``state`` (default ``$BEAMHUB_HOME``); raises
    :class:`UrlNotFound` saying whether it is not running or still starting."""
    from beamhub.auth.home import state_dir
    from beamhub.hub.commands.status import read_status

    state = state or state_dir()
    path = state / "runtime-urls.json"
    try:
        running = read_status(state)["running"]
    except PermissionError:
        raise UrlNotFound(
            f"{state} is not readable by this account (a `beamhub up` run as root keeps it for "
            "root and its services); ask for the URL (`beamhub urls` as root prints them) and "
            "give it"
        ) from None
    if not running:
        raise UrlNotFound(
            f"`beamhub up` is not running for {state} (BEAMHUB_HOME): start it with "
            "`beamhub up`, point BEAMHUB_HOME at the state folder of the one that runs, "
            "or give the URL"
        )
    try:
        urls = json.loads(path.read_text())
    except FileNotFoundError:
        raise UrlNotFound(
            f"`beamhub up` for {state} is still starting (no {path.name} yet): wait for "
            "'beamhub up: running', or give the URL"
        ) from None
    except (OSError, ValueError) as exc:
        raise UrlNotFound(f"cannot read {path}: {exc}; give the URL") from exc
    if not isinstance(urls, dict):
        raise UrlNotFound(f"{path} is not a JSON object; give the URL")
    return {str(k): str(v) for k, v in urls.items()}


def discover(name: str, given: str | None = None, *, flag: str | None = None) -> str:
    """``given`` if set, else (for the DSN) ``$BEAMHUB_DSN_URL``, else the running
    `beamhub up`'s URL for ``name`` (``dsn``, ``gateway``, ``hub``, ``tokens``, ...)."""
    if given:
        return given
    if os.environ.get(ENV.get(name, "")):
        return os.environ[ENV[name]]
    flag = flag or f"--{name}"
    try:
        urls = runtime_urls()
    except UrlNotFound as exc:
        raise UrlNotFound(f"{flag}: not given, and {exc} ({flag} URL)") from None
    if name not in urls:
        raise UrlNotFound(
            f"{flag}: not given, and the running `beamhub up` has no {name} "
            f"(disabled in its beamhub.yaml?); it runs: {', '.join(sorted(urls))}"
        )
    return urls[name].rstrip("/") if name == "dsn" else urls[name]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "urls",
        help="the URLs of the running `beamhub up` (dsn, gateway, hub, tokens, ...)",
        description="Prints NAME URL lines, or with NAME only that URL (for scripts). Exit 3 "
        "when `beamhub up` is not running for $BEAMHUB_HOME, 1 when it has no such service.",
    )
    parser.add_argument("name", nargs="?", help="one service: dsn, gateway, hub, tokens, ...")
    parser.add_argument("--json", action="store_true", help="print every URL as JSON")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        urls = runtime_urls()
    except UrlNotFound as exc:
        print(f"beamhub urls: {exc}", file=sys.stderr)
        return 3
    if args.name:
        if args.name not in urls:
            print(
                f"beamhub urls: no {args.name!r}; known: {', '.join(sorted(urls))}",
                file=sys.stderr,
            )
            return 1
        print(urls[args.name])
    elif args.json:
        print(json.dumps(urls, indent=2))
    else:
        for name, url in urls.items():
            print(f"{name:18} {url}")
    return 0
