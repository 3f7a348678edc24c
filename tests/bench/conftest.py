"""The benchmarks that run a real `beamhub up` are marked ``benchrun`` (``pytest -m benchrun``)."""

from __future__ import annotations


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "benchrun: runs `beamhub bench faults|soak` on a real `beamhub up` (minutes)"
    )
