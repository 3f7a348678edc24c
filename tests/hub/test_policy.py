"""Policy as code: deny by default, deny rules win, every condition, validation errors, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from beamhub.hub.gateway.policy import PolicyError, PolicyRequest, load_policy, parse_policy


def req(action: str, **kw) -> PolicyRequest:
    base = dict(user="alice", token_project="p1", project="p1", scopes=frozenset())
    base.update(kw)
    return PolicyRequest(action=action, **base)


@pytest.fixture(scope="module")
def default():
    return load_policy()


def test_status_is_public(default) -> None:
    decision = default.evaluate(PolicyRequest(action="status.read"))
    assert decision.allow and decision.rule == "status-public"


def test_deny_by_default_names_the_nearest_rule(default) -> None:
    decision = default.evaluate(req("channels.create", scopes=frozenset({"stream.read"})))
    assert not decision.allow
    assert decision.rule == "default-deny"
    assert "channels-manage-own-project" in decision.reason and "stream.publish" in decision.reason


def test_own_project_only(default) -> None:
    scopes = frozenset({"stream.publish"})
    assert default.evaluate(req("channels.create", scopes=scopes)).allow
    other = default.evaluate(req("channels.create", scopes=scopes, project="p2"))
    assert not other.allow and "'p1', not 'p2'" in other.reason


def test_admin_role_and_source_network(default) -> None:
    admin = dict(roles=frozenset({"admin"}), scopes=frozenset({"admin"}), project=None)
    assert default.evaluate(req("reservations.approve", source="127.0.0.1", **admin)).allow
    far = default.evaluate(req("reservations.approve", source="8.8.8.8", **admin))
    assert not far.allow and "8.8.8.8" in far.reason
    user = default.evaluate(req("reservations.approve", source="127.0.0.1", project=None))
    assert not user.allow and "roles ['admin']" in user.reason


def test_deny_rule_wins_in_its_window(default) -> None:
    steer = dict(scopes=frozenset({"steer"}), enclave="leadership")
    tuesday_7 = datetime(2026, 12, 1, 7, 0, tzinfo=UTC)
    tuesday_11 = datetime(2026, 12, 1, 11, 0, tzinfo=UTC)
    denied = default.evaluate(req("steer", at=tuesday_7, **steer))
    assert not denied.allow and denied.rule == "no-steer-in-leadership-maintenance"
    assert default.evaluate(req("steer", at=tuesday_11, **steer)).allow
    assert default.evaluate(req("steer", at=tuesday_7, scopes=frozenset({"steer"}))).allow


def test_users_lists_and_globs_and_wrapping_window() -> None:
    policy = parse_policy(
        {
            "version": 1,
            "rules": [
                {
                    "id": "night-ops",
                    "effect": "allow",
                    "actions": ["channels.*"],
                    "who": {"users": ["oscar"]},
                    "project": ["p1", "p3"],
                    "time": {"days": ["fri", "sat"], "start": "22:00", "end": "02:00"},
                }
            ],
        }
    )
    late_fri = datetime(2026, 11, 27, 23, 30, tzinfo=UTC)  # a Friday
    assert policy.evaluate(req("channels.delete", user="oscar", at=late_fri)).allow
    assert not policy.evaluate(req("channels.delete", user="eve", at=late_fri)).allow
    assert not policy.evaluate(req("channels.read", user="oscar", project="p2", at=late_fri)).allow
    noon = late_fri.replace(hour=12)
    assert "time window" in policy.evaluate(req("channels.read", user="oscar", at=noon)).reason
    assert not policy.evaluate(req("steer", user="oscar", at=late_fri)).allow


def good_rule(**kw) -> dict:
    rule = {"id": "r1", "effect": "allow", "actions": ["steer"]}
    rule.update(kw)
    return rule


@pytest.mark.parametrize(
    "doc,needle",
    [
        ([], "mapping"),
        ({"rules": [good_rule()]}, "'version'"),
        ({"version": 2, "rules": [good_rule()]}, "'version'"),
        ({"version": 1, "rules": []}, "'rules'"),
        ({"version": 1, "rules": [good_rule()], "extra": 1}, "extra"),
        ({"version": 1, "rules": [good_rule(effect="permit")]}, "'effect'"),
        ({"version": 1, "rules": [good_rule(id="Bad Id")]}, "'id'"),
        ({"version": 1, "rules": [good_rule(actions=["stear"])]}, "'stear'"),
        ({"version": 1, "rules": [good_rule(who={"groups": ["x"]})]}, "'who'"),
        ({"version": 1, "rules": [good_rule(source=["10.0.0.0/33"])]}, "'source'"),
        ({"version": 1, "rules": [good_rule(time={"start": "25:00"})]}, "'time.start'"),
        ({"version": 1, "rules": [good_rule(time={"days": ["funday"]})]}, "'time.days'"),
        ({"version": 1, "rules": [good_rule(scope=[])]}, "'scope'"),
        ({"version": 1, "rules": [good_rule(colour="red")]}, "colour"),
        ({"version": 1, "rules": [good_rule(), good_rule()]}, "duplicate rule id"),
    ],
)
def test_validation_names_the_field(doc, needle: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(doc, "test.yaml")
    assert needle in str(info.value) and "test.yaml" in str(info.value)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "beamhub.hub.cli", "policy", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_policy_test_allow_and_deny(tmp_path: Path) -> None:
    ok = run_cli(
        "test",
        "--user",
        "alice",
        "--project",
        "p1",
        "--scope",
        "stream.publish",
        "--action",
        "channels.create",
        "--json",
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {
        "decision": "allow",
        "rule": "channels-manage-own-project",
        "reason": "operators and PIs (scope stream.publish) manage their project's stream channels",
    }
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "rules": [
                    good_rule(id="steer-ok", scope="steer"),
                    {
                        "id": "block-far",
                        "effect": "deny",
                        "actions": ["*"],
                        "source": ["203.0.113.0/24"],
                        "description": "documentation network",
                    },
                ],
            }
        )
    )
    denied = run_cli(
        "test",
        "--user",
        "oscar",
        "--project",
        "p1",
        "--scope",
        "steer",
        "--action",
        "steer",
        "--source",
        "203.0.113.9",
        "--rules",
        str(rules),
    )
    assert denied.returncode == 1
    assert "DENY" in denied.stdout and "rule=block-far" in denied.stdout
    assert "documentation network" in denied.stdout


def test_cli_reports_bad_file_and_bad_action(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - {id: x, effect: maybe, actions: [steer]}\n")
    res = run_cli("test", "--action", "steer", "--rules", str(bad))
    assert res.returncode == 2 and "'effect'" in res.stderr and "bad.yaml" in res.stderr
    res = run_cli("validate", str(bad))
    assert res.returncode == 1 and "'effect'" in res.stderr
    res = run_cli("test", "--action", "launch.missiles")
    assert res.returncode == 2 and "unknown --action" in res.stderr
    assert run_cli("validate").returncode == 0
