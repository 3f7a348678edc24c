"""Only the token service opens the signing key: a black-box check against a real `beamhub up`.

Every Python process of the stack (`beamhub up` with its DSN and detector, JupyterHub, the token
service, the gateway, the dashboard, a user's server) starts with a ``sitecustomize`` whose audit
hook (PEP 578) records who opens, creates or links a path ending in ``signing-key.pem``. The stack
then does its work: a login, a spawn with a delegated token, the detector streaming, the
dashboard subscribing, the gateway and the DSN verifying tokens. Afterwards the only opener must
be the token service process.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.hub.hubstack import RunningStack, login, server_env, service_dir, spawn

pytestmark = pytest.mark.timeout(240)

#: Runs first in every Python process whose PYTHONPATH holds its folder (JupyterHub passes
#: PYTHONPATH on to services and servers, other variables it drops) and logs beside itself;
#: writes with os.open/os.write (audited too: the guard keeps the hook from recording itself).
SITECUSTOMIZE = """\
import json, os, sys

_LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "key-opens.jsonl")
_busy = False


def _cmdline():
    fd = os.open("/proc/self/cmdline", os.O_RDONLY)
    try:
        return os.read(fd, 65536).decode(errors="replace").rstrip("\\0").split("\\0")
    finally:
        os.close(fd)


def _record(kind, path):
    global _busy
    _busy = True
    try:
        line = json.dumps({"kind": kind, "pid": os.getpid(), "argv": _cmdline(), "path": path})
        fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\\n").encode())
        finally:
            os.close(fd)
    finally:
        _busy = False


def _hook(event, args):
    if _busy or event not in ("open", "os.link", "os.rename", "os.replace", "shutil.copyfile"):
        return
    paths = args[:1] if event == "open" else args[:2]
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)):
            name = os.fsdecode(path)
            if name.endswith("signing-key.pem"):
                _record(event, name)


_record("start", "")
sys.addaudithook(_hook)
"""

YAML = """\
enclave: dev
hub: {port: 0}
tokens: {ttl: 30, revocation_poll: 1.0}
detector: {rate_hz: 5, shape: [64, 64], print_every_s: 1}
dashboard: {update_hz: 2}
"""


def _records(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _role(argv: list[str]) -> str:
    """Which part of the stack a process is, from its command line."""
    line = " ".join(argv)
    for marker, role in [
        ("beamhub.hub.tokens.service", "token service"),
        ("beamhub.hub.gateway", "gateway"),
        ("beamhub.widgets.dashboard_service", "dashboard"),
        ("beamhub.kernels.serverjob", "user server"),
        ("jupyterhub-singleuser", "user server"),
        ("jupyterhub_config.py", "hub"),
        (" up ", "beamhub up"),
    ]:
        if marker in f" {line} ":
            return role
    return line[:120]


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningStack, Path]]:
    work = tmp_path_factory.mktemp("key-audit")
    hook = service_dir("key-audit") / "hook"  # the services' accounts (as root) run it too
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (hook / "sitecustomize.py").chmod(0o644)
    log = hook / "key-opens.jsonl"
    log.touch()
    log.chmod(0o666)  # every account of the stack appends (test only)
    hook.chmod(0o755)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), saved]))
    try:
        stack = RunningStack(work, YAML, "audited").start()
    finally:  # only the stack's processes carry the hook
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    try:
        yield stack, log
    finally:
        stack.stop()
        leftovers = stack.survivors()
        stack.kill_survivors()
        assert not leftovers, f"`beamhub up` left processes behind: {leftovers}"


def _exercise(stack: RunningStack) -> None:
    """What makes tokens flow: a spawn (delegated token), the DSN and the gateway verifying it,
    the detector streaming, the dashboard subscribed to the detector's channel."""
    session, r = login(stack, "alice", "alice-dev")
    assert r.status_code == 200, (r.status_code, r.url)
    spawn(stack, session, "alice")
    token = server_env(stack, "alice")["BEAMHUB_TOKEN"]
    bearer = {"Authorization": f"Bearer {token}"}
    r = requests.get(stack.urls["dsn"] + "/api/channels", headers=bearer, timeout=10)
    assert r.status_code == 200, r.text
    r = requests.get(
        stack.urls["gateway"] + "api/v1/projects/p-1001/channels", headers=bearer, timeout=10
    )
    assert r.status_code == 200, r.text
    r = session.get(stack.urls["dashboard"], timeout=20)  # the dashboard's own OAuth round trip
    assert r.status_code == 200, (r.status_code, r.url)
    channel = stack.urls["detector_channel"]
    deadline = time.monotonic() + 60
    while True:
        r = session.get(stack.urls["dashboard"] + "p/p-1001/data.json", timeout=10)
        assert r.status_code == 200, r.text
        streams = {s["channel"]: s for s in r.json()["streams"]}
        if channel in streams:
            break
        assert time.monotonic() < deadline, f"the dashboard never subscribed to {channel}"
        time.sleep(0.5)
    assert "live figures" in stack.output()  # `beamhub up` printed with its own read token


def test_only_the_token_service_opens_the_signing_key(audited: tuple[RunningStack, Path]) -> None:
    stack, log = audited
    _exercise(stack)
    stack.stop()  # every process has done all it will do
    records = _records(log)
    started = {r["pid"]: _role(r["argv"]) for r in records if r["kind"] == "start"}
    # the hook ran in every part that used to open the key, so its silence there means something
    # (a user server runs sandboxed as its user, where this hook is hidden: tests/hub/
    # test_tenancy.py shows it cannot read the key at all)
    for part in ("beamhub up", "hub", "token service", "gateway", "dashboard"):
        assert part in started.values(), f"no audited {part} process: {sorted(started.values())}"
    opens = [r for r in records if r["kind"] != "start"]
    openers = {r["pid"]: _role(r["argv"]) for r in opens}
    assert openers, "nobody opened the signing key: is the audit hook recording opens?"
    assert set(openers.values()) == {"token service"}, (
        "processes other than the token service opened the signing key: "
        + json.dumps([r for r in opens if _role(r["argv"]) != "token service"], indent=1)
    )
    assert len(openers) == 1, f"more than one token service process: {openers}"
    assert all(r["path"] == str(stack.state / "tokens" / "signing-key.pem") for r in opens), opens
    assert (stack.state / "tokens" / "signing-key.pem").exists()
