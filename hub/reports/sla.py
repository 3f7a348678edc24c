"""Service levels: each service's uptime and each tier's time-to-start, against beamhub.yaml's
``service_levels`` targets.

Two sources, and the report names the one it used. With Prometheus running under `beamhub up`
(``monitoring.enabled``), uptime is ``avg_over_time(up[period])`` per scrape job and
time-to-start the p50/p90/p99 of the scheduler's histogram (estimates interpolated inside its
buckets). Without it, uptime comes from the supervisor's ``service-events.jsonl`` (a line each
time a service comes up, goes down unasked or is stopped): up time / (up + down time), where time
after a stop, or after `beamhub up` itself ended without one, counts as neither; and
time-to-start from the scheduler's job records, exact.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from beamhub.hub.reports.allocation import PERCENTILES, overlap

__all__ = [
    "PUBLIC_SPANS",
    "ServiceUptime",
    "prometheus_time_to_start",
    "prometheus_uptime",
    "public_uptime",
    "read_events",
    "sla_report",
    "uptime_from_events",
]

ServiceUptime = dict[str, Any]


def read_events(path: Path) -> list[dict[str, Any]]:
    """The supervisor's event lines; a torn last line (a crash mid-write) is skipped."""
    events = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and {"time", "service", "event"} <= event.keys():
            events.append(event)
    return events


def _uptime(up: float, down: float) -> dict[str, Any]:
    observed = up + down
    return {
        "uptime_pct": round(100.0 * up / observed, 4) if observed > 0 else None,
        "up_s": round(up, 3),
        "down_s": round(down, 3),
        "observed_s": round(observed, 3),
    }


def uptime_from_events(
    events: Iterable[Mapping[str, Any]], since: float, until: float, running: bool
) -> dict[str, ServiceUptime]:
    """Per service: seconds up and down within [since, until). ``running``: `beamhub up` is
    running now, so each service's last state lasts until ``until``."""
    by_service: dict[str, list[Mapping[str, Any]]] = {}
    for event in sorted(events, key=lambda e: e["time"]):
        by_service.setdefault(event["service"], []).append(event)
    result = {}
    for service, items in sorted(by_service.items()):
        totals = {"up": 0.0, "down": 0.0}
        state, last = None, None
        for event in items:
            if state in totals and last is not None:
                totals[state] += overlap(last, event["time"], since, until)
            state = event["event"] if event["event"] in totals else None
            last = event["time"]
        if running and state in totals and last is not None:
            totals[state] += overlap(last, until, since, until)
        result[service] = _uptime(totals["up"], totals["down"])
    return result


def _query(base: str, promql: str, at: float, timeout: float = 10.0) -> list[dict[str, Any]]:
    url = (
        base.rstrip("/")
        + "/api/v1/query?"
        + urllib.parse.urlencode({"query": promql, "time": f"{at:.3f}"})
    )
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback URL)
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {promql!r}: {body.get('error')}")
    return body["data"]["result"]


def _range(since: float, until: float) -> str:
    return f"{max(1, round(until - since))}s"


def prometheus_uptime(base: str, since: float, until: float) -> dict[str, ServiceUptime]:
    """Per scrape job: the share of scrapes in the period that found the service up."""
    span = _range(since, until)
    up = _query(base, f"avg by (job) (avg_over_time(up[{span}]))", until)
    samples = {
        r["metric"].get("job", "?"): float(r["value"][1])
        for r in _query(base, f"sum by (job) (count_over_time(up[{span}]))", until)
    }
    result = {}
    for r in up:
        job = r["metric"].get("job", "?")
        result[job] = {
            "uptime_pct": round(100.0 * float(r["value"][1]), 4),
            "scrapes": int(samples.get(job, 0)),
        }
    return dict(sorted(result.items()))


def prometheus_time_to_start(base: str, since: float, until: float) -> dict[str, Any]:
    """Per tier: jobs started in the period and the histogram's p50/p90/p99 estimates."""
    span = _range(since, until)
    metric = "beamhub_scheduler_time_to_start_seconds"
    counts = {
        r["metric"].get("tier", "?"): float(r["value"][1])
        for r in _query(base, f"sum by (tier) (increase({metric}_count[{span}]))", until)
    }
    result: dict[str, Any] = {
        tier: {"jobs": round(n)} for tier, n in sorted(counts.items()) if n > 0
    }
    for p in PERCENTILES:
        promql = (
            f"histogram_quantile({p / 100}, sum by (le, tier) (increase({metric}_bucket[{span}])))"
        )
        for r in _query(base, promql, until):
            tier = r["metric"].get("tier", "?")
            value = float(r["value"][1])
            if tier in result and value == value:  # NaN: no observation
                result[tier][f"p{p}_s"] = round(value, 3)
    return result


def sla_report(
    uptime: Mapping[str, ServiceUptime],
    time_to_start: Mapping[str, Mapping[str, Any]],
    uptime_target_pct: float,
    start_targets_p90_s: Mapping[str, float],
    since: float,
    until: float | None = None,
    sources: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The measured levels next to their targets; ``met`` is None where nothing was measured."""
    until = time.time() if until is None else until
    services = []
    for name, measured in uptime.items():
        pct = measured.get("uptime_pct")
        services.append(
            {
                "service": name,
                **measured,
                "target_pct": uptime_target_pct,
                "met": None if pct is None else pct >= uptime_target_pct,
            }
        )
    tiers = {}
    for tier in sorted(set(time_to_start) | set(start_targets_p90_s)):
        measured = dict(time_to_start.get(tier, {"jobs": 0}))
        target = start_targets_p90_s.get(tier)
        p90 = measured.get("p90_s")
        measured["target_p90_s"] = target
        measured["met"] = None if target is None or p90 is None else p90 <= target
        tiers[tier] = measured
    verdicts = [s["met"] for s in services] + [t["met"] for t in tiers.values()]
    return {
        "since": since,
        "until": until,
        "sources": dict(sources or {}),
        "services": services,
        "time_to_start": tiers,
        # None: nothing measured to hold against a target (no record in the period yet)
        "met": None if all(v is None for v in verdicts) else all(v is not False for v in verdicts),
    }


#: The spans the gateway's public status shows each service's uptime over.
PUBLIC_SPANS = {"24h": 86400.0, "7d": 7 * 86400.0}


def public_uptime(state_dir: Path | None, now: float | None = None) -> dict[str, Any] | None:
    """Each service's uptime over the last 24 h and 7 d from the supervisor's records, for the
    gateway's public status (which runs under `beamhub up`, so the last state lasts until now).
    None without a state folder; a service never recorded in a span has ``None`` there."""
    if state_dir is None:
        return None
    from beamhub.hub.up.supervisor import EVENTS_FILE

    now = time.time() if now is None else now
    events = read_events(Path(state_dir) / EVENTS_FILE)
    spans = {
        label: uptime_from_events(events, now - seconds, now, running=True)
        for label, seconds in PUBLIC_SPANS.items()
    }
    names = sorted({name for measured in spans.values() for name in measured})
    return {
        name: {label: spans[label].get(name, {}).get("uptime_pct") for label in PUBLIC_SPANS}
        for name in names
    }
