"""The server options form as a person uses it in Debian's Chromium: she sees her project, the
tiers she may use now and why beamtime is not one of them, the limits follow the tier she picks,
a walltime over the limit is refused by the hub (not just the browser), and after the start the
hub's home page warns that her short walltime ends soon."""

from __future__ import annotations

import re

import pytest
import requests
from playwright.sync_api import Browser, expect

from tests.browser.person import save_screenshot, sign_in
from tests.hub.hubstack import RunningStack

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


def test_options_form_limits_refusal_and_time_left(
    beamtime_stack: RunningStack, browser: Browser
) -> None:
    hub = beamtime_stack.hub
    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    try:
        page, callback = sign_in(context, hub, "oscar", "oscar-dev", None)
        assert callback.status in (200, 302), callback.status
        page.goto(hub + "spawn")
        expect(page.get_by_role("heading", name="Server Options")).to_be_visible()
        expect(page.get_by_label("Project")).to_have_value("p-1001")
        interactive = page.get_by_role("radio", name=re.compile(r"^interactive"))
        beamtime = page.get_by_role("radio", name=re.compile(r"^beamtime"))
        expect(interactive).to_be_checked()
        expect(beamtime).to_be_disabled()
        expect(
            page.get_by_text("not now: no approved beamtime window open for p-1001")
        ).to_be_visible()
        walltime = page.get_by_label("Walltime (hours)")
        assert walltime.get_attribute("max") == "8"
        save_screenshot(page, "spawn-form")

        # the limits follow the tier she picks
        page.get_by_role("radio", name=re.compile(r"^normal")).check()
        assert walltime.get_attribute("max") == "24"
        assert page.get_by_label("Nodes").get_attribute("max") == "4"
        expect(page.locator("#beamhub-walltime-help")).to_have_text(
            "at most 24 h at this tier; the server stops then"
        )

        # past the browser's check (as a hand-made request would be): the hub refuses by field
        walltime.evaluate("e => e.removeAttribute('max')")
        walltime.fill("30")
        page.get_by_role("button", name="Start").click()
        error = page.locator(".spawn-error-msg")
        expect(error).to_have_text(
            "Error: walltime: 30 h is over tier 'normal''s limit of 24 h; ask for at most "
            "24 h or pick a tier with a longer limit"
        )
        save_screenshot(page, "spawn-form-refused")

        # a 15 min server: it starts, and the home page warns that it stops soon
        page.get_by_label("Walltime (hours)").fill("0.25")
        page.get_by_role("button", name="Start").click()
        page.wait_for_url(re.compile(r".*/user/oscar/lab.*"), timeout=90_000)
        page.goto(hub + "home")
        box = page.get_by_role("status").filter(has_text="walltime")
        expect(box).to_contain_text("Your server stops soon:")
        expect(box).to_contain_text(re.compile(r"1[345] min\s+before the walltime ends at"))
        save_screenshot(page, "home-time-left")
    finally:
        context.close()
        requests.delete(f"{hub}api/users/oscar/server", headers=beamtime_stack.admin, timeout=30)
