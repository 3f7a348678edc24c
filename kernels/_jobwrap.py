"""Runs one local job and records its exit code, so a restarted scheduler can still learn it.

Usage (by kernels.local only):
``python -I _jobwrap.py EXIT_FILE [--cgroup PROCS_FILE]... [--shield] -- ARGV...``
The wrapper is the leader of the job's process group: the scheduler's SIGTERM/SIGKILL reach it
and the job together; the wrapper outlives a SIGTERM just long enough to write the job's code.
``--cgroup``: join these cgroups (a virtual node's memory/CPU limits) before starting the job,
so every process of the job is inside from its first instruction. ``--shield``: start ARGV
with SIGTERM ignored (a sandbox launcher that must outlive the group's SIGTERM; the job inside
restores it, see kernels/sandbox.py).
Standard library only and no package imports: it starts in a few milliseconds.
"""

import os
import signal
import subprocess
import sys

__all__ = ["main"]


def _parse(argv: list[str]) -> tuple[str, list[str], bool, list[str]] | None:
    if len(argv) < 3:
        return None
    exit_file, rest, cgroups, shield = argv[0], argv[1:], [], False
    while rest and rest[0] != "--":
        if rest[0] == "--cgroup" and len(rest) > 1:
            cgroups.append(rest[1])
            rest = rest[2:]
        elif rest[0] == "--shield":
            shield, rest = True, rest[1:]
        else:
            return None
    if len(rest) < 2:
        return None
    return exit_file, cgroups, shield, rest[1:]


def main(argv: list[str]) -> int:
    parsed = _parse(argv)
    if parsed is None:
        print("usage: _jobwrap.py EXIT_FILE [--cgroup F]... [--shield] -- ARGV...", file=sys.stderr)
        return 2
    exit_file, cgroups, shield, command = parsed
    for procs in cgroups:
        try:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        except OSError as exc:  # the job still runs; the limit is not enforced for it
            print(f"beamhub: cannot join cgroup {procs}: {exc}", file=sys.stderr, flush=True)
    # a handler (not SIG_IGN, which the child would inherit): the group's SIGTERM is for the
    # job; with --shield the child inherits SIG_IGN and the handler comes after the start
    signal.signal(signal.SIGTERM, signal.SIG_IGN if shield else (lambda *_: None))
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        print(f"beamhub: cannot start {command[0]!r}: {exc}", file=sys.stderr, flush=True)
        code = 127
    else:
        signal.signal(signal.SIGTERM, lambda *_: None)
        code = child.wait()
    tmp = f"{exit_file}.tmp"
    with open(tmp, "w") as f:
        f.write(str(code))
    os.replace(tmp, exit_file)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
