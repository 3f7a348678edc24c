"""The DSN's durable state: channels, client public keys, its CURVE keypair; one SQLite file (0600).

A restarted DSN reads back every channel it had (spec, owner, project, endpoints of every face,
keys, lifetime, ``source_control``) and provisions it again on the same ports, so producers and
consumers that kept their sockets reconnect by themselves. The file also holds the data plane's
CURVE secret key (clients of encrypted channels know its public half), hence 0600, in a 0700
folder. One DSN at a time owns a store: :class:`ChannelStore` takes an exclusive ``flock`` on a
lock file next to it (released by the kernel even after ``kill -9``).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

__all__ = ["ChannelStore", "StoreError", "StoredChannel"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    owner TEXT NOT NULL,
    jti TEXT NOT NULL,
    params TEXT NOT NULL,
    endpoints TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS credentials (
    channel TEXT NOT NULL,
    face TEXT NOT NULL,
    public_key TEXT NOT NULL,
    consumer_id TEXT,
    owner TEXT NOT NULL,
    jti TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (channel, public_key)
);
"""

#: What one row holds: the arguments of ``controlplane.Channel`` in plain JSON types.
StoredChannel = dict[str, Any]


class StoreError(RuntimeError):
    """The store cannot be opened (unreadable, not a database, or owned by another DSN)."""


class ChannelStore:
    """Channels by id, and small named values (the data plane's keypair); every write commits."""

    FILENAME = "channels.sqlite"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / self.FILENAME
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"{self.folder}: cannot use the DSN state folder ({exc})") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreError(
                f"{self.folder}: another DSN is running on this state folder; stop it first "
                "(two DSNs would fight over the channels' ports)"
            ) from None
        try:
            # Create the file 0600 before SQLite does (its journal files copy the mode).
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            self._unlock()
            raise StoreError(f"{self.path}: cannot open the DSN's channel store ({exc})") from exc

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def close(self) -> None:
        if getattr(self, "_db", None) is not None:
            self._db.close()
            self._db = None
        self._unlock()

    # ---- channels ----------------------------------------------------------------------------

    def put(self, channel: StoredChannel) -> None:
        """Insert or replace one channel (on create, renew, and change of source_control)."""
        self._db.execute(
            "INSERT OR REPLACE INTO channels VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                channel["id"],
                channel["project"],
                channel["owner"],
                channel["jti"],
                json.dumps(channel["params"]),
                json.dumps(channel["endpoints"]),
                channel["created_at"],
                channel["expires_at"],
            ),
        )

    def delete(self, channel_id: str) -> None:
        self._db.execute("DELETE FROM channels WHERE id = ?", (channel_id,))
        self._db.execute("DELETE FROM credentials WHERE channel = ?", (channel_id,))

    # ---- client credentials (CURVE public keys registered per channel) -------------------------

    def put_credential(self, channel_id: str, cred: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO credentials VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                channel_id,
                cred["face"],
                cred["public_key"],
                cred.get("consumer_id"),
                cred["owner"],
                cred["jti"],
                cred["created_at"],
            ),
        )

    def credentials(self, channel_id: str) -> list[dict[str, Any]]:
        """The public keys registered on a channel, oldest first (no secret is ever stored)."""
        rows = self._db.execute(
            "SELECT face, public_key, consumer_id, owner, jti, created_at FROM credentials "
            "WHERE channel = ? ORDER BY created_at",
            (channel_id,),
        ).fetchall()
        keys = ("face", "public_key", "consumer_id", "owner", "jti", "created_at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def channels(self) -> list[StoredChannel]:
        """Every stored channel, oldest first."""
        rows = self._db.execute(
            "SELECT id, project, owner, jti, params, endpoints, created_at, expires_at "
            "FROM channels ORDER BY created_at"
        ).fetchall()
        keys = ("id", "project", "owner", "jti", "params", "endpoints", "created_at", "expires_at")
        out = []
        for row in rows:
            item = dict(zip(keys, row, strict=True))
            item["params"] = json.loads(item["params"])
            item["endpoints"] = json.loads(item["endpoints"])
            out.append(item)
        return out

    # ---- small named values --------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def __repr__(self) -> str:
        return f"ChannelStore({str(self.path)!r})"
