"""The one default for beamhub's state folder and the token service's folder inside it."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["state_dir", "token_dir"]


#: The state dir of a `beamhub up` run as root: a system service's place, which its service
#: accounts can enter (``/root`` cannot be).
SYSTEM_STATE = Path("/var/lib/beamhub")


def state_dir() -> Path:
    """Where keys, databases and logs live: ``$BEAMHUB_HOME``, else ``/var/lib/beamhub`` for
    root and ``~/.beamhub`` for anyone else."""
    if os.environ.get("BEAMHUB_HOME"):
        return Path(os.environ["BEAMHUB_HOME"])
    return SYSTEM_STATE if os.geteuid() == 0 else Path.home() / ".beamhub"


def token_dir(state: str | os.PathLike | None = None) -> Path:
    """The token service's folder in the state dir: the signing key and the token register."""
    return Path(state if state is not None else state_dir()) / "tokens"
