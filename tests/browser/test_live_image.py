"""The live image a person uses on the shared dashboard, in Debian's Chromium: zoom into a hit until
its Bragg peak shows at full resolution, change the contrast, see who steered what on the time plots,
export a run's per-frame figures.

A real `beamhub up` (512x512 frames at 10 Hz, 30 % hits). The test's own work consumer (the
project's analysis, which keeps the stream flowing) analyses every frame it drains with the peak
finder's defaults, as the dashboard does, so the exported rows are checked against an independent
analysis of the same frames. Screenshots go to test-output/screenshots/.
"""

from __future__ import annotations

import csv
import io
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from playwright.sync_api import Browser, Page

from beamhub.streaming.analysis import Analyzer
from beamhub.streaming.consumer import StreamConsumer
from tests.browser.person import save_screenshot, sign_in, wait_for
from tests.hub.hubstack import RunningStack, login

pytestmark = [pytest.mark.browser, pytest.mark.timeout(420)]

YAML = """\
enclave: dev
hub: {port: 0}
tokens: {ttl: 600, revocation_poll: 1.0}
detector: {rate_hz: 10, shape: [512, 512], hit_fraction: 0.3, print_every_s: 0}
gateway: {enabled: false}
dashboard: {update_hz: 5}
"""
VIEWPORT = {"width": 1400, "height": 1300}


def _token(stack: RunningStack, scopes: list[str]) -> str:
    """alice's (pi of p-1001) project token from the token service."""
    headers = {"Authorization": f"token {stack.user_api_token('alice')}"}
    r = requests.post(
        stack.tokens + "api/tokens",
        headers=headers,
        timeout=10,
        json={"project": "p-1001", "scopes": scopes, "ttl": 600},
    )
    assert r.status_code == 201, r.text
    return r.json()["token"]


class Analysis:
    """The project's work consumer: drains the channel and analyses each frame independently."""

    def __init__(self, stack: RunningStack, token: str) -> None:
        self.results: dict[int, tuple[int, bool, int]] = {}  # seq -> (run, hit, n_peaks)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._consumer = StreamConsumer.from_dsn(
            stack.urls["dsn"], stack.urls["detector_channel"], token
        )
        self._thread = threading.Thread(target=self._run, name="test-analysis", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        analyzer = Analyzer()
        try:
            while not self._stop.is_set():
                frame = self._consumer.receive(timeout=0.2)
                if frame is not None:
                    r = analyzer.analyse(frame)
                    self.results[r.seq] = (r.run, bool(r.hit), r.n_peaks)
        except BaseException as exc:  # surfaced by the fixture's teardown
            self.error = exc
        finally:
            self._consumer.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningStack, Analysis]]:
    running = RunningStack(tmp_path_factory.mktemp("live-image"), YAML, "live-image").start()
    analysis = None
    try:
        assert login(running, "alice", "alice-dev")[1].status_code == 200
        analysis = Analysis(running, _token(running, ["stream.read"]))
        yield running, analysis
    finally:
        if analysis is not None:
            analysis.stop()
        running.stop()
        leftovers = running.survivors()
        running.kill_survivors()
        assert not leftovers, f"`beamhub up` left processes behind: {leftovers}"
        assert analysis is None or analysis.error is None, analysis.error


def _model(page: Page, name: str, expr: str) -> Any:
    """``expr`` evaluated on the page's bokeh model ``name`` (as ``m``)."""
    return page.evaluate(
        """([name, expr]) => {
             for (const doc of Bokeh.documents) {
               const m = doc.get_model_by_name(name);
               if (m) return (new Function("m", "return " + expr))(m);
             }
             return null;
           }""",
        [name, expr],
    )


def _frame_box(page: Page, channel: str) -> dict[str, float]:
    """Where the image plot's data area is on the screen now (viewport pixels)."""
    return page.evaluate(
        """ch => {
             for (const doc of Bokeh.documents) {
               const m = doc.get_model_by_name(ch + ":imagefig");
               if (!m) continue;
               const v = Bokeh.index.find_one(m);
               v.el.scrollIntoView({block: "center"});
               const r = v.el.getBoundingClientRect(), b = v.frame.bbox;
               return {x: r.left + b.left, y: r.top + b.top, width: b.width, height: b.height};
             }
             return null;
           }""",
        channel,
    )


def _tile(page: Page, channel: str) -> dict[str, Any] | None:
    return page.evaluate("ch => window.beamhubTiles && window.beamhubTiles[ch] || null", channel)


def _bright(png: bytes) -> int:
    """Screen pixels in Viridis's top colours (yellow, #fde725): what a bright peak looks like."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((r > 200) & (g > 190) & (b < 90)).sum())


def test_zoom_contrast_steering_marks_and_export(
    stack: tuple[RunningStack, Analysis], browser: Browser
) -> None:
    running, analysis = stack
    channel = running.urls["detector_channel"]
    dsn = running.urls["dsn"].rstrip("/")
    # alice moves the jet: the page must show the change, in µm, and that she made it
    steer = requests.put(
        f"{dsn}/api/channels/{channel}/steer/params/sample_position_um",
        headers={"Authorization": f"Bearer {_token(running, ['stream.read', 'steer'])}"},
        json={"value": 20},
        timeout=10,
    )
    assert steer.status_code == 200, steer.text

    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page, callback = sign_in(context, running.hub, "vera", "vera-dev")
    assert callback.status in (200, 302), callback.status
    page.goto(running.urls["dashboard"] + "p/p-1001/")
    sec = page.locator(f"#stream-{channel}")
    label = sec.locator(".shown-frame")
    wait_for(lambda: label.inner_text().startswith("last hit: frame"), 60, "a last hit labelled")
    assert re.match(r"last hit: frame \d+ \(run \d+\) at .+, \d+ peaks circled", label.inner_text())
    full = wait_for(lambda: _tile(page, channel), 30, "the first image tile")
    assert full["r0"] == 0 and full["c0"] == 0 and full["block"] >= 2, full  # 512 px in ~430

    # a person zooms with the mouse wheel over the image: the tile gets finer
    box = _frame_box(page, channel)
    assert box is not None and box["width"] > 300, box
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(6):
        page.mouse.wheel(0, -300)
        time.sleep(0.1)
    finer = wait_for(
        lambda: (t := _tile(page, channel)) and t["block"] < full["block"] and t,
        20,
        "a finer tile after zooming in",
    )
    assert finer["rows"] * finer["block"] < 512  # only what is in view was sent

    # hold the hit, zoom onto its brightest peak: one detector pixel per image pixel
    sec.locator(".hold").check()
    held = int(label.get_attribute("data-seq"))
    peaks = _model(page, f"{channel}:peaks", "({x: Array.from(m.data.x), y: Array.from(m.data.y)})")
    assert peaks["x"], "the held hit has no peak circles"
    x, y = peaks["x"][0], peaks["y"][0]
    _model(page, f"{channel}:xrange", f"m.setv({{start: {x - 20}, end: {x + 20}}})")
    _model(page, f"{channel}:yrange", f"m.setv({{start: {y - 20}, end: {y + 20}}})")
    zoomed = wait_for(
        lambda: (
            (t := _tile(page, channel))
            and t["block"] == 1
            and t["rows"] <= 42
            and t["seq"] == held
            and t
        ),
        20,
        "a full-resolution tile around the peak",
    )
    assert label.inner_text().startswith(f"held: last hit: frame {held} ")
    assert "full resolution" in sec.locator(".tile-info").inner_text()
    assert zoomed["max"] >= zoomed["high"] > zoomed["low"], zoomed  # auto contrast: peak at top
    time.sleep(0.5)  # bokeh draws on the next animation frame
    image_box = _frame_box(page, channel)
    before = page.screenshot(clip=image_box)
    assert _bright(before) >= 50, "the peak is not visible (no bright pixels) at full resolution"
    save_screenshot(page, "dashboard-live-peak-zoomed")

    # contrast: a high limit 100x above the peak leaves nothing bright; the pixels change
    high = round(zoomed["high"] * 100, 3)
    sec.locator(".contrast-high").fill(str(high))
    sec.locator(".contrast-high").press("Tab")
    wait_for(
        lambda: _model(page, f"{channel}:mapper", "m.high") == high, 10, "the new contrast limit"
    )
    assert not sec.locator(".contrast-auto").is_checked()
    time.sleep(0.5)
    after = page.screenshot(clip=image_box)
    assert _bright(after) == 0 and after != before
    sec.locator(".palette").select_option("Greys256")
    assert _model(page, f"{channel}:mapper", "m.palette[0]").lower() == "#000000"

    # steering marks on the time plots: the parameter, in µm, and who changed it
    events = sec.locator("table.events")
    wait_for(lambda: "sample position = 20 µm" in events.inner_text(), 30, "the steering event")
    assert "alice" in events.inner_text()
    labels = _model(page, f"{channel}:events", "Array.from(m.data.label)")
    assert any(re.fullmatch(r"sample position = 20 µm \(alice\)", t) for t in labels), labels
    save_screenshot(page, "dashboard-live-events")

    # export the current run's per-frame figures as CSV, as a person clicks it
    run_row = sec.locator("table.runs tbody tr").first
    run = int(run_row.get_attribute("data-run"))
    shown_frames = int(run_row.locator(".run-frames").inner_text())
    with page.expect_download() as download:
        run_row.locator(".export-run-csv").click()
    assert download.value.suggested_filename.endswith(f"-run{run}-frames.csv")
    rows = list(csv.DictReader(io.StringIO(open(download.value.path()).read())))
    assert list(rows[0]) == ["seq", "run", "time_unix", "hit", "n_peaks", "source_rev"]
    assert len(rows) >= shown_frames > 20
    seqs = [int(r["seq"]) for r in rows]
    assert seqs == sorted(set(seqs)) and {int(r["run"]) for r in rows} == {run}
    by_seq = {int(r["seq"]): r for r in rows}
    assert by_seq[held]["hit"] == "1" and int(by_seq[held]["n_peaks"]) == len(peaks["x"])
    # every exported frame the test's own analysis also saw got the same verdict
    common = [s for s in seqs if s in analysis.results]
    assert len(common) >= 20, (len(common), len(seqs))
    for s in common:
        expected = analysis.results[s]
        got = by_seq[s]
        assert (expected[0], int(expected[1]), expected[2]) == (
            int(got["run"]),
            int(got["hit"]),
            int(got["n_peaks"]),
        ), s
    assert 0 < sum(int(r["hit"]) for r in rows) < len(rows)  # 30 % hits: both kinds present
    context.close()
