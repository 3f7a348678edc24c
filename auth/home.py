"""The one default for beamhub's state folder: ``$BEAMHUB_HOME``, else ``~/.beamhub``."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["state_dir"]


def state_dir() -> Path:
    """Where keys, databases and logs live: ``$BEAMHUB_HOME`` or ``~/.beamhub``."""
    return Path(os.environ.get("BEAMHUB_HOME") or Path.home() / ".beamhub")
