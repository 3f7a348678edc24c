"""Steering panel, live plots and the shared dashboard (imported only by notebooks and dashboard).

``from beamhub.widgets import SteeringPanel, LiveView`` (loaded on first use, so the dashboard service does
not import ipywidgets and jupyter_bokeh unless it needs them).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DSNClient", "LiveView", "SteerError", "SteeringPanel", "downsample_max"]

_WHERE = {
    "DSNClient": "steering",
    "SteerError": "steering",
    "SteeringPanel": "steering",
    "LiveView": "liveview",
    "downsample_max": "liveview",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"widgets.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'widgets' has no attribute {name!r}")
