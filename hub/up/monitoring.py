"""A real Prometheus under `beamhub up`: one more supervised service, scraping every service.

With ``monitoring: {enabled: true}`` in beamhub.yaml, `beamhub up` writes a scrape configuration
and alert rules into ``$STATE/prometheus/`` and runs Debian's ``prometheus`` there, on 127.0.0.1
only, as its own account (``beamhub-prometheus`` as root; its TSDB in ``$STATE/prometheus/data``).
It scrapes each service directly on loopback (the services answer ``/metrics`` to this host
without a token, see :mod:`beamhub.auth.metrics`), JupyterHub's own ``/hub/metrics`` (which the
scheduler's metrics join, :mod:`beamhub.kernels.metrics`) with a JupyterHub service token that
holds ``read:metrics`` only, and the same through the public proxy (job ``proxy``: up while the
proxy routes to the hub). The identity provider (a dev stand-in) and the simulated detector serve
no metrics; the DSN's channel counters show the detector's stream.

Alerts (``rules.yml``): ``ServiceDown`` (a target down longer than ``down_after_s``),
``DsnWorkStreamLoss`` (a work consumer saw frames missing in the last 5 minutes), and
``BeamtimeStartSlow`` (p90 time-to-start of the beamtime tier over the last hour above
``beamtime_start_target_s``). :func:`start` is the one call `beamhub up` makes
(:mod:`beamhub.hub.up.stack`), after the ports are chosen and before JupyterHub starts, because
the hub must know the scraper's token when it starts.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from beamhub.hub.up.deployment import Deployment, MonitoringConfig

#: The `beamhub up` stack (:class:`beamhub.hub.up.stack.Stack`, which imports this module).
Stack = Any

__all__ = [
    "HUB_METRICS_SERVICE",
    "MonitoringError",
    "Target",
    "alert_rules",
    "hub_metrics_token_path",
    "scrape_config",
    "start",
    "targets",
]

#: The JupyterHub service whose token reads /hub/metrics (jupyterhub_config.py registers it).
HUB_METRICS_SERVICE = "beamhub-metrics"
SERVICE = "prometheus"


class MonitoringError(RuntimeError):
    """The monitoring could not be set up; the message says what to do."""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _any_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - our loopback URL
            return 200 <= resp.status < 300
    except OSError:
        return False


@dataclass(frozen=True)
class Target:
    """One scrape job: ``job`` name, ``host:port``, metrics path, and whether it needs the
    hub-metrics token."""

    job: str
    address: str
    path: str
    hub_token: bool = False


def hub_metrics_token_path(state: Path) -> Path:
    """Where the hub's config finds the scraper's token (root's, in the hub's folder)."""
    return Path(state) / "hub" / "metrics-token"


def _seconds(value: float) -> str:
    """A Prometheus duration: whole seconds, or milliseconds below one."""
    return (
        f"{round(value)}s" if value >= 1 and value == round(value) else f"{round(value * 1000)}ms"
    )


def targets(dep: Deployment, ports: dict[str, int]) -> list[Target]:
    """What Prometheus scrapes under this deployment (services that are enabled only)."""
    ip = dep.hub.ip
    host = f"[{ip}]" if ":" in ip else ip
    out = [
        Target("jupyterhub", f"{host}:{ports['hub']}", "/hub/metrics", hub_token=True),
        Target("proxy", f"{host}:{ports['public']}", "/hub/metrics", hub_token=True),
        Target("tokens", f"{host}:{ports['tokens']}", "/services/tokens/metrics"),
    ]
    if dep.dsn.enabled:
        out.insert(0, Target("dsn", f"{host}:{ports['dsn']}", "/metrics"))
    if dep.gateway.enabled:
        out.append(Target("gateway", f"{host}:{ports['gateway']}", "/services/gateway/metrics"))
    if dep.dashboard.enabled and dep.dsn.enabled:
        out.append(
            Target("dashboard", f"{host}:{ports['dashboard']}", "/services/dashboard/metrics")
        )
    out.append(Target(SERVICE, f"127.0.0.1:{ports[SERVICE]}", "/metrics"))
    return out


def scrape_config(mon: MonitoringConfig, jobs: list[Target], folder: Path) -> dict[str, Any]:
    """prometheus.yml: one job per target, the rules file beside it."""
    interval = _seconds(mon.scrape_interval_s)
    configs = []
    for t in jobs:
        job: dict[str, Any] = {
            "job_name": t.job,
            "metrics_path": t.path,
            "static_configs": [{"targets": [t.address], "labels": {"service": t.job}}],
        }
        if t.hub_token:
            job["authorization"] = {
                "type": "token",  # JupyterHub reads "Authorization: token <api token>"
                "credentials_file": str(folder / "hub-metrics-token"),
            }
        configs.append(job)
    return {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": _seconds(min(mon.scrape_interval_s, 10.0)),
            "evaluation_interval": interval,
            "external_labels": {"deployment": "beamhub"},
        },
        "rule_files": [str(folder / "rules.yml")],
        "scrape_configs": configs,
    }


def alert_rules(mon: MonitoringConfig) -> dict[str, Any]:
    """rules.yml: the service levels beamhub promises, as alerts."""
    return {
        "groups": [
            {
                "name": "beamhub",
                "rules": [
                    {
                        "alert": "ServiceDown",
                        "expr": "up == 0",
                        "for": _seconds(mon.down_after_s) if mon.down_after_s else "0s",
                        "labels": {"severity": "page"},
                        "annotations": {
                            "summary": "{{ $labels.job }} is down",
                            "description": "Prometheus could not scrape {{ $labels.job }} "
                            f"({{{{ $labels.instance }}}}) for over {mon.down_after_s:g} s; "
                            "see `beamhub status` and its log in <state_dir>/logs/.",
                        },
                    },
                    {
                        "alert": "DsnWorkStreamLoss",
                        "expr": 'increase(beamhub_dsn_lost_frames_total{role="work"}[5m]) > 0',
                        "labels": {"severity": "page"},
                        "annotations": {
                            "summary": "frames lost on channel {{ $labels.channel }}",
                            "description": "a work consumer of {{ $labels.project }}/"
                            "{{ $labels.stream }} saw {{ $value }} frames missing in 5 minutes",
                        },
                    },
                    {
                        "alert": "BeamtimeStartSlow",
                        "expr": "histogram_quantile(0.9, sum by (le) (rate("
                        'beamhub_scheduler_time_to_start_seconds_bucket{tier="beamtime"}[1h])))'
                        f" > {mon.beamtime_start_target_s:g}",
                        "labels": {"severity": "ticket"},
                        "annotations": {
                            "summary": "beamtime jobs start slower than their target",
                            "description": "p90 time-to-start of the beamtime tier over the "
                            "last hour is {{ $value }} s; the target is "
                            f"{mon.beamtime_start_target_s:g} s (monitoring."
                            "beamtime_start_target_s)",
                        },
                    },
                ],
            }
        ]
    }


def _hub_token(state: Path, enabled: bool) -> str | None:
    """The scraper's JupyterHub token: created once; removed when monitoring is off, so the hub
    registers no such service then."""
    path = hub_metrics_token_path(state)
    if not enabled:
        path.unlink(missing_ok=True)
        return None
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def _choose_port(stack: Stack, mon: MonitoringConfig) -> int:
    path = stack.state / "ports.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if mon.port:
        port = mon.port
    elif saved.get(SERVICE) and _port_free(saved[SERVICE]):
        port = saved[SERVICE]
    else:
        port = _any_port()
    stack.ports[SERVICE] = port
    path.write_text(json.dumps(stack.ports, indent=2))
    return port


def write_files(stack: Stack, token: str) -> Path:
    """prometheus.yml, rules.yml and the token file in ``$STATE/prometheus/``; checked with
    promtool when it is installed. Returns the config's path."""
    mon, folder = stack.dep.monitoring, stack.accounts.folder(SERVICE)
    folder.mkdir(mode=0o700, exist_ok=True)
    files = {
        "hub-metrics-token": token,
        "rules.yml": yaml.safe_dump(alert_rules(mon), sort_keys=False),
        "prometheus.yml": yaml.safe_dump(
            scrape_config(mon, targets(stack.dep, stack.ports), folder), sort_keys=False
        ),
    }
    for name, text in files.items():
        path = folder / name
        path.write_text(text)
        stack.accounts.give(SERVICE, path)
    promtool = Path(mon.binary).with_name("promtool") if "/" in mon.binary else Path("promtool")
    try:
        check = subprocess.run(
            [str(promtool), "check", "config", str(folder / "prometheus.yml")],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError:
        return folder / "prometheus.yml"
    if check.returncode != 0:
        raise MonitoringError(
            f"monitoring: the generated {folder / 'prometheus.yml'} fails `promtool check "
            f"config`: {(check.stdout + check.stderr).strip()[-800:]}"
        )
    return folder / "prometheus.yml"


async def start(stack: Stack) -> None:
    """Write the files and start Prometheus as a supervised service (nothing when disabled)."""
    mon = stack.dep.monitoring
    token = _hub_token(stack.state, mon.enabled)
    if token is None:
        return
    port = _choose_port(stack, mon)
    config = write_files(stack, token)
    folder = config.parent
    url = f"http://127.0.0.1:{port}"
    argv = [
        mon.binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--storage.tsdb.retention.time={mon.retention_days}d",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--web.external-url={url}/",
        "--log.level=warn",
    ]
    stack.progress(f"beamhub up: Prometheus on {url}/ (monitoring: in beamhub.yaml) ...")
    await stack._start(SERVICE, argv, ready=lambda: _answers(f"{url}/-/ready"), cwd=folder)
    stack.urls[SERVICE] = f"{url}/"
    stack.notes.append(
        f"Prometheus {url}/ scrapes {len(targets(stack.dep, stack.ports))} targets every "
        f"{mon.scrape_interval_s:g} s; alerts: {url}/alerts"
    )
