"""Fixtures shared by the streaming tests: a ZeroMQ context, a DataPlane that must not leak, and a
receiver standing in for the DSN's producer face."""

from __future__ import annotations

import pytest
import zmq

from beamhub.streaming.dataplane import DataPlane

from .dataplane_helpers import Receiver, dataplane_threads, no_dsn_threads


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def plane():
    """A DataPlane on 127.0.0.1; the test fails if close() leaves data-plane threads running."""
    before = dataplane_threads()
    dp = DataPlane("127.0.0.1")
    dp.threads_before = before  # for tests that check for leftovers themselves
    yield dp
    dp.close()
    assert no_dsn_threads(before) == [], "DataPlane.close() left threads running"


@pytest.fixture
def receiver():
    rx = Receiver()
    yield rx
    rx.close()
