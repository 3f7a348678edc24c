"""One `beamhub up` beamtime for the notebook tests, stopped when they are done."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.hub.hubstack import RunningStack
from tests.notebooks.beamtime import run_stack, spawned_env

#: The enclaves the notebooks must run under unchanged (issue: the enclave transition).
ENCLAVES = ["dev", "open", "moderate"]


@pytest.fixture(scope="package", params=ENCLAVES)
def beamtime_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStack]:
    """One `beamhub up` per enclave, one after the other (moderate: TOTP login, CURVE + L7)."""
    yield from run_stack(tmp_path_factory, f"notebooks-{request.param}", request.param)


@pytest.fixture(scope="package")
def alice_server_env(beamtime_stack: RunningStack) -> dict[str, str]:
    """The environment of alice's freshly spawned server (delegated token, DSN, scheduler)."""
    return spawned_env(beamtime_stack, "alice")
