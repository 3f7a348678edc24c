"""What a person does in the browser, as Playwright steps on Debian's Chromium (no browser download).

Each helper is one thing a person does: sign in on the identity provider's page, start a server,
open a notebook in JupyterLab, run it, move a slider, read a number. The browser tests compose them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, BrowserContext, Page, Playwright, Response

__all__ = [
    "CHROMIUM",
    "SCREENSHOTS",
    "launch",
    "live_hit_rate",
    "menu",
    "open_notebook",
    "output_text",
    "put_notebook",
    "run_all_above_last_cell",
    "save_screenshot",
    "set_slider",
    "sign_in",
    "start_server",
    "wait_for",
]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",  # root in CI containers
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[2]
#: ignored by git: a test run never changes the tree; `./dev docs --screenshots` publishes the
#: ones the documentation uses into docs/screenshots/
SCREENSHOTS = REPO / "test-output" / "screenshots"


def launch(playwright: Playwright) -> Browser:
    """Debian's headless Chromium (Playwright's own browser download is never used)."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: run ./dev setup (apt package chromium)")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def wait_for(check: Callable[[], Any], timeout: float, what: str, period: float = 0.25) -> Any:
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {value!r})")
        time.sleep(period)


def sign_in(
    context: BrowserContext,
    hub: str,
    user: str,
    password: str,
    otp: Callable[[], str] | None = None,
) -> tuple[Page, Response]:
    """Hub login page -> "Sign in with ..." -> the IdP's login form (-> its one-time code form,
    where ``otp()`` gives the code to type) -> its consent form -> hub.

    Returns the page and the response of the hub's OAuth callback (200 home, 403 refused).
    """
    page = context.new_page()
    page.goto(hub + "login")
    page.get_by_text("Sign in with").click()
    page.wait_for_url(re.compile(r".*/interaction/.*"))
    page.fill("input[name=login]", user)
    page.fill("input[name=password]", password)
    page.get_by_role("button", name="Sign in").click()
    if otp is not None:
        page.get_by_label("Code").wait_for()
        page.keyboard.type(otp(), delay=50)  # typed, as a person types it
        page.get_by_role("button", name="Verify").click()
    page.get_by_role("button", name="Continue").wait_for()
    with page.expect_response(re.compile(r".*/hub/oauth_callback.*")) as callback:
        page.get_by_role("button", name="Continue").click()
    page.wait_for_load_state()
    return page, callback.value


def start_server(page: Page, hub: str, user: str, timeout: float = 90) -> None:
    """Press "Start My Server" on the hub's home page (then "Start" on the server options
    form, keeping its defaults) and wait for JupyterLab."""
    page.goto(hub + "home")
    page.locator("#start").click()
    # the home page's button leads to /hub/spawn/<user>: the form, or (no form) the progress
    page.wait_for_url(
        re.compile(rf".*(/hub/spawn(/{user})?(\?.*)?$|/spawn-pending/|/user/{user}/)")
    )
    if page.locator("#spawn_form").count():
        page.locator("#spawn_form button[type=submit]").click()
    page.wait_for_url(re.compile(rf".*/user/{user}/lab.*"), timeout=timeout * 1000)
    page.locator(".jp-LauncherCard, .jp-DirListing").first.wait_for(timeout=timeout * 1000)


def put_notebook(page: Page, server: str, token: str, source: Path, folder: str) -> str:
    """Upload ``source`` into ``folder`` of the server (Jupyter contents API); return its path."""
    headers = {"Authorization": f"token {token}", "Content-Type": "application/json"}
    answer = page.request.put(
        f"{server}api/contents/{folder}", headers=headers, data=json.dumps({"type": "directory"})
    )
    assert answer.status in (200, 201), (answer.status, answer.text())
    path = f"{folder}/{source.name}"
    body = {"type": "notebook", "format": "json", "content": json.loads(source.read_text())}
    answer = page.request.put(
        f"{server}api/contents/{path}", headers=headers, data=json.dumps(body)
    )
    assert answer.status in (200, 201), (answer.status, answer.text())
    return path


def open_notebook(page: Page, server: str, path: str, timeout: float = 60) -> None:
    page.goto(f"{server}lab/tree/{path}")
    page.locator(".jp-Notebook .jp-Cell").last.wait_for(timeout=timeout * 1000)
    page.get_by_text(re.compile(r"\| Idle$")).wait_for(timeout=timeout * 1000)  # kernel status
    news = page.get_by_role("button", name="No", exact=True)  # "notified about Jupyter news?"
    if news.count():
        news.first.click()


def menu(page: Page, top: str, item: str) -> None:
    """Click a JupyterLab menu bar entry, then an item of its menu."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(rf"^{top}$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=item).first.click()


def scroll_to(locator: Any) -> None:
    """Scroll an element into view now. (Playwright's scroll_into_view_if_needed first waits for
    the element to stand still, which a notebook whose live view redraws 10 times a second may
    never do on a loaded machine.)"""
    locator.first.wait_for()
    locator.first.evaluate("e => e.scrollIntoView({block: 'center'})")


def run_all_above_last_cell(page: Page) -> None:
    """Clear the shipped outputs, select the last cell, Run ▸ Run All Above Selected Cell."""
    menu(page, "Edit", "Clear Outputs of All Cells")
    cells = page.locator(".jp-Notebook .jp-Cell")
    last = cells.count()
    scroll_to(cells.last)
    cells.last.locator(".jp-InputPrompt").click()
    page.get_by_text(f"Cell {last}/{last}").wait_for()  # the status bar: last cell selected
    menu(page, "Run", "Run All Above Selected Cell")


def set_slider(page: Page, label: str, value: float) -> None:
    """Type ``value`` into the readout box of the slider labelled ``label`` and press Enter."""
    readout = page.locator(".widget-slider", has_text=label).locator(".widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(f"{value:g}")
    page.keyboard.press("Enter")


def output_text(page: Page, text: str) -> Any:
    """A locator of a cell output (not the code) containing ``text``."""
    return page.locator(".jp-OutputArea-output", has_text=text)


def live_hit_rate(page: Page) -> float | None:
    """The hit rate (0..1) the LiveView's info line shows now, or None if it shows none yet."""
    texts = page.get_by_text(re.compile(r"hit rate: \d")).all_inner_texts()
    for text in texts:
        match = re.search(r"hit rate: ([\d.]+)%", text)
        if match:
            return float(match.group(1)) / 100
    return None


def save_screenshot(target: Page | Any, name: str) -> Path:
    """PNG under test-output/screenshots/ (a CI artifact; never in the tracked tree)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    if isinstance(target, Page):
        target.screenshot(path=str(path))
    else:  # an element: its box now (a live view never stands still for Playwright's check)
        box = target.first.bounding_box()
        assert box is not None, f"{name}: the element is not on the page"
        target.first.page.screenshot(path=str(path), clip=box)
    return path
