"""The token page as a person uses it in Debian's Chromium: it looks like the hub's pages, offers
only her role's scopes with only stream.read checked, lists her tokens with their expiry, and a
Revoke button makes the token useless at the gateway."""

from __future__ import annotations

import re

import pytest
import requests
from playwright.sync_api import Browser, expect

from tests.browser.person import save_screenshot, sign_in, wait_for
from tests.hub.hubstack import RunningStack

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


def _whoami(stack: RunningStack, token: str) -> int:
    url = stack.urls["gateway"] + "api/v1/whoami"
    return requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code


def test_a_member_mints_the_least_and_revokes_it(
    beamtime_stack: RunningStack, browser: Browser
) -> None:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    try:
        page, callback = sign_in(context, beamtime_stack.hub, "bob", "bob-dev")
        assert callback.status in (200, 302), callback.status
        page.goto(beamtime_stack.tokens)
        # the hub's look: its stylesheet applied (Bootstrap's navbar), its logo, her name
        expect(page.get_by_role("heading", name="Project tokens")).to_be_visible()
        expect(page.locator("#user-name")).to_have_text("bob")
        assert page.locator("nav.navbar").evaluate("e => getComputedStyle(e).display") == "flex"
        assert page.locator("img.jpy-logo").evaluate("e => e.naturalWidth") > 0

        # bob is a member of p-1001: his role's scopes only, and only stream.read checked
        card = page.get_by_role("region", name="New token for p-1001")
        boxes = card.locator("input[name=scopes]")
        offered = {
            boxes.nth(i).get_attribute("value"): boxes.nth(i).is_checked()
            for i in range(boxes.count())
        }
        assert offered == {
            "stream.read": True,
            "stream.publish": False,
            "jobs": False,
            "dashboard": False,
        }, offered
        save_screenshot(page, "token-page")

        # mint with what is checked: a stream.read token, shown once, listed with its expiry
        card.get_by_label("What it is for").fill("browser test DAQ")
        card.get_by_role("button", name="Request token for p-1001").click()
        token = page.locator("#token").input_value()
        assert token.count(".") == 2
        new = page.locator("#new-token")
        expect(new).to_contain_text("stream.read")
        row = page.locator("#tokens tbody tr", has_text="browser test DAQ")
        expect(row).to_have_count(1)
        expect(row).to_contain_text(re.compile(r"UTC \(in \d+ (min|h)\)"))
        expect(row).to_contain_text("active")
        assert _whoami(beamtime_stack, token) == 200

        # nothing checked: refused on the page, not a token with every scope of the role
        card = page.get_by_role("region", name="New token for p-1001")
        card.get_by_label(re.compile("stream.read")).uncheck()
        card.get_by_role("button", name="Request token for p-1001").click()
        expect(page.get_by_role("alert").first).to_contain_text("Choose at least one scope")
        assert page.locator("#token").count() == 0

        # revoke from the list: the row says so and the gateway refuses the token within a poll
        page.goto(beamtime_stack.tokens)
        row = page.locator("#tokens tbody tr", has_text="browser test DAQ")
        row.get_by_role("button", name=re.compile("^Revoke")).click()
        expect(page.get_by_role("status")).to_contain_text("Token revoked.")
        row = page.locator("#tokens tbody tr", has_text="browser test DAQ")
        expect(row).to_contain_text("revoked")
        expect(row.get_by_role("button")).to_have_count(0)
        save_screenshot(page, "token-page-revoked")
        wait_for(lambda: _whoami(beamtime_stack, token) == 401, 10, "the gateway refusing it")
    finally:
        context.close()


def test_a_viewer_is_offered_only_what_a_viewer_holds(
    beamtime_stack: RunningStack, browser: Browser
) -> None:
    context = browser.new_context()
    try:
        page, callback = sign_in(context, beamtime_stack.hub, "vera", "vera-dev")
        assert callback.status in (200, 302), callback.status
        page.goto(beamtime_stack.tokens)
        boxes = page.locator("input[name=scopes]")
        values = [boxes.nth(i).get_attribute("value") for i in range(boxes.count())]
        assert values == ["stream.read", "dashboard"], values
        assert page.locator("text=steer").count() == 0
    finally:
        context.close()
