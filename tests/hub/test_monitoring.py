"""Monitoring: a real `beamhub up` with a real Prometheus (Debian's) that scrapes every service with
up == 1, and fires ServiceDown when a service is killed. The generated rules pass promtool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from beamhub.hub.up.deployment import DeploymentError, MonitoringConfig, load_deployment
from beamhub.hub.up.monitoring import alert_rules, scrape_config, targets
from tests.hub.hubstack import RunningStack, login, service_dir

pytestmark = pytest.mark.timeout(240)

#: every service `beamhub up` runs that serves metrics, plus the proxy's path to the hub
JOBS = {"dsn", "jupyterhub", "proxy", "tokens", "gateway", "dashboard", "prometheus"}

YAML = """\
enclave: dev
hub: {port: 0}
detector: {rate_hz: 5, shape: [32, 32], print_every_s: 0}
monitoring: {enabled: true, scrape_interval_s: 1, down_after_s: 2}
"""


def _no_prometheus() -> str:
    import shutil

    return "" if shutil.which("prometheus") and shutil.which("promtool") else "no prometheus"


needs_prometheus = pytest.mark.skipif(
    bool(_no_prometheus()), reason="Debian package prometheus not installed"
)


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        ("monitoring: {port: 70000}\n", "monitoring.port", "65535"),
        ("monitoring: {scrape_interval_s: 0.1}\n", "monitoring.scrape_interval_s", "1..3600"),
        ("monitoring: {down_after_s: -1}\n", "monitoring.down_after_s", "0..86400"),
        (
            "monitoring: {beamtime_start_target_s: 0}\n",
            "monitoring.beamtime_start_target_s",
            "positive",
        ),
        (
            "monitoring: {enabled: true, binary: no-such-prom}\n",
            "monitoring.binary",
            "apt-get install prometheus",
        ),
        ("monitoring: {scrape: 1}\n", "monitoring.scrape", "unknown key"),
    ],
)
def test_bad_monitoring_field_is_named(tmp_path: Path, text: str, field: str, words: str) -> None:
    path = tmp_path / "beamhub.yaml"
    path.write_text(text)
    with pytest.raises(DeploymentError) as err:
        load_deployment(path)
    assert err.value.field == field
    assert words in str(err.value)


@needs_prometheus
def test_generated_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    import yaml

    dep = load_deployment(None)
    ports = dict.fromkeys(("hub", "public", "tokens", "dsn", "gateway", "dashboard"), 1)
    ports["prometheus"] = 2
    jobs = targets(dep, ports)
    assert {t.job for t in jobs} == JOBS
    mon = MonitoringConfig(enabled=True, down_after_s=45, beamtime_start_target_s=20)
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(alert_rules(mon)))
    (tmp_path / "hub-metrics-token").write_text("x")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(mon, jobs, tmp_path)))
    for what, path in (("rules", rules), ("config", config)):
        check = subprocess.run(
            ["promtool", "check", what, str(path)], capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0, check.stdout + check.stderr
    by_name = {r["alert"]: r for r in alert_rules(mon)["groups"][0]["rules"]}
    assert by_name["ServiceDown"]["for"] == "45s"
    assert by_name["BeamtimeStartSlow"]["expr"].endswith("> 20")
    assert 'role="work"' in by_name["DsnWorkStreamLoss"]["expr"]


@pytest.fixture(scope="module")
def stack() -> Iterator[RunningStack]:
    running = RunningStack(service_dir("monitoring"), YAML, "monitoring").start()
    try:
        yield running
    finally:
        running.stop_and_check()


def _api(stack: RunningStack, path: str, **params: str) -> dict:
    r = requests.get(stack.urls["prometheus"] + "api/v1/" + path, params=params, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]


def _wait(what: str, check, timeout: float = 40.0, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not within {timeout} s; last: {last!r}")


def _service_pid(stack: RunningStack, name: str) -> int | None:
    status = json.loads((stack.state / "status.json").read_text())
    return status["services"][name]["pid"]


@needs_prometheus
def test_prometheus_scrapes_every_service_and_alerts_when_one_dies(stack: RunningStack) -> None:
    def all_up() -> dict[str, float] | None:
        result = _api(stack, "query", query="up")["result"]
        ups = {r["metric"]["job"]: float(r["value"][1]) for r in result}
        return ups if set(ups) == JOBS and all(v == 1 for v in ups.values()) else None

    ups = _wait("every target up == 1", all_up)
    assert set(ups) == JOBS
    targets_now = _api(stack, "targets")["activeTargets"]
    assert {t["labels"]["job"] for t in targets_now if t["health"] == "up"} == JOBS

    # what each service says reaches Prometheus: the detector's frames through the DSN, the
    # tokens the services minted, JupyterHub's own metrics through the proxy and directly
    def value(query: str) -> float:
        result = _api(stack, "query", query=query)["result"]
        return sum(float(r["value"][1]) for r in result)

    # (no work consumer: the detector's channel drops for it, and feeds the dashboard's monitor)
    _wait("DSN monitor frames", lambda: value("beamhub_dsn_monitor_frames_total") > 0)
    assert value("beamhub_tokens_issued_total") >= 1
    assert value('jupyterhub_total_users{job="jupyterhub"}') >= 0
    assert _api(stack, "query", query='count(jupyterhub_running_servers{job="proxy"})')["result"]
    # a refusal of the token service is counted by its reason; the scheduler's families are in
    # JupyterHub's /hub/metrics (read with the scraper's token, which may read nothing else)
    ip = stack.runtime["ip"]
    tokens_port = stack.runtime["services"]["tokens"]["port"]
    refused = requests.post(f"{stack.tokens}api/tokens", json={}, timeout=10)
    assert refused.status_code == 401
    # bob mints a token for his DAQ, is refused one in a project he has no role in, revokes his
    assert login(stack, "bob", "bob-dev")[1].status_code == 200
    bob = {"Authorization": f"token {stack.user_api_token('bob')}"}
    mint = stack.tokens + "api/tokens"
    minted = requests.post(mint, headers=bob, json={"project": "p-1001"}, timeout=10)
    assert minted.status_code == 201, minted.text
    assert (
        requests.post(mint, headers=bob, json={"project": "p-2002"}, timeout=10).status_code == 403
    )
    revoke = {"jti": minted.json()["jti"]}
    revoked = requests.post(stack.tokens + "revoke", headers=bob, json=revoke, timeout=10)
    assert revoked.status_code == 200, revoked.text
    direct = f"http://{ip}:{tokens_port}/services/tokens/metrics"
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(requests.get(direct, timeout=10).text)
        for s in f.samples
    }
    refused = "beamhub_tokens_refused_total"
    assert got[(refused, (("endpoint", "mint"), ("reason", "unauthenticated")))] == 1
    assert got[(refused, (("endpoint", "mint"), ("reason", "no_role")))] == 1
    assert got[("beamhub_tokens_issued_total", (("kind", "user"),))] == 1
    assert got[("beamhub_tokens_revoked_total", ())] == 1
    assert got[("beamhub_tokens_issued_total", (("kind", "service"),))] >= 1  # dashboard, detector
    # through the proxy from elsewhere (the proxy appends the peer it saw): a token is needed
    remote = {"X-Forwarded-For": "203.0.113.9"}
    assert requests.get(f"{stack.tokens}metrics", headers=remote, timeout=10).status_code == 401
    scraper = (stack.state / "prometheus" / "hub-metrics-token").read_text().strip()
    hub_metrics = requests.get(
        f"http://{ip}:{stack.runtime['hub_port']}/hub/metrics",
        headers={"Authorization": f"token {scraper}"},
        timeout=10,
    )
    assert hub_metrics.status_code == 200
    assert "# TYPE beamhub_scheduler_time_to_start_seconds histogram" in hub_metrics.text
    users = requests.get(
        f"{stack.hub}api/users", headers={"Authorization": f"token {scraper}"}, timeout=10
    )
    assert users.status_code == 403  # read:metrics only
    rules = {r["name"] for g in _api(stack, "rules")["groups"] for r in g["rules"]}
    assert rules == {"ServiceDown", "DsnWorkStreamLoss", "BeamtimeStartSlow"}

    # Prometheus runs as its own account, its TSDB in the state dir
    prom = psutil.Process(_service_pid(stack, "prometheus"))
    if os.geteuid() == 0:
        assert prom.username() == "beamhub-prometheus"
    assert (stack.state / "prometheus" / "data").is_dir()

    # kill the dashboard (again each time the supervisor brings it back) until the alert fires
    def firing() -> list[dict] | None:
        pid = _service_pid(stack, "dashboard")
        if pid:
            os.kill(pid, signal.SIGKILL)
        alerts = _api(stack, "alerts")["alerts"]
        hits = [
            a
            for a in alerts
            if a["labels"]["alertname"] == "ServiceDown"
            and a["labels"]["job"] == "dashboard"
            and a["state"] == "firing"
        ]
        return hits or None

    hits = _wait("ServiceDown firing for the dashboard", firing, timeout=60, interval=0.3)
    assert hits[0]["labels"]["severity"] == "page"
    assert "dashboard is down" in hits[0]["annotations"]["summary"]
    # once back, the dashboard is scraped again
    _wait("the dashboard up again", lambda: value('up{job="dashboard"}') == 1, timeout=60)


@needs_prometheus
def test_alert_rules_fire_on_synthetic_series(tmp_path: Path) -> None:
    """`promtool test rules`: each alert fires on the series that should fire it, and not before
    (DSN loss in a work stream; beamtime p90 time-to-start over its target; a target down)."""
    import yaml

    mon = MonitoringConfig(down_after_s=30, beamtime_start_target_s=60)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(alert_rules(mon)))
    loss = 'beamhub_dsn_lost_frames_total{channel="ch-1",project="p-1",stream="det",role="work"}'
    viewers = loss.replace('role="work"', 'role="monitor"')
    bucket = 'beamhub_scheduler_time_to_start_seconds_bucket{tier="beamtime",le="%s"}'
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    {"series": 'up{job="dashboard",instance="x"}', "values": "1 1 0 0 0 0 0"},
                    {"series": loss, "values": "0 0 0 0 5 5 5"},
                    # a monitor (a viewer that may skip) losing frames is no page
                    {"series": viewers, "values": "0 9 18 27 36 45 54"},
                    # 10 beamtime starts a minute, all slower than 60 s (between 60 and 120 s)
                    {"series": bucket % "60", "values": "0+0x20"},
                    {"series": bucket % "120", "values": "0+10x20"},
                    {"series": bucket % "+Inf", "values": "0+10x20"},
                ],
                "alert_rule_test": [
                    {"eval_time": "30s", "alertname": "ServiceDown", "exp_alerts": []},
                    {
                        "eval_time": "75s",
                        "alertname": "ServiceDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "page",
                                    "job": "dashboard",
                                    "instance": "x",
                                },
                                "exp_annotations": {
                                    "summary": "dashboard is down",
                                    "description": "Prometheus could not scrape dashboard (x) "
                                    "for over 30 s; see `beamhub status` and its log in "
                                    "<state_dir>/logs/.",
                                },
                            }
                        ],
                    },
                    {"eval_time": "45s", "alertname": "DsnWorkStreamLoss", "exp_alerts": []},
                    {
                        "eval_time": "75s",
                        "alertname": "DsnWorkStreamLoss",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "page",
                                    "channel": "ch-1",
                                    "project": "p-1",
                                    "stream": "det",
                                    "role": "work",
                                },
                                "exp_annotations": {
                                    "summary": "frames lost on channel ch-1",
                                    "description": "a work consumer of p-1/det saw 5 frames "
                                    "missing in 5 minutes",
                                },
                            }
                        ],
                    },
                    {
                        "eval_time": "5m",
                        "alertname": "BeamtimeStartSlow",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "ticket"},
                                "exp_annotations": {
                                    # p90 of starts between 60 and 120 s, interpolated
                                    "summary": "beamtime jobs start slower than their target",
                                    "description": "p90 time-to-start of the beamtime tier over "
                                    "the last hour is 114 s; the target is 60 s "
                                    "(monitoring.beamtime_start_target_s)",
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    fast = {  # beamtime starts within 60 s: no alert
        "interval": "15s",
        "input_series": [
            {"series": bucket % "30", "values": "0+10x20"},
            {"series": bucket % "60", "values": "0+10x20"},
            {"series": bucket % "+Inf", "values": "0+10x20"},
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "BeamtimeStartSlow", "exp_alerts": []},
        ],
    }
    tests["tests"].append(fast)
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    run = subprocess.run(
        ["promtool", "test", "rules", "tests.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
