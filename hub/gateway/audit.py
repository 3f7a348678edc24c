"""Append-only, hash-chained JSON Lines audit log of every gateway decision; tampering shows.

Each record carries ``prev`` (the previous record's hash; 64 zeros for the first) and ``hash``
(sha256 over the record's canonical JSON without ``hash``: sorted keys, compact separators,
ASCII). Changing, removing, inserting or reordering a record breaks the chain at that line.
The log names the token's ``jti``, never the token.

Durability (``fsync``): ``"always"`` fsyncs each record before the request is answered
(moderate/leadership enclaves); ``"interval"`` (default) writes each record to the kernel at once
— it survives a crash of the gateway process — and fsyncs at most every ``fsync_interval``
seconds, so a power loss can lose that last interval; ``"never"`` leaves it to the OS.
Writers in one process are serialised by a lock; one log file per gateway process.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "GENESIS",
    "RECORD_FIELDS",
    "AuditError",
    "AuditLog",
    "VerifyResult",
    "record_hash",
    "verify_log",
]

GENESIS = "0" * 64
#: What a record holds besides seq/prev/hash; jti only, never the token.
RECORD_FIELDS = (
    "time",
    "user",
    "project",
    "jti",
    "action",
    "resource",
    "rule",
    "source",
    "outcome",
    "status",
    "reason",
)
FSYNC_POLICIES = ("always", "interval", "never")


class AuditError(Exception):
    """The audit log cannot be opened or continued (e.g. its last record is damaged)."""


def _canonical(record: dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(record: dict[str, Any]) -> str:
    """sha256 hex over the record's canonical form (all fields but ``hash``)."""
    return hashlib.sha256(_canonical(record)).hexdigest()


class AuditLog:
    """Appends decisions to ``path``, continuing the chain of an existing file."""

    def __init__(
        self, path: str | os.PathLike, fsync: str = "interval", fsync_interval: float = 1.0
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"audit fsync policy {fsync!r}: use one of {FSYNC_POLICIES}")
        self.path = Path(path)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._prev, self._seq = self._tail()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._last_sync = time.monotonic()

    def _tail(self) -> tuple[str, int]:
        """The last record's hash and seq, so a restarted gateway continues the chain."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return GENESIS, 0
        with open(self.path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            lines = f.read().splitlines()
        try:
            last = json.loads(lines[-1])
            if last.get("hash") != record_hash(last):
                raise ValueError("hash mismatch")
            return last["hash"], int(last["seq"])
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise AuditError(
                f"{self.path}: the last record is damaged ({exc}); run `beamhub audit verify "
                f"{self.path}` and move the file aside before starting a new log"
            ) from exc

    def append(self, **fields: Any) -> dict[str, Any]:
        """Write one decision record and return it (with seq, prev and hash)."""
        unknown = set(fields) - set(RECORD_FIELDS)
        if unknown:
            raise ValueError(f"audit record: unknown field(s) {sorted(unknown)}")
        record: dict[str, Any] = {k: fields.get(k) for k in RECORD_FIELDS}
        if record["time"] is None:
            record["time"] = datetime.now(UTC).isoformat(timespec="microseconds")
        with self._lock:
            record["seq"] = self._seq + 1
            record["prev"] = self._prev
            canonical = _canonical(record)
            record["hash"] = hashlib.sha256(canonical).hexdigest()
            # the canonical form plus the hash as the last key: one serialisation per record
            data = canonical[:-1] + b',"hash":"' + record["hash"].encode() + b'"}\n'
            written = os.write(self._fd, data)
            if written != len(data):  # a full disk; never leave half a chain link unnoticed
                raise AuditError(f"{self.path}: short write ({written}/{len(data)} bytes)")
            self._seq += 1
            self._prev = record["hash"]
            now = time.monotonic()
            if self.fsync == "always" or (
                self.fsync == "interval" and now - self._last_sync >= self.fsync_interval
            ):
                os.fsync(self._fd)
                self._last_sync = now
        return record

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                if self.fsync != "never":
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class VerifyResult:
    """``ok``, how many records were checked, and the first broken line (1-based) and why."""

    ok: bool
    records: int
    line: int | None = None
    reason: str = ""


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        yield from enumerate(f, start=1)


def verify_log(path: str | os.PathLike) -> VerifyResult:
    """Walk the chain from the first record; stop at the first record that does not fit."""
    path = Path(path)
    prev, count = GENESIS, 0
    for number, raw in _lines(path):
        if not raw.endswith(b"\n"):
            return VerifyResult(False, count, number, "the last record is truncated (no newline)")
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            return VerifyResult(False, count, number, f"not valid JSON: {exc}")
        if not isinstance(record, dict):
            return VerifyResult(False, count, number, "not a JSON object")
        if record.get("prev") != prev:
            return VerifyResult(
                False,
                count,
                number,
                "'prev' does not match the previous record's hash "
                "(a record was changed, removed, inserted or reordered before this line)",
            )
        if record.get("seq") != count + 1:
            return VerifyResult(
                False, count, number, f"'seq' is {record.get('seq')!r}, expected {count + 1}"
            )
        if record.get("hash") != record_hash(record):
            return VerifyResult(
                False, count, number, "the record's content does not match its hash"
            )
        prev = record["hash"]
        count += 1
    return VerifyResult(True, count)
