"""The dashboard's data side against a real in-process DSN: one shared subscription, renewals, cleanup.

A real DSN (control API + ZeroMQ data plane), a real simulated detector streaming 64x64 frames at
50 Hz, and a real work consumer (the project's analysis) draining the lossless work face.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from beamhub.streaming.consumer import StreamConsumer
from beamhub.streaming.simulator import SimulatedDetector
from beamhub.streaming.source import SourceRunner
from beamhub.widgets.dashboard import Dashboard, StreamMonitor, downsample
from beamhub.widgets.dashboard_service import build_app, project_roles
from tests.streaming.dsn_helpers import Tokens, api, running_dsn, wait_until

pytestmark = pytest.mark.timeout(60)


def _threads(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


async def test_one_subscription_per_channel_renewed_token_and_clean_stop() -> None:
    tokens = Tokens()
    minted: list[float] = []

    def token_source(project: str) -> tuple[str, float]:
        minted.append(time.time())
        return tokens.issue(project, "stream.read", ttl=3, sub="beamhub-dashboard"), time.time() + 3

    async with running_dsn(tokens) as node:
        publisher = tokens.issue("p1", "stream.read stream.publish")
        status, channel = await api(node.url, "POST", "/api/channels", publisher, {"stream": "det"})
        assert status == 201, channel
        status, other = await api(
            node.url,
            "POST",
            "/api/channels",
            tokens.issue("p2", "stream.read stream.publish"),
            {"stream": "elsewhere"},
        )
        assert status == 201, other
        # every channel is CURVE: the clients register their own keys
        source = await asyncio.to_thread(
            SourceRunner.from_dsn,
            SimulatedDetector((64, 64), rate_hz=50, seed=1),
            node.url,
            channel["id"],
            publisher,
        )
        stop = threading.Event()
        work = await asyncio.to_thread(
            StreamConsumer.from_dsn, node.url, channel["id"], publisher, consumer_id="drain"
        )

        def drain() -> None:
            while not stop.is_set():
                work.receive(timeout=0.1)

        drainer = threading.Thread(target=drain, name="test-drain")
        source.start()
        source.start_run()
        drainer.start()
        dashboard = Dashboard(node.url, token_source, discover_s=0.3, idle_stop_s=0.5)
        try:
            feed = dashboard.feed("p1")
            for viewer in ("a", "b", "c"):  # three pages, one subscription
                dashboard.touch("p1", viewer, f"user-{viewer}")

            def analysed() -> list | bool:
                streams = feed.snapshot()["streams"]
                return len(streams) == 1 and streams[0]["frames_analysed"] > 20 and streams

            (snap,) = await wait_until(analysed, timeout=20)
            assert snap["channel"] == channel["id"] and snap["stream"] == "det"
            assert snap["image"]["rows"] == 64 and len(snap["image"]["data"]) == 64 * 64
            assert snap["series"]["t"] and snap["radial_profile"] and snap["rate_hz"] > 0
            status = dashboard.status()
            project = status["projects"]["p1"]
            assert set(status["projects"]) == {"p1"}  # p2's channel was never subscribed
            assert project["subscriptions"] == 1 and project["viewers"]["pages"] == 3
            assert StreamMonitor.open_consumers == {channel["id"]: 1}
            # the DSN sees exactly one monitor consumer (reported every 0.5 s, listed by discovery)
            await wait_until(lambda: feed.dsn_viewers.get(channel["id"]) == 1, timeout=10)
            # a 3 s token is renewed when a third of its life is left, i.e. about every 2 s
            await wait_until(lambda: len(minted) >= 3, timeout=10)
            assert feed.error is None
            # the channel goes away: its subscription goes with it
            status, _ = await api(node.url, "DELETE", f"/api/channels/{channel['id']}", publisher)
            assert status == 204
            await wait_until(lambda: StreamMonitor.open_consumers == {}, timeout=10)
            assert feed.snapshot()["streams"] == []
            # nobody watching for idle_stop_s: the project's feed stops, its threads end
            await wait_until(lambda: dashboard.reap() == ["p1"] or not dashboard.feeds, timeout=10)
            await wait_until(lambda: not _threads("dashboard-"), timeout=10)
        finally:
            dashboard.close()
            stop.set()
            drainer.join(5)
            work.close()
            source.stop()
    assert not _threads("dashboard-")


def test_project_roles_from_hub_groups() -> None:
    user = {"groups": ["p-1001", "p-1001:viewer", "p-2002:operator", "p-2002:member", "staff"]}
    assert project_roles(user) == {"p-1001": "viewer", "p-2002": "operator"}
    assert project_roles({"groups": []}) == {} and project_roles({}) == {}


def test_downsample_keeps_peaks_and_bounds_size() -> None:
    image = np.zeros((1000, 600), dtype=np.float32)
    image[999, 599] = 7.0
    small, block = downsample(image, 96)
    assert block == 11 and small.shape == (91, 55) and small.max() == 7.0
    same, one = downsample(image[:64, :64], 96)
    assert one == 1 and same.shape == (64, 64)


def test_update_rate_is_bounded() -> None:
    dashboard = Dashboard("http://127.0.0.1:9", lambda p: ("", 0.0))
    with pytest.raises(ValueError, match="update_hz: 10"):
        build_app(dashboard, update_hz=10)


def test_service_refuses_bad_settings_by_name(tmp_path, capsys) -> None:
    from beamhub.widgets.dashboard_service import main

    base = ["--state-dir", str(tmp_path), "--dsn-url", "http://127.0.0.1:9"]
    assert main([*base, "--analysis", '{"colour": 1}']) == 2
    assert "--analysis: colour: unknown analysis parameter" in capsys.readouterr().err
    assert main([*base, "--image-px", "4"]) == 2
    assert "--image-px 4 is below 8 pixels" in capsys.readouterr().err
    assert main(["--state-dir", str(tmp_path)]) == 2
    assert "no DSN URL" in capsys.readouterr().err
    assert main(base) == 2  # no token service named: the dashboard never signs tokens itself
    err = capsys.readouterr().err
    assert "cannot ask the token service for tokens" in err and "--tokens-url" in err
    assert not (tmp_path / "signing-key.pem").exists()


def test_service_without_its_hub_api_token_says_so(tmp_path, capsys, monkeypatch) -> None:
    from beamhub.widgets.dashboard_service import main

    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    tokens = ["--tokens-url", "http://127.0.0.1:9/services/tokens/"]
    assert main(["--state-dir", str(tmp_path), "--dsn-url", "http://127.0.0.1:9", *tokens]) == 2
    err = capsys.readouterr().err
    assert "custom:beamhub:tokens:mint-for" in err and "JUPYTERHUB_API_TOKEN" in err


def test_errors_are_in_the_one_api_shape() -> None:
    """Not found, unauthenticated (API endpoints never redirect to a login) and OAuth callback
    errors: JSON ``{reason, message}`` valid against auth/api.py's ERROR_SCHEMA."""
    import jsonschema
    import requests

    from beamhub.auth.api import ERROR_SCHEMA
    from tests.httpserver import ServerThread

    dashboard = Dashboard("http://127.0.0.1:9", lambda p: ("", 0.0))
    try:
        with ServerThread(build_app(dashboard)) as server:
            base = f"http://127.0.0.1:{server.port}/services/dashboard/"
            cases = {
                "nope": (404, "not_found"),
                "api/status": (401, "unauthenticated"),
                "p/p-1001/data.json": (401, "unauthenticated"),
                "oauth_callback": (400, None),  # no ?code / state: JupyterHub's own refusal
            }
            for path, (status, reason) in cases.items():
                r = requests.get(base + path, allow_redirects=False, timeout=10)
                assert r.status_code == status, (path, r.status_code, r.text)
                assert r.headers["Content-Type"].startswith("application/json"), path
                jsonschema.validate(r.json(), ERROR_SCHEMA)
                if reason:
                    assert r.json()["reason"] == reason, (path, r.json())
                assert r.json()["message"], path
    finally:
        dashboard.close()


async def test_access_log_leaves_out_query_strings(caplog) -> None:
    """The OAuth callback's ``?code=...&state=...`` must not reach the service log."""
    import logging

    from tornado.httpclient import AsyncHTTPClient
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    dashboard = Dashboard("http://127.0.0.1:9", lambda p: ("", 0.0))
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(build_app(dashboard))
    server.add_sockets(sockets)
    url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}/services/dashboard/api/health"
    try:
        with caplog.at_level(logging.INFO):
            response = await AsyncHTTPClient().fetch(url + "?code=s3cr3t-code")
        assert response.code == 200
        logged = [r.getMessage() for r in caplog.records]
        assert any("/services/dashboard/api/health" in m for m in logged), logged
        assert not any("s3cr3t-code" in m for m in logged), logged
    finally:
        server.stop()
        await server.close_all_connections()
        dashboard.close()


def test_metrics_count_viewers_for_this_host_only() -> None:
    """/metrics over real HTTP: open viewer pages by project; a client forwarded from elsewhere
    is refused (the dashboard verifies no tokens); /healthz answers without a login."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    from tests.httpserver import ServerThread

    dashboard = Dashboard("http://127.0.0.1:9", lambda p: ("", 0.0))
    try:
        dashboard.feeds["p-1001"] = dashboard.feed("p-1001")
        dashboard.touch("p-1001", "page-a", "alice")
        dashboard.touch("p-1001", "page-b", "alice")
        dashboard.touch("p-1001", "page-c", "bob")
        with ServerThread(build_app(dashboard)) as server:
            base = f"http://127.0.0.1:{server.port}/services/dashboard/"
            r = requests.get(base + "metrics", timeout=10)
            assert r.status_code == 200, r.text
            got = {
                (s.name, tuple(s.labels.values())): s.value
                for f in text_string_to_metric_families(r.text)
                for s in f.samples
            }
            assert got[("beamhub_dashboard_viewers", ("p-1001",))] == 3
            assert got[("beamhub_dashboard_viewer_users", ("p-1001",))] == 2
            assert ("beamhub_dashboard_subscriptions", ("p-1001",)) in got
            r = requests.get(
                base + "metrics", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=10
            )
            assert r.status_code == 401 and r.json()["reason"] == "unauthenticated", r.text
            r = requests.get(base + "healthz", timeout=10)
            assert r.status_code == 200 and r.json()["status"] == "ok"
    finally:
        dashboard.close()
