"""Change records over a real gateway process: `beamhub policy reload` (SIGHUP) audits each change
of beamhub.yaml, the policy and the templates with a diff summary and who made it, swaps in a
policy that passes its own tests, and refuses one that does not (the running policy stays)."""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from beamhub.hub.gateway.audit import verify_log
from beamhub.hub.gateway.config_changes import diff_summary
from beamhub.hub.gateway.policy import DEFAULT_POLICY_PATH
from tests.hub.gateway_helpers import Keys
from tests.hub.hubstack import BEAMHUB

pytestmark = pytest.mark.timeout(120)

ME = pwd.getpwuid(os.getuid()).pw_name
#: the shipped policy's own tests, counted from the file
CASES = len(yaml.safe_load(DEFAULT_POLICY_PATH.read_text())["tests"])
DENY_P9 = """
  - id: p9-frozen
    effect: deny
    actions: [channels.read]
    project: [p9]
    description: project p9 is frozen
"""
BREAKS_STATUS = """
  - id: status-closed
    effect: deny
    actions: [status.read]
"""


def test_diff_summary_names_keys_not_values() -> None:
    old = "gateway:\n  rate_per_s: 5\nidentity:\n  secret: hunter2\n"
    new = "gateway:\n  rate_per_s: 9\n  burst: 40\nidentity:\n  secret: swordfish\n"
    summary = diff_summary(old, new)
    assert summary.startswith("+3 -2 lines"), summary
    assert "added gateway.burst" in summary
    assert "changed gateway.rate_per_s, identity.secret" in summary
    assert "hunter2" not in summary and "swordfish" not in summary and "9" not in summary


def _audit(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _reload(state: Path, pid: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BEAMHUB, "policy", "reload", "--state-dir", str(state), "--pid", str(pid)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_reload_records_changes_and_refuses_a_policy_that_fails_its_tests(tmp_path: Path) -> None:
    keys = Keys()
    state = tmp_path / "state"
    state.mkdir()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(keys.key.jwks()))
    policy = tmp_path / "policy.yaml"
    shipped = DEFAULT_POLICY_PATH.read_text()
    policy.write_text(shipped)
    dep = tmp_path / "beamhub.yaml"
    dep.write_text("gateway:\n  rate_per_s: 50\n  burst: 100\n")
    audit = state / "audit.jsonl"
    gateway = subprocess.Popen(
        [
            *(sys.executable, "-m", "beamhub.hub.gateway.service", "--deployment", str(dep)),
            *("--state-dir", str(state), "--port", "0", "--jwks", str(jwks)),
            *("--policy", str(policy), "--checkpoint-interval", "0", "--revoked-url", ""),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "BEAMHUB_"))},
    )
    try:
        url = None
        for line in gateway.stdout:
            found = re.search(r"listening on (\S+?)/? \(", line)
            if found:
                url = found.group(1)
                break
        assert url, "the gateway did not start"
        deadline = time.monotonic() + 20
        while not (audit.exists() and "config.baseline" in audit.read_text()):
            assert time.monotonic() < deadline, "no baseline record"
            time.sleep(0.1)
        baseline = [r for r in _audit(audit) if r["action"] == "config.baseline"]
        assert len(baseline) == 1 and str(policy) in baseline[0]["resource"]
        assert str(dep) in baseline[0]["resource"] and "template" in baseline[0]["resource"]

        alice = {"Authorization": f"Bearer {keys.token('alice', 'p9', 'stream.read')}"}
        channels = f"{url}/projects/p9/channels"
        assert requests.get(channels, headers=alice, timeout=10).status_code == 503  # no DSN

        # a policy that fails its own tests (status no longer public) is refused
        policy.write_text(shipped.replace("\ntests:", BREAKS_STATUS + "\ntests:"))
        refused = _reload(state, gateway.pid)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "REFUSED  policy" in refused.stdout
        assert "anyone reads the facility status: expected allow, got deny" in refused.stdout
        assert requests.get(f"{url}/status", timeout=10).status_code == 200
        record = [r for r in _audit(audit) if r["action"].startswith("config.")][-1]
        assert record["action"] == "config.reload" and record["outcome"] == "deny"
        assert record["user"] == f"{ME} (uid {os.getuid()}); reload by {ME}"
        added = len(BREAKS_STATUS.splitlines())
        assert record["reason"].startswith(f"+{added} -0 lines; changed rules; refused")

        # a good policy goes live; beamhub.yaml's change is recorded by key, without values
        policy.write_text(shipped.replace("\ntests:", DENY_P9 + "\ntests:"))
        dep.write_text("gateway:\n  rate_per_s: 70\n  burst: 100\n")
        done = _reload(state, gateway.pid)
        assert done.returncode == 0, done.stdout + done.stderr
        denied = requests.get(channels, headers=alice, timeout=10)
        assert denied.status_code == 403 and denied.json()["decision"]["rule"] == "p9-frozen"
        changes = [r for r in _audit(audit) if r["action"] == "config.change"]
        by_kind = {r["resource"].split()[0]: r for r in changes}
        assert set(by_kind) == {"policy", "deployment"}, changes
        assert f"live, {CASES} policy tests pass" in by_kind["policy"]["reason"]
        assert by_kind["deployment"]["reason"] == "+1 -1 lines; changed gateway.rate_per_s"
        assert "70" not in by_kind["deployment"]["reason"]

        # nothing changed: nothing recorded; the chain is intact throughout
        count = len(_audit(audit))
        again = _reload(state, gateway.pid)
        assert again.returncode == 0 and "no change since the last reload" in again.stdout
        assert len(_audit(audit)) == count  # no request in between: nothing else is audited
        assert verify_log(audit).ok
    finally:
        gateway.terminate()
        gateway.wait(timeout=20)


def test_policy_test_runs_the_files_own_tests(tmp_path: Path) -> None:
    ok = subprocess.run(
        [BEAMHUB, "policy", "test"], capture_output=True, text=True, timeout=60, check=False
    )
    assert ok.returncode == 0 and f"{CASES}/{CASES} tests pass" in ok.stdout, ok.stdout + ok.stderr
    bad = tmp_path / "p.yaml"
    bad.write_text(DEFAULT_POLICY_PATH.read_text().replace("\ntests:", BREAKS_STATUS + "\ntests:"))
    failed = subprocess.run(
        [BEAMHUB, "policy", "test", "--rules", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert failed.returncode == 1 and f"{CASES - 1}/{CASES} tests pass" in failed.stdout
    assert "FAIL  anyone reads the facility status" in failed.stdout
    typo = tmp_path / "typo.yaml"
    typo.write_text(
        "version: 1\nrules: [{id: a, effect: allow, actions: [steer]}]\n"
        "tests: [{action: steer, expect: maybe}]\n"
    )
    wrong = subprocess.run(
        [BEAMHUB, "policy", "test", "--rules", str(typo)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert wrong.returncode == 2 and "tests[0]: field 'expect'" in wrong.stderr


def test_policy_reload_reaches_the_gateway_of_a_real_stack(dev_stack) -> None:
    """Under `beamhub up`, `beamhub policy reload` finds the gateway in the supervisor's
    status.json, signals it and reads its answer; the stack's audit log holds the baseline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEAMHUB_")}
    env["BEAMHUB_HOME"] = str(dev_stack.state)
    reload = subprocess.run(
        [BEAMHUB, "policy", "reload"], capture_output=True, text=True, env=env, timeout=60
    )
    assert reload.returncode == 0, reload.stdout + reload.stderr
    assert "no change since the last reload" in reload.stdout
    audit = dev_stack.state / "audit.jsonl"
    baseline = [r for r in _audit(audit) if r["action"] == "config.baseline"]
    assert len(baseline) == 1 and "policy " in baseline[0]["resource"]
    assert str(dev_stack.config) in baseline[0]["resource"]
    result = json.loads((dev_stack.state / "gateway-config" / "last-reload.json").read_text())
    assert result["trigger"] == "SIGHUP" and result["changes"] == []


async def test_reload_over_the_api_names_the_admin(tmp_path: Path) -> None:
    """`POST /config/reload` with a facility admin's token: the record names the token's subject;
    a member's admin-scoped token is refused by policy; a failing policy is a 409."""
    from beamhub.hub.gateway.config_changes import ConfigWatch
    from beamhub.hub.gateway.policy import load_policy
    from tests.hub.gateway_helpers import call, running_gateway

    keys = Keys()
    policy = tmp_path / "policy.yaml"
    shipped = DEFAULT_POLICY_PATH.read_text()
    policy.write_text(shipped)
    async with running_gateway(keys, tmp_path, policy=load_policy(policy)) as s:
        admin = keys.token("admin", "facility", "admin")
        code, body, _ = await call(s.url, "POST", "/config/reload", admin)
        assert code == 503 and body["reason"] == "config_not_watched"
        watch = ConfigWatch([("policy", policy)], tmp_path / "gateway-config")
        s.gateway.config_watch = watch
        watch.reload(s.gateway, "start")

        policy.write_text(shipped.replace("\ntests:", DENY_P9 + "\ntests:"))
        member = keys.token("alice", "p1", "admin")
        code, body, _ = await call(s.url, "POST", "/config/reload", member)
        assert code == 403 and body["reason"] == "policy", body
        code, body, _ = await call(s.url, "POST", "/config/reload", admin)
        assert code == 200 and body["refused"] == [], body
        [change] = body["changes"]
        assert change["outcome"] == "allow" and change["kind"] == "policy"
        who = rf"{ME} \(uid {os.getuid()}\); reload by admin \(admin token [\w-]+\)"
        assert re.fullmatch(who, change["who"]), change["who"]
        assert "p9-frozen" in [r.id for r in s.gateway.policy.rules]  # live

        policy.write_text(shipped.replace("\ntests:", BREAKS_STATUS + "\ntests:"))
        code, body, _ = await call(s.url, "POST", "/config/reload", admin)
        assert code == 409 and body["reason"] == "policy_refused", body
        assert "anyone reads the facility status: expected allow, got deny" in body["message"]
        assert [c["path"] for c in body["changes"]] == [str(policy.resolve())]
        assert "p9-frozen" in [r.id for r in s.gateway.policy.rules]  # the running one stays
        # besides the gateway's record of each request (action config.reload, rule of the policy)
        records = [r for r in _audit(s.audit_path) if str(r["rule"]).startswith("reload:")]
        assert [(r["action"], r["outcome"]) for r in records] == [
            ("config.baseline", "allow"),
            ("config.change", "allow"),
            ("config.reload", "deny"),
        ]
        assert all("reload by admin (admin token" in r["user"] for r in records[1:])
