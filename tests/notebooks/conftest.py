"""One `beamhub up` beamtime for the notebook tests, stopped when they are done."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.hub.hubstack import RunningStack
from tests.notebooks.beamtime import run_stack, spawned_env


@pytest.fixture(scope="package")
def beamtime_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    yield from run_stack(tmp_path_factory, "notebooks")


@pytest.fixture(scope="package")
def alice_server_env(beamtime_stack: RunningStack) -> dict[str, str]:
    """The environment of alice's freshly spawned server (delegated token, DSN, scheduler)."""
    return spawned_env(beamtime_stack, "alice")
