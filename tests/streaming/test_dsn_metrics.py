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


async def test_a_work_consumers_loss_and_lag_reach_the_metrics() -> None:
    """A work consumer that saw a sequence gap (frames 3 and 4 never sent) reports it: the loss
    the DsnWorkStreamLoss alert reads, per channel and role."""
    import asyncio

    from beamhub.streaming.consumer import StreamConsumer

    tokens = Tokens()
    token = tokens.issue()
    zctx = zmq.Context()
    async with running_dsn(tokens) as node:
        status, body = await api(node.url, "POST", "/api/channels", token, {"stream": "det"})
        assert status == 201, body
        cid, eps = body["id"], body["endpoints"]
        producer = await register(node.url, cid, token, "producer")
        reader = await register(node.url, cid, token, "consumer", consumer_id="analysis-1")
        push = secure(zctx.socket(zmq.PUSH), producer)
        push.linger = 0
        push.connect(eps["producer"])
        consumer = StreamConsumer(
            eps["work"],
            consumer_id="analysis-1",
            report=eps["report"],
            curve_server_key=reader["server_key"],
            curve_keypair=(reader["public"], reader["secret"]),
            exclusive=True,
        )
        try:
            send_frames(push, [0, 1, 2, 5, 6, 7])
            seqs = []
            for _ in range(6):
                frame = await asyncio.to_thread(consumer.receive, 10)
                assert frame is not None
                seqs.append(frame.header.seq)
            assert seqs == [0, 1, 2, 5, 6, 7] and consumer.lost == 2
            await asyncio.to_thread(consumer.send_report)  # (receive() reports every 0.5 s)
            labels = _key((("channel", cid), ("project", "p1"), ("stream", "det")), role="work")

            async def reported():
                _, text = await _get(node.url + "/metrics")
                got = _samples(text)
                return got if got.get(("beamhub_dsn_lost_frames_total", labels)) == 2 else None

            got = await wait_until(reported)
        finally:
            consumer.close()
            push.close(linger=0)
            zctx.destroy(linger=0)
        assert got[("beamhub_dsn_consumers", labels)] == 1
        assert got[("beamhub_dsn_lag_frames", labels)] == 0  # it has read up to the head
        frames = _key((("channel", cid), ("project", "p1"), ("stream", "det")))
        assert got[("beamhub_dsn_frames_total", frames)] == 6
