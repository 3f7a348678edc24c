"""The npm packages `beamhub up` runs, installed on first use into ``<state dir>/node/``.

JupyterHub's proxy (configurable-http-proxy) and the dev enclave's OpenID provider (oidc-provider)
are Node programs. Their pinned versions ship as package data (``hub/up/node/package.json`` and
``package-lock.json``, the repository's own files), so a wheel installed anywhere can install
them with ``npm ci``. There is one place they are looked for, in the checkout and in a wheel alike:
the state dir's ``node/node_modules``; it is reinstalled when the shipped lock file changes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "NODE_MAJOR",
    "PINS_DIR",
    "NpmError",
    "bin_path",
    "ensure_installed",
    "find_node",
    "node_dir",
]

#: package.json and package-lock.json: the pinned npm packages (symlinks to the repository's)
PINS_DIR = Path(__file__).with_name("node")
#: configurable-http-proxy 5 needs Node.js 20 or newer
NODE_MAJOR = 20
_PINS = ("package.json", "package-lock.json")
_HOW_TO_GET_NODE = (
    f"install Node.js {NODE_MAJOR} or newer with npm (Debian/Ubuntu: `sudo apt-get install nodejs "
    "npm`; or https://nodejs.org), or in the beamhub checkout run `./dev setup`"
)


class NpmError(RuntimeError):
    """Node.js or its packages are missing and could not be installed; the message says what to do."""


def node_dir(state: str | os.PathLike) -> Path:
    """The folder of the installed npm packages (``node_modules`` and a copy of the pins)."""
    return Path(state) / "node"


def bin_path(state: str | os.PathLike, name: str) -> Path:
    """An installed package's executable, e.g. ``bin_path(state, "configurable-http-proxy")``."""
    return node_dir(state) / "node_modules" / ".bin" / name


def _installed(target: Path) -> bool:
    lock = target / "package-lock.json"
    done = target / "node_modules" / ".package-lock.json"  # npm writes it last
    shipped = (PINS_DIR / "package-lock.json").read_bytes()
    return done.exists() and lock.exists() and lock.read_bytes() == shipped


def find_node() -> str:
    """The path of ``node`` (Node.js >= :data:`NODE_MAJOR`); :class:`NpmError` says what to do."""
    node = shutil.which("node")
    if node is None:
        raise NpmError(f"node (Node.js) not found on PATH; {_HOW_TO_GET_NODE}")
    out = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
    match = re.match(r"v(\d+)\.", out.stdout.strip())
    if match is None or int(match.group(1)) < NODE_MAJOR:
        raise NpmError(f"{node} is Node.js {out.stdout.strip() or '?'}; {_HOW_TO_GET_NODE}")
    return node


def ensure_installed(state: str | os.PathLike, progress: Callable[[str], None] = print) -> Path:
    """``<state>/node/node_modules``, installed with ``npm ci`` first if absent or outdated.

    The install goes to a temporary folder beside it and is renamed into place, so an interrupted
    install is never taken for a finished one. Raises :class:`NpmError` naming what to do.
    """
    target = node_dir(state)
    if _installed(target):
        return target / "node_modules"
    find_node()
    npm = shutil.which("npm")
    if npm is None:
        raise NpmError(f"npm not found on PATH; {_HOW_TO_GET_NODE}")
    target.parent.mkdir(parents=True, exist_ok=True)
    log = target.parent / "logs" / "npm.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    progress(
        "installing the dev identity provider's and JupyterHub proxy's npm packages into "
        f"{target}, about 10 s, once"
    )
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=".node-", dir=target.parent))
    try:
        for name in _PINS:
            shutil.copyfile(PINS_DIR / name, work / name)
        with open(log, "ab") as out:
            done = subprocess.run(
                [npm, "ci", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=work,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        if done.returncode != 0:
            raise NpmError(
                f"`npm ci` failed (status {done.returncode}) installing into {target}; see {log}. "
                "npm needs the registry (or its cache); check the network or npm's proxy settings"
            )
        if target.exists():
            shutil.rmtree(target)
        work.chmod(0o755)  # code, no secrets: the proxy's and the IdP's accounts run it
        work.rename(target)
        progress(f"npm packages installed in {time.monotonic() - t0:.1f} s")
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target / "node_modules"
