"""Audit log: the chain verifies, any flipped byte is found at its record, concurrent writers, and a
torn last write after a crash is kept as evidence while the chain goes on."""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from beamhub.hub.gateway.audit import (
    GENESIS,
    MAX_TORN_LINES,
    AuditError,
    AuditLog,
    record_hash,
    torn_path,
    verify_log,
)


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


def tear(path: Path, cut: int) -> bytes:
    """A crash mid-write: the file loses its last ``cut`` bytes; returns what was lost."""
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    return data[-cut:]


def test_a_torn_last_record_is_kept_as_evidence_and_the_chain_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "audit.jsonl"
    write_records(log, 4)
    lines = log.read_bytes().splitlines(keepends=True)
    good = b"".join(lines[:3])
    lost = tear(log, 40)  # record 4 is cut mid-record, without its newline
    torn = log.read_bytes()[len(good) :]
    assert not verify_log(log).ok  # as the crash left it
    with caplog.at_level("WARNING", logger="beamhub.gateway.audit"), AuditLog(log) as reopened:
        assert reopened.torn_tails == 1
        reopened.append(user="after", action="status.read", outcome="allow")
    warning = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and f"at byte {len(good)}" in warning[0].getMessage()
    assert "after record 3" in warning[0].getMessage()

    result = verify_log(log)
    assert result.ok and result.records == 4 and result.torn_tails == 1, result
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[3]["user"] == "after" and records[3]["prev"] == records[2]["hash"]
    (entry,) = [json.loads(line) for line in torn_path(log).read_text().splitlines()]
    assert base64.b64decode(entry["data_b64"]) == torn and torn + lost == lines[3]
    assert (entry["offset"], entry["length"], entry["after_seq"]) == (len(good), len(torn), 3)
    assert entry["after_hash"] == records[2]["hash"] and entry["time"]

    cli = run_cli(log)
    assert cli.returncode == 0 and "4 records" in cli.stdout
    assert "1 torn last write(s)" in cli.stdout and str(torn_path(log)) in cli.stdout


def test_a_tampered_middle_record_still_fails_after_a_repair(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_records(log, 5)
    tear(log, 10)
    AuditLog(log).close()  # repairs: records 1-4 remain
    assert verify_log(log).ok
    log.write_bytes(log.read_bytes().replace(b'"jti-1"', b'"jti-9"'))
    result = verify_log(log)
    assert not result.ok and result.line == 2 and result.torn_tails == 1
    cli = run_cli(log)
    assert cli.returncode == 1 and "BROKEN at line 2" in cli.stdout


def test_a_last_line_that_does_not_parse_is_set_aside(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_records(log, 2)
    with open(log, "ab") as f:
        f.write(b"\x00" * 300 + b"\n" + b'{"seq": 3, "prev')  # zeros a crash left, then a tear
    with AuditLog(log) as reopened:
        assert reopened.torn_tails == 1
        reopened.append(user="next", action="status.read", outcome="allow")
    result = verify_log(log)
    assert result.ok and result.records == 3 and result.torn_tails == 1
    (entry,) = [json.loads(line) for line in torn_path(log).read_text().splitlines()]
    assert base64.b64decode(entry["data_b64"]) == b"\x00" * 300 + b"\n" + b'{"seq": 3, "prev'


def test_a_torn_first_record_starts_the_chain_again(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_records(log, 1)
    tear(log, 5)
    with AuditLog(log) as reopened:
        assert reopened.append(user="u", action="status.read", outcome="allow")["prev"] == GENESIS
    result = verify_log(log)
    assert result.ok and result.records == 1 and result.torn_tails == 1


def test_more_damage_than_a_torn_write_is_refused(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_records(log, 2)
    with open(log, "ab") as f:
        f.write(b"garbage\n" * (MAX_TORN_LINES + 1))
    before = log.read_bytes()
    with pytest.raises(AuditError, match="not a torn last write"):
        AuditLog(log)
    assert log.read_bytes() == before and not torn_path(log).exists()  # nothing moved


def test_a_crash_during_the_repair_keeps_the_evidence_once(tmp_path: Path) -> None:
    """Kept, then the crash before the cut: the next opening cuts it without a second copy."""
    log = tmp_path / "audit.jsonl"
    write_records(log, 3)
    tear(log, 20)
    torn = log.read_bytes()[log.read_bytes().rindex(b"\n") + 1 :]
    AuditLog(log).close()
    with open(log, "ab") as f:  # as if the cut had not happened
        f.write(torn)
    with AuditLog(log) as reopened:
        assert reopened.torn_tails == 1
    assert len(torn_path(log).read_text().splitlines()) == 1
    assert verify_log(log).ok


def test_evidence_that_does_not_fit_the_chain_fails_verify(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    write_records(log, 3)
    tear(log, 20)
    AuditLog(log).close()
    entry = json.loads(torn_path(log).read_text())
    entry["after_hash"] = "f" * 64
    torn_path(log).write_text(json.dumps(entry) + "\n")
    result = verify_log(log)
    assert not result.ok and "does not fit the chain" in result.reason
    cli = run_cli(log)
    assert cli.returncode == 1 and "BROKEN" in cli.stdout
