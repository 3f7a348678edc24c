"""Audit anchoring (finding 7): the chain's head signed by the real token service, kept outside the
log, so `beamhub audit verify` finds dropped last records and a recomputed chain, and says from
which record the log can no longer be trusted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from beamhub.hub.gateway.audit import GENESIS, AuditLog, Checkpoint, record_hash, verify_log
from tests.hub.hubstack import RunningStack

pytestmark = pytest.mark.timeout(120)


def _write(path: Path, n: int) -> AuditLog:
    log = AuditLog(path, fsync="never")
    for i in range(n):
        log.append(user=f"u{i}", action="channels.read", outcome="allow", source="127.0.0.1")
    return log


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _rechain(records: list[dict], target: int) -> list[dict]:
    """Rewrite record ``target`` (1-based) and recompute every hash after it, as an attacker
    with write access to the file would."""
    out, prev = [], GENESIS
    for record in records:
        record = dict(record)
        if record["seq"] == target:
            record["outcome"] = "deny"
        record["prev"] = prev
        record["hash"] = record_hash(record)
        prev = record["hash"]
        out.append(record)
    return out


def _save(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))


def test_checkpoints_expose_truncation_and_rechaining(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write(path, 10).close()
    records = _lines(path)
    marks = [Checkpoint(5, records[4]["hash"], 1.0), Checkpoint(10, records[9]["hash"], 2.0)]
    result = verify_log(path, marks)
    assert result.ok and result.anchored == 10 and result.untrusted_from is None
    _save(tmp_path / "cut.jsonl", records[:8])
    assert verify_log(tmp_path / "cut.jsonl").ok  # the chain alone cannot see it
    cut = verify_log(tmp_path / "cut.jsonl", marks)
    assert not cut.ok and "truncated" in cut.reason and cut.untrusted_from == 6
    _save(tmp_path / "rechained.jsonl", _rechain(records, 7))
    assert verify_log(tmp_path / "rechained.jsonl").ok
    rechained = verify_log(tmp_path / "rechained.jsonl", marks)
    assert not rechained.ok and "re-chained" in rechained.reason
    assert rechained.untrusted_from == 6 and rechained.anchored == 5


# --- against the real token service and gateway of `beamhub up` ----------------------------


def _checkpoint(stack: RunningStack, api_token: str, **body) -> requests.Response:
    return requests.post(
        stack.tokens + "audit/checkpoints",
        headers={"Authorization": f"token {api_token}"},
        json=body,
        timeout=10,
    )


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "beamhub.hub.cli", "audit", "verify", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_beamhub_audit_verify_detects_both_attacks(dev_stack: RunningStack, tmp_path: Path) -> None:
    gateway_identity = dev_stack.runtime["services"]["gateway"]["api_token"]
    name = f"attack-{int(time.time() * 1000)}"
    path = tmp_path / "audit.jsonl"
    log = _write(path, 5)
    assert (
        _checkpoint(dev_stack, gateway_identity, log=name, count=5, hash=log.head()[1]).status_code
        == 201
    )
    for i in range(5):
        log.append(user=f"v{i}", action="steer", outcome="allow")
    count, head = log.head()
    log.close()
    r = _checkpoint(dev_stack, gateway_identity, log=name, count=count, hash=head)
    assert r.status_code == 201 and r.json()["signature"].count(".") == 2
    # the token service keeps checkpoints moving forward only
    r = _checkpoint(dev_stack, gateway_identity, log=name, count=8, hash=head)
    assert r.status_code == 409 and r.json()["reason"] == "checkpoint_behind"
    r = _checkpoint(dev_stack, gateway_identity, log=name, count=10, hash="0" * 64)
    assert r.status_code == 409 and r.json()["reason"] == "checkpoint_conflict"
    r = _checkpoint(dev_stack, dev_stack.user_api_token("alice"), log=name, count=11, hash=head)
    assert r.status_code == 403 and r.json()["reason"] == "scope"

    url = dev_stack.tokens + "audit/checkpoints"
    ok = _cli(str(path), "--checkpoints", url, "--name", name)
    assert ok.returncode == 0 and "anchored: records 1-10" in ok.stdout, ok.stdout + ok.stderr
    records = _lines(path)
    _save(tmp_path / "cut.jsonl", records[:8])
    cut = _cli(str(tmp_path / "cut.jsonl"), "--checkpoints", url, "--name", name)
    assert cut.returncode == 1 and "truncated" in cut.stdout, cut.stdout + cut.stderr
    assert "cannot be trusted from record 6" in cut.stdout
    _save(tmp_path / "rechained.jsonl", _rechain(records, 9))
    rechained = _cli(str(tmp_path / "rechained.jsonl"), "--checkpoints", url, "--name", name)
    assert rechained.returncode == 1 and "re-chained" in rechained.stdout, rechained.stdout
    assert "cannot be trusted from record 6" in rechained.stdout
    # a forged checkpoint list does not verify with the token service's JWKS
    listed = requests.get(url, params={"log": name}, timeout=10).json()
    listed["checkpoints"][-1]["signature"] = listed["checkpoints"][0]["signature"][:-4] + "AAAA"
    (tmp_path / "forged.json").write_text(json.dumps(listed))
    forged = _cli(
        str(path),
        "--checkpoints",
        str(tmp_path / "forged.json"),
        "--jwks",
        dev_stack.tokens + "jwks.json",
        "--name",
        name,
    )
    assert forged.returncode == 2 and "does not verify" in forged.stderr


def test_the_running_gateway_anchors_its_log(dev_stack: RunningStack) -> None:
    gateway = dev_stack.urls["gateway"] + "api/v1/status"
    for _ in range(3):
        assert requests.get(gateway, timeout=10).status_code == 200
    audit = dev_stack.state / "audit.jsonl"
    wanted = len(_lines(audit))
    url = dev_stack.tokens + "audit/checkpoints"
    deadline = time.monotonic() + 30  # the gateway checkpoints every 10 s
    while True:
        marks = requests.get(url, params={"log": "gateway"}, timeout=10).json()["checkpoints"]
        if marks and marks[-1]["count"] >= wanted:
            break
        assert time.monotonic() < deadline, f"no checkpoint of {wanted} records: {marks[-1:]}"
        time.sleep(0.5)
    records = _lines(audit)
    assert records[marks[-1]["count"] - 1]["hash"] == marks[-1]["hash"]
    # the defaults find the token service from the state folder beside the log
    result = _cli(str(audit))
    assert result.returncode == 0 and "anchored: records 1-" in result.stdout, result.stdout
