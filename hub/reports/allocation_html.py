"""The allocation report as one self-contained HTML page with bokeh plots (resources inline, so
it opens offline and the dashboard serves it as one file)."""

from __future__ import annotations

import html
import time
from typing import Any

from bokeh.embed import file_html
from bokeh.layouts import column
from bokeh.models import ColumnDataSource, Div
from bokeh.plotting import figure
from bokeh.resources import INLINE

__all__ = ["allocation_html"]

PARTS = (("used", "#1f77b4"), ("lent", "#2ca02c"), ("idle", "#d62728"))


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def _windows_plot(report: dict[str, Any]) -> Any:
    labels = [f"#{w['id']} {w['project']}" for w in report["windows"]]
    data: dict[str, list] = {"window": labels}
    for part, _ in PARTS:
        data[part] = [w[f"{part}_node_hours"] for w in report["windows"]]
    data["preempted"] = [w["preempted_node_hours"] for w in report["windows"]]
    fig = figure(
        x_range=labels or ["(no window)"],
        height=320,
        width=720,
        title="Beamtime windows: reserved node-hours used, lent to other work, idle",
        y_axis_label="node-hours",
        tools="save",
    )
    fig.vbar_stack(
        [p for p, _ in PARTS],
        x="window",
        width=0.6,
        color=[c for _, c in PARTS],
        source=ColumnDataSource(data),
        legend_label=[p for p, _ in PARTS],
    )
    fig.legend.location = "top_left"
    return fig


def _usage_plot(report: dict[str, Any]) -> Any:
    labels = [f"{u['project']} / {u['tier']}" for u in report["usage"]]
    fig = figure(
        y_range=list(reversed(labels)) or ["(no jobs)"],
        height=max(200, 40 * len(labels) + 80),
        width=720,
        title="Node-hours used per project and tier",
        x_axis_label="node-hours",
        tools="save",
    )
    fig.hbar(
        y=labels,
        right=[u["node_hours"] for u in report["usage"]],
        height=0.6,
        color="#1f77b4",
    )
    return fig


def _start_plot(report: dict[str, Any]) -> Any:
    tiers = list(report["time_to_start"])
    fig = figure(
        x_range=tiers or ["(no starts)"],
        height=300,
        width=720,
        title="Time to start by tier (p50, p90, p99)",
        y_axis_label="seconds",
        tools="save",
    )
    for p, color in (("p50_s", "#1f77b4"), ("p90_s", "#ff7f0e"), ("p99_s", "#d62728")):
        values = [report["time_to_start"][t][p] for t in tiers]
        fig.scatter(tiers, values, size=10, color=color, legend_label=p[:-2])
    fig.legend.location = "top_left"
    return fig


def allocation_html(report: dict[str, Any]) -> str:
    """The page: a summary line, the three plots, the windows as a table."""
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(v))}</td>"
            for v in (
                w["id"],
                w["project"],
                w["tier"],
                _when(w["start"]),
                _when(w["end"]),
                w["reserved_node_hours"],
                w["used_node_hours"],
                w["lent_node_hours"],
                w["idle_node_hours"],
                w["preempted_node_hours"],
                w["requeued_node_hours"],
            )
        )
        + "</tr>"
        for w in report["windows"]
    )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "window",
            "project",
            "tier",
            "start",
            "end",
            "reserved",
            "used",
            "lent",
            "idle",
            "preempted",
            "requeued",
        )
    )
    summary = Div(
        text=(
            f"<h1>beamhub allocation report</h1><p>{_when(report['since'])} to "
            f"{_when(report['until'])}; source: {html.escape(report['source'])}; node-hours "
            "unless named.</p>"
            f"<table border='1' cellpadding='4'><tr>{head}</tr>{rows}</table>"
        ),
        width=720,
    )
    layout = column(summary, _windows_plot(report), _usage_plot(report), _start_plot(report))
    return file_html(layout, INLINE, title="beamhub allocation report")
