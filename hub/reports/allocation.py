"""The allocation report: node-hours per project and tier, and what each beamtime window did.

A beamtime window elevates a project's jobs instead of fencing nodes off (kernels/reservations.py),
so the nodes a classic reservation would have held idle are lent to batch work and taken back by
preemption. This report puts numbers on that, per window: the node-hours a classic reservation
would have *reserved* (the window's length times the nodes its tier may hold, at most the
cluster's), those *used* by the project, those *lent* to other work, and those left *idle*; and
the work lost to preemption (a preempted run starts again from scratch when requeued).

Node-hours count nodes held, whatever share of a node's CPUs a job asked for (as SLURM counts an
exclusive node). Percentiles are nearest-rank: the smallest value with at least p % of the values
at or below it.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

from beamhub.hub.reports.records import JobRecord, RunRecord
from beamhub.kernels.reservations import Window
from beamhub.kernels.tiers import TierSet

__all__ = ["PERCENTILES", "allocation_report", "overlap", "percentile", "time_to_start"]

PERCENTILES = (50, 90, 99)
HOUR = 3600.0


def overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    """Seconds [a0, a1) and [b0, b1) share."""
    return max(0.0, min(a1, b1) - max(a0, b0))


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


def time_to_start(jobs: Iterable[JobRecord], since: float, until: float) -> dict[str, Any]:
    """Per tier: seconds from submission to first start of the jobs submitted in the period."""
    waits: dict[str, list[float]] = {}
    for job in jobs:
        start = job.first_start
        if job.submit is None or start is None or not since <= job.submit < until:
            continue
        waits.setdefault(job.tier, []).append(max(0.0, start - job.submit))
    return {
        tier: {
            "jobs": len(values),
            **{f"p{p}_s": _round(percentile(values, p), 3) for p in PERCENTILES},
            "max_s": _round(max(values), 3),
        }
        for tier, values in sorted(waits.items())
    }


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def _hours(seconds: float) -> float:
    return round(seconds / HOUR, 6)


def _usage(jobs: list[JobRecord], since: float, until: float) -> list[dict[str, Any]]:
    cells: dict[tuple[str, str], list[float]] = {}
    for job in jobs:
        seconds = sum(r.nodes * overlap(r.start, r.end, since, until) for r in job.runs)
        if seconds <= 0:
            continue
        cell = cells.setdefault((job.project, job.tier), [0.0, 0])
        cell[0] += seconds
        cell[1] += 1
    return [
        {"project": p, "tier": t, "node_hours": _hours(s), "jobs": int(n)}
        for (p, t), (s, n) in sorted(cells.items())
    ]


def _lost(runs: Iterable[RunRecord], start: float, end: float) -> dict[str, Any]:
    """Work lost to preemption: preempted runs that ended in [start, end), whole runs."""
    lost = [r for r in runs if r.preempted and start <= r.end < end]
    requeued = [r for r in lost if r.outcome == "requeued"]
    return {
        "preempted_runs": len(lost),
        "preempted_node_hours": _hours(sum(r.nodes * (r.end - r.start) for r in lost)),
        "requeued_runs": len(requeued),
        "requeued_node_hours": _hours(sum(r.nodes * (r.end - r.start) for r in requeued)),
    }


def _window(
    window: Window, jobs: list[JobRecord], reserved: int, since: float, until: float
) -> dict[str, Any]:
    """Sweep the window's clipped span: at each moment the project holds ``u`` nodes and other
    work ``o``; of the ``reserved`` nodes, min(u, reserved) are used, min(o, rest) lent, the rest
    idle."""
    start, end = max(window.start, since), min(window.end, until)
    runs = [(job, r) for job in jobs for r in job.runs if r.start < end and r.end > start]
    cuts = sorted({start, end, *(t for _, r in runs for t in (r.start, r.end) if start < t < end)})
    used = lent = 0.0
    lent_by_tier: dict[str, float] = {}
    for a, b in itertools.pairwise(cuts):
        here = [(job, r) for job, r in runs if r.start <= a and r.end >= b]
        mine = sum(r.nodes for job, r in here if job.project == window.project)
        others: dict[str, int] = {}
        for job, r in here:
            if job.project != window.project:
                others[job.tier] = others.get(job.tier, 0) + r.nodes
        take = min(mine, reserved)
        other = sum(others.values())
        give = min(other, reserved - take)
        used += take * (b - a)
        lent += give * (b - a)
        for tier, n in others.items():  # the lent share, split by how much each tier held
            lent_by_tier[tier] = lent_by_tier.get(tier, 0.0) + give * (b - a) * n / other
    span = max(0.0, end - start)
    in_window = [r for _, r in runs]
    return {
        "id": window.id,
        "project": window.project,
        "tier": window.tier,
        "start": window.start,
        "end": window.end,
        "counted_from": start,
        "counted_to": end,
        "reserved_nodes": reserved,
        "reserved_node_hours": _hours(reserved * span),
        "used_node_hours": _hours(used),
        "lent_node_hours": _hours(lent),
        "lent_by_tier": {t: _hours(s) for t, s in sorted(lent_by_tier.items())},
        "idle_node_hours": _hours(max(0.0, reserved * span - used - lent)),
        **_lost(in_window, start, end),
    }


def allocation_report(
    jobs: list[JobRecord],
    windows: list[Window],
    tiers: TierSet,
    since: float,
    until: float | None = None,
    nodes: int | None = None,
    source: str = "",
) -> dict[str, Any]:
    """The report as a JSON-ready dict (see the module docstring for what each number means).

    ``nodes``: the cluster's node count, which caps a window's reserved nodes (None: uncapped).
    """
    until = time.time() if until is None else until
    counted = [w for w in windows if w.status == "approved" and w.start < until and w.end > since]
    report_windows = []
    for w in counted:
        reserved = tiers.get(w.tier).max_nodes
        if nodes is not None:
            reserved = min(reserved, nodes)
        report_windows.append(_window(w, jobs, reserved, since, until))
    all_runs = [r for job in jobs for r in job.runs]
    return {
        "since": since,
        "until": until,
        "source": source,
        "nodes": nodes,
        "usage": _usage(jobs, since, until),
        "windows": report_windows,
        "preemption": _lost(all_runs, since, until),
        "time_to_start": time_to_start(jobs, since, until),
    }
