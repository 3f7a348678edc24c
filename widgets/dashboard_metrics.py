"""The shared dashboard's Prometheus metrics: who watches, and what it is subscribed to.

Read from :meth:`Dashboard.status` at each scrape (nothing is counted twice): per project the
open viewer pages and distinct users, its monitor subscriptions (one per channel, shared by all
viewers), and per channel the frames analysed and the monitor consumers open.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["DashboardCollector", "render_metrics"]


class DashboardCollector(Collector):
    """Metric families of a :class:`beamhub.widgets.dashboard.Dashboard` now."""

    def __init__(self, dashboard: Any) -> None:
        self.dashboard = dashboard

    def collect(self) -> Iterator[Metric]:
        status = self.dashboard.status(None)
        pages = GaugeMetricFamily(
            "beamhub_dashboard_viewers", "open viewer pages, by project", labels=["project"]
        )
        users = GaugeMetricFamily(
            "beamhub_dashboard_viewer_users",
            "distinct users viewing, by project",
            labels=["project"],
        )
        subs = GaugeMetricFamily(
            "beamhub_dashboard_subscriptions",
            "monitor subscriptions (one per channel, shared by its viewers), by project",
            labels=["project"],
        )
        frames = CounterMetricFamily(
            "beamhub_dashboard_frames_analysed",
            "frames the dashboard analysed, by channel",
            labels=["project", "channel", "stream"],
        )
        consumers = GaugeMetricFamily(
            "beamhub_dashboard_consumers_open",
            "monitor consumers the dashboard holds open, by channel",
            labels=["project", "channel", "stream"],
        )
        for project, entry in status["projects"].items():
            viewers = entry.get("viewers") or {}
            pages.add_metric([project], viewers.get("pages", 0))
            users.add_metric([project], len(viewers.get("users", [])))
            subs.add_metric([project], entry.get("subscriptions", 0))
            for channel, ch in (entry.get("channels") or {}).items():
                labels = [project, channel, ch.get("stream") or ""]
                frames.add_metric(labels, ch.get("frames_analysed") or 0)
                consumers.add_metric(labels, ch.get("consumers_open") or 0)
        total = GaugeMetricFamily(
            "beamhub_dashboard_subscriptions_all", "monitor subscriptions of every project"
        )
        total.add_metric([], status.get("subscriptions_total", 0))
        yield from (pages, users, subs, total, frames, consumers)


def render_metrics(dashboard: Any) -> bytes:
    """The dashboard's metrics in Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DashboardCollector(dashboard))
    return generate_latest(registry)
