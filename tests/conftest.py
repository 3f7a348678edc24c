"""Shared test fixtures: an isolated BEAMHUB_HOME per test session."""

from __future__ import annotations

import os
import subprocess

import pytest


@pytest.fixture(scope="session", autouse=True)
def beamhub_home(tmp_path_factory: pytest.TempPathFactory):
    """Keys, databases and logs of the code under test go to a fresh folder, never ~/.beamhub."""
    home = tmp_path_factory.mktemp("beamhub-home")
    old = os.environ.get("BEAMHUB_HOME")
    os.environ["BEAMHUB_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("BEAMHUB_HOME", None)
    else:
        os.environ["BEAMHUB_HOME"] = old


@pytest.fixture(scope="session", autouse=True)
def _remove_service_dirs():
    """The stacks' state folders outside pytest's root (tests/hub/hubstack.service_dir)."""
    yield
    from tests.hub.hubstack import SERVICE_DIRS

    if SERVICE_DIRS:  # in the background: thousands of npm files must not hold up the session
        subprocess.Popen(["rm", "-rf", "--", *map(str, SERVICE_DIRS)], start_new_session=True)
