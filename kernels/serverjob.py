"""Runs inside a scheduler job: pick a port on the node, publish host:port, exec the server.

The spawner cannot know the port before the scheduler has placed the job (SLURM) and must never
wait for a report that will not come, so the job writes ``{"host", "port", "pid", "node"}``
atomically to a file the spawner watches *and* the spawner watches the job's state: a job that
dies before this file exists fails the spawn at once with its state and output tail.

Usage: ``python -m kernels.serverjob PORT_FILE -- COMMAND [ARGS...]``. ``JUPYTERHUB_SERVICE_URL``
is rewritten with the chosen host and port, so ``jupyterhub-singleuser`` binds exactly there.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from urllib.parse import urlsplit, urlunsplit

__all__ = ["choose_port", "main", "write_report"]


def choose_port(bind_ip: str) -> int:
    """A currently free TCP port on ``bind_ip`` (the kernel's choice, as ``bind(0)`` gives)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((bind_ip, 0))
        return int(sock.getsockname()[1])


def write_report(path: str, report: dict) -> None:
    """Write ``report`` as JSON to ``path`` atomically (readers never see half a file)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(report, fh)
    os.replace(tmp, path)


def _service_url(url: str, host: str, port: int) -> str:
    parts = urlsplit(url or "http://127.0.0.1:0/")
    return urlunsplit((parts.scheme or "http", f"{host}:{port}", parts.path or "/", "", ""))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m kernels.serverjob PORT_FILE -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    port_file, command = argv[0], argv[2:]
    if shutil.which(command[0]) is None:
        # die before reporting: the spawner fails the spawn with this line, it does not wait
        print(
            f"beamhub: cannot start {command[0]!r}: not found or not executable",
            file=sys.stderr,
            flush=True,
        )
        return 127
    bind_ip = os.environ.get("BEAMHUB_BIND_IP", "127.0.0.1")
    # the address the hub connects to: the bind address, or this node's name when bound to all
    host = bind_ip if bind_ip not in ("", "0.0.0.0") else socket.gethostname()
    port = choose_port(bind_ip)
    os.environ["JUPYTERHUB_SERVICE_URL"] = _service_url(
        os.environ.get("JUPYTERHUB_SERVICE_URL", ""), bind_ip or "0.0.0.0", port
    )
    node = os.environ.get("BEAMHUB_NODE") or os.environ.get("SLURMD_NODENAME") or host
    write_report(port_file, {"host": host, "port": port, "pid": os.getpid(), "node": node})
    print(f"beamhub: server for this job listens on {host}:{port} (node {node})", flush=True)
    try:
        os.execvp(command[0], command)  # noqa: S606 -- same pid and process group: signals reach the server
    except OSError as exc:
        print(f"beamhub: cannot start {command[0]!r}: {exc}", file=sys.stderr, flush=True)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
