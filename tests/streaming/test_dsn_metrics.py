"""The DSN's /metrics and /healthz over real HTTP, with frames sent over real ZeroMQ."""

from __future__ import annotations

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from tests.streaming.dataplane_helpers import send_frames
from tests.streaming.dsn_helpers import Tokens, api, register, running_dsn, secure, wait_until

pytestmark = pytest.mark.timeout(60)


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    resp = await AsyncHTTPClient().fetch(HTTPRequest(url, headers=headers or {}), raise_error=False)
    return resp.code, resp.body.decode()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _key(labels: tuple, **more: str) -> tuple:
    return tuple(sorted((*labels, *more.items())))


async def test_metrics_count_frames_and_drops_and_are_guarded() -> None:
    tokens = Tokens()
    token = tokens.issue()
    zctx = zmq.Context()
    async with running_dsn(tokens) as node:
        status, body = await api(
            node.url,
            "POST",
            "/api/channels",
            token,
            {"stream": "det", "mode": "l7", "when_no_consumer": "drop"},
        )
        assert status == 201, body
        cid = body["id"]
        push = secure(zctx.socket(zmq.PUSH), await register(node.url, cid, token, "producer"))
        push.linger = 0
        push.connect(body["endpoints"]["producer"])
        try:
            send_frames(push, range(30))
            labels = (("channel", cid), ("project", "p1"), ("stream", "det"))

            async def counted():
                code, text = await _get(node.url + "/metrics")
                assert code == 200, text
                got = _samples(text)
                drop = got.get(
                    ("beamhub_dsn_dropped_frames_total", _key(labels, reason="no_consumer"))
                )
                return got if drop == 30 else None

            got = await wait_until(counted)
        finally:
            push.close(linger=0)
            zctx.destroy(linger=0)
        # no consumer: every frame was dropped (counted by reason), none forwarded
        assert got[("beamhub_dsn_frames_total", labels)] == 0
        assert got[("beamhub_dsn_bytes_total", labels)] == 0
        assert ("beamhub_dsn_monitor_frames_total", labels) in got
        assert got[("beamhub_dsn_channels", (("state", "active"),))] == 1
        work = _key(labels, role="work")
        assert got[("beamhub_dsn_consumers", work)] == 0
        assert got[("beamhub_dsn_lost_frames_total", work)] == 0

        # through a proxy from elsewhere: not this host, so a metrics token is needed
        remote = {"X-Forwarded-For": "198.51.100.7"}
        code, text = await _get(node.url + "/metrics", remote)
        assert code == 401 and "'metrics' scope" in text, text
        code, text = await _get(
            node.url + "/metrics", {**remote, "Authorization": f"Bearer {token}"}
        )
        assert code == 403 and '"reason": "scope"' in text, text
        metrics_token = tokens.issue(scopes="metrics")
        code, text = await _get(
            node.url + "/metrics", {**remote, "Authorization": f"Bearer {metrics_token}"}
        )
        assert code == 200 and "beamhub_dsn_frames_total" in text

        code, text = await _get(node.url + "/healthz")
        assert code == 200 and '"status": "ok"' in text
