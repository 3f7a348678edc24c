"""A moderate enclave's login in a real browser: password, then a typed one-time code (TOTP)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser

from tests.browser.person import save_screenshot, sign_in
from tests.hub.hubstack import RunningStack, otp_code

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

MODERATE_YAML = """\
enclave: moderate
hub: {port: 0}
dsn: {enabled: false}
detector: {enabled: false}
"""


@pytest.fixture(scope="module")
def moderate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    stack = RunningStack(tmp_path_factory.mktemp("totp"), MODERATE_YAML, "totp").start()
    try:
        yield stack
    finally:
        stack.stop()


def test_alice_types_her_code_and_reaches_the_hub(moderate: RunningStack, browser: Browser) -> None:
    context = browser.new_context()
    try:
        page, callback = sign_in(
            context, moderate.hub, "alice", "alice-dev", otp=lambda: otp_code(moderate, "alice")
        )
        assert callback.status in (200, 302), callback.status  # 403 would be a refused login
        assert "/hub/" in page.url and "login" not in page.url, page.url
    finally:
        context.close()


def test_a_wrong_code_is_refused_with_a_reason(moderate: RunningStack, browser: Browser) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(moderate.hub + "login")
        page.get_by_text("Sign in with").click()
        page.fill("input[name=login]", "oscar")
        page.fill("input[name=password]", "oscar-dev")
        page.get_by_role("button", name="Sign in").click()
        page.get_by_label("Code").fill("000000")
        page.get_by_role("button", name="Verify").click()
        alert = page.get_by_role("alert")
        alert.wait_for()
        assert "Wrong or expired code" in alert.inner_text()
        save_screenshot(page.locator("body"), "idp-wrong-code")  # the user guide's 2nd factor
        assert Path(moderate.state / "idp-totp.json").stat().st_mode & 0o777 == 0o600
    finally:
        context.close()
