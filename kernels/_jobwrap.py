"""Runs one local job and records its exit code, so a restarted scheduler can still learn it.

Usage (by kernels.local only): python -I _jobwrap.py EXIT_FILE -- ARGV...
The wrapper is the leader of the job's process group: the scheduler's SIGTERM/SIGKILL reach it
and the job together; the wrapper outlives a SIGTERM just long enough to write the job's code.
Standard library only and no package imports: it starts in a few milliseconds.
"""

import os
import signal
import subprocess
import sys

__all__ = ["main"]


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: _jobwrap.py EXIT_FILE -- ARGV...", file=sys.stderr)
        return 2
    exit_file, command = argv[0], argv[2:]
    # a handler (not SIG_IGN, which the child would inherit): the group's SIGTERM is for the job
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        print(f"beamhub: cannot start {command[0]!r}: {exc}", file=sys.stderr, flush=True)
        code = 127
    else:
        code = child.wait()
    tmp = f"{exit_file}.tmp"
    with open(tmp, "w") as f:
        f.write(str(code))
    os.replace(tmp, exit_file)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
