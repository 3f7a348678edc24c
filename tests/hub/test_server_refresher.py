"""A spawned server keeps its own project token fresh, so a notebook opened late finds one."""

from __future__ import annotations

import time

import pytest
import requests

from tests.hub.hubstack import RunningStack, login, spawn

pytestmark = pytest.mark.timeout(240)


def test_a_server_refreshes_its_token_with_no_notebook_open(dev_stack: RunningStack) -> None:
    """The dev stack's tokens live 30 s: the server's extension refreshes before they expire."""
    session, r = login(dev_stack, "oscar", "oscar-dev")
    assert r.status_code == 200
    spawn(dev_stack, session, "oscar")
    oscar = {"Authorization": f"token {dev_stack.user_api_token('oscar')}"}

    def server_tokens() -> list[dict]:
        r = requests.get(
            dev_stack.tokens + "api/tokens",
            headers=oscar,
            timeout=10,
        )
        assert r.status_code == 200, r.text
        return [t for t in r.json()["tokens"] if t["kind"] == "server"]

    first = {t["jti"] for t in server_tokens()}
    assert first
    deadline = time.monotonic() + 90  # two lifetimes: at least one refresh is due by then
    while not ({t["jti"] for t in server_tokens()} - first):
        assert time.monotonic() < deadline, "the server never refreshed its token by itself"
        time.sleep(1)
    fresh = max(server_tokens(), key=lambda t: t["iat"])
    assert fresh["exp"] > time.time()  # a live token is there for a notebook opened now
