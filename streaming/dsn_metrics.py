"""The DSN's Prometheus metrics, read from the data plane's live counters at each scrape.

Nothing is counted twice: the data plane already keeps frames, bytes, drops by reason and each
consumer's lag and loss (``DataPlane.stats``); a scrape asks it for every channel (on the
data-plane thread, like the control API does) and writes them out with Prometheus names. Labels
are the channel, its project and stream and, for consumers, their role (``work``: the analysis
that must see every frame, ``monitor``: viewers that may skip) -- never a consumer's id, whose
number is unbounded. The alert "DSN loss in a work stream" reads
``beamhub_dsn_lost_frames_total{role="work"}``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from beamhub.streaming.controlplane import FAILED, ControlPlane

__all__ = ["render_metrics", "snapshot_metrics"]

log = logging.getLogger("beamhub.dsn.metrics")

_CHANNEL = ["channel", "project", "stream"]


class _Snapshot(Collector):
    """Metric families of one snapshot: ``channels`` maps a channel to (labels, stats or None)."""

    def __init__(self, channels: dict[str, tuple[list[str], dict | None, str]]) -> None:
        self.channels = channels

    def collect(self) -> Iterator[Metric]:
        per_state = GaugeMetricFamily(
            "beamhub_dsn_channels", "channels the DSN holds, by state", labels=["state"]
        )
        frames = CounterMetricFamily(
            "beamhub_dsn_frames", "frames (messages) forwarded by the channel", labels=_CHANNEL
        )
        data = CounterMetricFamily(
            "beamhub_dsn_bytes", "payload bytes forwarded by the channel", labels=_CHANNEL
        )
        drops = CounterMetricFamily(
            "beamhub_dsn_dropped_frames",
            "frames the channel dropped, by reason (malformed, rate, no consumer, ...)",
            labels=[*_CHANNEL, "reason"],
        )
        consumers = GaugeMetricFamily(
            "beamhub_dsn_consumers",
            "consumers reporting to the channel, by role",
            labels=[*_CHANNEL, "role"],
        )
        lag = GaugeMetricFamily(
            "beamhub_dsn_lag_frames",
            "largest lag of the channel's consumers of this role behind its head, in frames",
            labels=[*_CHANNEL, "role"],
        )
        lost = CounterMetricFamily(
            "beamhub_dsn_lost_frames",
            "frames the channel's consumers of this role saw missing (sequence gaps)",
            labels=[*_CHANNEL, "role"],
        )
        monitor = CounterMetricFamily(
            "beamhub_dsn_monitor_frames",
            "frames sent to the channel's monitor face (viewers, dashboards)",
            labels=_CHANNEL,
        )
        viewers = GaugeMetricFamily(
            "beamhub_dsn_monitor_viewers", "viewers of the channel's monitor face", labels=_CHANNEL
        )
        states: dict[str, int] = defaultdict(int)
        for labels, stats, state in self.channels.values():
            states[state] += 1
            if stats is None:
                continue
            frames.add_metric(labels, stats.get("messages") or 0)
            data.add_metric(labels, stats.get("bytes") or 0)
            for reason, n in sorted((stats.get("drops") or {}).items()):
                drops.add_metric([*labels, reason], n)
            roles: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for entry in (stats.get("consumers") or {}).values():
                roles[entry.get("role") or "work"].append(entry)
            for role in sorted(set(roles) | {"work"}):
                entries = roles.get(role, [])
                consumers.add_metric([*labels, role], len(entries))
                lags = [e["lag"] for e in entries if e.get("lag") is not None]
                lag.add_metric([*labels, role], max(lags) if lags else 0)
                lost.add_metric([*labels, role], sum(e.get("lost") or 0 for e in entries))
            mon = stats.get("monitor") or {}
            monitor.add_metric(labels, mon.get("sent") or 0)
            viewers.add_metric(labels, mon.get("viewers") or 0)
        for state in ("active", "failed"):
            per_state.add_metric([state], states.get(state, 0))
        yield from (per_state, frames, data, drops, consumers, lag, lost, monitor, viewers)


async def snapshot_metrics(node: ControlPlane) -> CollectorRegistry:
    """A registry holding the DSN's metrics now (one data-plane call per channel)."""
    channels: dict[str, tuple[list[str], dict | None, str]] = {}
    for channel in list(node.channels.values()):
        labels = [channel.id, channel.project, channel.params.stream]
        stats = None
        if channel.state != FAILED:
            try:
                stats = await node.run(node.data_plane.stats, channel.id)
            except KeyError:  # removed meanwhile
                continue
        channels[channel.id] = (labels, stats, channel.state)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(channels))
    return registry


async def render_metrics(node: ControlPlane) -> bytes:
    """The DSN's metrics in Prometheus text format."""
    return generate_latest(await snapshot_metrics(node))
