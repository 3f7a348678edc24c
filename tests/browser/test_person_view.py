"""A person's view in a real browser: sign in, run notebook 03, move the slider, see the hit rate follow;
the team's dashboard for a viewer (live, no controls) and for non-members (403).

Chromium is Debian's (/usr/bin/chromium, installed by ./dev setup), driven by Playwright; the stack
is a real `beamhub up`. Screenshots go to test-output/screenshots/ (`./dev docs --screenshots`
publishes the ones the documentation uses).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page

from tests.browser.person import (
    live_hit_rate,
    open_notebook,
    output_text,
    put_notebook,
    run_all_above_last_cell,
    save_screenshot,
    scroll_to,
    set_slider,
    sign_in,
    start_server,
    wait_for,
)
from tests.hub.hubstack import RunningStack
from tests.notebooks.beamtime import NOTEBOOKS

# alice_lab (sign-in, spawn, notebook 03) is set up inside the first test's time
pytestmark = [pytest.mark.browser, pytest.mark.timeout(360)]

VIEWPORT = {"width": 1280, "height": 1000}
NOTEBOOK = NOTEBOOKS / "03-steer-the-experiment.ipynb"


def public(stack: RunningStack) -> str:
    return stack.hub[: -len("hub/")]


@pytest.fixture(scope="module")
def alice_lab(beamtime_stack: RunningStack, browser: Browser) -> Iterator[Page]:
    """alice signs in, starts her server and runs notebook 03 down to (not including) its clean-up
    cell, so the analysis stays live; at the end she runs the clean-up cell."""
    context = browser.new_context(viewport=VIEWPORT)
    page, callback = sign_in(context, beamtime_stack.hub, "alice", "alice-dev")
    assert callback.status in (200, 302), callback.status
    start_server(page, beamtime_stack.hub, "alice")
    server = f"{public(beamtime_stack)}user/alice/"
    path = put_notebook(page, server, beamtime_stack.user_api_token("alice"), NOTEBOOK, "notebooks")
    open_notebook(page, server, path)
    run_all_above_last_cell(page)
    output_text(page, "rates follow the jet model:").wait_for(timeout=150_000)
    try:
        yield page
    finally:
        cells = page.locator(".jp-Notebook .jp-Cell")
        scroll_to(cells.last)
        cells.last.locator(".jp-InputPrompt").click()
        page.keyboard.press("Shift+Enter")  # Run Selected Cell
        output_text(page, "stopped:").wait_for(timeout=60_000)
        context.close()


def test_alice_runs_notebook_03_and_the_hit_rate_follows_her_slider(alice_lab: Page) -> None:
    page = alice_lab
    checked = page.locator(".jp-OutputArea-output", has_text="hit rate dropped:").inner_text()
    assert checked.splitlines() == [
        "the source applied each position: True",
        "hit rate dropped: True",
        "hit rate recovered: True",
        "rates follow the jet model: True",
    ], checked
    # the live view under the steering panel shows the hit rate of the last 100 frames
    panel = page.locator(".jp-OutputArea-output", has=page.locator(".widget-slider"))
    scroll_to(panel)
    before = wait_for(lambda: live_hit_rate(page), 30, "hit rate in the live view")
    assert before >= 0.1, f"jet in the beam (30 % hits) but the live view shows {before:.0%}"
    set_slider(page, "sample position (µm)", 150)
    status = page.get_by_text(re.compile(r"sample_position_um = 150\.0: rev \d+ seen in frame"))
    status.wait_for(timeout=30_000)  # the panel saw the first frame made at the new position
    after = wait_for(
        lambda: (rate := live_hit_rate(page)) is not None and rate <= 0.03 and [rate],
        60,
        "hit rate at or below 3 % after moving the jet 150 um off the beam",
    )[0]
    assert after < before
    shot = save_screenshot(panel, "notebook-03-steering")  # the panel and the live view
    assert 10_000 < shot.stat().st_size < 300_000, shot.stat().st_size
    save_screenshot(page, "notebook-03-jupyterlab")  # the same moment in the whole JupyterLab


def dashboard_page(browser: Browser, stack: RunningStack, user: str) -> Page:
    context = browser.new_context(viewport=VIEWPORT)
    page, callback = sign_in(context, stack.hub, user, f"{user}-dev")
    assert callback.status in (200, 302), (user, callback.status)
    return page


def test_viewer_sees_the_live_dashboard_without_controls(
    beamtime_stack: RunningStack, browser: Browser, alice_lab: Page
) -> None:
    page = dashboard_page(browser, beamtime_stack, "vera")
    response = page.goto(f"{public(beamtime_stack)}services/dashboard/")
    assert response is not None and response.status == 200
    page.wait_for_url(re.compile(r".*/services/dashboard/p/p-1001/.*"))
    main = page.locator("main#dashboard")
    assert (main.get_attribute("data-project"), main.get_attribute("data-role")) == (
        "p-1001",
        "viewer",
    )
    assert page.locator("#steering").count() == 0, "a viewer must see no controls"
    # its only inputs draw the image (colour map, contrast, hold): nothing steers
    assert page.locator("input:not(.view-control), button[data-steer], .widget-slider").count() == 0
    analysed = page.locator(".stream .frames-analysed").first

    def frames() -> int:
        return int(analysed.inner_text() or 0)

    first = wait_for(frames, 30, "frames analysed on the dashboard")
    wait_for(lambda: frames() > first, 30, "the dashboard's frame count moving")
    rate = float(page.locator(".stream .hit-rate").first.inner_text())
    assert 0.0 <= rate <= 1.0
    save_screenshot(page, "dashboard-viewer")
    page.context.close()


def test_operator_sees_the_steering_link(beamtime_stack: RunningStack, browser: Browser) -> None:
    page = dashboard_page(browser, beamtime_stack, "oscar")
    page.goto(f"{public(beamtime_stack)}services/dashboard/p/p-1001/")
    assert page.locator("main#dashboard").get_attribute("data-role") == "operator"
    assert page.locator("#steering").count() == 1  # the same page shows controls to steerers
    # a shared beamline PC: "Log out" ends the session at the hub and at the identity provider
    page.locator("#logout").click()
    page.wait_for_url(re.compile(r".*/hub/login.*"), timeout=30_000)
    response = page.goto(f"{public(beamtime_stack)}services/dashboard/p/p-1001/")
    assert "/services/dashboard/p/" not in page.url or (response and response.status != 200)
    page.context.close()


def test_non_member_gets_403(beamtime_stack: RunningStack, browser: Browser) -> None:
    page = dashboard_page(browser, beamtime_stack, "carol")  # pi of p-2002, not of p-1001
    response = page.goto(f"{public(beamtime_stack)}services/dashboard/p/p-1001/")
    assert response is not None and response.status == 403
    assert "not a member of project p-1001" in page.locator("#forbidden").inner_text()
    save_screenshot(page, "dashboard-non-member")
    page.context.close()


def test_user_without_project_is_refused_at_login(
    beamtime_stack: RunningStack, browser: Browser
) -> None:
    context = browser.new_context(viewport=VIEWPORT)
    page, callback = sign_in(context, beamtime_stack.hub, "mallory", "mallory-dev")
    assert callback.status == 403
    assert "no role in any beamhub project" in page.content()
    response = page.goto(f"{public(beamtime_stack)}services/dashboard/p/p-1001/")
    assert response is not None and response.status in (200, 403)
    assert page.locator("main#dashboard").count() == 0, "mallory must not see the dashboard"
    context.close()


def test_screenshots_are_small_pngs() -> None:
    """The docs show docs/screenshots/*.png (committed copies): they must exist and stay small."""
    docs = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
    shots = sorted(docs.glob("*.png"))
    assert {p.name for p in shots} >= {
        "notebook-03-steering.png",
        "notebook-03-jupyterlab.png",
        "dashboard-viewer.png",
        "dashboard-non-member.png",
        "idp-wrong-code.png",
    }
    for shot in shots:
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size < 300_000
