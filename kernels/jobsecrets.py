"""Starts a SLURM job's command with the secrets its environment must not carry through slurmctld.

SLURM keeps a job's batch script and environment in slurmctld's state (``scontrol show job``,
``StateSaveLocation``), so the backend leaves tokens out of both: it writes them to a 0600 file
in the user's private folder just before ``sbatch`` and the script runs
``python -m beamhub.kernels.jobsecrets -- COMMAND...``, which reads the file, deletes it (unless
the job may be requeued and start again), puts the values into the environment and execs.

Standard library only: it runs before anything of the job.
"""

from __future__ import annotations

import json
import os
import sys

__all__ = ["ENV_FILE", "ENV_KEEP", "main"]

#: the environment variable naming the secrets file (a path, not a secret)
ENV_FILE = "BEAMHUB_SECRETS_FILE"
#: "1": keep the file for a requeued start of the same job
ENV_KEEP = "BEAMHUB_SECRETS_KEEP"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "--":
        print("usage: python -m beamhub.kernels.jobsecrets -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    command = argv[1:]
    path = os.environ.pop(ENV_FILE, "")
    keep = os.environ.pop(ENV_KEEP, "") == "1"
    if path:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, encoding="utf-8") as fh:
                secrets = json.load(fh)
            if not keep:
                os.unlink(path)
        except (OSError, ValueError) as exc:
            print(f"beamhub: cannot read this job's secrets ({exc})", file=sys.stderr, flush=True)
            return 125
        os.environ.update({str(k): str(v) for k, v in secrets.items()})
    try:
        os.execvp(command[0], command)  # noqa: S606 -- the job itself, same pid
    except OSError as exc:
        print(f"beamhub: cannot start {command[0]!r}: {exc}", file=sys.stderr, flush=True)
        return 127
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
