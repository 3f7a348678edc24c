"""Audit log: the chain verifies, any flipped byte is found at its record, concurrent writers."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from beamhub.hub.gateway.audit import GENESIS, AuditError, AuditLog, record_hash, verify_log


def write_records(path: Path, n: int, **kw) -> None:
    with AuditLog(path, **kw) as log:
        for i in range(n):
            log.append(
                user=f"u{i % 3}",
                project="p1",
                jti=f"jti-{i}",
                action="channels.read",
                resource=f"/api/v1/projects/p1/channels/{i}",
                rule="r",
                source="127.0.0.1",
                outcome="allow" if i % 2 else "deny",
                status=200,
                reason="",
            )


def test_chain_links_and_verifies(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_records(log, 5, fsync="always")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == GENESIS
    for before, after in itertools.pairwise(records):
        assert after["prev"] == before["hash"]
    assert all(r["hash"] == record_hash(r) for r in records)
    assert verify_log(log).ok and verify_log(log).records == 5


def test_reopen_continues_the_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_records(log, 3)
    write_records(log, 2, fsync="never")
    result = verify_log(log)
    assert result.ok and result.records == 5


@pytest.mark.parametrize("target", [1, 4, 7])
def test_every_flipped_byte_is_found_at_its_record(tmp_path: Path, target: int) -> None:
    log = tmp_path / "audit.jsonl"
    write_records(log, 8)
    lines = log.read_bytes().splitlines(keepends=True)
    # flip each byte of the target line (but the newline) in turn: always caught at that line
    for offset in range(len(lines[target - 1]) - 1):
        broken = bytearray(lines[target - 1])
        broken[offset] ^= 0x01
        tampered = tmp_path / "tampered.jsonl"
        tampered.write_bytes(
            b"".join(lines[: target - 1]) + bytes(broken) + b"".join(lines[target:])
        )
        result = verify_log(tampered)
        assert not result.ok, f"flip at byte {offset} went unnoticed"
        assert result.line == target, (offset, result)
        assert result.records == target - 1


def test_removed_and_reordered_records_are_found(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_records(log, 5)
    lines = log.read_text().splitlines(keepends=True)
    (tmp_path / "cut.jsonl").write_text("".join(lines[:2] + lines[3:]))
    assert verify_log(tmp_path / "cut.jsonl").line == 3
    (tmp_path / "swap.jsonl").write_text("".join([lines[1], lines[0], *lines[2:]]))
    assert verify_log(tmp_path / "swap.jsonl").line == 1
    (tmp_path / "trunc.jsonl").write_text("".join(lines)[:-5])
    result = verify_log(tmp_path / "trunc.jsonl")
    assert not result.ok and result.line == 5


def test_damaged_tail_refuses_to_continue(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_records(log, 2)
    log.write_text(log.read_text().replace('"u1"', '"u9"'))
    with pytest.raises(AuditError, match="beamhub audit verify"):
        AuditLog(log)


def test_concurrent_writers_in_one_process(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, fsync="never")
    threads = [
        threading.Thread(
            target=lambda t=t: [
                log.append(user=f"t{t}", action="status.read", outcome="allow") for _ in range(200)
            ]
        )
        for t in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    log.close()
    result = verify_log(path)
    assert result.ok and result.records == 1600


def test_unknown_field_and_token_are_refused(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.jsonl") as log, pytest.raises(ValueError, match="token"):
        log.append(user="u", token="eyJ...")


def run_cli(log: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "beamhub.hub.cli", "audit", "verify", str(log)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_verify_ok_and_broken(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_records(log, 6)
    ok = run_cli(log)
    assert ok.returncode == 0 and "6 records" in ok.stdout
    data = bytearray(log.read_bytes())
    third = data.index(b"jti-2")  # inside record 3
    data[third] ^= 0x20
    log.write_bytes(bytes(data))
    broken = run_cli(log)
    assert broken.returncode == 1
    assert "line 3" in broken.stdout and "2 records before it verify" in broken.stdout
    missing = run_cli(tmp_path / "nope.jsonl")
    assert missing.returncode == 2 and "cannot read" in missing.stderr
