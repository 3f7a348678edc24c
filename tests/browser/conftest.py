"""A real `beamhub up` beamtime and one headless Debian Chromium for the browser tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.browser.person import launch
from tests.hub.hubstack import RunningStack
from tests.notebooks.beamtime import run_stack


@pytest.fixture(scope="package")
def beamtime_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    yield from run_stack(tmp_path_factory, "browser")


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = launch(playwright)
        try:
            yield chromium
        finally:
            chromium.close()
