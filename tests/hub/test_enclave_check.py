"""Enclave profiles and `beamhub check`: the dev example fails moderate by name, a ready one passes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from beamhub.hub.enclave import (
    ENCLAVE_NAMES,
    EnclaveError,
    check_deployment,
    load_profile,
    parse_profile,
)
from beamhub.hub.up.deployment import DeploymentError, load_deployment

REPO = Path(__file__).resolve().parents[2]
MODERATE_TEMPLATE = REPO / "streaming" / "templates" / "moderate.yaml"


def beamhub_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "beamhub.hub.cli", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def moderate_ready(tmp_path: Path, **overrides) -> Path:
    doc = {
        "enclave": "moderate",
        "identity": {
            "provider": "https://idp.facility.example",
            "authorize_url": "https://idp.facility.example/authorize",
            "token_url": "https://idp.facility.example/token",
            "userdata_url": "https://idp.facility.example/userinfo",
            "client_secret": "from-the-facility-vault",
        },
        "tokens": {"ttl": 600, "max_ttl": 900},
        "dsn": {"template": str(MODERATE_TEMPLATE)},
        "gateway": {"enabled": True},
    }
    for key, value in overrides.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "beamhub.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_profiles_load_and_tighten_upwards() -> None:
    profiles = [load_profile(name) for name in ENCLAVE_NAMES]
    assert [p.name for p in profiles] == list(ENCLAVE_NAMES)
    ttls = [p.max_token_ttl for p in profiles]
    assert ttls == sorted(ttls, reverse=True) == [86400, 3600, 900, 600]
    assert [p.mfa_required for p in profiles] == [False, False, True, True]
    assert [p.encryption_required for p in profiles] == [False, False, True, True]
    assert profiles[2].dsn_modes == ("l7",) and profiles[0].dsn_modes == ("l4", "l7")
    assert profiles[2].rate_per_token.burst == 20 and profiles[3].audit_fsync == "always"


def test_dev_example_fails_moderate_with_named_requirements() -> None:
    res = beamhub_check("--enclave", "moderate", "beamhub.yaml")
    assert res.returncode == 1, res.stderr
    failed = {
        line.split()[1] for line in res.stdout.splitlines() if line.strip().startswith("FAIL")
    }
    assert failed == {
        "mfa",
        "identity",
        "token_ttl",
        "dsn_modes",
        "encryption",
        "separation_of_duties",
    }
    assert "identity.require_mfa: true" in res.stdout
    assert "streaming/templates/moderate.yaml" in res.stdout
    assert "6 of 11 requirements fail" in res.stdout
    assert beamhub_check("--enclave", "dev", "beamhub.yaml").returncode == 0


def test_moderate_ready_config_passes(tmp_path: Path) -> None:
    res = beamhub_check("--enclave", "moderate", str(moderate_ready(tmp_path)), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and all(r["ok"] for r in report["requirements"])
    assert {r["name"] for r in report["requirements"]} >= {
        "mfa",
        "identity",
        "token_ttl",
        "dsn_modes",
        "encryption",
        "rate_limit_token",
        "rate_limit_project",
        "audit",
        "qos_tiers",
    }
    # moderate-ready is not leadership-ready: tokens must be shorter still
    res = beamhub_check("--enclave", "leadership", str(moderate_ready(tmp_path)))
    assert res.returncode == 1 and "FAIL  token_ttl" in res.stdout


LOOSER = [
    ({"gateway": {"rate_per_s": 30.0, "burst": 60}}, "rate_limit_token", "gateway.rate_per_s"),
    (
        {"gateway": {"project_rate_per_s": 10.0, "project_burst": 300}},
        "rate_limit_project",
        "gateway.project_rate_per_s",
    ),
    ({"gateway": {"enabled": False}}, "audit", "gateway.enabled"),
    ({"identity": {"require_mfa": False}}, "mfa", "identity.require_mfa"),
    ({"dsn": {"template": "streaming/templates/default.yaml"}}, "dsn_modes", "dsn.template"),
]


@pytest.mark.parametrize(("overrides", "failing", "field"), LOOSER)
def test_each_requirement_fails_alone(
    tmp_path: Path, overrides: dict, failing: str, field: str
) -> None:
    """A dev deployment that is moderate-ready but for one setting: `check` names it."""
    overrides = {"identity": {"require_mfa": True}, **overrides}
    path = moderate_ready(tmp_path, enclave="dev", **overrides)
    res = beamhub_check("--enclave", "moderate", str(path))
    assert res.returncode == 1, res.stdout + res.stderr
    failed = [
        line.split()[1] for line in res.stdout.splitlines() if line.strip().startswith("FAIL")
    ]
    failed.remove("separation_of_duties")  # a dev deployment: enforced from moderate up
    assert failing in failed and (len(failed) == 1 or failing == "dsn_modes")


@pytest.mark.parametrize(("overrides", "failing", "field"), LOOSER)
def test_a_setting_looser_than_the_enclave_is_an_error_naming_it(
    tmp_path: Path, overrides: dict, failing: str, field: str
) -> None:
    with pytest.raises(DeploymentError) as err:
        load_deployment(moderate_ready(tmp_path, **overrides))
    assert err.value.field == field and "looser than the moderate enclave" in str(err.value)


@pytest.mark.parametrize("enclave", ["open", "moderate", "leadership"])
def test_the_enclave_alone_brings_its_defaults(tmp_path: Path, enclave: str) -> None:
    """`enclave: X` and nothing else: the profile's template, token lifetime, MFA, limits."""
    path = tmp_path / "beamhub.yaml"
    path.write_text(f"enclave: {enclave}\n")
    dep = load_deployment(path)
    profile = load_profile(enclave)
    assert dep.dsn_template == profile.dsn_template
    assert dep.tokens.ttl <= profile.max_token_ttl and dep.max_token_ttl == profile.max_token_ttl
    assert dep.mfa_required is profile.mfa_required
    failed = {r.name for r in check_deployment(dep, profile) if not r.ok}
    assert failed <= {"identity", "tenancy"}, failed  # what beamhub up / check decide at start
    # and a stricter setting is welcome
    path.write_text(f"enclave: {enclave}\ntokens: {{ttl: 60}}\n")
    assert load_deployment(path).tokens.ttl == 60


def test_bad_enclave_and_bad_deployment_are_reported(tmp_path: Path) -> None:
    res = beamhub_check("--enclave", "secret", "beamhub.yaml")
    assert res.returncode == 2 and "unknown enclave 'secret'" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("enclave: dev\ntokens: {ttl: -5}\n")
    res = beamhub_check("--enclave", "moderate", str(bad))
    assert res.returncode == 2 and "tokens.ttl" in res.stderr


def good_profile(**kw) -> dict:
    doc = yaml.safe_load((REPO / "hub" / "enclaves" / "moderate.yaml").read_text())
    doc.update(kw)
    return doc


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"mfa_required": "yes"}, "'mfa_required'"),
        ({"max_token_ttl": 5}, "'max_token_ttl'"),
        ({"dsn_modes": ["l5"]}, "'dsn_modes'"),
        ({"audit_fsync": "sometimes"}, "'audit_fsync'"),
        (
            {
                "rate_limits": {
                    "per_token": {"rate": 1, "burst": 0},
                    "per_project": {"rate": 1, "burst": 1},
                }
            },
            "rate_limits.per_token",
        ),
        ({"qos_tiers": []}, "'qos_tiers'"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_profile_validation_names_the_field(change: dict, needle: str) -> None:
    with pytest.raises(EnclaveError) as info:
        parse_profile(good_profile(**change), "p.yaml")
    assert needle in str(info.value) and "p.yaml" in str(info.value)


def test_check_says_a_deployment_running_everyone_as_one_account_is_not_isolated(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "beamhub.yaml"
    cfg.write_text("enclave: dev\ntenancy: {run_as: self}\n")
    r = beamhub_check("--enclave", "moderate", "--json", str(cfg))
    rows = {row["name"]: row for row in json.loads(r.stdout)["requirements"]}
    assert rows["tenancy"]["ok"] is False and "not isolated" in rows["tenancy"]["actual"]
    assert "as root" in rows["tenancy"]["fix"]
    r = beamhub_check("--enclave", "dev", "--json", str(cfg))  # dev may: said, not failed
    rows = {row["name"]: row for row in json.loads(r.stdout)["requirements"]}
    assert rows["tenancy"]["ok"] is True and "not isolated" in rows["tenancy"]["actual"]
