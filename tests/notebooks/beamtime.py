"""A beamtime for the notebook and browser tests: a real `beamhub up` stack and alice's real server.

The detector streams 256x256 frames at 20 Hz (64x64 frames are too small for the peak finder's
10-peak hit threshold) with 30 % hits, so the notebooks' hit-rate checks have frames to count.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hub.hubstack import RunningStack, login, server_env, spawn

__all__ = ["BEAMTIME_YAML", "NOTEBOOKS", "REPO", "run_stack", "spawned_env"]

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"

#: The beamtime's deployment; only ``enclave`` changes between dev, open and moderate (the
#: profile brings the rest: MFA, token lifetime cap, channel template with CURVE and L7 only).
BEAMTIME_YAML = """\
enclave: {enclave}
hub: {{port: 0}}
tokens: {{ttl: 600, revocation_poll: 1.0}}
detector: {{rate_hz: 20, shape: [256, 256], hit_fraction: 0.3}}
"""


def run_stack(
    tmp_path_factory: pytest.TempPathFactory, name: str, enclave: str = "dev"
) -> Iterator[RunningStack]:
    """Start `beamhub up`; at the end SIGTERM it and fail if any process of it survives."""
    yaml_text = BEAMTIME_YAML.format(enclave=enclave)
    stack = RunningStack(tmp_path_factory.mktemp(f"stack-{name}"), yaml_text, name).start()
    try:
        yield stack
    finally:
        stack.stop_and_check()


def spawned_env(stack: RunningStack, user: str = "alice") -> dict[str, str]:
    """Log ``user`` in through the IdP's forms, start her server, return its real environment."""
    session, answer = login(stack, user, f"{user}-dev")
    assert answer.status_code == 200, (answer.status_code, answer.url)
    spawn(stack, session, user)
    return server_env(stack, user)
