"""Real stacks for the hub tests: `beamhub up` subprocesses (IdP, JupyterHub, services, DSN, detector).

One dev stack and one moderate stack per session, on ephemeral ports in a tmp state folder; each is
stopped with SIGTERM at the end and must leave no process behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.hub.hubstack import RunningStack

#: the dev stack's gateway lists this window on its public status
DEV_MAINTENANCE = [
    {"start": "2030-01-07T06:00:00Z", "end": "2030-01-07T10:00:00Z", "what": "filesystem upgrade"}
]

DEV_YAML = f"""\
enclave: dev
hub: {{port: 0}}
tokens: {{ttl: 30, revocation_poll: 1.0}}
detector: {{rate_hz: 2, shape: [64, 64], print_every_s: 1}}
gateway: {{maintenance: {json.dumps(DEV_MAINTENANCE)}}}
"""

MODERATE_YAML = """\
enclave: moderate
hub: {port: 0}
tokens: {ttl: 300, revocation_poll: 1.0}
dsn: {enabled: false}
detector: {enabled: false}
"""


def _run(
    tmp_path_factory: pytest.TempPathFactory, yaml_text: str, name: str
) -> Iterator[RunningStack]:
    stack = RunningStack(tmp_path_factory.mktemp(f"stack-{name}"), yaml_text, name).start()
    try:
        yield stack
    finally:
        stack.stop_and_check()


@pytest.fixture(scope="session")
def dev_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    yield from _run(tmp_path_factory, DEV_YAML, "dev")


@pytest.fixture(scope="session")
def moderate_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    yield from _run(tmp_path_factory, MODERATE_YAML, "moderate")
