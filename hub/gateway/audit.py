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

A crash can tear the last record: a partial line without its newline, or a line that does not
parse. Opening the log detects that tail (at most :data:`MAX_TORN_LINES` lines after the last
record that parses), keeps it as evidence in ``<log>.torn`` (one JSON line per repair: when, the
byte offset, the bytes in base64, the record it followed), fsyncs that, only then cuts it off the
log, logs a WARNING, and continues the chain from the last good record. ``verify_log`` counts the
set-aside tails and checks that each fits the chain where it was cut. A last record that parses
but does not match its hash is not a torn write: the log refuses to continue (:class:`AuditError`).

The chain alone cannot show that its last records were dropped, or that a record was rewritten
and the chain recomputed after it. So the gateway has the chain's head (record count + hash)
signed by the token service every few seconds and kept there (:mod:`beamhub.hub.gateway.anchor`);
``verify_log(path, checkpoints)`` checks the log against them and says from which record the log
can no longer be trusted.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
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
    "MAX_TORN_LINES",
    "OPTIONAL_FIELDS",
    "RECORD_FIELDS",
    "AuditError",
    "AuditLog",
    "Checkpoint",
    "VerifyResult",
    "record_hash",
    "torn_path",
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
#: Fields a record holds only when given: ``count`` of an aggregated record (e.g. failed
#: authentications of one address in one interval).
OPTIONAL_FIELDS = ("count",)
FSYNC_POLICIES = ("always", "interval", "never")
#: A torn tail is a crash's last write: at most this many lines after the last record that parses
#: (more is damage of another kind, left for a person to look at).
MAX_TORN_LINES = 2
_READ_BLOCK = 1 << 16


class AuditError(Exception):
    """The audit log cannot be opened or continued (e.g. its last record is damaged)."""


def _canonical(record: dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(record: dict[str, Any]) -> str:
    """sha256 hex over the record's canonical form (all fields but ``hash``)."""
    return hashlib.sha256(_canonical(record)).hexdigest()


def torn_path(path: str | os.PathLike) -> Path:
    """Where torn tails cut off ``path`` are kept: ``<path>.torn``."""
    path = Path(path)
    return path.with_name(path.name + ".torn")


def _torn_entries(path: Path) -> list[dict[str, Any]]:
    """The evidence entries kept beside the log ``path`` (none if there is no file)."""
    try:
        raw = torn_path(path).read_bytes()
    except FileNotFoundError:
        return []
    entries = []
    for line in raw.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        entries.append(entry if isinstance(entry, dict) else {"unreadable": True})
    return entries


def _record(line: bytes) -> dict[str, Any] | None:
    """The record on a complete line (ending in a newline), or None if it does not parse."""
    if not line.endswith(b"\n"):
        return None
    try:
        record = json.loads(line)
    except ValueError:  # UnicodeDecodeError is a ValueError
        return None
    return record if isinstance(record, dict) else None


def _lines_backwards(f: Any, size: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) from the end of the file backwards; the last line may lack its newline."""
    pos, tail = size, b""
    while tail or pos > 0:
        cut = tail.rfind(b"\n", 0, max(len(tail) - 1, 0))
        if cut < 0 and pos > 0:  # the line starts further back: read another block
            step = min(_READ_BLOCK, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
            continue
        yield pos + cut + 1, tail[cut + 1 :]
        tail = tail[: cut + 1]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AuditLog:
    """Appends decisions to ``path``, continuing the chain of an existing file."""

    def __init__(
        self,
        path: str | os.PathLike,
        fsync: str = "interval",
        fsync_interval: float = 1.0,
        log: logging.Logger | None = None,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"audit fsync policy {fsync!r}: use one of {FSYNC_POLICIES}")
        self.path = Path(path)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.log = log or logging.getLogger("beamhub.gateway.audit")
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._prev, self._seq = self._tail()
        #: how many torn tails have been set aside in ``<log>.torn`` (by any opening of the log)
        self.torn_tails = len(_torn_entries(self.path))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._last_sync = time.monotonic()

    def _tail(self) -> tuple[str, int]:
        """The last good record's hash and seq, so a restarted gateway continues the chain;
        a torn tail after it is set aside first."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return GENESIS, 0
        torn: list[int] = []  # offsets of the torn lines, last first
        last: dict[str, Any] | None = None
        with open(self.path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            for offset, line in _lines_backwards(f, size):
                last = _record(line)
                if last is not None:
                    break
                torn.append(offset)
                if len(torn) > MAX_TORN_LINES:
                    raise AuditError(
                        f"{self.path}: more than {MAX_TORN_LINES} lines at its end do not parse "
                        f"(from byte {offset}); that is not a torn last write. Run `beamhub "
                        f"audit verify {self.path}`, keep the file as evidence and move it aside "
                        "before starting a new log"
                    )
            if torn:
                f.seek(torn[-1])
                data = f.read(size - torn[-1])
        try:
            if last is not None:
                if last.get("hash") != record_hash(last):
                    raise ValueError("its content does not match its hash")
                prev, seq = str(last["hash"]), int(last["seq"])
            else:
                prev, seq = GENESIS, 0
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError(
                f"{self.path}: the last record is damaged ({exc}); run `beamhub audit verify "
                f"{self.path}` and move the file aside before starting a new log"
            ) from exc
        if torn:
            self._set_aside(torn[-1], data, seq, prev)
        return prev, seq

    def _set_aside(self, offset: int, data: bytes, after_seq: int, after_hash: str) -> None:
        """Keep a torn tail as evidence in ``<log>.torn`` (durably), then cut it off the log."""
        digest = hashlib.sha256(data).hexdigest()
        evidence = torn_path(self.path)
        kept = _torn_entries(self.path)
        already = kept and (kept[-1].get("offset"), kept[-1].get("sha256")) == (offset, digest)
        if not already:  # else a crash came between keeping it and cutting it: kept once
            entry = {
                "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                "log": self.path.name,
                "offset": offset,
                "length": len(data),
                "after_seq": after_seq,
                "after_hash": after_hash,
                "sha256": digest,
                "data_b64": base64.b64encode(data).decode("ascii"),
            }
            line = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"
            fd = os.open(evidence, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                if os.write(fd, line) != len(line):
                    raise AuditError(
                        f"{evidence}: short write keeping the torn tail of {self.path}"
                    )
                os.fsync(fd)
            finally:
                os.close(fd)
            _fsync_dir(evidence.parent)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.log.warning(
            "audit log %s: a torn last write (%d bytes at byte %d, after record %d) was kept "
            "in %s and cut off; the chain continues from record %d",
            self.path,
            len(data),
            offset,
            after_seq,
            evidence,
            after_seq,
        )

    def append(self, **fields: Any) -> dict[str, Any]:
        """Write one decision record and return it (with seq, prev and hash)."""
        unknown = set(fields) - set(RECORD_FIELDS) - set(OPTIONAL_FIELDS)
        if unknown:
            raise ValueError(f"audit record: unknown field(s) {sorted(unknown)}")
        record: dict[str, Any] = {k: fields.get(k) for k in RECORD_FIELDS}
        record.update({k: fields[k] for k in OPTIONAL_FIELDS if fields.get(k) is not None})
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

    def head(self) -> tuple[int, str]:
        """The chain's head: how many records, and the last one's hash (what a checkpoint signs)."""
        with self._lock:
            return self._seq, self._prev

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
class Checkpoint:
    """A signed checkpoint's content: the log had ``count`` records, the last with ``hash``."""

    count: int
    hash: str
    at: float = 0.0

    def when(self) -> str:
        return datetime.fromtimestamp(self.at, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class VerifyResult:
    """``ok``, how many records were checked, and the first broken line (1-based) and why;
    ``torn_tails``: how many torn last writes were set aside in ``<log>.torn`` (evidence).

    With checkpoints: ``checkpoints`` how many were given, ``anchored`` how many records the last
    matching one covers (records after it are not anchored yet), ``untrusted_from`` the first
    record that can no longer be trusted (None: all can)."""

    ok: bool
    records: int
    line: int | None = None
    reason: str = ""
    torn_tails: int = 0
    checkpoints: int = 0
    anchored: int = 0
    untrusted_from: int | None = None


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        yield from enumerate(f, start=1)


def verify_log(
    path: str | os.PathLike, checkpoints: list[Checkpoint] | None = None
) -> VerifyResult:
    """Walk the chain from the first record; stop at the first record that does not fit; then
    check the log against the signed ``checkpoints`` (truncation, re-chaining), and that every
    torn tail set aside fits the chain where it was cut off."""
    path = Path(path)
    torn = _torn_entries(path)
    marks = sorted(checkpoints or (), key=lambda c: c.count)
    wanted = {e.get("after_seq") for e in torn} | {c.count for c in marks}
    result, cuts = _verify_chain(path, wanted)
    anchored = _check_anchors(result, cuts, marks)
    if anchored is not None:
        return dataclasses.replace(anchored, torn_tails=len(torn))
    last_good = max((c.count for c in marks if c.count <= result.records), default=0)
    if not result.ok:
        return VerifyResult(
            False,
            result.records,
            result.line,
            result.reason,
            len(torn),
            len(marks),
            last_good,
            result.line,
        )
    for number, entry in enumerate(torn, start=1):
        cut = cuts.get(entry.get("after_seq"))
        if cut is None or cut != (entry.get("after_hash"), entry.get("offset")):
            return VerifyResult(
                False,
                result.records,
                None,
                f"entry {number} of {torn_path(path).name} (a torn tail set aside) does not fit "
                f"the chain: no record {entry.get('after_seq')!r} with that hash ends at byte "
                f"{entry.get('offset')!r}",
                len(torn),
                len(marks),
                last_good,
                last_good + 1,
            )
    return VerifyResult(True, result.records, None, "", len(torn), len(marks), last_good)


def _check_anchors(
    chain: VerifyResult, cuts: dict[int, tuple[str, int]], marks: list[Checkpoint]
) -> VerifyResult | None:
    """The first checkpoint the log contradicts, as a failed result; None if none does."""
    good = 0
    for mark in marks:
        if mark.count in cuts:
            if cuts[mark.count][0] == mark.hash:
                good = mark.count
                continue
            return VerifyResult(
                False,
                chain.records,
                good + 1,
                f"record {mark.count} does not match the token service's signed checkpoint of "
                f"{mark.when()}: a record was rewritten and the chain recomputed after it "
                f"(re-chained); the log can no longer be trusted from record {good + 1} (the last "
                f"matching checkpoint covers records 1-{good})",
                checkpoints=len(marks),
                anchored=good,
                untrusted_from=good + 1,
            )
        if chain.ok:  # the log ends before a record the token service counted
            return VerifyResult(
                False,
                chain.records,
                None,
                f"the log has {chain.records} records, but the token service's signed checkpoint "
                f"of {mark.when()} counted {mark.count}: records {chain.records + 1}-{mark.count} "
                f"were removed (truncated); the log can no longer be trusted from record "
                f"{good + 1} (the last matching checkpoint covers records 1-{good})",
                checkpoints=len(marks),
                anchored=good,
                untrusted_from=good + 1,
            )
        return None  # the chain broke before this checkpoint: that break is the verdict
    return None


def _verify_chain(path: Path, wanted: set[Any]) -> tuple[VerifyResult, dict[int, tuple[str, int]]]:
    """The chain's verdict, and (hash, end offset) of the records in ``wanted`` (by seq)."""
    prev, count, offset = GENESIS, 0, 0
    cuts: dict[int, tuple[str, int]] = {0: (GENESIS, 0)}
    for number, raw in _lines(path):
        why = _misfit(raw, prev, count)
        if why:
            return VerifyResult(False, count, number, why), cuts
        prev = json.loads(raw)["hash"]
        count += 1
        offset += len(raw)
        if count in wanted:
            cuts[count] = (prev, offset)
    return VerifyResult(True, count), cuts


def _misfit(raw: bytes, prev: str, count: int) -> str:
    """Why this line is not record ``count + 1`` following ``prev``; '' if it is."""
    if not raw.endswith(b"\n"):
        return (
            "the last record is truncated (no newline): a torn write, which the gateway keeps "
            "in <log>.torn and cuts off when it next opens the log"
        )
    try:
        record = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        return f"not valid JSON: {exc}"
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("prev") != prev:
        return (
            "'prev' does not match the previous record's hash "
            "(a record was changed, removed, inserted or reordered before this line)"
        )
    if record.get("seq") != count + 1:
        return f"'seq' is {record.get('seq')!r}, expected {count + 1}"
    if record.get("hash") != record_hash(record):
        return "the record's content does not match its hash"
    return ""
