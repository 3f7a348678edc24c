"""One short SQLite transaction per call: how the scheduler's books share their files safely.

The reservation book, maintenance calendar, incident log and local job store are read and
written by several processes (the hub, the gateway, the CLI); a connection per call with a busy
timeout and a commit at the end is simple and safe across them.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

__all__ = ["open_book", "transaction"]


@contextmanager
def transaction(path: str | Path) -> Iterator[sqlite3.Connection]:
    """A connection to ``path`` with rows by name, committed on success, rolled back on error."""
    with closing(sqlite3.connect(path, timeout=10)) as conn:
        conn.row_factory = sqlite3.Row
        with conn:
            yield conn


def open_book(path: str | Path, schema: str, *, private: bool = False) -> Path:
    """Create ``path``'s folder and tables where missing; ``private``: the file is owner-only
    (job specs keep their environment, which holds servers' API tokens)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    with transaction(path) as conn:
        conn.executescript(schema)
    return path
