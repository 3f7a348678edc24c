"""One `beamhub up` per state folder: an flock'd pid file that dies with its process."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["AlreadyRunning", "UpLock"]


class AlreadyRunning(RuntimeError):
    """Another live `beamhub up` holds the lock; the message says which and how to stop it."""


class UpLock:
    """Held (flock) for the life of the process, so a crashed run never blocks the next one."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = self.read_info(fd)
            os.close(fd)
            pid = info.get("pid", "?")
            hub = info.get("urls", {}).get("hub", "")
            where = f", JupyterHub at {hub}" if hub else ""
            raise AlreadyRunning(
                f"another `beamhub up` is already running for {self.path.parent} (pid {pid}{where}). "
                f"Stop it first (Ctrl-C in its terminal, or `kill {pid}`), or use another state_dir."
            ) from None
        self._fd = fd
        self.write_info({})

    @staticmethod
    def read_info(fd: int) -> dict[str, Any]:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            return json.loads(os.read(fd, 65536) or b"{}")
        except (OSError, ValueError):
            return {}

    def write_info(self, urls: dict[str, str]) -> None:
        if self._fd is None:
            return
        data = json.dumps({"pid": os.getpid(), "urls": urls}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def held_by_another(self) -> bool:
        """True if a live `beamhub up` holds this lock now (checked without taking it)."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
