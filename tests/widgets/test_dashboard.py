"""The shared dashboard against a real `beamhub up`: hub OAuth, membership, live numbers, one subscription.

One stack for the module (IdP, JupyterHub + proxy, token service, DSN, simulated detector at 10 Hz,
the dashboard as a hub service); users log in through the real OpenID provider without a browser.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator

import jsonschema
import pytest
import requests

from beamhub.auth.api import ERROR_SCHEMA
from beamhub.streaming.consumer import StreamConsumer
from tests.hub.hubstack import RunningStack, login

pytestmark = pytest.mark.timeout(120)

YAML = """\
enclave: dev
hub: {port: 0}
tokens: {ttl: 30, revocation_poll: 1.0}
detector: {rate_hz: 10, shape: [64, 64], print_every_s: 0}  # no printer: one monitor viewer
gateway: {enabled: false}
dashboard: {update_hz: 5, analysis: {min_peaks_for_hit: 3}}
"""


def _drain(stack: RunningStack, stop: threading.Event) -> None:
    """The project's analysis: a work consumer reading the detector channel (as Dask workers do).

    The DSN's work face is lossless, so without a reader the stream stalls at the high-water
    mark and the monitor fan-out (what the dashboard sees) stalls with it."""
    assert login(stack, "alice", "alice-dev")[1].status_code == 200
    headers = {"Authorization": f"token {stack.user_api_token('alice')}"}
    r = requests.post(
        stack.tokens + "api/tokens",
        headers=headers,
        timeout=10,
        json={"project": "p-1001", "scopes": ["stream.read"], "ttl": 300},
    )
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    with StreamConsumer.from_dsn(stack.urls["dsn"], stack.urls["detector_channel"], token) as c:
        while not stop.is_set():
            c.receive(timeout=0.2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running = RunningStack(tmp_path_factory.mktemp("dashboard"), YAML, "dashboard").start()
    stop = threading.Event()
    errors: list[BaseException] = []

    def analysis() -> None:
        try:
            _drain(running, stop)
        except BaseException as exc:  # surfaced by the fixture's teardown
            errors.append(exc)

    worker = threading.Thread(target=analysis, name="test-analysis", daemon=True)
    worker.start()
    try:
        yield running
    finally:
        stop.set()
        worker.join(10)
        running.stop()
        leftovers = running.survivors()
        running.kill_survivors()
        assert not leftovers, f"`beamhub up` left processes behind: {leftovers}"
        assert not errors, f"the test's work consumer failed: {errors}"


def _dashboard(stack: RunningStack) -> str:
    return stack.urls["dashboard"]


def _session(stack: RunningStack, user: str) -> requests.Session:
    """Logged in at the hub and, through the hub's OAuth, at the dashboard (its cookie set)."""
    session, r = login(stack, user, f"{user}-dev")
    assert r.status_code == 200, (user, r.status_code, r.text[:300])
    r = session.get(_dashboard(stack), timeout=20)
    assert r.status_code in (200, 403), (user, r.status_code, r.url)
    return session


def _poll(what: str, check, timeout: float = 30.0, every: float = 0.2):
    """Poll ``check()`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what} within {timeout}s (last: {last!r})")


def _detector_stream(session: requests.Session, stack: RunningStack) -> dict:
    url = _dashboard(stack) + "p/p-1001/data.json"
    channel = stack.urls["detector_channel"]

    def live() -> dict | None:
        r = session.get(url, timeout=10)
        assert r.status_code == 200, r.text
        streams = {s["channel"]: s for s in r.json()["streams"]}
        s = streams.get(channel)
        return s if s and s["frames_analysed"] > 0 else None

    return _poll(f"the dashboard analysing the detector channel {channel}", live)


def test_banner_names_the_dashboard(stack: RunningStack) -> None:
    out = stack.output()
    assert "shared dashboard ... ready in" in out
    assert f"dashboard       {_dashboard(stack)}" in out


def test_viewer_sees_live_numbers_and_no_controls(stack: RunningStack) -> None:
    vera = _session(stack, "vera")
    first = _detector_stream(vera, stack)
    # numbers move between two polls: frames analysed grows, the figures have data
    later = _poll(
        "frames analysed to grow",
        lambda: (
            (s := _detector_stream(vera, stack))["frames_analysed"] > first["frames_analysed"] and s
        ),
        timeout=10,
    )
    assert later["state"] == "running" and later["error"] is None
    assert later["series"]["t"] and len(later["series"]["hit_rate"]) == len(later["series"]["t"])
    image = later["image"]
    assert (image["width"], image["height"], image["rows"], image["cols"]) == (64, 64, 64, 64)
    assert len(image["data"]) == 64 * 64 and max(image["data"]) == 255
    assert later["radial_profile"] and later["latency_p50_ms"] is not None
    assert later["frames_lost"] >= 0 and 0.0 <= later["hit_rate"] <= 1.0
    # the detector's current settings, read-only (the detector feed attaches source control)
    assert "hit_fraction" in later["source"]["values"] and later["source"]["rev"] >= 0
    # the page: vera's project, her role, the stream section with its numbers, no controls
    r = vera.get(_dashboard(stack), timeout=20)
    assert r.status_code == 200 and r.url == _dashboard(stack) + "p/p-1001/", r.url
    page = r.text
    assert 'id="dashboard" data-project="p-1001" data-role="viewer"' in page
    assert f'id="stream-{stack.urls["detector_channel"]}"' in page
    assert 'class="frames-analysed"' in page and "static/js/bokeh.min.js" in page
    assert "detector settings (revision" in page
    assert "Bokeh" in page  # the embedded figures' document
    for control in ('id="steering"', "<button", "<form"):
        assert control not in page, control
    # a viewer steers nothing: the only inputs change how this page draws the image
    fields = re.findall(r"<(?:input|select)\b[^>]*>", page)
    assert fields and all("view-control" in f for f in fields), fields
    assert vera.get(_dashboard(stack) + "static/js/bokeh.min.js", timeout=20).status_code == 200


def test_image_tiles_and_frame_export_over_http(stack: RunningStack) -> None:
    """What the page's zoom and export links fetch: binary tiles of the shown frame, per-frame
    CSV/HDF5 of a run, and errors that name the field."""
    vera = _session(stack, "vera")
    stream = _poll(
        "a frame shown", lambda: (s := _detector_stream(vera, stack))["shown"] and s, timeout=20
    )
    channel, shown = stream["channel"], stream["shown"]
    assert (shown["height"], shown["width"]) == (64, 64)
    base = _dashboard(stack) + "p/p-1001/"
    r = vera.get(
        base + "tile",
        params={"channel": channel, "x0": 8, "x1": 40, "y0": 0, "y1": 64, "px": 16},
        timeout=10,
    )
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/octet-stream"
    assert r.headers["X-Tile-Box"] == "0,8,64,40" and r.headers["X-Tile-Block"] == "4"
    assert r.headers["X-Tile-Shape"] == "16,8" and len(r.content) == 16 * 8 * 4  # float32
    frame = json.loads(r.headers["X-Frame"])
    assert frame["seq"] >= shown["seq"] and frame["height"] == 64
    for params, field in (
        ({"x0": 0, "x1": 64, "y0": 0, "y1": 64}, "px"),
        ({"x0": 0, "x1": 64, "y0": 0, "y1": 64, "px": 99999}, "px"),
        ({"x0": "left", "x1": 64, "y0": 0, "y1": 64, "px": 64}, "x0"),
        ({"x0": 0, "x1": 64, "y0": 0, "y1": 64, "px": 64, "seq": "last"}, "seq"),
    ):
        bad = vera.get(base + "tile", params={"channel": channel, **params}, timeout=10)
        assert bad.status_code == 400 and bad.json()["field"] == field, (params, bad.text)
        jsonschema.validate(bad.json(), ERROR_SCHEMA)
    gone = vera.get(
        base + "tile",
        params={"channel": "ch-nope", "x0": 0, "x1": 1, "y0": 0, "y1": 1, "px": 16},
        timeout=10,
    )
    assert gone.status_code == 404 and gone.json()["field"] == "channel"
    run = stream["runs"][-1]["run"]
    r = vera.get(base + "frames.csv", params={"channel": channel, "run": run}, timeout=10)
    assert r.status_code == 200 and f"-run{run}-frames.csv" in r.headers["Content-Disposition"]
    lines = r.text.splitlines()
    assert lines[0] == "seq,run,time_unix,hit,n_peaks,source_rev" and len(lines) > 1
    assert {line.split(",")[1] for line in lines[1:]} == {str(run)}
    r = vera.get(base + "frames.h5", params={"channel": channel}, timeout=10)
    assert r.status_code == 200 and r.content[:8] == b"\x89HDF\r\n\x1a\n"
    bad = vera.get(base + "frames.csv", params={"channel": channel, "run": "x"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["field"] == "run"


def test_operator_sees_the_steering_section(stack: RunningStack) -> None:
    r = _session(stack, "oscar").get(_dashboard(stack), timeout=20)
    assert r.status_code == 200 and 'data-role="operator"' in r.text
    assert 'id="steering"' in r.text and "03-steer-the-experiment.ipynb" in r.text


def test_non_member_is_refused_with_a_message(stack: RunningStack) -> None:
    carol = _session(stack, "carol")  # pi of p-2002, nothing in p-1001
    r = carol.get(_dashboard(stack) + "p/p-1001/", timeout=20)
    assert r.status_code == 403
    assert '<p id="forbidden">You are not a member of project p-1001.' in r.text
    r = carol.get(_dashboard(stack) + "p/p-1001/data.json", timeout=20)
    assert r.status_code == 403 and r.json()["reason"] == "not_member"
    jsonschema.validate(r.json(), ERROR_SCHEMA)  # the one error shape (auth/api.py)
    # her own project's dashboard works (it has no stream)
    r = carol.get(_dashboard(stack), timeout=20)
    assert r.status_code == 200 and r.url.endswith("/p/p-2002/")
    assert 'data-role="pi"' in r.text and 'id="no-streams"' in r.text
    status = carol.get(_dashboard(stack) + "api/status", timeout=20).json()
    assert "p-1001" not in status["projects"]  # nor does she see p-1001's subscriptions


def test_unauthenticated_goes_to_the_hub_login(stack: RunningStack) -> None:
    r = requests.get(_dashboard(stack) + "p/p-1001/", allow_redirects=False, timeout=20)
    assert r.status_code == 302 and "/hub/api/oauth2/authorize" in r.headers["Location"]
    r = requests.get(_dashboard(stack), timeout=20)
    assert r.status_code == 200 and "/hub/login" in r.url
    for path in ("p/p-1001/data.json", "api/status"):
        r = requests.get(_dashboard(stack) + path, allow_redirects=False, timeout=20)
        assert r.status_code == 401 and r.json()["reason"] == "unauthenticated"
        jsonschema.validate(r.json(), ERROR_SCHEMA)


def test_many_viewers_share_one_subscription(stack: RunningStack) -> None:
    channel = stack.urls["detector_channel"]
    sessions = {user: _session(stack, user) for user in ("vera", "bob", "alice")}
    for session in sessions.values():
        assert session.get(_dashboard(stack), timeout=20).status_code == 200
        _detector_stream(session, stack)

    def shared() -> dict | None:
        status = sessions["alice"].get(_dashboard(stack) + "api/status", timeout=10).json()
        project = status["projects"]["p-1001"]
        entry = project["channels"].get(channel)
        ok = entry and entry["dsn_monitor_viewers"] == 1 and project["viewers"]["pages"] >= 3
        return status if ok else None

    status = _poll("the DSN to report the dashboard's one monitor consumer", shared, every=0.5)
    project = status["projects"]["p-1001"]
    assert set(project["viewers"]["users"]) >= {"vera", "bob", "alice"}
    assert project["subscriptions"] == len(project["channels"]) >= 1
    assert all(c["consumers_open"] == 1 for c in project["channels"].values())
    assert project["channels"][channel]["dsn_monitor_viewers"] == 1
    # and the DSN says so itself, to a token minted by alice through the token service
    headers = {"Authorization": f"token {stack.user_api_token('alice')}"}
    minted = requests.post(
        stack.tokens + "api/tokens",
        headers=headers,
        timeout=10,
        json={"project": "p-1001", "scopes": ["stream.read"], "ttl": 60},
    )
    assert minted.status_code == 201, minted.text
    bearer = {"Authorization": f"Bearer {minted.json()['token']}"}
    stats = requests.get(
        f"{stack.urls['dsn']}/api/channels/{channel}", headers=bearer, timeout=10
    ).json()["stats"]
    monitors = [c for c in stats["consumers"] if c.startswith("dashboard-")]
    assert stats["monitor"]["viewers"] == 1 and len(monitors) == 1, stats


def test_the_allocation_report_page_is_for_hub_admins_only(stack: RunningStack) -> None:
    import subprocess

    from tests.hub.hubstack import BEAMHUB

    url = _dashboard(stack) + "admin/allocation"
    alice = _session(stack, "alice")  # a hub admin
    r = alice.get(url, timeout=20)
    assert r.status_code == 404 and "beamhub report allocation --publish" in r.text
    out = subprocess.run(
        [BEAMHUB, "report", "--state-dir", str(stack.state), "allocation", "--publish"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    page = stack.state / "reports" / "allocation.html"
    assert page.stat().st_mode & 0o777 == 0o640
    r = alice.get(url, timeout=20)
    assert r.status_code == 200 and "beamhub allocation report" in r.text and "Bokeh" in r.text
    r = _session(stack, "carol").get(url, timeout=20)  # a pi, not a hub admin
    assert r.status_code == 403 and "admins (hub admins) only" in r.text
