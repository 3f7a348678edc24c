"""`beamhub token issue` names a person: --sub, else the caller (the hub user whose server runs it,
else the Unix account), never a made-up 'admin'."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys

import jwt

CLI = [sys.executable, "-m", "beamhub.hub.cli", "token", "issue"]


def _sub(*extra: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "JUPYTERHUB_USER"}
    out = subprocess.run(
        [*CLI, "--project", "p-9", "--scope", "stream.read", *extra],
        env={**base, **env},
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    claims = jwt.decode(out, options={"verify_signature": False})
    assert claims["project"] == "p-9" and claims["scope"] == "stream.read", json.dumps(claims)
    return claims["sub"]


def test_the_subject_is_the_caller_unless_named(beamhub_home):
    assert _sub() == getpass.getuser() != "admin"
    assert _sub(JUPYTERHUB_USER="bob") == "bob"  # run in bob's server: bob's token
    assert _sub("--sub", "alice", JUPYTERHUB_USER="bob") == "alice"
